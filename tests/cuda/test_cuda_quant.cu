// GPU twins of test_quant's product tests: NF4 (plain and double-quantised) and bf16 frozen
// weights on the CUDA backend against the same weights on the Eigen backend; and QLoRA /
// VeLoRA+QLoRA: lora_linear<cuda_backend<float>, nf4_frozen_weight<...>> (finetune/lora.hpp),
// whose every member a host uses is compiled here whether or not a GPU exists, against the same
// layer on the Eigen backend. The dequantised
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
#include <velora/finetune/lora.hpp>
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
// The LoRA layer over the GPU's NF4 base is a complete type (its members are instantiated by the
// test below, which compiles without a GPU and runs where one exists).
using gpu_qlora = velora::lora_linear<cuda_backend<float>, velora::nf4_frozen_weight<cuda_backend<float>>>;
using cpu_qlora = velora::lora_linear<velora::eigen_backend<float>, velora::nf4_frozen_weight<velora::eigen_backend<float>>>;
static_assert(sizeof(gpu_qlora) > 0 && sizeof(velora::lora_record<cuda_backend<float>>) > 0);

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

// QLoRA on the GPU: the same layer (NF4 base, bias, A and B, x_a kept or a VeLoRA record) on the
// CUDA and Eigen backends. H, y, dX, dX_a, dA and dB agree to the GEMM tolerance above (float
// 2e-5 relative to the largest reference magnitude; VeLoRA's dA 1e-4: v, Z and the factor go
// through the GPU's reductions in another order as well); the kept bytes are equal.
TEST_CASE("QLoRA and VeLoRA+QLoRA on the GPU: lora_linear over an NF4 base equals the CPU layer") {
    using T = float;
    velora::cuda::owned_context ctx;
    cuda_backend<T> gpu{ctx};
    velora::eigen_backend<T> cpu{1};
    const index_t t = 40, d = 128, o = 48, r = 4, groups = 8;
    const auto w = test::data<float>(static_cast<std::size_t>(o * d), 21);
    const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), o, d), {.block_size = 64, .double_quant = true});
    const auto x = test::data<T>(static_cast<std::size_t>(t * d), 22, 0.5);
    auto xa = x;
    for (std::size_t i = 0; i < xa.size(); i += 7) xa[i] = 0;   // a dropout of x
    const auto dy = test::data<T>(static_cast<std::size_t>(t * o), 23);
    auto b_host = test::data<T>(static_cast<std::size_t>(o * r), 24);
    for (T& v : b_host) v *= T(0.1);
    const auto bias = test::data<T>(static_cast<std::size_t>(o), 25);
    for (velora::lora_keep keep : {velora::lora_keep::input_view, velora::lora_keep::velora}) {
        CAPTURE(static_cast<int>(keep));
        velora::lora_config c;
        c.rank = r;
        c.alpha = 8;
        c.keep = keep;
        c.velora.groups = groups;
        // CPU side.
        std::vector<T> a_c(static_cast<std::size_t>(r * d)), b_c = b_host;
        cpu_qlora lc(cpu, velora::nf4_frozen_weight<velora::eigen_backend<T>>(cpu, q, 7), bias.data(), velora::make_view(a_c.data(), r, d),
                     velora::make_view(b_c.data(), o, r), c);
        lc.init(3);
        b_c = b_host;   // init zeroes B; a non-zero B exercises every product
        lc.reserve(t);
        velora::lora_record<velora::eigen_backend<T>> rc;
        lc.reserve(t, rc);
        std::vector<T> y_c(static_cast<std::size_t>(t * o)), dx_c(static_cast<std::size_t>(t * d)), dxa_c(dx_c.size()), da_c(a_c.size()),
            db_c(b_c.size());
        REQUIRE(lc.forward(velora::make_view(x.data(), t, d), velora::make_view(xa.data(), t, d), velora::make_view(y_c.data(), t, o), rc) ==
                velora::status::ok);
        REQUIRE(lc.backward(rc, velora::make_view(dy.data(), t, o),
                            {.dx = velora::make_view(dx_c.data(), t, d), .dx_adapter = velora::make_view(dxa_c.data(), t, d),
                             .da = velora::make_view(da_c.data(), r, d), .db = velora::make_view(db_c.data(), o, r)}) == velora::status::ok);
        // GPU side, the same A (PEFT's init is a pure function of the seed) and B.
        auto bias_d = to_device(gpu, bias), x_d = to_device(gpu, x), xa_d = to_device(gpu, xa), dy_d = to_device(gpu, dy);
        device_buffer<T> a_d(a_c.size()), b_d(b_c.size());
        gpu_qlora lg(gpu, velora::nf4_frozen_weight<cuda_backend<T>>(gpu, q, 7), bias_d.data(), velora::make_view(a_d.data(), r, d),
                     velora::make_view(b_d.data(), o, r), c);
        lg.init(3);
        gpu.copy_from_host(b_host.data(), b_d.data(), static_cast<index_t>(b_host.size()));
        CHECK(to_host(gpu, a_d) == a_c);
        lg.reserve(t);
        velora::lora_record<cuda_backend<T>> rg;
        lg.reserve(t, rg);
        device_buffer<T> y_d(y_c.size()), dx_d(dx_c.size()), dxa_d(dxa_c.size()), da_d(da_c.size()), db_d(db_c.size()),
            af_d(static_cast<std::size_t>(r * groups));
        REQUIRE(lg.forward(velora::make_view<const T>(x_d.data(), t, d), velora::make_view<const T>(xa_d.data(), t, d),
                           velora::make_view(y_d.data(), t, o), rg) == velora::status::ok);
        const bool vel = keep == velora::lora_keep::velora;
        REQUIRE(lg.backward(rg, velora::make_view<const T>(dy_d.data(), t, o),
                            {.dx = velora::make_view(dx_d.data(), t, d), .dx_adapter = velora::make_view(dxa_d.data(), t, d),
                             .da = velora::make_view(da_d.data(), r, d),
                             .a_factor = vel ? velora::make_view(af_d.data(), r, groups) : velora::matrix_view<T>{},
                             .db = velora::make_view(db_d.data(), o, r)}) == velora::status::ok);
        if (vel) {
            const auto f = lg.factored_a(rg, velora::make_view<const T>(af_d.data(), r, groups));
            CHECK(f.subtoken_size == d / groups);
        }
        CHECK(rg.bytes() == rc.bytes());
        CHECK(lg.kept_bytes(t) == lc.kept_bytes(t));
        CHECK(lg.base().stored_bytes() == q.stored_bytes());
        auto dbl = [](const std::vector<T>& v) { return std::vector<double>(v.begin(), v.end()); };
        CHECK(max_rel_diff(dbl(to_host(gpu, y_d)), dbl(y_c)) <= 2e-5);
        CHECK(max_rel_diff(dbl(to_host(gpu, dx_d)), dbl(dx_c)) <= 2e-5);
        CHECK(max_rel_diff(dbl(to_host(gpu, dxa_d)), dbl(dxa_c)) <= 2e-5);
        CHECK(max_rel_diff(dbl(to_host(gpu, db_d)), dbl(db_c)) <= 2e-5);
        CHECK(max_rel_diff(dbl(to_host(gpu, da_d)), dbl(da_c)) <= (vel ? 1e-4 : 2e-5));
    }
}

int main(int argc, char** argv) {
    if (const int code = test::gpu_gate("test_cuda_quant"); code >= 0) return code;
    doctest::Context context(argc, argv);
    return context.run();
}
