// The v rule as an open extension point (velora/compression/v_rule.hpp): rules written here,
// outside the library, plug into velora::compressor<B, Rule> and give bit for bit the records,
// v and gradients of the library rule that chooses the same v; the library's five rules used
// as types save the same state as the v_mode that names them.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/velora.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "test_util.hpp"

using velora::index_t;

namespace {

// A user rule: v fixed by the host at construction (normalised by the rule), never updated.
struct fixed_v {
    std::vector<double> direction;

    std::string_view name() const noexcept { return "fixed_v"; }
    void validate(const char* fn) const {
        velora::detail::require(!direction.empty(), fn, "fixed_v needs a direction");
    }
    bool initial_v(std::span<double> v) const noexcept {
        if (v.size() != direction.size()) return false;   // no v: compress will ask for set_v
        std::copy(direction.begin(), direction.end(), v.begin());
        return velora::normalise_in_place(v) > 0;
    }
    template <class T>
    bool uses_batch(const velora::v_current<T>&) const noexcept { return false; }
    template <class T>
    void update(std::span<double>, const velora::v_current<T>&) const noexcept {}
    void save_settings(velora::state_writer& w) const {
        w.put(std::uint8_t{200});   // a tag of this rule's own: library rules use 0..4
        w.put_array(std::span<const double>(direction));
    }
    void load_settings(velora::state_reader& r) const {
        if (r.get<std::uint8_t>() != 200) r.bad("state was not saved by a fixed_v rule");
        if (r.get_array<double>() != direction) r.bad("state was saved with another fixed_v direction");
    }
};

// A user rule that takes v from every batch, with a running count: the batch mean for the
// first `batches` batches, then frozen.
struct mean_of_first {
    std::uint64_t batches = 1;

    std::string_view name() const noexcept { return "mean_of_first"; }
    void validate(const char* fn) const { velora::detail::require(batches >= 1, fn, "mean_of_first needs batches >= 1"); }
    bool initial_v(std::span<double>) const noexcept { return false; }
    template <class T>
    bool uses_batch(const velora::v_current<T>& now) const noexcept { return now.updates < batches; }
    template <class T>
    void update(std::span<double>, const velora::v_current<T>&) const noexcept {}   // v = this batch's direction
    void save_settings(velora::state_writer& w) const {
        w.put(std::uint8_t{201});
        w.put(batches);
    }
    void load_settings(velora::state_reader& r) const {
        if (r.get<std::uint8_t>() != 201 || r.get<std::uint64_t>() != batches) r.bad("state was saved by another rule");
    }
};

static_assert(velora::v_rule<fixed_v, float> && velora::v_rule<mean_of_first, double>);

template <class T>
velora::const_matrix_view<T> cview(const std::vector<T>& v, index_t r, index_t c) { return velora::make_view<const T>(v.data(), r, c); }
template <class T>
velora::matrix_view<T> mview(std::vector<T>& v, index_t r, index_t c) { return velora::make_view(v.data(), r, c); }

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Every product of a record, as bytes: Z, A, dW, X̂ and the SSF gradient.
template <class C>
struct products {
    std::vector<std::byte> z;
    std::vector<typename C::value_type> v, a, dw, xhat, ssf;
};
template <class C, class T = typename C::value_type>
products<C> all_products(C& c, const typename C::record_type& r, const std::vector<T>& dy, const std::vector<T>& dy_ssf, index_t o) {
    products<C> p;
    const index_t t = r.tokens(), d = c.features(), g = c.groups();
    velora::visit_storage(r.z_storage(), [&](auto tag) {
        const auto z = r.template z<decltype(tag)>();
        const auto* bytes = reinterpret_cast<const std::byte*>(z.data);
        p.z.assign(bytes, bytes + z.rows * z.cols * static_cast<index_t>(sizeof(decltype(tag))));
    });
    p.v.assign(r.v(), r.v() + r.subtoken_size());
    p.a.resize(static_cast<std::size_t>(o * g));
    p.dw.resize(static_cast<std::size_t>(o * d));
    p.xhat.resize(static_cast<std::size_t>(t * d));
    p.ssf.resize(static_cast<std::size_t>(d));
    c.gradient_factor(r, cview(dy, t, o), mview(p.a, o, g));
    c.expand_weight_grad(r, cview(p.a, o, g), mview(p.dw, o, d));
    c.reconstruct(r, mview(p.xhat, t, d));
    c.ssf_weight_grad(r, cview(dy_ssf, t, d), p.ssf.data());
    return p;
}
template <class C1, class C2>
void check_same(const products<C1>& p, const products<C2>& q) {
    CHECK(p.z == q.z);
    CHECK(same_bits(p.v, q.v));
    CHECK(same_bits(p.a, q.a));
    CHECK(same_bits(p.dw, q.dw));
    CHECK(same_bits(p.xhat, q.xhat));
    CHECK(same_bits(p.ssf, q.ssf));
}

} // namespace

TEST_CASE_TEMPLATE("a user rule with a fixed v compresses and gives the gradients of v_mode::given with the same v", T, float, double) {
    using B = velora::eigen_backend<T>;
    B backend;
    const index_t t = 37, d = 50, o = 9, g = 7, s = 8;   // D % G != 0: the last group is padded
    const auto x = test::data<T>(static_cast<std::size_t>(t * d), 11, 0.3);
    const auto dy = test::data<T>(static_cast<std::size_t>(t * o), 12);
    const auto dy_ssf = test::data<T>(static_cast<std::size_t>(t * d), 13);
    std::vector<double> direction(static_cast<std::size_t>(s));
    for (std::size_t j = 0; j < direction.size(); ++j) direction[j] = 0.25 + static_cast<double>(j) * (j % 2 ? -0.5 : 0.75);

    for (velora::storage st : {velora::storage::f32, velora::storage::bf16}) {
        INFO("storage " << velora::to_string(st));
        velora::compressor<B, fixed_v> mine(backend, d, {.groups = g, .v = fixed_v{direction}, .z_storage = st, .scale = 0.5});
        velora::compressor<B> library(backend, d, {.groups = g, .v = velora::v_mode::given(), .z_storage = st, .scale = 0.5});
        REQUIRE(mine.initialised());
        CHECK(mine.v_updates() == 1);
        // The direction's entries are exact in float, so set_v normalises the same doubles.
        library.set_v(std::vector<T>(direction.begin(), direction.end()));
        REQUIRE(std::equal(mine.v().begin(), mine.v().end(), library.v().begin()));

        for (index_t tokens : {t, index_t{5}, t}) {
            typename velora::compressor<B, fixed_v>::record_type rm;
            typename velora::compressor<B>::record_type rl;
            REQUIRE(mine.compress(cview(x, tokens, d), rm) == velora::status::ok);
            REQUIRE(library.compress(cview(x, tokens, d), rl) == velora::status::ok);
            check_same(all_products(mine, rm, dy, dy_ssf, o), all_products(library, rl, dy, dy_ssf, o));
            const auto fm = mine.factored(rm, cview(all_products(mine, rm, dy, dy_ssf, o).a, o, g));
            CHECK(fm.scale == T(0.5));
        }
        CHECK(mine.v_updates() == 1);   // never updated by a batch

        // The state carries the rule's own settings: a fixed_v compressor restores it, a library
        // compressor refuses it, and it refuses the library's.
        velora::compressor<B, fixed_v> restored(backend, d, {.groups = g, .v = fixed_v{direction}, .z_storage = st, .scale = 0.5});
        restored.set_v(std::vector<T>(static_cast<std::size_t>(s), T(1)));
        restored.load_state(mine.save_state());
        CHECK(restored.save_state() == mine.save_state());
        auto other = direction;
        other[0] += 1;
        velora::compressor<B, fixed_v> differs(backend, d, {.groups = g, .v = fixed_v{other}, .z_storage = st, .scale = 0.5});
        CHECK(test::invalid_argument_message([&] { differs.load_state(mine.save_state()); }).find("another fixed_v direction") !=
              std::string::npos);
        CHECK(test::invalid_argument_message([&] { library.load_state(mine.save_state()); }).find("v mode invalid") != std::string::npos);
        CHECK(test::invalid_argument_message([&] { mine.load_state(library.save_state()); }).find("not saved by a fixed_v") !=
              std::string::npos);
    }
}

TEST_CASE("a user rule without a usable initial v asks for set_v, naming itself") {
    using B = velora::eigen_backend<float>;
    B backend;
    const auto x = test::data<float>(40, 1, 0.3);
    velora::compressor<B, fixed_v> c(backend, 8, {.groups = 2, .v = fixed_v{{1.0, 2.0}}});   // s = 4: no v
    CHECK_FALSE(c.initialised());
    typename velora::compressor<B, fixed_v>::record_type r;
    CHECK(test::invalid_argument_message([&] { (void)c.compress(velora::make_view<const float>(x.data(), 5, 8), r); })
              .find("velora::compressor::compress: fixed_v requires set_v() before the first compress") == 0);
    CHECK(test::invalid_argument_message([&] { velora::compressor<B, fixed_v>(backend, 8, {.groups = 2, .v = fixed_v{}}); })
              .find("fixed_v needs a direction") != std::string::npos);
}

TEST_CASE("a user rule that takes v from batches runs the compressor's batch path bit for bit as batch_mean and first_batch_mean") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 24, d = 30, o = 6, g = 4;
    const auto dy = test::data<float>(static_cast<std::size_t>(t * o), 22);
    const auto dy_ssf = test::data<float>(static_cast<std::size_t>(t * d), 23);
    velora::compressor<B, mean_of_first> three(backend, d, {.groups = g, .v = mean_of_first{3}});
    velora::compressor<B, mean_of_first> one(backend, d, {.groups = g, .v = mean_of_first{1}});
    velora::compressor<B> batch(backend, d, {.groups = g, .v = velora::v_mode::batch_mean()});
    velora::compressor<B> first(backend, d, {.groups = g, .v = velora::v_mode::first_batch_mean()});
    std::vector<float> frozen;
    for (std::uint64_t step = 0; step < 5; ++step) {
        INFO("step " << step);
        const auto x = test::data<float>(static_cast<std::size_t>(t * d), 100 + step, 0.2);
        typename velora::compressor<B, mean_of_first>::record_type r3, r1;
        velora::compressor<B>::record_type rb, rf;
        REQUIRE(three.compress(cview(x, t, d), r3) == velora::status::ok);
        REQUIRE(one.compress(cview(x, t, d), r1) == velora::status::ok);
        REQUIRE(batch.compress(cview(x, t, d), rb) == velora::status::ok);
        REQUIRE(first.compress(cview(x, t, d), rf) == velora::status::ok);
        check_same(all_products(one, r1, dy, dy_ssf, o), all_products(first, rf, dy, dy_ssf, o));
        if (step < 3) check_same(all_products(three, r3, dy, dy_ssf, o), all_products(batch, rb, dy, dy_ssf, o));
        if (step == 2) frozen.assign(three.v().begin(), three.v().end());
        if (step > 2) CHECK(std::equal(frozen.begin(), frozen.end(), three.v().begin()));
        CHECK(three.v_updates() == std::min<std::uint64_t>(step + 1, 3));
    }
    // A zero batch: the compressor's fallback, for a user rule as for the library's.
    velora::compressor<B, mean_of_first> zero(backend, d, {.groups = g, .v = mean_of_first{1}});
    typename velora::compressor<B, mean_of_first>::record_type rz;
    const std::vector<float> zeros(static_cast<std::size_t>(t * d), 0.0f);
    CHECK(zero.compress(cview(zeros, t, d), rz) == velora::status::degenerate_input);
    CHECK(zero.fallback_used());
    velora::compressor<B, mean_of_first> reloaded(backend, d, {.groups = g, .v = mean_of_first{1}});
    reloaded.load_state(zero.save_state());   // the fallback flag is a state this rule can produce
    CHECK(reloaded.fallback_used());
}

TEST_CASE("the library's rules as types save the bytes of the v_mode that names them") {
    using B = velora::eigen_backend<float>;
    B backend;
    const index_t t = 16, d = 21, g = 5;
    const auto x = test::data<float>(static_cast<std::size_t>(t * d), 31, 0.4);
    auto run = [&](auto& c) {
        typename std::remove_reference_t<decltype(c)>::record_type r;
        for (int i = 0; i < 3; ++i) {
            if (!c.initialised() && c.config().v.name() == std::string_view("v_mode::given")) c.set_v(std::vector<float>(5, 1.0f));
            REQUIRE(c.compress(cview(x, t - i, d), r) == velora::status::ok);
        }
        return c.save_state();
    };
    auto same = [&](auto rule, velora::v_mode mode) {
        INFO(mode.name());
        velora::compressor<B, decltype(rule)> typed(backend, d, {.groups = g, .v = rule, .z_storage = velora::storage::f16});
        velora::compressor<B> named(backend, d, {.groups = g, .v = mode, .z_storage = velora::storage::f16});
        const auto saved = run(typed);
        CHECK(saved == run(named));
        named.load_state(saved);   // and they load each other's
        typed.load_state(named.save_state());
    };
    same(velora::v_rules::first_batch_mean{}, velora::v_mode::first_batch_mean());
    same(velora::v_rules::batch_mean{}, velora::v_mode::batch_mean());
    same(velora::v_rules::ema{.decay = 0.75}, velora::v_mode::ema(0.75));
    same(velora::v_rules::random{.seed = 9}, velora::v_mode::random(9));
    same(velora::v_rules::given{}, velora::v_mode::given());
    CHECK(test::invalid_argument_message([&] { velora::compressor<B, velora::v_rules::ema>(backend, d, {.groups = g, .v = {.decay = 1.5}}); })
              .find("0 <= decay < 1, got 1.5") != std::string::npos);
}
