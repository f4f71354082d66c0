// The installed package's torch component: a VeloraLinear forward and backward and one
// AdaRankGradAdamW step with its factored gradient, through velora::torch.
#include <torch/torch.h>
#include <velora/torch/torch.hpp>

#include <cstdio>

int main() {
    velora::torch::VeloraLinear layer(velora::torch::VeloraLinearOptions(32, 16).groups(4).factored_gradient(true));
    velora::torch::AdaRankGradAdamW opt(layer->parameters(), velora::torch::AdaRankGradAdamWOptions().rank(adarank::rank_policy::fixed(4)));
    opt.attach(layer);
    const torch::Tensor w = layer->weight.detach().clone();
    layer(torch::randn({8, 32}) + 0.5).pow(2).sum().backward();
    const velora::torch::step_report report = opt.step_checked();
    const bool ok = report.status == velora::status::ok && !layer->weight.equal(w) && opt.layer_state(layer->weight).rank == 4;
    std::printf("velora::torch consumer: step %s, rank %ld\n", ok ? "ok" : "failed", static_cast<long>(opt.layer_state(layer->weight).rank));
    return ok ? 0 : 1;
}
