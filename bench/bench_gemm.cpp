// The CPU backend's GEMM on the library's hot shapes, once per engine this build has (the BLAS
// linked at configure time, Eigen's product), through the same driver the backend uses (the
// library's thread split, one engine call per part), and the BLAS called directly on the whole
// product with its own threads. The table after the benchmarks gives each shape's rate per
// engine and their ratios from this run, and which engine the backend picks.
//
// Shapes (row-major, C = op(A)·op(B), m×n×k):
//   VeLoRA layer (T = 4096 tokens, D = O = 1024): forward Y = X·Wᵀ, dX = dY·W, dense dW = dYᵀ·X,
//   factored A = dYᵀ·Z (G = 32);
//   low-rank step (1024×4096 weight, r = 128): projection B·G, back-projection W += Bᵀ·N;
//   randomized SVD (k = r + p = 138): sketch S·G and S·Gᵀ, the Gram matrix in double.
//
// Usage: bench_gemm [Google Benchmark flags], e.g. --benchmark_repetitions=5
//        --benchmark_report_aggregates_only=true.
#include <benchmark/benchmark.h>

#include "common.hpp"

#include <velora/velora.hpp>

#include <cstdio>
#include <string>
#include <vector>

namespace {

using velora::index_t;
using velora::op;
using velora::cpu::gemm_engine;

struct shape {
    const char* name;
    op op_a, op_b;
    index_t m, n, k;
    double beta;
    bool is_double;
};

const shape kShapes[] = {
    {"Forward_XWt", op::none, op::transpose, 4096, 1024, 1024, 0.0, false},
    {"InputGrad_dYW", op::none, op::none, 4096, 1024, 1024, 0.0, false},
    {"DenseWeightGrad_dYtX", op::transpose, op::none, 1024, 1024, 4096, 0.0, false},
    {"FactoredWeightGrad_dYtZ", op::transpose, op::none, 1024, 32, 4096, 0.0, false},
    {"Projection_BG", op::none, op::none, 128, 4096, 1024, 0.0, false},
    {"BackProjection_BtN", op::transpose, op::none, 1024, 4096, 128, 1.0, false},
    {"Sketch_SG", op::none, op::none, 138, 4096, 1024, 0.0, false},
    {"Sketch_SGt", op::none, op::transpose, 138, 1024, 4096, 0.0, false},
    {"Gram_double", op::none, op::transpose, 138, 138, 4096, 0.0, true},
};

double flops(const shape& s) { return 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k); }

std::vector<gemm_engine> engines() {
    std::vector<gemm_engine> e;
    if (velora::cpu::has_blas) e.push_back(gemm_engine::blas);
    e.push_back(gemm_engine::eigen);
    return e;
}

std::string bench_name(const shape& s, gemm_engine e) { return std::string("BM_Gemm_") + s.name + "_" + velora::cpu::engine_name(e); }
std::string direct_name(const shape& s) { return std::string("BM_Gemm_") + s.name + "_blas_direct"; }

// `direct`: the BLAS called once on the whole product from this thread, threading itself (an
// OpenMP BLAS then uses omp_get_max_threads() threads): the BLAS as a user would call it, the
// baseline for the library's own split.
template <class S>
void run_gemm(benchmark::State& state, const shape& s, gemm_engine engine, bool direct = false) {
    bench::guarded(state, [&] {
        const index_t a_rows = s.op_a == op::none ? s.m : s.k, a_cols = s.op_a == op::none ? s.k : s.m;
        const index_t b_rows = s.op_b == op::none ? s.k : s.n, b_cols = s.op_b == op::none ? s.n : s.k;
        velora::host_buffer<S> a(static_cast<std::size_t>(a_rows * a_cols)), b(static_cast<std::size_t>(b_rows * b_cols)),
            c(static_cast<std::size_t>(s.m * s.n));
        bench::fill_gaussian(a.data(), a_rows * a_cols, 1, 1.0);
        bench::fill_gaussian(b.data(), b_rows * b_cols, 2, 1.0);
        bench::fill_gaussian(c.data(), s.m * s.n, 3, 1.0);
        velora::eigen_backend<S> backend;
        backend.set_gemm_engine(engine);
        const velora::const_matrix_view<S> av(a.data(), a_rows, a_cols), bv(b.data(), b_rows, b_cols);
        const velora::matrix_view<S> cv(c.data(), s.m, s.n);
        for (auto _ : state) {
            if (direct)
                velora::cpu::gemm_driver::serial_gemm<S>(gemm_engine::blas, s.op_a, s.op_b, s.m, s.n, s.k, S(1), av.data, av.ld, bv.data, bv.ld,
                                                         S(s.beta), cv.data, cv.ld);
            else backend.gemm(s.op_a, s.op_b, S(1), av, bv, S(s.beta), cv);
            benchmark::ClobberMemory();
        }
        state.counters["GFLOPs"] = benchmark::Counter(flops(s) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    });
}

void register_all() {
    for (const shape& s : kShapes)
        for (gemm_engine e : engines()) {
            auto* b = benchmark::RegisterBenchmark(bench_name(s, e).c_str(), [s, e](benchmark::State& state) {
                if (s.is_double) run_gemm<double>(state, s, e);
                else run_gemm<float>(state, s, e);
            });
            b->UseRealTime()->Unit(benchmark::kMillisecond);
        }
    if (!velora::cpu::has_blas) return;
    for (const shape& s : kShapes)
        benchmark::RegisterBenchmark(direct_name(s).c_str(), [s](benchmark::State& state) {
            if (s.is_double) run_gemm<double>(state, s, gemm_engine::blas, true);
            else run_gemm<float>(state, s, gemm_engine::blas, true);
        })->UseRealTime()->Unit(benchmark::kMillisecond);
}

void print_table(const bench::ratio_reporter& rep) {
    std::printf("\nGEMM rates (same run; GFLOP/s from the median real time when repetitions were given)\n");
    std::printf("BLAS in this build: %s; the backend's automatic choice is shown per shape\n", velora::cpu::blas_name());
    std::printf("blas: the library's split, one single-threaded BLAS call per part; direct: one BLAS call threading itself\n");
    std::printf("%-26s %10s %10s %10s %11s %11s  %s\n", "shape", "blas", "direct", "eigen", "blas/direct", "blas/eigen", "automatic");
    const velora::cpu::gemm_driver driver;
    for (const shape& s : kShapes) {
        auto rate = [&](const std::string& name) -> double {   // 0 when the benchmark did not run
            const auto t = rep.seconds(name);
            return t ? flops(s) / *t * 1e-9 : 0.0;
        };
        const double blas = rate(bench_name(s, gemm_engine::blas)), eigen = rate(bench_name(s, gemm_engine::eigen)), direct = rate(direct_name(s));
        std::printf("%-26s %10.1f %10.1f %10.1f %11.2f %11.2f  %s  (%lldx%lldx%lld%s)\n", s.name, blas, direct, eigen,
                    direct > 0 ? blas / direct : 0.0, eigen > 0 ? blas / eigen : 0.0,
                    velora::cpu::engine_name(driver.engine_for(s.m, s.n, s.k)), static_cast<long long>(s.m),
                    static_cast<long long>(s.n), static_cast<long long>(s.k), s.is_double ? ", double" : "");
    }
}

} // namespace

int main(int argc, char** argv) {
    register_all();
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    benchmark::AddCustomContext("gemm_blas", velora::cpu::blas_name());
    bench::add_thread_context();
    return bench::run_and_print_ratios(print_table);
}
