// The backend-independent rules both backends call (include/velora/backend/rules/): the GEMM
// argument checks, CholeskyQR2's acceptance tests and passes, the Gram-SVD assembly and the
// sign rule, each on hand-made inputs; and each through eigen_backend, which uses them.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/backend/eigen.hpp>
#include <velora/backend/rules/cholesky_qr2.hpp>
#include <velora/backend/rules/gemm_arguments.hpp>
#include <velora/backend/rules/gram_svd.hpp>
#include <velora/backend/rules/row_signs.hpp>

#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"

using velora::index_t;
namespace rules = velora::rules;

namespace {
constexpr double qnan = std::numeric_limits<double>::quiet_NaN();

bool accepts(int pass, std::vector<double> d) { return rules::cholesky_qr2_accepts(pass, {d.data(), index_t(d.size()), 1}); }

// The CUDA kernel's arg-max, emulated on the host: `lanes` threads each scan columns
// lane, lane + lanes, ... with the rule, then a tree over the lanes with the same rule.
template <class T>
index_t tree_pivot(const std::vector<T>& row, int lanes) {
    const auto cols = static_cast<index_t>(row.size());
    std::vector<double> best(static_cast<std::size_t>(lanes), -1);
    std::vector<index_t> at(static_cast<std::size_t>(lanes), cols);
    for (int t = 0; t < lanes; ++t)
        for (index_t c = t; c < cols; c += lanes) {
            const double e = std::fabs(static_cast<double>(row[static_cast<std::size_t>(c)]));
            if (rules::row_sign_pivot_beats(e, c, best[std::size_t(t)], at[std::size_t(t)])) {
                best[std::size_t(t)] = e;
                at[std::size_t(t)] = c;
            }
        }
    for (int half = lanes / 2; half > 0; half /= 2)
        for (int t = 0; t < half; ++t)
            if (rules::row_sign_pivot_beats(best[std::size_t(t + half)], at[std::size_t(t + half)], best[std::size_t(t)], at[std::size_t(t)])) {
                best[std::size_t(t)] = best[std::size_t(t + half)];
                at[std::size_t(t)] = at[std::size_t(t + half)];
            }
    return at[0];
}
} // namespace

// ---------------------------------------------------------------- GEMM arguments
TEST_CASE("check_gemm_arguments returns the extents and refuses bad operands") {
    std::vector<double> a(6), b(12), c(8), big(64);
    const velora::const_matrix_view<double> a23(a.data(), 2, 3), b34(b.data(), 3, 4), b43(b.data(), 4, 3);
    using velora::op;
    const auto s = rules::check_gemm_arguments<double>("f", op::none, op::none, a23, b34, velora::matrix_view<double>(c.data(), 2, 4));
    CHECK(s.m == 2);
    CHECK(s.n == 4);
    CHECK(s.k == 3);
    const auto t = rules::check_gemm_arguments<double>("f", op::none, op::transpose, a23, b43, velora::matrix_view<double>(c.data(), 2, 4));
    CHECK((t.m == 2 && t.n == 4 && t.k == 3));
    const auto u = rules::check_gemm_arguments<double>("f", op::transpose, op::none, velora::const_matrix_view<double>(a.data(), 3, 2), b34,
                                                       velora::matrix_view<double>(c.data(), 2, 4));
    CHECK((u.m == 2 && u.n == 4 && u.k == 3));

    const auto msg = [&](auto&& call) { return test::invalid_argument_message(call); };
    CHECK(msg([&] { rules::check_gemm_arguments<double>("f", op::none, op::none, a23, b43, velora::matrix_view<double>(c.data(), 2, 3)); })
              .find("inner dimensions differ: op(a) is 2x3, op(b) is 4x3") != std::string::npos);
    CHECK(msg([&] { rules::check_gemm_arguments<double>("f", op::none, op::none, a23, b34, velora::matrix_view<double>(c.data(), 4, 2)); })
              .find("argument 'c' is 4x2 but op(a)·op(b) is 2x4") != std::string::npos);
    CHECK(msg([&] { rules::check_gemm_arguments<double>("f", op::none, op::none, a23, b34, velora::matrix_view<double>(b.data(), 2, 4)); })
              .find("argument 'c' (2x4) overlaps argument 'b'") != std::string::npos);
    CHECK(msg([&] { rules::check_gemm_arguments<double>("f", op::none, op::none, a23, b34, velora::matrix_view<double>(c.data(), 2, 4, 3)); })
              .find("leading dimension 3 < cols 4") != std::string::npos);
    CHECK(msg([&] { rules::check_gemm_arguments<double>("f", op::none, op::none, a23, b34, velora::matrix_view<double>(nullptr, 2, 4)); })
              .find("null data pointer") != std::string::npos);

    // The CPU backend reports through it (the CUDA backend does too: tests/cuda).
    velora::eigen_backend<double> be(1);
    CHECK(msg([&] { be.gemm(op::none, op::none, 1.0, a23, b43, 0.0, velora::matrix_view<double>(c.data(), 2, 3)); })
              .find("velora::eigen_backend::gemm: inner dimensions differ") != std::string::npos);
    CHECK(msg([&] { be.gemm(op::none, op::none, 1.0, a23, b34, 0.0, velora::matrix_view<double>(a.data(), 2, 4)); })
              .find("overlaps argument 'a'") != std::string::npos);
}

// ---------------------------------------------------------------- CholeskyQR2
TEST_CASE("cholesky_qr2_accepts: pass 1 at 1e-7, pass 2 at 0.5, strictly") {
    CHECK(rules::cholesky_qr2_passes == 2);
    CHECK(rules::cholesky_qr2_diagonal_ratio(0) == 1e-7);
    CHECK(rules::cholesky_qr2_diagonal_ratio(1) == 0.5);
    // Pass 1: min > 1e-7 · max.
    CHECK(accepts(0, {1.0, 2e-7, 0.3}));
    CHECK_FALSE(accepts(0, {1.0, 1e-7, 0.3}));   // equal: refused
    CHECK_FALSE(accepts(0, {1.0, 5e-8}));
    CHECK(accepts(0, {3e-9, 4e-3}) == (3e-9 > 1e-7 * 4e-3));
    // Pass 2: min > 0.5 · max.
    CHECK(accepts(1, {1.0, 0.51, 0.9}));
    CHECK_FALSE(accepts(1, {1.0, 0.5, 0.9}));    // equal: refused
    CHECK_FALSE(accepts(1, {1.0, 2e-7}));        // what pass 1 accepts, pass 2 does not
    CHECK(accepts(1, {0.7}));                    // one row
    // Anything but positive entries is refused, a NaN anywhere included.
    CHECK_FALSE(accepts(0, {1.0, 0.0}));
    CHECK_FALSE(accepts(0, {1.0, -0.5}));
    CHECK_FALSE(accepts(0, {qnan, 1.0}));
    CHECK_FALSE(accepts(0, {1.0, qnan}));
    CHECK_FALSE(accepts(0, {1.0, std::numeric_limits<double>::infinity()}));
    CHECK_FALSE(rules::cholesky_qr2_accepts(0, {}));            // a breakdown
    // The diagonal read in place from a column-major 3×3 factor (stride 4).
    const std::array<double, 9> l{2.0, 0.1, 0.2, 0.0, 1.5, 0.3, 0.0, 0.0, 1.1};
    CHECK(rules::cholesky_qr2_accepts(1, {l.data(), 3, 4}));    // 1.1 > 0.5 · 2
    const std::array<double, 9> l2{2.0, 5.0, 5.0, 0.0, 0.9, 5.0, 0.0, 0.0, 1.1};
    CHECK_FALSE(rules::cholesky_qr2_accepts(1, {l2.data(), 3, 4}));   // 0.9 < 1; the off-diagonal 5s are not read
    static_assert([] {   // usable in constant expressions
        constexpr double yes[2] = {1.0, 0.6}, no[2] = {1.0, 0.4};
        return rules::cholesky_qr2_accepts(1, {yes, 2, 1}) && !rules::cholesky_qr2_accepts(1, {no, 2, 1});
    }());
}

TEST_CASE("cholesky_qr2 runs two passes and stops at the first refusal") {
    std::array<double, 2> good{1.0, 0.9}, pass1_only{1.0, 1e-3};
    auto run = [](std::vector<const std::array<double, 2>*> diagonals, int& factored, int& applied) {
        factored = applied = 0;
        return rules::cholesky_qr2(
            [&] {
                const auto* d = diagonals[std::size_t(factored++)];
                return d ? rules::cholesky_diagonal{d->data(), 2, 1} : rules::cholesky_diagonal{};
            },
            [&] { ++applied; });
    };
    int f = 0, a = 0;
    CHECK(run({&good, &good}, f, a));
    CHECK((f == 2 && a == 2));
    CHECK(run({&pass1_only, &good}, f, a));   // pass 1 tolerates cond ~1e3, pass 2 sees the repaired block
    CHECK((f == 2 && a == 2));
    CHECK_FALSE(run({&good, &pass1_only}, f, a));   // pass 2 needs an almost orthonormal block
    CHECK((f == 2 && a == 1));
    CHECK_FALSE(run({nullptr, &good}, f, a));   // breakdown in pass 1: nothing applied
    CHECK((f == 1 && a == 0));
}

TEST_CASE("eigen_backend::orthonormalize_rows: CholeskyQR2 when accepted, Householder otherwise") {
    velora::eigen_backend<double> be(1);
    // Well conditioned: orthonormal rows spanning the same space.
    std::vector<double> a{2, 0, 0, 1, 1, 3, 0, 0};
    be.orthonormalize_rows(velora::matrix_view<double>(a.data(), 2, 4));
    CHECK(std::abs(a[0] * a[4] + a[1] * a[5] + a[2] * a[6] + a[3] * a[7]) < 1e-15);
    CHECK(std::abs(a[0] * a[0] + a[1] * a[1] + a[2] * a[2] + a[3] * a[3] - 1) < 1e-15);
    CHECK(a[2] == 0.0);   // row 1 had no component along column 2
    // Rank-deficient (equal rows): Cholesky breaks down or is refused; still orthonormal.
    std::vector<double> z{1, 2, 3, 1, 2, 3};
    be.orthonormalize_rows(velora::matrix_view<double>(z.data(), 2, 3));
    CHECK(std::abs(z[0] * z[3] + z[1] * z[4] + z[2] * z[5]) < 1e-14);
    CHECK(std::abs(z[3] * z[3] + z[4] * z[4] + z[5] * z[5] - 1) < 1e-14);
}

// ---------------------------------------------------------------- Gram SVD
TEST_CASE("gram_svd assembly: descending sigma from ascending eigenvalues, clamped at 0, vectors reversed") {
    CHECK(rules::gram_svd_source(3, 0) == 2);
    CHECK(rules::gram_svd_source(3, 2) == 0);
    static_assert(rules::gram_svd_source(5, 1) == 3);
    CHECK(rules::gram_svd_singular_value(-1e-18) == 0.0);   // rounding left a zero's λ negative
    CHECK(rules::gram_svd_singular_value(-4.0) == 0.0);
    CHECK(rules::gram_svd_singular_value(qnan) == 0.0);      // std::max(0, NaN) is 0
    CHECK(rules::gram_svd_singular_value(6.25) == 2.5);

    const std::array<double, 3> ascending{-3e-17, 4.0, 9.0};
    std::array<double, 3> sigma{};
    rules::gram_svd_singular_values(3, ascending.data(), sigma.data());
    CHECK(sigma[0] == 3.0);
    CHECK(sigma[1] == 2.0);
    CHECK(sigma[2] == 0.0);

    // Eigenvectors (columns, ascending) of a known 3×3: u's column i is eigenvector 2 − i.
    const double v[3][3] = {{0.6, 0.0, 0.8}, {0.0, 1.0, 0.0}, {-0.8, 0.0, 0.6}};   // v[j][e]
    std::vector<float> u(3 * 4, -7.0f);                                             // ld 4: column 3 untouched
    rules::gram_svd_left_vectors([&](index_t j, index_t e) { return v[j][e]; }, velora::matrix_view<float>(u.data(), 3, 3, 4));
    for (index_t j = 0; j < 3; ++j) {
        for (index_t i = 0; i < 3; ++i) CHECK(u[std::size_t(j * 4 + i)] == static_cast<float>(v[j][2 - i]));
        CHECK(u[std::size_t(j * 4 + 3)] == -7.0f);
    }
}

TEST_CASE("eigen_backend::gram_svd on known 2x3 matrices, a rank-deficient one included") {
    velora::eigen_backend<double> be(1);
    // C = [[0, 0, 2], [3, 0, 0]]: σ = 3, 2; u's first column is ±e₂, the second ±e₁.
    std::vector<double> c{0, 0, 2, 3, 0, 0}, u(4);
    std::array<double, 2> sigma{};
    be.gram_svd(velora::const_matrix_view<double>(c.data(), 2, 3), velora::matrix_view<double>(u.data(), 2, 2), sigma.data());
    CHECK(sigma[0] == doctest::Approx(3.0).epsilon(1e-15));
    CHECK(sigma[1] == doctest::Approx(2.0).epsilon(1e-15));
    CHECK(std::abs(u[0]) < 1e-15);
    CHECK(std::abs(std::abs(u[2]) - 1) < 1e-15);
    CHECK(std::abs(std::abs(u[1]) - 1) < 1e-15);
    // Equal rows: Gram [[2, 2], [2, 2]], eigenvalues 0 (or a rounding error either side) and 4.
    std::vector<double> r{1, 1, 0, 1, 1, 0};
    be.gram_svd(velora::const_matrix_view<double>(r.data(), 2, 3), velora::matrix_view<double>(u.data(), 2, 2), sigma.data());
    CHECK(sigma[0] == doctest::Approx(2.0).epsilon(1e-15));
    CHECK(sigma[1] >= 0.0);
    CHECK(sigma[1] < 1e-7);
    CHECK(std::abs(std::abs(u[0]) - std::sqrt(0.5)) < 1e-15);
}

// ---------------------------------------------------------------- sign rule
TEST_CASE("row signs: the largest magnitude decides, the first on ties") {
    CHECK(rules::row_sign_pivot_beats(2.0, 5, 1.0, 0));
    CHECK_FALSE(rules::row_sign_pivot_beats(1.0, 0, 2.0, 5));
    CHECK(rules::row_sign_pivot_beats(1.0, 3, 1.0, 5));          // a tie: the earlier column wins,
    CHECK_FALSE(rules::row_sign_pivot_beats(1.0, 5, 1.0, 3));    // whatever order the search meets them in
    CHECK_FALSE(rules::row_sign_pivot_beats(qnan, 1, 1.0, 0));    // a NaN never wins...
    CHECK_FALSE(rules::row_sign_pivot_beats(1.0, 1, qnan, 0));    // ...nor loses to a later entry
    CHECK(rules::row_sign_flips(-0.5));
    CHECK_FALSE(rules::row_sign_flips(0.5));
    CHECK_FALSE(rules::row_sign_flips(-0.0));
    CHECK(rules::row_sign_magnitude(-0.0) == 0.0);

    const double tie_pos[] = {0.5, -0.5}, tie_neg[] = {-0.5, 0.5}, later[] = {0.1, -0.7, 0.7, -0.2};
    CHECK(rules::row_sign_pivot(tie_pos, index_t{2}) == 0);
    CHECK(rules::row_sign_pivot(tie_neg, index_t{2}) == 0);
    CHECK(rules::row_sign_pivot(later, index_t{4}) == 1);
    static_assert([] {
        constexpr float r[] = {0.25f, -1.0f, 1.0f};
        return rules::row_sign_pivot(r, 3) == 1 && rules::row_sign_flips(r[1]);
    }());

    // eigen_backend applies the rule row by row.
    velora::eigen_backend<double> be(1);
    std::vector<double> a{0.5, -0.5, 0.0, -0.5, 0.5, 0.0, 0.1, -0.7, 0.7, 0.3, 0.0, -0.2};
    be.canonicalize_row_signs(velora::matrix_view<double>(a.data(), 4, 3));
    const std::vector<double> want{0.5, -0.5, 0.0, 0.5, -0.5, -0.0, -0.1, 0.7, -0.7, 0.3, 0.0, -0.2};
    CHECK(a == want);
}

TEST_CASE("row signs: the CUDA kernel's tree reduction with the rule finds the sequential scan's pivot") {
    // Rows full of ties (values from a small set), scanned by 1, 2, 8 and 256 lanes.
    for (std::uint64_t seed = 1; seed <= 200; ++seed) {
        const auto cols = static_cast<std::size_t>(1 + seed % 37);
        std::vector<float> row(cols);
        for (std::size_t c = 0; c < cols; ++c) row[c] = static_cast<float>(std::round(2 * velora::gaussian_at(seed, c))) / 2;
        const index_t want = rules::row_sign_pivot(row.data(), static_cast<index_t>(cols));
        for (int lanes : {1, 2, 8, 256}) CHECK(tree_pivot(row, lanes) == want);
    }
}
