// VeLoRA compressor: the closed form against the naive dense oracle in reference.hpp, every v
// mode, storage types, shared records, SSF, determinism, state round trip, bad input.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/velora.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "reference.hpp"
#include "test_util.hpp"

using velora::index_t;

namespace {

template <class T>
std::vector<T> gaussian(std::size_t n, std::uint64_t seed, double mean = 0.0) { return test::data<T>(n, seed, mean); }

template <class T>
constexpr double tol() { return std::is_same_v<T, float> ? 3e-5 : 1e-12; }

template <class T>
std::vector<double> as_double(std::span<const T> v) { return {v.begin(), v.end()}; }

template <class T>
velora::const_matrix_view<T> cview(const std::vector<T>& v, index_t r, index_t c) { return velora::make_view<const T>(v.data(), r, c); }
template <class T>
velora::matrix_view<T> mview(std::vector<T>& v, index_t r, index_t c) { return velora::make_view(v.data(), r, c); }

struct problem { index_t t, d, o, g; };

// The dense O×D VeLoRA gradient through the factored path.
template <class T>
std::vector<T> velora_dw(velora::compressor<velora::eigen_backend<T>>& c, const velora::activation_record<velora::eigen_backend<T>>& r,
                         const std::vector<T>& dy, index_t o) {
    std::vector<T> a(static_cast<std::size_t>(o * c.groups())), dw(static_cast<std::size_t>(o * c.features()));
    c.weight_grad(r, cview(dy, r.tokens(), o), mview(a, o, c.groups()));
    c.expand_weight_grad(r, cview(a, o, c.groups()), mview(dw, o, c.features()));
    return dw;
}

using test::invalid_argument_message;

// A type with compress but no weight gradient: not an activation compressor.
struct compress_only {
    using value_type = float;
    struct record_type { std::size_t bytes() const { return 0; } };
    velora::status compress(velora::const_matrix_view<float>, record_type&) { return velora::status::ok; }
};

} // namespace

static_assert(velora::activation_compressor<velora::compressor<velora::eigen_backend<float>>>);
static_assert(velora::activation_compressor<velora::compressor<velora::eigen_backend<double>>>);
static_assert(!velora::activation_compressor<compress_only>);

TEST_CASE_TEMPLATE("closed form: dW_velora = scale · dW_exact · (I_G ⊗ v vᵀ) on random shapes", T, float, double) {
    using B = velora::eigen_backend<T>;
    B backend;
    std::uint64_t seed = 11;
    // D % G != 0 (padding), G = D (s = 1), G = 1 (s = D), an all-padding last group (D=10, G=6),
    // and the benchmark-like shape.
    for (problem p : {problem{37, 50, 9, 7}, problem{16, 24, 5, 24}, problem{20, 33, 6, 1}, problem{9, 10, 4, 6},
                      problem{129, 256, 17, 32}, problem{300, 130, 40, 8}}) {
        for (double scale : {1.0, 0.1}) {
            INFO("T=" << p.t << " D=" << p.d << " O=" << p.o << " G=" << p.g << " scale=" << scale);
            const auto x = gaussian<T>(static_cast<std::size_t>(p.t * p.d), ++seed, 0.5);
            const auto dy = gaussian<T>(static_cast<std::size_t>(p.t * p.o), ++seed);
            // Z stored at the backend's precision, so the double run tests the algebra to rounding.
            constexpr auto st = sizeof(T) == 8 ? velora::storage::f64 : velora::storage::f32;
            velora::compressor<B> c(backend, p.d, {.groups = p.g, .z_storage = st, .scale = scale});
            const auto r = c.compress(cview(x, p.t, p.d));
            CHECK(c.subtoken_size() == (p.d + p.g - 1) / p.g);
            CHECK(r.bytes() == static_cast<std::size_t>(p.t * p.g) * sizeof(T) + static_cast<std::size_t>(c.subtoken_size()) * sizeof(T));

            const auto rx = ref::from(x, p.t, p.d), rdy = ref::from(dy, p.t, p.o);
            const auto v = as_double(c.v());
            CHECK(ref::rel_error(std::vector<double>(v), [&] { ref::matrix m(1, c.subtoken_size()); m.a = ref::subtoken_direction(rx, c.subtoken_size()); return m; }()) < tol<T>());
            const auto expect = ref::velora_weight_grad(rx, rdy, v, p.g, scale);
            CHECK(ref::rel_error(velora_dw(c, r, dy, p.o), expect) < tol<T>());

            // Z itself, and the reconstruction X̂ = Z (I_G ⊗ vᵀ) when explicitly asked for.
            const auto z = r.template z<T>();
            std::vector<T> zc(z.data, z.data + z.size());
            CHECK(ref::rel_error(zc, ref::compress(rx, v, p.g)) < 3e-5);
            std::vector<T> xhat(x.size());
            c.reconstruct(r, mview(xhat, p.t, p.d));
            const auto rz = ref::compress(rx, v, p.g);
            ref::matrix expect_xhat(p.t, p.d);
            for (index_t t = 0; t < p.t; ++t)
                for (index_t j = 0; j < p.d; ++j) expect_xhat(t, j) = rz(t, j / c.subtoken_size()) * v[static_cast<std::size_t>(j % c.subtoken_size())];
            CHECK(ref::rel_error(xhat, expect_xhat) < 3e-5);
            // The factored view carries everything a low-rank optimizer needs.
            std::vector<T> a(static_cast<std::size_t>(p.o * p.g));
            c.weight_grad(r, cview(dy, p.t, p.o), mview(a, p.o, p.g));
            const auto f = c.factored(r, cview(a, p.o, p.g));
            CHECK(f.features == p.d);
            CHECK(f.subtoken_size == c.subtoken_size());
            CHECK(f.scale == T(scale));
            CHECK(f.v == r.v());
        }
    }
}

TEST_CASE("G = D stores X exactly up to the sign of v (s = 1): the gradient is exact") {
    velora::eigen_backend<double> backend;
    const index_t t = 12, d = 9, o = 4;
    const auto x = gaussian<double>(static_cast<std::size_t>(t * d), 3, 1.0);
    const auto dy = gaussian<double>(static_cast<std::size_t>(t * o), 4);
    velora::compressor<velora::eigen_backend<double>> c(backend, d, {.groups = d, .z_storage = velora::storage::f64});
    const auto r = c.compress(cview(x, t, d));
    CHECK(std::abs(c.v()[0]) == 1.0);
    const auto exact = ref::matmul(ref::from(dy, t, o), true, ref::from(x, t, d), false);
    CHECK(ref::rel_error(velora_dw(c, r, dy, o), exact) < 1e-14);
}

TEST_CASE("v modes") {
    using B = velora::eigen_backend<double>;
    B backend;
    const index_t t = 40, d = 24, g = 4, s = 6;
    const auto x1 = gaussian<double>(static_cast<std::size_t>(t * d), 21, 1.0);
    const auto x2 = gaussian<double>(static_cast<std::size_t>(t * d), 22, -0.7);
    const auto dir1 = ref::subtoken_direction(ref::from(x1, t, d), s);
    const auto dir2 = ref::subtoken_direction(ref::from(x2, t, d), s);
    auto near = [](std::span<const double> a, const std::vector<double>& b) {
        double e = 0;
        for (std::size_t i = 0; i < b.size(); ++i) e = std::max(e, std::abs(a[i] - b[i]));
        return e < 1e-12;
    };
    velora::compressor<B>::record_type r1, r2;

    SUBCASE("first_batch_mean: set by the first batch, then frozen") {
        velora::compressor<B> c(backend, d, {.groups = g});
        CHECK_FALSE(c.initialised());
        c.compress(cview(x1, t, d), r1);
        CHECK(near(c.v(), dir1));
        c.compress(cview(x2, t, d), r2);
        CHECK(near(c.v(), dir1));
        CHECK(c.v_updates() == 1);
    }
    SUBCASE("batch_mean: recomputed every call; each record keeps the v it was made with") {
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::batch_mean()});
        c.compress(cview(x1, t, d), r1);
        c.compress(cview(x2, t, d), r2);
        CHECK(near(c.v(), dir2));
        CHECK(near(std::span<const double>(r1.v(), s), dir1));
        CHECK(near(std::span<const double>(r2.v(), s), dir2));
    }
    SUBCASE("ema: v <- normalize(decay v + (1 - decay) normalize(batch mean))") {
        const double decay = 0.8;
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::ema(decay)});
        c.compress(cview(x1, t, d), r1);
        CHECK(near(c.v(), dir1));
        c.compress(cview(x2, t, d), r2);
        std::vector<double> expect(s);
        double n = 0;
        for (index_t j = 0; j < s; ++j) {
            expect[static_cast<std::size_t>(j)] = decay * dir1[static_cast<std::size_t>(j)] + (1 - decay) * dir2[static_cast<std::size_t>(j)];
            n += expect[static_cast<std::size_t>(j)] * expect[static_cast<std::size_t>(j)];
        }
        for (auto& e : expect) e /= std::sqrt(n);
        CHECK(near(c.v(), expect));
        CHECK(c.v_updates() == 2);
    }
    SUBCASE("random(seed): reproducible unit vector from the counter-based stream") {
        velora::compressor<B> a(backend, d, {.groups = g, .v = velora::v_mode::random(5)});
        velora::compressor<B> b(backend, d, {.groups = g, .v = velora::v_mode::random(5)});
        velora::compressor<B> other(backend, d, {.groups = g, .v = velora::v_mode::random(6)});
        CHECK(a.initialised());
        CHECK(std::equal(a.v().begin(), a.v().end(), b.v().begin()));
        CHECK_FALSE(std::equal(a.v().begin(), a.v().end(), other.v().begin()));
        std::vector<double> expect(s);
        double n = 0;
        for (index_t j = 0; j < s; ++j) n += std::pow(expect[static_cast<std::size_t>(j)] = velora::gaussian_at(5, static_cast<std::uint64_t>(j)), 2);
        for (auto& e : expect) e /= std::sqrt(n);
        CHECK(near(a.v(), expect));
        a.compress(cview(x1, t, d), r1);
        CHECK(near(a.v(), expect));
    }
    SUBCASE("given: must be set before the first compress; normalised by the library") {
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::given()});
        const auto msg = invalid_argument_message([&] { c.compress(cview(x1, t, d), r1); });
        CHECK(msg.find("velora::compressor::compress: v_mode::given requires set_v()") == 0);
        const std::vector<double> v{3, 0, 4, 0, 0, 0};
        c.set_v(v);
        CHECK(near(c.v(), {0.6, 0, 0.8, 0, 0, 0}));
        c.compress(cview(x1, t, d), r1);
        CHECK(near(c.v(), {0.6, 0, 0.8, 0, 0, 0}));
        CHECK(invalid_argument_message([&] { c.set_v(std::vector<double>(s, 0.0)); }).find("zero vector") != std::string::npos);
        CHECK(invalid_argument_message([&] { c.set_v(std::vector<double>(5, 1.0)); }).find("has 5 elements but the sub-token size is s = 6") != std::string::npos);
    }
    SUBCASE("an all-zero batch falls back to 1/sqrt(s) without NaN and says so") {
        const std::vector<double> zeros(static_cast<std::size_t>(t * d), 0.0);
        for (auto mode : {velora::v_mode::first_batch_mean(), velora::v_mode::batch_mean(), velora::v_mode::ema(0.5)}) {
            velora::compressor<B> c(backend, d, {.groups = g, .v = mode});
            CHECK(c.compress(cview(zeros, t, d), r1) == velora::status::degenerate_input);
            CHECK(c.fallback_used());
            for (double e : c.v()) CHECK(e == doctest::Approx(1.0 / std::sqrt(double(s))));
            if (mode.type != velora::v_mode::kind::first_batch_mean) {   // a real batch replaces the fallback
                CHECK(c.compress(cview(x1, t, d), r2) == velora::status::ok);
                CHECK_FALSE(c.fallback_used());
            }
        }
    }
}

TEST_CASE("storage types: f16 and bf16 halve Z; the gradient stays close") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 257, d = 96, o = 11, g = 8;
    const auto x = gaussian<float>(static_cast<std::size_t>(t * d), 31, 0.4);
    const auto dy = gaussian<float>(static_cast<std::size_t>(t * o), 32);
    velora::compressor<B> full(backend, d, {.groups = g});
    const auto rf = full.compress(cview(x, t, d));
    const auto reference = ref::from(velora_dw(full, rf, dy, o), o, d);
    for (auto [st, tolerance] : {std::pair{velora::storage::f16, 2e-3}, std::pair{velora::storage::bf16, 1e-2}}) {
        INFO(velora::to_string(st));
        velora::compressor<B> c(backend, d, {.groups = g, .z_storage = st});
        const auto r = c.compress(cview(x, t, d));
        CHECK(r.z_storage() == st);
        CHECK(r.bytes() == static_cast<std::size_t>(t * g) * 2 + static_cast<std::size_t>(c.subtoken_size()) * sizeof(float));
        CHECK(ref::rel_error(velora_dw(c, r, dy, o), reference) < tolerance);
        CHECK(ref::rel_error(velora_dw(c, r, dy, o), reference) > 0);   // really narrower than f32
        // Z is exactly the rounded f32 projection.
        const auto z16 = r.z<velora::half>();
        const auto z32 = rf.z<float>();
        if (st == velora::storage::f16) CHECK(z16.data[5].bits == velora::storage_cast<velora::half>::from(z32.data[5]).bits);
        else CHECK(z16.data[5].bits == velora::storage_cast<velora::bfloat16>::from(z32.data[5]).bits);
    }
}

TEST_CASE("one record shared by q, k and v projections equals three separate compressions") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 64, d = 48, o = 16, g = 6;
    const auto x = gaussian<float>(static_cast<std::size_t>(t * d), 41, 0.2);
    velora::compressor<B> shared(backend, d, {.groups = g});
    const auto record = shared.compress(cview(x, t, d));
    for (std::uint64_t layer = 0; layer < 3; ++layer) {
        const auto dy = gaussian<float>(static_cast<std::size_t>(t * o), 50 + layer);
        velora::compressor<B> own(backend, d, {.groups = g});
        const auto own_record = own.compress(cview(x, t, d));
        const auto a = velora_dw(shared, record, dy, o);
        const auto b = velora_dw(own, own_record, dy, o);
        CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
    }
}

TEST_CASE_TEMPLATE("SSF layer: forward, exact dX and db, VeLoRA dw against the naive oracle", T, float, double) {
    using B = velora::eigen_backend<T>;
    B backend;
    const index_t t = 70, d = 45, g = 6;   // s = 8, last group padded
    const double scale = 0.5;
    const auto x = gaussian<T>(static_cast<std::size_t>(t * d), 61, 0.3);
    const auto dy = gaussian<T>(static_cast<std::size_t>(t * d), 62);
    const auto w = gaussian<T>(static_cast<std::size_t>(d), 63), bias = gaussian<T>(static_cast<std::size_t>(d), 64);
    std::vector<T> y(x.size()), dx(x.size()), db(static_cast<std::size_t>(d)), dw(static_cast<std::size_t>(d));
    velora::ssf_forward(backend, cview(x, t, d), w.data(), bias.data(), mview(y, t, d));
    velora::ssf_input_grad(backend, cview(dy, t, d), w.data(), mview(dx, t, d));
    velora::bias_grad(backend, cview(dy, t, d), db.data());
    constexpr auto st = sizeof(T) == 8 ? velora::storage::f64 : velora::storage::f32;
    velora::compressor<B> c(backend, d, {.groups = g, .z_storage = st, .scale = scale});
    const auto r = c.compress(cview(x, t, d));
    c.ssf_weight_grad(r, cview(dy, t, d), dw.data());

    const auto rx = ref::from(x, t, d), rdy = ref::from(dy, t, d);
    const auto v = as_double(c.v());
    const auto z = ref::compress(rx, v, g);
    ref::matrix ey(t, d), edx(t, d), edb(1, d), edw(1, d);
    for (index_t i = 0; i < t; ++i)
        for (index_t j = 0; j < d; ++j) {
            ey(i, j) = rx(i, j) * double(w[static_cast<std::size_t>(j)]) + double(bias[static_cast<std::size_t>(j)]);
            edx(i, j) = rdy(i, j) * double(w[static_cast<std::size_t>(j)]);
            edb(0, j) += rdy(i, j);
            const index_t s = c.subtoken_size();
            edw(0, j) += scale * rdy(i, j) * z(i, j / s) * v[static_cast<std::size_t>(j % s)];   // dY ⊙ X̂, summed over tokens
        }
    CHECK(ref::rel_error(y, ey) < tol<T>());
    CHECK(ref::rel_error(dx, edx) < tol<T>());
    CHECK(ref::rel_error(db, edb) < tol<T>());
    CHECK(ref::rel_error(dw, edw) < tol<T>());
}

TEST_CASE("linear layer helpers are the exact products") {
    using B = velora::eigen_backend<double>;
    B backend;
    const index_t t = 33, d = 20, o = 7;
    const auto x = gaussian<double>(static_cast<std::size_t>(t * d), 71);
    const auto w = gaussian<double>(static_cast<std::size_t>(o * d), 72);
    const auto dy = gaussian<double>(static_cast<std::size_t>(t * o), 73);
    const auto bias = gaussian<double>(static_cast<std::size_t>(o), 74);
    std::vector<double> y(static_cast<std::size_t>(t * o)), dx(x.size()), dw(w.size());
    velora::linear_forward(backend, cview(x, t, d), cview(w, o, d), bias.data(), mview(y, t, o));
    velora::linear_input_grad(backend, cview(dy, t, o), cview(w, o, d), mview(dx, t, d));
    velora::dense_weight_grad(backend, cview(dy, t, o), cview(x, t, d), mview(dw, o, d));
    auto ey = ref::matmul(ref::from(x, t, d), false, ref::from(w, o, d), true);
    for (index_t i = 0; i < t; ++i) for (index_t j = 0; j < o; ++j) ey(i, j) += bias[static_cast<std::size_t>(j)];
    CHECK(ref::rel_error(y, ey) < 1e-13);
    CHECK(ref::rel_error(dx, ref::matmul(ref::from(dy, t, o), false, ref::from(w, o, d), false)) < 1e-13);
    CHECK(ref::rel_error(dw, ref::matmul(ref::from(dy, t, o), true, ref::from(x, t, d), false)) < 1e-13);
}

TEST_CASE("determinism: identical inputs give bit-identical records and gradients") {
    using B = velora::eigen_backend<float>;
    const index_t t = 1000, d = 256, o = 64, g = 32;
    const auto x = gaussian<float>(static_cast<std::size_t>(t * d), 81, 0.1);
    const auto dy = gaussian<float>(static_cast<std::size_t>(t * o), 82);
    std::vector<std::vector<float>> results;
    for (int run = 0; run < 2; ++run) {
        B backend;
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::batch_mean()});
        const auto r = c.compress(cview(x, t, d));
        results.push_back(velora_dw(c, r, dy, o));
        const auto z = r.z<float>();
        results.emplace_back(z.data, z.data + z.size());
    }
    CHECK(results[0] == results[2]);
    CHECK(results[1] == results[3]);
}

TEST_CASE("state round trip: a restored compressor continues identically") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 50, d = 40, g = 5;
    velora::compressor<B> a(backend, d, {.groups = g, .v = velora::v_mode::ema(0.9), .z_storage = velora::storage::bf16});
    velora::compressor<B>::record_type ra, rb;
    for (std::uint64_t step = 0; step < 3; ++step) a.compress(cview(gaussian<float>(static_cast<std::size_t>(t * d), 90 + step, 0.5), t, d), ra);
    const auto blob = a.save_state();
    velora::compressor<B> b(backend, d, {.groups = g, .v = velora::v_mode::ema(0.9), .z_storage = velora::storage::bf16});
    b.load_state(blob);
    CHECK(b.initialised());
    CHECK(b.v_updates() == 3);
    CHECK(std::equal(a.v().begin(), a.v().end(), b.v().begin()));
    const auto next = gaussian<float>(static_cast<std::size_t>(t * d), 99, 0.5);
    a.compress(cview(next, t, d), ra);
    b.compress(cview(next, t, d), rb);
    CHECK(std::equal(a.v().begin(), a.v().end(), b.v().begin()));
    CHECK(std::memcmp(ra.z<velora::bfloat16>().data, rb.z<velora::bfloat16>().data, static_cast<std::size_t>(t * g) * 2) == 0);
    CHECK(a.save_state() == b.save_state());

    // Via a file, as a checkpoint would be.
    const std::string path = "velora_test_state.bin";
    velora::write_state_file(path, blob);
    velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::ema(0.9), .z_storage = velora::storage::bf16});
    c.load_state(velora::read_state_file(path));
    CHECK(c.v_updates() == 3);
    std::remove(path.c_str());
}

TEST_CASE("bad input throws std::invalid_argument naming the function and values, and changes nothing") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 8, d = 12, g = 3, o = 5;
    auto x = gaussian<float>(static_cast<std::size_t>(t * d), 101, 0.5);
    const auto dy = gaussian<float>(static_cast<std::size_t>(t * o), 102);
    std::vector<float> a(static_cast<std::size_t>(o * g)), dw(static_cast<std::size_t>(o * d));

    auto contains = [](const std::string& msg, std::initializer_list<const char*> parts) {
        INFO(msg);
        for (const char* p : parts) CHECK(msg.find(p) != std::string::npos);
    };
    SUBCASE("configuration") {
        contains(invalid_argument_message([&] { velora::compressor<B>(backend, d, {.groups = 0}); }),
                 {"velora::compressor::compressor", "config.groups", "G = 0", "D = 12"});
        contains(invalid_argument_message([&] { velora::compressor<B>(backend, d, {.groups = 13}); }), {"G = 13", "D = 12"});
        contains(invalid_argument_message([&] { velora::compressor<B>(backend, 0, {.groups = 1}); }), {"features", "D = 0"});
        contains(invalid_argument_message([&] { velora::compressor<B>(backend, d, {.groups = 3, .z_storage = velora::storage::f64}); }),
                 {"z_storage = f64", "float"});
        contains(invalid_argument_message([&] { velora::compressor<B>(backend, d, {.groups = 3, .z_storage = velora::storage{9}}); }),
                 {"z_storage", "invalid value 9"});
        contains(invalid_argument_message([&] { velora::compressor<B>(backend, d, {.groups = 3, .v = velora::v_mode::ema(1.0)}); }),
                 {"0 <= decay < 1", "got 1"});
        contains(invalid_argument_message([&] { velora::compressor<B>(backend, d, {.groups = 3, .scale = -1}); }), {"config.scale", "-1"});
    }

    velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::batch_mean()});
    velora::compressor<B>::record_type record;
    c.compress(cview(x, t, d), record);
    const auto before = c.save_state();
    std::vector<float> x_empty;

    SUBCASE("compress") {
        contains(invalid_argument_message([&] { c.compress(velora::make_view<const float>(x.data(), 0, d), record); }),
                 {"velora::compressor::compress", "'x' is empty (0x12)"});
        contains(invalid_argument_message([&] { c.compress(cview(x, t * 2, d / 2), record); }), {"'x' has 6 columns", "D = 12"});
        x[17] = std::numeric_limits<float>::quiet_NaN();
        contains(invalid_argument_message([&] { c.compress(cview(x, t, d), record); }), {"velora::compressor::compress", "NaN or Inf"});
        x[17] = std::numeric_limits<float>::infinity();
        contains(invalid_argument_message([&] { c.compress(cview(x, t, d), record); }), {"NaN or Inf"});
        CHECK(c.save_state() == before);
        // Non-finite input in a mode that does not look at the batch mean is caught by the projection.
        velora::compressor<B> frozen(backend, d, {.groups = g, .v = velora::v_mode::random(1)});
        const auto frozen_before = frozen.save_state();
        contains(invalid_argument_message([&] { frozen.compress(cview(x, t, d), record); }), {"NaN or Inf"});
        CHECK(frozen.save_state() == frozen_before);
        CHECK(record.empty());
    }
    SUBCASE("backward") {
        contains(invalid_argument_message([&] { c.weight_grad(record, cview(dy, t - 1, o), mview(a, o, g)); }),
                 {"velora::compressor::weight_grad", "'dy' has 7 rows", "T = 8"});
        contains(invalid_argument_message([&] { c.weight_grad(record, cview(dy, t, o), mview(a, o, g - 1)); }), {"'a' is 5x2 but must be 5x3"});
        contains(invalid_argument_message([&] { c.expand_weight_grad(record, cview(a, o, g), mview(dw, o, d - 1)); }),
                 {"velora::compressor::expand_weight_grad", "'dw' is 5x11 but must be 5x12"});
        velora::compressor<B>::record_type empty;
        contains(invalid_argument_message([&] { c.weight_grad(empty, cview(dy, t, o), mview(a, o, g)); }), {"'record' is empty"});
        contains(invalid_argument_message([&] { (void)record.z<velora::half>(); }), {"velora::activation_record::z", "holds f32"});
        CHECK(c.save_state() == before);
    }
    SUBCASE("state: wrong storage type, wrong shape, corrupted blob") {
        velora::compressor<B> other_storage(backend, d, {.groups = g, .v = velora::v_mode::batch_mean(), .z_storage = velora::storage::f16});
        const auto other_before = other_storage.save_state();
        contains(invalid_argument_message([&] { other_storage.load_state(before); }),
                 {"velora::compressor::load_state", "storage type f32", "stores f16"});
        CHECK(other_storage.save_state() == other_before);
        velora::compressor<B> other_groups(backend, d, {.groups = 4, .v = velora::v_mode::batch_mean()});
        contains(invalid_argument_message([&] { other_groups.load_state(before); }), {"groups G = 3", "has 4"});
        velora::eigen_backend<double> double_backend;
        velora::compressor<velora::eigen_backend<double>> wider(double_backend, d, {.groups = g});
        contains(invalid_argument_message([&] { wider.load_state(before); }), {"value type size = 4", "has 8"});
        auto corrupted = before;
        corrupted[corrupted.size() / 2] ^= std::byte{1};
        velora::compressor<B> fresh(backend, d, {.groups = g, .v = velora::v_mode::batch_mean()});
        contains(invalid_argument_message([&] { fresh.load_state(corrupted); }), {"checksum mismatch"});
        contains(invalid_argument_message([&] { fresh.load_state(std::span(before).first(before.size() - 9)); }), {"truncated"});
        CHECK_FALSE(fresh.initialised());
    }
}
