// AdaRankGrad on the Eigen CPU backend: the steady-state cost of a low-rank AdamW step, of a
// step that refreshes its subspace, of the randomized subspace search against the exact SVD a
// GaLore-style refresh pays, and of a VeLoRA layer's optimizer step fed the factored gradient
// against the same step fed the dense dW = dYᵀX. Float throughout.
//
//   optimizer benchmarks: one 1024×4096 weight (m = 1024 rows, n = 4096 columns), rank 128;
//                         the gradient is the test matrix below, fixed across steps
//   SVD benchmarks:       the same 1024×4096 matrix G = U·diag(σ)·Vᵀ + noise, σ_i = 1/(1+i),
//                         U, V orthonormal (QR of Gaussian matrices), noise N(0, 1e-5²)
//   VeLoRA benchmarks:    T = 4096 tokens, D = O = 1024, G = 32 groups (compressor defaults),
//                         the weight is O×D
//
// Every optimizer uses the same AdamW hyper-parameters (adarank::adamw_hyper's defaults, GaLore's:
// lr 1e-3, β 0.9/0.999, ε 1e-6, weight decay 0) and α = 0.25; they are printed in the context
// and above the ratio table. Buffers, optimizers and their first (subspace-finding) step are
// made once, outside every timed loop. After the benchmarks a "Ratios (same run)" table
// compares the measured real times and counters of this run (nothing is hard-coded).
//
// Usage: bench_adarank [Google Benchmark flags], e.g. --benchmark_filter=SVD
//        --benchmark_repetitions=3 (the table then uses the median of the repetitions).
#include <benchmark/benchmark.h>

#include "common.hpp"

#include <Eigen/Core>
#include <Eigen/SVD>

#include <adarank/adarank.hpp>
#include <velora/layers.hpp>
#include <velora/velora.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using bench::fill_gaussian;
using bench::guarded;
using T = float;
using backend_t = velora::eigen_backend<T>;
using optimizer_t = adarank::low_rank_adamw<backend_t>;
using compressor_t = velora::compressor<backend_t>;
using record_t = compressor_t::record_type;
using velora::index_t;

constexpr index_t kRows = 1024;   // m
constexpr index_t kCols = 4096;   // n
constexpr index_t kRank = 128;    // r
constexpr double kNoise = 1e-5;   // standard deviation of the noise added to U·diag(σ)·Vᵀ
constexpr std::int64_t kNeverRefresh = std::int64_t{1} << 30;

constexpr index_t kTokens = 4096;     // T
constexpr index_t kFeatures = 1024;   // D
constexpr index_t kOutputs = 1024;    // O
constexpr index_t kGroups = 32;       // G
constexpr index_t kSubtoken = (kFeatures + kGroups - 1) / kGroups;

// Expected optimizer state: the low-rank parameter (side std of 1024×4096 is left: len = m,
// other = n) and plain AdamW's two moments.
constexpr double kLowRankStateBytes = static_cast<double>(kRank * (kRows + 2 * kCols) * sizeof(T));
constexpr double kDenseStateBytes = static_cast<double>(2 * kRows * kCols * sizeof(T));

// The AdamW hyper-parameters of every benchmark.
adarank::adamw_hyper adam_hyper() {
    adarank::adamw_hyper h;
    h.lr = 1e-3;
    h.beta1 = 0.9;
    h.beta2 = 0.999;
    h.eps = 1e-6;
    h.weight_decay = 0.0;
    return h;
}

std::string describe_hyper() {
    const adarank::adamw_hyper h = adam_hyper();
    const adarank::optimizer_config c;
    char text[160];
    std::snprintf(text, sizeof text, "lr=%g beta1=%g beta2=%g eps=%g weight_decay=%g alpha=%g", h.lr, h.beta1, h.beta2, h.eps,
                  h.weight_decay, c.scale);
    return text;
}

adarank::optimizer_config make_config(adarank::rank_policy rank, adarank::refresh_policy refresh) {
    adarank::optimizer_config c;
    c.adam = adam_hyper();
    c.rank = rank;
    c.refresh = refresh;
    return c;
}

backend_t& backend() {
    static backend_t b;   // one backend object (GEMM/QR/SVD scratch), reused by every benchmark
    return b;
}

velora::host_buffer<T> gaussian_buffer(index_t n, std::uint64_t seed, double scale) {
    velora::host_buffer<T> b(static_cast<std::size_t>(n));
    fill_gaussian(b.data(), n, seed, scale);
    return b;
}

// ---------------------------------------------------------------- the test matrix

struct matrix_fixture {
    velora::host_buffer<T> g{static_cast<std::size_t>(kRows * kCols)};   // m×n, row-major
    std::vector<double> designed_sigma;                                   // σ_i = 1/(1+i), i < m
    std::optional<std::vector<double>> exact_sigma;                       // from BDCSVD, filled once

    matrix_fixture() {
        backend_t& b = backend();
        designed_sigma.resize(static_cast<std::size_t>(kRows));
        for (index_t i = 0; i < kRows; ++i) designed_sigma[static_cast<std::size_t>(i)] = 1.0 / (1.0 + static_cast<double>(i));
        // Uᵀ (m×m) and Vᵀ (m×n) with orthonormal rows: Householder QR of Gaussian blocks.
        auto ut = gaussian_buffer(kRows * kRows, 0xada00001, 1.0);
        auto vt = gaussian_buffer(kRows * kCols, 0xada00002, 1.0);
        b.orthonormalize_rows(velora::matrix_view<T>(ut.data(), kRows, kRows));
        b.orthonormalize_rows(velora::matrix_view<T>(vt.data(), kRows, kCols));
        for (index_t i = 0; i < kRows; ++i) {
            const T s = static_cast<T>(designed_sigma[static_cast<std::size_t>(i)]);
            for (index_t j = 0; j < kCols; ++j) vt[static_cast<std::size_t>(i * kCols + j)] *= s;
        }
        // G = U·(diag(σ)·Vᵀ) + noise.
        b.gemm(velora::op::transpose, velora::op::none, T(1), velora::const_matrix_view<T>(ut.data(), kRows, kRows),
               velora::const_matrix_view<T>(vt.data(), kRows, kCols), T(0), velora::matrix_view<T>(g.data(), kRows, kCols));
        for (index_t i = 0; i < kRows * kCols; ++i)
            g[static_cast<std::size_t>(i)] += static_cast<T>(kNoise * velora::gaussian_at(0xada00003, static_cast<std::uint64_t>(i)));
    }

    [[nodiscard]] velora::const_matrix_view<T> cg() const { return {g.data(), kRows, kCols}; }

    using ColMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    [[nodiscard]] ColMat column_major() const { return Eigen::Map<const RowMat>(g.data(), kRows, kCols); }

    // The exact singular values (from BM_ExactSVD when it ran; otherwise computed here, untimed).
    const std::vector<double>& sigma() {
        if (!exact_sigma) {
            const ColMat gc = column_major();
            Eigen::BDCSVD<ColMat> svd(gc);
            store_sigma(svd.singularValues());
        }
        return *exact_sigma;
    }
    template <class V>
    void store_sigma(const V& values) {
        std::vector<double> s(static_cast<std::size_t>(values.size()));
        for (Eigen::Index i = 0; i < values.size(); ++i) s[static_cast<std::size_t>(i)] = static_cast<double>(values(i));
        exact_sigma = std::move(s);
    }

    // sqrt(Σ_{i>r} σ_i²): the smallest ‖G − P·G‖_F over rank-r projections P.
    static double tail(const std::vector<double>& s, index_t r) {
        double sum = 0;
        for (std::size_t i = static_cast<std::size_t>(r); i < s.size(); ++i) sum += s[i] * s[i];
        return std::sqrt(sum);
    }
};

matrix_fixture& matrix() {
    static matrix_fixture f;
    return f;
}

// A low-rank (or dense) optimizer with one kRows×kCols parameter, its own copy of the weight,
// and its first step (which finds the subspace) already taken.
struct optimizer_fixture {
    optimizer_t opt;
    velora::host_buffer<T> w;
    optimizer_t::param_id id;

    optimizer_fixture(const adarank::optimizer_config& config, adarank::param_kind kind)
        : opt(backend(), config), w(gaussian_buffer(kRows * kCols, 0xada00010, 1.0 / std::sqrt(static_cast<double>(kCols)))),
          id(opt.add_parameter(kRows, kCols, kind)) {
        if (step() != velora::status::ok) throw std::runtime_error("warm-up step did not return status::ok");
    }
    velora::status step() { return opt.step(id, velora::matrix_view<T>(w.data(), kRows, kCols), matrix().cg()); }
};

// ---------------------------------------------------------------- optimizer steps

// The timed loop of every step benchmark; false when some step did not return status::ok.
template <class Step>
bool timed_steps(benchmark::State& state, Step&& step) {
    bool all_ok = true;
    for (auto _ : state) {
        all_ok &= step() == velora::status::ok;
        benchmark::ClobberMemory();
    }
    return all_ok;
}

void BM_AdamWDense(benchmark::State& state) {
    guarded(state, [&] {
        static optimizer_fixture f(make_config(adarank::rank_policy::fixed(kRank), adarank::refresh_policy::every(kNeverRefresh)),
                                   adarank::param_kind::dense);
        if (!timed_steps(state, [&] { return f.step(); })) return state.SkipWithError("step did not return status::ok");
        const adarank::layer_info info = f.opt.layer_state(f.id);
        state.counters["state_bytes"] = static_cast<double>(info.state_bytes);
        // Read W, G, m, v; write W, m, v (plus one read of G for the finiteness check).
        state.SetBytesProcessed(state.iterations() * 8 * kRows * kCols * static_cast<std::int64_t>(sizeof(T)));
    });
}
BENCHMARK(BM_AdamWDense)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_LowRankAdamStep(benchmark::State& state) {
    guarded(state, [&] {
        static optimizer_fixture f(make_config(adarank::rank_policy::fixed(kRank), adarank::refresh_policy::every(kNeverRefresh)),
                                   adarank::param_kind::low_rank);
        if (!timed_steps(state, [&] { return f.step(); })) return state.SkipWithError("step did not return status::ok");
        const adarank::layer_info info = f.opt.layer_state(f.id);
        if (info.refreshes != 1) return state.SkipWithError("a refresh happened inside the timed loop");
        state.counters["rank"] = static_cast<double>(info.rank);
        state.counters["left_side"] = info.side == adarank::projection_side::left ? 1 : 0;
        state.counters["state_bytes"] = static_cast<double>(info.state_bytes);
    });
}
BENCHMARK(BM_LowRankAdamStep)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_LowRankAdamRefresh(benchmark::State& state) {
    guarded(state, [&] {
        static optimizer_fixture f(make_config(adarank::rank_policy::fixed(kRank), adarank::refresh_policy::every(1)),
                                   adarank::param_kind::low_rank);
        const std::uint64_t refreshes_before = f.opt.layer_state(f.id).refreshes;
        if (!timed_steps(state, [&] { return f.step(); })) return state.SkipWithError("step did not return status::ok");
        const adarank::layer_info info = f.opt.layer_state(f.id);
        if (info.refreshes - refreshes_before != static_cast<std::uint64_t>(state.iterations()))
            return state.SkipWithError("not every timed step refreshed the subspace");
        state.counters["rank"] = static_cast<double>(info.rank);
        state.counters["warm"] = info.last_refresh.warm ? 1 : 0;
        state.counters["q"] = info.last_refresh.power_iterations;
        state.counters["sketch"] = static_cast<double>(info.last_refresh.sketch);
    });
}
BENCHMARK(BM_LowRankAdamRefresh)->UseRealTime()->Unit(benchmark::kMillisecond);

// The floor of a low-rank step without refresh: its two GEMMs (projection R = B·G, r×m·m×n, and
// back-projection W += α·Bᵀ·N, m×r·r×n, 4·r·m·n flops in all) and Adam on the r×n moments, each
// timed alone through the same backend. BM_LowRankAdamStep / their sum is the step's overhead.
struct floor_fixture {
    velora::host_buffer<T> basis = gaussian_buffer(kRank * kRows, 0xada00030, 1.0 / std::sqrt(static_cast<double>(kRows)));
    velora::host_buffer<T> r = gaussian_buffer(kRank * kCols, 0xada00031, 1.0);
    velora::host_buffer<T> m = gaussian_buffer(kRank * kCols, 0xada00032, 0.1);
    velora::host_buffer<T> v = gaussian_buffer(kRank * kCols, 0xada00033, 0.0);
    velora::host_buffer<T> w = gaussian_buffer(kRows * kCols, 0xada00034, 1.0);
    [[nodiscard]] velora::const_matrix_view<T> cb() const { return {basis.data(), kRank, kRows}; }
    [[nodiscard]] velora::matrix_view<T> vr() { return {r.data(), kRank, kCols}; }
};
floor_fixture& floor_data() {
    static floor_fixture f;
    return f;
}

void BM_StepProjectionGemm(benchmark::State& state) {
    guarded(state, [&] {
        floor_fixture& f = floor_data();
        for (auto _ : state) {
            backend().gemm(velora::op::none, velora::op::none, T(1), f.cb(), matrix().cg(), T(0), f.vr());
            benchmark::ClobberMemory();
        }
        state.counters["GFLOPs"] = benchmark::Counter(2.0 * kRank * kRows * kCols * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    });
}
BENCHMARK(BM_StepProjectionGemm)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_StepBackProjectionGemm(benchmark::State& state) {
    guarded(state, [&] {
        floor_fixture& f = floor_data();
        for (auto _ : state) {
            backend().gemm(velora::op::transpose, velora::op::none, T(-1e-3), f.cb(), velora::const_matrix_view<T>(f.vr()), T(1),
                           velora::matrix_view<T>(f.w.data(), kRows, kCols));
            benchmark::ClobberMemory();
        }
        state.counters["GFLOPs"] = benchmark::Counter(2.0 * kRank * kRows * kCols * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    });
}
BENCHMARK(BM_StepBackProjectionGemm)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_StepLowRankAdam(benchmark::State& state) {
    guarded(state, [&] {
        floor_fixture& f = floor_data();
        const adarank::adamw_hyper h = adam_hyper();
        backend().clamp_nonnegative(velora::matrix_view<T>(f.v.data(), kRank, kCols));
        for (auto _ : state) {
            backend().adam_moments(velora::const_matrix_view<T>(f.vr()), velora::matrix_view<T>(f.m.data(), kRank, kCols),
                                   velora::matrix_view<T>(f.v.data(), kRank, kCols), T(h.beta1), T(h.beta2), T(h.eps),
                                   f.vr());   // n overwrites R, as in the step
            benchmark::ClobberMemory();
        }
    });
}
BENCHMARK(BM_StepLowRankAdam)->UseRealTime()->Unit(benchmark::kMillisecond);

// ---------------------------------------------------------------- subspace search

// What GaLore's refresh pays: torch.linalg.svd(G, full_matrices=False), i.e. U, S and Vᵀ.
// `options` = ComputeThinU only is the strictest exact baseline (the basis alone), reported too.
void exact_svd(benchmark::State& state, int options) {
    guarded(state, [&] {
        matrix_fixture& f = matrix();
        const matrix_fixture::ColMat gc = f.column_major();
        Eigen::BDCSVD<matrix_fixture::ColMat> svd(kRows, kCols, options);
        for (auto _ : state) {
            svd.compute(gc, options);
            benchmark::DoNotOptimize(svd.singularValues().data());
            benchmark::ClobberMemory();
        }
        if (svd.info() != Eigen::Success) return state.SkipWithError("BDCSVD did not converge");
        f.store_sigma(svd.singularValues());
        state.counters["optimal_residual"] = matrix_fixture::tail(*f.exact_sigma, kRank);
        state.counters["designed_residual"] = matrix_fixture::tail(f.designed_sigma, kRank);   // without the noise
    });
}
void BM_ExactSVD(benchmark::State& state) { exact_svd(state, Eigen::ComputeThinU | Eigen::ComputeThinV); }
void BM_ExactSVDLeftOnly(benchmark::State& state) { exact_svd(state, Eigen::ComputeThinU); }
BENCHMARK(BM_ExactSVDLeftOnly)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ExactSVD)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);

// A cold randomized search with `power_iterations` (the default rsvd_config has q = 2).
void randomized_svd(benchmark::State& state, int power_iterations) {
    guarded(state, [&] {
        matrix_fixture& f = matrix();
        backend_t& b = backend();
        adarank::rsvd_config config;   // p = 10
        config.power_iterations = power_iterations;
        adarank::subspace_finder<backend_t> finder(b, config);
        const auto policy = adarank::rank_policy::fixed(kRank);
        finder.reserve(kRows, kCols, kRank);
        velora::host_buffer<T> basis(static_cast<std::size_t>(kRank * kRows));
        const velora::matrix_view<T> bv(basis.data(), kRank, kRows);
        const adarank::dense_gradient<backend_t> grad(b, f.cg());
        const adarank::side_matrix<adarank::dense_gradient<backend_t>> side(grad, adarank::projection_side::left);
        adarank::subspace_report rep;
        for (auto _ : state) {
            std::uint64_t counter = 0;
            rep = finder.find(side, policy, side.norm2(), {}, 0xada00020, counter, bv);
            benchmark::ClobberMemory();
        }
        if (rep.rank != kRank || rep.exact || rep.warm) return state.SkipWithError("the finder did not run a cold randomized search of rank 128");
        // Residual ‖G − BᵀB·G‖_F against the optimum, outside the timed loop.
        const velora::const_matrix_view<T> bc(basis.data(), kRank, kRows);
        velora::host_buffer<T> p(static_cast<std::size_t>(kRank * kCols));
        velora::host_buffer<T> r(f.g.size());
        std::copy(f.g.data(), f.g.data() + f.g.size(), r.data());
        b.gemm(velora::op::none, velora::op::none, T(1), bc, f.cg(), T(0), velora::matrix_view<T>(p.data(), kRank, kCols));
        b.gemm(velora::op::transpose, velora::op::none, T(-1), bc, velora::const_matrix_view<T>(p.data(), kRank, kCols), T(1),
               velora::matrix_view<T>(r.data(), kRows, kCols));
        const double residual = std::sqrt(b.sum_of_squares(velora::const_matrix_view<T>(r.data(), kRows, kCols)));
        const double optimal = matrix_fixture::tail(f.sigma(), kRank);
        state.counters["residual_ratio"] = residual / optimal;
        state.counters["sketch"] = static_cast<double>(rep.sketch);
        state.counters["q"] = rep.power_iterations;
    });
}
void BM_RandomizedSVD(benchmark::State& state) { randomized_svd(state, adarank::rsvd_config{}.power_iterations); }
void BM_RandomizedSVDq1(benchmark::State& state) { randomized_svd(state, 1); }
BENCHMARK(BM_RandomizedSVD)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RandomizedSVDq1)->UseRealTime()->Unit(benchmark::kMillisecond);

// ---------------------------------------------------------------- VeLoRA layer + optimizer

struct velora_fixture {
    velora::host_buffer<T> x{static_cast<std::size_t>(kTokens * kFeatures)};    // T×D input
    velora::host_buffer<T> dy{static_cast<std::size_t>(kTokens * kOutputs)};    // T×O output gradient
    velora::host_buffer<T> a{static_cast<std::size_t>(kOutputs * kGroups)};     // O×G factored gradient
    velora::host_buffer<T> dw{static_cast<std::size_t>(kOutputs * kFeatures)};  // O×D dense gradient
    velora::host_buffer<T> w_fused, w_dense;                                     // O×D weights, one per optimizer
    compressor_t comp;
    record_t record;
    // Default AdaRankGrad configuration (adaptive rank, r_max 128) without refreshes.
    optimizer_t opt_fused, opt_dense;
    optimizer_t::param_id id_fused, id_dense;

    velora_fixture()
        : w_fused(gaussian_buffer(kOutputs * kFeatures, 0xada00033, 1.0 / std::sqrt(static_cast<double>(kFeatures)))),
          w_dense(w_fused.size()),
          comp(backend(), kFeatures),
          opt_fused(backend(), refresh_free_default()),
          opt_dense(backend(), refresh_free_default()),
          id_fused(opt_fused.add_parameter(kOutputs, kFeatures, adarank::param_kind::low_rank)),
          id_dense(opt_dense.add_parameter(kOutputs, kFeatures, adarank::param_kind::low_rank)) {
        fill_gaussian(x.data(), kTokens * kFeatures, 0xada00031, 1.0);
        // Zero-mean X: the factored gradient then has its full rank G = 32 (a nonzero mean, as
        // real activations have, makes it nearly rank one and the fused step even cheaper).
        fill_gaussian(dy.data(), kTokens * kOutputs, 0xada00032, 1.0);
        std::copy(w_fused.data(), w_fused.data() + w_fused.size(), w_dense.data());
        // The forward pass (not timed by either benchmark): compress X into the record.
        if (comp.compress(cx(), record) != velora::status::ok) throw std::runtime_error("compress did not return status::ok");
        // Warm-up: each optimizer's first step finds its subspace.
        if (fused_step() != velora::status::ok) throw std::runtime_error("warm-up fused step did not return status::ok");
        if (dense_step() != velora::status::ok) throw std::runtime_error("warm-up dense step did not return status::ok");
    }

    static adarank::optimizer_config refresh_free_default() {
        adarank::optimizer_config c;
        c.adam = adam_hyper();
        c.refresh = adarank::refresh_policy::every(kNeverRefresh);
        return c;
    }

    velora::const_matrix_view<T> cx() const { return {x.data(), kTokens, kFeatures}; }
    velora::const_matrix_view<T> cdy() const { return {dy.data(), kTokens, kOutputs}; }

    velora::status fused_step() {
        comp.gradient_factor(record, cdy(), velora::matrix_view<T>(a.data(), kOutputs, kGroups));
        return opt_fused.step(id_fused, velora::matrix_view<T>(w_fused.data(), kOutputs, kFeatures),
                              comp.factored(record, velora::const_matrix_view<T>(a.data(), kOutputs, kGroups)));
    }
    velora::status dense_step() {
        velora::dense_weight_grad(backend(), cdy(), cx(), velora::matrix_view<T>(dw.data(), kOutputs, kFeatures));
        return opt_dense.step(id_dense, velora::matrix_view<T>(w_dense.data(), kOutputs, kFeatures),
                              velora::const_matrix_view<T>(dw.data(), kOutputs, kFeatures));
    }
};

velora_fixture& layer() {
    static velora_fixture f;
    return f;
}

template <class Step>
void run_layer_step(benchmark::State& state, optimizer_t& opt, optimizer_t::param_id id, Step step) {
    const std::uint64_t refreshes_before = opt.layer_state(id).refreshes;
    if (!timed_steps(state, step)) return state.SkipWithError("step did not return status::ok");
    const adarank::layer_info info = opt.layer_state(id);
    if (info.refreshes != refreshes_before) return state.SkipWithError("a refresh happened inside the timed loop");
    state.counters["rank"] = static_cast<double>(info.rank);
    state.counters["state_bytes"] = static_cast<double>(info.state_bytes);
}

void BM_FusedVeloraStep(benchmark::State& state) {
    guarded(state, [&] {
        velora_fixture& f = layer();
        run_layer_step(state, f.opt_fused, f.id_fused, [&] { return f.fused_step(); });
    });
}
BENCHMARK(BM_FusedVeloraStep)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_DenseGradStep(benchmark::State& state) {
    guarded(state, [&] {
        velora_fixture& f = layer();
        run_layer_step(state, f.opt_dense, f.id_dense, [&] { return f.dense_step(); });
    });
}
BENCHMARK(BM_DenseGradStep)->UseRealTime()->Unit(benchmark::kMillisecond);

// ---------------------------------------------------------------- reporting

using bench::goal;
using bench::print_row;
using bench::ratio;

void print_ratios(const bench::ratio_reporter& rep) {
    bench::print_header("Ratios (same run; real time per iteration, the median when repetitions were given)",
                        "AdamW hyper-parameters of every optimizer: " + describe_hyper() + "\nGEMM engine: " +
                            (velora::cpu::has_blas ? std::string("BLAS ") + velora::cpu::blas_name() : std::string("Eigen's product (no BLAS)")));
    print_row("ExactSVD / RandomizedSVD (speed-up)", ratio(rep.seconds("BM_ExactSVD"), rep.seconds("BM_RandomizedSVD")), goal::at_least, 20.0,
              "%.1f", "U,S,V like GaLore's torch.linalg.svd; rank 128, q=2, p=10, cold");
    print_row("ExactSVDLeftOnly / RandomizedSVD", ratio(rep.seconds("BM_ExactSVDLeftOnly"), rep.seconds("BM_RandomizedSVD")), goal::info, 0,
              "%.1f", "exact thin U alone: the strictest baseline");
    print_row("RandomizedSVD residual / optimal", rep.counter("BM_RandomizedSVD", "residual_ratio"), goal::at_most, 1.05, "%.4f",
              "||G - B^T B G||_F / sqrt(sum_{i>128} s_i^2)");
    print_row("ExactSVD / RandomizedSVDq1 (speed-up)", ratio(rep.seconds("BM_ExactSVD"), rep.seconds("BM_RandomizedSVDq1")), goal::at_least,
              20.0, "%.1f", "the same with q=1");
    print_row("RandomizedSVDq1 residual / optimal", rep.counter("BM_RandomizedSVDq1", "residual_ratio"), goal::at_most, 1.05, "%.4f", "");
    print_row("LowRankAdamStep / AdamWDense (time)", ratio(rep.seconds("BM_LowRankAdamStep"), rep.seconds("BM_AdamWDense")), goal::info,
              0, "%.3f", "GaLore PyTorch: ~8x fused AdamW");
    const auto p = rep.seconds("BM_StepProjectionGemm"), bp = rep.seconds("BM_StepBackProjectionGemm"), a = rep.seconds("BM_StepLowRankAdam");
    const std::optional<double> step_floor = p && bp && a ? std::optional<double>(*p + *bp + *a) : std::nullopt;
    print_row("LowRankAdamStep / its floor", ratio(rep.seconds("BM_LowRankAdamStep"), step_floor), goal::at_most, 1.1, "%.3f",
              "floor: StepProjectionGemm + StepBackProjectionGemm + StepLowRankAdam");
    print_row("LowRankAdamRefresh time [s]", rep.seconds("BM_LowRankAdamRefresh"), goal::at_most, 0.2, "%.4f",
              "warm rSVD q=1 every step; GaLore full SVD ~2.5 s");
    print_row("DenseGradStep / FusedVeloraStep (speed-up)", ratio(rep.seconds("BM_DenseGradStep"), rep.seconds("BM_FusedVeloraStep")),
              goal::above, 1.0, "%.2f", "dW + optimizer step, compress excluded");
    print_row("LowRankAdamStep state bytes", rep.counter("BM_LowRankAdamStep", "state_bytes"), goal::equal, kLowRankStateBytes, "%.0f",
              "r*(len + 2*other)*4, r=128, len=1024, other=4096");
    print_row("AdamWDense state bytes", rep.counter("BM_AdamWDense", "state_bytes"), goal::equal, kDenseStateBytes, "%.0f", "2*m*n*4");
    print_row("low-rank / dense state bytes", ratio(rep.counter("BM_LowRankAdamStep", "state_bytes"), rep.counter("BM_AdamWDense", "state_bytes")),
              goal::info, 0, "%.4f", "");
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#if !defined(NDEBUG)
    std::fprintf(stderr, "note: bench_adarank was compiled without NDEBUG (assertions on); timings may be pessimistic\n");
#endif
    benchmark::AddCustomContext("weight", "m=" + std::to_string(kRows) + " n=" + std::to_string(kCols) + " r=" + std::to_string(kRank) + " float");
    benchmark::AddCustomContext("test_matrix", "U diag(1/(1+i)) V^T + N(0, 1e-5^2), U, V from QR of Gaussian matrices");
    benchmark::AddCustomContext("velora_layer", "T=" + std::to_string(kTokens) + " D=" + std::to_string(kFeatures) + " O=" +
                                                    std::to_string(kOutputs) + " G=" + std::to_string(kGroups));
    benchmark::AddCustomContext("adam", describe_hyper());
    benchmark::AddCustomContext("gemm_blas", velora::cpu::blas_name());
    bench::add_thread_context();
    return bench::run_and_print_ratios(print_ratios);
}
