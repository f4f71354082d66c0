// The NCCL communicator over two GPUs in one process: ncclCommInitAll on devices 0 and 1, one
// host thread per rank (each with its own device, stream, handles and backend), different data
// on each rank. A one-rank communicator cannot tell a working all-reduce from one that returns
// its input; two ranks with different data can: the sum, the mean (the 1/P scaling), broadcast's
// non-root branch, `any` and a data-parallel optimizer run, with the same bits on both ranks.
// Exits with 77 (CTest: skipped) with fewer than two GPUs, with 1 when VELORA_REQUIRE_GPU=1 is
// set or the GPU is present but unusable (gpu_gate.hpp).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <velora/cuda.cuh>
#include <velora/cuda/nccl.hpp>

#include <adarank/adarank.hpp>
#include <velora/distributed/communicator.hpp>

#include <array>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../test_util.hpp"
#include "gpu_gate.hpp"

using velora::const_matrix_view;
using velora::index_t;
using velora::matrix_view;
using velora::cuda::cuda_backend;
using velora::cuda::device_buffer;
using velora::cuda::nccl_communicator;

namespace {

constexpr int kRanks = 2;

// Inside the rank threads failures are exceptions (doctest's assertions stay on the main thread).
void ensure(bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error(what);
}
template <class U>
device_buffer<U> upload(const std::vector<U>& host) {
    device_buffer<U> d(host.size());
    if (!host.empty()) ensure(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(U), cudaMemcpyHostToDevice) == cudaSuccess, "upload");
    ensure(cudaDeviceSynchronize() == cudaSuccess, "upload: cudaDeviceSynchronize");
    return d;
}
template <class U>
std::vector<U> download(const device_buffer<U>& d) {
    std::vector<U> host(d.size());
    ensure(cudaDeviceSynchronize() == cudaSuccess, "download: cudaDeviceSynchronize");
    if (!host.empty()) ensure(cudaMemcpy(host.data(), d.data(), d.size() * sizeof(U), cudaMemcpyDeviceToHost) == cudaSuccess, "download");
    return host;
}
template <class U>
bool same_bits(const std::vector<U>& a, const std::vector<U>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(U)) == 0);
}

// What one rank's thread is given: its rank, its communicator (over its stream) and its context.
struct rank_env {
    int rank;
    nccl_communicator& comm;
    velora::cuda::owned_context& ctx;
};

// Two ranks on devices 0 and 1; run() calls body(env) on one thread per rank and rethrows the
// first failure on the calling thread.
class two_ranks {
public:
    two_ranks() {
        const int devices[kRanks] = {0, 1};
        REQUIRE(ncclCommInitAll(comms_.data(), kRanks, devices) == ncclSuccess);
    }
    ~two_ranks() {
        for (ncclComm_t c : comms_)
            if (c) (void)ncclCommDestroy(c);
    }
    two_ranks(const two_ranks&) = delete;
    two_ranks& operator=(const two_ranks&) = delete;

    void run(const std::function<void(rank_env&)>& body) {
        std::array<std::exception_ptr, kRanks> errors{};
        std::vector<std::thread> threads;
        for (int r = 0; r < kRanks; ++r)
            threads.emplace_back([&, r] {
                try {
                    ensure(cudaSetDevice(r) == cudaSuccess, "cudaSetDevice");
                    velora::cuda::owned_context ctx;   // on this rank's device
                    nccl_communicator comm(comms_[static_cast<std::size_t>(r)], ctx.get().stream);
                    ensure(comm.rank() == r && comm.size() == kRanks && comm.device() == r, "rank, size or device");
                    rank_env env{r, comm, ctx};
                    body(env);
                    ensure(cudaStreamSynchronize(ctx.get().stream) == cudaSuccess, "cudaStreamSynchronize");
                } catch (...) {
                    errors[static_cast<std::size_t>(r)] = std::current_exception();
                }
            });
        for (auto& t : threads) t.join();
        for (int r = 0; r < kRanks; ++r) {
            CAPTURE(r);
            if (errors[static_cast<std::size_t>(r)]) {
                try {
                    std::rethrow_exception(errors[static_cast<std::size_t>(r)]);
                } catch (const std::exception& e) {
                    FAIL_CHECK("rank " << r << ": " << e.what());
                }
            }
        }
    }

private:
    std::array<ncclComm_t, kRanks> comms_{};
};

} // namespace

TEST_CASE_TEMPLATE("all_reduce_sum over two GPUs: the sum of the two ranks' different data, the same bits on both", T, float, double) {
    two_ranks ranks;
    for (const std::size_t n : {std::size_t{1}, std::size_t{1001}, std::size_t{1} << 20}) {
        CAPTURE(n);
        std::array<std::vector<T>, kRanks> result;
        ranks.run([&](rank_env& env) {
            auto d = upload(test::data<T>(n, 10 + std::uint64_t(env.rank)));
            env.comm.all_reduce_sum(std::span<T>(d.data(), d.size()));
            result[static_cast<std::size_t>(env.rank)] = download(d);
        });
        // Two addends: each element is one rounded addition, whatever NCCL's algorithm.
        const auto a = test::data<T>(n, 10), b = test::data<T>(n, 11);
        std::vector<T> expected(n);
        for (std::size_t i = 0; i < n; ++i) expected[i] = a[i] + b[i];
        CHECK(same_bits(result[0], expected));
        CHECK(same_bits(result[1], result[0]));
    }
}

TEST_CASE("the mean over two ranks (reduce_to_mean, all_reduce_mean's bucket): (g0 + g1) / 2 on both ranks, bit for bit") {
    two_ranks ranks;
    const index_t m = 48, n = 160;
    std::array<std::vector<float>, kRanks> mean, bucketed;
    ranks.run([&](rank_env& env) {
        cuda_backend<float> gpu(env.ctx);
        device_buffer<std::byte> ws(gpu.workspace_bytes(16, 512));
        gpu.set_workspace({ws.data(), ws.size()});
        const auto host = test::data<float>(static_cast<std::size_t>(m * n), 20 + std::uint64_t(env.rank));
        auto d = upload(host);
        adarank::reduce_to_mean(gpu, env.comm, matrix_view<float>{d.data(), m, n});
        mean[static_cast<std::size_t>(env.rank)] = download(d);
        // The optimizer's bucketed reduction of a dense parameter's gradient.
        adarank::low_rank_adamw<cuda_backend<float>> opt(gpu);
        const auto id = opt.add_parameter(m, n, adarank::param_kind::dense, env.comm);
        auto g = upload(host);
        const adarank::low_rank_adamw<cuda_backend<float>>::param_id ids[1] = {id};
        const matrix_view<float> grads[1] = {matrix_view<float>{g.data(), m, n}};
        opt.all_reduce_mean(std::span(ids), std::span<const matrix_view<float>>(grads), env.comm, 1000);
        bucketed[static_cast<std::size_t>(env.rank)] = download(g);
    });
    const auto a = test::data<float>(static_cast<std::size_t>(m * n), 20), b = test::data<float>(static_cast<std::size_t>(m * n), 21);
    std::vector<float> expected(a.size());
    for (std::size_t i = 0; i < a.size(); ++i) expected[i] = (a[i] + b[i]) * 0.5f;   // exact scaling by a power of two
    CHECK(same_bits(mean[0], expected));
    CHECK(same_bits(mean[1], expected));
    CHECK(same_bits(bucketed[0], expected));
    CHECK(same_bits(bucketed[1], expected));
}

TEST_CASE("broadcast from either root reaches the other rank, in pieces; any is true when one rank says so") {
    two_ranks ranks;
    for (const int root : {0, 1})
        for (const std::size_t n : {std::size_t{1}, std::size_t{4097}, 2 * nccl_communicator::broadcast_chunk_bytes + 3}) {
            CAPTURE(root);
            CAPTURE(n);
            const auto pattern = [&](int rank) {
                std::vector<std::byte> bytes(n);
                for (std::size_t i = 0; i < n; ++i) bytes[i] = static_cast<std::byte>((i * 131 + i / 4093 + 7 * std::size_t(rank)) & 0xff);
                return bytes;
            };
            std::array<std::vector<std::byte>, kRanks> got;
            ranks.run([&](rank_env& env) {
                auto bytes = pattern(env.rank);   // different on each rank before the call
                env.comm.broadcast(std::span<std::byte>(bytes), root);
                got[static_cast<std::size_t>(env.rank)] = std::move(bytes);
            });
            CHECK(got[0] == pattern(root));
            CHECK(got[1] == pattern(root));
        }
    for (const std::array<bool, kRanks> flags : {std::array{false, false}, std::array{true, false}, std::array{false, true}, std::array{true, true}}) {
        std::array<int, kRanks> answer{-1, -1};
        ranks.run([&](rank_env& env) { answer[static_cast<std::size_t>(env.rank)] = env.comm.any(flags[static_cast<std::size_t>(env.rank)]) ? 1 : 0; });
        const int expected = flags[0] || flags[1] ? 1 : 0;
        CHECK(answer[0] == expected);
        CHECK(answer[1] == expected);
    }
}

TEST_CASE("a data-parallel low_rank_adamw run over two GPUs: the same weights and ranks on both; dense AdamW equals one GPU fed the mean") {
    two_ranks ranks;
    const index_t m = 48, n = 160, g = 16, s = n / g;
    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::adaptive(0.5, 2, 10);
    cfg.refresh = adarank::refresh_policy::every(3);
    constexpr int kSteps = 8;
    const auto gradient = [&](int rank, int step) {
        auto h = test::data<float>(static_cast<std::size_t>(m * n), 100 + std::uint64_t(step) * 7 + std::uint64_t(rank));
        for (index_t i = 0; i < m; ++i)
            for (index_t j = 0; j < n; ++j) h[static_cast<std::size_t>(i * n + j)] *= std::exp(-0.2f * float(i));
        return h;
    };
    const auto hw = test::data<float>(static_cast<std::size_t>(m * n), 11);
    auto hv = test::data<float>(static_cast<std::size_t>(s), 12, 0.5);
    float norm = 0;
    for (float e : hv) norm += e * e;
    for (float& e : hv) e /= std::sqrt(norm);
    // weights[rank][parameter]: 0 low-rank (dense gradients), 1 low-rank (factored), 2 dense AdamW.
    std::array<std::array<std::vector<float>, 3>, kRanks> weights;
    std::array<std::vector<std::byte>, kRanks> states;
    std::array<std::array<index_t, 3>, kRanks> final_rank{};
    ranks.run([&](rank_env& env) {
        cuda_backend<float> gpu(env.ctx);
        device_buffer<std::byte> ws(gpu.workspace_bytes(64, 512));
        gpu.set_workspace({ws.data(), ws.size()});
        adarank::low_rank_adamw<cuda_backend<float>> opt(gpu, cfg);
        const adarank::param_kind kinds[3] = {adarank::param_kind::low_rank, adarank::param_kind::low_rank, adarank::param_kind::dense};
        std::vector<device_buffer<float>> w;
        for (const auto kind : kinds) {
            (void)opt.add_parameter(m, n, kind, env.comm);
            w.push_back(upload(hw));
        }
        const auto dv = upload(hv);
        for (int step = 0; step < kSteps; ++step) {
            auto dg = upload(gradient(env.rank, step));
            const const_matrix_view<float> grad{dg.data(), m, n};
            auto da = upload(test::data<float>(static_cast<std::size_t>(m * g), 300 + std::uint64_t(step) * 7 + std::uint64_t(env.rank)));
            const velora::factored_gradient<float> fg{const_matrix_view<float>{da.data(), m, g}, dv.data(), s, n, 0.5f};
            ensure(opt.step(0, matrix_view<float>{w[0].data(), m, n}, grad, env.comm) == velora::status::ok, "step 0");
            ensure(opt.step(1, matrix_view<float>{w[1].data(), m, n}, fg, env.comm) == velora::status::ok, "step 1");
            ensure(opt.step(2, matrix_view<float>{w[2].data(), m, n}, grad, env.comm) == velora::status::ok, "step 2");
        }
        auto& mine = weights[static_cast<std::size_t>(env.rank)];
        for (std::size_t i = 0; i < 3; ++i) {
            mine[i] = download(w[i]);
            final_rank[static_cast<std::size_t>(env.rank)][i] = opt.layer_state(static_cast<adarank::low_rank_adamw<cuda_backend<float>>::param_id>(i)).rank;
        }
        states[static_cast<std::size_t>(env.rank)] = opt.save_state();
    });
    for (std::size_t i = 0; i < 3; ++i) {
        CAPTURE(i);
        CHECK(same_bits(weights[0][i], weights[1][i]));
        CHECK(final_rank[0][i] == final_rank[1][i]);
        CHECK(weights[0][i] != hw);   // the run moved the weights
    }
    CHECK(states[0] == states[1]);

    // Dense AdamW: the mean of two gradients is one rounded addition and an exact halving, so one
    // GPU fed that mean takes the same steps, bit for bit.
    REQUIRE(cudaSetDevice(0) == cudaSuccess);
    velora::cuda::owned_context ctx;
    cuda_backend<float> gpu(ctx);
    device_buffer<std::byte> ws(gpu.workspace_bytes(64, 512));
    gpu.set_workspace({ws.data(), ws.size()});
    adarank::low_rank_adamw<cuda_backend<float>> alone(gpu, cfg);
    const auto id = alone.add_parameter(m, n, adarank::param_kind::dense);
    auto w = upload(hw);
    for (int step = 0; step < kSteps; ++step) {
        const auto a = gradient(0, step), b = gradient(1, step);
        std::vector<float> mean(a.size());
        for (std::size_t i = 0; i < a.size(); ++i) mean[i] = (a[i] + b[i]) * 0.5f;
        auto dg = upload(mean);
        REQUIRE(alone.step(id, matrix_view<float>{w.data(), m, n}, const_matrix_view<float>{dg.data(), m, n}) == velora::status::ok);
    }
    CHECK(same_bits(download(w), weights[0][2]));
}

int main(int argc, char** argv) {
    if (const int code = test::gpu_gate("test_nccl_2gpu", kRanks); code >= 0) return code;
    doctest::Context context(argc, argv);
    return context.run();
}
