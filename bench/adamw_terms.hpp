#pragma once
// The AdamW scalars of the dense update benchmarks (bench_state8 on the CPU, bench_cuda on the
// GPU): β 0.9/0.999, ε 1e-8, step 1e-3, decay 1 − 1e-5, GaLore's order, so that the 8-bit and
// float passes of both programs time the same arithmetic.
#include <velora/backend/rules/adam_element.hpp>

namespace bench {

inline velora::rules::adamw_terms<float> dense_adamw_terms() {
    velora::rules::adamw_terms<float> c;
    c.beta1 = 0.9f;
    c.beta2 = 0.999f;
    c.c1 = 1.0f - c.beta1;
    c.c2 = 1.0f - c.beta2;
    c.eps = 1e-8f;
    c.step = 1e-3f;
    c.decay = 1.0f - 1e-5f;
    return c;
}

} // namespace bench
