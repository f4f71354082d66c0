// The demo language model (examples/lm/model.hpp): finite-difference gradient checks of every
// parameter with VeLoRA off and with exact VeLoRA (s = 1) on, delivery order and count,
// in-place updates inside the sink, activation bytes and memory.hpp's accounting, evaluate vs
// train_step, bad input.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <adarank/adarank.hpp>
#include <lm/model.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

using velora::index_t;

template class lm::transformer<double>;
template class lm::transformer<float>;

namespace {

using backend = velora::eigen_backend<double>;

const lm::model_config small{.vocab = 11, .d_model = 8, .heads = 2, .layers = 2, .ffn = 12, .context = 5};
constexpr index_t batch = 2;

std::vector<int> make_tokens(const lm::model_config& c, index_t rows, std::uint64_t seed) {
    std::vector<int> t(static_cast<std::size_t>(rows * (c.context + 1)));
    for (std::size_t i = 0; i < t.size(); ++i) {
        const double u = velora::gaussian_at(seed, i);
        t[i] = static_cast<int>(static_cast<std::uint64_t>(std::fabs(u) * 1e6) % static_cast<std::uint64_t>(c.vocab));
    }
    return t;
}

// Records every delivery; factored gradients are expanded to dense with the backend.
template <class T>
struct capture_sink final : lm::gradient_sink<T> {
    velora::eigen_backend<T>& b;
    std::vector<lm::param_ref<T>>& params;
    std::vector<std::vector<T>> grads;
    std::vector<std::size_t> order;
    std::vector<bool> factored_kind;
    T bump = 0;   // added to every parameter entry inside the callback (an in-place "update")

    capture_sink(velora::eigen_backend<T>& backend, std::vector<lm::param_ref<T>>& p)
        : b(backend), params(p), grads(p.size()), factored_kind(p.size(), false) {}

    void dense(std::size_t i, velora::const_matrix_view<T> g) override {
        REQUIRE(i < params.size());
        CHECK(g.rows == params[i].rows);
        CHECK(g.cols == params[i].cols);
        grads[i].assign(static_cast<std::size_t>(g.rows * g.cols), T(0));
        for (index_t r = 0; r < g.rows; ++r)
            for (index_t c = 0; c < g.cols; ++c) grads[i][static_cast<std::size_t>(r * g.cols + c)] = g(r, c);
        done(i);
    }
    void factored(std::size_t i, const velora::factored_gradient<T>& f) override {
        REQUIRE(i < params.size());
        CHECK(f.a.rows == params[i].rows);
        CHECK(f.features == params[i].cols);
        grads[i].assign(static_cast<std::size_t>(params[i].rows * params[i].cols), T(0));
        b.expand_subtokens(f.a, f.v, f.subtoken_size, f.scale, velora::make_view(grads[i].data(), params[i].rows, params[i].cols));
        factored_kind[i] = true;
        done(i);
    }
    void done(std::size_t i) {
        order.push_back(i);
        if (bump != 0)
            for (index_t k = 0; k < params[i].rows * params[i].cols; ++k) params[i].data[k] += bump;
    }
};

// Larger, non-trivial parameters than the N(0, 0.02) init so that every path carries signal.
void randomize(std::vector<lm::param_ref<double>>& params, std::uint64_t seed) {
    for (std::size_t i = 0; i < params.size(); ++i) {
        auto& p = params[i];
        for (index_t k = 0; k < p.rows * p.cols; ++k) {
            const double g = velora::gaussian_at(seed + i, static_cast<std::uint64_t>(k));
            p.data[k] = p.matrix ? 0.35 * g : 1.0 + 0.2 * g;
        }
    }
}

void check_order(const std::vector<std::size_t>& order, std::size_t count) {
    REQUIRE(order.size() == count);
    for (std::size_t k = 0; k < count; ++k) CHECK(order[k] == count - 1 - k);   // reverse of parameters(): embedding last
}

// Central differences on 6 sampled entries (all entries of small params would also do) of
// every parameter; returns the worst per-parameter relative error ||fd − g|| / max(||fd||, ||g||).
double fd_check(const lm::velora_config& vc, bool expect_factored) {
    backend b;
    lm::transformer<double> model(b, small, vc, 42, 4);
    auto& params = model.parameters();
    randomize(params, 7);
    const auto tokens = make_tokens(small, batch, 3);
    capture_sink<double> sink(b, params);
    const double loss = model.train_step(tokens.data(), batch, sink);
    CHECK(std::isfinite(loss));
    check_order(sink.order, params.size());
    bool any_factored = false;
    double worst = 0;
    const double eps = 1e-5;
    for (std::size_t i = 0; i < params.size(); ++i) {
        auto& p = params[i];
        CHECK(sink.factored_kind[i] == model.is_factored(i));
        any_factored |= sink.factored_kind[i];
        const index_t count = p.rows * p.cols;
        double num2 = 0, fd2 = 0, an2 = 0;
        for (int s = 0; s < 6; ++s) {
            const index_t k = static_cast<index_t>((static_cast<std::uint64_t>(s) * 2654435761u + i * 97u) % static_cast<std::uint64_t>(count));
            const double saved = p.data[k];
            p.data[k] = saved + eps;
            const double up = model.evaluate(tokens.data(), batch);
            p.data[k] = saved - eps;
            const double down = model.evaluate(tokens.data(), batch);
            p.data[k] = saved;
            const double fd = (up - down) / (2 * eps);
            const double an = sink.grads[i][static_cast<std::size_t>(k)];
            num2 += (fd - an) * (fd - an);
            fd2 += fd * fd;
            an2 += an * an;
        }
        const double rel = std::sqrt(num2) / std::max({std::sqrt(fd2), std::sqrt(an2), 1e-12});
        INFO(p.name << ": relative error " << rel << " (|fd| = " << std::sqrt(fd2) << ")");
        CHECK(rel < 1e-5);
        CHECK(std::sqrt(fd2) > 1e-8);   // the sample carries signal
        worst = std::max(worst, rel);
    }
    CHECK(any_factored == expect_factored);
    return worst;
}

} // namespace

TEST_CASE("finite differences: every parameter, VeLoRA off") {
    const double worst = fd_check({}, false);
    std::printf("FD worst relative error, VeLoRA off: %.3g\n", worst);
}

TEST_CASE("finite differences with exact VeLoRA (s = 1): value + down, and share_qkv") {
    // groups >= max(d, ffn): every compressor gets G = its width, s = 1, v = ±1: exact gradients.
    lm::velora_config vc{.value = true, .down = true, .share_qkv = false, .groups = 12, .z_storage = velora::storage::f64};
    const double w1 = fd_check(vc, true);
    vc.share_qkv = true;
    const double w2 = fd_check(vc, true);
    std::printf("FD worst relative error, VeLoRA value+down: %.3g, share_qkv+down: %.3g\n", w1, w2);
}

TEST_CASE("the sink may update each parameter in place as soon as its gradient arrives") {
    for (const bool velora_on : {false, true}) {
        lm::velora_config vc{.value = velora_on, .down = velora_on, .share_qkv = velora_on, .groups = 12, .z_storage = velora::storage::f64};
        backend b;
        lm::transformer<double> model(b, small, vc, 42, 4);
        auto& params = model.parameters();
        randomize(params, 7);
        const auto tokens = make_tokens(small, batch, 3);
        capture_sink<double> plain(b, params);
        model.train_step(tokens.data(), batch, plain);
        capture_sink<double> updating(b, params);
        updating.bump = 0.125;
        model.train_step(tokens.data(), batch, updating);
        for (std::size_t i = 0; i < params.size(); ++i) {
            INFO(params[i].name);
            CHECK(plain.grads[i] == updating.grads[i]);   // backward never read an updated parameter
        }
    }
}

TEST_CASE("delivery, activation bytes with VeLoRA (groups < d), evaluate == train_step loss") {
    const auto tokens = make_tokens(small, batch, 11);
    auto run = [&](lm::velora_config vc, std::size_t& bytes, double& loss, double& eval) {
        backend b;
        lm::transformer<double> model(b, small, vc, 5, 4);
        auto& params = model.parameters();
        eval = model.evaluate(tokens.data(), batch);
        capture_sink<double> sink(b, params);
        loss = model.train_step(tokens.data(), batch, sink);
        check_order(sink.order, params.size());
        for (std::size_t i = 0; i < params.size(); ++i) {
            INFO(params[i].name);
            CHECK(sink.factored_kind[i] == model.is_factored(i));
            for (double g : sink.grads[i]) REQUIRE(std::isfinite(g));
        }
        bytes = model.activation_bytes();
    };
    std::size_t off = 0, value_only = 0, value_down = 0, shared = 0;
    double loss = 0, eval = 0;
    run({}, off, loss, eval);
    CHECK(eval == loss);
    // Exact count with VeLoRA off: N = 10 tokens, per layer x, rstd1, h1, q, k, v, P, o, xmid, rstd2, h2, a, b, s; final x, rstd, hf, probs.
    const std::size_t N = 10, d = 8, f = 12, V = 11, P = 2 * 2 * 5 * 5;
    const std::size_t per_layer = N * d + N + N * d + 3 * N * d + P + N * d + N * d + N + N * d + 3 * N * f;
    CHECK(off == (2 * per_layer + N * d + N + N * d + N * V) * sizeof(double));
    run({.value = true, .groups = 2}, value_only, loss, eval);
    CHECK(eval == loss);
    run({.value = true, .down = true, .groups = 2}, value_down, loss, eval);
    CHECK(eval == loss);
    run({.value = true, .down = true, .share_qkv = true, .groups = 2}, shared, loss, eval);
    CHECK(eval == loss);
    // Records (default f32 storage): T·G·4 + s·8 bytes.
    const std::size_t rec_h1 = N * 2 * 4 + 4 * 8, rec_s = N * 2 * 4 + 6 * 8;
    CHECK(value_only == off + 2 * rec_h1);                                   // h1 is kept anyway for q and k
    CHECK(value_down == off + 2 * rec_h1 + 2 * rec_s - 2 * N * f * sizeof(double));
    CHECK(shared == value_down - 2 * N * d * sizeof(double));
    CHECK(value_down < off);
    CHECK(shared < value_down);
    std::printf("activation bytes: off %zu, value %zu, value+down %zu, share_qkv+down %zu\n", off, value_only, value_down, shared);
}

TEST_CASE("memory.hpp: the model's buffers, activation breakdown and parameters are what it counts") {
    // The trainer's size check and `lm_train --estimate` read memory.hpp; the model allocates and
    // counts from it. Here the model's actual vector sizes and record bytes are compared with it.
    const auto tokens = make_tokens(small, batch, 3);
    for (const lm::velora_config vc : {lm::velora_config{}, lm::velora_config{.value = true, .groups = 2},
                                       lm::velora_config{.value = true, .down = true, .groups = 3},
                                       lm::velora_config{.value = true, .down = true, .share_qkv = true, .groups = 64}}) {
        CAPTURE(vc.value);
        CAPTURE(vc.down);
        CAPTURE(vc.share_qkv);
        CAPTURE(vc.groups);
        backend b;
        const index_t max_batch = 3;
        lm::transformer<double> model(b, small, vc, 2, max_batch);
        const lm::memory::model_buffers got = model.buffer_elements(), want = lm::memory::buffers(small, vc, max_batch);
        CHECK(got.parameters.v == want.parameters.v);
        CHECK(got.gradients.v == want.gradients.v);
        CHECK(got.kept.v == want.kept.v);
        CHECK(got.transient.v == want.transient.v);
        CHECK(got.a_buffers.v == want.a_buffers.v);
        CHECK(got.scratch.v == want.scratch.v);
        std::size_t weights = 0;
        for (const auto& p : model.parameters()) weights += static_cast<std::size_t>(p.rows * p.cols);
        CHECK(weights == lm::memory::parameter_count(small).v);
        CHECK(model.activation_bytes() == 0);   // before the first step
        capture_sink<double> sink(b, model.parameters());
        model.train_step(tokens.data(), batch, sink);   // batch 2 of max_batch 3: counted at the step's batch
        const auto& by_kind = model.activation_breakdown();
        const auto want_kinds = lm::memory::activations(small, vc, batch, sizeof(double));
        for (std::size_t k = 0; k < lm::memory::kinds; ++k) {
            INFO(lm::memory::kind_keys[k]);
            CHECK(by_kind.by_kind[k].v == want_kinds.by_kind[k].v);
        }
        CHECK(model.activation_bytes() == want_kinds.total().v);
        // The kinds VeLoRA cannot touch are the same with and without it; only linear inputs and records move.
        const auto plain = lm::memory::activations(small, {}, batch, sizeof(double));
        for (auto k : {lm::memory::kind::norm_inputs, lm::memory::kind::attention_qkv, lm::memory::kind::attention_probs,
                       lm::memory::kind::swiglu, lm::memory::kind::output_probs})
            CHECK(by_kind[k].v == plain[k].v);
        // By hand (N = 10 tokens, d 8, ffn 12, 2 layers, 2 heads, context 5, vocab 11, 8-byte values):
        CHECK(plain[lm::memory::kind::attention_probs].v == 2u * (2 * 2 * 5 * 5) * 8);
        CHECK(plain[lm::memory::kind::output_probs].v == 10u * 11 * 8);
        CHECK(plain[lm::memory::kind::linear_inputs].v == (2u * (3 * 10 * 8 + 10 * 12) + 10 * 8) * 8);   // h1, o, h2, s per layer; hf
        if (vc.down) CHECK(by_kind[lm::memory::kind::linear_inputs].v < plain[lm::memory::kind::linear_inputs].v);
        CHECK((by_kind[lm::memory::kind::velora_records].v > 0) == (vc.value || vc.down));
    }
    // The optimizer state formula against adarank::low_rank_adamw::state_bytes() for dense and
    // low-rank parameters of both orientations, at a rank below and above the shorter side.
    for (const index_t rank : {index_t{3}, index_t{100}}) {
        using B = velora::eigen_backend<float>;
        B b;
        adarank::low_rank_adamw<B> opt(b, adarank::optimizer_config::galore(rank));
        std::vector<float> w, g;
        std::vector<adarank::low_rank_adamw<B>::param_id> ids;
        std::vector<lm::memory::parameter_shape> shapes;
        for (const auto& p : lm::memory::layer_parameters(small)) shapes.push_back(p);
        for (const auto& p : lm::memory::embedding_parameters(small)) shapes.push_back(p);
        for (const auto& p : shapes) ids.push_back(opt.add_parameter(p.rows, p.cols, p.projection ? adarank::param_kind::low_rank : adarank::param_kind::dense));
        for (std::size_t i = 0; i < shapes.size(); ++i) {   // one step sets every rank
            w.assign(static_cast<std::size_t>(shapes[i].rows * shapes[i].cols), 0.5f);
            g.resize(w.size());
            for (std::size_t k = 0; k < g.size(); ++k) g[k] = static_cast<float>(velora::gaussian_at(7 + i, k));
            REQUIRE(opt.step(ids[i], velora::make_view(w.data(), shapes[i].rows, shapes[i].cols),
                             velora::make_view<const float>(g.data(), shapes[i].rows, shapes[i].cols)) == velora::status::ok);
        }
        std::size_t want = 0;
        for (const auto& p : shapes) want += lm::memory::state_elements(p, rank).v * sizeof(float);
        CHECK(opt.state_bytes() == want);
    }
}

TEST_CASE("a float model trains: finite loss and gradients, loss falls under plain SGD") {
    velora::eigen_backend<float> b;
    lm::transformer<float> model(b, small, {.value = true, .down = true, .groups = 4}, 1, 2);
    auto& params = model.parameters();
    const auto tokens = make_tokens(small, batch, 9);
    struct sgd final : lm::gradient_sink<float> {
        std::vector<lm::param_ref<float>>& p;
        velora::eigen_backend<float>& b;
        std::vector<float> scratch;
        explicit sgd(std::vector<lm::param_ref<float>>& params, velora::eigen_backend<float>& backend) : p(params), b(backend) {}
        void dense(std::size_t i, velora::const_matrix_view<float> g) override {
            for (index_t k = 0; k < g.rows * g.cols; ++k) p[i].data[k] -= 0.5f * g.data[k];
        }
        void factored(std::size_t i, const velora::factored_gradient<float>& f) override {
            scratch.resize(static_cast<std::size_t>(p[i].rows * p[i].cols));
            b.expand_subtokens(f.a, f.v, f.subtoken_size, f.scale, velora::make_view(scratch.data(), p[i].rows, p[i].cols));
            for (std::size_t k = 0; k < scratch.size(); ++k) p[i].data[k] -= 0.5f * scratch[k];
        }
    } sink(params, b);
    const double first = model.train_step(tokens.data(), batch, sink);
    double last = first;
    for (int s = 0; s < 30; ++s) last = model.train_step(tokens.data(), batch, sink);
    CHECK(std::isfinite(last));
    CHECK(last < first);
    CHECK(first == doctest::Approx(std::log(11.0)).epsilon(0.05));   // near-uniform at init
}

TEST_CASE("bad batch and token ids throw std::invalid_argument") {
    backend b;
    lm::transformer<double> model(b, small, {}, 1, 2);
    auto& params = model.parameters();
    capture_sink<double> sink(b, params);
    auto tokens = make_tokens(small, 3, 1);
    CHECK_THROWS_AS(model.train_step(tokens.data(), 3, sink), std::invalid_argument);
    CHECK_THROWS_AS(model.evaluate(tokens.data(), 3), std::invalid_argument);
    CHECK_THROWS_AS(model.evaluate(tokens.data(), 0), std::invalid_argument);
    CHECK_THROWS_AS(model.evaluate(nullptr, 1), std::invalid_argument);
    tokens[4] = 11;
    CHECK_THROWS_AS(model.train_step(tokens.data(), 2, sink), std::invalid_argument);
    tokens[4] = -1;
    CHECK_THROWS_AS(model.evaluate(tokens.data(), 1), std::invalid_argument);
    tokens[4] = 0;
    tokens[11] = 99;   // last id of the second row (a target)
    CHECK_THROWS_AS(model.evaluate(tokens.data(), 2), std::invalid_argument);
    CHECK_NOTHROW(model.evaluate(tokens.data(), 1));
    CHECK(sink.order.empty());   // nothing was delivered by the failed calls
    CHECK_THROWS_AS(lm::transformer<double>(b, {.vocab = 11, .d_model = 9, .heads = 2}, {}, 1), std::invalid_argument);
    CHECK_THROWS_AS(lm::transformer<double>(b, small, {}, 1, 0), std::invalid_argument);
    CHECK_THROWS_AS(lm::transformer<double>(b, small, {.value = true, .groups = 0}, 1), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// LoRA fine-tuning (adapter_config::on): the library's lora_linear on every projection, over a
// float or an NF4 base, with dropout on the adapter path and VeLoRA records of v's and down's
// adapter inputs.

namespace {

struct null_sink final : lm::gradient_sink<double> {
    void dense(std::size_t, velora::const_matrix_view<double>) override {}
    void factored(std::size_t, const velora::factored_gradient<double>&) override {}
};

lm::adapter_config lora(double dropout, bool nf4 = false, double velora_scale = 0.1) {
    lm::adapter_config a;
    a.on = true;
    a.nf4 = nf4;
    a.rank = 3;
    a.alpha = 6;
    a.dropout = dropout;
    a.velora_scale = velora_scale;
    return a;
}

// Central differences of the training loss (the same dropout masks: set_dropout_step) on 6
// entries of every adapter; only adapters reach the sink, once each.
double lora_fd_check(const lm::adapter_config& ad, const lm::velora_config& vc) {
    backend b;
    lm::transformer<double> model(b, small, vc, 42, 4, ad);
    auto& params = model.parameters();
    const std::size_t base = model.base_parameter_count();
    REQUIRE(params.size() == base + 2u * 7u * static_cast<std::size_t>(small.layers));
    for (std::size_t i = 0; i < params.size(); ++i) {
        CHECK(params[i].trainable == (i >= base));
        CHECK((params[i].grad != nullptr) == (i >= base));
        CHECK((params[i].data == nullptr) == (ad.nf4 && params[i].projection));
    }
    for (std::size_t i = base; i < params.size(); ++i)   // B = 0 at initialisation would leave dA = 0
        for (index_t k = 0; k < params[i].rows * params[i].cols; ++k) params[i].data[k] = 0.35 * velora::gaussian_at(100 + i, static_cast<std::uint64_t>(k));
    const auto tokens = make_tokens(small, batch, 3);
    capture_sink<double> sink(b, params);
    model.set_dropout_step(3);
    const double loss = model.train_step(tokens.data(), batch, sink);
    CHECK(std::isfinite(loss));
    REQUIRE(sink.order.size() == params.size() - base);
    std::vector<std::size_t> sorted = sink.order;
    std::sort(sorted.begin(), sorted.end());
    for (std::size_t k = 0; k < sorted.size(); ++k) CHECK(sorted[k] == base + k);
    null_sink none;
    auto training_loss = [&] {
        model.set_dropout_step(3);
        return model.train_step(tokens.data(), batch, none);
    };
    CHECK(training_loss() == loss);
    double worst = 0;
    // 1e-6, not 1e-5: with dropout the loss bends more along some adapter entries (the
    // central difference's error, checked to fall as eps², is 5e-5 relative at 1e-5).
    const double eps = 1e-6;
    for (std::size_t i = base; i < params.size(); ++i) {
        auto& p = params[i];
        CHECK(sink.factored_kind[i] == model.is_factored(i));
        const index_t count = p.rows * p.cols;
        double num2 = 0, fd2 = 0, an2 = 0;
        for (int s = 0; s < 6; ++s) {
            const index_t k = static_cast<index_t>((static_cast<std::uint64_t>(s) * 2654435761u + i * 97u) % static_cast<std::uint64_t>(count));
            const double saved = p.data[k];
            p.data[k] = saved + eps;
            const double up = training_loss();
            p.data[k] = saved - eps;
            const double down = training_loss();
            p.data[k] = saved;
            const double fd = (up - down) / (2 * eps);
            const double an = sink.grads[i][static_cast<std::size_t>(k)];
            num2 += (fd - an) * (fd - an);
            fd2 += fd * fd;
            an2 += an * an;
        }
        const double rel = std::sqrt(num2) / std::max({std::sqrt(fd2), std::sqrt(an2), 1e-12});
        INFO(p.name << ": relative error " << rel << " (|fd| = " << std::sqrt(fd2) << ")");
        CHECK(rel < 1e-5);
        CHECK(std::sqrt(fd2) > 1e-8);
        worst = std::max(worst, rel);
    }
    std::size_t factored = 0;
    for (std::size_t i = base; i < params.size(); ++i) factored += sink.factored_kind[i] ? 1 : 0;
    CHECK(factored == static_cast<std::size_t>(small.layers) * ((vc.value ? 1u : 0u) + (vc.down ? 1u : 0u)));   // A of v and of down
    if (ad.dropout == 0) CHECK(model.evaluate(tokens.data(), batch) == doctest::Approx(loss).epsilon(1e-12));   // evaluation: the same products
    return worst;
}

} // namespace

TEST_CASE("LoRA: finite differences of every adapter; base, embeddings and gains frozen") {
    // Exact VeLoRA: G = the input width (s = 1) and scale 1, so that A's factored gradient is the gradient.
    const lm::velora_config none{}, exact{.value = true, .down = true, .groups = 12, .z_storage = velora::storage::f64};
    for (const bool nf4 : {false, true})
        for (const double dropout : {0.0, 0.3})
            for (const auto& vc : {none, exact}) {
                CAPTURE(nf4);
                CAPTURE(dropout);
                CAPTURE(vc.value);
                const double worst = lora_fd_check(lora(dropout, nf4, 1.0), vc);
                std::printf("LoRA FD worst relative error (nf4 %d, dropout %.1f, velora %d): %.3g\n", nf4, dropout, vc.value, worst);
            }
}

TEST_CASE("LoRA: memory.hpp counts the model's buffers and activations; the base stays as it was") {
    const auto tokens = make_tokens(small, batch, 3);
    for (const bool nf4 : {false, true})
        for (const double dropout : {0.0, 0.05})
            for (const lm::velora_config vc : {lm::velora_config{}, lm::velora_config{.value = true, .groups = 2},
                                               lm::velora_config{.down = true, .groups = 3}, lm::velora_config{.value = true, .down = true, .groups = 4}}) {
                CAPTURE(nf4);
                CAPTURE(dropout);
                CAPTURE(vc.value);
                CAPTURE(vc.down);
                const lm::adapter_config ad = lora(dropout, nf4);
                backend b;
                const index_t max_batch = 3;
                lm::transformer<double> model(b, small, vc, 2, max_batch, ad);
                const lm::memory::model_buffers got = model.buffer_elements(), want = lm::memory::buffers(small, vc, max_batch, ad);
                CHECK(got.parameters.v == want.parameters.v);
                CHECK(got.gradients.v == want.gradients.v);
                CHECK(got.kept.v == want.kept.v);
                CHECK(got.transient.v == want.transient.v);
                CHECK(got.a_buffers.v == want.a_buffers.v);
                CHECK(got.scratch.v == want.scratch.v);
                CHECK(model.weight_bytes() == lm::memory::weight_bytes(small, ad, sizeof(double)).v);
                CHECK(model.trainable_elements() == lm::memory::adapter_count(small, ad).v);
                std::vector<std::vector<double>> before;
                for (std::size_t i = 0; i < model.base_parameter_count(); ++i) {
                    const auto& p = model.parameters()[i];
                    before.emplace_back(p.data ? std::vector<double>(p.data, p.data + p.rows * p.cols) : std::vector<double>{});
                }
                capture_sink<double> sink(b, model.parameters());
                sink.bump = 0.01;   // an update of every adapter inside the callback
                for (int step = 0; step < 2; ++step) model.train_step(tokens.data(), batch, sink);
                const auto& by_kind = model.activation_breakdown();
                const auto want_kinds = lm::memory::activations(small, vc, batch, sizeof(double), ad);
                for (std::size_t k = 0; k < lm::memory::kinds; ++k) {
                    INFO(lm::memory::kind_keys[k]);
                    CHECK(by_kind.by_kind[k].v == want_kinds.by_kind[k].v);
                }
                CHECK(model.activation_bytes() == want_kinds.total().v);
                for (std::size_t i = 0; i < model.base_parameter_count(); ++i) {
                    const auto& p = model.parameters()[i];
                    if (p.data) CHECK(std::equal(before[i].begin(), before[i].end(), p.data));
                }
                // By hand (N = 10, d 8, ffn 12, r 3, 2 layers): H of 7 adapters; with dropout the x_a of q, k, (v), o, gate, up, (down).
                const std::uint64_t N = 10;
                CHECK(by_kind[lm::memory::kind::adapter_h].v == 2 * 7 * N * 3 * sizeof(double));
                const std::uint64_t xa = dropout > 0 ? N * 8 * (vc.value ? 5 : 6) + (vc.down ? 0 : N * 12) : N * 8 * 3 + (vc.down ? 0 : N * 12);
                CHECK(by_kind[lm::memory::kind::linear_inputs].v == 2 * xa * sizeof(double));   // (no head input: the embedding is frozen)
            }
}

TEST_CASE("LoRA: starts equal to its base; export_weights merges W + (alpha/r) B A (NF4: dequantised W)") {
    const auto tokens = make_tokens(small, batch, 5);
    for (const bool nf4 : {false, true}) {
        CAPTURE(nf4);
        backend b;
        lm::transformer<double> dense(b, small, {}, 9, 4);
        capture_sink<double> ignore(b, dense.parameters());
        dense.train_step(tokens.data(), batch, ignore);   // weights that are not the seeded initialisation
        const lm::initial_weights base = dense.export_weights();
        lm::transformer<double> plain(b, small, {}, 1, 4, {}, &base);
        const double base_loss = plain.evaluate(tokens.data(), batch);
        CHECK(base_loss == doctest::Approx(dense.evaluate(tokens.data(), batch)).epsilon(1e-6));   // exported in float
        lm::transformer<double> adapted(b, small, {.value = true, .down = true, .groups = 4}, 3, 4, lora(0.05, nf4), &base);
        if (!nf4) CHECK(adapted.evaluate(tokens.data(), batch) == doctest::Approx(base_loss).epsilon(1e-12));   // B = 0
        else CHECK(std::fabs(adapted.evaluate(tokens.data(), batch) - base_loss) < 0.05);                      // NF4's rounding only
        struct adam_like final : lm::gradient_sink<double> {
            std::vector<lm::param_ref<double>>& p;
            backend& bk;
            std::vector<double> scratch;
            adam_like(std::vector<lm::param_ref<double>>& params, backend& bb) : p(params), bk(bb) {}
            void dense(std::size_t i, velora::const_matrix_view<double> g) override {
                for (index_t k = 0; k < g.rows * g.cols; ++k) p[i].data[k] -= 0.05 * g.data[k];
            }
            void factored(std::size_t i, const velora::factored_gradient<double>& f) override {
                scratch.resize(static_cast<std::size_t>(p[i].rows * p[i].cols));
                bk.expand_subtokens(f.a, f.v, f.subtoken_size, f.scale, velora::make_view(scratch.data(), p[i].rows, p[i].cols));
                for (std::size_t k = 0; k < scratch.size(); ++k) p[i].data[k] -= 0.05 * scratch[k];
            }
        } sgd(adapted.parameters(), b);
        const double first = adapted.train_step(tokens.data(), batch, sgd);
        double last = first;
        for (int s = 0; s < 20; ++s) last = adapted.train_step(tokens.data(), batch, sgd);
        CHECK(last < first);
        const lm::initial_weights merged = adapted.export_weights();
        lm::transformer<double> from_merged(b, small, {}, 1, 4, {}, &merged);
        CHECK(from_merged.evaluate(tokens.data(), batch) == doctest::Approx(adapted.evaluate(tokens.data(), batch)).epsilon(1e-10));
    }
    backend b;
    lm::initial_weights wrong;
    wrong.values.resize(3);
    CHECK_THROWS_AS(lm::transformer<double>(b, small, {}, 1, 2, {}, &wrong), std::invalid_argument);
    CHECK_THROWS_AS(lm::transformer<double>(b, small, {.share_qkv = true}, 1, 2, lora(0.0)), std::invalid_argument);
}
