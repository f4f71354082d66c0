// velora::torch::VeloraLinear: gradients against torch::nn::Linear (G = D, exact) and against
// VeLoRA's closed form (G < D), the record as torch tensors, v as a module buffer (save/load,
// written in place), half-precision inputs and records, empty batches, non-finite inputs,
// factored gradients delivered to AdaRankGradAdamW, threads, and a small MLP that trains.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "torch_doctest.hpp"

#include <cmath>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "../test_util.hpp"

using test::invalid_argument_message;
using velora::torch::AdaRankGradAdamW;
using velora::torch::AdaRankGradAdamWOptions;
using velora::torch::VeloraLinear;
using velora::torch::VeloraLinearOptions;

using torch_test::contains;
using torch_test::max_relative;
using torch_test::thread_count_guard;

namespace {

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) { return a.defined() && b.defined() && a.sizes() == b.sizes() && a.equal(b); }

at::Tensor randn(std::vector<std::int64_t> sizes, std::uint64_t seed, double mean = 0.0) {
    at::manual_seed(seed);
    return torch::randn(sizes).add_(mean);
}

// VeLoRA's weight gradient in closed form, in double: dW = scale · dYᵀ X̂ with X̂ = Z·(I_G ⊗ vᵀ),
// Z = X̂'s coordinates X·(I_G ⊗ v)ᵀ (X zero-padded to G·s columns). `z_dtype` rounds Z as the
// record stores it.
at::Tensor closed_form_dw(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& v, std::int64_t groups, double scale,
                          c10::ScalarType z_dtype = at::kFloat) {
    const std::int64_t d = x.size(-1), s = v.numel();
    const at::Tensor x2 = x.reshape({-1, d}).to(at::kDouble), dy2 = dy.reshape({-1, dy.size(-1)}).to(at::kDouble);
    const std::int64_t t = x2.size(0);
    const at::Tensor vd = v.to(at::kDouble);
    const at::Tensor padded = at::constant_pad_nd(x2, {0, groups * s - d});
    at::Tensor z = (padded.view({t, groups, s}) * vd).sum(-1);
    z = z.to(at::kFloat).to(z_dtype).to(at::kDouble);
    const at::Tensor xhat = (z.unsqueeze(-1) * vd).reshape({t, groups * s}).narrow(1, 0, d);
    return scale * dy2.t().mm(xhat);
}

// A VeloraLinear and a torch::nn::Linear with the same weights.
struct pair_of_layers {
    VeloraLinear velora;
    torch::nn::Linear plain;
    pair_of_layers(std::int64_t d, std::int64_t o, VeloraLinearOptions options, std::uint64_t seed)
        : velora(options), plain(torch::nn::LinearOptions(d, o)) {
        torch::NoGradGuard no_grad;
        at::manual_seed(seed);
        velora->reset_parameters();
        plain->weight.copy_(velora->weight);
        plain->bias.copy_(velora->bias);
    }
};

} // namespace

TEST_CASE("G = D: forward, dX, dW and db equal torch::nn::Linear's (the record is X itself)") {
    const std::int64_t d = 24, o = 10;
    pair_of_layers l(d, o, VeloraLinearOptions(d, o).groups(d), 1);
    const at::Tensor x = randn({3, 7, d}, 2, 0.5).requires_grad_(true);
    const at::Tensor xr = x.detach().clone().requires_grad_(true);
    const at::Tensor r = randn({3, 7, o}, 3);
    const at::Tensor y = l.velora(x), yr = l.plain(xr);
    CHECK(max_relative(y, yr) < 1e-6);
    (y * r).sum().backward();
    (yr * r).sum().backward();
    CHECK(max_relative(x.grad(), xr.grad()) < 1e-6);
    CHECK(max_relative(l.velora->weight.grad(), l.plain->weight.grad()) < 1e-6);
    CHECK(max_relative(l.velora->bias.grad(), l.plain->bias.grad()) < 1e-6);
    // and with the gradient of sum(): grad_output is expand()ed (stride 0), read through a copy
    l.velora->zero_grad();
    l.plain->zero_grad();
    l.velora(x).sum().backward();
    l.plain(xr).sum().backward();
    CHECK(max_relative(l.velora->weight.grad(), l.plain->weight.grad()) < 1e-6);
}

TEST_CASE("G < D: dW is VeLoRA's closed form (<= 1e-5 relative), dX and db stay exact") {
    const std::int64_t d = 50, o = 12, g = 8;   // s = 7: the last group is zero-padded
    for (const double scale : {1.0, 0.5}) {
        pair_of_layers l(d, o, VeloraLinearOptions(d, o).groups(g).scale(scale), 4);
        const at::Tensor x = randn({40, d}, 5, 0.3).requires_grad_(true);
        const at::Tensor xr = x.detach().clone().requires_grad_(true);
        const at::Tensor r = randn({40, o}, 6);
        (l.velora(x) * r).sum().backward();
        (l.plain(xr) * r).sum().backward();
        CHECK(l.velora->subtoken_size() == 7);
        const at::Tensor v = l.velora->v;
        CHECK(std::abs(v.norm().item<double>() - 1.0) < 1e-6);
        const at::Tensor expected = closed_form_dw(x.detach(), r, v, g, scale);
        CHECK(max_relative(l.velora->weight.grad(), expected) <= 1e-5);
        CHECK(max_relative(l.velora->weight.grad(), l.plain->weight.grad()) > 1e-3);   // it is an estimate, not the exact dW
        CHECK(max_relative(x.grad(), xr.grad()) < 1e-6);
        CHECK(max_relative(l.velora->bias.grad(), l.plain->bias.grad()) < 1e-6);
    }
}

TEST_CASE("the record is held as torch tensors saved for backward, and is what the layer reports") {
    const std::int64_t d = 64, o = 16, g = 8;
    for (const auto storage : {velora::storage::f32, velora::storage::f16, velora::storage::bf16}) {
        VeloraLinear m(VeloraLinearOptions(d, o).groups(g).z_storage(storage));
        const at::Tensor x = randn({2, 30, d}, 7, 0.2);
        const at::Tensor y = m(x);
        // grad_fn() is a std::shared_ptr in libtorch 1.13, a c10::intrusive_ptr in 2.15; y keeps the node alive
        const auto* node = dynamic_cast<torch::autograd::CppNode<velora::torch::detail::linear_function>*>(y.grad_fn().get());
        REQUIRE(node != nullptr);
        const auto saved = node->ctx_.get_saved_variables();
        REQUIRE(saved.size() == 3);
        CHECK(saved[0].sizes() == at::IntArrayRef({60, g}));
        CHECK((saved[0].scalar_type() == velora::torch::dtype_of_storage(storage)));
        CHECK(saved[1].sizes() == at::IntArrayRef({8}));
        CHECK(saved[2].is_same(m->weight));   // the weight, for dX (no copy)
        const std::size_t z_bytes = 60 * g * (storage == velora::storage::f32 ? 4 : 2);
        CHECK(m->last_record_bytes() == z_bytes + 8 * 4);
        CHECK(m->last_input_bytes() == 60 * d * 4);   // what torch::nn::Linear keeps: X
        // dW from the half-precision record: the closed form with Z rounded the same way
        const at::Tensor r = randn({2, 30, o}, 8);
        (y * r).sum().backward();
        CHECK(max_relative(m->weight.grad(), closed_form_dw(x, r, m->v, g, 1.0, velora::torch::dtype_of_storage(storage))) <= 1e-5);
    }
}

TEST_CASE("gradient accumulation: two forwards before one backward each keep their own record") {
    const std::int64_t d = 32, o = 6, g = 4;
    VeloraLinear m(VeloraLinearOptions(d, o).groups(g));
    const at::Tensor x1 = randn({20, d}, 9, 0.4), x2 = randn({15, d}, 10, -0.2);
    const at::Tensor r1 = randn({20, o}, 11), r2 = randn({15, o}, 12);
    const at::Tensor y1 = m(x1), y2 = m(x2);   // v is fixed by x1 (first_batch_mean)
    ((y1 * r1).sum() + (y2 * r2).sum()).backward();
    const at::Tensor expected = closed_form_dw(x1, r1, m->v, g, 1.0) + closed_form_dw(x2, r2, m->v, g, 1.0);
    CHECK(max_relative(m->weight.grad(), expected) <= 1e-5);
}

TEST_CASE("half-precision inputs are cast: y and dX come back in x's dtype") {
    const std::int64_t d = 40, o = 8;
    for (const auto dtype : {at::kHalf, at::kBFloat16}) {
        VeloraLinear m(VeloraLinearOptions(d, o).groups(5));
        VeloraLinear twin(VeloraLinearOptions(d, o).groups(5));
        {
            torch::NoGradGuard no_grad;
            twin->weight.copy_(m->weight);
            twin->bias.copy_(m->bias);
        }
        const at::Tensor x = randn({9, d}, 13, 0.5).to(dtype).requires_grad_(true);
        const at::Tensor xf = x.detach().to(at::kFloat).requires_grad_(true);   // the same values in float
        const at::Tensor r = randn({9, o}, 14);
        const at::Tensor y = m(x);
        CHECK((y.scalar_type() == dtype));
        const at::Tensor yf = twin(xf);
        CHECK(bitwise_equal(y, yf.to(dtype)));
        // dY reaches the layer in x's dtype (the cast's backward); the twin gets the same values.
        (y.to(at::kFloat) * r).sum().backward();
        (yf.to(dtype).to(at::kFloat) * r).sum().backward();
        CHECK((x.grad().scalar_type() == dtype));
        CHECK(bitwise_equal(x.grad(), xf.grad().to(dtype)));
        CHECK(bitwise_equal(m->weight.grad(), twin->weight.grad()));
        CHECK(m->last_input_bytes() == static_cast<std::size_t>(9 * d * 2));
    }
}

TEST_CASE("empty batches: empty y and dX, zero dW and db, as torch::nn::Linear") {
    const std::int64_t d = 16, o = 5;
    pair_of_layers l(d, o, VeloraLinearOptions(d, o).groups(4), 15);
    const at::Tensor x = torch::zeros({0, d}).requires_grad_(true);
    const at::Tensor y = l.velora(x);
    CHECK(y.sizes() == at::IntArrayRef({0, o}));
    y.sum().backward();
    l.plain(torch::zeros({0, d}, torch::requires_grad())).sum().backward();
    CHECK(x.grad().sizes() == at::IntArrayRef({0, d}));
    CHECK(bitwise_equal(l.velora->weight.grad(), l.plain->weight.grad()));
    CHECK(bitwise_equal(l.velora->bias.grad(), l.plain->bias.grad()));
    CHECK_FALSE(l.velora->v_initialised());   // nothing to take v from
    const at::Tensor e3 = torch::zeros({2, 0, d});
    CHECK(l.velora(e3).sizes() == at::IntArrayRef({2, 0, o}));
}

TEST_CASE("bad inputs and configurations: clear errors") {
    VeloraLinear m(VeloraLinearOptions(16, 4).groups(4));
    std::string msg = invalid_argument_message([&] { (void)m(torch::ones({3, 16}, torch::kInt)); });
    CHECK(contains(msg, "velora::torch::VeloraLinear::forward: argument 'x' (shape [3, 16], dtype Int, strides [16, 1], device cpu) is not a floating-point tensor"));
    msg = invalid_argument_message([&] { (void)m(torch::ones({3, 15})); });
    CHECK(contains(msg, "velora::torch::VeloraLinear::forward: argument 'x' (shape [3, 15], dtype Float, strides [15, 1], device cpu) must be [..., 16]"));
    CHECK(contains(invalid_argument_message([&] { (void)m(torch::tensor(1.0f)); }), "must be [..., 16]"));
    msg = invalid_argument_message([&] { (void)m(torch::empty({3, 16}, torch::TensorOptions().device(torch::kMeta))); });
    CHECK(contains(msg, "device meta) is not on the CPU"));
    CHECK(contains(invalid_argument_message([&] { VeloraLinear bad(VeloraLinearOptions(16, 4).groups(17)); }),
                   "velora::torch::VeloraLinear: option groups must satisfy 1 <= G <= in_features, got G = 17 with in_features = 16"));
    CHECK(contains(invalid_argument_message([&] { VeloraLinear bad(VeloraLinearOptions(0, 4)); }), "in_features and out_features must be positive"));
    CHECK(contains(invalid_argument_message([&] { VeloraLinear bad(VeloraLinearOptions(16, 4).groups(4).scale(-1)); }), "config.scale must be finite and positive"));
    VeloraLinear d(VeloraLinearOptions(16, 4).groups(4));
    d->to(torch::kDouble);
    CHECK(contains(invalid_argument_message([&] { (void)d(torch::ones({2, 16}, torch::kDouble)); }),
                   "the weight (shape [4, 16], dtype Double, strides [16, 1], device cpu) must be float32"));
}

TEST_CASE("v is a module buffer: set by the first training batch, saved and loaded with the module") {
    const std::int64_t d = 30, o = 7, g = 6;
    VeloraLinear m(VeloraLinearOptions(d, o).groups(g));
    CHECK(m->named_buffers().contains("v"));
    CHECK(m->named_buffers().contains("velora_state"));
    {
        torch::NoGradGuard no_grad;   // evaluation records nothing and leaves v alone
        (void)m(randn({5, d}, 16, 1.0));
    }
    CHECK_FALSE(m->v_initialised());
    CHECK(m->v.abs().sum().item<float>() == 0.0f);
    const at::Tensor x1 = randn({12, d}, 17, 0.7);
    (void)m(x1).sum();
    CHECK(m->v_initialised());
    const at::Tensor v1 = m->v.clone();
    CHECK(std::abs(v1.norm().item<double>() - 1.0) < 1e-6);
    (void)m(randn({12, d}, 18, -0.7));   // first_batch_mean: frozen
    CHECK(bitwise_equal(m->v, v1));

    std::stringstream saved;
    torch::save(m, saved);
    VeloraLinear loaded(VeloraLinearOptions(d, o).groups(g));
    torch::load(loaded, saved);
    CHECK(bitwise_equal(loaded->v, v1));
    // The compressor state came back with it: the loaded layer does not take v from its own
    // first batch, and its gradients are the same bits.
    const at::Tensor x2 = randn({9, d}, 19, -1.0), r = randn({9, o}, 20);
    (m(x2) * r).sum().backward();
    (loaded(x2) * r).sum().backward();
    CHECK(loaded->v_initialised());
    CHECK(bitwise_equal(loaded->v, v1));
    CHECK(bitwise_equal(loaded->weight.grad(), m->weight.grad()));
    // A fresh layer would have taken v from x2.
    VeloraLinear fresh(VeloraLinearOptions(d, o).groups(g));
    (void)fresh(x2);
    CHECK_FALSE(bitwise_equal(fresh->v, v1));
    // clone() copies the buffers, hence v.
    const auto cloned = std::dynamic_pointer_cast<velora::torch::VeloraLinearImpl>(m->clone());
    (void)cloned->forward(x2);
    CHECK(bitwise_equal(cloned->v, v1));
    // A state of another configuration is refused, naming the difference.
    VeloraLinear other(VeloraLinearOptions(d, o).groups(5));
    saved.seekg(0);
    torch::load(other, saved);
    CHECK(contains(invalid_argument_message([&] { (void)other(x2); }), "state was saved with groups G = 6 but this compressor has 5"));
}

TEST_CASE("writing the v buffer sets v (normalised), as compressor::set_v") {
    const std::int64_t d = 20, o = 3, g = 4;   // s = 5
    VeloraLinear m(VeloraLinearOptions(d, o).groups(g));
    {
        torch::NoGradGuard no_grad;
        m->v.copy_(torch::tensor({3.0f, 0.0f, 4.0f, 0.0f, 0.0f}));
    }
    const at::Tensor x = randn({8, d}, 21), r = randn({8, o}, 22);
    (m(x) * r).sum().backward();
    CHECK(bitwise_equal(m->v, torch::tensor({0.6f, 0.0f, 0.8f, 0.0f, 0.0f})));
    CHECK(max_relative(m->weight.grad(), closed_form_dw(x, r, m->v, g, 1.0)) <= 1e-5);
    {
        torch::NoGradGuard no_grad;
        m->v.zero_();
    }
    CHECK(contains(invalid_argument_message([&] { (void)m(x); }), "velora::compressor::set_v: argument 'v' is the zero vector"));
}

TEST_CASE("a non-finite input: y computed, v unchanged, a NaN weight gradient that makes the optimizer skip the step") {
    const std::int64_t d = 16, o = 4;
    VeloraLinear m(VeloraLinearOptions(d, o).groups(4));
    AdaRankGradAdamW opt(m->parameters());
    (void)m(randn({6, d}, 23, 0.5));   // v from a good batch
    const at::Tensor v = m->v.clone();
    at::Tensor x = randn({6, d}, 24);
    x[2][3] = std::numeric_limits<float>::infinity();
    const at::Tensor y = m(x);
    CHECK(m->last_status() == velora::status::non_finite_input);
    CHECK(bitwise_equal(m->v, v));
    CHECK(torch::isfinite(y[0]).all().item<bool>());   // other rows are fine
    opt.zero_grad();
    y.sum().backward();
    CHECK(torch::isnan(m->weight.grad()).all().item<bool>());
    const at::Tensor w = m->weight.clone();
    const auto report = opt.step_checked();
    CHECK(report.skipped);
    CHECK(bitwise_equal(m->weight, w));
}

TEST_CASE("factored gradients: delivered to an attached AdaRankGradAdamW, equal to the dense path") {
    const std::int64_t d = 48, o = 40, g = 6;
    const auto options = AdaRankGradAdamWOptions(1e-2).rank(adarank::rank_policy::adaptive(0.2, 1, 6)).refresh(adarank::refresh_policy::every(4));
    VeloraLinear fact(VeloraLinearOptions(d, o).groups(g).factored_gradient(true));
    VeloraLinear dense(VeloraLinearOptions(d, o).groups(g));
    {
        torch::NoGradGuard no_grad;
        dense->weight.copy_(fact->weight);
        dense->bias.copy_(fact->bias);
    }
    AdaRankGradAdamW of(fact->parameters(), options), od(dense->parameters(), options);
    of.attach(fact);
    for (int step = 0; step < 8; ++step) {
        of.zero_grad();
        od.zero_grad();
        const at::Tensor x = randn({32, d}, 100 + step, 0.3), r = randn({32, o}, 200 + step);
        (fact(x) * r).sum().backward();
        (dense(x) * r).sum().backward();
        CHECK_FALSE(fact->weight.grad().defined());   // delivered factored, not as weight.grad
        CHECK(fact->bias.grad().defined());
        const auto slot = fact->factored_grad()->get();
        REQUIRE(slot.a.defined());
        CHECK(slot.a.sizes() == at::IntArrayRef({o, g}));
        CHECK(std::abs(of.grad_norm() / od.grad_norm() - 1.0) < 1e-5);
        CHECK(max_relative(fact->factored_grad()->dense(), dense->weight.grad()) < 1e-6);
        REQUIRE(of.step_checked().status == velora::status::ok);
        REQUIRE(od.step_checked().status == velora::status::ok);
        CHECK(of.layer_state(fact->weight).low_rank);
    }
    CHECK(max_relative(fact->weight, dense->weight) < 1e-5);
    CHECK(of.layer_state(fact->weight).refreshes == 2);
    // zero_grad clears the factored gradient (the optimizer's and the module's)
    (fact(randn({4, d}, 300)).sum()).backward();
    CHECK_FALSE(fact->factored_grad()->empty());
    of.zero_grad();
    CHECK(fact->factored_grad()->empty());
    (fact(randn({4, d}, 301)).sum()).backward();
    fact->zero_grad();
    CHECK(fact->factored_grad()->empty());
    // clip_grad_norm scales the factored gradient too
    (fact(randn({16, d}, 302)) * 100).sum().backward();
    const double before = of.grad_norm();
    CHECK(of.clip_grad_norm(1.0) == doctest::Approx(before));
    CHECK(of.grad_norm() == doctest::Approx(1.0).epsilon(1e-4));
}

TEST_CASE("the old spellings factored_weight_grad (option and accumulator type) still work as deprecated aliases") {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    static_assert(std::is_same_v<velora::torch::factored_weight_grad, velora::torch::factored_gradient_accumulator>);
    auto options = VeloraLinearOptions(8, 4).groups(2);
    CHECK_FALSE(options.factored_weight_grad());
    VeloraLinearOptions& same = options.factored_weight_grad(true);
    CHECK(&same == &options);
    CHECK(options.factored_gradient());
    CHECK(options.factored_weight_grad());
#pragma GCC diagnostic pop
}

TEST_CASE("factored delivery needs a consumer; accumulation with a changing v turns dense") {
    const std::int64_t d = 24, o = 5, g = 4;
    VeloraLinear alone(VeloraLinearOptions(d, o).groups(g).factored_gradient(true));
    alone(randn({6, d}, 30)).sum().backward();
    CHECK(alone->weight.grad().defined());   // no optimizer attached: dense, never lost
    CHECK(alone->factored_grad()->empty());

    // batch_mean: each forward has its own v, so two terms cannot be summed in factored form
    VeloraLinear m(VeloraLinearOptions(d, o).groups(g).v(velora::v_mode::batch_mean()).factored_gradient(true));
    VeloraLinear ref(VeloraLinearOptions(d, o).groups(g).v(velora::v_mode::batch_mean()));
    {
        torch::NoGradGuard no_grad;
        ref->weight.copy_(m->weight);
    }
    AdaRankGradAdamW opt(m->parameters());
    opt.attach(m);
    const at::Tensor x1 = randn({10, d}, 31, 1.0), x2 = randn({10, d}, 32, -0.5);
    m(x1).sum().backward();
    CHECK(m->factored_grad()->get().a.defined());
    m(x2).sum().backward();
    const auto c = m->factored_grad()->get();
    CHECK_FALSE(c.a.defined());
    REQUIRE(c.dense.defined());
    ref(x1).sum().backward();
    ref(x2).sum().backward();
    CHECK(max_relative(c.dense, ref->weight.grad()) < 1e-6);
    CHECK(opt.step_checked().status == velora::status::ok);   // stepped with the dense sum
    // A term of the wrong shape is a caller mistake.
    const std::string msg = invalid_argument_message([&] { m->factored_grad()->add(torch::zeros({3, 3}), torch::zeros({6}), 1.0); });
    CHECK(contains(msg, "velora::torch::factored_gradient_accumulator::add: arguments 'a' (shape [3, 3], dtype Float, strides [3, 1], device cpu)"));
    CHECK(contains(msg, "must be contiguous float32 5x4 and 6 for a 5x24 weight with G = 4, s = 6"));
    CHECK(contains(invalid_argument_message([&] { m->factored_grad()->add_dense(torch::zeros({5, 23})); }), "must be float32 5x24"));
}

TEST_CASE("an optimizer step between forward and backward is refused by autograd (version counters)") {
    VeloraLinear m(VeloraLinearOptions(8, 3).groups(2));
    AdaRankGradAdamW opt(m->parameters());
    const at::Tensor y = m(randn({4, 8}, 40));
    for (auto& p : m->parameters()) p.mutable_grad() = torch::ones_like(p);
    (void)opt.step();
    CHECK_THROWS_WITH_AS(y.sum().backward(), doctest::Contains("modified by an inplace operation"), c10::Error);
}

TEST_CASE("threads: backward on another thread uses that thread's at::get_num_threads(); the bits are the same") {
    thread_count_guard guard;
    at::set_num_threads(2);
    const std::int64_t d = 96, o = 80, g = 12;
    VeloraLinear m(VeloraLinearOptions(d, o).groups(g));
    const at::Tensor x = randn({300, d}, 50, 0.1).requires_grad_(true), r = randn({300, o}, 51);
    (m(x) * r).sum().backward();   // reference: forward and backward here, 2 threads
    CHECK(m->last_forward_threads() == 2);
    CHECK(m->last_backward_threads() == 2);
    const at::Tensor dw = m->weight.grad().clone(), dx = x.grad().clone();
    m->zero_grad();
    x.mutable_grad() = at::Tensor();
    const at::Tensor loss = (m(x) * r).sum();
    int seen = 0;
    std::thread worker([&] {
        at::set_num_threads(1);
        loss.backward();
        seen = m->last_backward_threads();
    });
    worker.join();
    CHECK(seen == 1);
    CHECK(bitwise_equal(m->weight.grad(), dw));
    CHECK(bitwise_equal(x.grad(), dx));

    // Two threads training through the same layer at once: forwards and backwards interleave,
    // each input gradient is still exactly dY·W, and the weight gradient is the sum of all terms.
    at::set_num_threads(2);
    m->zero_grad();
    std::vector<at::Tensor> xs, rs, expected_dx;
    for (int i = 0; i < 2; ++i) {
        xs.push_back(randn({50, d}, 60 + i, 0.2).requires_grad_(true));
        rs.push_back(randn({50, o}, 70 + i));
        expected_dx.push_back(torch::mm(rs.back(), m->weight.detach()));
    }
    at::Tensor expected_dw = torch::zeros({o, d}, at::kDouble);
    for (int i = 0; i < 2; ++i) expected_dw += 5 * closed_form_dw(xs[i], rs[i], m->v, g, 1.0);
    std::vector<at::Tensor> dxs(2);
    std::vector<std::thread> workers;
    for (int i = 0; i < 2; ++i) {
        workers.emplace_back([&, i] {
            for (int k = 0; k < 5; ++k) {
                xs[static_cast<std::size_t>(i)].mutable_grad() = at::Tensor();
                (m(xs[static_cast<std::size_t>(i)]) * rs[static_cast<std::size_t>(i)]).sum().backward();
                dxs[static_cast<std::size_t>(i)] = xs[static_cast<std::size_t>(i)].grad().clone();
            }
        });
    }
    for (auto& w : workers) w.join();
    for (int i = 0; i < 2; ++i) CHECK(max_relative(dxs[static_cast<std::size_t>(i)], expected_dx[static_cast<std::size_t>(i)]) < 1e-6);
    CHECK(max_relative(m->weight.grad(), expected_dw) <= 1e-5);
}

TEST_CASE("a small MLP of VeloraLinear layers trains with AdaRankGradAdamW (factored gradients)") {
    thread_count_guard guard;
    at::set_num_threads(2);
    at::manual_seed(7);
    const at::Tensor w1 = torch::randn({32, 16}) / 4, w2 = torch::randn({4, 32}) / 6;
    const at::Tensor x = torch::randn({256, 16});
    const at::Tensor target = torch::mm(torch::relu(torch::mm(x, w1.t())), w2.t());
    torch::nn::Sequential model(VeloraLinear(VeloraLinearOptions(16, 64).groups(8).factored_gradient(true)), torch::nn::ReLU(),
                                VeloraLinear(VeloraLinearOptions(64, 4).groups(16).factored_gradient(true)));
    AdaRankGradAdamW opt(model->parameters(), AdaRankGradAdamWOptions(1e-2).rank(adarank::rank_policy::adaptive(0.2, 1, 8)).refresh(adarank::refresh_policy::every(25)));
    for (const auto& child : model->children())
        if (auto layer = std::dynamic_pointer_cast<velora::torch::VeloraLinearImpl>(child)) opt.attach(VeloraLinear(layer));
    double first = 0, last = 0;
    for (int step = 0; step < 300; ++step) {
        opt.zero_grad();
        const at::Tensor loss = torch::mse_loss(model->forward(x), target);
        loss.backward();
        REQUIRE(opt.step_checked().status == velora::status::ok);
        if (step == 0) first = loss.item<double>();
        last = loss.item<double>();
    }
    MESSAGE("MLP loss " << first << " -> " << last);
    CHECK(last < 0.1 * first);
    CHECK(opt.layer_state(model[0]->as<velora::torch::VeloraLinearImpl>()->weight).low_rank);
}
