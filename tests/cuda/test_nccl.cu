// The NCCL communicator on one GPU: a one-rank communicator (ncclCommInitAll on device 0) runs
// every collective through NCCL, and the optimizer's data-parallel path (mean_over_ranks, which
// it takes for any communicator type other than velora::single_process) gives the same bits as
// with an identity communicator, and as without a communicator for dense gradients. Several
// ranks with different data: test_nccl_2gpu.cu.
// Exits with 77 (CTest: skipped) when there is no GPU, with 1 when VELORA_REQUIRE_GPU=1 is set
// or the GPU is present but unusable (gpu_gate.hpp).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <velora/cuda.cuh>
#include <velora/cuda/nccl.hpp>

#include <adarank/adarank.hpp>
#include <velora/distributed/communicator.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "../test_util.hpp"
#include "gpu_gate.hpp"

using velora::const_matrix_view;
using velora::index_t;
using velora::matrix_view;
using velora::cuda::cuda_backend;
using velora::cuda::device_buffer;
using velora::cuda::nccl_communicator;
using param_id = adarank::low_rank_adamw<cuda_backend<float>>::param_id;

namespace {

template <class U>
device_buffer<U> upload(const std::vector<U>& host) {
    device_buffer<U> d(host.size());
    if (!host.empty()) REQUIRE(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(U), cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);   // the backend's stream is non-blocking
    return d;
}
template <class U>
std::vector<U> download(const device_buffer<U>& d) {
    std::vector<U> host(d.size());
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    if (!host.empty()) REQUIRE(cudaMemcpy(host.data(), d.data(), d.size() * sizeof(U), cudaMemcpyDeviceToHost) == cudaSuccess);
    return host;
}
template <class U>
bool same_bits(const std::vector<U>& a, const std::vector<U>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(U)) == 0);
}

// A one-rank NCCL communicator on device 0 and a stream; the caller-owned pieces the wrapper
// borrows.
struct one_rank {
    ncclComm_t comm = nullptr;
    velora::cuda::owned_context ctx;

    one_rank() : ctx(make_comm(comm)) {}
    ~one_rank() {
        if (comm) (void)ncclCommDestroy(comm);
    }
    one_rank(const one_rank&) = delete;
    one_rank& operator=(const one_rank&) = delete;

private:
    // Runs before ctx is built: device 0 current, then the communicator.
    static velora::cuda::owned_context make_comm(ncclComm_t& comm);
};

velora::cuda::owned_context one_rank::make_comm(ncclComm_t& comm) {
    REQUIRE(cudaSetDevice(0) == cudaSuccess);
    const int devices[1] = {0};
    REQUIRE(ncclCommInitAll(&comm, 1, devices) == ncclSuccess);
    return {};
}

} // namespace

// The identity on one process as a type other than velora::single_process: the optimizer takes
// its data-parallel path (mean_over_ranks) with it, as with NCCL, so the two must agree bit for
// bit whatever the gradient's form. (Outside the unnamed namespace: there nvcc warns that its
// double overload is never called.)
struct identity_communicator {
    [[nodiscard]] int rank() const { return 0; }
    [[nodiscard]] int size() const { return 1; }
    void all_reduce_sum(std::span<float>) {}
    void all_reduce_sum(std::span<double>) {}
    void broadcast(std::span<std::byte>, int) {}
    [[nodiscard]] bool any(bool flag) { return flag; }
};
static_assert(velora::communicator<identity_communicator>);

TEST_CASE("a one-rank communicator: rank 0 of 1 on device 0; a root outside [0, size) is std::invalid_argument") {
    one_rank r;
    nccl_communicator comm(r.comm, r.ctx.get().stream);
    CHECK(comm.rank() == 0);
    CHECK(comm.size() == 1);
    CHECK(comm.device() == 0);
    CHECK(comm.native() == r.comm);
    CHECK(comm.stream() == r.ctx.get().stream);
    std::vector<std::byte> bytes(4);
    const auto message = test::invalid_argument_message([&] { comm.broadcast(std::span<std::byte>(bytes), 1); });
    CHECK(message.find("velora::cuda::nccl_communicator::broadcast: root 1 is not a rank") == 0);
    CHECK(test::invalid_argument_message([&] { comm.broadcast(std::span<std::byte>(bytes), -1); }) != "<no std::invalid_argument thrown>");
}

TEST_CASE_TEMPLATE("all_reduce_sum over one rank leaves every bit of device memory as it was", T, float, double) {
    one_rank r;
    nccl_communicator comm(r.comm, r.ctx.get().stream);
    for (const std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{1001}, std::size_t{1} << 20}) {
        CAPTURE(n);
        auto host = test::data<T>(n, 5 + n);
        if (n >= 8) {
            host[0] = T(-0.0);
            host[1] = std::numeric_limits<T>::denorm_min();
            host[2] = std::numeric_limits<T>::max();
            host[3] = std::numeric_limits<T>::lowest();
            host[4] = T(1) / T(3);
        }
        auto d = upload(host);
        comm.all_reduce_sum(std::span<T>(d.data(), d.size()));
        REQUIRE(cudaStreamSynchronize(r.ctx.get().stream) == cudaSuccess);
        CHECK(same_bits(download(d), host));
    }
}

TEST_CASE("broadcast round-trips host bytes through the device, in pieces; broadcast_blob and same_on_all_ranks work on it") {
    one_rank r;
    nccl_communicator comm(r.comm, r.ctx.get().stream);
    for (const std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{8}, nccl_communicator::broadcast_chunk_bytes,
                                2 * nccl_communicator::broadcast_chunk_bytes + 3}) {
        CAPTURE(n);
        std::vector<std::byte> bytes(n);
        for (std::size_t i = 0; i < n; ++i) bytes[i] = static_cast<std::byte>((i * 131 + i / 4093) & 0xff);   // differs between pieces
        const auto expected = bytes;
        comm.broadcast(std::span<std::byte>(bytes), 0);
        CHECK(bytes == expected);
    }
    std::vector<std::byte> blob(1000, std::byte{7});
    velora::broadcast_blob(comm, blob);
    CHECK(blob == std::vector<std::byte>(1000, std::byte{7}));
    CHECK(velora::same_on_all_ranks(comm, 0x0123456789abcdefULL));
}

TEST_CASE("any returns the flag (one rank)") {
    one_rank r;
    nccl_communicator comm(r.comm, r.ctx.get().stream);
    CHECK(comm.any(true));
    CHECK_FALSE(comm.any(false));
    CHECK(comm.any(true));
}

TEST_CASE("low_rank_adamw with the NCCL communicator on one rank: bit-identical to the identity communicator, and to no communicator for dense gradients") {
    one_rank r;
    nccl_communicator comm(r.comm, r.ctx.get().stream);
    identity_communicator identity;
    cuda_backend<float> gpu(r.ctx);
    device_buffer<std::byte> ws(gpu.workspace_bytes(64, 512));
    gpu.set_workspace({ws.data(), ws.size()});

    const index_t m = 48, n = 160, g = 16, s = n / g;
    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::adaptive(0.5, 2, 10);   // randomized searches, warm starts
    cfg.refresh = adarank::refresh_policy::every(3);
    // alone: no communicator (velora::single_process, the direct path); local: the identity
    // through the data-parallel path; ranked: NCCL through the data-parallel path.
    adarank::low_rank_adamw<cuda_backend<float>> alone(gpu, cfg), local(gpu, cfg), ranked(gpu, cfg);
    const auto kinds = {adarank::param_kind::low_rank, adarank::param_kind::low_rank, adarank::param_kind::dense};
    std::vector<param_id> ids;
    for (const auto kind : kinds) {
        const auto id = alone.add_parameter(m, n, kind);
        REQUIRE(local.add_parameter(m, n, kind, identity) == id);
        REQUIRE(ranked.add_parameter(m, n, kind, comm) == id);   // the collective registration check
        ids.push_back(id);
    }
    // Weights: one copy per optimizer and parameter (0: low-rank with dense gradients, 1: low-rank
    // with factored gradients, 2: dense AdamW with dense gradients).
    const auto hw = test::data<float>(static_cast<std::size_t>(m * n), 11);
    std::vector<device_buffer<float>> wa, wl, wr;
    for (std::size_t i = 0; i < ids.size(); ++i) {
        wa.push_back(upload(hw));
        wl.push_back(upload(hw));
        wr.push_back(upload(hw));
    }
    auto hv = test::data<float>(static_cast<std::size_t>(s), 12, 0.5);
    float norm = 0;
    for (float e : hv) norm += e * e;
    for (float& e : hv) e /= std::sqrt(norm);
    const auto dv = upload(hv);
    const auto w = [&](std::vector<device_buffer<float>>& ws_, std::size_t i) { return matrix_view<float>{ws_[i].data(), m, n}; };

    for (int step = 0; step < 8; ++step) {
        CAPTURE(step);
        auto hg = test::data<float>(static_cast<std::size_t>(m * n), 100 + std::uint64_t(step));
        for (index_t i = 0; i < m; ++i)
            for (index_t j = 0; j < n; ++j) hg[static_cast<std::size_t>(i * n + j)] *= std::exp(-0.2f * float(i));   // a decaying spectrum
        const auto dg = upload(hg);
        const const_matrix_view<float> grad{dg.data(), m, n};
        const auto ha = test::data<float>(static_cast<std::size_t>(m * g), 300 + std::uint64_t(step));
        const auto da = upload(ha);
        const velora::factored_gradient<float> fg{const_matrix_view<float>{da.data(), m, g}, dv.data(), s, n, 0.5f};

        for (const std::size_t i : {std::size_t{0}, std::size_t{2}}) {
            CHECK(alone.step(ids[i], w(wa, i), grad) == velora::status::ok);
            CHECK(local.step(ids[i], w(wl, i), grad, identity) == velora::status::ok);
            CHECK(ranked.step(ids[i], w(wr, i), grad, comm) == velora::status::ok);
        }
        CHECK(alone.step(ids[1], w(wa, 1), fg) == velora::status::ok);
        CHECK(local.step(ids[1], w(wl, 1), fg, identity) == velora::status::ok);
        CHECK(ranked.step(ids[1], w(wr, 1), fg, comm) == velora::status::ok);
        for (std::size_t i = 0; i < ids.size(); ++i) {
            CAPTURE(i);
            const auto ranked_w = download(wr[i]);
            CHECK(same_bits(ranked_w, download(wl[i])));
            CHECK(ranked.layer_state(ids[i]).rank == local.layer_state(ids[i]).rank);
            CHECK(ranked.layer_state(ids[i]).refreshes == local.layer_state(ids[i]).refreshes);
            CHECK(ranked.layer_state(ids[i]).communicated_bytes == local.layer_state(ids[i]).communicated_bytes);
            CHECK(ranked.layer_state(ids[i]).communicated_bytes > 0);
            // Without a communicator a factored gradient's ‖G‖² comes from A and v, with one
            // from G's expanded rows (mean_over_ranks::norm2): equal in exact arithmetic, not
            // necessarily in the last bit, so that parameter is compared with `local` only.
            if (i != 1) {
                CHECK(same_bits(ranked_w, download(wa[i])));
                CHECK(ranked.layer_state(ids[i]).rank == alone.layer_state(ids[i]).rank);
                CHECK(ranked.layer_state(ids[i]).refreshes == alone.layer_state(ids[i]).refreshes);
            }
        }
    }
    CHECK(ranked.layer_state(ids[0]).refreshes >= 2);
    CHECK(ranked.save_state() == local.save_state());

    // The bucketed dense reduction: the mean over one rank is the gradient itself, bit for bit.
    const auto hg = test::data<float>(static_cast<std::size_t>(m * n), 900);
    auto dg = upload(hg);
    const param_id dense_id[1] = {ids[2]};
    const matrix_view<float> grads[1] = {matrix_view<float>{dg.data(), m, n}};
    ranked.all_reduce_mean(std::span<const param_id>(dense_id), std::span<const matrix_view<float>>(grads), comm, 1000);
    CHECK(same_bits(download(dg), hg));
}

int main(int argc, char** argv) {
    if (const int code = test::gpu_gate("test_nccl"); code >= 0) return code;
    doctest::Context context(argc, argv);
    return context.run();
}
