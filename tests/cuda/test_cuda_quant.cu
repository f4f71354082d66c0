// GPU twins of test_quant's product tests: NF4 (plain and double-quantised) and bf16 frozen
// weights on the CUDA backend against the same weights on the Eigen backend. The dequantised
// tiles must be the same bits (nf4_layout.hpp's arithmetic on both sides); the products agree
// to the GEMM tolerance of test_cuda (float 2e-5, double 1e-12, relative to the largest
// magnitude of the reference: cuBLAS and the CPU engine sum in different orders).
// Exits with 77 (CTest: skipped) when there is no GPU, with 1 when VELORA_REQUIRE_GPU=1 is set
// or the GPU is present but unusable (gpu_gate.hpp).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <velora/cuda.cuh>

#include <velora/backend/eigen.hpp>
#include <velora/finetune/frozen_weight.hpp>
#include <velora/quant/half_weight.hpp>
#include <velora/quant/nf4_frozen_weight.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../test_util.hpp"
#include "gpu_gate.hpp"

using velora::index_t;
using velora::cuda::cuda_backend;
using velora::cuda::device_buffer;

static_assert(velora::frozen_weight<velora::nf4_frozen_weight<cuda_backend<float>>>);
static_assert(velora::frozen_weight<velora::nf4_frozen_weight<cuda_backend<double>>>);
static_assert(velora::frozen_weight<velora::bf16_frozen_weight<cuda_backend<float>>>);

namespace {

template <class T>
std::vector<T> to_host(cuda_backend<T>& b, const device_buffer<T>& d) {
    std::vector<T> h(d.size());
    b.copy_to_host(d.data(), h.data(), static_cast<index_t>(h.size()));
    return h;
}

template <class T>
device_buffer<T> to_device(cuda_backend<T>& b, const std::vector<T>& h) {
    device_buffer<T> d(h.size());
    b.copy_from_host(h.data(), d.data(), static_cast<index_t>(h.size()));
    return d;
}

double max_rel_diff(const std::vector<double>& a, const std::vector<double>& ref) {
    double scale = 0, diff = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        scale = std::max(scale, std::abs(ref[i]));
        diff = std::isnan(a[i]) ? INFINITY : std::max(diff, std::abs(a[i] - ref[i]));
    }
    return scale == 0 ? diff : diff / scale;
}

template <class T, class GpuWeight, class CpuWeight>
void compare_products(cuda_backend<T>& gpu, velora::eigen_backend<T>& cpu, const GpuWeight& g, const CpuWeight& c, index_t tokens) {
    const index_t rows = c.rows(), cols = c.cols();
    const auto x = test::data<T>(static_cast<std::size_t>(tokens * cols), 3);
    const auto dy = test::data<T>(static_cast<std::size_t>(tokens * rows), 4);
    std::vector<T> y(static_cast<std::size_t>(tokens * rows)), dx(static_cast<std::size_t>(tokens * cols)), ws(c.workspace_elements());
    c.forward(cpu, velora::make_view(x.data(), tokens, cols), velora::make_view(y.data(), tokens, rows), std::span<T>(ws));
    c.input_grad(cpu, velora::make_view(dy.data(), tokens, rows), velora::make_view(dx.data(), tokens, cols), std::span<T>(ws));
    auto dxd = to_device(gpu, x), dyd = to_device(gpu, dy);
    device_buffer<T> yd(y.size()), dxo(dx.size()), wsd(g.workspace_elements());
    g.forward(gpu, velora::make_view<const T>(dxd.data(), tokens, cols), velora::make_view(yd.data(), tokens, rows), std::span<T>(wsd.data(), wsd.size()));
    g.input_grad(gpu, velora::make_view<const T>(dyd.data(), tokens, rows), velora::make_view(dxo.data(), tokens, cols),
                 std::span<T>(wsd.data(), wsd.size()));
    const auto yh = to_host(gpu, yd), dxh = to_host(gpu, dxo);
    const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
    CHECK(max_rel_diff(std::vector<double>(yh.begin(), yh.end()), std::vector<double>(y.begin(), y.end())) <= tol);
    CHECK(max_rel_diff(std::vector<double>(dxh.begin(), dxh.end()), std::vector<double>(dx.begin(), dx.end())) <= tol);
}

} // namespace

TEST_CASE_TEMPLATE("NF4 on the GPU: the same dequantised bits as the CPU, products within the GEMM tolerance", T, float, double) {
    velora::cuda::owned_context ctx;
    cuda_backend<T> gpu{ctx};
    velora::eigen_backend<T> cpu{1};
    for (bool dq : {false, true}) {
        CAPTURE(dq);
        const index_t rows = 300, cols = 128;
        auto w = test::data<float>(static_cast<std::size_t>(rows * cols), 9);
        std::fill_n(w.begin(), 16, 0.0f);   // a zero block
        const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = 16, .double_quant = dq});
        for (index_t tile : {index_t{0}, index_t{7}}) {
            const velora::nf4_frozen_weight<cuda_backend<T>> g(gpu, q, tile);
            const velora::nf4_frozen_weight<velora::eigen_backend<T>> c(cpu, q, tile);
            device_buffer<T> tile_d(static_cast<std::size_t>((rows - 5) * cols));
            gpu.dequantize_nf4(g.blocks(), 5, velora::make_view(tile_d.data(), rows - 5, cols));
            std::vector<T> tile_c(tile_d.size());
            cpu.dequantize_nf4(c.blocks(), 5, velora::make_view(tile_c.data(), rows - 5, cols));
            const auto tile_h = to_host(gpu, tile_d);
            CHECK(std::memcmp(tile_h.data(), tile_c.data(), tile_c.size() * sizeof(T)) == 0);
            compare_products(gpu, cpu, g, c, 9);
        }
    }
    const index_t rows = 23, cols = 50;
    const auto w = test::data<float>(static_cast<std::size_t>(rows * cols), 10);
    const auto bf = velora::bf16_weight::quantize(velora::make_view(w.data(), rows, cols));
    const velora::bf16_frozen_weight<cuda_backend<T>> g(gpu, bf, 4);
    const velora::bf16_frozen_weight<velora::eigen_backend<T>> c(cpu, bf, 4);
    compare_products(gpu, cpu, g, c, 6);
}

int main(int argc, char** argv) {
    if (const int code = test::gpu_gate("test_cuda_quant"); code >= 0) return code;
    doctest::Context context(argc, argv);
    return context.run();
}
