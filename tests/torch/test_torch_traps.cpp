// The traps a first libtorch user met (issue 25 (a)-(f)), each fixed in the adapter and checked
// here: factored gradients left by a base-class zero_grad are refused, float64 inputs are
// refused, torch::optim::AdamW's defaults are one call away, an option schedule (betas, eps,
// weight decay) is followed, a resumed run saves the same bytes, and the documented recipe for
// an LR scheduler's position across a checkpoint resumes bit-identically. Also the optimizer's
// communicator hook (set_communicator) with a one-rank communicator that counts its calls.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "torch_doctest.hpp"

#include <cmath>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "../test_util.hpp"

using test::invalid_argument_message;
using velora::torch::AdaRankGradAdamW;
using velora::torch::AdaRankGradAdamWOptions;
using velora::torch::VeloraLinear;
using velora::torch::VeloraLinearOptions;
using torch_test::contains;

namespace {

at::Tensor param(std::vector<std::int64_t> sizes, std::uint64_t seed) {
    at::manual_seed(seed);
    return torch::randn(sizes).mul_(0.5).requires_grad_(true);
}

void set_gradients(const std::vector<at::Tensor>& params, int t) {
    for (std::size_t i = 0; i < params.size(); ++i) {
        at::manual_seed(1000 * (i + 1) + static_cast<std::uint64_t>(t));
        params[i].mutable_grad() = torch::randn(params[i].sizes());
    }
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& ps) {
    std::vector<at::Tensor> out;
    for (const auto& p : ps) out.push_back(p.detach().clone().requires_grad_(true));
    return out;
}

bool all_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
    for (std::size_t i = 0; i < a.size(); ++i)
        if (!a[i].equal(b[i])) return false;
    return a.size() == b.size();
}

std::string saved(AdaRankGradAdamW& opt) {
    std::stringstream s;
    torch::save(opt, s);
    return s.str();
}

} // namespace

TEST_CASE("(a) a factored gradient an earlier step consumed is refused when a base-class zero_grad left it") {
    const std::int64_t d = 24, o = 16;
    VeloraLinear layer(VeloraLinearOptions(d, o).groups(4).factored_gradient(true));
    AdaRankGradAdamW opt(layer->parameters(), AdaRankGradAdamWOptions(1e-2).rank(adarank::rank_policy::fixed(4)));
    opt.attach(layer);
    torch::optim::Optimizer& base = opt;   // what a generic training loop holds
    const auto batch = [&](std::uint64_t seed) {
        at::manual_seed(seed);
        layer(torch::randn({8, d})).pow(2).sum().backward();
    };
    base.zero_grad();
    batch(1);
    REQUIRE(opt.step_checked().status == velora::status::ok);
    base.zero_grad();   // clears the bias's dense gradient only (Optimizer::zero_grad is not virtual)
    batch(2);
    const at::Tensor w = layer->weight.detach().clone(), b = layer->bias.detach().clone();
    const std::string msg = invalid_argument_message([&] { (void)opt.step_checked(); });
    CHECK(contains(msg, "velora::torch::AdaRankGradAdamW::step: the factored gradient of the VeloraLinear weight"));
    CHECK(contains(msg, "zero_grad was not called on this AdaRankGradAdamW"));
    CHECK(layer->weight.equal(w));   // nothing changed
    CHECK(layer->bias.equal(b));
    opt.zero_grad();                 // the optimizer's own clears both kinds
    batch(2);
    CHECK(opt.step_checked().status == velora::status::ok);
    layer->zero_grad();              // so does the module's
    batch(3);
    CHECK(opt.step_checked().status == velora::status::ok);
    // Accumulating over several backward passes before one step stays allowed.
    opt.zero_grad();
    batch(4);
    batch(5);
    CHECK(opt.step_checked().status == velora::status::ok);
}

TEST_CASE("(b) float64 inputs are refused, as torch::nn::Linear refuses an input of another dtype") {
    VeloraLinear layer(VeloraLinearOptions(8, 4).groups(2));
    const std::string msg = invalid_argument_message([&] { (void)layer(torch::ones({2, 8}, torch::kDouble)); });
    CHECK(contains(msg, "velora::torch::VeloraLinear::forward: argument 'x' (shape [2, 8], dtype Double"));
    CHECK(contains(msg, "is float64, but the layer computes in float32"));
    torch::nn::Linear reference(8, 4);
    CHECK_THROWS(reference(torch::ones({2, 8}, torch::kDouble)));
    CHECK_FALSE(layer->v_initialised());   // nothing recorded
}

TEST_CASE("(c) adamw_defaults() are torch::optim::AdamW's, and dense steps then match it") {
    const torch::optim::AdamWOptions t;
    const auto o = AdaRankGradAdamWOptions::adamw_defaults();
    CHECK(o.lr() == t.lr());
    CHECK(o.eps() == t.eps());
    CHECK(o.weight_decay() == t.weight_decay());
    CHECK(std::get<0>(o.betas()) == std::get<0>(t.betas()));
    CHECK(std::get<1>(o.betas()) == std::get<1>(t.betas()));
    CHECK(o.convention() == adarank::adam_convention::torch);
    const AdaRankGradAdamWOptions library;   // GaLore's defaults, which differ
    CHECK(library.eps() != t.eps());
    CHECK(library.weight_decay() != t.weight_decay());
    std::vector<at::Tensor> p{param({6, 5}, 1)}, q = clones(p);
    AdaRankGradAdamW mine(p, AdaRankGradAdamWOptions::adamw_defaults(1e-2).kind(adarank::param_kind::dense));
    torch::optim::AdamW theirs(q, torch::optim::AdamWOptions(1e-2));
    for (int t = 1; t <= 20; ++t) {
        set_gradients(p, t);
        set_gradients(q, t);
        REQUIRE(mine.step_checked().status == velora::status::ok);
        (void)theirs.step();
    }
    CHECK(torch_test::max_relative(p[0], q[0]) < 1e-6);
}

TEST_CASE("(d) betas, eps and weight decay may follow a schedule, as torch::optim::AdamW reads them at every step") {
    std::vector<at::Tensor> p{param({7, 5}, 4)}, q = clones(p);
    AdaRankGradAdamW mine(p, AdaRankGradAdamWOptions::adamw_defaults(1e-2).kind(adarank::param_kind::dense));
    torch::optim::AdamW theirs(q, torch::optim::AdamWOptions(1e-2));
    auto& mo = static_cast<AdaRankGradAdamWOptions&>(mine.param_groups()[0].options());
    auto& to = static_cast<torch::optim::AdamWOptions&>(theirs.param_groups()[0].options());
    for (int t = 1; t <= 20; ++t) {
        const double beta1 = 0.85 + 0.005 * t, wd = 0.01 * (1 + t % 3);   // a β₁ warm-up and a cyclic decay
        mo.betas({beta1, 0.999}).weight_decay(wd);
        to.betas({beta1, 0.999}).weight_decay(wd);
        set_gradients(p, t);
        set_gradients(q, t);
        REQUIRE(mine.step_checked().status == velora::status::ok);
        (void)theirs.step();
    }
    CHECK(torch_test::max_relative(p[0], q[0]) < 1e-6);
    // A schedule's value the library refuses throws at the step, naming it; nothing changes.
    const at::Tensor before = p[0].detach().clone();
    mo.eps(-1.0);
    set_gradients(p, 21);
    CHECK(contains(invalid_argument_message([&] { (void)mine.step_checked(); }), "config.adam.eps"));
    CHECK(p[0].equal(before));
    // The archive keeps the scheduled values: a resumed run continues with them.
    mo.eps(1e-8);
    REQUIRE(mine.step_checked().status == velora::status::ok);
    std::vector<at::Tensor> r = clones(p);
    AdaRankGradAdamW resumed(r, AdaRankGradAdamWOptions::adamw_defaults(1e-2).kind(adarank::param_kind::dense));
    std::stringstream s(saved(mine));
    torch::load(resumed, s);
    const auto& ro = static_cast<const AdaRankGradAdamWOptions&>(resumed.param_groups()[0].options());
    CHECK(std::get<0>(ro.betas()) == std::get<0>(mo.betas()));
    CHECK(ro.weight_decay() == mo.weight_decay());
    set_gradients(p, 22);
    set_gradients(r, 22);
    REQUIRE(mine.step_checked().status == velora::status::ok);
    REQUIRE(resumed.step_checked().status == velora::status::ok);
    CHECK(all_equal(p, r));
}

TEST_CASE("(e) a run resumed from a checkpoint saves the same bytes as the run that saved it") {
    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> p{param({20, 12}, 1), param({12}, 2)};
    const auto options = AdaRankGradAdamWOptions(1e-2).rank(adarank::rank_policy::adaptive(0.2, 1, 4));
    AdaRankGradAdamW opt(p, options);
    torch::optim::StepLR schedule(opt, 2, 0.5);
    for (int t = 1; t <= 5; ++t) {
        set_gradients(p, t);
        REQUIRE(opt.step_checked().status == velora::status::ok);
        schedule.step();
    }
    const std::string first = saved(opt);
    CHECK(saved(opt) == first);
    std::vector<at::Tensor> q = clones(p);
    AdaRankGradAdamW resumed(q, AdaRankGradAdamWOptions(options).lr(0.5));   // built with another lr
    std::stringstream in(first);
    torch::load(resumed, in);
    CHECK(saved(resumed) == first);   // byte for byte (the library state held the construction-time lr before)
}

TEST_CASE("(f) an LR scheduler's position across a checkpoint: the documented recipe resumes bit-identically") {
    torch::NoGradGuard no_grad;
    const auto options = AdaRankGradAdamWOptions(1e-2).kind(adarank::param_kind::dense);
    std::vector<at::Tensor> p{param({8, 6}, 3)};
    std::vector<at::Tensor> q = clones(p);
    // The whole run: 9 steps under StepLR(3, 0.5).
    AdaRankGradAdamW whole(p, options);
    torch::optim::StepLR whole_schedule(whole, 3, 0.5);
    std::string checkpoint;
    std::vector<at::Tensor> snapshot;
    const int saved_at = 4;
    for (int t = 1; t <= 9; ++t) {
        set_gradients(p, t);
        REQUIRE(whole.step_checked().status == velora::status::ok);
        whole_schedule.step();
        if (t == saved_at) {
            checkpoint = saved(whole);   // plus the step count: libtorch's schedulers have no state of their own
            snapshot = clones(p);
        }
    }
    // The recipe (docs/torch.md): a fresh scheduler advanced by the saved step count, then the
    // optimizer loaded (which restores the learning rates the advance also changed).
    q = snapshot;
    AdaRankGradAdamW resumed(q, options);
    torch::optim::StepLR schedule(resumed, 3, 0.5);
    for (int k = 0; k < saved_at; ++k) schedule.step();
    std::stringstream in(checkpoint);
    torch::load(resumed, in);
    for (int t = saved_at + 1; t <= 9; ++t) {
        set_gradients(q, t);
        REQUIRE(resumed.step_checked().status == velora::status::ok);
        schedule.step();
    }
    CHECK(all_equal(p, q));
    CHECK(resumed.param_groups()[0].options().get_lr() == whole.param_groups()[0].options().get_lr());
}

namespace {
// One rank, counting the collectives it serves (identity, as velora::single_process).
struct counting_communicator final : velora::torch::dynamic_communicator {
    int calls = 0;
    int rank() const override { return 0; }
    int size() const override { return 1; }
    void all_reduce_sum(std::span<float>) override { ++calls; }
    void all_reduce_sum(std::span<double>) override { ++calls; }
    void broadcast(std::span<std::byte>, int) override { ++calls; }
    bool any(bool flag) override {
        ++calls;
        return flag;
    }
};
} // namespace

TEST_CASE("set_communicator: steps go through the communicator; one rank gives the one-process bits") {
    torch::NoGradGuard no_grad;
    const auto options = AdaRankGradAdamWOptions(1e-2).rank(adarank::rank_policy::adaptive(0.2, 1, 4)).refresh(adarank::refresh_policy::converged(0.5, 2, 3));
    std::vector<at::Tensor> p{param({20, 12}, 1), param({12}, 2)}, q = clones(p);
    AdaRankGradAdamW plain(p, options), with(q, options);
    auto comm = std::make_shared<counting_communicator>();
    with.set_communicator(comm);
    for (int t = 1; t <= 6; ++t) {
        set_gradients(p, t);
        set_gradients(q, t);
        REQUIRE(plain.step_checked().status == velora::status::ok);
        REQUIRE(with.step_checked().status == velora::status::ok);
    }
    CHECK(all_equal(p, q));
    CHECK(comm->calls > 6);
    CHECK(with.layer_state(q[0]).refreshes == plain.layer_state(p[0]).refreshes);
    // One rank's non-finite gradient skips the step (the check goes through any()).
    set_gradients(q, 7);
    q[1].mutable_grad()[0] = std::nan("");
    const int before = comm->calls;
    CHECK(with.step_checked().skipped);
    CHECK(comm->calls == before + 1);
}
