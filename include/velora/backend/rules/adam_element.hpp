#pragma once
/// \file
/// Adam(W)'s element-wise arithmetic, written once for every backend and both orders of
/// operations. The CPU backend instantiates it on scalars and on AVX-512 packets, the CUDA
/// backend on registers in its kernels: the number type N needs + − × ÷ and unary minus (a
/// scalar, or a GCC/clang vector type such as __m512), and `Ops` supplies a fused multiply-add
/// `Ops::fma(a, b, c)` = a·b + c rounded once, `Ops::product(a, b)` = a·b rounded on its own
/// and never fused into a later add, and `Ops::sqrt`. Every multiply that feeds an add is an
/// explicit Ops::fma or Ops::product, and every other product feeds a division or a multiply,
/// so no compiler can contract anything differently in the packet body and the scalar tail
/// (GCC contracts across statements by default): each element gets the same bits wherever it
/// lies.
///
/// Two orders of operations (adamw_terms::order):
///  - galore (GaLore's and the paper's Adam, the library's default):
///      m += (1−β₁)(g − m),  v += (1−β₂)(g² − v),  n = m / (√v + ε),  w ← d·(w − s·n)
///    with s the bias-corrected step lr·√(1−β₂ᵗ)/(1−β₁ᵗ) and d = 1 − lr·wd;
///  - torch (torch::optim::AdamW's sequence of tensor operations, one rounding per operation):
///      w ← w·d;  m ← m·β₁ + (1−β₁)·g;  v ← v·β₂ + ((1−β₂)·g)·g;
///      denom = √v / √(1−β₂ᵗ) + ε;  w ← w + (−s·m) / denom   with s = lr/(1−β₁ᵗ).
///    torch's vectorised `add_(g, α)` and `addcmul_` are multiply-adds; they are fused here.
#include <cstdint>

#include "../../core/host_device.hpp"

namespace velora::rules {

/// Which optimizer's order of operations an AdamW update follows (see the file comment).
enum class adamw_order : std::uint8_t { galore, torch };

/// What an update writes besides the moments: n = m/(√v+ε) (moments, the low-rank subspace's
/// Adam), or the new weight in GaLore's or torch's order.
enum class adam_row_kind { moments, galore_weight, torch_weight };

/// Everything one dense AdamW update needs besides the arrays, each already rounded to T.
///  - galore: c1 = 1 − β₁ and c2 = 1 − β₂ computed in T (as adam_moments does), step =
///    lr·√(1−β₂ᵗ)/(1−β₁ᵗ), eps = ε; beta1, beta2 and bias2_sqrt unused;
///  - torch:  c1 and c2 computed in double and rounded once (as torch converts its scalar
///    arguments), step = lr/(1−β₁ᵗ), eps = ε, bias2_sqrt = √(1−β₂ᵗ).
/// decay = 1 − lr·wd in both; decay == 1 skips the multiply (the bits of w·1 are w's anyway).
template <class T>
struct adamw_terms {
    adamw_order order = adamw_order::galore;
    T beta1{}, beta2{}, c1{}, c2{}, eps{}, step{}, decay{1};
    T bias2_sqrt{1};
};

/// Galore order, the moments: updates m and v, returns n = m / (√v + ε).
template <class Ops, class N>
VELORA_HOST_DEVICE inline N adam_moments_element(N g, N& m, N& v, N c1, N c2, N eps) {
    m = Ops::fma(c1, g - m, m);
    v = Ops::fma(c2, Ops::fma(g, g, -v), v);
    return m / (Ops::sqrt(v) + eps);
}

/// Galore order, the weight: d·(w − s·n), written as d·fma(−s, n, w).
template <class Ops, class N>
VELORA_HOST_DEVICE inline N galore_weight_element(N w, N n, N minus_step, N decay, bool decays) {
    const N updated = Ops::fma(minus_step, n, w);
    return decays ? decay * updated : updated;
}

/// Torch order, the whole update of one element: updates m and v, returns the new w.
template <class Ops, class N>
VELORA_HOST_DEVICE inline N torch_adamw_element(N g, N& m, N& v, N w, N beta1, N c1, N beta2, N c2, N bias2_sqrt, N eps,
                                                N minus_step, N decay, bool decays) {
    if (decays) w = Ops::product(w, decay);            // p.mul_(1 − lr·wd): its own pass, before the moments
    m = Ops::fma(g, c1, m * beta1);                    // exp_avg.mul_(β₁).add_(g, 1 − β₁)
    v = Ops::fma(c2 * g, g, v * beta2);                // exp_avg_sq.mul_(β₂).addcmul_(g, g, 1 − β₂)
    const N denom = Ops::sqrt(v) / bias2_sqrt + eps;   // (exp_avg_sq.sqrt() / √(1 − β₂ᵗ)).add_(ε)
    return w + (minus_step * m) / denom;               // p.addcdiv_(exp_avg, denom, −lr/(1 − β₁ᵗ))
}

/// One element of an update of kind K; `out` is n (moments) or w (the weight kinds). The
/// coefficients come as N (a scalar, or broadcast into a packet); decays = (decay != 1).
template <adam_row_kind K, class Ops, class N>
VELORA_HOST_DEVICE inline void adam_element(N g, N& m, N& v, N& out, N beta1, N c1, N beta2, N c2, N bias2_sqrt, N eps, N minus_step, N decay,
                                            bool decays) noexcept {
    if constexpr (K == adam_row_kind::torch_weight) {
        out = torch_adamw_element<Ops>(g, m, v, out, beta1, c1, beta2, c2, bias2_sqrt, eps, minus_step, decay, decays);
    } else {
        const N n = adam_moments_element<Ops>(g, m, v, c1, c2, eps);
        if constexpr (K == adam_row_kind::moments) out = n;
        else out = galore_weight_element<Ops>(out, n, minus_step, decay, decays);
    }
}

} // namespace velora::rules
