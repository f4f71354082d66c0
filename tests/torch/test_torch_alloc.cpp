// AdaRankGradAdamW's steady-state step allocates nothing: after the warm-up steps, a step between
// refreshes of float32 dense, low-rank and flattened >2-D parameters, a float64 parameter and a
// low-rank weight fed a factored VeLoRA gradient makes no heap allocation through operator new
// (which every new tensor, view or not, goes through for its TensorImpl) and, when the GEMM is a
// BLAS, none of Eigen's either (EIGEN_RUNTIME_NO_MALLOC), and the library's workspaces keep their
// size. What may still allocate is documented in optimizer_engine.hpp (copies of gradients or
// weights that are not row-major matrices of the parameter's dtype, tied weights).
#define EIGEN_RUNTIME_NO_MALLOC
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "torch_doctest.hpp"

#include <atomic>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "../allocation_counter.hpp"   // every allocation counted
using test::allocations;

using velora::torch::AdaRankGradAdamW;
using OptionsT = velora::torch::AdaRankGradAdamWOptions;

namespace {

at::Tensor param(std::vector<std::int64_t> sizes, std::uint64_t seed, c10::ScalarType dtype = at::kFloat) {
    at::manual_seed(seed);
    return torch::randn(sizes, torch::TensorOptions().dtype(dtype)).mul_(0.1).requires_grad_(true);
}

// Heap allocations made by one call of `step`, with Eigen's own heap forbidden meanwhile when the
// build's GEMM is a BLAS (without one, Eigen's product takes its packing buffers from the heap on
// every call: the library's allocation, documented in docs/performance.md).
template <class Step>
long allocations_during(Step&& step) {
    const long before = allocations.load();
    if constexpr (velora::cpu::has_blas) Eigen::internal::set_is_malloc_allowed(false);
    step();
    Eigen::internal::set_is_malloc_allowed(true);
    return allocations.load() - before;
}

} // namespace

TEST_CASE("a steady-state AdaRankGradAdamW step makes no heap allocation (dense, low-rank, >2-D, float64, factored)") {
    torch::NoGradGuard no_grad;
    const std::int64_t rows = 48, features = 40, groups = 8, subtoken = 5;
    std::vector<at::Tensor> ps{param({rows, features}, 1), param({40}, 2), param({24, 4, 3, 3}, 3), param({32, 20}, 4, at::kDouble),
                               param({rows, features}, 5)};
    // Refreshes every 1000 steps: the steps counted below run inside one subspace.
    const auto options = OptionsT(1e-3).rank(adarank::rank_policy::adaptive(0.2, 1, 8)).refresh(adarank::refresh_policy::every(1000)).weight_decay(0.01);
    AdaRankGradAdamW opt(ps, options);
    auto slot = std::make_shared<velora::torch::factored_gradient_accumulator>(rows, features, groups, subtoken);
    opt.attach(ps[4], slot);
    const at::Tensor v = torch::full({subtoken}, 1.0 / std::sqrt(static_cast<double>(subtoken)));
    const auto set_gradients = [&](int t) {
        at::manual_seed(100 + static_cast<std::uint64_t>(t));
        for (std::size_t i = 0; i + 1 < ps.size(); ++i) ps[i].mutable_grad() = torch::randn(ps[i].sizes(), ps[i].options().requires_grad(false));
        slot->clear();
        slot->add(torch::randn({rows, groups}), v, 0.5);
    };
    for (int t = 1; t <= 2; ++t) {   // warm-up: registration, the first subspaces, the backend's scratch
        set_gradients(t);
        REQUIRE(opt.step_checked().status == velora::status::ok);
    }
    CHECK(opt.layer_state(ps[0]).low_rank);
    CHECK(opt.layer_state(ps[2]).low_rank);
    CHECK(opt.layer_state(ps[4]).low_rank);
    const std::size_t workspace = opt.workspace_bytes();
    for (int t = 3; t <= 5; ++t) {
        set_gradients(t);
        velora::torch::step_report report;
        CHECK(allocations_during([&] { report = opt.step_checked(); }) == 0);
        CHECK(report.status == velora::status::ok);
        CHECK(report.stepped == 5);
    }
    CHECK(opt.workspace_bytes() == workspace);
    CHECK(opt.layer_state(ps[0]).refreshes == 1);   // still in its first subspace
}
