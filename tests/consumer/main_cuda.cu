// The installed velora::cuda target as a downstream CUDA program uses it: compiles the backend,
// the compressor and the optimizer for the GPU; runs a step when a GPU is visible.
#include <velora/cuda.cuh>

#include <adarank/adarank.hpp>
#include <velora/compressor.hpp>

#include <cstdio>
#include <vector>

using backend = velora::cuda::cuda_backend<float>;
static_assert(adarank::optimizer_backend<backend>);

int main() {
    if (velora::cuda::device_count() == 0) {
        std::puts("consumer_cuda: built against the installed velora::cuda; no GPU visible, nothing run");
        return 0;
    }
    velora::cuda::owned_context ctx;
    backend b(ctx);
    velora::cuda::device_buffer<std::byte> ws(b.workspace_bytes(8, 64));
    b.set_workspace({ws.data(), ws.size()});
    std::vector<float> host(8 * 64, 0.5f);
    velora::cuda::device_buffer<float> w(host.size()), g(host.size());
    b.copy_from_host(host.data(), w.data(), 8 * 64);
    b.copy_from_host(host.data(), g.data(), 8 * 64);
    adarank::low_rank_adamw<backend> opt(b);
    const auto id = opt.add_parameter(8, 64, adarank::param_kind::low_rank);
    const auto st = opt.step(id, velora::make_view(w.data(), 8, 64), velora::make_view<const float>(g.data(), 8, 64));
    const bool ok = st == velora::status::ok && opt.layer_state(id).rank == 1 && b.synchronize().ok();
    std::printf("consumer_cuda: one low-rank step on the GPU, rank %ld: %s\n", static_cast<long>(opt.layer_state(id).rank), ok ? "ok" : "WRONG");
    return ok ? 0 : 1;
}
