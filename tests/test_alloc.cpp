// Steady state allocates nothing: after a warm-up step, a full VeLoRA forward/backward step
// (compress, factored weight gradient, expansion, dX, db, reconstruction) and an AdaRankGrad
// optimizer step between refreshes (dense, low-rank, and low-rank fed a factored VeLoRA
// gradient) make no heap allocation at all; after compressor::reserve, not even the first calls
// do, at any batch size up to the one reserved. Every C++ allocation is counted by replacing the global operator new,
// and Eigen's own heap use is forbidden through EIGEN_RUNTIME_NO_MALLOC.
#define EIGEN_RUNTIME_NO_MALLOC
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <adarank/adarank.hpp>
#include <velora/velora.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <algorithm>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "allocation_counter.hpp"   // every allocation counted (the no-allocation-after-reserve tests)
using test::allocations;

using velora::index_t;

// Heap allocations made by two calls of `step`, with Eigen's own heap forbidden meanwhile
// (EIGEN_RUNTIME_NO_MALLOC: an Eigen allocation would assert) when the build's GEMM is a BLAS.
// Without a BLAS the GEMM is Eigen's public product, which takes its packing buffers from the
// heap on every call (Eigen's allocation, documented in docs/performance.md); the library's own
// allocations (every operator new) are still counted.
template <class Step>
long allocations_during_two(Step& step) {
    const long before = allocations.load();
    if constexpr (velora::cpu::has_blas) Eigen::internal::set_is_malloc_allowed(false);
    step();
    step();
    Eigen::internal::set_is_malloc_allowed(true);
    return allocations.load() - before;
}

TEST_CASE_TEMPLATE("a steady-state VeLoRA layer step makes no heap allocation", T, float, double) {
    using B = velora::eigen_backend<T>;
    B backend;
    // Large enough for the threaded GEMM and kernel paths; D % G != 0 exercises padding.
    const index_t t = 512, d = 200, o = 96, g = 16;
    std::vector<T> x(static_cast<std::size_t>(t * d)), dy(static_cast<std::size_t>(t * o)), w(static_cast<std::size_t>(o * d));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<T>(velora::gaussian_at(1, i) + 0.3);
    for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = static_cast<T>(velora::gaussian_at(2, i));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<T>(velora::gaussian_at(3, i));
    std::vector<T> y(static_cast<std::size_t>(t * o)), dx(x.size()), a(static_cast<std::size_t>(o * g)), dw(w.size()),
        db(static_cast<std::size_t>(o)), xhat(x.size());
    for (velora::storage st : {velora::storage::f32, velora::storage::bf16}) {
        for (velora::v_mode mode : {velora::v_mode::first_batch_mean(), velora::v_mode::ema(0.9)}) {
            velora::compressor<B> c(backend, d, {.groups = g, .v = mode, .z_storage = st});
            typename velora::compressor<B>::record_type record;
            auto step = [&] {
                const auto xv = velora::make_view<const T>(x.data(), t, d);
                const auto dyv = velora::make_view<const T>(dy.data(), t, o);
                velora::linear_forward(backend, xv, velora::make_view<const T>(w.data(), o, d), nullptr, velora::make_view(y.data(), t, o));
                CHECK(c.compress(xv, record) == velora::status::ok);
                c.gradient_factor(record, dyv, velora::make_view(a.data(), o, g));
                c.expand_weight_grad(record, velora::make_view<const T>(a.data(), o, g), velora::make_view(dw.data(), o, d));
                velora::linear_input_grad(backend, dyv, velora::make_view<const T>(w.data(), o, d), velora::make_view(dx.data(), t, d));
                velora::bias_grad(backend, dyv, db.data());
                c.reconstruct(record, velora::make_view(xhat.data(), t, d));
            };
            INFO("storage " << velora::to_string(st) << ", mode " << velora::to_string(mode.type));
            step();   // warm-up: sizes the record, the GEMM packing buffers and the reduction scratch
            CHECK(allocations_during_two(step) == 0);
        }
    }
}

TEST_CASE_TEMPLATE("after reserve(max_tokens), the compressor allocates nothing from its first call on, for every T up to max_tokens",
                   T, float, double) {
    using B = velora::eigen_backend<T>;
    const index_t max_tokens = 512, d = 200, o = 96, g = 16;
    // x holds one token more than max_tokens: the second record reads the rows from the second on.
    std::vector<T> x(static_cast<std::size_t>((max_tokens + 1) * d)), dy(static_cast<std::size_t>(max_tokens * o)),
        dy_ssf(static_cast<std::size_t>(max_tokens * d)), a(static_cast<std::size_t>(o * g)), dw(static_cast<std::size_t>(o * d)),
        ssf(static_cast<std::size_t>(d)), xhat(static_cast<std::size_t>(max_tokens * d));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<T>(velora::gaussian_at(1, i) + 0.3);
    for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = static_cast<T>(velora::gaussian_at(2, i));
    for (std::size_t i = 0; i < dy_ssf.size(); ++i) dy_ssf[i] = static_cast<T>(velora::gaussian_at(3, i));
    auto products = [&](auto& c, const auto& record, index_t t) {
        const auto dyv = velora::make_view<const T>(dy.data(), t, o);
        c.gradient_factor(record, dyv, velora::make_view(a.data(), o, g));
        (void)c.factored(record, velora::make_view<const T>(a.data(), o, g));
        c.expand_weight_grad(record, velora::make_view<const T>(a.data(), o, g), velora::make_view(dw.data(), o, d));
        c.reconstruct(record, velora::make_view(xhat.data(), t, d));
        c.ssf_weight_grad(record, velora::make_view<const T>(dy_ssf.data(), t, d), ssf.data());
    };
    for (velora::storage st : {velora::storage::f32, velora::storage::bf16}) {
        for (velora::v_mode mode : {velora::v_mode::first_batch_mean(), velora::v_mode::ema(0.9), velora::v_mode::random(4)}) {
            INFO("storage " << velora::to_string(st) << ", mode " << velora::to_string(mode.type));
            const velora::compressor_config config{.groups = g, .v = mode, .z_storage = st};
            B backend;   // a fresh backend each time: its reduction scratch is sized by c.reserve, not by an earlier call
            velora::compressor<B> c(backend, d, config);
            typename velora::compressor<B>::record_type shared, other;
            const std::size_t z = static_cast<std::size_t>(max_tokens * g) * velora::storage_bytes(st);
            // the spare Z, and the widening chunk (min(T, 2^15 / G) rows of G) unless Z is stored as T itself
            const std::size_t chunk = st == velora::storage::f32 && sizeof(T) == 4 ? 0 : std::min<std::size_t>(2048, max_tokens) * g * sizeof(T);
            CHECK(c.workspace_bytes(max_tokens) == z + chunk);
            CHECK(c.record_bytes(max_tokens) == z + static_cast<std::size_t>(c.subtoken_size()) * sizeof(T));
            c.reserve(max_tokens);
            c.reserve(max_tokens, shared);
            c.reserve(max_tokens, other);
            CHECK(shared.capacity_bytes() >= c.record_bytes(max_tokens));
            const long before = allocations.load();
            if constexpr (velora::cpu::has_blas) Eigen::internal::set_is_malloc_allowed(false);
            for (index_t t : {index_t{7}, max_tokens / 2, max_tokens, index_t{1}, max_tokens}) {
                CHECK(c.compress(velora::make_view<const T>(x.data(), t, d), shared) == velora::status::ok);
                products(c, shared, t);
                CHECK(c.compress(velora::make_view<const T>(x.data() + d, t, d), other) == velora::status::ok);   // a second record
                products(c, other, t);
            }
            Eigen::internal::set_is_malloc_allowed(true);
            CHECK(allocations.load() - before == 0);
        }
    }
}

// What the optimizer tests step with: a VeLoRA layer's factored gradient of an o×d weight (from a
// compressed T×d input and a T×o output gradient, G = 16), a dense gradient of the same shape
// and a bias gradient; all made before anything is counted.
template <class T>
struct optimizer_inputs {
    using B = velora::eigen_backend<T>;
    static constexpr index_t t = 256, d = 200, o = 96, g = 16;
    B backend;
    std::vector<T> x = values(t * d, 1, 0.3), dy = values(t * o, 2, 0), grad = values(o * d, 3, 0), bias_grad = values(o, 4, 0);
    std::vector<T> w = std::vector<T>(static_cast<std::size_t>(o * d)), a = std::vector<T>(static_cast<std::size_t>(o * g)),
                   bias = std::vector<T>(static_cast<std::size_t>(o));
    velora::compressor<B> c{backend, d, {.groups = g}};
    typename velora::compressor<B>::record_type record;
    velora::factored_gradient<T> factored;

    optimizer_inputs() {
        REQUIRE(c.compress(velora::make_view<const T>(x.data(), t, d), record) == velora::status::ok);
        c.gradient_factor(record, velora::make_view<const T>(dy.data(), t, o), velora::make_view(a.data(), o, g));
        factored = c.factored(record, velora::make_view<const T>(a.data(), o, g));
    }
    static std::vector<T> values(index_t n, std::uint64_t seed, double shift) {
        std::vector<T> v(static_cast<std::size_t>(n));
        for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<T>(velora::gaussian_at(seed, i) + shift);
        return v;
    }
};

TEST_CASE_TEMPLATE("a low-rank AdamW step between refreshes makes no heap allocation", T, float, double) {
    optimizer_inputs<T> in;
    using B = typename optimizer_inputs<T>::B;
    constexpr index_t d = optimizer_inputs<T>::d, o = optimizer_inputs<T>::o;
    auto& backend = in.backend;
    auto &w = in.w, &grad = in.grad, &bias = in.bias, &bias_grad = in.bias_grad;
    const auto& factored = in.factored;

    for (auto side : {adarank::side_policy::left, adarank::side_policy::right}) {
        adarank::optimizer_config config;
        config.rank = adarank::rank_policy::adaptive(0.1, 1, 24);
        config.refresh = adarank::refresh_policy::converged(0.0, 1000, 1000);   // no refresh in the measured steps
        config.side = side;
        config.adam.weight_decay = 0.01;
        adarank::low_rank_adamw<B> opt(backend, config);
        const auto dense_id = opt.add_parameter(o, d, adarank::param_kind::low_rank);
        const auto fused_id = opt.add_parameter(o, d, adarank::param_kind::low_rank);
        const auto bias_id = opt.add_parameter(1, o);
        auto step = [&] {
            CHECK(opt.step(dense_id, velora::make_view(w.data(), o, d), velora::make_view<const T>(grad.data(), o, d)) == velora::status::ok);
            CHECK(opt.step(fused_id, velora::make_view(w.data(), o, d), factored) == velora::status::ok);
            CHECK(opt.step(bias_id, velora::make_view(bias.data(), 1, o), velora::make_view<const T>(bias_grad.data(), 1, o)) == velora::status::ok);
        };
        INFO("side " << adarank::to_string(side));
        step();   // warm-up: the first step of each parameter finds its subspace (allowed to allocate)
        step();
        CHECK(allocations_during_two(step) == 0);
        CHECK(opt.layer_state(dense_id).refreshes == 1);
        CHECK(opt.layer_state(fused_id).refreshes == 1);
    }
}


// Two identical ranks as the data-parallel paths see them: every sum is twice the value, so the
// mean is the value itself. (Host memory: the CPU backend.)
struct twin_ranks {
    [[nodiscard]] int rank() const { return 0; }
    [[nodiscard]] int size() const { return 2; }
    void all_reduce_sum(std::span<float> d) {
        for (float& e : d) e *= 2;
    }
    void all_reduce_sum(std::span<double> d) {
        for (double& e : d) e *= 2;
    }
    void broadcast(std::span<std::byte>, int) {}
    [[nodiscard]] bool any(bool flag) { return flag; }
};
static_assert(velora::communicator<twin_ranks>);

TEST_CASE_TEMPLATE("after reserve(plan), the first factored, data-parallel and bucketed steps make no heap allocation; workspace_bytes(plan) says how much before", T,
                   float, double) {
    optimizer_inputs<T> in;
    using B = typename optimizer_inputs<T>::B;
    constexpr index_t d = optimizer_inputs<T>::d, o = optimizer_inputs<T>::o, g = optimizer_inputs<T>::g;
    auto& backend = in.backend;
    auto &w = in.w, &grad = in.grad, &bias = in.bias, &bias_grad = in.bias_grad;
    const auto& factored = in.factored;
    std::vector<T> w2(w.size()), w3(w.size()), grad2(w.size());

    adarank::optimizer_config config;
    config.rank = adarank::rank_policy::adaptive(0.1, 1, 24);
    config.refresh = adarank::refresh_policy::converged(0.0, 1000, 1000);   // no refresh in the measured steps
    adarank::low_rank_adamw<B> opt(backend, config);
    twin_ranks comm;
    const auto low_rank_id = opt.add_parameter(o, d, adarank::param_kind::low_rank);
    const auto dense_id = opt.add_parameter(o, d, adarank::param_kind::dense);
    const auto bias_id = opt.add_parameter(1, o);
    // The low-rank parameter's first step finds its subspace (allowed to allocate its state).
    REQUIRE(opt.step(low_rank_id, velora::make_view(w.data(), o, d), velora::make_view<const T>(grad.data(), o, d)) == velora::status::ok);

    const adarank::workspace_plan plan{.factored_groups = g, .data_parallel = true, .bucket_elements = 1 << 12};
    const std::size_t expected = opt.workspace_bytes(plan);
    CHECK(expected > opt.workspace_bytes());
    opt.reserve(plan);
    CHECK(opt.workspace_bytes() == expected);
    CHECK(opt.workspace_bytes(plan) == expected);   // nothing more to reserve

    const index_t ids[2] = {bias_id, dense_id};
    std::vector<T> bias_mean(bias_grad.size());
    auto step = [&] {
        // First uses: a factored gradient on a low-rank and on a dense parameter, data-parallel
        // steps of both kinds, and the bucketed mean of dense gradients.
        CHECK(opt.step(low_rank_id, velora::make_view(w.data(), o, d), factored) == velora::status::ok);
        CHECK(opt.step(dense_id, velora::make_view(w2.data(), o, d), factored) == velora::status::ok);
        CHECK(opt.step(low_rank_id, velora::make_view(w.data(), o, d), velora::make_view<const T>(grad.data(), o, d), comm) == velora::status::ok);
        CHECK(opt.step(dense_id, velora::make_view(w3.data(), o, d), velora::make_view<const T>(grad.data(), o, d), comm) == velora::status::ok);
        std::copy(grad.begin(), grad.end(), grad2.begin());
        std::copy(bias_grad.begin(), bias_grad.end(), bias_mean.begin());
        const velora::matrix_view<T> grads[2] = {velora::make_view(bias_mean.data(), 1, o), velora::make_view(grad2.data(), o, d)};
        opt.all_reduce_mean(std::span<const index_t>(ids), std::span<const velora::matrix_view<T>>(grads), comm, 1 << 12);
        CHECK(opt.step(bias_id, velora::make_view(bias.data(), 1, o), velora::make_view<const T>(bias_mean.data(), 1, o)) == velora::status::ok);
    };
    CHECK(allocations_during_two(step) == 0);
    CHECK(opt.layer_state(low_rank_id).refreshes == 1);
}

TEST_CASE("after reserve with plan.bf16_weights, the first bf16-weight steps make no heap allocation; workspace_bytes counts the widened weight") {
    // The widened float copy of a bf16 weight is part of the optimizer's workspace: sized by
    // reserve for the largest parameter and reported before it is held, not grown inside the
    // first bf16 step.
    optimizer_inputs<float> in;
    using B = optimizer_inputs<float>::B;
    constexpr index_t d = optimizer_inputs<float>::d, o = optimizer_inputs<float>::o;
    adarank::optimizer_config config;
    config.rank = adarank::rank_policy::adaptive(0.1, 1, 24);
    config.refresh = adarank::refresh_policy::converged(0.0, 1000, 1000);   // no refresh in the measured steps
    adarank::low_rank_adamw<B> opt(in.backend, config);
    const auto low_rank_id = opt.add_parameter(o, d, adarank::param_kind::low_rank);
    const auto dense_id = opt.add_parameter(o, d, adarank::param_kind::dense);
    const auto bias_id = opt.add_parameter(1, o);
    // The low-rank parameter's first step finds its subspace (allowed to allocate its state).
    REQUIRE(opt.step(low_rank_id, velora::make_view(in.w.data(), o, d), velora::make_view<const float>(in.grad.data(), o, d)) == velora::status::ok);
    CHECK(opt.bf16_workspace_bytes() == 0);

    const adarank::workspace_plan plan{.bf16_weights = true};
    const std::size_t expected = opt.workspace_bytes(plan);
    CHECK(expected == opt.workspace_bytes() + static_cast<std::size_t>(o * d) * sizeof(float));   // the largest weight, in float
    opt.reserve(plan);
    CHECK(opt.workspace_bytes() == expected);
    CHECK(opt.bf16_workspace_bytes() == static_cast<std::size_t>(o * d) * sizeof(float));

    std::vector<velora::bfloat16> w(static_cast<std::size_t>(o * d)), w2(w.size()), bias(static_cast<std::size_t>(o));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = w2[i] = velora::bfloat16{static_cast<std::uint16_t>(0x3f80u + (i % 64))};   // 1 + i%64 / 128
    auto step = [&] {
        // The first bf16 steps of all three parameters (the dense one's very first step).
        CHECK(opt.step(low_rank_id, velora::make_view(w.data(), o, d), velora::make_view<const float>(in.grad.data(), o, d)) == velora::status::ok);
        CHECK(opt.step(dense_id, velora::make_view(w2.data(), o, d), velora::make_view<const float>(in.grad.data(), o, d)) == velora::status::ok);
        CHECK(opt.step(bias_id, velora::make_view(bias.data(), 1, o), velora::make_view<const float>(in.bias_grad.data(), 1, o)) == velora::status::ok);
    };
    CHECK(allocations_during_two(step) == 0);
    CHECK(opt.workspace_bytes() == expected);

    // Only the CPU backend in float has bf16-weight steps: a plan asking for them elsewhere is refused.
    velora::eigen_backend<double> backend_d;
    adarank::low_rank_adamw<velora::eigen_backend<double>> opt_d(backend_d, config);
    opt_d.add_parameter(o, d);
    const auto refused = [&](auto&& f) {
        try {
            f();
        } catch (const std::invalid_argument& e) {
            return std::string(e.what());
        }
        return std::string("<no std::invalid_argument thrown>");
    };
    for (const std::string& msg : {refused([&] { opt_d.reserve(plan); }), refused([&] { (void)opt_d.workspace_bytes(plan); })}) {
        CHECK(msg.find("plan.bf16_weights") != std::string::npos);
        CHECK(msg.find("adarank::low_rank_adamw::") == 0);
    }
    CHECK(opt_d.workspace_bytes(adarank::workspace_plan{}) == opt_d.workspace_bytes());
}

TEST_CASE("the counter really counts") {
    const long before = allocations.load();
    auto* p = new std::vector<int>(100);
    delete p;
    CHECK(allocations.load() - before >= 2);
}
