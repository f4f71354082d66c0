// A quantised projection basis (optimizer_config::basis int8 / int4, adarank/basis_format.hpp)
// against a float one, measured in the same run. Each low-rank step decodes the basis (Q =
// code·scale, O(r·len)) into the workspace before the projection GEMM it serves (R = Q·M,
// O(r·len·other)); the decode is the price of the smaller basis. Measured: the decode of an
// r × len basis (r = 128, len = 4096, blocks of 256) in each format, the projection GEMM beside
// it (a 4096 × 1024 weight, projected on its 4096 side), and whole optimizer steps of that
// weight (low_rank_adamw, fixed rank 128, no refreshes: bench_state8's BM_LowRankStep) with a
// float, int8 and int4 basis. All use the same threads (OMP_NUM_THREADS). The int4 decode runs the
// widest body the build has (velora/backend/cpu/int4_decode.hpp; reported as int4_decode_body).
#include <adarank/adarank.hpp>
#include <velora/backend/eigen.hpp>

#include "common.hpp"
#include "optimizer_steps.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#include <unistd.h>

#include <cmath>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using velora::index_t;

constexpr index_t kRank = 128, kLen = 4096, kOther = 1024, kBlock = 256;

int threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

velora::eigen_backend<float>& backend() {
    static velora::eigen_backend<float> b(threads());
    return b;
}

// A basis-like r × len matrix: Gaussian rows of norm about 1 (entries about 1/sqrt(len), the
// size an orthonormal basis row's entries have; the decode's cost does not depend on the values).
const std::vector<float>& float_basis() {
    static const std::vector<float> p = [] {
        std::vector<float> v(static_cast<std::size_t>(kRank * kLen));
        bench::fill_gaussian(v.data(), kRank * kLen, 5, 1.0 / std::sqrt(static_cast<double>(kLen)));
        return v;
    }();
    return p;
}

adarank::quantized_basis encoded(adarank::basis_format f) {
    adarank::quantized_basis q;
    q.configure(f, kLen, kBlock);
    q.encode(float_basis().data(), kRank, kLen);
    return q;
}

void decode_benchmark(benchmark::State& state, adarank::basis_format f) {
    const adarank::quantized_basis q = encoded(f);
    std::vector<float> out(static_cast<std::size_t>(kRank * kLen));
    for (auto _ : state) {
        q.decode(out.data(), kLen);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    state.counters["basis_bytes"] = static_cast<double>(q.bytes());
    state.SetItemsProcessed(state.iterations() * kRank * kLen);
}
void BM_DecodeInt8(benchmark::State& s) { decode_benchmark(s, adarank::basis_format::int8); }
void BM_DecodeInt4(benchmark::State& s) { decode_benchmark(s, adarank::basis_format::int4); }
BENCHMARK(BM_DecodeInt8)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeInt4)->UseRealTime()->Unit(benchmark::kMicrosecond);

// The projection the decoded basis serves: R (r × other) = Q (r × len) · G (len × other).
void BM_ProjectionGemm(benchmark::State& state) {
    std::vector<float> g(static_cast<std::size_t>(kLen * kOther)), r(static_cast<std::size_t>(kRank * kOther));
    bench::fill_gaussian(g.data(), kLen * kOther, 6, 1e-3);
    const velora::const_matrix_view<float> q(float_basis().data(), kRank, kLen), gv(g.data(), kLen, kOther);
    for (auto _ : state) {
        backend().gemm(velora::op::none, velora::op::none, 1.0f, q, gv, 0.0f, velora::matrix_view<float>(r.data(), kRank, kOther));
        benchmark::ClobberMemory();
    }
    state.counters["basis_bytes"] = static_cast<double>(float_basis().size() * sizeof(float));
    state.SetItemsProcessed(state.iterations() * 2 * kRank * kLen * kOther);   // flops
}
BENCHMARK(BM_ProjectionGemm)->UseRealTime()->Unit(benchmark::kMicrosecond);

// ---------------------------------------------------------------- whole optimizer steps
adarank::optimizer_config step_config(adarank::basis_format format) {
    adarank::optimizer_config c = adarank::optimizer_config::galore(kRank, 1 << 30, 0.25);   // no refresh after the first step
    c.side = adarank::side_policy::left;   // project the 4096 side: len = 4096, as the decode above
    c.adam.lr = 1e-3;
    c.basis = format;
    c.basis_block = kBlock;
    return c;
}
void step_benchmark(benchmark::State& state, adarank::basis_format format) {
    bench::time_optimizer_steps(state, backend(), step_config(format), adarank::param_kind::low_rank, kLen, kOther);
}
void BM_LowRankStepFloatBasis(benchmark::State& s) { step_benchmark(s, adarank::basis_format::float32); }
void BM_LowRankStepInt8Basis(benchmark::State& s) { step_benchmark(s, adarank::basis_format::int8); }
void BM_LowRankStepInt4Basis(benchmark::State& s) { step_benchmark(s, adarank::basis_format::int4); }
BENCHMARK(BM_LowRankStepFloatBasis)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LowRankStepInt8Basis)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LowRankStepInt4Basis)->UseRealTime()->Unit(benchmark::kMillisecond);

void print_ratios(const bench::ratio_reporter& rep) {
    using bench::goal;
    using bench::ratio;
    bench::print_header("Ratios (same run; real time per iteration, the median when repetitions were given)",
                        "basis 128 x 4096, blocks of 256; the GEMM: 128 x 4096 times 4096 x 1024; steps: a 4096 x 1024 weight at rank 128");
    print_row("DecodeInt8 / ProjectionGemm", ratio(rep.seconds("BM_DecodeInt8"), rep.seconds("BM_ProjectionGemm")), goal::info, 0, "%.3f",
              "time ratio: the decode's share beside the product it serves");
    print_row("DecodeInt4 / ProjectionGemm", ratio(rep.seconds("BM_DecodeInt4"), rep.seconds("BM_ProjectionGemm")), goal::info, 0, "%.3f", "time ratio");
    print_row("LowRankStepInt8Basis / LowRankStepFloatBasis (optimizer)", ratio(rep.seconds("BM_LowRankStepInt8Basis"), rep.seconds("BM_LowRankStepFloatBasis")),
              goal::info, 0, "%.3f", "time ratio");
    print_row("LowRankStepInt4Basis / LowRankStepFloatBasis (optimizer)", ratio(rep.seconds("BM_LowRankStepInt4Basis"), rep.seconds("BM_LowRankStepFloatBasis")),
              goal::info, 0, "%.3f", "time ratio");
    print_row("LowRankStep state bytes int8 / float basis",
              ratio(rep.counter("BM_LowRankStepInt8Basis", "state_bytes"), rep.counter("BM_LowRankStepFloatBasis", "state_bytes")), goal::info, 0, "%.4f",
              "moments stay float");
    print_row("LowRankStep state bytes int4 / float basis",
              ratio(rep.counter("BM_LowRankStepInt4Basis", "state_bytes"), rep.counter("BM_LowRankStepFloatBasis", "state_bytes")), goal::info, 0, "%.4f", "");
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::AddCustomContext("omp_threads", std::to_string(threads()));
    benchmark::AddCustomContext("int4_decode_body", std::string(velora::cpu::simd_body_name(velora::cpu::widest_body)));
    const bool color = ::isatty(STDOUT_FILENO) != 0;
    bench::ratio_reporter reporter(color ? benchmark::ConsoleReporter::OO_Color : benchmark::ConsoleReporter::OO_None);
    benchmark::RunSpecifiedBenchmarks(&reporter);
    std::cout.flush();
    print_ratios(reporter);
    benchmark::Shutdown();
    return 0;
}
