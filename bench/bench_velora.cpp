// VeLoRA on the Eigen CPU backend: steady-state costs of compression, the factored weight
// gradient and a whole linear layer's forward + backward, against their uncompressed
// baselines, at T = 4096 tokens, D = O = 1024, G = 32, float.
//
// Every buffer, the backend, the compressor and its record are built once, outside any timed
// loop; the timed loops allocate nothing. After the benchmarks a "Ratios (same run)" table
// compares the measured real times (computed from this run only; nothing is hard-coded).
//
// Usage: bench_velora [Google Benchmark flags], e.g. --benchmark_filter=WeightGrad
//        --benchmark_repetitions=5 (ratios then use the median of the repetitions).
#include <benchmark/benchmark.h>

#include "common.hpp"

#include <Eigen/Core>

#include <velora/velora.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using bench::fill_gaussian;
using bench::guarded;
using T = float;
using backend_t = velora::eigen_backend<T>;
using compressor_t = velora::compressor<backend_t>;
using record_t = compressor_t::record_type;
using velora::index_t;

constexpr index_t kTokens = 4096;     // T
constexpr index_t kFeatures = 1024;   // D
constexpr index_t kOutputs = 1024;    // O
constexpr index_t kGroups = 32;       // G
constexpr index_t kSubtoken = (kFeatures + kGroups - 1) / kGroups;   // s

constexpr double kDenseGemmFlops = 2.0 * kTokens * kOutputs * kFeatures;     // one T·O·D GEMM
constexpr double kFactoredGemmFlops = 2.0 * kTokens * kOutputs * kGroups;    // A = dYᵀZ
constexpr double kCompressFlops = 2.0 * kTokens * kFeatures;                 // Z = X Kᵀ

// Everything the benchmarks share, built on first use (outside every timed loop).
struct fixture {
    backend_t backend;   // one backend object, reused by every benchmark
    velora::host_buffer<T> x{static_cast<std::size_t>(kTokens * kFeatures)};    // T×D input
    velora::host_buffer<T> dy{static_cast<std::size_t>(kTokens * kOutputs)};    // T×O output gradient
    velora::host_buffer<T> w{static_cast<std::size_t>(kOutputs * kFeatures)};   // O×D weight
    velora::host_buffer<T> y{static_cast<std::size_t>(kTokens * kOutputs)};     // T×O forward output
    velora::host_buffer<T> dx{static_cast<std::size_t>(kTokens * kFeatures)};   // T×D input gradient
    velora::host_buffer<T> dw{static_cast<std::size_t>(kOutputs * kFeatures)};  // O×D dense weight gradient
    velora::host_buffer<T> a{static_cast<std::size_t>(kOutputs * kGroups)};     // O×G factored gradient
    compressor_t comp;
    record_t record;

    fixture() : comp(backend, kFeatures, velora::compressor_config{kGroups, velora::v_mode::first_batch_mean()}) {
        fill_gaussian(x.data(), kTokens * kFeatures, 0x5eed0001, 1.0);
        // Nonzero, feature-dependent mean so that v (the normalised sub-token mean) is a
        // meaningful, non-uniform direction.
        for (index_t t = 0; t < kTokens; ++t)
            for (index_t j = 0; j < kFeatures; ++j)
                x[static_cast<std::size_t>(t * kFeatures + j)] += static_cast<T>(0.5 + velora::uniform_at(0x5eed0004, static_cast<std::uint64_t>(j % kSubtoken)));
        fill_gaussian(dy.data(), kTokens * kOutputs, 0x5eed0002, 1.0);
        fill_gaussian(w.data(), kOutputs * kFeatures, 0x5eed0003, 1.0 / std::sqrt(static_cast<double>(kFeatures)));
        // Warm-up: the first compress sets v (first_batch_mean); every later one only projects.
        if (comp.compress(cx(), record) != velora::status::ok) throw std::runtime_error("warm-up compress did not return status::ok");
        // Warm every GEMM shape once so the backend's packing buffers are sized.
        velora::linear_forward(backend, cx(), cw(), nullptr, vy());
        velora::linear_input_grad(backend, cdy(), cw(), vdx());
        velora::dense_weight_grad(backend, cdy(), cx(), vdw());
        comp.gradient_factor(record, cdy(), va());
        comp.expand_weight_grad(record, ca(), vdw());
    }

    velora::const_matrix_view<T> cx() const { return {x.data(), kTokens, kFeatures}; }
    velora::const_matrix_view<T> cdy() const { return {dy.data(), kTokens, kOutputs}; }
    velora::const_matrix_view<T> cw() const { return {w.data(), kOutputs, kFeatures}; }
    velora::const_matrix_view<T> ca() const { return {a.data(), kOutputs, kGroups}; }
    velora::matrix_view<T> vy() { return {y.data(), kTokens, kOutputs}; }
    velora::matrix_view<T> vdx() { return {dx.data(), kTokens, kFeatures}; }
    velora::matrix_view<T> vdw() { return {dw.data(), kOutputs, kFeatures}; }
    velora::matrix_view<T> va() { return {a.data(), kOutputs, kGroups}; }
};

fixture& shared() {
    static fixture f;
    return f;
}

void set_flops(benchmark::State& state, double flops_per_iteration) {
    state.counters["FLOP/s"] = benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

// ---------------------------------------------------------------- benchmarks

// One plain parallel pass over X: the memory-bandwidth floor for compress (which must read X once).
void BM_ReadBaseline(benchmark::State& state) {
    guarded(state, [&] {
        fixture& f = shared();
        const T* x = f.x.data();
        const index_t n = kTokens * kFeatures;
        constexpr index_t lanes = 64;   // 4 AVX-512 accumulators: bandwidth-bound, not add-latency-bound
        static_assert((kTokens * kFeatures) % lanes == 0);
        for (auto _ : state) {
            double total = 0;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(f.backend.threads())
#endif
            for (index_t block = 0; block < n / 4096; ++block) {
                T acc[lanes] = {};
                const T* p = x + block * 4096;
                for (index_t i = 0; i < 4096; i += lanes)
                    for (index_t j = 0; j < lanes; ++j) acc[j] += p[i + j];
                T s = 0;
                for (index_t j = 0; j < lanes; ++j) s += acc[j];
                total += s;
            }
            benchmark::DoNotOptimize(total);
        }
        state.SetBytesProcessed(state.iterations() * kTokens * kFeatures * static_cast<std::int64_t>(sizeof(T)));
    });
}
BENCHMARK(BM_ReadBaseline)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_VeloraCompress(benchmark::State& state) {
    guarded(state, [&] {
        fixture& f = shared();
        const auto x = f.cx();
        bool all_ok = true;
        for (auto _ : state) {
            all_ok &= f.comp.compress(x, f.record) == velora::status::ok;
            benchmark::ClobberMemory();
        }
        if (!all_ok) {
            state.SkipWithError("compress did not return status::ok");
            return;
        }
        const std::size_t expected = static_cast<std::size_t>(kTokens * kGroups) * sizeof(float) + static_cast<std::size_t>(kSubtoken) * sizeof(float);
        if (f.record.bytes() != expected) {
            const std::string msg = "record.bytes() = " + std::to_string(f.record.bytes()) + " but T*G*4 + s*4 = " + std::to_string(expected);
            state.SkipWithError(msg.c_str());
            return;
        }
        const auto x_bytes = static_cast<std::int64_t>(kTokens * kFeatures * sizeof(T));
        const auto z_bytes = static_cast<std::int64_t>(kTokens * kGroups * sizeof(T));
        state.SetBytesProcessed(state.iterations() * (x_bytes + z_bytes));   // read X, write Z
        state.counters["stored_bytes"] = static_cast<double>(f.record.bytes());
        state.counters["x_over_stored"] = static_cast<double>(x_bytes) / static_cast<double>(f.record.bytes());
        set_flops(state, kCompressFlops);
    });
}
BENCHMARK(BM_VeloraCompress)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_WeightGradDense(benchmark::State& state) {
    guarded(state, [&] {
        fixture& f = shared();
        for (auto _ : state) {
            velora::dense_weight_grad(f.backend, f.cdy(), f.cx(), f.vdw());
            benchmark::ClobberMemory();
        }
        set_flops(state, kDenseGemmFlops);
    });
}
BENCHMARK(BM_WeightGradDense)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_WeightGradVelora(benchmark::State& state) {
    guarded(state, [&] {
        fixture& f = shared();
        for (auto _ : state) {
            f.comp.gradient_factor(f.record, f.cdy(), f.va());
            benchmark::ClobberMemory();
        }
        set_flops(state, kFactoredGemmFlops);
    });
}
BENCHMARK(BM_WeightGradVelora)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_WeightGradVeloraExpanded(benchmark::State& state) {
    guarded(state, [&] {
        fixture& f = shared();
        for (auto _ : state) {
            f.comp.gradient_factor(f.record, f.cdy(), f.va());
            f.comp.expand_weight_grad(f.record, f.ca(), f.vdw());
            benchmark::ClobberMemory();
        }
        set_flops(state, kFactoredGemmFlops + static_cast<double>(kOutputs * kFeatures));
    });
}
BENCHMARK(BM_WeightGradVeloraExpanded)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_LinearFwdBwdDense(benchmark::State& state) {
    guarded(state, [&] {
        fixture& f = shared();
        for (auto _ : state) {
            velora::linear_forward(f.backend, f.cx(), f.cw(), nullptr, f.vy());
            velora::linear_input_grad(f.backend, f.cdy(), f.cw(), f.vdx());
            velora::dense_weight_grad(f.backend, f.cdy(), f.cx(), f.vdw());
            benchmark::ClobberMemory();
        }
        set_flops(state, 3 * kDenseGemmFlops);
        state.SetItemsProcessed(state.iterations() * kTokens);   // tokens
    });
}
BENCHMARK(BM_LinearFwdBwdDense)->UseRealTime()->Unit(benchmark::kMicrosecond);

void BM_LinearFwdBwdVelora(benchmark::State& state) {
    guarded(state, [&] {
        fixture& f = shared();
        bool all_ok = true;
        for (auto _ : state) {
            velora::linear_forward(f.backend, f.cx(), f.cw(), nullptr, f.vy());
            all_ok &= f.comp.compress(f.cx(), f.record) == velora::status::ok;
            velora::linear_input_grad(f.backend, f.cdy(), f.cw(), f.vdx());
            f.comp.gradient_factor(f.record, f.cdy(), f.va());
            benchmark::ClobberMemory();
        }
        if (!all_ok) {
            state.SkipWithError("compress did not return status::ok");
            return;
        }
        set_flops(state, 2 * kDenseGemmFlops + kCompressFlops + kFactoredGemmFlops);
        state.SetItemsProcessed(state.iterations() * kTokens);   // tokens
    });
}
BENCHMARK(BM_LinearFwdBwdVelora)->UseRealTime()->Unit(benchmark::kMicrosecond);

// ---------------------------------------------------------------- reporting

// The console output as usual, plus each benchmark's real time (seconds per iteration):
// the "mean" aggregate when repetitions produced one, otherwise the average of its runs.
void print_ratios(const bench::ratio_reporter& rep) {
    using bench::goal;
    using bench::ratio;
    bench::print_header("Ratios (same run; real time per iteration, the median when repetitions were given)",
                        std::string("GEMM engine: ") + (velora::cpu::has_blas ? std::string("BLAS ") + velora::cpu::blas_name() : "Eigen's product (no BLAS)"));
    bench::print_row("VeloraCompress / ReadBaseline", ratio(rep.seconds("BM_VeloraCompress"), rep.seconds("BM_ReadBaseline")), goal::at_most, 1.5,
                     "%.3f", "");
    bench::print_row("WeightGradDense / WeightGradVelora", ratio(rep.seconds("BM_WeightGradDense"), rep.seconds("BM_WeightGradVelora")),
                     goal::at_least, 25.0, "%.3f", "both through the same GEMM engine");
    const auto factored = rep.seconds("BM_WeightGradVelora");
    bench::print_row("WeightGradVelora rate (GFLOP/s)", factored ? std::optional<double>(kFactoredGemmFlops / *factored * 1e-9) : std::nullopt,
                     goal::at_least, 120.0, "%.1f", "A = dY^T Z, 2*T*O*G flops");
    bench::print_row("LinearFwdBwdVelora / LinearFwdBwdDense", ratio(rep.seconds("BM_LinearFwdBwdVelora"), rep.seconds("BM_LinearFwdBwdDense")),
                     goal::at_most, 0.68, "%.3f", "");
    bench::print_row("WeightGradDense / WeightGradVeloraExpanded",
                     ratio(rep.seconds("BM_WeightGradDense"), rep.seconds("BM_WeightGradVeloraExpanded")), goal::info, 0, "%.3f",
                     "speed-up when a dense dW is still formed");
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#if !defined(NDEBUG)
    std::fprintf(stderr, "note: bench_velora was compiled without NDEBUG (assertions on); timings may be pessimistic\n");
#endif
    benchmark::AddCustomContext("gemm_blas", velora::cpu::blas_name());
    benchmark::AddCustomContext("shape", "T=" + std::to_string(kTokens) + " D=" + std::to_string(kFeatures) + " O=" +
                                             std::to_string(kOutputs) + " G=" + std::to_string(kGroups) + " float");
    bench::add_thread_context();
    return bench::run_and_print_ratios(print_ratios);
}
