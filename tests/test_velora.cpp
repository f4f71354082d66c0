// VeLoRA compressor: the closed form against the naive dense oracle in reference.hpp, every v
// mode, storage types, shared records, SSF, determinism, state round trip, bad input.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/velora.hpp>
#include <velora/distributed/shared_v.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
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
    c.gradient_factor(r, cview(dy, r.tokens(), o), mview(a, o, c.groups()));
    c.expand_weight_grad(r, cview(a, o, c.groups()), mview(dw, o, c.features()));
    return dw;
}

using test::invalid_argument_message;

constexpr auto npos = std::string::npos;

// Everything a record holds, copied out, so that a test can check that a call left the record
// bit for bit as it was.
template <class B>
struct record_snapshot {
    using T = typename B::value_type;
    index_t tokens = 0, features = 0, groups = 0, subtoken = 0;
    velora::storage st = velora::storage::f32;
    T scale = 0;
    std::vector<unsigned char> z;
    std::vector<T> v;
    explicit record_snapshot(const velora::activation_record<B>& r)
        : tokens(r.tokens()), features(r.features()), groups(r.groups()), subtoken(r.subtoken_size()), st(r.z_storage()), scale(r.scale()) {
        if (r.empty()) return;
        velora::visit_storage(st, [&](auto tag) {
            const auto view = r.template z<decltype(tag)>();
            const auto* p = reinterpret_cast<const unsigned char*>(view.data);
            z.assign(p, p + view.size() * static_cast<index_t>(sizeof(tag)));
        });
        v.assign(r.v(), r.v() + subtoken);
    }
    friend bool operator==(const record_snapshot&, const record_snapshot&) = default;
};

// A compressor state blob field by field, in the order save_state() writes them, so that a
// test can change one field and re-seal the blob (valid envelope and checksum): only the
// meaning of the state is then wrong.
template <class T>
struct compressor_payload {
    std::uint8_t value_size = 0;
    std::int64_t features = 0, groups = 0;
    std::uint8_t kind = 0;
    double decay = 0;
    std::uint64_t seed = 0;
    std::uint8_t storage = 0;
    double scale = 0;
    std::uint8_t initialised = 0, fallback = 0;
    std::uint64_t updates = 0;
    std::vector<T> v;

    static compressor_payload parse(std::span<const std::byte> blob) {
        using C = velora::compressor<velora::eigen_backend<T>>;
        velora::state_reader r(blob, C::state_kind, C::state_version, "test::compressor_payload");
        compressor_payload p;
        p.value_size = r.get<std::uint8_t>();
        p.features = r.get<std::int64_t>();
        p.groups = r.get<std::int64_t>();
        p.kind = r.get<std::uint8_t>();
        p.decay = r.get<double>();
        p.seed = r.get<std::uint64_t>();
        p.storage = r.get<std::uint8_t>();
        p.scale = r.get<double>();
        p.initialised = r.get<std::uint8_t>();
        p.fallback = r.get<std::uint8_t>();
        p.updates = r.get<std::uint64_t>();
        p.v = r.get_array<T>();
        r.expect_end();
        return p;
    }
    [[nodiscard]] std::vector<std::byte> seal() const {
        using C = velora::compressor<velora::eigen_backend<T>>;
        velora::state_writer w(C::state_kind, C::state_version);
        w.put(value_size);
        w.put(features);
        w.put(groups);
        w.put(kind);
        w.put(decay);
        w.put(seed);
        w.put(storage);
        w.put(scale);
        w.put(initialised);
        w.put(fallback);
        w.put(updates);
        w.put_array(std::span<const T>(v));
        return std::move(w).finish();
    }
};

template <class T>
double norm(std::span<const T> v) {
    double n2 = 0;
    for (T e : v) n2 += double(e) * double(e);
    return std::sqrt(n2);
}

// A type with compress but no weight gradient: not an activation compressor.
struct compress_only {
    using value_type = float;
    struct record_type { std::size_t bytes() const { return 0; } };
    velora::status compress(velora::const_matrix_view<float>, record_type&) { return velora::status::ok; }
};

// A host compressor written against the spelling before 0.x (weight_grad, no gradient_factor):
// the concept requires the new name (the decision is documented in velora/deprecated.hpp).
struct old_spelling_only {
    using value_type = float;
    struct record_type { std::size_t bytes() const { return 0; } };
    velora::status compress(velora::const_matrix_view<float>, record_type&) { return velora::status::ok; }
    void weight_grad(const record_type&, velora::const_matrix_view<float>, velora::matrix_view<float>) {}
    void expand_weight_grad(const record_type&, velora::const_matrix_view<float>, velora::matrix_view<float>) {}
};

} // namespace

static_assert(!velora::activation_compressor<old_spelling_only>);
static_assert(velora::activation_compressor<velora::compressor<velora::eigen_backend<float>>>);
static_assert(velora::activation_compressor<velora::compressor<velora::eigen_backend<double>>>);
static_assert(!velora::activation_compressor<compress_only>);

TEST_CASE("the old spelling weight_grad still works as a deprecated alias of gradient_factor, with the same bits and errors") {
    using T = float;
    velora::eigen_backend<T> backend;
    const index_t t = 9, d = 12, o = 5, g = 3;
    velora::compressor<velora::eigen_backend<T>> c(backend, d, {.groups = g});
    std::vector<T> x(t * d), dy(t * o);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = T(std::sin(0.7 * double(i)));
    for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = T(std::cos(0.3 * double(i)));
    velora::activation_record<velora::eigen_backend<T>> r;
    REQUIRE(c.compress(cview(x, t, d), r) == velora::status::ok);
    std::vector<T> renamed(o * g, T(-1)), old(o * g, T(-2));
    c.gradient_factor(r, cview(dy, t, o), mview(renamed, o, g));
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    c.weight_grad(r, cview(dy, t, o), mview(old, o, g));
    CHECK(old == renamed);
    // The errors name the new function: the alias forwards, it does not check on its own.
    CHECK(invalid_argument_message([&] { c.weight_grad(r, cview(dy, t - 1, o), mview(old, o, g)); }).find("velora::compressor::gradient_factor") !=
          std::string::npos);
#pragma GCC diagnostic pop
}

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
            c.gradient_factor(r, cview(dy, p.t, p.o), mview(a, p.o, p.g));
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
        CHECK(c.compress(cview(x1, t, d), r1) == velora::status::ok);
        CHECK(near(c.v(), dir1));
        CHECK(c.compress(cview(x2, t, d), r2) == velora::status::ok);
        CHECK(near(c.v(), dir1));
        CHECK(c.v_updates() == 1);
    }
    SUBCASE("batch_mean: recomputed every call; each record keeps the v it was made with") {
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::batch_mean()});
        CHECK(c.compress(cview(x1, t, d), r1) == velora::status::ok);
        CHECK(c.compress(cview(x2, t, d), r2) == velora::status::ok);
        CHECK(near(c.v(), dir2));
        CHECK(near(std::span<const double>(r1.v(), s), dir1));
        CHECK(near(std::span<const double>(r2.v(), s), dir2));
    }
    SUBCASE("ema: v <- normalize(decay v + (1 - decay) normalize(batch mean))") {
        const double decay = 0.8;
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::ema(decay)});
        CHECK(c.compress(cview(x1, t, d), r1) == velora::status::ok);
        CHECK(near(c.v(), dir1));
        CHECK(c.compress(cview(x2, t, d), r2) == velora::status::ok);
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
        CHECK(a.compress(cview(x1, t, d), r1) == velora::status::ok);
        CHECK(near(a.v(), expect));
    }
    SUBCASE("given: must be set before the first compress; normalised by the library") {
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::given()});
        // (void): the call throws before it could return a status.
        const auto msg = invalid_argument_message([&] { (void)c.compress(cview(x1, t, d), r1); });
        CHECK(msg.find("velora::compressor::compress: v_mode::given requires set_v()") == 0);
        const std::vector<double> v{3, 0, 4, 0, 0, 0};
        c.set_v(v);
        CHECK(near(c.v(), {0.6, 0, 0.8, 0, 0, 0}));
        CHECK(c.compress(cview(x1, t, d), r1) == velora::status::ok);
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
    for (std::uint64_t step = 0; step < 3; ++step)
        CHECK(a.compress(cview(gaussian<float>(static_cast<std::size_t>(t * d), 90 + step, 0.5), t, d), ra) == velora::status::ok);
    const auto blob = a.save_state();
    velora::compressor<B> b(backend, d, {.groups = g, .v = velora::v_mode::ema(0.9), .z_storage = velora::storage::bf16});
    b.load_state(blob);
    CHECK(b.initialised());
    CHECK(b.v_updates() == 3);
    CHECK(std::equal(a.v().begin(), a.v().end(), b.v().begin()));
    const auto next = gaussian<float>(static_cast<std::size_t>(t * d), 99, 0.5);
    CHECK(a.compress(cview(next, t, d), ra) == velora::status::ok);
    CHECK(b.compress(cview(next, t, d), rb) == velora::status::ok);
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
    REQUIRE(c.compress(cview(x, t, d), record) == velora::status::ok);
    const auto before = c.save_state();
    std::vector<float> x_empty;

    SUBCASE("compress") {
        // (void): these calls throw before they could return a status.
        contains(invalid_argument_message([&] { (void)c.compress(velora::make_view<const float>(x.data(), 0, d), record); }),
                 {"velora::compressor::compress", "'x' is empty (0x12)"});
        contains(invalid_argument_message([&] { (void)c.compress(cview(x, t * 2, d / 2), record); }), {"'x' has 6 columns", "D = 12"});
        CHECK(c.save_state() == before);
        CHECK(record.tokens() == t);   // a rejected call leaves the record as it was
    }
    SUBCASE("backward") {
        contains(invalid_argument_message([&] { c.gradient_factor(record, cview(dy, t - 1, o), mview(a, o, g)); }),
                 {"velora::compressor::gradient_factor", "'dy' has 7 rows", "T = 8"});
        contains(invalid_argument_message([&] { c.gradient_factor(record, cview(dy, t, o), mview(a, o, g - 1)); }), {"'a' is 5x2 but must be 5x3"});
        contains(invalid_argument_message([&] { c.expand_weight_grad(record, cview(a, o, g), mview(dw, o, d - 1)); }),
                 {"velora::compressor::expand_weight_grad", "'dw' is 5x11 but must be 5x12"});
        velora::compressor<B>::record_type empty;
        contains(invalid_argument_message([&] { c.gradient_factor(empty, cview(dy, t, o), mview(a, o, g)); }), {"'record' is empty"});
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

// ---------------------------------------------------------------------------------------------
// Issue 10: size arithmetic, numerical events, state meaning, aliasing.

TEST_CASE("sizes whose arithmetic would overflow are std::invalid_argument, never length_error or a wrapped size") {
    using B = velora::eigen_backend<float>;
    B backend;
    constexpr index_t huge = std::numeric_limits<index_t>::max();
    // s = ceil(D/G) is formed without D + G − 1, which overflowed (undefined behaviour; s came out 0).
    velora::compressor<B> widest(backend, huge, {.groups = huge});
    CHECK(widest.subtoken_size() == 1);
    velora::compressor<B> odd(backend, huge, {.groups = huge / 2});   // huge = 2·(huge/2) + 1: s = 3
    CHECK(odd.subtoken_size() == 3);
    // A sub-token too long for the address space is the caller's mistake (was std::length_error).
    for (index_t g : {index_t{1}, index_t{2}, index_t{3}, index_t{8}}) {
        INFO("G = " << g);
        const auto msg = invalid_argument_message([&] { velora::compressor<B>(backend, huge, {.groups = g}); });
        CHECK(msg.find("velora::compressor::compressor") == 0);
        CHECK(msg.find("sub-token size") != npos);
        CHECK(msg.find("D = " + std::to_string(huge)) != npos);
        CHECK(msg.find("G = " + std::to_string(g)) != npos);
    }
    // T·G and its bytes cannot wrap: an X whose extent does not fit is rejected before anything is sized.
    velora::compressor<B> c(backend, 64, {.groups = 8});
    std::vector<float> x(64, 1.0f);
    velora::compressor<B>::record_type r;
    // (void): the call throws before it could return a status.
    const auto msg = invalid_argument_message([&] { (void)c.compress(velora::make_view<const float>(x.data(), huge / 64, 64), r); });
    CHECK(msg.find("velora::compressor::compress: argument 'x'") == 0);
    CHECK(r.empty());
    CHECK_FALSE(c.initialised());
}

TEST_CASE_TEMPLATE("NaN or Inf in X returns status::non_finite_input; the compressor and the record stay bit for bit", T, float, double) {
    using B = velora::eigen_backend<T>;
    B backend;
    const index_t t = 40, g = 4;
    constexpr auto native = sizeof(T) == 8 ? velora::storage::f64 : velora::storage::f32;
    const auto modes = {velora::v_mode::first_batch_mean(), velora::v_mode::batch_mean(), velora::v_mode::ema(0.7), velora::v_mode::random(3),
                        velora::v_mode::given()};
    const auto bad_values = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity()};
    // Every projection path of the backend: a padded last group (s = 7), G | D (s = 6), and
    // whole 16-lane packets (s = 16, the AVX-512 kernel for float); wide and narrow storage.
    for (index_t d : {index_t{26}, index_t{24}, index_t{64}}) {
        const index_t s = (d + g - 1) / g;
        const auto good = gaussian<T>(static_cast<std::size_t>(t * d), 201, 0.5);
        for (velora::storage st : {native, velora::storage::f16, velora::storage::bf16}) {
            for (auto mode : modes) {
                for (T bad : bad_values) {
                    for (bool previous : {false, true}) {   // the first call, and a call after a valid compress
                        INFO("D " << d << ", storage " << velora::to_string(st) << ", mode " << velora::to_string(mode.type) << ", bad value "
                                  << bad << ", previous record " << previous);
                        velora::compressor<B> c(backend, d, {.groups = g, .v = mode, .z_storage = st});
                        if (mode.type == velora::v_mode::kind::given) c.set_v(std::vector<T>(static_cast<std::size_t>(s), T(1)));
                        typename velora::compressor<B>::record_type r;
                        if (previous) REQUIRE(c.compress(cview(good, t, d), r) == velora::status::ok);
                        const auto state = c.save_state();
                        const record_snapshot<B> snapshot(r);
                        for (std::size_t at : {std::size_t{37}, static_cast<std::size_t>(t * d - 1)}) {   // the first and the last group
                            auto x = good;
                            x[at] = bad;
                            CHECK(c.compress(cview(x, t, d), r) == velora::status::non_finite_input);
                            CHECK(c.save_state() == state);
                            CHECK(record_snapshot<B>(r) == snapshot);
                        }
                        // Nothing was half-committed: the next valid batch is compressed normally.
                        CHECK(c.compress(cview(good, t, d), r) == velora::status::ok);
                        CHECK(r.tokens() == t);
                    }
                }
            }
        }
    }
}

TEST_CASE("compress projects into a spare Z and swaps it with the record's: two buffers rotate, none is allocated after the first call") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 30, d = 40, g = 5;
    const auto x = gaussian<float>(static_cast<std::size_t>(t * d), 261, 0.5);
    for (auto mode : {velora::v_mode::first_batch_mean(), velora::v_mode::batch_mean()}) {
        velora::compressor<B> c(backend, d, {.groups = g, .v = mode});
        velora::compressor<B>::record_type r;
        std::vector<const float*> z;
        for (int call = 0; call < 5; ++call) {
            REQUIRE(c.compress(cview(x, t, d), r) == velora::status::ok);
            z.push_back(r.z<float>().data);
        }
        CHECK(z[0] != z[1]);
        CHECK(z[2] == z[0]);
        CHECK(z[3] == z[1]);
        CHECK(z[4] == z[0]);
        // A smaller batch reuses the same buffers.
        REQUIRE(c.compress(cview(x, t / 2, d), r) == velora::status::ok);
        CHECK(r.z<float>().data == z[1]);
        CHECK(r.tokens() == t / 2);
    }
}

TEST_CASE("finite X whose projection or batch mean overflows returns status::overflow and changes nothing") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 8, d = 16, g = 4, s = 4;
    const auto good = gaussian<float>(static_cast<std::size_t>(t * d), 211, 0.5);
    constexpr float big = 3e38f;   // finite; sums or unit-vector dot products of a few overflow float
    auto check_overflow = [&](velora::compressor<B>& c, const std::vector<float>& x) {
        velora::compressor<B>::record_type r;
        REQUIRE(c.compress(cview(good, t, d), r) == velora::status::ok);
        const auto state = c.save_state();
        const record_snapshot<B> snapshot(r);
        CHECK(c.compress(cview(x, t, d), r) == velora::status::overflow);
        CHECK(c.save_state() == state);
        CHECK(record_snapshot<B>(r) == snapshot);
        CHECK(c.compress(cview(good, t, d), r) == velora::status::ok);
    };
    SUBCASE("a float dot product: v = (1,1,1,1)/2, one sub-token of 3e38") {
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::given()});
        c.set_v(std::vector<float>(s, 1.0f));
        auto x = good;
        for (index_t j = 0; j < s; ++j) x[static_cast<std::size_t>(5 * d + s + j)] = big;   // Z = 4 · 3e38 / 2
        check_overflow(c, x);
    }
    SUBCASE("a float dot product in whole 16-lane packets (the AVX-512 kernel where built)") {
        const index_t wide = 64, s16 = 16;
        const auto good16 = gaussian<float>(static_cast<std::size_t>(t * wide), 212, 0.5);
        velora::compressor<B> c(backend, wide, {.groups = g, .v = velora::v_mode::given()});
        c.set_v(std::vector<float>(s16, 1.0f));
        velora::compressor<B>::record_type r;
        REQUIRE(c.compress(cview(good16, t, wide), r) == velora::status::ok);
        const record_snapshot<B> snapshot(r);
        auto x = good16;
        for (index_t j = 0; j < s16; ++j) x[static_cast<std::size_t>(2 * wide + s16 + j)] = big;   // Z = 16 · 3e38 / 4
        CHECK(c.compress(cview(x, t, wide), r) == velora::status::overflow);
        CHECK(record_snapshot<B>(r) == snapshot);
        x[static_cast<std::size_t>(7 * wide)] = std::numeric_limits<float>::infinity();   // and with an Inf as well
        CHECK(c.compress(cview(x, t, wide), r) == velora::status::non_finite_input);
        CHECK(record_snapshot<B>(r) == snapshot);
    }
    SUBCASE("the batch mean of batch_mean and ema modes") {
        const std::vector<float> x(static_cast<std::size_t>(t * d), big);
        for (auto mode : {velora::v_mode::batch_mean(), velora::v_mode::ema(0.5)}) {
            velora::compressor<B> c(backend, d, {.groups = g, .v = mode});
            check_overflow(c, x);
        }
    }
    SUBCASE("f16 storage: a value of 2e5 is finite in float but not in half") {
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::given(), .z_storage = velora::storage::f16});
        c.set_v(std::vector<float>(s, 1.0f));
        auto x = good;
        for (index_t j = 0; j < s; ++j) x[static_cast<std::size_t>(3 * d + j)] = 1e5f;   // Z = 2e5 > 65504
        check_overflow(c, x);
        for (index_t j = 0; j < s; ++j) x[static_cast<std::size_t>(3 * d + j)] = 1e4f;   // Z = 2e4: representable
        velora::compressor<B>::record_type r;
        CHECK(c.compress(cview(x, t, d), r) == velora::status::ok);
    }
    SUBCASE("bf16 storage: FLT_MAX is finite in float and rounds to Inf in bfloat16") {
        velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::given(), .z_storage = velora::storage::bf16});
        c.set_v(std::vector<float>{1.0f, 0.0f, 0.0f, 0.0f});
        auto x = good;
        x[static_cast<std::size_t>(2 * d)] = std::numeric_limits<float>::max();
        check_overflow(c, x);
    }
}

TEST_CASE("share_first_batch_v reports the batch as compress does: overflow for a finite batch whose sub-token sum overflows, non_finite_input for NaN/Inf") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 8, d = 16, g = 4;
    velora::single_process one;
    const auto good = gaussian<float>(static_cast<std::size_t>(t * d), 213, 0.5);
    // Finite, but the sub-token sum (Σ over 8 tokens and 4 groups of 3e38) overflows float.
    std::vector<float> x(static_cast<std::size_t>(t * d), 3e38f);
    const auto outcomes = [&](const std::vector<float>& batch) {
        velora::compressor<B> compressing(backend, d, {.groups = g}), sharing(backend, d, {.groups = g});
        const auto fresh = sharing.save_state();
        velora::compressor<B>::record_type r;
        const velora::status by_compress = compressing.compress(cview(batch, t, d), r);
        const velora::status by_share = velora::share_first_batch_v(backend, sharing, cview(batch, t, d), one);
        if (by_share != velora::status::ok) {
            CHECK_FALSE(sharing.initialised());
            CHECK(sharing.save_state() == fresh);   // v unchanged
        }
        CAPTURE(velora::to_string(by_compress));
        CAPTURE(velora::to_string(by_share));
        CHECK(by_share == by_compress);   // the same batch, the same status
        return by_share;
    };
    CHECK(outcomes(x) == velora::status::overflow);
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
        CAPTURE(bad);
        auto with_bad = x;   // the same huge batch with one non-finite entry
        with_bad[static_cast<std::size_t>(3 * d + 5)] = bad;
        CHECK(outcomes(with_bad) == velora::status::non_finite_input);
        auto ordinary = good;   // and an ordinary batch with one
        ordinary[static_cast<std::size_t>(6 * d + 1)] = bad;
        CHECK(outcomes(ordinary) == velora::status::non_finite_input);
    }
    CHECK(outcomes(good) == velora::status::ok);
}

TEST_CASE("a batch mean whose squared norm overflows double still gives a unit v (it used to give v = 0)") {
    using B = velora::eigen_backend<double>;
    B backend;
    const index_t t = 10, d = 12, g = 3, s = 4;
    auto x = gaussian<double>(static_cast<std::size_t>(t * d), 221, 0.5);
    const auto direction = ref::subtoken_direction(ref::from(x, t, d), s);
    for (auto& e : x) e *= 1e200;   // finite sums of ~1e202, whose squares overflow
    for (auto mode : {velora::v_mode::first_batch_mean(), velora::v_mode::batch_mean(), velora::v_mode::ema(0.5)}) {
        INFO(velora::to_string(mode.type));
        velora::compressor<B> c(backend, d, {.groups = g, .v = mode, .z_storage = velora::storage::f64});
        velora::compressor<B>::record_type r;
        CHECK(c.compress(cview(x, t, d), r) == velora::status::ok);
        CHECK(norm(c.v()) == doctest::Approx(1.0).epsilon(1e-14));
        for (index_t j = 0; j < s; ++j) CHECK(c.v()[static_cast<std::size_t>(j)] == doctest::Approx(direction[static_cast<std::size_t>(j)]).epsilon(1e-12));
    }
    // set_v scales before it squares: huge and tiny vectors are valid directions.
    velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::given()});
    for (double scale : {1e200, 1e-200, 1e-310}) {
        INFO("scale " << scale);
        c.set_v(std::vector<double>{3 * scale, 0, -4 * scale, 0});
        CHECK(c.v()[0] == doctest::Approx(0.6));
        CHECK(c.v()[2] == doctest::Approx(-0.8));
    }
}

TEST_CASE("compress(x) returning a record throws velora::numerical_error carrying the status it cannot return") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 8, d = 16, g = 4;
    auto x = gaussian<float>(static_cast<std::size_t>(t * d), 231, 0.5);
    velora::compressor<B> c(backend, d, {.groups = g, .v = velora::v_mode::batch_mean()});
    REQUIRE(c.compress(cview(x, t, d)).tokens() == t);
    const auto state = c.save_state();
    auto outcome_of = [&](const std::vector<float>& bad) {
        try {
            (void)c.compress(cview(bad, t, d));   // (void): expected to throw; the record is not wanted
        } catch (const velora::numerical_error& e) {
            INFO(e.what());
            CHECK(std::string(e.what()).find("velora::compressor::compress: argument 'x' (8x16)") == 0);
            return e.outcome();
        }
        return velora::status::ok;
    };
    auto nan = x;
    nan[3] = std::numeric_limits<float>::quiet_NaN();
    CHECK(outcome_of(nan) == velora::status::non_finite_input);
    CHECK(outcome_of(std::vector<float>(x.size(), 3e38f)) == velora::status::overflow);
    CHECK(c.save_state() == state);
    // degenerate_input still gives a record (made with the fallback v, as fallback_used() says).
    const auto r = c.compress(cview(std::vector<float>(x.size(), 0.0f), t, d));
    CHECK(r.tokens() == t);
    CHECK(c.fallback_used());
    static_assert(std::is_base_of_v<std::runtime_error, velora::numerical_error>);
}

TEST_CASE_TEMPLATE("load_state accepts every state the compressor writes", T, float, double) {
    using B = velora::eigen_backend<T>;
    B backend;
    std::uint64_t seed = 300;
    struct shape { index_t d, g; };
    for (shape sh : {shape{1, 1}, shape{7, 7}, shape{24, 4}, shape{26, 4}, shape{300, 1}, shape{1000, 3}}) {
        const index_t t = 5, s = (sh.d + sh.g - 1) / sh.g;
        for (auto mode : {velora::v_mode::first_batch_mean(), velora::v_mode::batch_mean(), velora::v_mode::ema(0.9), velora::v_mode::random(7),
                          velora::v_mode::given()}) {
            const velora::compressor_config config{.groups = sh.g, .v = mode};
            velora::compressor<B> c(backend, sh.d, config);
            typename velora::compressor<B>::record_type r;
            auto round_trip = [&](const char* after) {
                INFO("D = " << sh.d << ", G = " << sh.g << ", mode " << velora::to_string(mode.type) << ", after " << after);
                const auto blob = c.save_state();
                velora::compressor<B> other(backend, sh.d, config);
                CHECK_NOTHROW(other.load_state(blob));
                CHECK(other.save_state() == blob);
            };
            round_trip("construction");
            if (mode.type != velora::v_mode::kind::given) {
                CHECK(c.compress(cview(std::vector<T>(static_cast<std::size_t>(t * sh.d), T(0)), t, sh.d), r) != velora::status::non_finite_input);
                round_trip("an all-zero batch");
                for (int i = 0; i < 20; ++i) {
                    CHECK(c.compress(cview(gaussian<T>(static_cast<std::size_t>(t * sh.d), ++seed, 0.3 * i - 3), t, sh.d), r) == velora::status::ok);
                    round_trip("a batch");
                }
            }
            for (int i = 0; i < 40; ++i) {   // set_v at many scales and directions
                std::vector<T> v(static_cast<std::size_t>(s));
                const double scale = std::pow(10.0, (i % 9) * 7 - 28);   // 1e-28 .. 1e28
                for (index_t j = 0; j < s; ++j) v[static_cast<std::size_t>(j)] = static_cast<T>(scale * velora::gaussian_at(++seed, 0));
                if (norm(std::span<const T>(v)) == 0) continue;
                c.set_v(v);
                round_trip("set_v");
            }
        }
    }
}

TEST_CASE("load_state rejects states the compressor cannot be in (state_format_error, nothing changed)") {
    using B = velora::eigen_backend<float>;
    using P = compressor_payload<float>;
    B backend;
    const index_t t = 20, d = 24, g = 4, s = 6;
    const auto x = gaussian<float>(static_cast<std::size_t>(t * d), 241, 0.5);
    velora::compressor<B> source(backend, d, {.groups = g, .v = velora::v_mode::batch_mean()});
    velora::compressor<B>::record_type r;
    REQUIRE(source.compress(cview(x, t, d), r) == velora::status::ok);
    const auto valid = P::parse(source.save_state());
    REQUIRE(valid.initialised == 1);
    REQUIRE(valid.updates == 1);
    const float fallback = static_cast<float>(1.0 / std::sqrt(double(s)));

    auto rejected = [&](velora::v_mode mode, const P& payload, std::initializer_list<const char*> parts) {
        for (bool initialised_target : {false, true}) {
            velora::compressor<B> target(backend, d, {.groups = g, .v = mode});
            if (initialised_target) target.set_v(std::vector<float>{1, 2, 3, 4, 5, 6});
            const auto before = target.save_state();
            std::string msg = "<no state_format_error>";
            try {
                target.load_state(payload.seal());
            } catch (const velora::state_format_error& e) {
                msg = e.what();
            }
            INFO(msg);
            CHECK(msg.find("velora::compressor::load_state: ") == 0);
            for (const char* p : parts) CHECK(msg.find(p) != npos);
            CHECK(target.save_state() == before);
        }
    };
    const auto batch_mean = velora::v_mode::batch_mean();
    SUBCASE("the unchanged payload re-sealed loads") {
        velora::compressor<B> target(backend, d, {.groups = g, .v = batch_mean});
        CHECK_NOTHROW(target.load_state(valid.seal()));
        CHECK(std::equal(target.v().begin(), target.v().end(), source.v().begin()));
    }
    SUBCASE("v not finite, zero, huge, or not of unit norm") {
        auto p = valid;
        p.v[2] = std::numeric_limits<float>::quiet_NaN();
        rejected(batch_mean, p, {"v[2]", "nan"});
        p.v[2] = -std::numeric_limits<float>::infinity();
        rejected(batch_mean, p, {"v[2]", "inf"});
        p.v.assign(static_cast<std::size_t>(s), 0.0f);
        rejected(batch_mean, p, {"norm", "unit"});
        p = valid;
        for (auto& e : p.v) e *= 1e30f;
        rejected(batch_mean, p, {"norm", "1e+30"});
        p = valid;
        p.v[0] *= 1.001f;
        rejected(batch_mean, p, {"norm"});
    }
    SUBCASE("flags the compressor never combines") {
        auto p = valid;
        p.initialised = 0;   // v is set but the flag says it is not
        rejected(batch_mean, p, {"not initialised", "v"});
        p.v.assign(static_cast<std::size_t>(s), 0.0f);
        p.updates = 3;   // no v, yet updates were counted
        rejected(batch_mean, p, {"not initialised", "update count = 3"});
        p.updates = 0;
        p.fallback = 1;   // the fallback v without any v
        rejected(batch_mean, p, {"fallback"});
        p = valid;
        p.updates = 0;   // a v that was never set
        rejected(batch_mean, p, {"update count = 0"});
        p = valid;
        p.initialised = 2;   // flags are written as 0 or 1
        rejected(batch_mean, p, {"initialised flag", "2"});
        p = valid;
        p.fallback = 1;   // the fallback flag with a v that is not the fallback
        rejected(batch_mean, p, {"fallback", "1/sqrt(s)"});
        p.v.assign(static_cast<std::size_t>(s), fallback);   // ... and with the fallback v it is a real state
        velora::compressor<B> target(backend, d, {.groups = g, .v = batch_mean});
        CHECK_NOTHROW(target.load_state(p.seal()));
        CHECK(target.fallback_used());
    }
    SUBCASE("flags the mode never produces") {
        auto p = valid;
        p.kind = static_cast<std::uint8_t>(velora::v_mode::kind::given);
        p.fallback = 1;   // given mode never computes a mean, so never falls back
        p.v.assign(static_cast<std::size_t>(s), fallback);
        rejected(velora::v_mode::given(), p, {"fallback", "given"});
        p = valid;
        p.kind = static_cast<std::uint8_t>(velora::v_mode::kind::random);
        p.seed = 5;
        p.initialised = 0;   // random mode draws v at construction
        p.updates = 0;
        p.v.assign(static_cast<std::size_t>(s), 0.0f);
        rejected(velora::v_mode::random(5), p, {"random", "not initialised"});
    }
}

TEST_CASE("outputs that overlap an input are rejected naming both; exact in-place SSF stays supported") {
    using B = velora::eigen_backend<double>;
    B backend;
    const index_t t = 6, d = 5, o = 5, g = 5;   // o = d so that one buffer can play both roles
    auto x = gaussian<double>(static_cast<std::size_t>(t * d), 251, 0.5);
    auto w = gaussian<double>(static_cast<std::size_t>(o * d), 252);
    auto dy = gaussian<double>(static_cast<std::size_t>(t * o), 253);
    auto bias = gaussian<double>(static_cast<std::size_t>(d), 254);
    std::vector<double> y(static_cast<std::size_t>(t * o)), dw(static_cast<std::size_t>(o * d));
    auto rejects = [](auto&& call, std::initializer_list<const char*> parts) {
        const auto msg = invalid_argument_message(call);
        INFO(msg);
        for (const char* p : parts) CHECK(msg.find(p) != npos);
        CHECK(msg.find("overlaps") != npos);
    };
    const auto x_copy = x, w_copy = w, dy_copy = dy;
    SUBCASE("linear layer helpers") {
        rejects([&] { velora::linear_forward(backend, cview(x, t, d), cview(w, o, d), nullptr, mview(x, t, o)); },
                {"velora::linear_forward", "'y'", "'x'"});
        std::vector<double> wy(static_cast<std::size_t>(o * d + t * o));   // y would start on w's last row
        std::copy(w.begin(), w.end(), wy.begin());
        rejects([&] {
            velora::linear_forward(backend, cview(x, t, d), velora::make_view<const double>(wy.data(), o, d), nullptr,
                                   velora::make_view(wy.data() + (o - 1) * d, t, o));
        }, {"velora::linear_forward", "'y'", "'w'"});
        rejects([&] { velora::linear_forward(backend, cview(x, t, d), cview(w, o, d), y.data() + 7, mview(y, t, o)); },
                {"velora::linear_forward", "'y'", "'bias'"});
        rejects([&] { velora::linear_input_grad(backend, cview(dy, t, o), cview(w, o, d), mview(dy, t, d)); },
                {"velora::linear_input_grad", "'dx'", "'dy'"});
        rejects([&] { velora::linear_input_grad(backend, cview(dy, o, o), cview(w, o, d), velora::make_view(w.data(), o, d)); },
                {"velora::linear_input_grad", "'dx'", "'w'"});
        rejects([&] { velora::dense_weight_grad(backend, cview(dy, t, o), cview(x, t, d), velora::make_view(x.data() + d, o, d)); },
                {"velora::dense_weight_grad", "'dw'", "'x'"});
        rejects([&] { velora::dense_weight_grad(backend, cview(dy, t, o), cview(x, t, d), velora::make_view(dy.data(), o, d)); },
                {"velora::dense_weight_grad", "'dw'", "'dy'"});
        rejects([&] { velora::bias_grad(backend, cview(dy, t, o), dy.data() + 2 * o); }, {"velora::bias_grad", "'db'", "'dy'"});
        CHECK(x == x_copy);   // nothing was written
        CHECK(w == w_copy);
        CHECK(dy == dy_copy);
    }
    SUBCASE("SSF: out == in exactly is supported, any other overlap is not") {
        std::vector<double> expect(x.size());
        velora::ssf_forward(backend, cview(x, t, d), w.data(), bias.data(), mview(expect, t, d));
        auto inplace = x;
        velora::ssf_forward(backend, cview(inplace, t, d), w.data(), bias.data(), mview(inplace, t, d));
        CHECK(inplace == expect);
        velora::ssf_input_grad(backend, cview(expect, t, d), w.data(), mview(y, t, d));
        velora::ssf_input_grad(backend, cview(inplace, t, d), w.data(), mview(inplace, t, d));
        CHECK(inplace == y);
        // Shifted by one row: each row would read what the previous one wrote.
        rejects([&] { velora::ssf_forward(backend, cview(x, t - 1, d), w.data(), nullptr, velora::make_view(x.data() + d, t - 1, d)); },
                {"velora::ssf_forward", "'y'", "'x'"});
        rejects([&] { velora::ssf_forward(backend, cview(x, t, d), x.data() + d, nullptr, mview(x, t, d)); }, {"velora::ssf_forward", "'y'", "'w'"});
        rejects([&] { velora::ssf_forward(backend, cview(x, t, d), w.data(), x.data(), mview(x, t, d)); }, {"velora::ssf_forward", "'y'", "'bias'"});
        rejects([&] { velora::ssf_input_grad(backend, cview(dy, t - 1, d), w.data(), velora::make_view(dy.data() + 1, t - 1, d)); },
                {"velora::ssf_input_grad", "'dx'", "'dy'"});
        rejects([&] { velora::ssf_input_grad(backend, cview(dy, t, d), dy.data() + 3, mview(dy, t, d)); }, {"velora::ssf_input_grad", "'dx'", "'w'"});
        CHECK(x == x_copy);
        CHECK(dy == dy_copy);
    }
    SUBCASE("compressor backward") {
        velora::compressor<B> c(backend, d, {.groups = g, .z_storage = velora::storage::f64});
        velora::compressor<B>::record_type r;
        REQUIRE(c.compress(cview(x, t, d), r) == velora::status::ok);
        std::vector<double> a(static_cast<std::size_t>(o * g));
        rejects([&] { c.gradient_factor(r, cview(dy, t, o), velora::make_view(dy.data() + o, o, g)); },
                {"velora::compressor::gradient_factor", "'a'", "'dy'"});
        c.gradient_factor(r, cview(dy, t, o), mview(a, o, g));
        rejects([&] { c.expand_weight_grad(r, cview(a, o, g), mview(a, o, d)); }, {"velora::compressor::expand_weight_grad", "'dw'", "'a'"});
        rejects([&] { c.ssf_weight_grad(r, cview(dy, t, d), dy.data() + 4); }, {"velora::compressor::ssf_weight_grad", "'dw'", "'dy'"});
        CHECK(dy == dy_copy);
        // set_v copies its argument first, so the compressor's own v is a valid argument.
        const std::vector<double> v(c.v().begin(), c.v().end());
        c.set_v(c.v());
        for (std::size_t j = 0; j < v.size(); ++j) CHECK(c.v()[j] == doctest::Approx(v[j]).epsilon(1e-15));
    }
}
