// 8-bit blockwise Adam moments against float moments, measured in the same run: the dense AdamW
// pass over 4M floats (the backend's float adamw_update against cpu/adam8.hpp's blocks, at each
// supported block size), the subspace Adam of a low-rank step (r × n moments, n written in place
// of the projected gradient), and whole optimizer steps (low_rank_adamw, state = float32 against
// int8_blockwise): a dense 2048×2048 parameter, and a low-rank 1024×4096 one at rank 128 without
// refreshes (bench_adarank's BM_LowRankAdamStep). All use the same threads (OMP_NUM_THREADS).
#include <adarank/adarank.hpp>
#include <velora/backend/cpu/adam8.hpp>
#include <velora/backend/eigen.hpp>

#include "adamw_terms.hpp"
#include "common.hpp"
#include "optimizer_steps.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#include <unistd.h>

#include <cstdint>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using velora::index_t;
using velora::cpu::adam_row_kind;

constexpr index_t kRows = 2048, kCols = 2048;            // 4M floats
constexpr index_t kRank = 128, kSubspaceCols = 4096;      // a 1024×4096 weight's right-side subspace at r = 128

int threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

struct dense_data {
    index_t n;
    std::vector<float> w, g, m, v;
    std::vector<std::uint8_t> qm, qv;
    std::vector<float> am, av;
    explicit dense_data(index_t count) : n(count), w(count), g(count), m(count, 0.0f), v(count, 0.0f), qm(count, 0), qv(count, 0) {
        bench::fill_gaussian(w.data(), n, 1, 0.02);
        bench::fill_gaussian(g.data(), n, 2, 1e-3);
    }
    velora::cpu::adam8_tensor_state state8(index_t block) {
        am.assign(static_cast<std::size_t>((n + block - 1) / block), 0.0f);
        av.assign(am.size(), 0.0f);
        std::fill(qm.begin(), qm.end(), std::uint8_t{0});
        std::fill(qv.begin(), qv.end(), std::uint8_t{0});
        return {qm.data(), qv.data(), am.data(), av.data(), n, block};
    }
};

dense_data& dense() {
    static dense_data d(kRows * kCols);
    return d;
}

velora::eigen_backend<float>& backend() {
    static velora::eigen_backend<float> b(threads());
    return b;
}

void BM_AdamWFloat(benchmark::State& state) {
    auto& d = dense();
    const auto c = bench::dense_adamw_terms();
    for (auto _ : state) {
        backend().adamw_update(velora::matrix_view<float>(d.w.data(), kRows, kCols), velora::const_matrix_view<float>(d.g.data(), kRows, kCols),
                               velora::matrix_view<float>(d.m.data(), kRows, kCols), velora::matrix_view<float>(d.v.data(), kRows, kCols), c);
        benchmark::ClobberMemory();
    }
    state.counters["state_bytes"] = 2.0 * static_cast<double>(d.n) * sizeof(float);
    state.SetBytesProcessed(state.iterations() * 7 * d.n * static_cast<std::int64_t>(sizeof(float)));
}
BENCHMARK(BM_AdamWFloat)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_AdamW8bit(benchmark::State& state) {
    bench::guarded(state, [&] {
        auto& d = dense();
        const index_t block = state.range(0);
        const auto s = d.state8(block);
        const auto c = bench::dense_adamw_terms();
        for (auto _ : state) {
            if (!velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(threads(), d.g.data(), d.w.data(), s, c))
                return state.SkipWithError("a block was not finite");
            benchmark::ClobberMemory();
        }
        state.counters["state_bytes"] = static_cast<double>(2 * d.n) + 2.0 * sizeof(float) * static_cast<double>(s.blocks());
        // w read and written, g read, m and v bytes read and written, two absmax per block each way
        state.SetBytesProcessed(state.iterations() * (14 * d.n + 16 * static_cast<std::int64_t>(s.blocks())));
    });
}
// Registered in main as BM_AdamW8bit_<block> (the ratio table keys on function names).

// The same two passes over 64K elements (w, g, m, v: 1 MiB of floats, in one core's 1 MiB L2) on
// one thread, repeated: the arithmetic's own rate, with memory and thread start-up out of the way
// (the float row is cpu/adam.hpp's adam_row, what adamw_update runs per row). The streaming pass
// of a thread can be no faster than this.
constexpr index_t kCachedRows = 64, kCachedCols = 1024;
dense_data& cached() {
    static dense_data d(kCachedRows * kCachedCols);
    return d;
}

void BM_AdamWFloatCached(benchmark::State& state) {
    auto& d = cached();
    const auto c = bench::dense_adamw_terms();
    for (auto _ : state) {
        velora::cpu::adam_row<adam_row_kind::galore_weight>(d.g.data(), d.m.data(), d.v.data(), d.w.data(), d.n, c);
        benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(state.iterations() * d.n);
}
BENCHMARK(BM_AdamWFloatCached)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_AdamW8bitCached(benchmark::State& state) {
    bench::guarded(state, [&] {
        auto& d = cached();
        const auto s = d.state8(256);
        const auto c = bench::dense_adamw_terms();
        for (auto _ : state) {
            if (!velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(1, d.g.data(), d.w.data(), s, c))
                return state.SkipWithError("a block was not finite");
            benchmark::ClobberMemory();
        }
        state.SetItemsProcessed(state.iterations() * d.n);
    });
}
BENCHMARK(BM_AdamW8bitCached)->UseRealTime()->Unit(benchmark::kMicrosecond);

// The subspace Adam of a low-rank step: n = m/(√v+ε) overwrites the projected gradient.
struct subspace_data {
    dense_data d{kRank * kSubspaceCols};
    std::vector<float> r0 = d.g, r = d.g;
};
subspace_data& subspace() {
    static subspace_data s;
    return s;
}

void BM_SubspaceAdamFloat(benchmark::State& state) {
    auto& s = subspace();
    const auto c = bench::dense_adamw_terms();
    for (auto _ : state) {
        state.PauseTiming();
        s.r = s.r0;
        state.ResumeTiming();
        backend().adam_moments(velora::const_matrix_view<float>(s.r.data(), kRank, kSubspaceCols), velora::matrix_view<float>(s.d.m.data(), kRank, kSubspaceCols),
                               velora::matrix_view<float>(s.d.v.data(), kRank, kSubspaceCols), c.beta1, c.beta2, c.eps,
                               velora::matrix_view<float>(s.r.data(), kRank, kSubspaceCols));
        benchmark::ClobberMemory();
    }
}
BENCHMARK(BM_SubspaceAdamFloat)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_SubspaceAdam8bit(benchmark::State& state) {
    bench::guarded(state, [&] {
        auto& s = subspace();
        const auto q = s.d.state8(state.range(0));
        const auto c = bench::dense_adamw_terms();
        for (auto _ : state) {
            state.PauseTiming();
            s.r = s.r0;
            state.ResumeTiming();
            if (!velora::cpu::adam8_tensor<adam_row_kind::moments>(threads(), s.r.data(), s.r.data(), q, c)) return state.SkipWithError("not finite");
            benchmark::ClobberMemory();
        }
    });
}
// Registered in main as BM_SubspaceAdam8bit_<block>.

constexpr index_t kBlocks[] = {64, 128, 256, 512, 1024, 2048, 4096};
constexpr index_t kSubspaceBlocks[] = {256, 2048};

void register_blocks() {
    for (const index_t b : kBlocks)
        benchmark::RegisterBenchmark(("BM_AdamW8bit_" + std::to_string(b)).c_str(), BM_AdamW8bit)->Arg(b)->UseRealTime()->Unit(benchmark::kMillisecond);
    for (const index_t b : kSubspaceBlocks)
        benchmark::RegisterBenchmark(("BM_SubspaceAdam8bit_" + std::to_string(b)).c_str(), BM_SubspaceAdam8bit)->Arg(b)->UseRealTime()->Unit(benchmark::kMillisecond);
}

// ---------------------------------------------------------------- whole optimizer steps
constexpr index_t kStepRows = 1024, kStepCols = 4096;

adarank::optimizer_config step_config(adarank::state_format format) {
    adarank::optimizer_config c = adarank::optimizer_config::galore(kRank, 1 << 30, 0.25);
    c.adam.lr = 1e-3;
    c.adam.eps = 1e-6;
    c.state = format;
    return c;
}
void step_benchmark(benchmark::State& state, adarank::state_format format, adarank::param_kind kind, index_t r, index_t c) {
    bench::time_optimizer_steps(state, backend(), step_config(format), kind, r, c);
}
void BM_DenseStepFloat(benchmark::State& s) { step_benchmark(s, adarank::state_format::float32, adarank::param_kind::dense, kRows, kCols); }
void BM_DenseStep8bit(benchmark::State& s) { step_benchmark(s, adarank::state_format::int8_blockwise, adarank::param_kind::dense, kRows, kCols); }
void BM_LowRankStepFloat(benchmark::State& s) { step_benchmark(s, adarank::state_format::float32, adarank::param_kind::low_rank, kStepRows, kStepCols); }
void BM_LowRankStep8bit(benchmark::State& s) { step_benchmark(s, adarank::state_format::int8_blockwise, adarank::param_kind::low_rank, kStepRows, kStepCols); }
BENCHMARK(BM_DenseStepFloat)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DenseStep8bit)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LowRankStepFloat)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LowRankStep8bit)->UseRealTime()->Unit(benchmark::kMillisecond);

void print_ratios(const bench::ratio_reporter& rep) {
    using bench::goal;
    using bench::ratio;
    bench::print_header("Ratios (same run; real time per iteration, the median when repetitions were given)",
                        "dense: 4M floats; subspace: 128 x 4096; speed-up = float time / 8-bit time");
    for (const index_t b : kBlocks) {
        const std::string block = std::to_string(b), label = "AdamWFloat / AdamW8bit block " + block;
        print_row(label.c_str(), ratio(rep.seconds("BM_AdamWFloat"), rep.seconds("BM_AdamW8bit_" + block)), goal::at_least, 1.4, "%.3f", "speed-up");
    }
    print_row("AdamWFloatCached / AdamW8bitCached (64K in L2, 1 thread)", ratio(rep.seconds("BM_AdamWFloatCached"), rep.seconds("BM_AdamW8bitCached")),
              goal::info, 0, "%.3f", "speed-up, block 256: the arithmetic alone");
    for (const index_t b : kSubspaceBlocks) {
        const std::string block = std::to_string(b), label = "SubspaceAdam8bit block " + block + " / float";
        print_row(label.c_str(), ratio(rep.seconds("BM_SubspaceAdam8bit_" + block), rep.seconds("BM_SubspaceAdamFloat")), goal::info, 0, "%.3f", "time ratio");
    }
    print_row("DenseStepFloat / DenseStep8bit (optimizer)", ratio(rep.seconds("BM_DenseStepFloat"), rep.seconds("BM_DenseStep8bit")), goal::at_least, 1.4,
              "%.3f", "speed-up, block 256");
    print_row("LowRankStep8bit / LowRankStepFloat (optimizer)", ratio(rep.seconds("BM_LowRankStep8bit"), rep.seconds("BM_LowRankStepFloat")), goal::at_most,
              1.05, "%.3f", "time ratio, block 256");
    print_row("DenseStep state bytes 8-bit / float", ratio(rep.counter("BM_DenseStep8bit", "state_bytes"), rep.counter("BM_DenseStepFloat", "state_bytes")),
              goal::info, 0, "%.4f", "");
    print_row("LowRankStep state bytes 8-bit / float",
              ratio(rep.counter("BM_LowRankStep8bit", "state_bytes"), rep.counter("BM_LowRankStepFloat", "state_bytes")), goal::info, 0, "%.4f",
              "basis stays float");
}

} // namespace

int main(int argc, char** argv) {
    register_blocks();
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::AddCustomContext("omp_threads", std::to_string(threads()));
    benchmark::AddCustomContext("adam8_body", std::string(velora::cpu::simd_body_name(velora::cpu::widest_body)));
    const bool color = ::isatty(STDOUT_FILENO) != 0;
    bench::ratio_reporter reporter(color ? benchmark::ConsoleReporter::OO_Color : benchmark::ConsoleReporter::OO_None);
    benchmark::RunSpecifiedBenchmarks(&reporter);
    std::cout.flush();
    print_ratios(reporter);
    benchmark::Shutdown();
    return 0;
}
