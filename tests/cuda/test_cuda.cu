// GPU twins of the CPU tests: every backend member, the compressor and the low-rank AdamW run
// on the CUDA backend and are compared with the Eigen backend on the same inputs.
// Exits with 77 (CTest: skipped) when there is no GPU, with 1 when VELORA_REQUIRE_GPU=1 is set
// or the GPU is present but unusable (gpu_gate.hpp). Every comparison fails on NaN (compare.hpp).
//
// Tolerances (relative to the largest magnitude of the reference, or absolute where stated):
//   float 2e-5, double 1e-12 for GEMMs, sub-token kernels, reductions and element-wise updates
//   (different summation order and FMA contraction; nothing else differs);
//   f16/bf16 storage: one unit in the last place of the storage type (a float dot product that
//   differs in its last bit can round to the neighbouring 16-bit value);
//   Gaussian fill: 1e-6 (float) / 1e-13 (double) of gaussian_at (device log/sin/cos are within
//   2 ulp of the host's);
//   QR and SVD: orthonormality to 1e-5 / 1e-12, singular values to 1e-5 / 1e-10;
//   a whole low-rank AdamW run in double: 1e-9.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <velora/cuda.cuh>

#include <velora/backend/eigen.hpp>
#include <velora/compressor.hpp>
#include <velora/layers.hpp>
#include <adarank/adarank.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../spectra.hpp"
#include "../test_util.hpp"
#include "compare.hpp"
#include "gpu_gate.hpp"

using velora::const_matrix_view;
using velora::index_t;
using velora::matrix_view;
using velora::op;
using velora::cuda::cuda_backend;
using velora::cuda::device_buffer;

static_assert(velora::backend<cuda_backend<float>> && velora::backend<cuda_backend<double>>);
static_assert(adarank::optimizer_backend<cuda_backend<float>> && adarank::optimizer_backend<cuda_backend<double>>);
static_assert(adarank::low_rank_optimizer<adarank::low_rank_adamw<cuda_backend<float>>>);
static_assert(velora::activation_compressor<velora::compressor<cuda_backend<float>>>);
// The optimizer keeps 8-bit moments in device memory on this backend (in float); a quantised
// basis is decoded on the host, so its constructor refuses that (low_rank_adamw::checked; the
// CPU twin: test_quantized_basis).
static_assert(adarank::blockwise_state_backend<cuda_backend<float>>);
static_assert(!adarank::blockwise_state_backend<cuda_backend<double>>);
static_assert(!adarank::host_float_backend<cuda_backend<float>>);

namespace {

template <class U>
device_buffer<U> upload(const std::vector<U>& host) {
    device_buffer<U> d(host.size());
    REQUIRE(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(U), cudaMemcpyHostToDevice) == cudaSuccess);
    // From pageable memory cudaMemcpy may return before the data is on the device, and the
    // backend's stream is non-blocking (not ordered after the legacy stream): wait here.
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    return d;
}
template <class U>
std::vector<U> download(const U* device, std::size_t n) {
    std::vector<U> host(n);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(host.data(), device, n * sizeof(U), cudaMemcpyDeviceToHost) == cudaSuccess);
    return host;
}
template <class U>
std::vector<U> download(const device_buffer<U>& d) { return download(d.data(), d.size()); }

// A record stored as f64: its Z and its token count, on the host (to check a failed call left it as it was).
template <class B>
std::vector<double> record_snapshot(const velora::activation_record<B>& r) {
    const auto z = r.template z<double>();
    auto values = download(z.data, static_cast<std::size_t>(z.rows * z.cols));
    values.push_back(static_cast<double>(r.tokens()));
    return values;
}

template <class T>
double tolerance() { return std::is_same_v<T, float> ? 2e-5 : 1e-12; }

// The scalars of one AdamW update at step 3 (lr 1e-2, β 0.9/0.999, ε 1e-8) in either order.
template <class T>
velora::rules::adamw_terms<T> adamw_terms_for(velora::rules::adamw_order order, T decay) {
    velora::rules::adamw_terms<T> t;
    t.order = order;
    t.beta1 = T(0.9);
    t.beta2 = T(0.999);
    t.c1 = order == velora::rules::adamw_order::torch ? T(1 - 0.9) : T(1) - t.beta1;
    t.c2 = order == velora::rules::adamw_order::torch ? T(1 - 0.999) : T(1) - t.beta2;
    t.eps = T(1e-8);
    t.step = order == velora::rules::adamw_order::torch ? T(1e-2 / (1 - std::pow(0.9, 3.0))) : T(0.01);
    t.bias2_sqrt = order == velora::rules::adamw_order::torch ? T(std::sqrt(1 - std::pow(0.999, 3.0))) : T(1);
    t.decay = decay;
    return t;
}

using test::orthonormality_error;
using test::rel_diff;

// The two backends side by side, the CUDA one with a workspace for problems up to 256 x 8192.
template <class T>
struct twins {
    velora::cuda::owned_context ctx;
    device_buffer<std::byte> ws;
    cuda_backend<T> gpu{ctx};
    velora::eigen_backend<T> cpu{1};

    explicit twins(index_t max_rows = 256, index_t max_cols = 8192) {
        ws.resize(gpu.workspace_bytes(max_rows, max_cols));
        gpu.set_workspace({ws.data(), ws.size()});
    }
};

template <class T>
std::vector<T> values(std::size_t n, std::uint64_t seed) { return test::data<T>(n, seed, 0.2); }

} // namespace

TEST_CASE_TEMPLATE("gemm: every transpose combination, strided views, beta = 0 ignores NaN in C", T, float, double) {
    twins<T> t;
    const index_t m = 37, n = 29, k = 53, pad = 3;
    for (op oa : {op::none, op::transpose})
        for (op ob : {op::none, op::transpose})
            for (T beta : {T(0), T(0.5)}) {
                CAPTURE(int(oa));
                CAPTURE(int(ob));
                CAPTURE(beta);
                const index_t ar = oa == op::none ? m : k, ac = oa == op::none ? k : m;
                const index_t br = ob == op::none ? k : n, bc = ob == op::none ? n : k;
                auto ha = values<T>(static_cast<std::size_t>(ar * (ac + pad)), 1), hb = values<T>(static_cast<std::size_t>(br * (bc + pad)), 2);
                auto hc = values<T>(static_cast<std::size_t>(m * (n + pad)), 3);
                if (beta == T(0)) std::fill(hc.begin(), hc.end(), std::numeric_limits<T>::quiet_NaN());
                auto da = upload(ha), db = upload(hb), dc = upload(hc);
                auto cpu_c = hc;
                t.cpu.gemm(oa, ob, T(1.5), {ha.data(), ar, ac, ac + pad}, {hb.data(), br, bc, bc + pad}, beta, {cpu_c.data(), m, n, n + pad});
                t.gpu.gemm(oa, ob, T(1.5), {da.data(), ar, ac, ac + pad}, {db.data(), br, bc, bc + pad}, beta, {dc.data(), m, n, n + pad});
                auto gpu_c = download(dc);
                // The padding columns stay as they were (NaN when beta = 0): compare the matrix only.
                std::vector<T> g, c;
                for (index_t r = 0; r < m; ++r)
                    for (index_t j = 0; j < n; ++j) {
                        g.push_back(gpu_c[static_cast<std::size_t>(r * (n + pad) + j)]);
                        c.push_back(cpu_c[static_cast<std::size_t>(r * (n + pad) + j)]);
                    }
                CHECK(rel_diff(g, c) < tolerance<T>());
            }
}

TEST_CASE("gemm: bad shapes throw std::invalid_argument naming the function before any work") {
    twins<float> t;
    device_buffer<float> a(12), b(12), c(9);
    const std::string msg = test::invalid_argument_message(
        [&] { t.gpu.gemm(op::none, op::none, 1.f, {a.data(), 3, 4}, {b.data(), 3, 4}, 0.f, {c.data(), 3, 3}); });
    CHECK(msg.find("velora::cuda::cuda_backend::gemm: inner dimensions differ") == 0);
}

// Sub-token shapes: vectorised and scalar paths, teams of 1..32 lanes, a partial last group,
// a group made only of padding, and a strided X.
struct subtoken_case {
    index_t tokens, features, groups, pad;
};
static const subtoken_case subtoken_cases[] = {
    // (teams for float; double vectors hold 2 elements, so its teams are twice as wide)
    {64, 1024, 32, 0},   // s = 32: 8-lane teams of float4
    {37, 100, 8, 3},     // s = 13: scalar path, partial last group
    {20, 96, 2, 0},      // s = 48: 16-lane teams, 12 busy (double: 32 lanes, 24 busy)
    {9, 1000, 3, 4},     // s = 334: scalar for float (double2: vectorised), whole warp per sub-token, looping
    {11, 9, 4, 0},       // s = 3: the last group is only padding
    {5, 4096, 4, 0},     // s = 1024: a warp loops over long sub-tokens
};

TEST_CASE_TEMPLATE("project/expand/sum sub-tokens and the SSF column sums match the Eigen backend", T, float, double) {
    twins<T> t;
    for (const auto& sc : subtoken_cases) {
        CAPTURE(sc.features);
        CAPTURE(sc.groups);
        const index_t s = (sc.features + sc.groups - 1) / sc.groups, ld = sc.features + sc.pad;
        auto hx = values<T>(static_cast<std::size_t>(sc.tokens * ld), 10);
        auto hv = values<T>(static_cast<std::size_t>(s), 11);
        auto dx = upload(hx), dv = upload(hv);
        const const_matrix_view<T> cx{hx.data(), sc.tokens, sc.features, ld}, gx{dx.data(), sc.tokens, sc.features, ld};

        std::vector<T> cz(static_cast<std::size_t>(sc.tokens * sc.groups));
        device_buffer<T> dz(cz.size());
        CHECK(t.cpu.project_subtokens(cx, hv.data(), s, matrix_view<T>{cz.data(), sc.tokens, sc.groups}));
        CHECK(t.gpu.project_subtokens(gx, dv.data(), s, matrix_view<T>{dz.data(), sc.tokens, sc.groups}));
        CHECK(rel_diff(download(dz), cz) < tolerance<T>());

        // expand Z back with a scale
        std::vector<T> cout(static_cast<std::size_t>(sc.tokens * sc.features));
        device_buffer<T> dout(cout.size());
        t.cpu.expand_subtokens(const_matrix_view<T>{cz.data(), sc.tokens, sc.groups}, hv.data(), s, T(0.75), matrix_view<T>{cout.data(), sc.tokens, sc.features});
        t.gpu.expand_subtokens(const_matrix_view<T>{dz.data(), sc.tokens, sc.groups}, dv.data(), s, T(0.75), matrix_view<T>{dout.data(), sc.tokens, sc.features});
        CHECK(rel_diff(download(dout), cout) < tolerance<T>());

        std::vector<T> csum(static_cast<std::size_t>(s));
        device_buffer<T> dsum(csum.size());
        t.cpu.sum_subtokens(cx, s, csum.data());
        t.gpu.sum_subtokens(gx, s, dsum.data());
        CHECK(rel_diff(download(dsum), csum) < tolerance<T>());

        std::vector<T> cw(static_cast<std::size_t>(sc.features));
        device_buffer<T> dw(cw.size());
        t.cpu.weighted_subtoken_column_sums(cx, const_matrix_view<T>{cz.data(), sc.tokens, sc.groups}, hv.data(), s, T(0.5), cw.data());
        t.gpu.weighted_subtoken_column_sums(gx, const_matrix_view<T>{dz.data(), sc.tokens, sc.groups}, dv.data(), s, T(0.5), dw.data());
        CHECK(rel_diff(download(dw), cw) < tolerance<T>());

        std::vector<T> ccol(static_cast<std::size_t>(sc.features));
        device_buffer<T> dcol(ccol.size());
        t.cpu.column_sums(cx, ccol.data());
        t.gpu.column_sums(gx, dcol.data());
        CHECK(rel_diff(download(dcol), ccol) < tolerance<T>());
    }
}

TEST_CASE("project_subtokens into f16 and bf16 storage matches to one unit of the storage type; NaN is reported") {
    twins<float> t;
    const index_t tokens = 33, d = 256, g = 16, s = 16;
    auto hx = values<float>(static_cast<std::size_t>(tokens * d), 20);
    auto hv = values<float>(static_cast<std::size_t>(s), 21);
    auto dx = upload(hx), dv = upload(hv);
    auto check_storage = [&](auto tag, double ulp) {
        using U = decltype(tag);
        std::vector<U> cz(static_cast<std::size_t>(tokens * g));
        device_buffer<U> dz(cz.size());
        CHECK(t.cpu.project_subtokens(const_matrix_view<float>{hx.data(), tokens, d}, hv.data(), s, matrix_view<U>{cz.data(), tokens, g}));
        CHECK(t.gpu.project_subtokens(const_matrix_view<float>{dx.data(), tokens, d}, dv.data(), s, matrix_view<U>{dz.data(), tokens, g}));
        const auto gz = download(dz);
        CHECK(test::elementwise_rel_diff(gz, cz, 1e-3, [](U e) { return velora::to_arithmetic<double>(e); }) <= ulp);
        // convert back to float on both backends
        std::vector<float> cwide(cz.size());
        device_buffer<float> dwide(cz.size());
        t.cpu.convert(const_matrix_view<U>{cz.data(), tokens, g}, matrix_view<float>{cwide.data(), tokens, g});
        t.gpu.convert(const_matrix_view<U>{dz.data(), tokens, g}, matrix_view<float>{dwide.data(), tokens, g});
        CHECK(rel_diff(download(dwide), cwide) < 2 * ulp);
    };
    check_storage(velora::half{}, 1.0 / 1024);
    check_storage(velora::bfloat16{}, 1.0 / 128);

    hx[static_cast<std::size_t>(5 * d + 77)] = std::numeric_limits<float>::quiet_NaN();
    auto dnan = upload(hx);
    device_buffer<float> dz(static_cast<std::size_t>(tokens * g));
    CHECK_FALSE(t.gpu.project_subtokens(const_matrix_view<float>{dnan.data(), tokens, d}, dv.data(), s, matrix_view<float>{dz.data(), tokens, g}));
    CHECK(t.gpu.project_subtokens(const_matrix_view<float>{dx.data(), tokens, d}, dv.data(), s, matrix_view<float>{dz.data(), tokens, g}));   // the flag is reset
}

TEST_CASE_TEMPLATE("fill_gaussian reproduces gaussian_at for any offset and length", T, float, double) {
    twins<T> t;
    for (std::uint64_t offset : {0ull, 1ull, 7ull, 1000001ull})
        for (index_t n : {1, 2, 3, 1001}) {
            device_buffer<T> d(static_cast<std::size_t>(n));
            t.gpu.fill_gaussian(42, offset, d.data(), n);
            std::vector<double> expect(static_cast<std::size_t>(n));
            for (index_t i = 0; i < n; ++i) expect[static_cast<std::size_t>(i)] = velora::gaussian_at(42, offset + std::uint64_t(i));
            CHECK(rel_diff(download(d), expect) < (std::is_same_v<T, float> ? 1e-6 : 1e-13));
        }
}

TEST_CASE_TEMPLATE("element-wise kernels and the Frobenius reduction match the Eigen backend on strided views", T, float, double) {
    twins<T> t;
    const index_t rows = 45, cols = 70, ld = 75;
    const std::size_t n = static_cast<std::size_t>(rows * ld);
    auto hg = values<T>(n, 30), hm = values<T>(n, 31), hv = values<T>(n, 32), hw = values<T>(n, 33);
    for (auto& e : hv) e = e * e;   // a second moment is >= 0
    auto view = [&](std::vector<T>& h) { return matrix_view<T>{h.data(), rows, cols, ld}; };
    auto dview = [&](device_buffer<T>& d) { return matrix_view<T>{d.data(), rows, cols, ld}; };

    SUBCASE("sum_of_squares") {
        auto dg = upload(hg);
        const double c = t.cpu.sum_of_squares(view(hg)), g = t.gpu.sum_of_squares(dview(dg));
        CHECK(std::abs(g - c) <= 1e-12 * c);
        hg[100] = std::numeric_limits<T>::infinity();
        auto dinf = upload(hg);
        CHECK_FALSE(std::isfinite(t.gpu.sum_of_squares(dview(dinf))));
    }
    SUBCASE("adam_moments and adamw_update") {
        for (T decay : {T(1), T(0.999)}) {
            auto cm = hm, cv = hv, cw = hw, cn = hg;
            auto dg = upload(hg), dm = upload(hm), dv = upload(hv), dw = upload(hw), dn = upload(hg);
            t.cpu.adam_moments(view(hg), view(cm), view(cv), T(0.9), T(0.999), T(1e-8), view(cn));
            t.gpu.adam_moments(dview(dg), dview(dm), dview(dv), T(0.9), T(0.999), T(1e-8), dview(dn));
            CHECK(rel_diff(download(dm), cm) < tolerance<T>());
            CHECK(rel_diff(download(dv), cv) < tolerance<T>());
            CHECK(rel_diff(download(dn), cn) < 10 * tolerance<T>());
            for (const auto order : {velora::rules::adamw_order::galore, velora::rules::adamw_order::torch}) {
                const auto terms = adamw_terms_for<T>(order, decay);
                auto cw2 = cw, cm2 = cm, cv2 = cv;
                auto dw2 = upload(cw), dm2 = upload(cm), dv2 = upload(cv);
                t.cpu.adamw_update(view(cw2), view(hg), view(cm2), view(cv2), terms);
                t.gpu.adamw_update(dview(dw2), dview(dg), dview(dm2), dview(dv2), terms);
                CHECK(rel_diff(download(dw2), cw2) < tolerance<T>());
                CHECK(rel_diff(download(dm2), cm2) < tolerance<T>());
                CHECK(rel_diff(download(dv2), cv2) < tolerance<T>());
            }
        }
    }
    SUBCASE("square, clamp, scale, fill, set_identity, scale_shift_columns") {
        auto dg = upload(hg), dout = upload(hm);
        auto cout = hm;
        t.cpu.square(view(hg), view(cout));
        t.gpu.square(dview(dg), dview(dout));
        CHECK(rel_diff(download(dout), cout) < tolerance<T>());
        auto cg = hg;
        t.cpu.clamp_nonnegative(view(cg));
        t.gpu.clamp_nonnegative(dview(dg));
        CHECK(download(dg) == cg);
        t.cpu.scale(view(cg), T(-0.25));
        t.gpu.scale(dview(dg), T(-0.25));
        CHECK(download(dg) == cg);
        t.cpu.fill(view(cg), T(3));
        t.gpu.fill(dview(dg), T(3));
        CHECK(download(dg) == cg);
        t.cpu.set_identity(view(cg));
        t.gpu.set_identity(dview(dg));
        CHECK(download(dg) == cg);
        auto hsw = values<T>(static_cast<std::size_t>(cols), 34), hsb = values<T>(static_cast<std::size_t>(cols), 35);
        auto dsw = upload(hsw), dsb = upload(hsb), dx = upload(hw);
        for (int which = 0; which < 4; ++which) {
            const T* cw = which & 1 ? hsw.data() : nullptr;
            const T* cb = which & 2 ? hsb.data() : nullptr;
            auto cy = hw;
            t.cpu.scale_shift_columns(view(hw), cw, cb, view(cy));
            t.gpu.scale_shift_columns(dview(dx), which & 1 ? dsw.data() : nullptr, which & 2 ? dsb.data() : nullptr, dview(dout));
            auto got = download(dout);
            for (index_t r = 0; r < rows; ++r)
                for (index_t c = 0; c < cols; ++c) REQUIRE(std::abs(got[static_cast<std::size_t>(r * ld + c)] - cy[static_cast<std::size_t>(r * ld + c)]) <= tolerance<T>() * 4);
        }
    }
    SUBCASE("canonicalize_row_signs, ties included") {
        auto ch = hg;
        ch[static_cast<std::size_t>(0 * ld + 3)] = T(-9);   // row 0: a unique negative maximum
        ch[static_cast<std::size_t>(1 * ld + 2)] = T(-9);   // row 1: a tie, the first one negative
        ch[static_cast<std::size_t>(1 * ld + 5)] = T(9);
        ch[static_cast<std::size_t>(2 * ld + 2)] = T(9);    // row 2: a tie, the first one positive
        ch[static_cast<std::size_t>(2 * ld + 5)] = T(-9);
        auto dh = upload(ch);
        t.cpu.canonicalize_row_signs(view(ch));
        t.gpu.canonicalize_row_signs(dview(dh));
        CHECK(download(dh) == ch);
        CHECK(ch[static_cast<std::size_t>(0 * ld + 3)] == T(9));
        CHECK(ch[static_cast<std::size_t>(1 * ld + 2)] == T(9));
        CHECK(ch[static_cast<std::size_t>(2 * ld + 2)] == T(9));
    }
}

TEST_CASE_TEMPLATE("orthonormalize_rows: CholeskyQR2 equals the Eigen backend's; rank-deficient blocks take Householder and stay orthonormal", T, float, double) {
    twins<T> t;
    const index_t k = 24, c = 300;
    const double orth_tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
    auto ha = values<T>(static_cast<std::size_t>(k * c), 40);
    auto da = upload(ha);
    t.cpu.orthonormalize_rows(matrix_view<T>{ha.data(), k, c});
    t.gpu.orthonormalize_rows(matrix_view<T>{da.data(), k, c});
    const auto ga = download(da);
    CHECK(orthonormality_error(ga, k, c) < orth_tol);
    CHECK(rel_diff(ga, ha) < (std::is_same_v<T, float> ? 1e-4 : 1e-10));   // Cholesky QR's Q is unique
    CHECK(t.gpu.householder_fallbacks() == 0);   // a well-conditioned block stays on CholeskyQR2

    // Rank-deficient: two equal rows and a zero row. CholeskyQR2 breaks down, Householder runs
    // (counted), and its rows are orthonormal and span every row of the input.
    auto hb = values<T>(static_cast<std::size_t>(k * c), 41);
    std::copy_n(hb.begin(), c, hb.begin() + c);
    std::fill_n(hb.begin() + 2 * c, c, T(0));
    auto db = upload(hb);
    t.gpu.orthonormalize_rows(matrix_view<T>{db.data(), k, c});
    CHECK(t.gpu.householder_fallbacks() == 1);
    const auto gb = download(db);
    CHECK(orthonormality_error(gb, k, c) < 10 * orth_tol);
    CHECK(test::span_residual(hb, k, gb, k, c) < 10 * orth_tol);

    const std::string msg = test::invalid_argument_message([&] { t.gpu.orthonormalize_rows(matrix_view<T>{da.data(), c, k}); });
    CHECK(msg.find("velora::cuda::cuda_backend::orthonormalize_rows: argument 'a' is 300x24") == 0);
}

TEST_CASE_TEMPLATE("gram_svd: singular values and vectors match the Eigen backend, on the device and the host eigensolver", T, float, double) {
    twins<T> t;
    const index_t k = 16, n = 500;
    auto hc = values<T>(static_cast<std::size_t>(k * n), 50);
    auto dc = upload(hc);
    std::vector<T> cu(static_cast<std::size_t>(k * k));
    std::vector<double> csigma(static_cast<std::size_t>(k)), gsigma(static_cast<std::size_t>(k));
    t.cpu.gram_svd(const_matrix_view<T>{hc.data(), k, n}, matrix_view<T>{cu.data(), k, k}, csigma.data());
    for (auto solver : {velora::cuda::small_eigensolver::device, velora::cuda::small_eigensolver::host}) {
        CAPTURE(int(solver));
        t.gpu.set_small_eigensolver(solver);
        device_buffer<T> du(cu.size());
        t.gpu.gram_svd(const_matrix_view<T>{dc.data(), k, n}, matrix_view<T>{du.data(), k, k}, gsigma.data());
        CHECK(rel_diff(gsigma, csigma) < (std::is_same_v<T, float> ? 1e-5 : 1e-10));
        const auto gu = download(du);
        for (index_t i = 0; i < k; ++i) {   // column i agrees up to sign
            double dot = 0;
            for (index_t j = 0; j < k; ++j) dot += double(gu[static_cast<std::size_t>(j * k + i)]) * double(cu[static_cast<std::size_t>(j * k + i)]);
            CHECK(std::abs(std::abs(dot) - 1) < (std::is_same_v<T, float> ? 1e-4 : 1e-9));
        }
    }
}

TEST_CASE("workspace: calls that need more than the backend has throw std::invalid_argument with both sizes; none set is the same") {
    velora::cuda::owned_context ctx;
    cuda_backend<float> gpu(ctx);
    device_buffer<float> x(64 * 64);
    REQUIRE(cudaMemset(x.data(), 0, 64 * 64 * sizeof(float)) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);   // the legacy-stream memset before the backend's stream reads x
    const std::string none = test::invalid_argument_message([&] { (void)gpu.sum_of_squares(const_matrix_view<float>{x.data(), 64, 64}); });
    CHECK(none.find("velora::cuda::cuda_backend::sum_of_squares: this call needs a workspace of") == 0);
    device_buffer<std::byte> ws(cuda_backend<float>::min_workspace_bytes);
    gpu.set_workspace({ws.data(), ws.size()});
    CHECK(std::isfinite(gpu.sum_of_squares(const_matrix_view<float>{x.data(), 64, 64})));   // the fixed part suffices here
    const std::string small = test::invalid_argument_message([&] { gpu.orthonormalize_rows(matrix_view<float>{x.data(), 8, 512}); });
    CHECK(small.find("velora::cuda::cuda_backend::orthonormalize_rows: this call needs a workspace of") == 0);
    CHECK(small.find("but the backend has 4096") != std::string::npos);
    const std::string tiny = test::invalid_argument_message([&] { gpu.set_workspace({ws.data(), 100}); });
    CHECK(tiny.find("velora::cuda::cuda_backend::set_workspace: the workspace holds 100 bytes") == 0);
    const std::string null_handle = test::invalid_argument_message([&] { cuda_backend<float> bad(velora::cuda::cuda_context{}); });
    CHECK(null_handle.find("velora::cuda::cuda_backend::cuda_backend: context.blas is null") == 0);
}

TEST_CASE_TEMPLATE("layer helpers on the GPU (linear forward with bias, dX, dense dW, db, SSF) match the CPU", T, float, double) {
    twins<T> t;
    const index_t tokens = 50, d = 70, o = 30;
    auto hx = values<T>(static_cast<std::size_t>(tokens * d), 90), hw = values<T>(static_cast<std::size_t>(o * d), 91);
    auto hb = values<T>(static_cast<std::size_t>(o), 92), hdy = values<T>(static_cast<std::size_t>(tokens * o), 93);
    auto hs = values<T>(static_cast<std::size_t>(d), 94), hsb = values<T>(static_cast<std::size_t>(d), 95);
    auto dx = upload(hx), dw = upload(hw), db = upload(hb), ddy = upload(hdy), ds = upload(hs), dsb = upload(hsb);
    const const_matrix_view<T> cx{hx.data(), tokens, d}, gx{dx.data(), tokens, d}, cw{hw.data(), o, d}, gw{dw.data(), o, d};
    const const_matrix_view<T> cdy{hdy.data(), tokens, o}, gdy{ddy.data(), tokens, o};
    auto compare = [&](auto&& cpu_call, auto&& gpu_call, index_t rows, index_t cols) {
        std::vector<T> c(static_cast<std::size_t>(rows * cols));
        device_buffer<T> g(c.size());
        cpu_call(matrix_view<T>{c.data(), rows, cols});
        gpu_call(matrix_view<T>{g.data(), rows, cols});
        CHECK(rel_diff(download(g), c) < tolerance<T>());
    };
    compare([&](matrix_view<T> y) { velora::linear_forward(t.cpu, cx, cw, hb.data(), y); },
            [&](matrix_view<T> y) { velora::linear_forward(t.gpu, gx, gw, db.data(), y); }, tokens, o);
    compare([&](matrix_view<T> y) { velora::linear_input_grad(t.cpu, cdy, cw, y); }, [&](matrix_view<T> y) { velora::linear_input_grad(t.gpu, gdy, gw, y); },
            tokens, d);
    compare([&](matrix_view<T> y) { velora::dense_weight_grad(t.cpu, cdy, cx, y); }, [&](matrix_view<T> y) { velora::dense_weight_grad(t.gpu, gdy, gx, y); },
            o, d);
    compare([&](matrix_view<T> y) { velora::bias_grad(t.cpu, cdy, y.data); }, [&](matrix_view<T> y) { velora::bias_grad(t.gpu, gdy, y.data); }, 1, o);
    compare([&](matrix_view<T> y) { velora::ssf_forward(t.cpu, cx, hs.data(), hsb.data(), y); },
            [&](matrix_view<T> y) { velora::ssf_forward(t.gpu, gx, ds.data(), dsb.data(), y); }, tokens, d);
    compare([&](matrix_view<T> y) { velora::ssf_input_grad(t.cpu, cx, hs.data(), y); }, [&](matrix_view<T> y) { velora::ssf_input_grad(t.gpu, gx, ds.data(), y); },
            tokens, d);
}

TEST_CASE("compressor on the GPU: v, Z, the factored and expanded weight gradient, X̂ and SSF match the CPU; NaN input changes nothing") {
    twins<double> t;
    const index_t tokens = 96, d = 200, o = 48;
    velora::compressor_config cfg;
    cfg.groups = 16;
    cfg.z_storage = velora::storage::f64;   // f32 storage could round a last-bit difference to neighbouring floats
    velora::compressor<cuda_backend<double>> gc(t.gpu, d, cfg);
    velora::compressor<velora::eigen_backend<double>> cc(t.cpu, d, cfg);
    auto hx = values<double>(static_cast<std::size_t>(tokens * d), 60);
    auto hdy = values<double>(static_cast<std::size_t>(tokens * o), 61);
    auto dx = upload(hx), ddy = upload(hdy);
    velora::activation_record<cuda_backend<double>> grec;
    velora::activation_record<velora::eigen_backend<double>> crec;
    CHECK(gc.compress(const_matrix_view<double>{dx.data(), tokens, d}, grec) == velora::status::ok);
    CHECK(cc.compress(const_matrix_view<double>{hx.data(), tokens, d}, crec) == velora::status::ok);
    CHECK(rel_diff(std::vector<double>(gc.v().begin(), gc.v().end()), std::vector<double>(cc.v().begin(), cc.v().end())) < 1e-12);
    CHECK(grec.bytes() == crec.bytes());

    std::vector<double> ca(static_cast<std::size_t>(o * cfg.groups));
    device_buffer<double> da(ca.size());
    gc.gradient_factor(grec, const_matrix_view<double>{ddy.data(), tokens, o}, matrix_view<double>{da.data(), o, cfg.groups});
    cc.gradient_factor(crec, const_matrix_view<double>{hdy.data(), tokens, o}, matrix_view<double>{ca.data(), o, cfg.groups});
    CHECK(rel_diff(download(da), ca) < 1e-12);

    std::vector<double> cdw(static_cast<std::size_t>(o * d));
    device_buffer<double> ddw(cdw.size());
    gc.expand_weight_grad(grec, const_matrix_view<double>{da.data(), o, cfg.groups}, matrix_view<double>{ddw.data(), o, d});
    cc.expand_weight_grad(crec, const_matrix_view<double>{ca.data(), o, cfg.groups}, matrix_view<double>{cdw.data(), o, d});
    CHECK(rel_diff(download(ddw), cdw) < 1e-12);

    std::vector<double> cxhat(static_cast<std::size_t>(tokens * d));
    device_buffer<double> dxhat(cxhat.size());
    gc.reconstruct(grec, matrix_view<double>{dxhat.data(), tokens, d});
    cc.reconstruct(crec, matrix_view<double>{cxhat.data(), tokens, d});
    CHECK(rel_diff(download(dxhat), cxhat) < 1e-12);

    auto hdys = values<double>(static_cast<std::size_t>(tokens * d), 62);
    auto ddys = upload(hdys);
    std::vector<double> cssf(static_cast<std::size_t>(d));
    device_buffer<double> dssf(cssf.size());
    gc.ssf_weight_grad(grec, const_matrix_view<double>{ddys.data(), tokens, d}, dssf.data());
    cc.ssf_weight_grad(crec, const_matrix_view<double>{hdys.data(), tokens, d}, cssf.data());
    CHECK(rel_diff(download(dssf), cssf) < 1e-12);

    // One state format: the GPU compressor's blob loads into a CPU compressor, same v.
    const auto before = gc.save_state();
    velora::compressor<velora::eigen_backend<double>> loaded(t.cpu, d, cfg);
    loaded.load_state(before);
    CHECK(std::equal(loaded.v().begin(), loaded.v().end(), gc.v().begin(), gc.v().end()));
    hx[123] = std::numeric_limits<double>::quiet_NaN();
    auto dnan = upload(hx);
    // A NaN activation is a numerical event: a status, the compressor and the record unchanged.
    const auto z_before = record_snapshot(grec);
    CHECK(gc.compress(const_matrix_view<double>{dnan.data(), tokens, d}, grec) == velora::status::non_finite_input);
    CHECK(gc.save_state() == before);
    CHECK(record_snapshot(grec) == z_before);
}

TEST_CASE("low_rank_adamw on the GPU follows the CPU run step by step (dense and factored gradients, refreshes, adaptive rank)") {
    twins<double> t(64, 512);
    const index_t m = 64, n = 160, g = 16;
    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::adaptive(0.9, 2, 12);   // sketch 22 < 32 = half of 64: the randomized path, warm starts
    cfg.refresh = adarank::refresh_policy::every(7);
    adarank::low_rank_adamw<cuda_backend<double>> gopt(t.gpu, cfg);
    adarank::low_rank_adamw<velora::eigen_backend<double>> copt(t.cpu, cfg);
    const auto gid = gopt.add_parameter(m, n), cid = copt.add_parameter(m, n);
    const auto gfid = gopt.add_parameter(m, n), cfid = copt.add_parameter(m, n);   // fed factored gradients
    auto hw = values<double>(static_cast<std::size_t>(m * n), 70), hwf = hw;
    auto dw = upload(hw), dwf = upload(hw);
    const index_t s = n / g;
    auto hv = values<double>(static_cast<std::size_t>(s), 71);
    double norm = 0;
    for (double e : hv) norm += e * e;
    for (double& e : hv) e /= std::sqrt(norm);
    auto dv = upload(hv);
    for (int step = 0; step < 25; ++step) {
        // A gradient with a decaying spectrum that drifts from step to step.
        auto hg = values<double>(static_cast<std::size_t>(m * n), 100 + std::uint64_t(step));
        for (index_t r = 0; r < m; ++r)
            for (index_t c = 0; c < n; ++c) hg[static_cast<std::size_t>(r * n + c)] *= std::exp(-0.1 * double(r));
        auto dg = upload(hg);
        REQUIRE(gopt.step(gid, matrix_view<double>{dw.data(), m, n}, const_matrix_view<double>{dg.data(), m, n}) ==
                copt.step(cid, matrix_view<double>{hw.data(), m, n}, const_matrix_view<double>{hg.data(), m, n}));
        auto ha = values<double>(static_cast<std::size_t>(m * g), 300 + std::uint64_t(step));
        auto da = upload(ha);
        const velora::factored_gradient<double> gf{const_matrix_view<double>{da.data(), m, g}, dv.data(), s, n, 0.5};
        const velora::factored_gradient<double> cf{const_matrix_view<double>{ha.data(), m, g}, hv.data(), s, n, 0.5};
        REQUIRE(gopt.step(gfid, matrix_view<double>{dwf.data(), m, n}, gf) == copt.step(cfid, matrix_view<double>{hwf.data(), m, n}, cf));
        CHECK(gopt.layer_state(gid).rank == copt.layer_state(cid).rank);
        CHECK(gopt.layer_state(gfid).rank == copt.layer_state(cfid).rank);
    }
    CHECK(gopt.layer_state(gid).refreshes == copt.layer_state(cid).refreshes);
    CHECK(gopt.layer_state(gid).refreshes >= 3);
    CHECK(rel_diff(download(dw), hw) < 1e-9);
    CHECK(rel_diff(download(dwf), hwf) < 1e-9);

    // The state saved on the GPU loads on the CPU (and the other way): one format.
    const auto blob = gopt.save_state();
    adarank::low_rank_adamw<velora::eigen_backend<double>> resumed(t.cpu, cfg);
    resumed.add_parameter(m, n);
    resumed.add_parameter(m, n);
    resumed.load_state(blob);
    CHECK(resumed.layer_state(0).rank == gopt.layer_state(gid).rank);
    CHECK(resumed.save_state() == blob);
    gopt.load_state(copt.save_state());

    // A NaN gradient returns non_finite_input and changes nothing.
    const auto before = gopt.save_state();
    auto hbad = values<double>(static_cast<std::size_t>(m * n), 999);
    hbad[17] = std::numeric_limits<double>::quiet_NaN();
    auto dbad = upload(hbad);
    CHECK(gopt.step(gid, matrix_view<double>{dw.data(), m, n}, const_matrix_view<double>{dbad.data(), m, n}) == velora::status::non_finite_input);
    CHECK(gopt.save_state() == before);
}

TEST_CASE_TEMPLATE("randomized SVD on the GPU: residual within 1.1x of the Eckart-Young optimum on known spectra, both sides", T, float, double) {
    twins<T> t(64, 512);
    const index_t m = 120, n = 200, r = 10;
    std::vector<std::vector<double>> spectra(3, std::vector<double>(static_cast<std::size_t>(m)));
    for (index_t i = 0; i < m; ++i) {
        spectra[0][static_cast<std::size_t>(i)] = std::pow(0.5, double(i));               // fast decay
        spectra[1][static_cast<std::size_t>(i)] = 1.0 / double(i + 1);                    // slow decay
        spectra[2][static_cast<std::size_t>(i)] = std::pow(10.0, -double(i) / 3.0);       // ill-conditioned
    }
    for (const auto side : {adarank::projection_side::left, adarank::projection_side::right}) {
        for (const auto& sigma : spectra) {
            CAPTURE(adarank::to_string(side));
            const Eigen::MatrixXd a = test::with_spectrum(m, n, sigma, 21);
            std::vector<T> rows(static_cast<std::size_t>(m * n));
            for (index_t i = 0; i < m; ++i)
                for (index_t j = 0; j < n; ++j) rows[static_cast<std::size_t>(i * n + j)] = static_cast<T>(a(i, j));
            auto dg = upload(rows);
            adarank::subspace_finder<cuda_backend<T>> finder(t.gpu);
            const adarank::dense_gradient<cuda_backend<T>> grad(t.gpu, const_matrix_view<T>{dg.data(), m, n});
            const adarank::side_matrix<adarank::dense_gradient<cuda_backend<T>>> sm(grad, side);
            const index_t len = sm.len();
            device_buffer<T> basis(static_cast<std::size_t>(r * len));
            std::uint64_t counter = 0;
            const auto rep = finder.find(sm, adarank::rank_policy::fixed(r), sm.norm2(), {}, 7, counter, matrix_view<T>{basis.data(), r, len});
            REQUIRE(rep.rank == r);
            CHECK_FALSE(rep.exact);
            const auto hb = download(basis);
            Eigen::MatrixXd b(r, len);
            for (index_t i = 0; i < r; ++i)
                for (index_t j = 0; j < len; ++j) b(i, j) = double(hb[static_cast<std::size_t>(i * len + j)]);
            const bool left = side == adarank::projection_side::left;
            const Eigen::MatrixXd projected = left ? Eigen::MatrixXd(b.transpose() * (b * a)) : Eigen::MatrixXd((a * b.transpose()) * b);
            double optimal = 0;
            for (std::size_t i = static_cast<std::size_t>(r); i < sigma.size(); ++i) optimal += sigma[i] * sigma[i];
            const double eps = std::is_same_v<T, float> ? 1e-6 : 1e-15;
            CHECK((a - projected).norm() <= 1.1 * std::sqrt(optimal) + 1e3 * eps * a.norm());
            CHECK((b * b.transpose() - Eigen::MatrixXd::Identity(r, r)).cwiseAbs().maxCoeff() < 1e3 * eps);
        }
    }
}

TEST_CASE("the CUDA backend refuses quantised bases at construction and 8-bit moments in double, naming the option; 8-bit moments in float are accepted") {
    twins<float> t(8, 8);
    adarank::optimizer_config c;
    c.basis = adarank::basis_format::int4;
    const std::string msg = test::invalid_argument_message([&] { adarank::low_rank_adamw<cuda_backend<float>> o(t.gpu, c); });
    CHECK(msg.find("config.basis") != std::string::npos);
    c.basis = adarank::basis_format::float32;
    c.state = adarank::state_format::int8_blockwise;
    CHECK_NOTHROW((void)adarank::low_rank_adamw<cuda_backend<float>>(t.gpu, c));
    twins<double> d(8, 8);
    const std::string dmsg = test::invalid_argument_message([&] { adarank::low_rank_adamw<cuda_backend<double>> o(d.gpu, c); });
    CHECK(dmsg.find("config.state") != std::string::npos);
    CHECK(dmsg.find("8-byte") != std::string::npos);
}

namespace {

// 8-bit moments of `count` elements in blocks of `block`, on the host and the device.
struct moments8 {
    index_t count, block;
    std::vector<std::uint8_t> qm, qv;
    std::vector<float> am, av;
    device_buffer<std::uint8_t> dqm, dqv;
    device_buffer<float> dam, dav;
    moments8(index_t n, index_t b)
        : count(n), block(b), qm(static_cast<std::size_t>(n), 0), qv(qm), am(static_cast<std::size_t>((n + b - 1) / b), 0.0f), av(am), dqm(upload(qm)),
          dqv(upload(qv)), dam(upload(am)), dav(upload(av)) {}
    velora::rules::adam8_tensor_state host() { return {qm.data(), qv.data(), am.data(), av.data(), count, block}; }
    velora::rules::adam8_tensor_state device() { return {dqm.data(), dqv.data(), dam.data(), dav.data(), count, block}; }
    // The device arrays equal the host ones, bit for bit.
    bool same() const {
        const auto fm = download(dam), fv = download(dav);
        return download(dqm) == qm && download(dqv) == qv && std::memcmp(fm.data(), am.data(), am.size() * sizeof(float)) == 0 &&
               std::memcmp(fv.data(), av.data(), av.size() * sizeof(float)) == 0;
    }
};

// Gradients over three decades with the block [zero_first, zero_first + block) all zero.
std::vector<float> gradient8(index_t n, std::uint64_t seed, index_t zero_first, index_t block) {
    std::vector<float> g = values<float>(static_cast<std::size_t>(n), seed);
    for (index_t i = 0; i < n; ++i) g[static_cast<std::size_t>(i)] *= static_cast<float>(std::pow(10.0, double(i % 7) - 3.0));
    for (index_t i = zero_first; i < std::min(n, zero_first + block); ++i) g[static_cast<std::size_t>(i)] = 0;
    return g;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

} // namespace

TEST_CASE("adam8_update on the GPU gives the CPU backend's bits: dense weights in both orders and the low-rank moments, partial and all-zero blocks") {
    using velora::rules::adam_row_kind;
    twins<float> t(8, 8);
    for (const auto kind : {adam_row_kind::galore_weight, adam_row_kind::torch_weight, adam_row_kind::moments}) {
        for (const auto& [block, tail] : {std::pair<index_t, index_t>{64, 37}, {256, 100}, {4096, 1000}}) {
            CAPTURE(block);
            const index_t n = 5 * block + tail;
            moments8 s(n, block);
            std::vector<float> w = values<float>(static_cast<std::size_t>(n), 11);
            auto dw = upload(w);
            const auto order = kind == adam_row_kind::torch_weight ? velora::rules::adamw_order::torch : velora::rules::adamw_order::galore;
            const auto terms = adamw_terms_for<float>(order, 0.999f);
            for (int step = 0; step < 4; ++step) {
                std::vector<float> g = gradient8(n, 40 + static_cast<std::uint64_t>(step), block, block);
                auto dg = upload(g);
                if (kind == adam_row_kind::moments) {   // n written over the projected gradient, as the low-rank step does
                    REQUIRE(t.cpu.adam8_update(kind, g.data(), g.data(), s.host(), terms));
                    REQUIRE(t.gpu.adam8_update(kind, dg.data(), dg.data(), s.device(), terms));
                    CHECK(same_bits(download(dg), g));
                } else {
                    REQUIRE(t.cpu.adam8_update(kind, g.data(), w.data(), s.host(), terms));
                    REQUIRE(t.gpu.adam8_update(kind, dg.data(), dw.data(), s.device(), terms));
                    CHECK(same_bits(download(dw), w));
                }
                CHECK(s.same());
            }
            CHECK(s.am[1] == 0.0f);   // the all-zero block
            CHECK(s.am[0] > 0.0f);
        }
    }
}

TEST_CASE("adam8 on the GPU: absmax overflow and underflow as on the CPU; a non-finite result is reported and leaves its block's bytes") {
    using velora::rules::adam_row_kind;
    twins<float> t(8, 8);
    const index_t n = 600, block = 256;
    auto c = adamw_terms_for<float>(velora::rules::adamw_order::galore, 1.0f);
    c.c1 = 1.0f;   // m = g exactly
    std::vector<float> g(static_cast<std::size_t>(n), 1e19f), w(static_cast<std::size_t>(n), 0.0f);
    g[3] = -1.8e19f;
    for (index_t i = block; i < 2 * block; ++i) g[static_cast<std::size_t>(i)] = 1e-39f;   // stored as zeros
    moments8 s(n, block);
    auto dg = upload(g);
    auto dw = upload(w);
    REQUIRE(t.cpu.adam8_update(adam_row_kind::galore_weight, g.data(), w.data(), s.host(), c));
    REQUIRE(t.gpu.adam8_update(adam_row_kind::galore_weight, dg.data(), dw.data(), s.device(), c));
    CHECK(s.same());
    CHECK(same_bits(download(dw), w));
    CHECK(s.am[0] == 1.8e19f);
    CHECK(s.am[1] == 0.0f);
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), 3e19f}) {
        std::vector<float> gb(static_cast<std::size_t>(n), 0.5f);
        gb[599] = bad;
        const auto before_q = download(s.dqm);
        const auto before_a = download(s.dam);
        auto dgb = upload(gb);
        CHECK_FALSE(t.gpu.adam8_update(adam_row_kind::galore_weight, dgb.data(), dw.data(), s.device(), c));
        const auto after_q = download(s.dqm);
        const auto after_a = download(s.dam);
        CHECK(after_a[2] == before_a[2]);
        CHECK(std::equal(after_q.begin() + 2 * block, after_q.end(), before_q.begin() + 2 * block));
        s = moments8(n, block);   // the caller discards what was written
    }
    CHECK(test::invalid_argument_message([&] { t.gpu.adam8_update(adam_row_kind::moments, dg.data(), dg.data(), {s.dqm.data(), s.dqv.data(), s.dam.data(), s.dav.data(), n, 4097}, c); })
              .find("block = 4097") != std::string::npos);
}

TEST_CASE("adam8_decode and adam8_encode on the GPU give the CPU's bits (moment transport at a refresh)") {
    twins<float> t(8, 8);
    const index_t n = 3 * 256 + 77, block = 256;
    std::vector<float> x = gradient8(n, 5, block, block);
    auto dx = upload(x);
    for (const auto sign : {velora::rules::code_sign::signed_code, velora::rules::code_sign::unsigned_code}) {
        const auto& code = sign == velora::rules::code_sign::signed_code ? velora::rules::signed_dynamic_code() : velora::rules::unsigned_dynamic_code();
        std::vector<float> y = x;
        if (sign == velora::rules::code_sign::unsigned_code)
            for (float& e : y) e = std::fabs(e);
        auto dy = upload(y);
        std::vector<std::uint8_t> q(static_cast<std::size_t>(n));
        std::vector<float> a(static_cast<std::size_t>((n + block - 1) / block));
        for (index_t b = 0; b * block < n; ++b)
            velora::rules::adam8::encode_block(code, y.data() + b * block, q.data() + b * block, std::min(block, n - b * block), a[static_cast<std::size_t>(b)]);
        device_buffer<std::uint8_t> dq(q.size());
        device_buffer<float> da(a.size()), dout(y.size());
        t.gpu.adam8_encode(sign, dy.data(), n, block, dq.data(), da.data());
        CHECK(download(dq) == q);
        CHECK(same_bits(download(da), a));
        t.gpu.adam8_decode(sign, dq.data(), da.data(), n, block, dout.data());
        std::vector<float> decoded(y.size());
        for (index_t i = 0; i < n; ++i) decoded[static_cast<std::size_t>(i)] = code.decode(q[static_cast<std::size_t>(i)], a[static_cast<std::size_t>(i / block)]);
        CHECK(same_bits(download(dout), decoded));
    }
}

namespace {

// An optimizer with 8-bit moments (blocks of 64: partial last blocks below) on either backend:
// a 64x96 low-rank parameter (rank 8, refresh every 4 steps) and a 45x40 dense one.
adarank::optimizer_config config8() {
    adarank::optimizer_config c = adarank::optimizer_config::galore(8, 4, 0.25);
    c.adam.lr = 1e-2;
    c.transport = adarank::transport_policy::squared_rotation;
    c.state = adarank::state_format::int8_blockwise;
    c.state_block = 64;
    return c;
}
template <class Opt>
void register8(Opt& o) {
    o.add_parameter(64, 96, adarank::param_kind::low_rank);
    o.add_parameter(45, 40, adarank::param_kind::dense);
}

// The same optimizer with 8-bit moments on both backends, parameters registered.
struct optimizers8 {
    twins<float> t{96, 512};
    adarank::optimizer_config c = config8();
    adarank::low_rank_adamw<cuda_backend<float>> gopt{t.gpu, c};
    adarank::low_rank_adamw<velora::eigen_backend<float>> copt{t.cpu, c};
    optimizers8() {
        register8(gopt);
        register8(copt);
    }
};

} // namespace

TEST_CASE("low_rank_adamw with 8-bit moments on the GPU: dense steps give the CPU's bits (certified, on copies, an overflow), low-rank steps "
          "follow it, states move between the backends") {
    optimizers8 o;
    auto& t = o.t;
    auto& gopt = o.gopt;
    auto& copt = o.copt;
    const auto& c = o.c;
    // The dense weight with a row stride of 50: a step on the strided view runs on copies (the
    // exact path), one on the contiguous 45x40 view in place (the certified path).
    auto hl = values<float>(64 * 96, 90), hd = values<float>(45 * 50, 91);
    auto dl = upload(hl), dd = upload(hd);
    for (int step = 0; step < 10; ++step) {
        const bool strided = step % 3 == 2;
        const index_t ld = strided ? 50 : 40;
        auto gl = values<float>(64 * 96, 200 + std::uint64_t(step)), gd = values<float>(45 * 40, 300 + std::uint64_t(step));
        if (step == 5) gd[17] = 3e38f;   // finite, but the update overflows: status::overflow, nothing changes
        auto dgl = upload(gl), dgd = upload(gd);
        const auto cs = copt.step(1, matrix_view<float>{hd.data(), 45, 40, ld}, const_matrix_view<float>{gd.data(), 45, 40});
        const auto gs = gopt.step(1, matrix_view<float>{dd.data(), 45, 40, ld}, const_matrix_view<float>{dgd.data(), 45, 40});
        CHECK(gs == cs);
        CHECK(cs == (step == 5 ? velora::status::overflow : velora::status::ok));
        CHECK(same_bits(download(dd), hd));
        REQUIRE(gopt.step(0, matrix_view<float>{dl.data(), 64, 96}, const_matrix_view<float>{dgl.data(), 64, 96}) ==
                copt.step(0, matrix_view<float>{hl.data(), 64, 96}, const_matrix_view<float>{gl.data(), 64, 96}));
        CHECK(gopt.layer_state(0).rank == copt.layer_state(0).rank);
        CHECK(gopt.layer_state(0).refreshes == copt.layer_state(0).refreshes);
        CHECK(gopt.layer_state(0).state_bytes == copt.layer_state(0).state_bytes);
        CHECK(gopt.layer_state(1).state_bytes == copt.layer_state(1).state_bytes);
    }
    CHECK(copt.layer_state(0).refreshes == 3);   // steps 0, 4 and 8: the 8-bit moments transported twice
    // The low-rank steps differ only by the GEMMs' and sketch's rounding (float tolerance 2e-5),
    // which an 8-bit code can turn into one code step of some moment: within 1e-3 of the weights.
    CHECK(rel_diff(download(dl), hl) < 1e-3);

    // One saved format: the GPU's state loads on the CPU and saves the same bytes, and the CPU's
    // loads on the GPU and saves the same bytes (the 8-bit arrays through device memory).
    const auto gblob = gopt.save_state(), cblob = copt.save_state();
    adarank::low_rank_adamw<velora::eigen_backend<float>> cresumed(t.cpu, c);
    register8(cresumed);
    cresumed.load_state(gblob);
    CHECK(cresumed.save_state() == gblob);
    adarank::low_rank_adamw<cuda_backend<float>> gresumed(t.gpu, c);
    register8(gresumed);
    gresumed.load_state(cblob);
    CHECK(gresumed.save_state() == cblob);
    // From the same loaded state the next dense steps give the same bits again (in place and on copies).
    auto hd2 = hd;
    auto dd2 = upload(hd2);
    for (int step = 0; step < 3; ++step) {
        const index_t ld = step == 1 ? 50 : 40;
        auto gd = values<float>(45 * 40, 400 + std::uint64_t(step));
        auto dgd = upload(gd);
        REQUIRE(copt.step(1, matrix_view<float>{hd2.data(), 45, 40, ld}, const_matrix_view<float>{gd.data(), 45, 40}) == velora::status::ok);
        REQUIRE(gresumed.step(1, matrix_view<float>{dd2.data(), 45, 40, ld}, const_matrix_view<float>{dgd.data(), 45, 40}) == velora::status::ok);
        CHECK(same_bits(download(dd2), hd2));
    }
    // A NaN gradient changes nothing of the GPU's state.
    const auto before = gresumed.save_state();
    auto gbad = values<float>(64 * 96, 999);
    gbad[3] = std::numeric_limits<float>::quiet_NaN();
    auto dbad = upload(gbad);
    CHECK(gresumed.step(0, matrix_view<float>{dl.data(), 64, 96}, const_matrix_view<float>{dbad.data(), 64, 96}) == velora::status::non_finite_input);
    CHECK(gresumed.save_state() == before);
}

TEST_CASE("set_basis with 8-bit moments on the GPU: the moments transported and encoded on the device, as the CPU does") {
    optimizers8 o;
    auto& t = o.t;
    auto& gopt = o.gopt;
    auto& copt = o.copt;
    const auto& c = o.c;
    auto hl = values<float>(64 * 96, 92);
    auto dl = upload(hl);
    auto step_both = [&](std::uint64_t seed) {
        auto g = values<float>(64 * 96, seed);
        auto dg = upload(g);
        REQUIRE(gopt.step(0, matrix_view<float>{dl.data(), 64, 96}, const_matrix_view<float>{dg.data(), 64, 96}) == velora::status::ok);
        REQUIRE(copt.step(0, matrix_view<float>{hl.data(), 64, 96}, const_matrix_view<float>{g.data(), 64, 96}) == velora::status::ok);
    };
    for (std::uint64_t s = 0; s < 3; ++s) step_both(500 + s);
    // Both start from the CPU's state, so the transport reads the same 8-bit moments.
    gopt.load_state(copt.save_state());
    auto basis = std::vector<float>(6 * 64, 0.0f);   // unit vectors (exact in any rounding)
    for (int i = 0; i < 6; ++i) basis[static_cast<std::size_t>(i * 64 + 3 * i)] = 1.0f;
    auto dbasis = upload(basis);
    REQUIRE(gopt.set_basis(0, const_matrix_view<float>{dbasis.data(), 6, 64}) == velora::status::ok);
    REQUIRE(copt.set_basis(0, const_matrix_view<float>{basis.data(), 6, 64}) == velora::status::ok);
    CHECK(gopt.layer_state(0).rank == 6);
    CHECK(gopt.layer_state(0).state_bytes == copt.layer_state(0).state_bytes);
    // The transport's GEMMs may round differently; the rest (decode, encode) is the CPU's.
    adarank::low_rank_adamw<velora::eigen_backend<float>> from_gpu(t.cpu, c);
    register8(from_gpu);
    from_gpu.load_state(gopt.save_state());   // a valid state: finite absmax, an orthonormal basis
    CHECK(from_gpu.layer_state(0).rank == 6);
    step_both(600);
    CHECK(rel_diff(download(dl), hl) < 1e-3);
}

TEST_CASE("GPU runs are reproducible, and steady-state steps grow no buffer") {
    twins<float> t(64, 512);
    const index_t m = 64, n = 256;
    auto hg = values<float>(static_cast<std::size_t>(m * n), 80), hw = values<float>(static_cast<std::size_t>(m * n), 81);
    auto dg = upload(hg);

    // Bit-identical reruns through cold and warm randomized searches (as test_adarank on the CPU).
    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 8);
    cfg.refresh = adarank::refresh_policy::every(2);
    auto run = [&] {
        adarank::low_rank_adamw<cuda_backend<float>> opt(t.gpu, cfg);
        const auto id = opt.add_parameter(m, n, adarank::param_kind::low_rank);
        auto dw = upload(hw);
        for (int i = 0; i < 6; ++i) REQUIRE(opt.step(id, matrix_view<float>{dw.data(), m, n}, const_matrix_view<float>{dg.data(), m, n}) == velora::status::ok);
        CHECK(opt.layer_state(id).last_refresh.warm);
        CHECK_FALSE(opt.layer_state(id).last_refresh.exact);
        return download(dw);
    };
    CHECK(run() == run());

    // Steady state (as test_alloc on the CPU, with capacities instead of an allocation counter):
    // compress, the factored gradient and a low-rank step of each kind leave every buffer the
    // library owns at the size the first steps gave it.
    adarank::optimizer_config steady;
    steady.refresh = adarank::refresh_policy::converged(0.0, 1000, 1000);   // no refresh in the measured steps
    adarank::low_rank_adamw<cuda_backend<float>> opt(t.gpu, steady);
    const auto id = opt.add_parameter(m, n, adarank::param_kind::low_rank);
    const auto fid = opt.add_parameter(m, n, adarank::param_kind::low_rank);
    auto dw = upload(hw), dwf = upload(hw);
    velora::compressor<cuda_backend<float>> comp(t.gpu, n, {.groups = 16});
    velora::activation_record<cuda_backend<float>> rec;
    device_buffer<float> a(static_cast<std::size_t>(m * 16));
    auto step = [&] {
        REQUIRE(comp.compress(const_matrix_view<float>{dg.data(), m, n}, rec) == velora::status::ok);
        comp.gradient_factor(rec, const_matrix_view<float>{dg.data(), m, m}, matrix_view<float>{a.data(), m, 16});
        REQUIRE(opt.step(id, matrix_view<float>{dw.data(), m, n}, const_matrix_view<float>{dg.data(), m, n}) == velora::status::ok);
        REQUIRE(opt.step(fid, matrix_view<float>{dwf.data(), m, n}, comp.factored(rec, const_matrix_view<float>{a.data(), m, 16})) ==
                velora::status::ok);
    };
    step();
    step();
    const std::size_t workspace = opt.workspace_bytes(), state = opt.state_bytes(), record = rec.capacity_bytes();
    for (int i = 0; i < 10; ++i) step();
    CHECK(opt.layer_state(id).refreshes == 1);
    CHECK(opt.workspace_bytes() == workspace);
    CHECK(opt.state_bytes() == state);
    CHECK(rec.capacity_bytes() == record);
}


// ---------------------------------------------------------------- shapes the other tests miss
// Rows past a grid dimension's limits (2049, 4097 and 70000 > 65535), one row (the 1×N launch
// shape), columns that are not a multiple of a warp or of a vector, a sub-token size that is not
// a multiple of 4, and views that start one element past an aligned address (the scalar paths).
// Also run under compute-sanitizer by bench/run_gpu.sh (-tc='*shape sweep*').
TEST_CASE_TEMPLATE("shape sweep: kernels, reductions and GEMM match the Eigen backend for rows 1..70000, odd columns, misaligned views", T, float,
                   double) {
    twins<T> t;
    for (const index_t rows : {index_t{1}, index_t{7}, index_t{2049}, index_t{4097}, index_t{70000}})
        for (const index_t cols : {index_t{1}, index_t{31}, index_t{33}})
            for (const index_t offset : {index_t{0}, index_t{1}}) {
                CAPTURE(rows);
                CAPTURE(cols);
                CAPTURE(offset);
                const index_t ld = cols + 1;   // strided rows
                const std::size_t n = static_cast<std::size_t>(rows * ld + offset);
                auto hx = values<T>(n, 500 + std::uint64_t(rows + cols)), hm = values<T>(n, 501), hv = values<T>(n, 502);
                for (auto& e : hv) e = e * e;
                auto dx = upload(hx), dm = upload(hm), dv = upload(hv);
                const auto cview = [&](std::vector<T>& h) { return matrix_view<T>{h.data() + offset, rows, cols, ld}; };
                const auto gview = [&](device_buffer<T>& d) { return matrix_view<T>{d.data() + offset, rows, cols, ld}; };

                // Whole-matrix reduction: every block of the flat split takes part. A sum of N
                // non-negative double terms in any order is within (N − 1)·u of the exact sum, each
                // square within u of its own: both sides within 2N·u, so 4N·u apart at most.
                const double cs = t.cpu.sum_of_squares(cview(hx)), gs = t.gpu.sum_of_squares(gview(dx));
                CHECK(std::abs(gs - cs) <= 4.0 * double(rows * cols) * 1.12e-16 * cs);

                // Column sums (chunked, deterministic) and the 1×N / 32×8 element-wise launches.
                std::vector<T> ccol(static_cast<std::size_t>(cols));
                device_buffer<T> dcol(ccol.size());
                t.cpu.column_sums(cview(hx), ccol.data());
                t.gpu.column_sums(gview(dx), dcol.data());
                CHECK(rel_diff(download(dcol), ccol) < 10 * tolerance<T>());

                auto cm = hm, cv = hv, cw = hx;
                auto dw = upload(hx);
                t.cpu.adamw_update(cview(cw), cview(hx), cview(cm), cview(cv), adamw_terms_for<T>(velora::rules::adamw_order::galore, T(0.999)));
                t.gpu.adamw_update(gview(dw), gview(dx), gview(dm), gview(dv), adamw_terms_for<T>(velora::rules::adamw_order::galore, T(0.999)));
                CHECK(rel_diff(download(dw), cw) < tolerance<T>());
                CHECK(rel_diff(download(dv), cv) < tolerance<T>());
                t.cpu.scale(cview(cw), T(-0.5));
                t.gpu.scale(gview(dw), T(-0.5));
                CHECK(rel_diff(download(dw), cw) < tolerance<T>());

                // Sign canonicalisation: one block per row, rows past the 65535-block grid loop. The
                // same bits on both sides first (a near tie of two magnitudes could otherwise flip
                // a row on one side only), then the same bits after.
                auto dsame = upload(cw);
                t.cpu.canonicalize_row_signs(cview(cw));
                t.gpu.canonicalize_row_signs(gview(dsame));
                CHECK(download(dsame) == cw);

                // Xᵀ·X through cuBLAS on a long, strided, misaligned operand, against the exact
                // product (in double) within the worst-case bound of any summation order of k
                // terms in T: |error| <= γ_k·(|X|ᵀ|X|), γ_k = k·u / (1 − k·u). A wrong stride or
                // offset gives errors of the size of the entries, far above it.
                device_buffer<T> dg(static_cast<std::size_t>(cols * cols));
                t.gpu.gemm(op::transpose, op::none, T(1), gview(dx), gview(dx), T(0), matrix_view<T>{dg.data(), cols, cols});
                const auto gg = download(dg);
                const double u = std::numeric_limits<T>::epsilon() / 2, gamma = double(rows) * u / (1 - double(rows) * u);
                double worst_excess = 0;   // max (|error| − bound), NaN-aware
                for (index_t i = 0; i < cols; ++i)
                    for (index_t j = 0; j < cols; ++j) {
                        double exact = 0, magnitude = 0;
                        for (index_t r = 0; r < rows; ++r) {
                            const double a = hx[static_cast<std::size_t>(offset + r * ld + i)], b = hx[static_cast<std::size_t>(offset + r * ld + j)];
                            exact += a * b;
                            magnitude += std::abs(a * b);
                        }
                        const double got = gg[static_cast<std::size_t>(i * cols + j)];
                        const double excess = std::isfinite(got) ? std::abs(got - exact) - gamma * magnitude : 1.0;
                        worst_excess = std::max(worst_excess, excess);
                    }
                CHECK(worst_excess <= 0);

                // Sub-tokens: s = ceil(cols / groups) = 1, 8, 11 or 17 (not a multiple of 4),
                // the scalar path on the misaligned view; with and without the finiteness report.
                const index_t groups = cols >= 3 ? 3 : 1, s = (cols + groups - 1) / groups;
                auto hsv = values<T>(static_cast<std::size_t>(s), 503);
                auto dsv = upload(hsv);
                std::vector<T> cz(static_cast<std::size_t>(rows * groups));
                device_buffer<T> dz(cz.size()), dz2(cz.size());
                CHECK(t.cpu.project_subtokens(const_matrix_view<T>(cview(hx)), hsv.data(), s, matrix_view<T>{cz.data(), rows, groups}));
                CHECK(t.gpu.project_subtokens(const_matrix_view<T>(gview(dx)), dsv.data(), s, matrix_view<T>{dz.data(), rows, groups}));
                t.gpu.project_subtokens(const_matrix_view<T>(gview(dx)), dsv.data(), s, matrix_view<T>{dz2.data(), rows, groups},
                                        velora::skip_finite_check);
                const auto gz = download(dz);
                CHECK(rel_diff(gz, cz) < tolerance<T>());
                CHECK(download(dz2) == gz);   // the same kernel: the same bits
                std::vector<T> csum(static_cast<std::size_t>(s));
                device_buffer<T> dsum(csum.size());
                t.cpu.sum_subtokens(cview(hx), s, csum.data());
                t.gpu.sum_subtokens(gview(dx), s, dsum.data());
                CHECK(rel_diff(download(dsum), csum) < 10 * tolerance<T>());
            }
}

namespace {
// One compressor run on both backends with a narrow Z (storage U differs from T): above 32768
// elements of Z, the GPU converts Z in chunks for the weight gradient.
template <class T, class U>
void compare_narrow_record(velora::storage storage, double storage_ulp) {
    twins<T> t;
    const index_t tokens = 2100, d = 512, o = 64;
    velora::compressor_config cfg;
    cfg.groups = 32;   // T·G = 67200: three chunks
    cfg.z_storage = storage;
    velora::compressor<cuda_backend<T>> gc(t.gpu, d, cfg);
    velora::compressor<velora::eigen_backend<T>> cc(t.cpu, d, cfg);
    auto hx = values<T>(static_cast<std::size_t>(tokens * d), 610), hdy = values<T>(static_cast<std::size_t>(tokens * o), 611);
    auto dx = upload(hx), ddy = upload(hdy);
    velora::activation_record<cuda_backend<T>> grec;
    velora::activation_record<velora::eigen_backend<T>> crec;
    REQUIRE(gc.compress(const_matrix_view<T>{dx.data(), tokens, d}, grec) == velora::status::ok);
    REQUIRE(cc.compress(const_matrix_view<T>{hx.data(), tokens, d}, crec) == velora::status::ok);
    REQUIRE(static_cast<std::size_t>(grec.tokens() * grec.groups()) > 32768);
    // Z: each value within one unit of the storage type (a last-bit difference in T can round to
    // the neighbouring narrow value).
    const auto gzv = grec.template z<U>(), czv = crec.template z<U>();
    REQUIRE((gzv.ld == cfg.groups && czv.ld == cfg.groups));
    const auto gz = download(gzv.data, static_cast<std::size_t>(tokens * cfg.groups));
    const std::vector<U> cz(czv.data, czv.data + tokens * cfg.groups);
    CHECK(test::elementwise_rel_diff(gz, cz, 1e-3, [](U e) { return velora::to_arithmetic<double>(e); }) <= storage_ulp);
    // A = dYᵀ·Z: the GPU's chunked conversion and GEMMs against the CPU's product of the same
    // (GPU) Z, so only the arithmetic differs, not the rounding to U.
    std::vector<T> ga(static_cast<std::size_t>(o * cfg.groups));
    device_buffer<T> da(ga.size());
    gc.gradient_factor(grec, const_matrix_view<T>{ddy.data(), tokens, o}, matrix_view<T>{da.data(), o, cfg.groups});
    std::vector<T> zwide(gz.size());
    for (std::size_t i = 0; i < gz.size(); ++i) zwide[i] = velora::to_arithmetic<T>(gz[i]);
    std::vector<T> ca(ga.size());
    t.cpu.gemm(op::transpose, op::none, T(cfg.scale), const_matrix_view<T>{hdy.data(), tokens, o}, const_matrix_view<T>{zwide.data(), tokens, cfg.groups},
               T(0), matrix_view<T>{ca.data(), o, cfg.groups});
    CHECK(rel_diff(download(da), ca) < 10 * tolerance<T>());
}
} // namespace

TEST_CASE("compressor on the GPU with f32, f16 and bf16 records over 32768 elements (the chunked conversion) matches the CPU") {
    compare_narrow_record<float, velora::half>(velora::storage::f16, 1.0 / 1024);
    compare_narrow_record<float, velora::bfloat16>(velora::storage::bf16, 1.0 / 128);
    compare_narrow_record<double, float>(velora::storage::f32, 1.0 / (1 << 23));
    compare_narrow_record<double, velora::half>(velora::storage::f16, 1.0 / 1024);
}

TEST_CASE("handles set up for non-reproducible or reduced-precision results are refused at construction, naming the setting") {
    velora::cuda::owned_context ctx;
    const auto refused = [&] { return test::invalid_argument_message([&] { cuda_backend<float> b(ctx); }); };
    CHECK(refused() == "<no std::invalid_argument thrown>");
    REQUIRE(cublasSetMathMode(ctx.get().blas, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS);
    CHECK(refused().find("velora::cuda::cuda_backend::cuda_backend: the cuBLAS handle's math mode is CUBLAS_TF32_TENSOR_OP_MATH") == 0);
    REQUIRE(cublasSetMathMode(ctx.get().blas, cublasMath_t(CUBLAS_PEDANTIC_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)) ==
            CUBLAS_STATUS_SUCCESS);
    CHECK(refused() == "<no std::invalid_argument thrown>");
    REQUIRE(cublasSetAtomicsMode(ctx.get().blas, CUBLAS_ATOMICS_ALLOWED) == CUBLAS_STATUS_SUCCESS);
    CHECK(refused().find("CUBLAS_ATOMICS_ALLOWED") != std::string::npos);
    REQUIRE(cublasSetAtomicsMode(ctx.get().blas, CUBLAS_ATOMICS_NOT_ALLOWED) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cusolverDnSetDeterministicMode(ctx.get().solver, CUSOLVER_ALLOW_NON_DETERMINISTIC_RESULTS) == CUSOLVER_STATUS_SUCCESS);
    CHECK(refused().find("CUSOLVER_ALLOW_NON_DETERMINISTIC_RESULTS") != std::string::npos);
}

TEST_CASE("the handles are moved to the backend's stream when a host left them elsewhere; results are unchanged") {
    twins<float> t;
    const index_t m = 40, n = 24, k = 56;
    auto ha = values<float>(static_cast<std::size_t>(m * k), 700), hb = values<float>(static_cast<std::size_t>(k * n), 701);
    auto da = upload(ha), db = upload(hb);
    device_buffer<float> c1(static_cast<std::size_t>(m * n)), c2(c1.size());
    t.gpu.gemm(op::none, op::none, 1.f, {da.data(), m, k}, {db.data(), k, n}, 0.f, {c1.data(), m, n});
    REQUIRE(cublasSetStream(t.ctx.get().blas, nullptr) == CUBLAS_STATUS_SUCCESS);   // a host used the handle on the legacy stream
    t.gpu.gemm(op::none, op::none, 1.f, {da.data(), m, k}, {db.data(), k, n}, 0.f, {c2.data(), m, n});
    cudaStream_t bound = nullptr;
    REQUIRE(cublasGetStream(t.ctx.get().blas, &bound) == CUBLAS_STATUS_SUCCESS);
    CHECK(bound == t.ctx.get().stream);
    CHECK(download(c1) == download(c2));
}

TEST_CASE("a 25-step optimizer run gives the same bits while another stream runs SGEMMs on its own handle") {
    twins<float> t(64, 512);
    const index_t m = 64, n = 160, g = 16, s = n / g;
    // The background load: SGEMMs on a second stream and handle, queued before every step and
    // never waited for inside the run.
    velora::cuda::owned_context other;
    const index_t big = 1024;
    auto hbig = values<float>(static_cast<std::size_t>(big * big), 800);
    auto dbig = upload(hbig);
    device_buffer<float> dout(hbig.size());
    REQUIRE(cublasSetStream(other.get().blas, other.get().stream) == CUBLAS_STATUS_SUCCESS);
    const auto load = [&] {
        const float one = 1, zero = 0;
        for (int i = 0; i < 4; ++i)
            REQUIRE(cublasSgemm(other.get().blas, CUBLAS_OP_N, CUBLAS_OP_N, int(big), int(big), int(big), &one, dbig.data(), int(big), dbig.data(),
                                int(big), &zero, dout.data(), int(big)) == CUBLAS_STATUS_SUCCESS);
    };
    auto hv = values<float>(static_cast<std::size_t>(s), 801);
    float norm = 0;
    for (float e : hv) norm += e * e;
    for (float& e : hv) e /= std::sqrt(norm);
    const auto dv = upload(hv);
    const auto hw = values<float>(static_cast<std::size_t>(m * n), 802);
    const auto run = [&](bool loaded) {
        adarank::optimizer_config cfg;
        cfg.rank = adarank::rank_policy::adaptive(0.5, 2, 12);
        cfg.refresh = adarank::refresh_policy::every(5);
        adarank::low_rank_adamw<cuda_backend<float>> opt(t.gpu, cfg);
        const auto id = opt.add_parameter(m, n), fid = opt.add_parameter(m, n);
        auto dw = upload(hw), dwf = upload(hw);
        for (int step = 0; step < 25; ++step) {
            auto hg = values<float>(static_cast<std::size_t>(m * n), 900 + std::uint64_t(step));
            for (index_t r = 0; r < m; ++r)
                for (index_t c = 0; c < n; ++c) hg[static_cast<std::size_t>(r * n + c)] *= std::exp(-0.1f * float(r));
            auto dg = upload(hg);
            auto ha = values<float>(static_cast<std::size_t>(m * g), 950 + std::uint64_t(step));
            auto da = upload(ha);
            if (loaded) load();
            REQUIRE(opt.step(id, matrix_view<float>{dw.data(), m, n}, const_matrix_view<float>{dg.data(), m, n}) == velora::status::ok);
            const velora::factored_gradient<float> fg{const_matrix_view<float>{da.data(), m, g}, dv.data(), s, n, 0.5f};
            REQUIRE(opt.step(fid, matrix_view<float>{dwf.data(), m, n}, fg) == velora::status::ok);
        }
        CHECK(opt.layer_state(id).refreshes >= 4);
        auto out = download(dw);
        const auto f = download(dwf);
        out.insert(out.end(), f.begin(), f.end());
        return out;
    };
    const auto quiet = run(false);
    CHECK(run(true) == quiet);
    CHECK(run(true) == quiet);
    REQUIRE(cudaStreamSynchronize(other.get().stream) == cudaSuccess);
}


TEST_CASE("copy_from_host has finished with the host memory when it returns; the unchecked projection only queues") {
    twins<float> t;
    // A source the caller overwrites at once (as the optimizer's loader and the compressor do):
    // the device must hold what the source held at the call.
    const std::size_t n = std::size_t{1} << 24;   // 64 MiB, far more than one staging buffer
    std::vector<float> src = values<float>(n, 1000);
    const std::vector<float> expected = src;
    device_buffer<float> d(n);
    t.gpu.copy_from_host(src.data(), d.data(), static_cast<index_t>(n));
    std::fill(src.begin(), src.end(), std::numeric_limits<float>::quiet_NaN());
    CHECK(download(d) == expected);

    // Behind a long GEMM on the backend's stream, the checked projection returns with the stream
    // idle (it waits for its flag), the skip_finite_check overload with the GEMM still queued.
    const index_t big = 4096;
    device_buffer<float> a(static_cast<std::size_t>(big * big)), c(static_cast<std::size_t>(big * big));
    REQUIRE(cudaMemset(a.data(), 0, a.size() * sizeof(float)) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const index_t tokens = 64, features = 256, groups = 8, s = features / groups;
    auto dx = upload(values<float>(static_cast<std::size_t>(tokens * features), 1001));
    auto dv = upload(values<float>(static_cast<std::size_t>(s), 1002));
    device_buffer<float> dz(static_cast<std::size_t>(tokens * groups));
    const auto queue_gemm = [&] {   // 137 GFLOP: milliseconds on any GPU
        t.gpu.gemm(op::none, op::none, 1.f, {a.data(), big, big}, {a.data(), big, big}, 0.f, {c.data(), big, big});
    };
    queue_gemm();
    t.gpu.project_subtokens(const_matrix_view<float>{dx.data(), tokens, features}, dv.data(), s, matrix_view<float>{dz.data(), tokens, groups},
                            velora::skip_finite_check);
    CHECK(cudaStreamQuery(t.ctx.get().stream) == cudaErrorNotReady);
    (void)cudaGetLastError();   // "not ready" is an answer, not an error: not left for the next launch check
    queue_gemm();
    CHECK(t.gpu.project_subtokens(const_matrix_view<float>{dx.data(), tokens, features}, dv.data(), s, matrix_view<float>{dz.data(), tokens, groups}));
    CHECK(cudaStreamQuery(t.ctx.get().stream) == cudaSuccess);
}

int main(int argc, char** argv) {
    if (const int code = test::gpu_gate("test_cuda"); code >= 0) return code;
    doctest::Context context(argc, argv);
    return context.run();
}
