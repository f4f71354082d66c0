#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "torch_doctest.hpp"
TEST_CASE("smoke") {
    torch::nn::Linear l(8, 4);
    velora::torch::VeloraLoRALinear m(l, velora::torch::LoRAOptions().r(2));
    auto y = m(torch::randn({3, 8}));
    CHECK(y.size(1) == 4);
}
