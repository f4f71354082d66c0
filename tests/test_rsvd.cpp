// AdaRankGrad building blocks: the backend's QR/SVD kernels, the randomized subspace finder
// against the Eckart–Young optimum on known spectra, warm start, the rank estimator, the
// factored-gradient products, and moment transport.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <adarank/rsvd.hpp>
#include <adarank/transport.hpp>
#include <velora/backend/eigen.hpp>

#include <cmath>
#include <functional>
#include <vector>

#include "galore_reference.hpp"
#include "spectra.hpp"
#include "test_util.hpp"

using velora::index_t;
using Mat = Eigen::MatrixXd;
using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

using test::gaussian_matrix;
using test::random_orthonormal;
using test::with_spectrum;

std::vector<double> spectrum(index_t n, const std::function<double(index_t)>& f) {
    std::vector<double> s(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) s[static_cast<std::size_t>(i)] = f(i);
    return s;
}

template <class T>
std::vector<T> to_rows(const Mat& a) {
    std::vector<T> out(static_cast<std::size_t>(a.size()));
    for (index_t i = 0; i < a.rows(); ++i)
        for (index_t j = 0; j < a.cols(); ++j) out[static_cast<std::size_t>(i * a.cols() + j)] = static_cast<T>(a(i, j));
    return out;
}

template <class T>
Mat from_rows(const T* p, index_t rows, index_t cols) {
    Mat a(rows, cols);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j) a(i, j) = static_cast<double>(p[i * cols + j]);
    return a;
}

template <class T>
constexpr double eps() { return std::is_same_v<T, float> ? 1.2e-7 : 2.3e-16; }

// Runs the finder on A (dense) and returns the basis rows (rank×len) in double.
template <class T, class E = adarank::rank_policy>
Mat find_basis(const Mat& a_d, adarank::projection_side side, E estimator, adarank::rsvd_config cfg = {},
               const Mat* warm = nullptr, adarank::subspace_report* report = nullptr, std::uint64_t seed = 7) {
    using B = velora::eigen_backend<T>;
    B b;
    const auto a = to_rows<T>(a_d);
    adarank::dense_gradient<B> g(b, velora::make_view<const T>(a.data(), a_d.rows(), a_d.cols()));
    adarank::side_matrix m(g, side);
    adarank::subspace_finder<B> finder(b, cfg);
    std::vector<T> basis(static_cast<std::size_t>(m.len() * std::min(m.len(), m.other())));
    std::vector<T> warm_rows = warm ? to_rows<T>(*warm) : std::vector<T>{};
    const velora::const_matrix_view<T> w = warm ? velora::make_view<const T>(warm_rows.data(), warm->rows(), warm->cols())
                                                : velora::const_matrix_view<T>{};
    std::uint64_t counter = 0;
    const auto rep = finder.find(m, estimator, m.norm2(), w, seed, counter, velora::make_view(basis.data(), std::min(m.len(), m.other()), m.len()));
    if (report) *report = rep;
    return from_rows(basis.data(), rep.rank, m.len());
}

double orthonormality_error(const Mat& rows) {
    return (rows * rows.transpose() - Mat::Identity(rows.rows(), rows.rows())).cwiseAbs().maxCoeff();
}

} // namespace

// ------------------------------------------------------------------------------- backend kernels

TEST_CASE_TEMPLATE("orthonormalize_rows gives orthonormal rows spanning the same space, also for rank-deficient input", T, float, double) {
    velora::eigen_backend<T> b;
    for (const int kind : {0, 1, 2, 3}) {   // well-conditioned, repeated + zero row (Householder fallback), zero, cond ~1e5
        CAPTURE(kind);
        Mat a = gaussian_matrix(6, 40, 3);
        if (kind == 1) {
            a.row(2) = a.row(0);
            a.row(5).setZero();
        }
        if (kind == 2) a.setZero();
        if (kind == 3) a.row(4) = a.row(1) + 1e-5 * a.row(4);
        auto rows = to_rows<T>(a);
        b.orthonormalize_rows(velora::make_view(rows.data(), 6, 40));
        const Mat q = from_rows(rows.data(), 6, 40);
        CHECK(orthonormality_error(q) < 100 * eps<T>());
        // Same row space: projecting A onto span(Q) changes nothing (CholeskyQR in double keeps
        // the span to ~1e-16·cond(A), which is below float rounding for any cond(A) it accepts).
        const double cond = kind == 3 ? 1e5 : 1.0;
        CHECK((a - a * q.transpose() * q).norm() <= std::max(1e3 * eps<T>(), 1e-15 * cond) * std::max(1.0, a.norm()));
    }
}

TEST_CASE_TEMPLATE("gram_svd: singular values and left singular vectors of a wide matrix; sum_of_squares; canonical signs", T, float, double) {
    velora::eigen_backend<T> b;
    const Mat a = with_spectrum(9, 30, spectrum(9, [](index_t i) { return 9.0 - double(i); }), 11);
    const auto rows = to_rows<T>(a);
    std::vector<T> u(81);
    std::vector<double> sigma(9);
    b.gram_svd(velora::make_view<const T>(rows.data(), 9, 30), velora::make_view(u.data(), 9, 9), sigma.data());
    const Mat um = from_rows(u.data(), 9, 9);
    for (int i = 0; i < 9; ++i) CHECK(sigma[i] == doctest::Approx(9.0 - i).epsilon(1e2 * eps<T>()));
    const Mat s2 = Eigen::Map<Eigen::VectorXd>(sigma.data(), 9).array().square().matrix().asDiagonal();
    CHECK((um * s2 * um.transpose() - a * a.transpose()).norm() < 1e2 * eps<T>() * (a * a.transpose()).norm());
    CHECK(orthonormality_error(um) < 1e2 * eps<T>());
    CHECK(b.sum_of_squares(velora::make_view<const T>(rows.data(), 9, 30)) == doctest::Approx(a.squaredNorm()).epsilon(1e-6));

    std::vector<T> r = {T(1), T(-3), T(2), T(-0.5), T(0.25), T(0.5)};
    b.canonicalize_row_signs(velora::make_view(r.data(), 2, 3));
    CHECK(r == std::vector<T>{T(-1), T(3), T(-2), T(0.5), T(-0.25), T(-0.5)});   // ties: the first of equal magnitudes decides
}

TEST_CASE("adam_moments and adamw_update follow Adam's formulas element by element") {
    velora::eigen_backend<double> b;
    std::vector<double> g = {0.5, -2.0, 0.0, 3.0}, m = {0.1, 0.2, -0.3, 0.0}, v = {0.01, 0.0, 0.04, 1.0}, n(4);
    auto m2 = m, v2 = v;
    b.adam_moments(velora::make_view<const double>(g.data(), 2, 2), velora::make_view(m.data(), 2, 2), velora::make_view(v.data(), 2, 2), 0.9,
                   0.99, 1e-3, velora::make_view(n.data(), 2, 2));
    std::vector<double> w = {1, 2, 3, 4};
    velora::rules::adamw_terms<double> terms;
    terms.c1 = 1 - 0.9;
    terms.c2 = 1 - 0.99;
    terms.eps = 1e-3;
    terms.step = 0.1;
    terms.decay = 0.5;
    b.adamw_update(velora::make_view(w.data(), 2, 2), velora::make_view<const double>(g.data(), 2, 2), velora::make_view(m2.data(), 2, 2),
                   velora::make_view(v2.data(), 2, 2), terms);
    const double w0[] = {1, 2, 3, 4};
    for (int i = 0; i < 4; ++i) {
        CAPTURE(i);
        CHECK(m[i] == m2[i]);   // the same moment update in both kernels
        CHECK(v[i] == v2[i]);
        CHECK(n[i] == doctest::Approx(m[i] / (std::sqrt(v[i]) + 1e-3)).epsilon(1e-14));
        CHECK(w[i] == doctest::Approx(0.5 * (w0[i] - 0.1 * n[i])).epsilon(1e-14));
    }
    CHECK(m[1] == doctest::Approx(0.9 * 0.2 + 0.1 * -2.0));
    CHECK(v[3] == doctest::Approx(0.99 * 1.0 + 0.01 * 9.0));
}

TEST_CASE_TEMPLATE("adamw_update in torch's order: torch::optim::AdamW's sequence of operations, bit for bit in every lane and the tail", T, float, double) {
    // Rows of 37 (two or four AVX-512 packets and a scalar tail), the second row starting at an
    // odd offset: every element must equal the scalar sequence written out here.
    velora::eigen_backend<T> b;
    const index_t rows = 3, cols = 37, ld = 41;
    std::vector<T> g(rows * ld), m(rows * ld), v(rows * ld), w(rows * ld);
    for (std::size_t i = 0; i < g.size(); ++i) {
        const double x = static_cast<double>(i);
        g[i] = T(std::sin(0.7 * x) * 3.0);
        m[i] = T(std::cos(1.3 * x) * 0.2);
        v[i] = T(0.05 + 0.04 * std::sin(0.3 * x) * std::sin(0.3 * x));
        w[i] = T(1.0 + 0.5 * std::cos(0.11 * x));
    }
    const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.1;
    const std::uint64_t t = 7;
    velora::rules::adamw_terms<T> terms;
    terms.order = velora::rules::adamw_order::torch;
    terms.beta1 = T(beta1);
    terms.beta2 = T(beta2);
    terms.c1 = T(1 - beta1);
    terms.c2 = T(1 - beta2);
    terms.eps = T(eps);
    terms.step = T(lr / (1 - std::pow(beta1, double(t))));
    terms.bias2_sqrt = T(std::sqrt(1 - std::pow(beta2, double(t))));
    terms.decay = T(1 - lr * wd);
    auto m_ref = m, v_ref = v, w_ref = w;
    for (index_t r = 0; r < rows; ++r)
        for (index_t c = 0; c < cols; ++c) {
            const std::size_t i = static_cast<std::size_t>(r * ld + c);
            volatile T decayed = w_ref[i] * terms.decay;   // p.mul_(1 - lr*wd): its own pass, rounded (volatile: not fused into the add below)
            T wi = decayed;
            // velora::cpu::fused: a·b + c rounded once where the machine has an FMA instruction (as
            // torch's vectorised kernels then do), twice where it has none (the sanitizer build).
            const T mi = velora::cpu::fused(g[i], terms.c1, m_ref[i] * terms.beta1);   // exp_avg.mul_(b1).add_(g, 1 - b1)
            const T vi = velora::cpu::fused(terms.c2 * g[i], g[i], v_ref[i] * terms.beta2);   // exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
            const T denom = std::sqrt(vi) / terms.bias2_sqrt + terms.eps;
            wi = wi + (-terms.step * mi) / denom;                      // p.addcdiv_(m, denom, -lr/bc1)
            m_ref[i] = mi;
            v_ref[i] = vi;
            w_ref[i] = wi;
        }
    // The second row's view starts one element in: the lanes then fall on other addresses.
    b.adamw_update(velora::matrix_view<T>{w.data(), rows, cols, ld}, velora::const_matrix_view<T>{g.data(), rows, cols, ld},
                   velora::matrix_view<T>{m.data(), rows, cols, ld}, velora::matrix_view<T>{v.data(), rows, cols, ld}, terms);
    CHECK(w == w_ref);
    CHECK(m == m_ref);
    CHECK(v == v_ref);
    // The same arrays shifted by one element give the same bits (alignment independence).
    std::vector<T> g2(g.size() + 1), m2(g.size() + 1), v2(g.size() + 1), w2(g.size() + 1);
    std::vector<T> m0(rows * ld), v0(rows * ld), w0(rows * ld);
    for (std::size_t i = 0; i < g.size(); ++i) {
        const double x = static_cast<double>(i);
        m0[i] = T(std::cos(1.3 * x) * 0.2);
        v0[i] = T(0.05 + 0.04 * std::sin(0.3 * x) * std::sin(0.3 * x));
        w0[i] = T(1.0 + 0.5 * std::cos(0.11 * x));
        g2[i + 1] = g[i];
        m2[i + 1] = m0[i];
        v2[i + 1] = v0[i];
        w2[i + 1] = w0[i];
    }
    b.adamw_update(velora::matrix_view<T>{w2.data() + 1, rows, cols, ld}, velora::const_matrix_view<T>{g2.data() + 1, rows, cols, ld},
                   velora::matrix_view<T>{m2.data() + 1, rows, cols, ld}, velora::matrix_view<T>{v2.data() + 1, rows, cols, ld}, terms);
    CHECK(std::vector<T>(w2.begin() + 1, w2.end()) == w_ref);
}

// ------------------------------------------------------------------------------- randomized SVD

TEST_CASE_TEMPLATE("randomized SVD residual is within 1.1x of the Eckart-Young optimum on known spectra", T, float, double) {
    const index_t m = 120, n = 200, r = 10;
    struct named_spectrum { const char* name; std::vector<double> sigma; };
    const std::vector<named_spectrum> cases = {
        {"fast decay 0.5^i", spectrum(m, [](index_t i) { return std::pow(0.5, double(i)); })},
        {"slow decay 1/(i+1)", spectrum(m, [](index_t i) { return 1.0 / double(i + 1); })},
        {"flat", spectrum(m, [](index_t) { return 1.0; })},
        {"rank-deficient (rank 5 < r)", spectrum(5, [](index_t i) { return 3.0 - 0.5 * double(i); })},
        {"ill-conditioned 10^(-i/3)", spectrum(m, [](index_t i) { return std::pow(10.0, -double(i) / 3.0); })},
    };
    for (const auto side : {adarank::projection_side::left, adarank::projection_side::right}) {
        for (const auto& c : cases) {
            CAPTURE(c.name);
            CAPTURE(adarank::to_string(side));
            const Mat a = with_spectrum(m, n, c.sigma, 21);
            adarank::subspace_report rep;
            const Mat basis = find_basis<T>(a, side, adarank::rank_policy::fixed(r), {}, nullptr, &rep);
            const bool left = side == adarank::projection_side::left;
            const double res = ref::projection_residual_rows(a, basis, left);
            const double opt = ref::optimal_residual(a, r);
            CHECK_FALSE(rep.exact);
            CHECK(rep.rank == r);
            CHECK(orthonormality_error(basis) < 1e3 * eps<T>());
            CHECK(res <= 1.1 * opt + 1e3 * eps<T>() * a.norm());
            CHECK(rep.captured <= rep.energy * (1 + 1e-5));
        }
    }
}

TEST_CASE_TEMPLATE("randomized SVD of the zero matrix: orthonormal basis, no NaN, rank r_min", T, float, double) {
    const Mat a = Mat::Zero(50, 70);
    adarank::subspace_report rep;
    const Mat basis = find_basis<T>(a, adarank::projection_side::left, adarank::rank_policy::adaptive(0.1, 2, 8), {}, nullptr, &rep);
    CHECK(rep.rank == 2);
    CHECK(basis.allFinite());
    CHECK(orthonormality_error(basis) < 1e3 * eps<T>());
}

TEST_CASE("exact path: small matrices (and exact_fraction = 0) give the SVD's subspace, for both len <= other and len > other") {
    const Mat a = with_spectrum(30, 12, spectrum(12, [](index_t i) { return 1.0 + 11.0 - double(i); }), 5);
    for (const auto side : {adarank::projection_side::left, adarank::projection_side::right}) {
        adarank::rsvd_config cfg;
        cfg.exact_fraction = 0.0;
        adarank::subspace_report rep;
        const Mat basis = find_basis<double>(a, side, adarank::rank_policy::fixed(4), cfg, nullptr, &rep);
        CHECK(rep.exact);
        const bool left = side == adarank::projection_side::left;
        CHECK(ref::projection_residual_rows(a, basis, left) == doctest::Approx(ref::optimal_residual(a, 4)).epsilon(1e-10));
        // The exact basis is the SVD's, with canonical signs.
        Mat expected = ref::galore_basis(a, 4, left);
        if (left) expected.transposeInPlace();
        CHECK((basis - expected).cwiseAbs().maxCoeff() < 1e-10);
    }
    // A sketch covering more than half of min(m, n) switches to the exact path by default.
    adarank::subspace_report rep;
    find_basis<double>(a, adarank::projection_side::left, adarank::rank_policy::fixed(4), {}, nullptr, &rep);
    CHECK(rep.exact);
}

TEST_CASE("warm start needs fewer power iterations than a cold start for a slowly rotating subspace") {
    // Slow spectral decay makes a cold range finder need power iterations; the subspace then
    // rotates a little (a few degrees) between two gradients.
    const index_t m = 150, n = 300, r = 12;
    const auto sigma = spectrum(m, [](index_t i) { return 1.0 / std::sqrt(double(i + 1)); });
    const Mat u = random_orthonormal(m, m, 31), v = random_orthonormal(n, m, 32);
    const Eigen::VectorXd s = Eigen::Map<const Eigen::VectorXd>(sigma.data(), m);
    const Mat a1 = u * s.asDiagonal() * v.transpose();
    // Rotate the left singular vectors by a small random rotation: the Cayley transform
    // (I − θK/2)⁻¹(I + θK/2) of a skew-symmetric K is orthogonal.
    Mat k = gaussian_matrix(m, m, 33);
    k = 0.03 * (k - k.transpose()) / std::sqrt(double(m));
    const Mat id = Mat::Identity(m, m);
    const Mat rot = (id - 0.5 * k).partialPivLu().solve(id + 0.5 * k);
    const Mat a2 = rot * a1;
    const Mat previous = find_basis<double>(a1, adarank::projection_side::left, adarank::rank_policy::fixed(r), [] {
        adarank::rsvd_config c;
        c.exact_fraction = 0.0;
        return c;
    }());
    const double opt = ref::optimal_residual(a2, r);
    auto iterations_needed = [&](bool warm) {
        for (int q = 0; q <= 8; ++q) {
            adarank::rsvd_config cfg;
            cfg.power_iterations = q;
            cfg.warm_power_iterations = q;
            const Mat basis = find_basis<double>(a2, adarank::projection_side::left, adarank::rank_policy::fixed(r), cfg,
                                                 warm ? &previous : nullptr);
            if (ref::projection_residual_rows(a2, basis, true) <= 1.01 * opt) return q;
        }
        return 99;
    };
    const int cold = iterations_needed(false), warm = iterations_needed(true);
    MESSAGE("power iterations to reach 1.01x optimal: cold ", cold, ", warm ", warm);
    CHECK(warm < cold);
    CHECK(warm <= 1);
}

TEST_CASE("the finder is reproducible: same seed, same basis; another seed, another sketch") {
    const Mat a = with_spectrum(80, 120, spectrum(80, [](index_t i) { return 1.0 / double(i + 1); }), 3);
    const auto side = adarank::projection_side::left;
    const Mat b1 = find_basis<float>(a, side, adarank::rank_policy::fixed(6), {}, nullptr, nullptr, 1);
    const Mat b2 = find_basis<float>(a, side, adarank::rank_policy::fixed(6), {}, nullptr, nullptr, 1);
    const Mat b3 = find_basis<float>(a, side, adarank::rank_policy::fixed(6), {}, nullptr, nullptr, 2);
    CHECK((b1 - b2).cwiseAbs().maxCoeff() == 0.0);
    CHECK((b1 - b3).cwiseAbs().maxCoeff() > 0.0);
}

// ------------------------------------------------------------------------------- rank estimation

TEST_CASE("rank_policy::estimate: fixed, adaptive threshold, bounds") {
    const std::vector<double> s = {4, 2, 1, 0.5, 0.25};
    const double energy = 16 + 4 + 1 + 0.25 + 0.0625;
    CHECK(adarank::rank_policy::fixed(3).estimate(s, energy, 5) == 3);
    CHECK(adarank::rank_policy::fixed(8).estimate(s, energy, 5) == 5);   // capped by the sketch
    // Residual after r: r=1: 5.3125, r=2: 1.3125, r=3: 0.3125, r=4: 0.0625, r=5: 0
    CHECK(adarank::rank_policy::adaptive(std::sqrt(5.4 / energy), 1, 5).estimate(s, energy, 5) == 1);
    CHECK(adarank::rank_policy::adaptive(std::sqrt(1.4 / energy), 1, 5).estimate(s, energy, 5) == 2);
    CHECK(adarank::rank_policy::adaptive(std::sqrt(0.07 / energy), 1, 5).estimate(s, energy, 5) == 4);
    CHECK(adarank::rank_policy::adaptive(0.0, 1, 5).estimate(s, energy, 5) == 5);
    CHECK(adarank::rank_policy::adaptive(0.9, 2, 5).estimate(s, energy, 5) == 2);   // r_min
    CHECK(adarank::rank_policy::adaptive(0.0, 1, 3).estimate(s, energy, 5) == 3);   // r_max
    CHECK(adarank::rank_policy::adaptive(0.0, 1, 5).estimate(s, 0.0, 5) == 1);      // zero energy: r_min
}

TEST_CASE_TEMPLATE("the adaptive estimator finds the exact rank of synthetic low-rank gradients", T, float, double) {
    for (const index_t true_rank : {1, 3, 7, 16}) {
        CAPTURE(true_rank);
        const Mat a = with_spectrum(90, 140, spectrum(true_rank, [](index_t i) { return 10.0 / double(i + 1); }), 40 + true_rank);
        for (const auto side : {adarank::projection_side::left, adarank::projection_side::right}) {
            adarank::subspace_report rep;
            find_basis<T>(a, side, adarank::rank_policy::adaptive(1e-3, 1, 32), {}, nullptr, &rep);
            CHECK(rep.rank == true_rank);
        }
    }
}

// A user-supplied estimator plugs into the finder through the rank_estimator concept.
struct half_of_sketch {
    index_t max_rank() const { return 20; }
    index_t estimate(std::span<const double> sigma, double, index_t cap) const { return std::min<index_t>(cap, static_cast<index_t>(sigma.size()) / 2); }
};
static_assert(adarank::rank_estimator<half_of_sketch>);
static_assert(adarank::rank_estimator<adarank::rank_policy>);
static_assert(!adarank::rank_estimator<int>);

TEST_CASE("a custom rank estimator is used by the finder") {
    const Mat a = gaussian_matrix(100, 150, 9);
    adarank::subspace_report rep;
    find_basis<double>(a, adarank::projection_side::left, half_of_sketch{}, {}, nullptr, &rep);
    CHECK(rep.sketch == 30);
    CHECK(rep.rank == 15);
}

// ------------------------------------------------------------------------------- factored gradients

TEST_CASE_TEMPLATE("a factored VeLoRA gradient gives the same products and norm as its dense expansion", T, float, double) {
    using B = velora::eigen_backend<T>;
    B b;
    for (const index_t d : {96, 100}) {   // G divides D, and a zero-padded last group
        CAPTURE(d);
        const index_t o = 40, groups = 8, s = (d + groups - 1) / groups, k = 5;
        const auto a = test::data<T>(static_cast<std::size_t>(o * groups), 1);
        auto v = test::data<T>(static_cast<std::size_t>(s), 2);
        double nv = 0;
        for (T x : v) nv += double(x) * double(x);
        for (T& x : v) x = static_cast<T>(x / std::sqrt(nv));
        const velora::factored_gradient<T> f{velora::make_view<const T>(a.data(), o, groups), v.data(), s, d, T(0.7)};
        std::vector<T> dense(static_cast<std::size_t>(o * d));
        b.expand_subtokens(f.a, v.data(), s, f.scale, velora::make_view(dense.data(), o, d));
        typename B::template buffer<T> scratch;
        const adarank::factored_gradient_operator<B> fg(b, f, scratch);
        const adarank::dense_gradient<B> dg(b, velora::make_view<const T>(dense.data(), o, d));
        CHECK(fg.norm2() == doctest::Approx(dg.norm2()).epsilon(1e-5));
        const auto sl = test::data<T>(static_cast<std::size_t>(k * o), 3), sr = test::data<T>(static_cast<std::size_t>(k * d), 4);
        std::vector<T> out_f(static_cast<std::size_t>(k * d)), out_d(out_f.size()), back_f(static_cast<std::size_t>(k * o)), back_d(back_f.size());
        fg.times(velora::make_view<const T>(sl.data(), k, o), velora::make_view(out_f.data(), k, d));
        dg.times(velora::make_view<const T>(sl.data(), k, o), velora::make_view(out_d.data(), k, d));
        fg.times_t(velora::make_view<const T>(sr.data(), k, d), velora::make_view(back_f.data(), k, o));
        dg.times_t(velora::make_view<const T>(sr.data(), k, d), velora::make_view(back_d.data(), k, o));
        const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-12;
        CHECK((from_rows(out_f.data(), k, d) - from_rows(out_d.data(), k, d)).norm() <= tol * from_rows(out_d.data(), k, d).norm());
        CHECK((from_rows(back_f.data(), k, o) - from_rows(back_d.data(), k, o)).norm() <= tol * from_rows(back_d.data(), k, o).norm());
    }
}

// ------------------------------------------------------------------------------- moment transport

namespace {
template <class T>
struct moments {
    index_t r_old, r_new, other;
    std::vector<T> old_basis, new_basis, m_old, v_old, m_new, v_new, r, r2;
    moments(index_t ro, index_t rn, index_t len, index_t oth)
        : r_old(ro), r_new(rn), other(oth), old_basis(static_cast<std::size_t>(ro * len)), new_basis(static_cast<std::size_t>(rn * len)),
          m_old(test::data<T>(static_cast<std::size_t>(ro * oth), 5)), v_old(static_cast<std::size_t>(ro * oth)),
          m_new(static_cast<std::size_t>(rn * oth)), v_new(m_new.size()), r(static_cast<std::size_t>(rn * ro)), r2(r.size()) {
        const auto g = test::data<T>(v_old.size(), 6);
        for (std::size_t i = 0; i < v_old.size(); ++i) v_old[i] = g[i] * g[i];
    }
    void run(velora::eigen_backend<T>& b, adarank::transport_policy p, index_t len) {
        adarank::transport_moments(b, p, velora::make_view<const T>(new_basis.data(), r_new, len), velora::make_view<const T>(old_basis.data(), r_old, len),
                                   velora::make_view<const T>(m_old.data(), r_old, other), velora::make_view<const T>(v_old.data(), r_old, other),
                                   velora::make_view(m_new.data(), r_new, other), velora::make_view(v_new.data(), r_new, other),
                                   velora::make_view(r.data(), r_new, r_old), velora::make_view(r2.data(), r_new, r_old));
    }
};
} // namespace

TEST_CASE_TEMPLATE("transport is exact for a signed permutation of the basis", T, float, double) {
    velora::eigen_backend<T> b;
    const index_t len = 30, rank = 5, other = 17;
    moments<T> mo(rank, rank, len, other);
    const Mat q = random_orthonormal(len, rank, 50).transpose();   // old basis rows
    const int perm[] = {3, 0, 4, 1, 2};
    const double sign[] = {1, -1, -1, 1, -1};
    Mat q_new(rank, len);
    for (int i = 0; i < rank; ++i) q_new.row(i) = sign[i] * q.row(perm[i]);
    mo.old_basis = to_rows<T>(q);
    mo.new_basis = to_rows<T>(q_new);
    for (const auto p : {adarank::transport_policy::squared_rotation, adarank::transport_policy::clamped_rotation}) {
        CAPTURE(adarank::to_string(p));
        mo.run(b, p, len);
        for (int i = 0; i < rank; ++i)
            for (index_t j = 0; j < other; ++j) {
                const std::size_t to = static_cast<std::size_t>(i * other + j), from = static_cast<std::size_t>(perm[i] * other + j);
                CHECK(double(mo.m_new[to]) == doctest::Approx(sign[i] * double(mo.m_old[from])).epsilon(1e3 * eps<T>()));
                if (p == adarank::transport_policy::squared_rotation)   // |R| is a 0/1 matrix: exact
                    CHECK(mo.v_new[to] == doctest::Approx(mo.v_old[from]).epsilon(1e3 * eps<T>()));
            }
    }
}

TEST_CASE_TEMPLATE("transport keeps V >= 0 for any rotation, also when the rank changes", T, float, double) {
    velora::eigen_backend<T> b;
    const index_t len = 40, other = 23;
    for (const auto& [r_old, r_new] : {std::pair<index_t, index_t>{6, 6}, {6, 3}, {3, 8}}) {
        CAPTURE(r_old);
        CAPTURE(r_new);
        moments<T> mo(r_old, r_new, len, other);
        mo.old_basis = to_rows<T>(Mat(random_orthonormal(len, r_old, 60).transpose()));
        mo.new_basis = to_rows<T>(Mat(random_orthonormal(len, r_new, 61).transpose()));
        for (const auto p : {adarank::transport_policy::squared_rotation, adarank::transport_policy::clamped_rotation}) {
            mo.run(b, p, len);
            for (T x : mo.v_new) CHECK(x >= T(0));
        }
        // Squared rotation never inflates the total: rows of R∘R sum to at most 1.
        mo.run(b, adarank::transport_policy::squared_rotation, len);
        double before = 0, after = 0;
        for (T x : mo.v_old) before += x;
        for (T x : mo.v_new) after += x;
        CHECK(after <= before * (1 + 1e3 * eps<T>()));
    }
}

TEST_CASE("transport none keeps the moments bit for bit (rows cut or zero-padded), reset zeroes them") {
    velora::eigen_backend<float> b;
    const index_t len = 20, other = 9;
    moments<float> mo(4, 6, len, other);
    mo.old_basis = to_rows<float>(Mat(random_orthonormal(len, 4, 70).transpose()));
    mo.new_basis = to_rows<float>(Mat(random_orthonormal(len, 6, 71).transpose()));
    mo.run(b, adarank::transport_policy::none, len);
    for (index_t i = 0; i < 6; ++i)
        for (index_t j = 0; j < other; ++j) {
            const auto at = static_cast<std::size_t>(i * other + j);
            CHECK(mo.m_new[at] == (i < 4 ? mo.m_old[at] : 0.0f));
            CHECK(mo.v_new[at] == (i < 4 ? mo.v_old[at] : 0.0f));
        }
    mo.run(b, adarank::transport_policy::reset, len);
    for (std::size_t i = 0; i < mo.m_new.size(); ++i) CHECK((mo.m_new[i] == 0.0f && mo.v_new[i] == 0.0f));
}

TEST_CASE("transport_moments rejects mismatched shapes with a clear message") {
    velora::eigen_backend<float> b;
    moments<float> mo(4, 4, 20, 9);
    const auto msg = test::invalid_argument_message([&] {
        adarank::transport_moments(b, adarank::transport_policy::squared_rotation, velora::make_view<const float>(mo.new_basis.data(), 4, 20),
                                   velora::make_view<const float>(mo.old_basis.data(), 4, 19), velora::make_view<const float>(mo.m_old.data(), 4, 9),
                                   velora::make_view<const float>(mo.v_old.data(), 4, 9), velora::make_view(mo.m_new.data(), 4, 9),
                                   velora::make_view(mo.v_new.data(), 4, 9), velora::make_view(mo.r.data(), 4, 4), velora::make_view(mo.r2.data(), 4, 4));
    });
    CHECK(msg.find("adarank::transport_moments") != std::string::npos);
    CHECK(msg.find("'old_basis' is 4x19 but must be 4x20") != std::string::npos);
}

static_assert(adarank::optimizer_backend<velora::eigen_backend<float>>);
static_assert(adarank::optimizer_backend<velora::eigen_backend<double>>);
