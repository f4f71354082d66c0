// AdaRankGrad's optimizer end to end (adarank::low_rank_adamw on the Eigen backend): equivalence
// with dense AdamW at full rank, fused VeLoRA path = dense path, GaLore mode against the dense
// double-precision oracle in galore_reference.hpp, convergence on small problems, configuration
// and argument checks, numerical-trouble statuses, determinism, state save/load, reporting and
// refresh rules, concept conformance. (Kernels, the subspace finder, the rank estimator and
// moment transport on their own are tested in test_rsvd.cpp.)
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <adarank/adarank.hpp>
#include <velora/backend/eigen.hpp>
#include <velora/compressor.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "galore_reference.hpp"
#include "spectra.hpp"
#include "eigen_test_util.hpp"

using velora::index_t;
using velora::status;
using adarank::param_kind;
using adarank::projection_side;
using adarank::side_policy;
using test::Mat;
using test::RowMatT;
using RowMat = RowMatT<double>;
template <class T>
using backend_t = velora::eigen_backend<T>;
template <class T>
using optimizer_t = adarank::low_rank_adamw<backend_t<T>>;

namespace {

using test::gaussian_matrix;
using test::random_orthonormal;
using test::with_spectrum;

using test::copy_of;
using test::cv;
using test::mv;
using test::rel_diff;
using test::to_mat;

template <class T>
constexpr double tol() { return std::is_same_v<T, float> ? 2e-5 : 1e-12; }

// The message of the velora::state_format_error that f throws, or a marker.
template <class F>
std::string state_error_message(F&& f) {
    try {
        f();
    } catch (const velora::state_format_error& e) {
        return e.what();
    } catch (const std::exception& e) {
        return std::string("<other exception: ") + e.what() + ">";
    }
    return "<no velora::state_format_error thrown>";
}

void contains(const std::string& msg, std::initializer_list<const char*> parts) {
    INFO(msg);
    for (const char* p : parts) CHECK(msg.find(p) != std::string::npos);
}

adarank::adamw_hyper hyper(double lr, double wd) { return {.lr = lr, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-6, .weight_decay = wd}; }
ref::adamw_params as_ref(const adarank::adamw_hyper& h) { return {h.lr, h.beta1, h.beta2, h.eps, h.weight_decay}; }

// A VeLoRA layer: one compress + gradient_factor per step, gradient both factored and expanded.
template <class T>
struct velora_layer {
    using B = backend_t<T>;
    index_t tokens, out, features, groups;
    velora::compressor<B> comp;
    typename velora::compressor<B>::record_type record;
    RowMatT<T> a, dense;
    velora_layer(B& b, index_t t, index_t o, index_t d, index_t g, velora::v_mode mode = velora::v_mode::batch_mean())
        : tokens(t), out(o), features(d), groups(g),
          comp(b, d, {.groups = g, .v = mode, .z_storage = sizeof(T) == 8 ? velora::storage::f64 : velora::storage::f32}), a(o, g),
          dense(o, d) {}
    // New X and dY from `seed`; returns the factored gradient (views into this object).
    velora::factored_gradient<T> next(std::uint64_t seed) {
        const RowMatT<T> x = (gaussian_matrix(tokens, features, seed).array() + 0.3).matrix().template cast<T>();
        const RowMatT<T> dy = gaussian_matrix(tokens, out, seed + 1000).template cast<T>();
        REQUIRE(comp.compress(cv(x), record) == status::ok);
        comp.gradient_factor(record, cv(dy), mv(a));
        comp.expand_weight_grad(record, cv(a), mv(dense));
        return comp.factored(record, cv(a));
    }
};

} // namespace

// ================================================================================ 11. concepts

namespace {
// Everything velora::backend needs, but the Frobenius reduction and the Adam kernel are hidden:
// not an optimizer backend.
struct backend_without_adam : velora::eigen_backend<float> {
    void sum_of_squares() = delete;
    void adam_moments() = delete;
};
// Nothing at all.
struct not_a_backend {
    using value_type = float;
};
} // namespace

static_assert(adarank::optimizer_backend<velora::eigen_backend<float>>);
static_assert(adarank::optimizer_backend<velora::eigen_backend<double>>);
static_assert(velora::backend<backend_without_adam>);
static_assert(!adarank::optimizer_backend<backend_without_adam>);
static_assert(!adarank::optimizer_backend<not_a_backend>);
static_assert(adarank::low_rank_optimizer<adarank::low_rank_adamw<velora::eigen_backend<float>>>);
static_assert(adarank::low_rank_optimizer<adarank::low_rank_adamw<velora::eigen_backend<double>>>);
static_assert(!adarank::low_rank_optimizer<velora::compressor<velora::eigen_backend<float>>>);
static_assert(adarank::rank_estimator<adarank::rank_policy>);
static_assert(adarank::refresh_rule<adarank::refresh_policy>);

TEST_CASE("concepts: the Eigen backend is an optimizer backend, low_rank_adamw a low-rank optimizer") {
    // The static_asserts above are the test; this records it in the test list.
    CHECK(adarank::optimizer_backend<velora::eigen_backend<float>>);
    CHECK_FALSE(adarank::optimizer_backend<backend_without_adam>);
}

// ================================================================================ 1. full rank = dense AdamW

TEST_CASE_TEMPLATE("full rank with an identity basis and no refresh equals dense AdamW to rounding", T, float, double) {
    struct shape_case {
        index_t m, n;
        side_policy side;
    };
    for (const auto& c : {shape_case{6, 6, side_policy::left}, shape_case{6, 6, side_policy::right}, shape_case{5, 8, side_policy::left},
                          shape_case{9, 4, side_policy::right}, shape_case{5, 8, side_policy::standard}}) {
        CAPTURE(c.m);
        CAPTURE(c.n);
        CAPTURE(adarank::to_string(c.side));
        const index_t r = std::min(c.m, c.n);
        adarank::optimizer_config cfg;
        cfg.adam = hyper(1e-2, 0.1);
        cfg.scale = 1.0;
        cfg.side = c.side;
        cfg.rank = adarank::rank_policy::fixed(r);
        cfg.refresh = adarank::refresh_policy::every(index_t{1} << 30);
        backend_t<T> backend;
        optimizer_t<T> low(backend, cfg), dense(backend, cfg);
        const auto id = low.add_parameter(c.m, c.n, param_kind::low_rank);
        const auto did = dense.add_parameter(c.m, c.n, param_kind::dense);
        REQUIRE(low.layer_state(id).low_rank);
        REQUIRE_FALSE(dense.layer_state(did).low_rank);
        const bool left = low.layer_state(id).side == projection_side::left;
        const index_t len = left ? c.m : c.n, other = left ? c.n : c.m;
        REQUIRE(len == r);
        const RowMatT<T> eye = RowMatT<T>::Identity(r, len);
        REQUIRE(low.set_basis(id, cv(eye)) == status::ok);
        CHECK(low.layer_state(id).rank == r);

        RowMatT<T> wl = gaussian_matrix(c.m, c.n, 1).template cast<T>();
        RowMatT<T> wd = wl;
        Mat wr = wl.template cast<double>();
        ref::dense_adamw oracle(c.m, c.n, as_ref(cfg.adam));
        for (std::uint64_t s = 0; s < 8; ++s) {
            CAPTURE(s);
            const RowMatT<T> g = gaussian_matrix(c.m, c.n, 100 + s).template cast<T>();
            CHECK(low.step(id, mv(wl), cv(g)) == status::ok);
            CHECK(dense.step(did, mv(wd), cv(g)) == status::ok);
            oracle.step(wr, g.template cast<double>());
            CHECK(rel_diff(wl, wd) < tol<T>());
            CHECK(rel_diff(wl, wr) < tol<T>());
            CHECK(rel_diff(wd, wr) < tol<T>());
        }
        // Moments agree too (kept transposed on the right side).
        const Mat ml = to_mat(low.first_moment(id)), vl = to_mat(low.second_moment(id));
        CHECK(rel_diff(left ? ml : Mat(ml.transpose()), oracle.m()) < tol<T>());
        CHECK(rel_diff(left ? vl : Mat(vl.transpose()), oracle.v()) < tol<T>());
        CHECK(rel_diff(to_mat(dense.first_moment(did)), oracle.m()) < tol<T>());
        // No refresh happened: the basis is still the identity, the only subspace is set_basis's.
        const auto info = low.layer_state(id);
        CHECK(info.refreshes == 1);
        CHECK(info.steps == 8);
        CHECK(info.steps_in_subspace == 8);
        CHECK(test::same_bits(low.basis(id), cv(eye)));
        CHECK(info.state_bytes == static_cast<std::size_t>(r * len + 2 * r * other) * sizeof(T));
        CHECK(dense.layer_state(did).state_bytes == static_cast<std::size_t>(2 * c.m * c.n) * sizeof(T));
    }
}

// ================================================================================ 2. fused path = dense path

TEST_CASE_TEMPLATE("fused VeLoRA gradient (factored) gives the same steps as its dense expansion", T, float, double) {
    struct shape_case {
        index_t t, o, d, g;
    };
    // D % G != 0 (last group partial), D % G == 0, and a last group that is all padding (D = 10, G = 6, s = 2).
    for (const auto& c : {shape_case{48, 40, 33, 7}, shape_case{40, 24, 28, 7}, shape_case{30, 12, 10, 6}}) {
        for (const auto side : {side_policy::left, side_policy::right}) {
            for (const bool exact : {false, true}) {
                CAPTURE(c.o);
                CAPTURE(c.d);
                CAPTURE(c.g);
                CAPTURE(adarank::to_string(side));
                CAPTURE(exact);
                adarank::optimizer_config cfg;
                cfg.adam = hyper(1e-2, 0.01);
                cfg.side = side;
                cfg.rank = adarank::rank_policy::adaptive(0.3, 1, 5);
                cfg.refresh = adarank::refresh_policy::every(3);
                cfg.rsvd.oversampling = 3;
                cfg.rsvd.exact_fraction = exact ? 0.0 : 1.0;   // 1.0: exact only when the sketch covers everything
                backend_t<T> backend;
                optimizer_t<T> fused(backend, cfg), plain(backend, cfg);
                const auto fid = fused.add_parameter(c.o, c.d, param_kind::low_rank);
                const auto pid = plain.add_parameter(c.o, c.d, param_kind::low_rank);
                // A dense parameter fed the factored form expands it internally.
                const auto fdense = fused.add_parameter(c.o, c.d, param_kind::dense);
                const auto pdense = plain.add_parameter(c.o, c.d, param_kind::dense);
                velora_layer<T> layer(backend, c.t, c.o, c.d, c.g);
                RowMatT<T> wf = gaussian_matrix(c.o, c.d, 5).template cast<T>(), wp = wf, wfd = wf, wpd = wf;
                for (std::uint64_t s = 0; s < 8; ++s) {
                    CAPTURE(s);
                    const auto f = layer.next(200 + 7 * s);
                    CHECK(fused.step(fid, mv(wf), f) == status::ok);
                    CHECK(plain.step(pid, mv(wp), cv(layer.dense)) == status::ok);
                    CHECK(fused.step(fdense, mv(wfd), f) == status::ok);
                    CHECK(plain.step(pdense, mv(wpd), cv(layer.dense)) == status::ok);
                    const auto fi = fused.layer_state(fid), pi = plain.layer_state(pid);
                    REQUIRE(fi.rank == pi.rank);
                    CHECK(fi.refreshes == pi.refreshes);
                    CHECK(fi.last_refresh.exact == pi.last_refresh.exact);
                    CHECK(fi.last_refresh.exact == (exact || fi.last_refresh.sketch == std::min(c.o, c.d)));
                    CHECK(fi.projected_norm2 == doctest::Approx(pi.projected_norm2).epsilon(tol<T>() * 10));
                    CHECK(rel_diff(to_mat(fused.basis(fid)), to_mat(plain.basis(pid))) < (sizeof(T) == 8 ? 1e-9 : 2e-3));
                    CHECK(rel_diff(wf, wp) < (sizeof(T) == 8 ? 1e-11 : 1e-4));
                    CHECK(rel_diff(wfd, wpd) < tol<T>());
                }
                CHECK(fused.layer_state(fid).refreshes == 3);   // steps 1, 4, 7
                if (!exact) CHECK_FALSE(fused.layer_state(fid).last_refresh.exact);
            }
        }
    }
}

// ================================================================================ 3. GaLore mode = oracle

TEST_CASE("GaLore configuration matches the dense GaLore AdamW oracle step by step (double)") {
    struct shape_case {
        index_t m, n;
        int rank;
    };
    for (const auto& c : {shape_case{20, 12, 4}, shape_case{10, 16, 3}, shape_case{9, 9, 5}}) {
        CAPTURE(c.m);
        CAPTURE(c.n);
        CAPTURE(c.rank);
        auto cfg = adarank::optimizer_config::galore(c.rank, 3, 0.25);
        cfg.adam = hyper(1e-2, 0.05);
        backend_t<double> backend;
        optimizer_t<double> opt(backend, cfg);
        const auto id = opt.add_parameter(c.m, c.n, param_kind::low_rank);
        ref::galore_adamw oracle(c.m, c.n, c.rank, as_ref(cfg.adam), 3, 0.25);
        const bool left = opt.layer_state(id).side == projection_side::left;
        CHECK(left == oracle.left());
        RowMat w = gaussian_matrix(c.m, c.n, 9);
        Mat wr = w;
        const index_t k = std::min(c.m, c.n);
        for (std::uint64_t s = 0; s < 12; ++s) {
            CAPTURE(s);
            // Distinct, well separated singular values that change from step to step.
            std::vector<double> sigma(static_cast<std::size_t>(k));
            for (index_t i = 0; i < k; ++i) sigma[static_cast<std::size_t>(i)] = (1.0 + 0.1 * double(s)) * double(k - i) + 0.5;
            const RowMat g = with_spectrum(c.m, c.n, sigma, 300 + 2 * s);
            CHECK(opt.step(id, mv(w), cv(g)) == status::ok);
            oracle.step(wr, g);
            CHECK(rel_diff(w, wr) < 1e-9);
            const Mat basis = to_mat(opt.basis(id));
            CHECK(rel_diff(basis, left ? Mat(oracle.basis().transpose()) : oracle.basis()) < 1e-9);
            const Mat m = to_mat(opt.first_moment(id)), v = to_mat(opt.second_moment(id));
            CHECK(rel_diff(left ? m : Mat(m.transpose()), oracle.m()) < 1e-9);
            CHECK(rel_diff(left ? v : Mat(v.transpose()), oracle.v()) < 1e-9);
            CHECK(opt.layer_state(id).refreshes == static_cast<std::uint64_t>(oracle.refreshes()));
            CHECK(opt.layer_state(id).rank == c.rank);
        }
        CHECK(oracle.refreshes() == 4);   // calls 1, 4, 7, 10
    }
}

// ================================================================================ 4. convergence

namespace {

// The least-squares problem min ‖X Wᵀ − Y‖²/N: its loss and gradient.
struct least_squares {
    Mat x, y;
    double loss(const RowMat& w) const { return (x * w.transpose() - y).squaredNorm() / double(x.rows()); }
    RowMat grad(const RowMat& w) const { return (2.0 / double(x.rows())) * (x * w.transpose() - y).transpose() * x; }
};

} // namespace

TEST_CASE("convergence: least squares with a low-rank target, AdaRankGrad's default policies get close to dense AdamW") {
    const index_t n = 160, d_in = 24, d_out = 16;
    least_squares p;
    p.x = gaussian_matrix(n, d_in, 401);
    p.y = p.x * with_spectrum(d_out, d_in, {4.0, 2.0, 1.0}, 402).transpose() + 0.05 * gaussian_matrix(n, d_out, 403);
    const int steps = 600;
    auto run = [&](param_kind kind, std::vector<index_t>* ranks) {
        adarank::optimizer_config cfg;   // AdaRankGrad: adaptive rank, converged refresh, transport, α = 0.25
        cfg.adam.lr = 0.05;
        backend_t<double> backend;
        optimizer_t<double> opt(backend, cfg);
        const auto id = opt.add_parameter(d_out, d_in, kind);
        RowMat w = RowMat::Zero(d_out, d_in);
        for (int s = 0; s < steps; ++s) {
            const RowMat g = p.grad(w);
            REQUIRE(opt.step(id, mv(w), cv(g)) == status::ok);
            if (ranks && opt.layer_state(id).steps_in_subspace == 1) ranks->push_back(opt.layer_state(id).rank);
        }
        if (kind == param_kind::low_rank) CHECK(opt.layer_state(id).refreshes >= 3);
        return p.loss(w);
    };
    const double initial = p.loss(RowMat::Zero(d_out, d_in));
    std::vector<index_t> ranks;
    const double low = run(param_kind::low_rank, &ranks), dense = run(param_kind::dense, nullptr);
    std::string rank_list;
    for (auto r : ranks) rank_list += std::to_string(r) + " ";
    INFO("least squares: initial " << initial << ", dense AdamW " << dense << ", AdaRankGrad " << low << ", ranks at refreshes " << rank_list);
    REQUIRE_FALSE(ranks.empty());
    CHECK(ranks.front() <= 4);   // the first gradient is essentially rank 3
    CHECK(low < 1e-2 * initial);
    CHECK(low < 2.0 * dense);
}

namespace {

struct mlp {
    RowMat w1, b1, w2, b2;   // hidden×in, 1×hidden, out×hidden, 1×out
};

// Mean squared error of a tanh MLP and its gradients (hand-written backward).
double mlp_loss(const mlp& net, const Mat& x, const Mat& target, mlp* grad) {
    const Mat z = (x * net.w1.transpose()).rowwise() + net.b1.row(0);
    const Mat h = z.array().tanh().matrix();
    const Mat y = (h * net.w2.transpose()).rowwise() + net.b2.row(0);
    const Mat r = y - target;
    const double n = double(x.rows());
    if (grad) {
        const Mat dy = (2.0 / n) * r;
        grad->w2 = dy.transpose() * h;
        grad->b2 = dy.colwise().sum();
        const Mat dz = ((dy * net.w2).array() * (1.0 - h.array().square())).matrix();
        grad->w1 = dz.transpose() * x;
        grad->b1 = dz.colwise().sum();
    }
    return r.squaredNorm() / n;
}

} // namespace

TEST_CASE("convergence: two-layer tanh MLP, low-rank hidden weights and dense biases, close to dense AdamW") {
    const index_t n = 192, d_in = 12, hidden = 32, d_out = 6;
    const Mat x = gaussian_matrix(n, d_in, 501);
    mlp teacher{gaussian_matrix(hidden, d_in, 502) / std::sqrt(double(d_in)), gaussian_matrix(1, hidden, 503) * 0.1,
                gaussian_matrix(d_out, hidden, 504) / std::sqrt(double(hidden)), gaussian_matrix(1, d_out, 505) * 0.1};
    const Mat target = [&] {
        const Mat z = (x * teacher.w1.transpose()).rowwise() + teacher.b1.row(0);
        return Mat(((z.array().tanh().matrix() * teacher.w2.transpose()).rowwise() + teacher.b2.row(0)) + 0.1 * gaussian_matrix(n, d_out, 506));
    }();
    const mlp init{gaussian_matrix(hidden, d_in, 511) * 0.3, RowMat::Zero(1, hidden), gaussian_matrix(d_out, hidden, 512) * 0.1,
                   RowMat::Zero(1, d_out)};
    const int steps = 600;
    auto run = [&](param_kind weights) {
        adarank::optimizer_config cfg;
        cfg.adam.lr = 0.02;
        cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
        cfg.refresh = adarank::refresh_policy::converged(0.5, 20, 100);
        backend_t<double> backend;
        optimizer_t<double> opt(backend, cfg);
        const auto i_w1 = opt.add_parameter(hidden, d_in, weights), i_b1 = opt.add_parameter(1, hidden);
        const auto i_w2 = opt.add_parameter(d_out, hidden, weights), i_b2 = opt.add_parameter(1, d_out);
        CHECK(opt.layer_state(i_w1).low_rank == (weights == param_kind::low_rank));
        CHECK_FALSE(opt.layer_state(i_b1).low_rank);   // automatic: vectors are dense
        mlp net = init, g;
        for (int s = 0; s < steps; ++s) {
            mlp_loss(net, x, target, &g);
            REQUIRE(opt.step(i_w1, mv(net.w1), cv(g.w1)) == status::ok);
            REQUIRE(opt.step(i_b1, mv(net.b1), cv(g.b1)) == status::ok);
            REQUIRE(opt.step(i_w2, mv(net.w2), cv(g.w2)) == status::ok);
            REQUIRE(opt.step(i_b2, mv(net.b2), cv(g.b2)) == status::ok);
        }
        if (weights == param_kind::low_rank) {
            CHECK(opt.layer_state(i_w1).rank <= 4);
            CHECK(opt.state_bytes() < static_cast<std::size_t>(2 * (hidden * d_in + d_out * hidden + hidden + d_out)) * sizeof(double));
        }
        return mlp_loss(net, x, target, nullptr);
    };
    const double initial = mlp_loss(init, x, target, nullptr);
    const double low = run(param_kind::low_rank), dense = run(param_kind::dense);
    INFO("MLP: initial " << initial << ", dense AdamW " << dense << ", AdaRankGrad " << low);
    CHECK(low < 0.1 * initial);
    CHECK(low < 2.0 * dense);
}

// ================================================================================ 5. bad configurations and arguments

TEST_CASE("bad configurations and arguments throw std::invalid_argument naming the field and value, and change nothing") {
    using B = backend_t<float>;
    using test::invalid_argument_message;
    B backend;
    const char* ctor = "adarank::low_rank_adamw::low_rank_adamw";
    auto with = [](auto&& edit) {
        adarank::optimizer_config c;
        edit(c);
        return c;
    };
    auto make = [&](const adarank::optimizer_config& c) { return invalid_argument_message([&] { optimizer_t<float> o(backend, c); }); };

    SUBCASE("configuration") {
        contains(make(with([](auto& c) { c.rank = adarank::rank_policy::adaptive(0.2, 5, 3); })), {ctor, "r_min <= r_max", "r_min = 5", "r_max = 3"});
        contains(make(with([](auto& c) { c.rank.r_min = 0; })), {ctor, "config.rank.r_min", "got 0"});
        contains(make(with([](auto& c) { c.rank.xi = 1.5; })), {ctor, "config.rank.xi", "1.5"});
        contains(make(with([](auto& c) { c.adam.lr = -0.1; })), {ctor, "config.adam.lr", "-0.1"});
        contains(make(with([](auto& c) { c.adam.lr = std::numeric_limits<double>::quiet_NaN(); })), {ctor, "config.adam.lr", "nan"});
        contains(make(with([](auto& c) { c.adam.beta1 = 1.0; })), {ctor, "config.adam.beta1", "[0, 1)", "got 1"});
        contains(make(with([](auto& c) { c.adam.beta2 = -0.5; })), {ctor, "config.adam.beta2", "-0.5"});
        contains(make(with([](auto& c) { c.adam.eps = 0.0; })), {ctor, "config.adam.eps", "> 0", "got 0"});
        contains(make(with([](auto& c) { c.adam.eps = -1e-8; })), {ctor, "config.adam.eps", "-1e-08"});
        contains(make(with([](auto& c) { c.adam.weight_decay = -1; })), {ctor, "config.adam.weight_decay", "-1"});
        contains(make(with([](auto& c) { c.scale = 0; })), {ctor, "config.scale", "got 0"});
        contains(make(with([](auto& c) { c.refresh = adarank::refresh_policy::converged(0.5, 10, 5); })),
                 {ctor, "min_interval <= max_interval", "10 and 5"});
        contains(make(with([](auto& c) { c.refresh = adarank::refresh_policy::every(0); })), {ctor, "config.refresh.max_interval", "got 0"});
        contains(make(with([](auto& c) { c.refresh = adarank::refresh_policy::converged(1.5, 1, 5); })),
                 {ctor, "config.refresh.threshold (converged)", "1.5"});
        contains(make(with([](auto& c) { c.rsvd.exact_fraction = 1.5; })), {ctor, "config.rsvd.exact_fraction", "[0, 1]", "1.5"});
        contains(make(with([](auto& c) { c.rsvd.oversampling = -1; })), {ctor, "config.rsvd.oversampling", "-1"});
        contains(make(with([](auto& c) { c.rsvd.power_iterations = 65; })), {ctor, "config.rsvd.power_iterations", "65"});
        contains(make(with([](auto& c) { c.side = static_cast<side_policy>(9); })), {ctor, "config.side", "9"});
        contains(make(with([](auto& c) { c.transport = static_cast<adarank::transport_policy>(7); })), {ctor, "config.transport", "7"});
        CHECK(make(adarank::optimizer_config{}) == "<no std::invalid_argument thrown>");
        CHECK(make(adarank::optimizer_config::galore(4)) == "<no std::invalid_argument thrown>");
    }

    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 3);
    optimizer_t<float> opt(backend, cfg);
    const auto id = opt.add_parameter(4, 6, param_kind::low_rank);
    const auto did = opt.add_parameter(4, 6, param_kind::dense);
    RowMatT<float> w = gaussian_matrix(4, 6, 1).cast<float>(), g = gaussian_matrix(4, 6, 2).cast<float>();
    RowMatT<float> wt = gaussian_matrix(6, 4, 1).cast<float>();
    REQUIRE(opt.step(id, mv(w), cv(g)) == status::ok);
    const auto before = opt.save_state();
    const RowMatT<float> w_before = w;

    SUBCASE("add_parameter") {
        const char* fn = "adarank::low_rank_adamw::add_parameter";
        contains(invalid_argument_message([&] { opt.add_parameter(0, 5); }), {fn, "shape must be positive", "0x5"});
        contains(invalid_argument_message([&] { opt.add_parameter(3, -2); }), {fn, "3x-2"});
        contains(invalid_argument_message([&] { opt.add_parameter(3, 3, static_cast<param_kind>(7)); }), {fn, "'kind'", "7"});
        CHECK(opt.size() == 2);
    }
    SUBCASE("step") {
        const char* fn = "adarank::low_rank_adamw::step";
        contains(invalid_argument_message([&] { (void)opt.step(id, mv(wt), cv(g)); }), {fn, "'weight' is 6x4 but must be 4x6"});
        contains(invalid_argument_message([&] { (void)opt.step(id, mv(w), cv(wt)); }), {fn, "'grad' is 6x4 but must be 4x6"});
        contains(invalid_argument_message([&] { (void)opt.step(did, mv(w), cv(wt)); }), {fn, "'grad' is 6x4 but must be 4x6"});
        contains(invalid_argument_message([&] { (void)opt.step(2, mv(w), cv(g)); }), {fn, "'id' is 2", "2 parameters are registered"});
        contains(invalid_argument_message([&] { (void)opt.step(-1, mv(w), cv(g)); }), {fn, "'id' is -1"});
        // Factored gradients of the wrong shape.
        velora_layer<float> layer(backend, 10, 4, 7, 3);
        const auto f = layer.next(5);
        RowMatT<float> w47 = gaussian_matrix(4, 7, 3).cast<float>();
        contains(invalid_argument_message([&] { (void)opt.step(id, mv(w), f); }), {fn, "describes a 4x7 gradient", "parameter 0 is 4x6"});
        contains(invalid_argument_message([&] { (void)opt.step(id, mv(w47), f); }), {fn, "'weight' is 4x7 but must be 4x6"});
        auto broken = f;
        broken.v = nullptr;
        broken.features = 6;
        contains(invalid_argument_message([&] { (void)opt.step(id, mv(w), broken); }), {fn, "inconsistent", "v is null"});
        CHECK(test::same_bits(w, w_before));
    }
    SUBCASE("set_basis, info, set_learning_rate") {
        const char* fn = "adarank::low_rank_adamw::set_basis";
        const RowMatT<float> b25 = RowMatT<float>::Identity(2, 5), b46 = RowMatT<float>::Identity(4, 4);
        // std side of 4x6 is left: len = 4, r <= min(3, 4) = 3.
        contains(invalid_argument_message([&] { (void)opt.set_basis(id, cv(b25)); }), {fn, "'basis' is 2x5", "r x 4", "1 <= r <= 3"});
        contains(invalid_argument_message([&] { (void)opt.set_basis(id, cv(b46)); }), {fn, "'basis' is 4x4", "1 <= r <= 3"});
        contains(invalid_argument_message([&] { (void)opt.set_basis(did, cv(b46)); }), {fn, "parameter 1 is optimised densely"});
        contains(invalid_argument_message([&] { (void)opt.set_basis(5, cv(b46)); }), {fn, "'id' is 5"});
        contains(invalid_argument_message([&] { (void)opt.layer_state(7); }), {"adarank::low_rank_adamw::layer_state", "'id' is 7"});
        contains(invalid_argument_message([&] { (void)opt.basis(-3); }), {"adarank::low_rank_adamw::basis", "'id' is -3"});
        contains(invalid_argument_message([&] { opt.set_learning_rate(-1); }), {"adarank::low_rank_adamw::set_learning_rate", "'lr'", "got -1"});
        contains(invalid_argument_message([&] { opt.set_learning_rate(std::numeric_limits<double>::infinity()); }), {"'lr'", "inf"});
        CHECK(opt.learning_rate() == cfg.adam.lr);
        opt.set_learning_rate(0.5);
        CHECK(opt.learning_rate() == 0.5);
        opt.set_learning_rate(cfg.adam.lr);
    }
    CHECK(opt.save_state() == before);
}

TEST_CASE("all_reduce_mean checks every gradient view with check_view, naming all_reduce_mean and 'grads[i]', and reduces nothing") {
    using T = float;
    using test::invalid_argument_message;
    backend_t<T> backend;
    optimizer_t<T> opt(backend, adarank::optimizer_config{});
    const index_t small = opt.add_parameter(4, 4, param_kind::dense), id = opt.add_parameter(8, 5, param_kind::dense);
    std::vector<T> ga(16, T(1)), gb(40, T(2));
    const std::vector<index_t> ids{small, id};
    velora::single_process one;
    const auto reduce = [&](velora::matrix_view<T> second) {
        const std::vector<velora::matrix_view<T>> views{{ga.data(), 4, 4, 4}, second};
        opt.all_reduce_mean(std::span<const index_t>(ids), std::span<const velora::matrix_view<T>>(views), one);
    };
    const char* fn = "adarank::low_rank_adamw::all_reduce_mean";
    // 8x5 with ld = 2^61: its extent, 7·2^61 + 5 floats, does not fit in the address space (the
    // bucket copy would address rows 2^61 elements apart).
    contains(invalid_argument_message([&] { reduce({gb.data(), 8, 5, index_t{1} << 61}); }),
             {fn, "argument 'grads[1]' (8x5, ld 2305843009213693952)", "address space"});
    contains(invalid_argument_message([&] { reduce({nullptr, 8, 5, 5}); }), {fn, "argument 'grads[1]'", "null data pointer"});
    contains(invalid_argument_message([&] { reduce({gb.data(), 8, 5, 4}); }), {fn, "argument 'grads[1]'", "leading dimension 4 < cols 5"});
    contains(invalid_argument_message([&] { reduce({gb.data(), 5, 8, 8}); }), {fn, "argument 'grads[1]' is 5x8 but must be 8x5"});
    contains(invalid_argument_message([&] { reduce({gb.data(), 0, 5, 5}); }), {fn, "argument 'grads[1]' is empty"});
    CHECK(ga == std::vector<T>(16, T(1)));
    CHECK(gb == std::vector<T>(40, T(2)));
    // Nothing was counted as reduced: the next step reports no bytes communicated.
    RowMatT<T> w = gaussian_matrix(8, 5, 1).cast<T>();
    REQUIRE(opt.step(id, mv(w), velora::const_matrix_view<T>{gb.data(), 8, 5, 5}) == status::ok);
    CHECK(opt.layer_state(id).communicated_bytes == 0);
    // A valid call reduces (one process: the mean is the gradient) and is counted.
    CHECK(invalid_argument_message([&] { reduce({gb.data(), 8, 5, 5}); }) == "<no std::invalid_argument thrown>");
    CHECK(gb == std::vector<T>(40, T(2)));
    REQUIRE(opt.step(id, mv(w), velora::const_matrix_view<T>{gb.data(), 8, 5, 5}) == status::ok);
    CHECK(opt.layer_state(id).communicated_bytes == 40 * sizeof(T));
}

TEST_CASE("the phases' old spellings (projection_shape, project, step_projected) still work as deprecated aliases of the new ones") {
    using T = double;
    backend_t<T> backend;
    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::fixed(3);
    cfg.refresh = adarank::refresh_policy::every(4);
    optimizer_t<T> renamed(backend, cfg), old(backend, cfg);
    const index_t a = renamed.add_parameter(12, 20, param_kind::low_rank), b = old.add_parameter(12, 20, param_kind::low_rank);
    RowMatT<T> wa = gaussian_matrix(12, 20, 1), wb = wa;
    velora::single_process one;
    std::vector<T> out_a(60), out_b(60);
    for (int step = 0; step < 6; ++step) {
        const RowMatT<T> g = gaussian_matrix(12, 20, 10 + std::uint64_t(step));
        const auto shape = renamed.projection_to_reduce(a);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
        const auto old_shape = old.projection_shape(b);
        CHECK(old_shape == shape.value_or(std::pair<index_t, index_t>{0, 0}));
        if (shape) {
            renamed.project_gradient(a, cv(g), velora::matrix_view<T>{out_a.data(), shape->first, shape->second});
            old.project(b, cv(g), velora::matrix_view<T>{out_b.data(), old_shape.first, old_shape.second});
            CHECK(out_a == out_b);
        }
        CHECK(renamed.step_with_reduced_projection(a, mv(wa), velora::const_matrix_view<T>{out_a.data(), 3, 20}, cv(g), one) ==
              old.step_projected(b, mv(wb), velora::const_matrix_view<T>{out_b.data(), 3, 20}, cv(g), one));
#pragma GCC diagnostic pop
    }
    CHECK(wa == wb);
    CHECK(renamed.save_state() == old.save_state());
}

// The old name of the factored gradient's operator is the same type, so code naming it compiles
// unchanged (with a warning).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
static_assert(std::is_same_v<adarank::factored_gradient_op<backend_t<float>>, adarank::factored_gradient_operator<backend_t<float>>>);
#pragma GCC diagnostic pop

TEST_CASE("project_gradient checks its views up front, naming project_gradient and 'grad'/'out', and changes nothing") {
    using T = float;
    using test::invalid_argument_message;
    backend_t<T> backend;
    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::fixed(3);
    cfg.refresh = adarank::refresh_policy::every(50);
    optimizer_t<T> opt(backend, cfg);
    const index_t id = opt.add_parameter(12, 20, param_kind::low_rank);   // std side of 12x20: left, out is 3x20
    RowMatT<T> w = gaussian_matrix(12, 20, 1).cast<T>();
    const RowMatT<T> g = gaussian_matrix(12, 20, 2).cast<T>();
    REQUIRE(opt.step(id, mv(w), cv(g)) == status::ok);
    REQUIRE(opt.projection_to_reduce(id) == std::pair<index_t, index_t>{3, 20});
    const auto before = opt.save_state();
    std::vector<T> out(60, T(7)), big(300, T(0.5));
    const velora::const_matrix_view<T> grad = cv(g);
    const velora::matrix_view<T> good_out{out.data(), 3, 20, 20};
    const char* fn = "adarank::low_rank_adamw::project_gradient";
    const auto dense = [&](velora::const_matrix_view<T> gr, velora::matrix_view<T> o) {
        return invalid_argument_message([&] { opt.project_gradient(id, gr, o); });
    };
    SUBCASE("dense gradient") {
        contains(dense({g.data(), 12, 20, index_t{1} << 61}, good_out), {fn, "argument 'grad' (12x20, ld 2305843009213693952)", "address space"});
        contains(dense({nullptr, 12, 20, 20}, good_out), {fn, "argument 'grad' has a null data pointer"});
        contains(dense({g.data(), 12, 20, 19}, good_out), {fn, "argument 'grad' has leading dimension 19 < cols 20"});
        contains(dense({g.data(), 12, 19, 20}, good_out), {fn, "argument 'grad' is 12x19 but must be 12x20"});
        contains(dense(grad, {out.data(), 3, 20, index_t{1} << 61}), {fn, "argument 'out' (3x20, ld 2305843009213693952)", "address space"});
        contains(dense(grad, {nullptr, 3, 20, 20}), {fn, "argument 'out' has a null data pointer"});
        contains(dense(grad, {out.data(), 3, 20, 19}), {fn, "argument 'out' has leading dimension 19 < cols 20"});
        contains(dense(grad, {out.data(), 3, 19, 19}), {fn, "argument 'out' is 3x19 but must be 3x20"});
        // An output in the gradient's memory.
        std::copy(g.data(), g.data() + 240, big.begin());
        contains(dense({big.data(), 12, 20, 20}, {big.data() + 200, 3, 20, 20}), {fn, "argument 'out' (3x20) overlaps argument 'grad' (12x20)"});
        CHECK(std::equal(g.data(), g.data() + 240, big.begin()));
        // A host-built dense_gradient is checked as the view is.
        contains(invalid_argument_message([&] {
                     opt.project_gradient(id, adarank::dense_gradient<backend_t<T>>(backend, {g.data(), 12, 20, index_t{1} << 61}), good_out);
                 }),
                 {fn, "argument 'grad'", "address space"});
        CHECK(std::all_of(out.begin(), out.end(), [](T x) { return x == T(7); }));   // nothing written
        CHECK(dense(grad, good_out) == "<no std::invalid_argument thrown>");
        CHECK(std::none_of(out.begin(), out.end(), [](T x) { return x == T(7); }));
    }
    SUBCASE("factored gradient") {
        // G = c·A·(I_4 ⊗ vᵀ) with A 12x4 and s = 5 (D = 20), A and v inside `big`.
        std::vector<T> v(5, T(1) / std::sqrt(T(5)));
        std::copy(v.begin(), v.end(), big.begin() + 250);
        const velora::factored_gradient<T> f{{big.data(), 12, 4, 4}, big.data() + 250, 5, 20, T(1)};
        const auto factored = [&](const velora::factored_gradient<T>& gr, velora::matrix_view<T> o) {
            return invalid_argument_message([&] { opt.project_gradient(id, gr, o); });
        };
        contains(factored(f, {nullptr, 3, 20, 20}), {fn, "argument 'out' has a null data pointer"});
        contains(factored(f, {out.data(), 3, 20, index_t{1} << 61}), {fn, "argument 'out'", "address space"});
        contains(factored(f, {big.data() + 40, 3, 20, 20}), {fn, "argument 'out' (3x20) overlaps argument 'grad.a' (12x4)"});
        contains(factored(f, {big.data() + 240, 3, 20, 20}), {fn, "argument 'out' (3x20) overlaps argument 'grad.v' (1x5)"});
        auto wide = f;
        wide.a.ld = index_t{1} << 61;
        contains(factored(wide, good_out), {fn, "argument 'grad.a'", "address space"});
        CHECK(std::all_of(big.begin(), big.begin() + 48, [](T x) { return x == T(0.5); }));
        CHECK(std::equal(v.begin(), v.end(), big.begin() + 250));
        CHECK(std::all_of(out.begin(), out.end(), [](T x) { return x == T(7); }));   // nothing written
        CHECK(factored(f, good_out) == "<no std::invalid_argument thrown>");
        CHECK(std::none_of(out.begin(), out.end(), [](T x) { return x == T(7); }));
    }
    CHECK(opt.save_state() == before);
}

// ================================================================================ 6. non-finite gradients

TEST_CASE_TEMPLATE("a NaN or Inf gradient (dense or factored) returns non_finite_input and changes nothing", T, float, double) {
    const index_t o = 12, d = 22, groups = 5;   // s = 5: the last group has 2 real columns
    adarank::optimizer_config cfg;
    cfg.adam = hyper(1e-2, 0.01);
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
    cfg.refresh = adarank::refresh_policy::every(3);
    const T bad_values[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity()};

    // phase: good steps taken before the bad one (0: first step; 2: mid-subspace; 3: a refresh is due).
    for (const int phase : {0, 2, 3}) {
        for (const bool low_rank : {true, false}) {
            for (const bool factored : {false, true}) {
                for (const T bad : bad_values) {
                    CAPTURE(phase);
                    CAPTURE(low_rank);
                    CAPTURE(factored);
                    CAPTURE(bad);
                    backend_t<T> backend;
                    optimizer_t<T> opt(backend, cfg);
                    const auto id = opt.add_parameter(o, d, low_rank ? param_kind::low_rank : param_kind::dense);
                    velora_layer<T> layer(backend, 24, o, d, groups);
                    RowMatT<T> w = gaussian_matrix(o, d, 3).template cast<T>();
                    for (int s = 0; s < phase; ++s) {
                        const auto f = layer.next(700 + 3 * std::uint64_t(s));
                        REQUIRE(opt.step(id, mv(w), f) == status::ok);
                    }
                    const auto blob = opt.save_state();
                    const RowMatT<T> w_before = w;
                    const auto info_before = opt.layer_state(id);
                    auto f = layer.next(799);
                    RowMatT<T> dense_bad = layer.dense;
                    dense_bad(o / 2, d - 3) = bad;
                    layer.a(1, groups - 1) = bad;   // in the last (partial) group
                    const status st = factored ? opt.step(id, mv(w), f) : opt.step(id, mv(w), cv(dense_bad));
                    CHECK(st == status::non_finite_input);
                    CHECK(opt.save_state() == blob);
                    CHECK(test::same_bits(w, w_before));
                    CHECK(opt.layer_state(id).steps == info_before.steps);
                    CHECK(opt.layer_state(id).refreshes == info_before.refreshes);
                    // The next good step is the one that was due (a refresh at phase 0 and 3).
                    const auto good = layer.next(800);
                    CHECK(opt.step(id, mv(w), good) == status::ok);
                    if (low_rank) CHECK(opt.layer_state(id).refreshes == info_before.refreshes + ((phase == 0 || phase == 3) ? 1 : 0));
                    CHECK(w.allFinite());
                }
            }
        }
    }
}

// ================================================================================ 7. zero gradient

TEST_CASE_TEMPLATE("an all-zero gradient on a refresh step returns degenerate_input and keeps the subspace", T, float, double) {
    const index_t o = 12, d = 20, groups = 5;
    adarank::optimizer_config cfg;
    cfg.adam = hyper(1e-2, 0.01);
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
    cfg.refresh = adarank::refresh_policy::every(3);
    for (const bool factored : {false, true}) {
        CAPTURE(factored);
        backend_t<T> backend;
        optimizer_t<T> opt(backend, cfg);
        const auto id = opt.add_parameter(o, d, param_kind::low_rank);
        velora_layer<T> layer(backend, 24, o, d, groups);
        RowMatT<T> w = gaussian_matrix(o, d, 3).template cast<T>();
        for (int s = 0; s < 3; ++s) REQUIRE(opt.step(id, mv(w), layer.next(900 + 3 * std::uint64_t(s))) == status::ok);
        const auto before = opt.layer_state(id);
        REQUIRE(before.steps_in_subspace == 3);   // a refresh is due now
        const RowMatT<T> basis_before = copy_of(opt.basis(id));
        auto f = layer.next(950);
        layer.a.setZero();
        const RowMatT<T> zero = RowMatT<T>::Zero(o, d);
        const status st = factored ? opt.step(id, mv(w), f) : opt.step(id, mv(w), cv(zero));
        CHECK(st == status::degenerate_input);
        const auto after = opt.layer_state(id);
        CHECK(after.rank == before.rank);
        CHECK(after.refreshes == before.refreshes);
        CHECK(test::same_bits(opt.basis(id), cv(basis_before)));
        CHECK(after.steps == before.steps + 1);   // Adam still steps with the momentum it has
        CHECK(w.allFinite());
        // The refresh is still due and happens with the next usable gradient.
        CHECK(opt.step(id, mv(w), layer.next(960)) == status::ok);
        CHECK(opt.layer_state(id).refreshes == before.refreshes + 1);
    }
    SUBCASE("an all-zero first gradient only decays W; the first non-zero gradient finds the subspace") {
        backend_t<T> backend;
        optimizer_t<T> opt(backend, cfg);
        const auto id = opt.add_parameter(o, d, param_kind::low_rank);
        RowMatT<T> w = gaussian_matrix(o, d, 3).template cast<T>();
        const RowMatT<T> w0 = w, zero = RowMatT<T>::Zero(o, d);
        CHECK(opt.step(id, mv(w), cv(zero)) == status::degenerate_input);
        CHECK(opt.layer_state(id).rank == 0);
        CHECK(opt.layer_state(id).refreshes == 0);
        CHECK(opt.layer_state(id).steps == 1);
        CHECK(rel_diff(w, Mat(w0.template cast<double>() * (1.0 - cfg.adam.lr * cfg.adam.weight_decay))) < tol<T>());
        velora_layer<T> layer(backend, 24, o, d, groups);
        CHECK(opt.step(id, mv(w), layer.next(961)) == status::ok);
        CHECK(opt.layer_state(id).refreshes == 1);
        const Mat b = to_mat(opt.basis(id));
        REQUIRE(b.rows() >= 1);
        CHECK((b * b.transpose() - Mat::Identity(b.rows(), b.rows())).norm() < 1e-5);
    }
}

// ================================================================================ 8. determinism

TEST_CASE("identical runs are bit-identical; another seed gives another randomized basis") {
    const index_t m = 64, n = 96;
    auto run = [&](std::uint64_t seed, RowMatT<float>& w, RowMatT<float>& basis, adarank::subspace_report& rep) {
        adarank::optimizer_config cfg;
        cfg.adam = hyper(1e-2, 0.0);
        cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 8);
        cfg.refresh = adarank::refresh_policy::every(2);   // cold start, then warm starts
        cfg.seed = seed;
        backend_t<float> backend;
        optimizer_t<float> opt(backend, cfg);
        const auto id = opt.add_parameter(m, n);
        REQUIRE(opt.layer_state(id).low_rank);
        w = gaussian_matrix(m, n, 1).cast<float>();
        for (std::uint64_t s = 0; s < 5; ++s) {
            const RowMatT<float> g = gaussian_matrix(m, n, 1000 + s).cast<float>();
            REQUIRE(opt.step(id, mv(w), cv(g)) == status::ok);
        }
        basis = copy_of(opt.basis(id));
        rep = opt.layer_state(id).last_refresh;
        return opt.save_state();
    };
    RowMatT<float> w1, w2, w3, b1, b2, b3;
    adarank::subspace_report r1, r2, r3;
    const auto s1 = run(7, w1, b1, r1), s2 = run(7, w2, b2, r2);
    CHECK_FALSE(r1.exact);   // the randomized path
    CHECK(r1.warm);
    CHECK(r1.rank == 8);
    CHECK(test::same_bits(w1, w2));
    CHECK(test::same_bits(b1, b2));
    CHECK(s1 == s2);
    run(8, w3, b3, r3);
    CHECK_FALSE(r3.exact);
    REQUIRE(b3.rows() == b1.rows());
    CHECK(rel_diff(b3, b1) > 1e-2);
    CHECK_FALSE(test::same_bits(w1, w3));
}

// ================================================================================ 9. state

TEST_CASE("state: save, load and continue bit-identically; damaged or foreign blobs are rejected and change nothing") {
    using B = backend_t<float>;
    const index_t m = 24, n = 40;
    adarank::optimizer_config cfg;
    cfg.adam = hyper(1e-2, 0.01);
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 6);
    cfg.refresh = adarank::refresh_policy::converged(0.5, 2, 3);   // refreshes inside both halves
    cfg.rsvd.oversampling = 2;                                       // k = 8 < 12: randomized, the stream position matters
    auto grads = [&](std::uint64_t s) { return RowMatT<float>(gaussian_matrix(m, n, 1100 + s).cast<float>()); };
    auto bias_grad = [&](std::uint64_t s) { return RowMatT<float>(gaussian_matrix(1, n, 1200 + s).cast<float>()); };
    B backend;
    auto make = [&](const adarank::optimizer_config& c) {
        optimizer_t<float> o(backend, c);
        o.add_parameter(m, n, param_kind::low_rank);
        o.add_parameter(1, n);
        return o;
    };
    optimizer_t<float> a = make(cfg);
    RowMatT<float> w = gaussian_matrix(m, n, 1).cast<float>(), bias = RowMatT<float>::Zero(1, n);
    const int k = 5, more = 6;
    for (int s = 0; s < k; ++s) {
        REQUIRE(a.step(0, mv(w), cv(grads(std::uint64_t(s)))) == status::ok);
        REQUIRE(a.step(1, mv(bias), cv(bias_grad(std::uint64_t(s)))) == status::ok);
    }
    const auto blob = a.save_state();
    const RowMatT<float> w_saved = w, bias_saved = bias;
    CHECK_FALSE(a.layer_state(0).last_refresh.exact);
    const auto refreshes_at_save = a.layer_state(0).refreshes;
    auto continue_run = [&](optimizer_t<float>& o, RowMatT<float>& ww, RowMatT<float>& bb) {
        for (int s = k; s < k + more; ++s) {
            REQUIRE(o.step(0, mv(ww), cv(grads(std::uint64_t(s)))) == status::ok);
            REQUIRE(o.step(1, mv(bb), cv(bias_grad(std::uint64_t(s)))) == status::ok);
        }
    };
    continue_run(a, w, bias);
    CHECK(a.layer_state(0).refreshes > refreshes_at_save);   // the continuation crossed a randomized refresh

    SUBCASE("in memory, with another learning rate configured (the saved one is restored)") {
        auto c2 = cfg;
        c2.adam.lr = 0.5;
        optimizer_t<float> b = make(c2);
        b.load_state(blob);
        CHECK(b.learning_rate() == cfg.adam.lr);
        RowMatT<float> wb = w_saved, bb = bias_saved;
        continue_run(b, wb, bb);
        CHECK(test::same_bits(wb, w));
        CHECK(test::same_bits(bb, bias));
        // (The blobs differ only in the configured learning rate they record.)
        CHECK(test::same_bits(b.basis(0), a.basis(0)));
        CHECK(test::same_bits(b.first_moment(0), a.first_moment(0)));
        CHECK(test::same_bits(b.second_moment(0), a.second_moment(0)));
        CHECK(test::same_bits(b.second_moment(1), a.second_moment(1)));
        CHECK(b.layer_state(0).rank == a.layer_state(0).rank);
        CHECK(b.layer_state(0).refreshes == a.layer_state(0).refreshes);
        CHECK(b.layer_state(0).steps == a.layer_state(0).steps);
    }
    SUBCASE("into the optimizer that saved it, after it moved on (its rank and buffers may differ)") {
        const auto after = a.save_state();
        const RowMatT<float> w_after = w, bias_after = bias;
        a.load_state(blob);
        CHECK(a.save_state() == blob);
        RowMatT<float> wb = w_saved, bb = bias_saved;
        continue_run(a, wb, bb);
        CHECK(test::same_bits(wb, w_after));
        CHECK(test::same_bits(bb, bias_after));
        CHECK(a.save_state() == after);
    }
    SUBCASE("through a file") {
        const std::string path = "adarank_test_state.bin";
        velora::write_state_file(path, blob);
        optimizer_t<float> b = make(cfg);
        b.load_state(velora::read_state_file(path));
        std::remove(path.c_str());
        RowMatT<float> wb = w_saved, bb = bias_saved;
        continue_run(b, wb, bb);
        CHECK(test::same_bits(wb, w));
        CHECK(test::same_bits(bb, bias));
        CHECK(b.save_state() == a.save_state());
    }
    SUBCASE("bad blobs") {
        const char* fn = "adarank::low_rank_adamw::load_state";
        const auto live = a.save_state();
        contains(state_error_message([&] { a.load_state(std::span(blob).first(blob.size() - 9)); }), {fn, "truncated"});
        contains(state_error_message([&] { a.load_state(std::span(blob).first(10)); }), {fn, "too short"});
        auto flipped = blob;
        flipped[flipped.size() / 2] ^= std::byte{0x10};
        contains(state_error_message([&] { a.load_state(flipped); }), {fn, "checksum mismatch"});
        velora::compressor<B> comp(backend, 8, {.groups = 2});
        contains(state_error_message([&] { a.load_state(comp.save_state()); }), {fn, "kind 'velora.compressor'", "'adarank.low_rank_adamw'"});
        const auto newer = [] {
            velora::state_writer sw(optimizer_t<float>::state_kind, optimizer_t<float>::state_version + 1);
            sw.put(std::uint8_t{4});
            return std::move(sw).finish();
        }();
        const std::string newer_version = "state version " + std::to_string(optimizer_t<float>::state_version + 1);
        contains(state_error_message([&] { a.load_state(newer); }), {fn, newer_version.c_str(), "not supported"});
        auto other_rank = cfg;
        other_rank.rank.r_max = 5;
        optimizer_t<float> c = make(other_rank);
        contains(state_error_message([&] { c.load_state(blob); }), {fn, "different optimizer configuration", "rank policy differs"});
        auto other_seed = cfg;
        other_seed.seed = 99;
        optimizer_t<float> c2 = make(other_seed);
        contains(state_error_message([&] { c2.load_state(blob); }), {fn, "seed differs"});
        optimizer_t<float> shapes(backend, cfg);
        shapes.add_parameter(m, n + 1, param_kind::low_rank);
        shapes.add_parameter(1, n);
        contains(state_error_message([&] { shapes.load_state(blob); }), {fn, "parameter 0 was saved as 24x40 low-rank", "registered as 24x41"});
        optimizer_t<float> kinds(backend, cfg);
        kinds.add_parameter(m, n, param_kind::dense);
        kinds.add_parameter(1, n);
        contains(state_error_message([&] { kinds.load_state(blob); }), {fn, "saved as 24x40 low-rank", "registered as 24x40 dense"});
        optimizer_t<float> fewer(backend, cfg);
        fewer.add_parameter(m, n, param_kind::low_rank);
        contains(state_error_message([&] { fewer.load_state(blob); }), {fn, "holds 2 parameters", "1 are registered"});
        backend_t<double> dbackend;
        optimizer_t<double> wide(dbackend, cfg);
        wide.add_parameter(m, n, param_kind::low_rank);
        wide.add_parameter(1, n);
        const auto wide_before = wide.save_state();
        contains(state_error_message([&] { wide.load_state(blob); }), {fn, "4-byte values", "uses 8"});
        CHECK(wide.save_state() == wide_before);
        // The live optimizer is untouched by every failed load.
        CHECK(a.save_state() == live);
        CHECK(c.save_state() == make(other_rank).save_state());
    }
}

TEST_CASE("state: a well-formed blob with a negative or non-finite second moment is rejected and changes nothing") {
    // The last array of a blob is the second moment of the last parameter, so its last element
    // sits right before the 8-byte checksum; rewrite it and re-sign the blob.
    backend_t<float> backend;
    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
    optimizer_t<float> opt(backend, cfg);
    const auto id = opt.add_parameter(12, 20, param_kind::low_rank);
    RowMatT<float> w = gaussian_matrix(12, 20, 1).cast<float>();
    const RowMatT<float> g = gaussian_matrix(12, 20, 2).cast<float>();
    REQUIRE(opt.step(id, mv(w), cv(g)) == status::ok);
    const auto good = opt.save_state();
    for (const float bad : {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        CAPTURE(bad);
        auto blob = good;
        REQUIRE(blob.size() > sizeof(std::uint64_t) + sizeof(float));
        const std::size_t body = blob.size() - sizeof(std::uint64_t);
        std::memcpy(&blob[body - sizeof(float)], &bad, sizeof(float));
        const std::uint64_t sum = velora::fnv1a64(std::span<const std::byte>(blob.data(), body));
        std::memcpy(blob.data() + body, &sum, sizeof sum);
        optimizer_t<float> fresh(backend, cfg);
        fresh.add_parameter(12, 20, param_kind::low_rank);
        const auto before = fresh.save_state();
        try {
            fresh.load_state(blob);
            FAIL("load_state accepted a damaged second moment");
        } catch (const velora::state_format_error& e) {
            CHECK(std::string(e.what()).find("second moment has a non-finite or negative entry") != std::string::npos);
        }
        CHECK(fresh.save_state() == before);
    }
}

TEST_CASE("state: a VeLoRA compressor + low-rank optimizer run resumes bit-identically") {
    using T = float;
    const index_t t = 32, o = 16, d = 30, g = 6;
    adarank::optimizer_config cfg;
    cfg.adam = hyper(1e-2, 0.0);
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
    cfg.refresh = adarank::refresh_policy::every(2);
    cfg.rsvd.exact_fraction = 1.0;
    cfg.rsvd.oversampling = 2;
    backend_t<T> backend;
    auto run = [&](velora_layer<T>& layer, optimizer_t<T>& opt, RowMatT<T>& w, int first, int last) {
        for (int s = first; s < last; ++s) REQUIRE(opt.step(0, mv(w), layer.next(1300 + 3 * std::uint64_t(s))) == status::ok);
    };
    velora_layer<T> la(backend, t, o, d, g, velora::v_mode::ema(0.8));
    optimizer_t<T> oa(backend, cfg);
    oa.add_parameter(o, d, param_kind::low_rank);
    RowMatT<T> wa = gaussian_matrix(o, d, 2).template cast<T>();
    run(la, oa, wa, 0, 3);
    const auto comp_blob = la.comp.save_state();
    const auto opt_blob = oa.save_state();
    const RowMatT<T> w_saved = wa;
    run(la, oa, wa, 3, 8);

    velora_layer<T> lb(backend, t, o, d, g, velora::v_mode::ema(0.8));
    optimizer_t<T> ob(backend, cfg);
    ob.add_parameter(o, d, param_kind::low_rank);
    lb.comp.load_state(comp_blob);
    ob.load_state(opt_blob);
    RowMatT<T> wb = w_saved;
    run(lb, ob, wb, 3, 8);
    CHECK(test::same_bits(wa, wb));
    CHECK(ob.save_state() == oa.save_state());
    CHECK(lb.comp.save_state() == la.comp.save_state());
    CHECK(oa.layer_state(0).refreshes == 4);   // steps 1, 3, 5, 7
}

// ================================================================================ 10. reporting and refresh rules

TEST_CASE_TEMPLATE("reporting: rank, refreshes, state bytes, side choice", T, float, double) {
    backend_t<T> backend;
    SUBCASE("state bytes and the exact rank of a rank-3 gradient") {
        for (const bool randomized : {false, true}) {
            CAPTURE(randomized);
            adarank::optimizer_config cfg;
            cfg.rank = adarank::rank_policy::adaptive(1e-3, 1, 8);
            cfg.rsvd.oversampling = 2;
            cfg.rsvd.exact_fraction = randomized ? 1.0 : 0.0;
            optimizer_t<T> opt(backend, cfg);
            const auto id = opt.add_parameter(30, 20, param_kind::low_rank), did = opt.add_parameter(30, 20, param_kind::dense);
            CHECK(opt.layer_state(id).rank == 0);
            CHECK(opt.layer_state(id).state_bytes == 0);
            RowMatT<T> w = RowMatT<T>::Zero(30, 20), wd = w;
            const RowMatT<T> g = with_spectrum(30, 20, {5.0, 3.0, 2.0}, 21).template cast<T>();
            REQUIRE(opt.step(id, mv(w), cv(g)) == status::ok);
            REQUIRE(opt.step(did, mv(wd), cv(g)) == status::ok);
            const auto info = opt.layer_state(id);
            CHECK(info.rows == 30);
            CHECK(info.cols == 20);
            CHECK(info.low_rank);
            CHECK(info.side == projection_side::right);   // std, 30 >= 20
            CHECK(info.rank == 3);
            CHECK(info.refreshes == 1);
            CHECK(info.steps == 1);
            CHECK(info.last_refresh.exact == !randomized);
            CHECK(info.last_refresh.rank == 3);
            CHECK(info.last_refresh.energy == doctest::Approx(38.0).epsilon(1e-4));
            CHECK(info.projected_norm2 == doctest::Approx(38.0).epsilon(1e-4));
            CHECK(info.state_bytes == static_cast<std::size_t>(3 * 20 + 2 * 3 * 30) * sizeof(T));
            CHECK(opt.layer_state(did).state_bytes == static_cast<std::size_t>(2 * 30 * 20) * sizeof(T));
            CHECK(opt.state_bytes() == info.state_bytes + opt.layer_state(did).state_bytes);
            CHECK(opt.basis(id).rows == 3);
            CHECK(opt.first_moment(id).rows == 3);
            CHECK(opt.first_moment(id).cols == 30);
            CHECK(opt.first_moment(did).rows == 30);
            CHECK(opt.workspace_bytes() > 0);
        }
    }
    SUBCASE("side choice: std / reverse_std for m < n and m >= n, and the memory each costs") {
        struct side_case {
            index_t m, n;
            side_policy policy;
            projection_side expect;
        };
        for (const auto& c : {side_case{8, 5, side_policy::standard, projection_side::right}, side_case{5, 8, side_policy::standard, projection_side::left},
                              side_case{6, 6, side_policy::standard, projection_side::right},
                              side_case{8, 5, side_policy::reverse_standard, projection_side::left},
                              side_case{5, 8, side_policy::reverse_standard, projection_side::right},
                              side_case{6, 6, side_policy::reverse_standard, projection_side::left},
                              side_case{8, 5, side_policy::left, projection_side::left}, side_case{5, 8, side_policy::right, projection_side::right}}) {
            CAPTURE(c.m);
            CAPTURE(c.n);
            CAPTURE(adarank::to_string(c.policy));
            adarank::optimizer_config cfg;
            cfg.side = c.policy;
            cfg.rank = adarank::rank_policy::fixed(2);
            optimizer_t<T> opt(backend, cfg);
            const auto id = opt.add_parameter(c.m, c.n, param_kind::low_rank);
            CHECK(opt.layer_state(id).side == c.expect);
            RowMatT<T> w = RowMatT<T>::Zero(c.m, c.n);
            REQUIRE(opt.step(id, mv(w), cv(RowMatT<T>(gaussian_matrix(c.m, c.n, 31).template cast<T>()))) == status::ok);
            const index_t len = c.expect == projection_side::left ? c.m : c.n, other = c.m + c.n - len;
            CHECK(opt.basis(id).cols == len);
            CHECK(opt.first_moment(id).cols == other);
            CHECK(opt.layer_state(id).state_bytes == static_cast<std::size_t>(2 * len + 4 * other) * sizeof(T));
            if (c.m != c.n && c.policy == side_policy::reverse_standard)   // reverse_std holds the moments on the short side: less memory
                CHECK(opt.layer_state(id).state_bytes < static_cast<std::size_t>(2 * std::min(c.m, c.n) + 4 * std::max(c.m, c.n)) * sizeof(T));
        }
    }
    SUBCASE("automatic kind: vectors and small matrices dense, large matrices with a small rank low-rank") {
        adarank::optimizer_config cfg;
        cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
        optimizer_t<T> opt(backend, cfg);
        CHECK_FALSE(opt.layer_state(opt.add_parameter(1, 64)).low_rank);
        CHECK_FALSE(opt.layer_state(opt.add_parameter(64, 1)).low_rank);
        CHECK_FALSE(opt.layer_state(opt.add_parameter(4, 4)).low_rank);   // 4·(4 + 8) = 48 >= 2·16
        CHECK(opt.layer_state(opt.add_parameter(32, 48)).low_rank);
    }
}

TEST_CASE("refresh rules: every(T), converged(eps) and captured_energy(tau) fire when they should") {
    using T = double;
    backend_t<T> backend;
    const index_t m = 10, n = 16;   // std: left, len = 10
    const Mat g0 = with_spectrum(m, n, {3.0, 2.0}, 41);
    auto base = [] {
        adarank::optimizer_config cfg;
        cfg.adam = hyper(1e-3, 0.0);
        cfg.rank = adarank::rank_policy::adaptive(1e-3, 1, 4);
        return cfg;
    };
    SUBCASE("every(3): refreshes at steps 1, 4, 7, 10") {
        auto cfg = base();
        cfg.refresh = adarank::refresh_policy::every(3);
        optimizer_t<T> opt(backend, cfg);
        const auto id = opt.add_parameter(m, n, param_kind::low_rank);
        RowMat w = RowMat::Zero(m, n);
        const std::uint64_t expect_refreshes[] = {1, 1, 1, 2, 2, 2, 3, 3, 3, 4};
        const std::uint64_t expect_since[] = {1, 2, 3, 1, 2, 3, 1, 2, 3, 1};
        for (int s = 0; s < 10; ++s) {
            CAPTURE(s);
            REQUIRE(opt.step(id, mv(w), cv(RowMat(gaussian_matrix(m, n, 50 + std::uint64_t(s))))) == status::ok);
            CHECK(opt.layer_state(id).refreshes == expect_refreshes[s]);
            CHECK(opt.layer_state(id).steps_in_subspace == expect_since[s]);
        }
    }
    SUBCASE("converged(0.5): when ‖Ĝ‖ falls to half its value at the refresh, not before min_interval, always at max_interval") {
        auto cfg = base();
        cfg.refresh = adarank::refresh_policy::converged(0.5, 2, 6);
        optimizer_t<T> opt(backend, cfg);
        const auto id = opt.add_parameter(m, n, param_kind::low_rank);
        RowMat w = RowMat::Zero(m, n);
        // scale of the gradient G = c·G0 at each step, and the refresh count expected after it.
        const double c[] = {1.0, 0.3, 0.9, 0.8, 0.6, 0.4, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0};
        const std::uint64_t expect[] = {1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3};
        // step 2: c = 0.3 but only 1 step in the subspace (< min_interval 2): no refresh.
        // step 6: ‖Ĝ‖² = 0.16·anchor <= 0.25·anchor: refresh (the new anchor is 0.16·‖G0‖²); the
        // larger gradients after it never converge, so max_interval 6 forces the next refresh at step 12.
        for (int s = 0; s < 13; ++s) {
            CAPTURE(s);
            REQUIRE(opt.step(id, mv(w), cv(RowMat(c[s] * g0))) == status::ok);
            CHECK(opt.layer_state(id).refreshes == expect[s]);
            CHECK(opt.layer_state(id).rank == 2);
        }
        CHECK(opt.layer_state(id).projected_norm2 == doctest::Approx(13.0).epsilon(1e-9));
    }
    SUBCASE("captured_energy(0.5): when the gradient leaves the subspace") {
        auto cfg = base();
        cfg.refresh = adarank::refresh_policy::captured_energy(0.5, 1, 100);
        optimizer_t<T> opt(backend, cfg);
        const auto id = opt.add_parameter(m, n, param_kind::low_rank);
        RowMat w = RowMat::Zero(m, n);
        REQUIRE(opt.step(id, mv(w), cv(RowMat(g0))) == status::ok);
        REQUIRE(opt.step(id, mv(w), cv(RowMat(0.5 * g0))) == status::ok);   // still inside: no refresh
        CHECK(opt.layer_state(id).refreshes == 1);
        // A gradient whose column space is orthogonal to g0's: Ĝ = 0.
        const Mat p = Mat::Identity(m, m) - to_mat(opt.basis(id)).transpose() * to_mat(opt.basis(id));
        const Mat g1 = p * gaussian_matrix(m, n, 43);
        REQUIRE(opt.step(id, mv(w), cv(RowMat(g1))) == status::ok);
        CHECK(opt.layer_state(id).refreshes == 2);
        // The new subspace is g1's leading one (exact path here: k = min(4 + 10, 10) = 10): it captures
        // the top r_max = 4 singular values of g1 and is orthogonal to the old subspace.
        const Mat b = to_mat(opt.basis(id));
        CHECK(opt.layer_state(id).last_refresh.exact);
        REQUIRE(b.rows() == 4);
        const Eigen::VectorXd sv = Eigen::JacobiSVD<Mat>(g1).singularValues();
        CHECK((b * g1).squaredNorm() == doctest::Approx(sv.head(4).squaredNorm()).epsilon(1e-9));
        CHECK((b * (Mat::Identity(m, m) - p)).norm() < 1e-9);
        CHECK(opt.layer_state(id).projected_norm2 == doctest::Approx((b * g1).squaredNorm()).epsilon(1e-9));
    }
}

// ================================================================================ set_basis and the converged rule

TEST_CASE("converged(eps) after set_basis measures the fall of ‖Ĝ‖ from the first step in the new subspace") {
    // set_basis documents that "the refresh policy counts from here", but it leaves the anchor
    // ‖Ĝ_{t0}‖² at its old value (0 before the first step), so converged(eps) cannot fire until
    // max_interval.
    using T = double;
    backend_t<T> backend;
    const index_t m = 10, n = 16;
    const Mat g0 = with_spectrum(m, n, {3.0, 2.0}, 41);
    adarank::optimizer_config cfg;
    cfg.adam = hyper(1e-3, 0.0);
    cfg.rank = adarank::rank_policy::fixed(2);
    cfg.refresh = adarank::refresh_policy::converged(0.5, 1, 50);
    optimizer_t<T> opt(backend, cfg);
    const auto id = opt.add_parameter(m, n, param_kind::low_rank);
    // The exact left singular vectors of g0 as the basis.
    const Eigen::JacobiSVD<Mat> svd(g0, Eigen::ComputeThinU);
    const RowMat basis = svd.matrixU().leftCols(2).transpose();
    REQUIRE(opt.set_basis(id, cv(basis)) == status::ok);
    RowMat w = RowMat::Zero(m, n);
    const double c[] = {1.0, 0.9, 0.3, 0.3};
    for (double scale : c) REQUIRE(opt.step(id, mv(w), cv(RowMat(scale * g0))) == status::ok);
    // ‖Ĝ‖ fell to 0.3 of its value at the first step in the subspace: a refresh was due at step 3.
    CHECK(opt.layer_state(id).refreshes == 2);
}

// ================================================================================ strided views

TEST_CASE("strided weight and gradient views (ld > cols) step like contiguous ones and leave the gaps alone") {
    using T = double;
    const index_t m = 12, n = 18, pad = 5;
    adarank::optimizer_config cfg;
    cfg.adam = hyper(1e-2, 0.01);
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
    cfg.refresh = adarank::refresh_policy::every(2);
    for (const auto kind : {param_kind::low_rank, param_kind::dense}) {
        CAPTURE(static_cast<int>(kind));
        backend_t<T> backend;
        optimizer_t<T> packed(backend, cfg), strided(backend, cfg);
        packed.add_parameter(m, n, kind);
        strided.add_parameter(m, n, kind);
        RowMat w = gaussian_matrix(m, n, 1);
        RowMat w_big = RowMat::Constant(m, n + pad, 7.0), g_big = RowMat::Constant(m, n + pad, std::numeric_limits<T>::quiet_NaN());
        w_big.leftCols(n) = w;
        for (std::uint64_t s = 0; s < 5; ++s) {
            const RowMat g = gaussian_matrix(m, n, 60 + s);
            g_big.leftCols(n) = g;
            REQUIRE(packed.step(0, mv(w), cv(g)) == status::ok);
            REQUIRE(strided.step(0, velora::make_view(w_big.data(), m, n, n + pad), velora::make_view<const T>(g_big.data(), m, n, n + pad)) ==
                    status::ok);
        }
        CHECK(rel_diff(RowMat(w_big.leftCols(n)), w) < 1e-13);
        CHECK((w_big.rightCols(pad).array() == 7.0).all());
    }
}

// ================================================================================ suspected library bugs

TEST_CASE("a NaN in an all-padding group of a factored gradient never corrupts the weight") {
    // G = scale·A·(I_G ⊗ vᵀ) with the columns past D dropped: for D = 30, G = 16 (s = 2) the last
    // group has no real column, so A[:, 15] does not enter G (its dense expansion is finite).
    // The optimizer must then either step normally (finite W) or reject the step with
    // non_finite_input and change nothing. It does neither on a randomized refresh: norm2() of the
    // factored gradient skips the padding group, but the sketch product X·Gᵀ (times_t) multiplies
    // the zero projection of the padding group by A's NaN column, the NaN basis is committed, and
    // step returns ok with W all NaN.
    using T = double;
    const index_t t = 64, o = 40, d = 30, g = 16;
    for (const auto side : {side_policy::left, side_policy::right}) {
        for (const int phase : {0, 2}) {
            CAPTURE(adarank::to_string(side));
            CAPTURE(phase);
            adarank::optimizer_config cfg;
            cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 3);
            cfg.refresh = adarank::refresh_policy::every(2);
            cfg.rsvd.oversampling = 2;
            cfg.rsvd.exact_fraction = 1.0;   // randomized sketch
            cfg.side = side;
            backend_t<T> backend;
            optimizer_t<T> opt(backend, cfg);
            const auto id = opt.add_parameter(o, d, param_kind::low_rank);
            velora_layer<T> layer(backend, t, o, d, g);
            RowMat w = gaussian_matrix(o, d, 3);
            for (int s = 0; s < phase; ++s) REQUIRE(opt.step(id, mv(w), layer.next(1500 + 3 * std::uint64_t(s))) == status::ok);
            const auto blob = opt.save_state();
            const RowMat w_before = w;
            const auto f = layer.next(1600);
            layer.a(1, g - 1) = std::numeric_limits<T>::quiet_NaN();
            RowMat dense(o, d);
            layer.comp.expand_weight_grad(layer.record, cv(layer.a), mv(dense));
            REQUIRE(dense.allFinite());   // the gradient itself is finite
            const status st = opt.step(id, mv(w), f);
            CAPTURE(velora::to_string(st));
            if (st == status::non_finite_input) {
                CHECK(opt.save_state() == blob);
                CHECK(test::same_bits(w, w_before));
            } else {
                CHECK(w.allFinite());
                CHECK(to_mat(opt.basis(id)).allFinite());
            }
        }
    }
}

// ================================================================================ 12. sizes, state validity, overflow

namespace {

// The payload of a low_rank_adamw blob field by field (the layout of save_state), so that a test
// can change one field and re-seal the blob with a valid checksum: the loader must then judge the
// meaning of the state, not its integrity.
template <class T>
struct state_fields {
    struct layer {
        std::int64_t rows = 0, cols = 0;
        std::uint8_t low_rank = 0, side = 0;
        std::int64_t rank = 0;
        std::uint64_t t = 0, since = 0, refreshes = 0, counter = 0;
        double anchor2 = 0, projected_norm2 = 0;
        std::int64_t rep_rank = 0, rep_sketch = 0;
        std::int32_t rep_power = 0;
        std::uint8_t rep_exact = 0, rep_warm = 0;
        double rep_energy = 0, rep_captured = 0;
        std::vector<T> basis, m, v;
    };
    static constexpr std::size_t config_bytes = 152;   // put_config: 134 bytes up to version 2, then twice one byte and one int64
    // Version 3 added the moment state format (a byte) and its block size (an int64) at the end,
    // version 4 the basis format (a byte) and its block size (an int64) after them.

    std::uint8_t width = 0;
    std::vector<std::byte> config;
    double lr = 0;
    std::vector<layer> layers;

    explicit state_fields(std::span<const std::byte> blob) {
        velora::state_reader r(blob, optimizer_t<T>::state_kind, optimizer_t<T>::state_version, "test::state_fields");
        width = r.get<std::uint8_t>();
        for (std::size_t i = 0; i < config_bytes; ++i) config.push_back(r.get<std::byte>());
        lr = r.get<double>();
        const auto count = r.get<std::uint64_t>();
        for (std::uint64_t i = 0; i < count; ++i) {
            layer l;
            l.rows = r.get<std::int64_t>();
            l.cols = r.get<std::int64_t>();
            l.low_rank = r.get<std::uint8_t>();
            l.side = r.get<std::uint8_t>();
            l.rank = r.get<std::int64_t>();
            l.t = r.get<std::uint64_t>();
            l.since = r.get<std::uint64_t>();
            l.refreshes = r.get<std::uint64_t>();
            l.counter = r.get<std::uint64_t>();
            l.anchor2 = r.get<double>();
            l.projected_norm2 = r.get<double>();
            l.rep_rank = r.get<std::int64_t>();
            l.rep_sketch = r.get<std::int64_t>();
            l.rep_power = r.get<std::int32_t>();
            l.rep_exact = r.get<std::uint8_t>();
            l.rep_warm = r.get<std::uint8_t>();
            l.rep_energy = r.get<double>();
            l.rep_captured = r.get<double>();
            l.basis = r.get_array<T>();
            l.m = r.get_array<T>();
            l.v = r.get_array<T>();
            layers.push_back(std::move(l));
        }
        r.expect_end();
    }

    // Version 1 is the same layout without the configuration's Adam convention byte (after the
    // five Adam doubles).
    static constexpr std::size_t convention_offset = 5 * 8;
    [[nodiscard]] std::vector<std::byte> seal(std::uint32_t version = optimizer_t<T>::state_version) const {
        velora::state_writer w(optimizer_t<T>::state_kind, version);
        w.put(width);
        for (std::size_t i = 0; i < config.size(); ++i)
            if ((version >= 2 || i != convention_offset) && (version >= 3 || i < config_bytes - 18) && (version >= 4 || i < config_bytes - 9))
                w.put(config[i]);
        w.put(lr);
        w.put(static_cast<std::uint64_t>(layers.size()));
        for (const layer& l : layers) {
            w.put(l.rows);
            w.put(l.cols);
            w.put(l.low_rank);
            w.put(l.side);
            w.put(l.rank);
            w.put(l.t);
            w.put(l.since);
            w.put(l.refreshes);
            w.put(l.counter);
            w.put(l.anchor2);
            w.put(l.projected_norm2);
            w.put(l.rep_rank);
            w.put(l.rep_sketch);
            w.put(l.rep_power);
            w.put(l.rep_exact);
            w.put(l.rep_warm);
            w.put(l.rep_energy);
            w.put(l.rep_captured);
            w.put_array(std::span<const T>(l.basis));
            w.put_array(std::span<const T>(l.m));
            w.put_array(std::span<const T>(l.v));
        }
        return std::move(w).finish();
    }
};

// max |B·Bᵀ − I| of a basis (rank×len) in double.
template <class T>
double orthonormality_deviation(velora::const_matrix_view<T> b) {
    const Mat m = to_mat(b);
    return (m * m.transpose() - Mat::Identity(m.rows(), m.rows())).cwiseAbs().maxCoeff();
}

// A small optimizer with a low-rank parameter on each side and a dense one, `steps` steps taken
// with Gaussian gradients (refresh every 2 steps, adaptive rank: bases, moments and reports are
// all non-trivial).
template <class T>
struct small_run {
    backend_t<T> backend;
    adarank::optimizer_config cfg;
    optimizer_t<T> opt;
    std::vector<RowMatT<T>> w;
    static constexpr index_t shapes[3][2] = {{12, 20}, {20, 12}, {3, 5}};

    static adarank::optimizer_config config() {
        adarank::optimizer_config c;
        c.adam = hyper(1e-2, 0.01);
        c.rank = adarank::rank_policy::adaptive(0.3, 1, 4);
        c.refresh = adarank::refresh_policy::every(2);
        c.rsvd.oversampling = 2;
        c.rsvd.exact_fraction = 1.0;
        return c;
    }
    explicit small_run(int steps) : cfg(config()), opt(backend, cfg) {
        opt.add_parameter(12, 20, param_kind::low_rank);   // left
        opt.add_parameter(20, 12, param_kind::low_rank);   // right
        opt.add_parameter(3, 5, param_kind::dense);
        for (index_t p = 0; p < 3; ++p) w.push_back(gaussian_matrix(shapes[p][0], shapes[p][1], 10 + std::uint64_t(p)).template cast<T>());
        for (int s = 0; s < steps; ++s)
            for (index_t p = 0; p < 3; ++p) REQUIRE(opt.step(p, mv(w[std::size_t(p)]), cv(grad(p, std::uint64_t(s)))) == status::ok);
    }
    RowMatT<T> grad(index_t p, std::uint64_t s) const {
        return gaussian_matrix(shapes[p][0], shapes[p][1], 5000 + 100 * std::uint64_t(p) + s).template cast<T>();
    }
    optimizer_t<T> fresh() {
        optimizer_t<T> o(backend, cfg);
        o.add_parameter(12, 20, param_kind::low_rank);
        o.add_parameter(20, 12, param_kind::low_rank);
        o.add_parameter(3, 5, param_kind::dense);
        return o;
    }
};

} // namespace

TEST_CASE("add_parameter and step reject sizes whose products overflow with std::invalid_argument, and register nothing") {
    using test::invalid_argument_message;
    const char* fn = "adarank::low_rank_adamw::add_parameter";
    const index_t big = index_t{1} << 31;
    struct size_case {
        index_t rows, cols;
        param_kind kind;
        const char* expect;
    };
    {
        backend_t<float> backend;
        optimizer_t<float> opt(backend);
        opt.add_parameter(4, 6);
        const auto before = opt.save_state();
        const auto workspace = opt.workspace_bytes();
        for (const auto& c : {size_case{big, big, param_kind::dense, "4611686018427387904 elements of 4 bytes"},
                              size_case{big, big, param_kind::low_rank, "4611686018427387904 elements of 4 bytes"},
                              size_case{big, big, param_kind::automatic, "4611686018427387904 elements of 4 bytes"},
                              size_case{index_t{1} << 62, 4, param_kind::automatic, "4611686018427387904 x 4 overflows"},
                              size_case{std::numeric_limits<index_t>::max(), 2, param_kind::low_rank, "overflows"},
                              size_case{3, std::numeric_limits<index_t>::max(), param_kind::dense, "overflows"},
                              // one moment fits in the address space, the two of dense AdamW do not
                              size_case{index_t{1} << 40, index_t{1} << 20, param_kind::dense, "exceeds the address space"}}) {
            CAPTURE(c.rows);
            CAPTURE(c.cols);
            CAPTURE(static_cast<int>(c.kind));
            contains(invalid_argument_message([&] { (void)opt.add_parameter(c.rows, c.cols, c.kind); }), {fn, c.expect});
            CHECK(opt.size() == 1);
            CHECK(opt.save_state() == before);
            CHECK(opt.workspace_bytes() == workspace);
        }
    }
    {
        backend_t<double> backend;
        optimizer_t<double> opt(backend);
        contains(invalid_argument_message([&] { (void)opt.add_parameter(big / 2, big, param_kind::dense); }),
                 {fn, "2305843009213693952 elements of 8 bytes"});
        CHECK(opt.size() == 0);
    }
    {   // A factored gradient whose s·G wraps around to a value that covers D.
        backend_t<float> backend;
        optimizer_t<float> opt(backend);
        const auto id = opt.add_parameter(4, 4, param_kind::low_rank);
        RowMatT<float> w = RowMatT<float>::Ones(4, 4), a = RowMatT<float>::Ones(4, 4);
        const std::vector<float> v(4, 0.5f);
        velora::factored_gradient<float> f{cv(a), v.data(), (index_t{1} << 62) + 1, 4, 1.0f};
        const auto before = opt.save_state();
        contains(invalid_argument_message([&] { (void)opt.step(id, mv(w), f); }),
                 {"adarank::low_rank_adamw::step", "grad.subtoken_size", "4611686018427387905 x 4 overflows"});
        CHECK(opt.save_state() == before);
        CHECK((w.array() == 1.0f).all());
    }
}

TEST_CASE_TEMPLATE("a finite gradient too large for the value type returns overflow and changes nothing", T, float, double) {
    // Float: g² overflows from |g| ≈ 1.8e19 (a projection adds up to √len to that); double from 1.3e154.
    const std::vector<double> huge = sizeof(T) == 4 ? std::vector<double>{1e20, 1e30, 3e38} : std::vector<double>{1e160, 1e300};
    const index_t o = 12, d = 20, groups = 5;
    adarank::optimizer_config cfg;
    cfg.adam = hyper(1e-2, 0.01);
    cfg.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
    cfg.refresh = adarank::refresh_policy::every(3);
    struct kind_case {
        param_kind kind;
        side_policy side;
    };
    for (const auto& k : {kind_case{param_kind::dense, side_policy::standard}, kind_case{param_kind::low_rank, side_policy::left},
                          kind_case{param_kind::low_rank, side_policy::right}}) {
        for (const int phase : {0, 2, 3}) {   // good steps before the huge one: first step, mid-subspace, refresh due
            for (const double value : huge) {
                for (const bool factored : {false, true}) {
                    CAPTURE(static_cast<int>(k.kind));
                    CAPTURE(adarank::to_string(k.side));
                    CAPTURE(phase);
                    CAPTURE(value);
                    CAPTURE(factored);
                    auto c = cfg;
                    c.side = k.side;
                    backend_t<T> backend;
                    optimizer_t<T> opt(backend, c);
                    const auto id = opt.add_parameter(o, d, k.kind);
                    velora_layer<T> layer(backend, 24, o, d, groups);
                    RowMatT<T> w = gaussian_matrix(o, d, 3).template cast<T>();
                    for (int s = 0; s < phase; ++s) REQUIRE(opt.step(id, mv(w), layer.next(700 + 3 * std::uint64_t(s))) == status::ok);
                    const auto blob = opt.save_state();
                    const RowMatT<T> w_before = w;
                    auto f = layer.next(799);
                    RowMatT<T> g = RowMatT<T>::Constant(o, d, T(value));
                    g(1, 2) = T(-value);
                    layer.a.setConstant(T(value));
                    const status st = factored ? opt.step(id, mv(w), f) : opt.step(id, mv(w), cv(g));
                    CHECK(velora::to_string(st) == velora::to_string(status::overflow));
                    CHECK(opt.save_state() == blob);
                    CHECK(test::same_bits(w, w_before));
                    // A usable gradient afterwards steps normally.
                    CHECK(opt.step(id, mv(w), layer.next(800)) == status::ok);
                    CHECK(w.allFinite());
                }
            }
        }
    }
    SUBCASE("float at the edge: |g| = 1e19 either steps with finite results or overflows and changes nothing") {
        if constexpr (sizeof(T) == 4) {
            for (const auto kind : {param_kind::dense, param_kind::low_rank}) {
                backend_t<T> backend;
                optimizer_t<T> opt(backend, cfg);
                const auto id = opt.add_parameter(o, d, kind);
                RowMatT<T> w = gaussian_matrix(o, d, 3).template cast<T>();
                REQUIRE(opt.step(id, mv(w), cv(RowMatT<T>(gaussian_matrix(o, d, 4).template cast<T>()))) == status::ok);
                const auto blob = opt.save_state();
                const RowMatT<T> w_before = w;
                const status st = opt.step(id, mv(w), cv(RowMatT<T>(RowMatT<T>::Constant(o, d, T(1e19)))));
                CAPTURE(velora::to_string(st));
                if (st == status::ok) {
                    CHECK(w.allFinite());
                    CHECK(to_mat(opt.first_moment(id)).allFinite());
                    CHECK(to_mat(opt.second_moment(id)).allFinite());
                } else {
                    CHECK(st == status::overflow);
                    CHECK(opt.save_state() == blob);
                    CHECK(test::same_bits(w, w_before));
                }
            }
        }
    }
}

TEST_CASE("a loaded state with finite but huge moments never makes a step return ok with non-finite weights") {
    using T = float;
    for (const double m_value : {3e38, 1e30, 0.0}) {
        for (const double v_value : {0.0, 3e38}) {
            for (const bool every_entry : {false, true}) {
                if (m_value == 0 && v_value == 0) continue;
                CAPTURE(m_value);
                CAPTURE(v_value);
                CAPTURE(every_entry);
                small_run<T> run(3);
                state_fields<T> s(run.opt.save_state());
                for (auto& l : s.layers) {
                    for (std::size_t i = 0; i < l.m.size(); ++i) {
                        if (!every_entry && i != 0) continue;
                        l.m[i] = T(i % 2 ? -m_value : m_value);
                        l.v[i] = T(v_value);
                    }
                }
                optimizer_t<T> opt = run.fresh();
                opt.load_state(s.seal());   // finite moments with v >= 0: a valid state
                for (index_t p = 0; p < 3; ++p) {
                    CAPTURE(p);
                    for (std::uint64_t step = 3; step < 5; ++step) {   // step 4 refreshes (transport of the huge moments)
                        CAPTURE(step);
                        const auto before = opt.save_state();
                        RowMatT<T>& w = run.w[std::size_t(p)];
                        const RowMatT<T> w_before = w;
                        const status st = opt.step(p, mv(w), cv(run.grad(p, step)));
                        CAPTURE(velora::to_string(st));
                        if (st == status::ok) {
                            CHECK(w.allFinite());
                            CHECK(to_mat(opt.first_moment(p)).allFinite());
                            CHECK(to_mat(opt.second_moment(p)).allFinite());
                        } else {
                            CHECK(st == status::overflow);
                            CHECK(test::same_bits(w, w_before));
                            CHECK(opt.save_state() == before);
                        }
                    }
                }
                // Whatever happened, the state is one the loader accepts.
                optimizer_t<T> again = run.fresh();
                CHECK_NOTHROW(again.load_state(opt.save_state()));
            }
        }
    }
}

TEST_CASE("load_state rejects a step counter that cannot be incremented; a step never makes one") {
    using T = float;
    small_run<T> run(3);
    const auto good = run.opt.save_state();
    state_fields<T> s(good);
    REQUIRE(state_fields<T>(good).seal() == good);   // the test's view of the layout is the library's
    const char* fn = "adarank::low_rank_adamw::load_state";
    for (const std::size_t p : {std::size_t{0}, std::size_t{2}}) {
        CAPTURE(p);
        auto bad = s;
        bad.layers[p].t = std::numeric_limits<std::uint64_t>::max();
        optimizer_t<T> opt = run.fresh();
        const auto before = opt.save_state();
        contains(state_error_message([&] { opt.load_state(bad.seal()); }), {fn, "parameter ", "step count", "18446744073709551615"});
        CHECK(opt.save_state() == before);
        // One below the limit loads; its step would reach the limit, so it overflows and changes nothing.
        auto edge = s;
        edge.layers[p].t = std::numeric_limits<std::uint64_t>::max() - 1;
        opt.load_state(edge.seal());
        const auto loaded = opt.save_state();
        RowMatT<T> w = run.w[p];
        const RowMatT<T> w_before = w;
        CHECK(opt.step(index_t(p), mv(w), cv(run.grad(index_t(p), 3))) == status::overflow);
        CHECK(opt.save_state() == loaded);
        CHECK(test::same_bits(w, w_before));
    }
}

TEST_CASE_TEMPLATE("load_state rejects states the optimizer cannot be in, with state_format_error naming the field, and changes nothing", T,
                   float, double) {
    small_run<T> run(3);
    const auto good = run.opt.save_state();
    const state_fields<T> s(good);
    REQUIRE(s.seal() == good);
    REQUIRE(s.layers[0].rank >= 1);
    REQUIRE(s.layers[1].rank >= 1);
    const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
    const double dnan = std::numeric_limits<double>::quiet_NaN();
    struct edit_case {
        const char* name;
        std::function<void(state_fields<T>&)> edit;
        const char* expect;
    };
    const std::vector<edit_case> cases = {
        {"basis entry 1e30", [](auto& x) { x.layers[0].basis[3] = T(1e30); }, "orthonormal"},
        {"basis entry NaN", [&](auto& x) { x.layers[1].basis[0] = nan; }, "basis"},
        {"basis entry Inf", [&](auto& x) { x.layers[1].basis[5] = inf; }, "basis"},
        {"basis all zero", [](auto& x) { std::fill(x.layers[0].basis.begin(), x.layers[0].basis.end(), T(0)); }, "orthonormal"},
        {"basis row scaled by 1.01", [](auto& x) { for (index_t j = 0; j < 12; ++j) x.layers[0].basis[std::size_t(j)] *= T(1.01); }, "orthonormal"},
        {"rank above the cap", [](auto& x) { x.layers[0].rank = 5; }, "rank"},
        {"negative rank", [](auto& x) { x.layers[1].rank = -1; }, "rank"},
        {"dense parameter with a rank", [](auto& x) { x.layers[2].rank = 1; }, "rank"},
        {"report rank differs from the rank", [](auto& x) { x.layers[0].rep_rank = x.layers[0].rank + 1; }, "report"},
        {"report sketch too large", [](auto& x) { x.layers[0].rep_sketch = 13; }, "sketch"},
        {"report power iterations", [](auto& x) { x.layers[1].rep_power = 65; }, "power iterations"},
        {"report energy NaN", [&](auto& x) { x.layers[1].rep_energy = dnan; }, "energy"},
        {"report captured negative", [](auto& x) { x.layers[0].rep_captured = -1.0; }, "captured"},
        {"report flag not 0 or 1", [](auto& x) { x.layers[0].rep_exact = 2; }, "flag"},
        {"kind flag not 0 or 1", [](auto& x) { x.layers[2].low_rank = 7; }, "flag"},
        {"steps in subspace above steps", [](auto& x) { x.layers[0].since = x.layers[0].t + 1; }, "steps in the subspace"},
        {"steps in subspace without a subspace", [](auto& x) { x.layers[2].since = 1; }, "steps in the subspace"},
        {"anchor -2", [](auto& x) { x.layers[0].anchor2 = -2.0; }, "anchor"},
        {"anchor NaN", [&](auto& x) { x.layers[1].anchor2 = dnan; }, "anchor"},
        {"projected norm negative", [](auto& x) { x.layers[0].projected_norm2 = -0.5; }, "projected"},
        {"projected norm Inf", [](auto& x) { x.layers[1].projected_norm2 = std::numeric_limits<double>::infinity(); }, "projected"},
        {"learning rate NaN", [&](auto& x) { x.lr = dnan; }, "learning rate"},
        {"learning rate negative", [](auto& x) { x.lr = -1e-3; }, "learning rate"},
        {"first moment NaN", [&](auto& x) { x.layers[0].m[1] = nan; }, "first moment"},
        {"first moment Inf (dense)", [&](auto& x) { x.layers[2].m[4] = -inf; }, "first moment"},
        {"second moment negative", [](auto& x) { x.layers[1].v[2] = T(-1); }, "second moment"},
        {"second moment NaN (dense)", [&](auto& x) { x.layers[2].v[0] = nan; }, "second moment"},
        // The configuration is compared bit for bit: -0.0 == 0.0, but it would not re-save to the same blob.
        {"refresh threshold -0.0 (configured 0.0)", [](auto& x) { const double z = -0.0; std::memcpy(&x.config[76], &z, sizeof z); },
         "refresh policy differs"},
        {"warm_start flag byte 2", [](auto& x) { x.config[117] = std::byte{2}; }, "flag"},
    };
    REQUIRE(run.cfg.refresh.threshold == 0.0);   // the field the -0.0 case rewrites (offset 76 of the configuration)
    const char* fn = "adarank::low_rank_adamw::load_state";
    for (const auto& c : cases) {
        CAPTURE(c.name);
        state_fields<T> bad = s;
        c.edit(bad);
        optimizer_t<T> opt = run.fresh();
        const auto before = opt.save_state();
        const std::string msg = state_error_message([&] { opt.load_state(bad.seal()); });
        contains(msg, {fn, c.expect});
        CHECK(opt.save_state() == before);
    }
    // The untouched state loads.
    optimizer_t<T> opt = run.fresh();
    CHECK_NOTHROW(opt.load_state(s.seal()));
}

TEST_CASE_TEMPLATE("load_state accepts every state the optimizer writes (refreshes, rank changes, zero gradients, set_basis)", T, float,
                   double) {
    for (const auto transport : {adarank::transport_policy::squared_rotation, adarank::transport_policy::clamped_rotation,
                                 adarank::transport_policy::none, adarank::transport_policy::reset}) {
        for (const bool randomized : {false, true}) {
            CAPTURE(adarank::to_string(transport));
            CAPTURE(randomized);
            adarank::optimizer_config cfg;
            cfg.adam = hyper(1e-2, 0.01);
            cfg.rank = adarank::rank_policy::adaptive(0.3, 1, 6);
            cfg.refresh = adarank::refresh_policy::converged(0.7, 1, 3);
            cfg.transport = transport;
            cfg.rsvd.oversampling = 2;
            cfg.rsvd.exact_fraction = randomized ? 1.0 : 0.0;
            backend_t<T> backend;
            struct shape {
                index_t rows, cols;
                param_kind kind;
            };
            const std::vector<shape> shapes = {{24, 40, param_kind::low_rank}, {40, 24, param_kind::low_rank}, {1, 16, param_kind::dense},
                                               {30, 30, param_kind::low_rank}};
            auto make = [&] {
                optimizer_t<T> o(backend, cfg);
                for (const auto& sh : shapes) o.add_parameter(sh.rows, sh.cols, sh.kind);
                return o;
            };
            optimizer_t<T> opt = make();
            std::vector<RowMatT<T>> w;
            for (std::size_t p = 0; p < shapes.size(); ++p) w.push_back(gaussian_matrix(shapes[p].rows, shapes[p].cols, 20 + p).template cast<T>());
            auto check_loads = [&](int s) {
                CAPTURE(s);
                const auto blob = opt.save_state();
                optimizer_t<T> other = make();
                CHECK_NOTHROW(other.load_state(blob));
                CHECK(other.save_state() == blob);
                for (index_t p = 0; p < index_t(shapes.size()); ++p) {
                    if (!opt.layer_state(p).low_rank || opt.layer_state(p).rank == 0) continue;
                    // The library's bases are orthonormal far inside the loader's tolerance.
                    CHECK(orthonormality_deviation(opt.basis(p)) < optimizer_t<T>::orthonormality_tolerance / 100);
                }
            };
            std::set<index_t> ranks_seen;
            // A zero first gradient for parameter 3 (rank 0 with t > 0), then a spectrum that changes
            // rank and direction every few steps.
            for (int s = 0; s < 14; ++s) {
                for (std::size_t p = 0; p < shapes.size(); ++p) {
                    const auto& sh = shapes[p];
                    RowMatT<T> g;
                    if (p == 3 && s < 2) g = RowMatT<T>::Zero(sh.rows, sh.cols);
                    else if (sh.kind == param_kind::dense) g = gaussian_matrix(sh.rows, sh.cols, 400 + std::uint64_t(s)).template cast<T>();
                    else {
                        const index_t k = std::min(sh.rows, sh.cols);
                        std::vector<double> sigma(static_cast<std::size_t>(k));
                        for (index_t i = 0; i < k; ++i)
                            sigma[std::size_t(i)] = std::pow(0.1 + 0.3 * double((s / 4) % 3), double(i)) * (1.0 + 0.05 * double(s));
                        g = with_spectrum(sh.rows, sh.cols, sigma, 600 + 10 * std::uint64_t(s) + p).template cast<T>();
                    }
                    const status st = opt.step(index_t(p), mv(w[p]), cv(g));
                    CHECK((st == status::ok || st == status::degenerate_input));
                }
                if (s == 7) {   // a caller's basis (a permutation of coordinates) for parameter 0
                    const index_t len = opt.layer_state(0).side == projection_side::left ? 24 : 40;
                    RowMatT<T> b = RowMatT<T>::Zero(3, len);
                    for (index_t i = 0; i < 3; ++i) b(i, (7 * i + 2) % len) = T(1);
                    REQUIRE(opt.set_basis(0, cv(b)) == status::ok);
                }
                for (index_t p : {0, 1, 3}) ranks_seen.insert(opt.layer_state(p).rank);
                check_loads(s);
            }
            CHECK(opt.layer_state(0).refreshes > 3);
            CHECK(ranks_seen.size() > 1);   // the rank changed along the way
        }
    }
}

TEST_CASE_TEMPLATE("set_basis rejects a non-finite or non-orthonormal basis, naming the measured deviation, and changes nothing", T, float,
                   double) {
    using test::invalid_argument_message;
    small_run<T> run(3);
    optimizer_t<T>& opt = run.opt;
    const auto before = opt.save_state();
    const char* fn = "adarank::low_rank_adamw::set_basis";
    const index_t len = 12;   // parameter 0: 12x20, left side
    RowMatT<T> eye = RowMatT<T>::Identity(2, len);
    RowMatT<T> nan_basis = eye, zero = RowMatT<T>::Zero(2, len), twice = T(2) * eye, skew = eye, inf_basis = eye;
    nan_basis(1, 3) = std::numeric_limits<T>::quiet_NaN();
    inf_basis(0, 0) = std::numeric_limits<T>::infinity();
    skew(1, 0) = T(0.5);   // rows no longer orthogonal (and row 1 longer)
    contains(invalid_argument_message([&] { (void)opt.set_basis(0, cv(nan_basis)); }), {fn, "'basis'", "not finite", "(1, 3)"});
    contains(invalid_argument_message([&] { (void)opt.set_basis(0, cv(inf_basis)); }), {fn, "'basis'", "not finite", "(0, 0)"});
    contains(invalid_argument_message([&] { (void)opt.set_basis(0, cv(zero)); }), {fn, "'basis'", "orthonormal", "deviation", "= 1 "});
    contains(invalid_argument_message([&] { (void)opt.set_basis(0, cv(twice)); }), {fn, "'basis'", "orthonormal", "deviation", "= 3 "});
    contains(invalid_argument_message([&] { (void)opt.set_basis(0, cv(skew)); }), {fn, "'basis'", "orthonormal", "deviation", "0.5"});
    CHECK(opt.save_state() == before);
    // An orthonormal basis (within the tolerance) is accepted.
    RowMatT<T> near = eye;
    near(0, 5) = T(optimizer_t<T>::orthonormality_tolerance / 10);
    CHECK(opt.set_basis(0, cv(near)) == status::ok);
    CHECK(opt.layer_state(0).rank == 2);
}

TEST_CASE("an eps that is not a normal number of the value type is rejected by the constructor") {
    using test::invalid_argument_message;
    adarank::optimizer_config cfg;
    cfg.adam.eps = 1e-50;   // a positive double that rounds to 0 in float: n = m/(√v + ε) would divide by zero
    backend_t<float> fb;
    contains(invalid_argument_message([&] { optimizer_t<float> o(fb, cfg); }), {"adarank::low_rank_adamw::low_rank_adamw", "config.adam.eps", "1e-50"});
    cfg.adam.eps = 1e-40;   // subnormal in float
    contains(invalid_argument_message([&] { optimizer_t<float> o(fb, cfg); }), {"config.adam.eps", "1e-40"});
    backend_t<double> db;
    CHECK(invalid_argument_message([&] { optimizer_t<double> o(db, cfg); }) == "<no std::invalid_argument thrown>");
}

TEST_CASE("set_basis returns overflow and changes nothing when the transported moments would not be finite") {
    // A valid state with first moments near the largest float: rotating two coordinates into
    // each other adds two of them, which overflows.
    using T = float;
    small_run<T> run(3);
    state_fields<T> s(run.opt.save_state());
    std::fill(s.layers[0].m.begin(), s.layers[0].m.end(), T(3e38));
    optimizer_t<T> opt = run.fresh();
    opt.load_state(s.seal());
    const auto before = opt.save_state();
    const index_t r = opt.layer_state(0).rank;
    REQUIRE(r >= 2);
    RowMatT<T> rotated = copy_of(opt.basis(0));
    const T c = T(std::sqrt(0.5));
    rotated.row(0) = c * (copy_of(opt.basis(0)).row(0) + copy_of(opt.basis(0)).row(1));
    rotated.row(1) = c * (copy_of(opt.basis(0)).row(0) - copy_of(opt.basis(0)).row(1));
    CHECK(opt.set_basis(0, cv(rotated)) == status::overflow);
    CHECK(opt.save_state() == before);
    // With ordinary moments the same basis is installed.
    CHECK(run.opt.set_basis(0, cv(rotated)) == status::ok);
    CHECK(test::same_bits(run.opt.basis(0), cv(rotated)));
}

TEST_CASE("when the overflow certificate is inconclusive the exact path commits the step it computes") {
    using T = float;
    adarank::optimizer_config cfg;
    cfg.adam = hyper(1e-2, 0.01);
    cfg.rank = adarank::rank_policy::adaptive(0.3, 1, 4);
    cfg.refresh = adarank::refresh_policy::every(2);
    SUBCASE("dense: Σg² = 2.4e40 exceeds the certificate's limit, but every g² = 1e38 is finite") {
        backend_t<T> backend;
        optimizer_t<T> opt(backend, cfg);
        const auto id = opt.add_parameter(12, 20, param_kind::dense);
        RowMatT<T> w = gaussian_matrix(12, 20, 3).cast<T>();
        const RowMatT<T> w0 = w;
        REQUIRE(opt.step(id, mv(w), cv(RowMatT<T>(RowMatT<T>::Constant(12, 20, T(1e19))))) == status::ok);
        // First AdamW step: m = (1−β₁)g = 1e18, v = (1−β₂)g² = 1e36, n = m/(√v + ε) ≈ 1, step = lr·√(1−β₂)/(1−β₁) = lr.
        const Mat expect = (1.0 - 1e-2 * 0.01) * (w0.cast<double>().array() - 1e-2).matrix();
        CHECK(rel_diff(w, expect) < 1e-6);
        CHECK(to_mat(opt.first_moment(id)).isApprox(Mat::Constant(12, 20, 1e18), 1e-6));
        CHECK(to_mat(opt.second_moment(id)).isApprox(Mat::Constant(12, 20, 1e36), 1e-5));
        // The next ordinary step is certified again and finite.
        REQUIRE(opt.step(id, mv(w), cv(RowMatT<T>(gaussian_matrix(12, 20, 4).cast<T>()))) == status::ok);
        CHECK(w.allFinite());
    }
    SUBCASE("low-rank: a loaded second moment of 2e38 exceeds the limit, the exact update stays finite") {
        small_run<T> run(3);
        state_fields<T> s(run.opt.save_state());
        std::fill(s.layers[0].v.begin(), s.layers[0].v.end(), T(2e38));
        std::fill(s.layers[0].m.begin(), s.layers[0].m.end(), T(0));
        optimizer_t<T> opt = run.fresh();
        opt.load_state(s.seal());
        RowMatT<T> w = run.w[0];
        const RowMatT<T> w0 = w;
        REQUIRE(opt.step(0, mv(w), cv(run.grad(0, 3))) == status::ok);
        CHECK(w.allFinite());
        CHECK_FALSE(test::same_bits(w, w0));
        const Mat v = to_mat(opt.second_moment(0));
        CHECK(v.allFinite());
        CHECK(v.minCoeff() >= 0.99 * 2e38 * 0.999);   // β₂·2e38 plus a small (1−β₂)Ĝ²
    }
}

// ================================================================================ 13. Adam conventions

TEST_CASE_TEMPLATE("the torch convention: dense AdamW as torch.optim.AdamW computes it", T, float, double) {
    // torch.optim.AdamW (decoupled weight decay, bias-corrected moments, ε added to √v̂):
    //   w ← w·(1 − lr·wd);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
    //   w ← w − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)
    backend_t<T> backend;
    adarank::optimizer_config c;
    c.adam = {.lr = 3e-2, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-3, .weight_decay = 0.1, .convention = adarank::adam_convention::torch};
    optimizer_t<T> opt(backend, c);
    adarank::optimizer_config g = c;
    g.adam.convention = adarank::adam_convention::galore;
    optimizer_t<T> galore(backend, g);
    const auto id = opt.add_parameter(6, 9, param_kind::dense);
    REQUIRE(galore.add_parameter(6, 9, param_kind::dense) == id);
    RowMatT<T> w = gaussian_matrix(6, 9, 1).cast<T>(), wg = w;
    Mat ref = w.template cast<double>(), m = Mat::Zero(6, 9), v = Mat::Zero(6, 9);
    for (int t = 1; t <= 30; ++t) {
        // Small gradients late in the run make ε matter, which is where the conventions differ.
        const RowMatT<T> grad = (gaussian_matrix(6, 9, 100 + std::uint64_t(t)) * (t > 20 ? 1e-3 : 1.0)).cast<T>();
        REQUIRE(opt.step(id, mv(w), cv(grad)) == status::ok);
        REQUIRE(galore.step(id, mv(wg), cv(grad)) == status::ok);
        const Mat gd = grad.template cast<double>();
        ref *= 1.0 - c.adam.lr * c.adam.weight_decay;
        m = c.adam.beta1 * m + (1 - c.adam.beta1) * gd;
        v = c.adam.beta2 * v + (1 - c.adam.beta2) * gd.cwiseProduct(gd);
        const double bc1 = 1 - std::pow(c.adam.beta1, t), bc2 = 1 - std::pow(c.adam.beta2, t);
        ref -= (c.adam.lr / bc1) * m.cwiseQuotient(((v.array().sqrt() / std::sqrt(bc2)) + c.adam.eps).matrix());
    }
    CHECK(rel_diff(w, ref) < (sizeof(T) == 4 ? 2e-6 : 1e-13));
    CHECK(rel_diff(wg, ref) > 1e-4);   // the GaLore convention is measurably different here
}

TEST_CASE("the Adam convention is validated, saved, and version-1 states load as the galore convention") {
    backend_t<float> backend;
    adarank::optimizer_config c;
    c.adam.convention = adarank::adam_convention::torch;
    c.adam.lr = 0.5;
    c.adam.weight_decay = 2.0;
    CHECK(test::invalid_argument_message([&] { optimizer_t<float> o(backend, c); }).find("lr x weight_decay < 1") != std::string::npos);
    c.adam.weight_decay = 0.1;
    optimizer_t<float> torch_opt(backend, c);
    CHECK(test::invalid_argument_message([&] { torch_opt.set_learning_rate(20.0); }).find("lr x wd >= 1") != std::string::npos);
    CHECK(torch_opt.learning_rate() == 0.5);
    c.adam.convention = static_cast<adarank::adam_convention>(7);
    CHECK(test::invalid_argument_message([&] { optimizer_t<float> o(backend, c); }).find("config.adam.convention has the invalid value 7") !=
          std::string::npos);

    // A state saved with one convention does not load into the other.
    small_run<float> run(3);
    adarank::optimizer_config other = run.cfg;
    other.adam.convention = adarank::adam_convention::torch;
    optimizer_t<float> mismatched(run.backend, other);
    for (const auto& shape : small_run<float>::shapes) mismatched.add_parameter(shape[0], shape[1], param_kind::automatic);
    CHECK(test::invalid_argument_message([&] {
              try {
                  mismatched.load_state(run.opt.save_state());
              } catch (const velora::state_format_error& e) {
                  throw std::invalid_argument(e.what());
              }
          }).find("adam convention differs") != std::string::npos);

    // Version 1 (before the convention byte): the same state, one byte shorter, loads as galore.
    const std::vector<std::byte> v2 = run.opt.save_state();
    const state_fields<float> s(v2);
    REQUIRE(s.config[state_fields<float>::convention_offset] == std::byte{0});
    optimizer_t<float> reloaded = run.fresh();
    reloaded.load_state(s.seal(1));
    CHECK(reloaded.save_state() == v2);   // re-saved as the current version, otherwise the same bytes
    // Version 2 (before the moment state format): loads as float moments.
    optimizer_t<float> reloaded2 = run.fresh();
    reloaded2.load_state(s.seal(2));
    CHECK(reloaded2.save_state() == v2);
    // Version 3 (before the basis format): loads as float bases.
    optimizer_t<float> reloaded3 = run.fresh();
    reloaded3.load_state(s.seal(3));
    CHECK(reloaded3.save_state() == v2);
}

TEST_CASE("load_state applies the constructor's and set_learning_rate's learning-rate rule: torch with lr x wd >= 1 is refused, nothing changed") {
    using T = float;
    backend_t<T> backend;
    const char* fn = "adarank::low_rank_adamw::load_state";
    for (const auto convention : {adarank::adam_convention::galore, adarank::adam_convention::torch}) {
        CAPTURE(adarank::to_string(convention));
        adarank::optimizer_config c = small_run<T>::config();
        c.adam.convention = convention;
        c.adam.weight_decay = 0.5;   // lr x wd >= 1 from lr = 2
        const auto make = [&](int steps) {
            optimizer_t<T> o(backend, c);
            o.add_parameter(12, 20, param_kind::low_rank);
            o.add_parameter(3, 5, param_kind::dense);
            RowMatT<T> w0 = gaussian_matrix(12, 20, 1).cast<T>(), w1 = gaussian_matrix(3, 5, 2).cast<T>();
            for (int s = 0; s < steps; ++s) {
                REQUIRE(o.step(0, mv(w0), cv(RowMatT<T>(gaussian_matrix(12, 20, 10 + std::uint64_t(s)).cast<T>()))) == status::ok);
                REQUIRE(o.step(1, mv(w1), cv(RowMatT<T>(gaussian_matrix(3, 5, 20 + std::uint64_t(s)).cast<T>()))) == status::ok);
            }
            return o;
        };
        optimizer_t<T> source = make(3);
        const std::vector<std::byte> good = source.save_state();
        const state_fields<T> s(good);
        REQUIRE(s.seal() == good);
        for (const double lr : {1.5, 1.999, 2.0, 4.0, 1e30}) {
            CAPTURE(lr);
            // What the constructor and set_learning_rate say about this learning rate: one rule.
            adarank::optimizer_config at = c;
            at.adam.lr = lr;
            const bool constructible = test::invalid_argument_message([&] { optimizer_t<T> o(backend, at); }) == "<no std::invalid_argument thrown>";
            optimizer_t<T> probe(backend, c);
            const bool settable = test::invalid_argument_message([&] { probe.set_learning_rate(lr); }) == "<no std::invalid_argument thrown>";
            CHECK(constructible == settable);
            CHECK(settable == (convention == adarank::adam_convention::galore || lr < 2.0));
            // The saved learning rate edited and the blob re-sealed with a valid checksum: only its meaning is judged.
            state_fields<T> edited = s;
            edited.lr = lr;
            const std::vector<std::byte> blob = edited.seal();
            optimizer_t<T> target = make(1);   // a state of its own, which a refused load leaves as it is
            const auto before = target.save_state();
            const std::string msg = state_error_message([&] { target.load_state(blob); });
            if (settable) {
                CHECK(msg == "<no velora::state_format_error thrown>");
                CHECK(target.learning_rate() == lr);
                // A state records the live rate in its configuration block too (its first field,
                // adam.lr), so that its bytes do not depend on the construction-time rate.
                state_fields<T> expected = edited;
                std::memcpy(expected.config.data(), &lr, sizeof lr);
                CHECK(target.save_state() == expected.seal());
            } else {
                std::ostringstream values;
                values << "the saved learning rate = " << lr << " with weight_decay = 0.5";
                contains(msg, {fn, values.str().c_str(), "lr x weight_decay < 1"});
                CHECK(target.save_state() == before);
                CHECK(target.learning_rate() == c.adam.lr);
            }
        }
    }
}

// ================================================================================ 14. user-defined policies

namespace {

// A user's rank estimator: the rank at the largest ratio σ_r/σ_{r+1} for r in [lo, hi] (a
// spectral gap rule, where the library's rule keeps a share of the energy).
struct spectral_gap_rank {
    index_t lo = 1, hi = 6;
    [[nodiscard]] index_t max_rank() const { return hi; }
    [[nodiscard]] index_t estimate(std::span<const double> sigma, double /*energy*/, index_t cap) const {
        const index_t top = std::min(hi, cap), first = std::min(lo, top);
        index_t best = first;
        double best_ratio = -1;
        for (index_t r = first; r <= top && static_cast<std::size_t>(r) < sigma.size(); ++r) {
            const double ratio = sigma[static_cast<std::size_t>(r - 1)] / std::max(sigma[static_cast<std::size_t>(r)], 1e-300);
            if (ratio > best_ratio) {
                best_ratio = ratio;
                best = r;
            }
        }
        return best;
    }
    void validate(std::string_view function) const {
        velora::detail::require(lo >= 1 && lo <= hi, function, "config.rank (spectral_gap_rank) needs 1 <= lo <= hi, got lo = ", lo, ", hi = ", hi);
    }
    void save(velora::state_writer& w) const {
        w.put(static_cast<std::int64_t>(lo));
        w.put(static_cast<std::int64_t>(hi));
    }
    static spectral_gap_rank load(velora::state_reader& r) {
        spectral_gap_rank p;
        p.lo = static_cast<index_t>(r.get<std::int64_t>());
        p.hi = static_cast<index_t>(r.get<std::int64_t>());
        return p;
    }
};

// A user's refresh rule: every `interval` steps, or as soon as the projected gradient's energy
// fell below `fraction` of its value at the subspace's first step.
struct drop_or_every {
    index_t interval = 4;
    double fraction = 0.01;
    [[nodiscard]] bool due_by_count(index_t steps) const { return steps >= interval; }
    [[nodiscard]] bool due(const adarank::refresh_inputs& in) const {
        return due_by_count(in.steps_in_subspace) || (in.anchor_norm2 >= 0 && in.projected_norm2 < fraction * in.anchor_norm2);
    }
    [[nodiscard]] bool needs_gradient_norm() const { return false; }
    void validate(std::string_view function) const {
        velora::detail::require(interval >= 1 && fraction >= 0 && fraction <= 1, function,
                                "config.refresh (drop_or_every) needs interval >= 1 and fraction in [0, 1], got ", interval, " and ", fraction);
    }
    void save(velora::state_writer& w) const {
        w.put(static_cast<std::int64_t>(interval));
        w.put(fraction);
    }
    static drop_or_every load(velora::state_reader& r) {
        drop_or_every p;
        p.interval = static_cast<index_t>(r.get<std::int64_t>());
        p.fraction = r.get<double>();
        return p;
    }
};

using custom_optimizer = adarank::low_rank_adamw<backend_t<double>, spectral_gap_rank, drop_or_every>;
static_assert(adarank::low_rank_optimizer<custom_optimizer>);

} // namespace

TEST_CASE("a user-defined rank estimator and refresh rule: chosen ranks, refreshes, validation, save and load") {
    backend_t<double> backend;
    adarank::basic_optimizer_config<spectral_gap_rank, drop_or_every> c;
    c.rsvd.exact_fraction = 0.0;   // exact subspaces: the singular values the rule sees are the gradient's
    custom_optimizer opt(backend, c);
    const auto id = opt.add_parameter(30, 20, param_kind::low_rank);
    RowMat w = gaussian_matrix(30, 20, 1);
    // A gap after 3 singular values, then after 1: the rule follows the gap, not the energy share.
    const RowMat three = with_spectrum(30, 20, {9, 8, 7, 0.5, 0.4, 0.3, 0.2}, 2);
    const RowMat one = with_spectrum(30, 20, {9, 1, 0.9, 0.8, 0.7, 0.6, 0.5}, 3);
    for (int t = 0; t < 4; ++t) REQUIRE(opt.step(id, mv(w), cv(three)) == status::ok);
    CHECK(opt.layer_state(id).rank == 3);
    CHECK(opt.layer_state(id).refreshes == 1);
    REQUIRE(opt.step(id, mv(w), cv(one)) == status::ok);   // 4 steps in the subspace: due by count
    CHECK(opt.layer_state(id).refreshes == 2);
    CHECK(opt.layer_state(id).rank == 1);
    // The energy in the subspace collapsing refreshes early (the rule's own criterion).
    REQUIRE(opt.step(id, mv(w), cv(one)) == status::ok);
    REQUIRE(opt.step(id, mv(w), cv(RowMat(three * 1e-3))) == status::ok);
    CHECK(opt.layer_state(id).refreshes == 3);
    CHECK(opt.layer_state(id).rank == 3);

    // Save and load through the policies' own fields; a different setting is named on load.
    const std::vector<std::byte> blob = opt.save_state();
    custom_optimizer same(backend, c);
    same.add_parameter(30, 20, param_kind::low_rank);
    same.load_state(blob);
    CHECK(same.save_state() == blob);
    auto other = c;
    other.rank.hi = 5;
    custom_optimizer different(backend, other);
    different.add_parameter(30, 20, param_kind::low_rank);
    CHECK(state_error_message([&] { different.load_state(blob); }).find("rank policy differs") != std::string::npos);
    other = c;
    other.refresh.fraction = 0.5;
    custom_optimizer refresh_differs(backend, other);
    refresh_differs.add_parameter(30, 20, param_kind::low_rank);
    CHECK(state_error_message([&] { refresh_differs.load_state(blob); }).find("refresh policy differs") != std::string::npos);

    // Each policy validates itself, named by the optimizer's constructor.
    auto bad = c;
    bad.rank.lo = 0;
    const std::string message = test::invalid_argument_message([&] { custom_optimizer o(backend, bad); });
    CHECK(message.find("adarank::low_rank_adamw::low_rank_adamw") != std::string::npos);
    CHECK(message.find("spectral_gap_rank) needs 1 <= lo <= hi, got lo = 0") != std::string::npos);
}

TEST_CASE("validation is the field table's: every number and enumeration outside its row's values is refused, naming the field") {
    // Walks the table itself, so a field added with its accepted values is covered here without
    // another line: just outside each bound (and NaN for floating fields) must throw naming
    // "config.<field>"; the default configuration passes.
    adarank::optimizer_config c;
    adarank::validate(c, "test");
    int refused = 0;
    const auto expect_refused = [&](const adarank::config_field& f) {
        const std::string msg = test::invalid_argument_message([&] { adarank::validate(c, "test"); });
        INFO("field ", f.name, ": ", msg);
        CHECK(msg.find("config." + std::string(f.name)) != std::string::npos);
        ++refused;
    };
    adarank::for_each_config_field(
        [&](const adarank::config_field& f, auto& v) {
            using V = std::remove_cvref_t<decltype(v)>;
            const V saved = v;
            if constexpr (std::is_enum_v<V>) {
                v = static_cast<V>(f.values.max + 1);
                expect_refused(f);
            } else if constexpr (std::is_arithmetic_v<V> && !std::is_same_v<V, bool> && !std::is_same_v<V, std::uint64_t>) {
                if (std::isfinite(f.values.lo)) {
                    v = f.values.lo_open ? static_cast<V>(f.values.lo) : static_cast<V>(f.values.lo - (std::is_integral_v<V> ? 1 : 0.5));
                    expect_refused(f);
                }
                if (std::isfinite(f.values.hi)) {
                    v = f.values.hi_open ? static_cast<V>(f.values.hi) : static_cast<V>(f.values.hi + (std::is_integral_v<V> ? 1 : 0.5));
                    expect_refused(f);
                }
                if constexpr (std::is_floating_point_v<V>) {
                    v = std::numeric_limits<V>::quiet_NaN();
                    expect_refused(f);
                }
            }
            v = saved;
            adarank::validate(c, "test");   // restored
        },
        c);
    MESSAGE(refused, " out-of-range values refused");
    CHECK(refused >= 25);
}
