// A small libtorch training loop with the velora::torch adapter: a four-layer MLP whose two middle
// layers are VeloraLinear (each keeps a VeLoRA record of its input instead of the input), trained
// by AdaRankGradAdamW with the layers' weight gradients delivered in factored form, a StepLR
// schedule and gradient clipping; then the same network with torch::nn::Linear and
// torch::optim::AdamW, for comparison. It prints the losses and the memory the records and the
// optimizer saved.
//
// The task is synthetic: a fixed random linear teacher labels Gaussian inputs with one of 16
// classes; every step draws a fresh batch. CI runs this program (test example_torch); it exits
// non-zero unless the VeLoRA + AdaRankGrad run took every step and its loss fell below half of
// its first value. Arguments (optional): steps (default 150), learning rate (default 1e-2), the
// low-rank group's scale α (default 0.25).
#include <torch/torch.h>
#include <velora/torch/torch.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

namespace {

using velora::torch::AdaRankGradAdamW;
using velora::torch::AdaRankGradAdamWOptions;
using velora::torch::VeloraLinear;
using velora::torch::VeloraLinearOptions;

constexpr std::int64_t in = 256, hidden = 512, classes = 16, batch = 512;

// The teacher: y = argmax(x·B) for a fixed random B; batch `step` is the same in both runs.
std::pair<torch::Tensor, torch::Tensor> batch_of(const torch::Tensor& b, std::int64_t step) {
    torch::manual_seed(1000 + static_cast<std::uint64_t>(step));
    torch::Tensor x = torch::randn({batch, in});
    return {x, torch::mm(x, b).argmax(1)};
}

struct result {
    double first = 0, last = 0;
    std::int64_t skipped = 0;
};

// One training run; `velora` picks VeloraLinear + AdaRankGradAdamW or torch::nn::Linear + AdamW.
// `report` is called once at the end with the model's layers and the optimizer.
template <class Report>
result train(bool velora, const torch::Tensor& teacher, std::int64_t steps, double lr, double scale, Report&& report) {
    torch::manual_seed(0);   // the same initial weights in both runs
    result r;
    torch::nn::Sequential model;
    std::unique_ptr<torch::optim::Optimizer> opt;
    VeloraLinear l1{nullptr}, l2{nullptr};
    AdaRankGradAdamW* ada = nullptr;
    if (velora) {
        // The layers that read activations are VeloraLinear: G = 32 groups (sub-tokens of 16
        // features), weight gradients delivered factored to the optimizer. VeLoRA relies on the
        // sub-tokens of a layer's input sharing a dominant direction, which activations (here
        // after a GELU) have and raw zero-mean Gaussian inputs do not: the first layer, which
        // reads the data, stays a torch::nn::Linear (as a VeloraLinear it barely trains on this
        // task), and so does the small head. Built in the same order as the torch run's layers,
        // so that both start from the same weights (VeloraLinear initialises as nn::Linear).
        torch::nn::Linear first(in, hidden);
        l1 = VeloraLinear(VeloraLinearOptions(hidden, hidden).groups(32).factored_gradient(true));
        l2 = VeloraLinear(VeloraLinearOptions(hidden, hidden).groups(32).factored_gradient(true));
        model = torch::nn::Sequential(first, torch::nn::GELU(), l1, torch::nn::GELU(), l2, torch::nn::GELU(), torch::nn::Linear(hidden, classes));
        // Two param groups: the VeloraLinear weights low-rank (adaptive rank up to 32), everything
        // else (the first layer, the head, the biases) dense AdamW, as torch::optim::AdamW would.
        // (With the first layer low-rank as well, this run ends near a loss of 1.2 instead of 0.35:
        // the gradient of the layer that reads raw data is not low-rank.)
        std::vector<torch::Tensor> low_rank{l1->weight, l2->weight}, dense;
        for (const auto& p : model->parameters())
            if (!p.is_same(l1->weight) && !p.is_same(l2->weight)) dense.push_back(p);
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.emplace_back(low_rank, std::make_unique<AdaRankGradAdamWOptions>(AdaRankGradAdamWOptions(lr)
                                                                                    .weight_decay(0.01)
                                                                                    .scale(scale)
                                                                                    .rank(adarank::rank_policy::adaptive(0.2, 1, 32))
                                                                                    .refresh(adarank::refresh_policy::converged(0.5, 20, 60))));
        groups.emplace_back(dense, std::make_unique<AdaRankGradAdamWOptions>(AdaRankGradAdamWOptions(lr).weight_decay(0.01).kind(adarank::param_kind::dense)));
        auto a = std::make_unique<AdaRankGradAdamW>(groups);
        a->attach(l1);
        a->attach(l2);
        ada = a.get();
        opt = std::move(a);
    } else {
        model = torch::nn::Sequential(torch::nn::Linear(in, hidden), torch::nn::GELU(), torch::nn::Linear(hidden, hidden), torch::nn::GELU(),
                                      torch::nn::Linear(hidden, hidden), torch::nn::GELU(), torch::nn::Linear(hidden, classes));
        opt = std::make_unique<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(lr).weight_decay(0.01));
    }
    torch::optim::StepLR schedule(*opt, static_cast<unsigned>(std::max<std::int64_t>(1, steps / 3)), 0.5);
    for (std::int64_t step = 0; step < steps; ++step) {
        const auto [x, y] = batch_of(teacher, step);
        if (ada) ada->zero_grad();   // clears the factored gradients too
        else opt->zero_grad();
        const torch::Tensor loss = torch::cross_entropy_loss(model->forward(x), y);
        loss.backward();
        if (ada) {
            ada->clip_grad_norm(1.0);
            if (ada->step_checked().skipped) ++r.skipped;   // a NaN/Inf gradient anywhere: nothing changed
        } else {
            torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
            opt->step();
        }
        schedule.step();
        r.last = loss.item<double>();
        if (step == 0) r.first = r.last;
        if (step % 25 == 0 || step == steps - 1) {
            std::printf("  step %3lld  loss %.4f  lr %.2e", static_cast<long long>(step), r.last, opt->param_groups()[0].options().get_lr());
            if (ada) std::printf("  ranks %lld, %lld", static_cast<long long>(ada->layer_state(l1->weight).rank), static_cast<long long>(ada->layer_state(l2->weight).rank));
            std::printf("\n");
        }
    }
    report(l1, l2, ada);
    return r;
}

} // namespace

int main(int argc, char** argv) {
    const std::int64_t steps = argc > 1 ? std::atoll(argv[1]) : 150;
    const double lr = argc > 2 ? std::atof(argv[2]) : 1e-2;
    const double scale = argc > 3 ? std::atof(argv[3]) : 0.25;
    torch::manual_seed(0);
    const torch::Tensor teacher = torch::randn({in, classes});

    std::printf("VeloraLinear + AdaRankGradAdamW\n");
    std::size_t kept = 0, inputs = 0, state = 0, adamw_state = 0;
    const result v = train(true, teacher, steps, lr, scale, [&](const VeloraLinear& l1, const VeloraLinear& l2, const AdaRankGradAdamW* opt) {
        // What the last forward kept for backward, and the optimizer's state.
        kept = l1->last_record_bytes() + l2->last_record_bytes();
        inputs = l1->last_input_bytes() + l2->last_input_bytes();
        state = opt->state_bytes();
        adamw_state = opt->adamw_state_bytes();
    });
    std::printf("torch::nn::Linear + torch::optim::AdamW\n");
    const result t = train(false, teacher, steps, lr, scale, [](auto&&...) {});

    std::printf("\nloss after %lld steps: %.4f (velora) vs %.4f (torch), from %.4f\n", static_cast<long long>(steps), v.last, t.last, v.first);
    std::printf("activations kept for backward by the two VeloraLinear layers: %zu bytes (torch::nn::Linear keeps %zu: %.1fx less)\n", kept, inputs,
                static_cast<double>(inputs) / static_cast<double>(kept));
    std::printf("optimizer state: %zu bytes (torch::optim::AdamW holds %zu: %.1fx less)\n", state, adamw_state,
                static_cast<double>(adamw_state) / static_cast<double>(state));
    const bool ok = v.last < 0.5 * v.first && v.skipped == 0;
    std::printf("%s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
