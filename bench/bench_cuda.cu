// The CPU benchmarks' shapes and names on the CUDA backend (suffix _Cuda): VeLoRA at T = 4096,
// D = O = 1024, G = 32 and AdaRankGrad on one 1024×4096 weight, r = 128, float, plus the
// choice of gram_svd's small eigensolver (device cuSOLVER vs host Eigen).
//
// Times are GPU time per iteration from CUDA events on the backend's stream (manual time),
// host synchronisation inside an operation (compress's finiteness flag, the optimizer's
// norms) included. Every buffer is allocated before the timed loops. A "Ratios (same run)"
// table follows the benchmarks; the compress kernel's bandwidth is also given as a fraction
// of the card's theoretical peak (memory clock × bus width). Without a GPU the program says
// so and exits 0 having run nothing (1 with VELORA_REQUIRE_GPU=1, and always 1 when a GPU is
// present but unusable: tests/cuda/gpu_gate.hpp).
#include <benchmark/benchmark.h>

#include <velora/cuda.cuh>

#include <velora/compressor.hpp>
#include <velora/layers.hpp>
#include <adarank/adarank.hpp>

#include <cmath>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../tests/cuda/gpu_gate.hpp"
#include "adamw_terms.hpp"
#include "common.hpp"

namespace {

using bench::guarded;
using T = float;
using backend_t = velora::cuda::cuda_backend<T>;
using optimizer_t = adarank::low_rank_adamw<backend_t>;
using compressor_t = velora::compressor<backend_t>;
using record_t = compressor_t::record_type;
using velora::const_matrix_view;
using velora::index_t;
using velora::matrix_view;
using velora::op;
using velora::cuda::device_buffer;

constexpr index_t kTokens = 4096, kFeatures = 1024, kOutputs = 1024, kGroups = 32;
constexpr index_t kRows = 1024, kCols = 4096, kRank = 128;
constexpr double kNoise = 1e-5;
constexpr std::int64_t kNeverRefresh = std::int64_t{1} << 30;

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// The context, the workspace and the backend, shared by every benchmark.
struct gpu_state {
    velora::cuda::owned_context ctx;
    device_buffer<std::byte> ws;
    backend_t b{ctx};
    cudaEvent_t start = nullptr, stop = nullptr;
    gpu_state() {
        ws.resize(b.workspace_bytes(kRows, kCols));
        b.set_workspace({ws.data(), ws.size()});
        check(cudaEventCreate(&start), "cudaEventCreate");
        check(cudaEventCreate(&stop), "cudaEventCreate");
    }
};
gpu_state& gpu() {
    static gpu_state g;
    return g;
}

device_buffer<T> gaussian(index_t n, std::uint64_t seed, T scale) {
    device_buffer<T> d(static_cast<std::size_t>(n));
    gpu().b.fill_gaussian(seed, 0, d.data(), n);
    if (scale != T(1)) gpu().b.scale(matrix_view<T>{d.data(), 1, n}, scale);
    return d;
}

// The timed loop: GPU time of f() between two events on the stream.
template <class F>
void timed(benchmark::State& state, F&& f) {
    gpu_state& g = gpu();
    for (auto _ : state) {
        check(cudaEventRecord(g.start, g.ctx.get().stream), "cudaEventRecord");
        f();
        check(cudaEventRecord(g.stop, g.ctx.get().stream), "cudaEventRecord");
        check(cudaEventSynchronize(g.stop), "cudaEventSynchronize");
        float ms = 0;
        check(cudaEventElapsedTime(&ms, g.start, g.stop), "cudaEventElapsedTime");
        state.SetIterationTime(ms * 1e-3);
    }
}

double peak_bandwidth() {   // bytes/s: DDR (2 transfers per clock) × bus width
    int device = 0, clock_khz = 0, bus_bits = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device), "cudaDeviceGetAttribute");
    return 2.0 * clock_khz * 1e3 * bus_bits / 8.0;
}

// ---------------------------------------------------------------- VeLoRA layer

struct layer_fixture {
    device_buffer<T> x = gaussian(kTokens * kFeatures, 0xc0da0001, 1);
    device_buffer<T> dy = gaussian(kTokens * kOutputs, 0xc0da0002, 1);
    device_buffer<T> w = gaussian(kOutputs * kFeatures, 0xc0da0003, T(1.0 / 32));
    device_buffer<T> y{static_cast<std::size_t>(kTokens * kOutputs)}, dx{static_cast<std::size_t>(kTokens * kFeatures)};
    device_buffer<T> dw{static_cast<std::size_t>(kOutputs * kFeatures)}, a{static_cast<std::size_t>(kOutputs * kGroups)};
    device_buffer<float> sums{4096};
    compressor_t comp{gpu().b, kFeatures};
    record_t record;
    layer_fixture() {
        if (comp.compress(cx(), record) != velora::status::ok) throw std::runtime_error("compress did not return ok");
    }
    const_matrix_view<T> cx() const { return {x.data(), kTokens, kFeatures}; }
    const_matrix_view<T> cdy() const { return {dy.data(), kTokens, kOutputs}; }
    const_matrix_view<T> cw() const { return {w.data(), kOutputs, kFeatures}; }
    matrix_view<T> va() { return {a.data(), kOutputs, kGroups}; }
    matrix_view<T> vdw() { return {dw.data(), kOutputs, kFeatures}; }
};
layer_fixture& layer() {
    static layer_fixture f;
    return f;
}

// Reads every element of x once (16-byte loads, grid-stride): the bandwidth floor of compress.
__global__ void read_kernel(const float4* x, long long n4, float* sums) {
    float acc = 0;
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n4; i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const float4 v = x[i];
        acc += v.x + v.y + v.z + v.w;
    }
    if (acc == 12345.678f) sums[blockIdx.x % 4096] = acc;   // keeps the loads alive, never true for this data
}

void BM_ReadBaseline_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        layer_fixture& f = layer();
        int sms = 0, device = 0;
        check(cudaGetDevice(&device), "cudaGetDevice");
        check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
        timed(state, [&] {
            read_kernel<<<sms * 8, 256, 0, gpu().ctx.get().stream>>>(reinterpret_cast<const float4*>(f.x.data()), kTokens * kFeatures / 4, f.sums.data());
            check(cudaGetLastError(), "read_kernel launch");
        });
        const double bytes = double(kTokens * kFeatures) * sizeof(T);
        state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(bytes));
        state.counters["peak_fraction"] = benchmark::Counter(bytes / peak_bandwidth(), benchmark::Counter::kIsIterationInvariantRate);
    });
}
BENCHMARK(BM_ReadBaseline_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_VeloraCompress_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        layer_fixture& f = layer();
        bool ok = true;
        timed(state, [&] { ok &= f.comp.compress(f.cx(), f.record) == velora::status::ok; });
        if (!ok) return state.SkipWithError("compress did not return ok");
        const double bytes = double(kTokens * kFeatures + kTokens * kGroups) * sizeof(T);   // read X, write Z
        state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(bytes));
        state.counters["peak_fraction"] = benchmark::Counter(bytes / peak_bandwidth(), benchmark::Counter::kIsIterationInvariantRate);
        state.counters["stored_bytes"] = static_cast<double>(f.record.bytes());
    });
}
BENCHMARK(BM_VeloraCompress_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

// The projection kernel alone (compress without the host round trip of its finiteness flag).
void BM_ProjectKernel_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        layer_fixture& f = layer();
        const matrix_view<T> out{f.dx.data(), kTokens, kGroups};
        // The kernel alone: the overload without the finiteness report has no flag to clear, no
        // copy back and no synchronisation (compress's round trip is in BM_VeloraCompress_Cuda).
        timed(state, [&] { gpu().b.project_subtokens(f.cx(), f.record.v(), kFeatures / kGroups, out, velora::skip_finite_check); });
        const double bytes = double(kTokens * kFeatures + kTokens * kGroups) * sizeof(T);
        state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(bytes));
        state.counters["peak_fraction"] = benchmark::Counter(bytes / peak_bandwidth(), benchmark::Counter::kIsIterationInvariantRate);
    });
}
BENCHMARK(BM_ProjectKernel_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_WeightGradDense_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        layer_fixture& f = layer();
        timed(state, [&] { velora::dense_weight_grad(gpu().b, f.cdy(), f.cx(), f.vdw()); });
    });
}
BENCHMARK(BM_WeightGradDense_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_WeightGradVelora_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        layer_fixture& f = layer();
        timed(state, [&] { f.comp.gradient_factor(f.record, f.cdy(), f.va()); });
    });
}
BENCHMARK(BM_WeightGradVelora_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_WeightGradVeloraExpanded_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        layer_fixture& f = layer();
        timed(state, [&] {
            f.comp.gradient_factor(f.record, f.cdy(), f.va());
            f.comp.expand_weight_grad(f.record, const_matrix_view<T>(f.va()), f.vdw());
        });
    });
}
BENCHMARK(BM_WeightGradVeloraExpanded_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_LinearFwdBwdDense_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        layer_fixture& f = layer();
        backend_t& b = gpu().b;
        timed(state, [&] {
            velora::linear_forward(b, f.cx(), f.cw(), nullptr, matrix_view<T>{f.y.data(), kTokens, kOutputs});
            velora::linear_input_grad(b, f.cdy(), f.cw(), matrix_view<T>{f.dx.data(), kTokens, kFeatures});
            velora::dense_weight_grad(b, f.cdy(), f.cx(), f.vdw());
        });
    });
}
BENCHMARK(BM_LinearFwdBwdDense_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_LinearFwdBwdVelora_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        layer_fixture& f = layer();
        backend_t& b = gpu().b;
        bool ok = true;
        timed(state, [&] {
            velora::linear_forward(b, f.cx(), f.cw(), nullptr, matrix_view<T>{f.y.data(), kTokens, kOutputs});
            ok &= f.comp.compress(f.cx(), f.record) == velora::status::ok;
            velora::linear_input_grad(b, f.cdy(), f.cw(), matrix_view<T>{f.dx.data(), kTokens, kFeatures});
            f.comp.gradient_factor(f.record, f.cdy(), f.va());
        });
        if (!ok) state.SkipWithError("compress did not return ok");
    });
}
BENCHMARK(BM_LinearFwdBwdVelora_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

// ---------------------------------------------------------------- AdaRankGrad

adarank::optimizer_config make_config(adarank::rank_policy rank, adarank::refresh_policy refresh) {
    adarank::optimizer_config c;
    c.adam.lr = 1e-3;
    c.adam.eps = 1e-6;
    c.rank = rank;
    c.refresh = refresh;
    return c;
}

// G = U·diag(1/(1+i))·Vᵀ + N(0, 1e-5²), U and V orthonormalised Gaussian blocks (as on the CPU).
struct matrix_fixture {
    device_buffer<T> g{static_cast<std::size_t>(kRows * kCols)};
    std::optional<std::vector<double>> exact_sigma;
    matrix_fixture() {
        backend_t& b = gpu().b;
        auto ut = gaussian(kRows * kRows, 0xada00001, 1), vt = gaussian(kRows * kCols, 0xada00002, 1);
        b.orthonormalize_rows(matrix_view<T>{ut.data(), kRows, kRows});
        b.orthonormalize_rows(matrix_view<T>{vt.data(), kRows, kCols});
        for (index_t i = 0; i < kRows; ++i) b.scale(matrix_view<T>{vt.data() + i * kCols, 1, kCols}, T(1.0 / (1.0 + double(i))));
        b.fill_gaussian(0xada00003, 0, g.data(), kRows * kCols);
        b.scale(matrix_view<T>{g.data(), kRows, kCols}, T(kNoise));
        b.gemm(op::transpose, op::none, T(1), const_matrix_view<T>{ut.data(), kRows, kRows}, const_matrix_view<T>{vt.data(), kRows, kCols}, T(1),
               matrix_view<T>{g.data(), kRows, kCols});
        check(cudaStreamSynchronize(gpu().ctx.get().stream), "cudaStreamSynchronize");
    }
    const_matrix_view<T> cg() const { return {g.data(), kRows, kCols}; }
};
matrix_fixture& matrix() {
    static matrix_fixture f;
    return f;
}

struct optimizer_fixture {
    optimizer_t opt;
    device_buffer<T> w = gaussian(kRows * kCols, 0xada00010, T(1.0 / 64));
    optimizer_t::param_id id;
    optimizer_fixture(const adarank::optimizer_config& config, adarank::param_kind kind)
        : opt(gpu().b, config), id(opt.add_parameter(kRows, kCols, kind)) {
        if (step() != velora::status::ok) throw std::runtime_error("warm-up step did not return ok");
    }
    velora::status step() { return opt.step(id, matrix_view<T>{w.data(), kRows, kCols}, matrix().cg()); }
};

template <class F>
void optimizer_steps(benchmark::State& state, optimizer_fixture& f, F&& check_after) {
    bool ok = true;
    timed(state, [&] { ok &= f.step() == velora::status::ok; });
    if (!ok) return state.SkipWithError("step did not return ok");
    check_after(f.opt.layer_state(f.id));
}

void BM_AdamWDense_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        static optimizer_fixture f(make_config(adarank::rank_policy::fixed(kRank), adarank::refresh_policy::every(kNeverRefresh)), adarank::param_kind::dense);
        optimizer_steps(state, f, [&](const adarank::layer_info& i) { state.counters["state_bytes"] = double(i.state_bytes); });
        state.SetBytesProcessed(state.iterations() * 8 * kRows * kCols * static_cast<std::int64_t>(sizeof(T)));
    });
}
BENCHMARK(BM_AdamWDense_Cuda)->UseManualTime()->Unit(benchmark::kMillisecond);

// Dense AdamW over kRows·kCols = 4M floats on the backend alone: 8-bit blockwise moments
// (adam8_update: g and w read, w written, 2 bytes of moments read and written, blocks of 256)
// against float moments (adamw_update), in the same run. The 8-bit call also zeroes and reads
// back its finiteness flag (two small copies inside the timed region).
struct dense_adam_fixture {
    static constexpr index_t kBlock = 256, kCount = kRows * kCols;
    device_buffer<T> g = gaussian(kCount, 0xada00020, T(1e-2)), w = gaussian(kCount, 0xada00021, T(1.0 / 64));
    device_buffer<T> m{static_cast<std::size_t>(kCount)}, v{static_cast<std::size_t>(kCount)};
    device_buffer<std::uint8_t> qm{static_cast<std::size_t>(kCount)}, qv{static_cast<std::size_t>(kCount)};
    device_buffer<float> am{static_cast<std::size_t>(kCount / kBlock)}, av{static_cast<std::size_t>(kCount / kBlock)};
    const velora::rules::adamw_terms<T> terms = bench::dense_adamw_terms();
    dense_adam_fixture() {
        backend_t& b = gpu().b;
        for (auto* d : {&m, &v}) b.fill(matrix_view<T>{d->data(), 1, kCount}, T(0));
        check(cudaMemsetAsync(qm.data(), 0, qm.size(), gpu().ctx.get().stream), "cudaMemsetAsync");
        check(cudaMemsetAsync(qv.data(), 0, qv.size(), gpu().ctx.get().stream), "cudaMemsetAsync");
        check(cudaMemsetAsync(am.data(), 0, am.size() * sizeof(float), gpu().ctx.get().stream), "cudaMemsetAsync");
        check(cudaMemsetAsync(av.data(), 0, av.size() * sizeof(float), gpu().ctx.get().stream), "cudaMemsetAsync");
        check(cudaStreamSynchronize(gpu().ctx.get().stream), "cudaStreamSynchronize");
    }
    velora::rules::adam8_tensor_state state8() { return {qm.data(), qv.data(), am.data(), av.data(), kCount, kBlock}; }
};
dense_adam_fixture& dense_adam() {
    static dense_adam_fixture f;
    return f;
}

void BM_AdamFloatUpdate_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        dense_adam_fixture& f = dense_adam();
        const index_t n = dense_adam_fixture::kCount;
        timed(state, [&] {
            gpu().b.adamw_update(matrix_view<T>{f.w.data(), 1, n}, const_matrix_view<T>{f.g.data(), 1, n}, matrix_view<T>{f.m.data(), 1, n},
                                 matrix_view<T>{f.v.data(), 1, n}, f.terms);
        });
        state.SetBytesProcessed(state.iterations() * 7 * n * static_cast<std::int64_t>(sizeof(T)));   // g, w, m, v read; w, m, v written
    });
}
BENCHMARK(BM_AdamFloatUpdate_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_Adam8Update_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        dense_adam_fixture& f = dense_adam();
        const index_t n = dense_adam_fixture::kCount;
        bool finite = true;
        timed(state, [&] { finite &= gpu().b.adam8_update(velora::rules::adam_row_kind::galore_weight, f.g.data(), f.w.data(), f.state8(), f.terms); });
        if (!finite) return state.SkipWithError("adam8_update reported a non-finite result");
        state.SetBytesProcessed(state.iterations() * 16 * n);   // g, w read and w written (12 bytes), 2 bytes of moments read and written
    });
}
BENCHMARK(BM_Adam8Update_Cuda)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_LowRankAdamStep_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        static optimizer_fixture f(make_config(adarank::rank_policy::fixed(kRank), adarank::refresh_policy::every(kNeverRefresh)), adarank::param_kind::low_rank);
        optimizer_steps(state, f, [&](const adarank::layer_info& i) {
            if (i.refreshes != 1) state.SkipWithError("a refresh happened inside the timed loop");
            state.counters["rank"] = double(i.rank);
            state.counters["state_bytes"] = double(i.state_bytes);
        });
    });
}
BENCHMARK(BM_LowRankAdamStep_Cuda)->UseManualTime()->Unit(benchmark::kMillisecond);

void BM_LowRankAdamRefresh_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        static optimizer_fixture f(make_config(adarank::rank_policy::fixed(kRank), adarank::refresh_policy::every(1)), adarank::param_kind::low_rank);
        const std::uint64_t before = f.opt.layer_state(f.id).refreshes;
        optimizer_steps(state, f, [&](const adarank::layer_info& i) {
            if (i.refreshes - before != static_cast<std::uint64_t>(state.iterations())) state.SkipWithError("not every step refreshed");
            state.counters["q"] = i.last_refresh.power_iterations;
            state.counters["sketch"] = double(i.last_refresh.sketch);
        });
    });
}
BENCHMARK(BM_LowRankAdamRefresh_Cuda)->UseManualTime()->Unit(benchmark::kMillisecond);

// cuSOLVER's full SVD (gesvd) of G: the exact baseline. G row-major is Gᵀ column-major
// (4096×1024), so its left singular vectors are gesvd's VT; `left_only` asks for those alone.
void exact_svd(benchmark::State& state, bool left_only) {
    guarded(state, [&] {
        gpu_state& g = gpu();
        matrix_fixture& f = matrix();
        const int m = int(kCols), n = int(kRows);   // column-major shape of the copy
        device_buffer<T> copy(f.g.size()), s(static_cast<std::size_t>(n)), u(static_cast<std::size_t>(m) * n), vt(static_cast<std::size_t>(n) * n);
        device_buffer<T> rwork(static_cast<std::size_t>(n));
        device_buffer<int> info(1);
        int lwork = 0;
        velora::cuda::detail::check(cusolverDnSgesvd_bufferSize(g.ctx.get().solver, m, n, &lwork), "bench", "cusolverDnSgesvd_bufferSize");
        device_buffer<T> work(static_cast<std::size_t>(lwork));
        velora::cuda::detail::check(cusolverDnSetStream(g.ctx.get().solver, g.ctx.get().stream), "bench", "cusolverDnSetStream");
        timed(state, [&] {
            g.b.copy(f.g.data(), copy.data(), kRows * kCols);   // gesvd overwrites its input
            velora::cuda::detail::check(cusolverDnSgesvd(g.ctx.get().solver, left_only ? 'N' : 'S', 'S', m, n, copy.data(), m, s.data(), u.data(), m,
                                                         vt.data(), n, work.data(), lwork, rwork.data(), info.data()),
                                        "bench", "cusolverDnSgesvd");
        });
        int host_info = 0;
        check(cudaMemcpy(&host_info, info.data(), sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy");
        if (host_info != 0) return state.SkipWithError("gesvd did not converge");
        std::vector<T> sigma(static_cast<std::size_t>(n));
        check(cudaMemcpy(sigma.data(), s.data(), sigma.size() * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
        f.exact_sigma = std::vector<double>(sigma.begin(), sigma.end());
    });
}
void BM_ExactSVD_Cuda(benchmark::State& state) { exact_svd(state, false); }
void BM_ExactSVDLeftOnly_Cuda(benchmark::State& state) { exact_svd(state, true); }
BENCHMARK(BM_ExactSVD_Cuda)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ExactSVDLeftOnly_Cuda)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);

void randomized_svd(benchmark::State& state, int power_iterations) {
    guarded(state, [&] {
        backend_t& b = gpu().b;
        matrix_fixture& f = matrix();
        adarank::rsvd_config config;
        config.power_iterations = power_iterations;
        adarank::subspace_finder<backend_t> finder(b, config);
        const auto policy = adarank::rank_policy::fixed(kRank);
        finder.reserve(kRows, kCols, kRank);
        device_buffer<T> basis(static_cast<std::size_t>(kRank * kRows));
        const adarank::dense_gradient<backend_t> grad(b, f.cg());
        const adarank::side_matrix<adarank::dense_gradient<backend_t>> side(grad, adarank::projection_side::left);
        const double energy = side.norm2();
        adarank::subspace_report rep;
        timed(state, [&] {
            std::uint64_t counter = 0;
            rep = finder.find(side, policy, energy, {}, 0xada00020, counter, matrix_view<T>{basis.data(), kRank, kRows});
        });
        if (rep.rank != kRank || rep.exact || rep.warm) return state.SkipWithError("not a cold randomized search of rank 128");
        if (f.exact_sigma) {   // residual ‖G − BᵀB·G‖_F against the optimum (needs BM_ExactSVD_Cuda in the same run)
            device_buffer<T> p(static_cast<std::size_t>(kRank * kCols)), r(f.g.size());
            b.copy(f.g.data(), r.data(), kRows * kCols);
            b.gemm(op::none, op::none, T(1), const_matrix_view<T>{basis.data(), kRank, kRows}, f.cg(), T(0), matrix_view<T>{p.data(), kRank, kCols});
            b.gemm(op::transpose, op::none, T(-1), const_matrix_view<T>{basis.data(), kRank, kRows}, const_matrix_view<T>{p.data(), kRank, kCols}, T(1),
                   matrix_view<T>{r.data(), kRows, kCols});
            double tail = 0;
            for (std::size_t i = kRank; i < f.exact_sigma->size(); ++i) tail += (*f.exact_sigma)[i] * (*f.exact_sigma)[i];
            state.counters["residual_ratio"] = std::sqrt(b.sum_of_squares(const_matrix_view<T>{r.data(), kRows, kCols})) / std::sqrt(tail);
        }
        state.counters["sketch"] = double(rep.sketch);
    });
}
void BM_RandomizedSVD_Cuda(benchmark::State& state) { randomized_svd(state, adarank::rsvd_config{}.power_iterations); }
void BM_RandomizedSVDq1_Cuda(benchmark::State& state) { randomized_svd(state, 1); }
BENCHMARK(BM_RandomizedSVD_Cuda)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RandomizedSVDq1_Cuda)->UseManualTime()->Unit(benchmark::kMillisecond);

// gram_svd of the 138×4096 sketch product with each small eigensolver (arg 0: device, 1: host).
void BM_GramSvd_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        backend_t& b = gpu().b;
        const index_t k = kRank + 10;
        auto c = gaussian(k * kCols, 0xada00040, 1);
        device_buffer<T> u(static_cast<std::size_t>(k * k));
        std::vector<double> sigma(static_cast<std::size_t>(k));
        b.set_small_eigensolver(static_cast<velora::cuda::small_eigensolver>(state.range(0)));
        timed(state, [&] { b.gram_svd(const_matrix_view<T>{c.data(), k, kCols}, matrix_view<T>{u.data(), k, k}, sigma.data()); });
        b.set_small_eigensolver(velora::cuda::small_eigensolver::device);
    });
}
BENCHMARK(BM_GramSvd_Cuda)->Arg(0)->Arg(1)->UseManualTime()->Unit(benchmark::kMillisecond);

struct fused_fixture {
    layer_fixture& l = layer();
    device_buffer<T> w_fused = gaussian(kOutputs * kFeatures, 0xada00033, T(1.0 / 32)), w_dense = gaussian(kOutputs * kFeatures, 0xada00033, T(1.0 / 32));
    optimizer_t opt_fused{gpu().b, config()}, opt_dense{gpu().b, config()};
    optimizer_t::param_id id_fused = opt_fused.add_parameter(kOutputs, kFeatures, adarank::param_kind::low_rank);
    optimizer_t::param_id id_dense = opt_dense.add_parameter(kOutputs, kFeatures, adarank::param_kind::low_rank);
    static adarank::optimizer_config config() {
        adarank::optimizer_config c;
        c.adam.lr = 1e-3;
        c.refresh = adarank::refresh_policy::every(kNeverRefresh);
        return c;
    }
    fused_fixture() {
        if (fused_step() != velora::status::ok || dense_step() != velora::status::ok) throw std::runtime_error("warm-up step did not return ok");
    }
    velora::status fused_step() {
        l.comp.gradient_factor(l.record, l.cdy(), l.va());
        return opt_fused.step(id_fused, matrix_view<T>{w_fused.data(), kOutputs, kFeatures}, l.comp.factored(l.record, const_matrix_view<T>(l.va())));
    }
    velora::status dense_step() {
        velora::dense_weight_grad(gpu().b, l.cdy(), l.cx(), l.vdw());
        return opt_dense.step(id_dense, matrix_view<T>{w_dense.data(), kOutputs, kFeatures}, const_matrix_view<T>(l.vdw()));
    }
};
fused_fixture& fused() {
    static fused_fixture f;
    return f;
}

void BM_FusedVeloraStep_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        bool ok = true;
        timed(state, [&] { ok &= fused().fused_step() == velora::status::ok; });
        if (!ok) state.SkipWithError("step did not return ok");
    });
}
BENCHMARK(BM_FusedVeloraStep_Cuda)->UseManualTime()->Unit(benchmark::kMillisecond);

void BM_DenseGradStep_Cuda(benchmark::State& state) {
    guarded(state, [&] {
        bool ok = true;
        timed(state, [&] { ok &= fused().dense_step() == velora::status::ok; });
        if (!ok) state.SkipWithError("step did not return ok");
    });
}
BENCHMARK(BM_DenseGradStep_Cuda)->UseManualTime()->Unit(benchmark::kMillisecond);

void print_ratios(const bench::ratio_reporter& rep) {
    using bench::goal;
    using bench::print_row;
    using bench::ratio;
    bench::print_header("Ratios (same run; GPU time per iteration, the median when repetitions were given)");
    print_row("VeloraCompress_Cuda bandwidth / peak", rep.counter("BM_VeloraCompress_Cuda", "peak_fraction"), goal::at_least, 0.7, "%.3f",
              "read X + write Z, host flag round trip included");
    print_row("ProjectKernel_Cuda bandwidth / peak", rep.counter("BM_ProjectKernel_Cuda", "peak_fraction"), goal::at_least, 0.7, "%.3f", "kernel alone");
    print_row("ReadBaseline_Cuda bandwidth / peak", rep.counter("BM_ReadBaseline_Cuda", "peak_fraction"), goal::info, 0, "%.3f", "plain read");
    print_row("WeightGradDense / WeightGradVelora (Cuda)", ratio(rep.seconds("BM_WeightGradDense_Cuda"), rep.seconds("BM_WeightGradVelora_Cuda")),
              goal::at_least, 10.0, "%.2f", "");
    print_row("LinearFwdBwdVelora / LinearFwdBwdDense (Cuda)",
              ratio(rep.seconds("BM_LinearFwdBwdVelora_Cuda"), rep.seconds("BM_LinearFwdBwdDense_Cuda")), goal::at_most, 0.75, "%.3f", "");
    print_row("LowRankAdamStep / AdamWDense (Cuda, time)", ratio(rep.seconds("BM_LowRankAdamStep_Cuda"), rep.seconds("BM_AdamWDense_Cuda")),
              goal::at_most, 2.5, "%.3f", "");
    print_row("AdamFloatUpdate / Adam8Update (Cuda speed-up)", ratio(rep.seconds("BM_AdamFloatUpdate_Cuda"), rep.seconds("BM_Adam8Update_Cuda")),
              goal::at_least, 1.4, "%.2f", "4M floats; issue 24's target (16 instead of 28 bytes per element)");
    print_row("LowRankAdamRefresh / AdamWDense (Cuda)", ratio(rep.seconds("BM_LowRankAdamRefresh_Cuda"), rep.seconds("BM_AdamWDense_Cuda")),
              goal::info, 0, "%.1f", "");
    print_row("ExactSVD / RandomizedSVD (Cuda speed-up)", ratio(rep.seconds("BM_ExactSVD_Cuda"), rep.seconds("BM_RandomizedSVD_Cuda")),
              goal::at_least, 20.0, "%.1f", "cuSOLVER gesvd U,S,V vs rSVD q=2");
    print_row("ExactSVD / RandomizedSVDq1 (Cuda speed-up)", ratio(rep.seconds("BM_ExactSVD_Cuda"), rep.seconds("BM_RandomizedSVDq1_Cuda")),
              goal::at_least, 20.0, "%.1f", "");
    print_row("RandomizedSVD_Cuda residual / optimal", rep.counter("BM_RandomizedSVD_Cuda", "residual_ratio"), goal::at_most, 1.05, "%.4f", "");
    print_row("DenseGradStep / FusedVeloraStep (Cuda speed-up)", ratio(rep.seconds("BM_DenseGradStep_Cuda"), rep.seconds("BM_FusedVeloraStep_Cuda")),
              goal::above, 1.0, "%.2f", "");
    print_row("GramSvd host / device eigensolver (time)", ratio(rep.seconds("BM_GramSvd_Cuda/1"), rep.seconds("BM_GramSvd_Cuda/0")), goal::info, 0,
              "%.2f", "> 1: cuSOLVER syevd is faster");
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    // No GPU: says so and exits 0 (nothing to measure), or 1 with VELORA_REQUIRE_GPU=1; a GPU
    // that is present but unusable is always an error (exit 1).
    if (const int code = test::gpu_gate("bench_cuda"); code >= 0) return code == 77 ? 0 : code;
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) benchmark::AddCustomContext("gpu", prop.name);
    benchmark::AddCustomContext("peak_GBps", std::to_string(peak_bandwidth() / 1e9));
    return bench::run_and_print_ratios(print_ratios);
}
