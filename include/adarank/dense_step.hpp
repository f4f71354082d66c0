#pragma once
/// \file
/// Dense AdamW for a parameter registered as dense: one fused pass (the backend's adamw_update)
/// when the overflow certificate vouches for it, otherwise the exact path, which computes the
/// step into temporaries, reads it back and commits it only when it is finite.
#include <cmath>

#include <velora/core/error.hpp>

#include "dense_step8.hpp"
#include "gradient.hpp"
#include "overflow_certificate.hpp"
#include "parameter.hpp"
#include "step_context.hpp"

namespace adarank {

using velora::status;

/// A step of a parameter with no subspace yet and an all-zero gradient: the weight decay only,
/// as AdamW would do with G = 0. Returns degenerate_input (overflow when the count is at its
/// limit or the decay is not finite in T).
template <optimizer_backend B, class Config>
status decay_only(step_context<B, Config>& ctx, parameter_state<B>& l, matrix_view<typename B::value_type> weight) {
    using T = typename B::value_type;
    if (l.t >= overflow_certificate<T>::max_steps) return status::overflow;
    const double decay = ctx.rule.decay_factor(ctx.lr);
    if (!std::isfinite(T(decay))) return status::overflow;
    ++l.t;
    if (decay != 1.0) ctx.backend.scale(weight, T(decay));
    return status::degenerate_input;
}

/// The dense step computed exactly into temporaries (allocated here: this path is never taken by
/// a step the certificate vouches for) and read back on the host; committed only when the
/// moments and the update are finite and the new weight is bounded. It gives the bits the fused
/// pass would have given.
template <optimizer_backend B, class Config>
status dense_step_exact(step_context<B, Config>& ctx, parameter_state<B>& l, matrix_view<typename B::value_type> weight,
                        const_matrix_view<typename B::value_type> grad, const velora::rules::adamw_terms<typename B::value_type>& terms) {
    using T = typename B::value_type;
    using cert = overflow_certificate<T>;
    using velora::rules::adamw_order;
    B& b = ctx.backend;
    const index_t count = l.rows * l.cols;
    typename B::template buffer<T> m, v, n;
    m.resize(static_cast<std::size_t>(count));
    v.resize(static_cast<std::size_t>(count));
    n.resize(static_cast<std::size_t>(count));
    b.copy(l.m.data(), m.data(), count);
    b.copy(l.v.data(), v.data(), count);
    // n: galore's normalised step m/(√v + ε); torch's whole update (−s·m)/denom, computed by the
    // fused kernel on a zero weight without decay (adding the zero is exact).
    velora::rules::adamw_terms<T> to_commit = terms;
    if (terms.order == adamw_order::galore) {
        b.adam_moments(grad, l.dense_view(m), l.dense_view(v), terms.beta1, terms.beta2, terms.eps, l.dense_view(n));
    } else {
        b.fill(l.dense_view(n), T(0));
        velora::rules::adamw_terms<T> undecayed = terms;
        undecayed.decay = T(1);
        b.adamw_update(l.dense_view(n), grad, l.dense_view(m), l.dense_view(v), undecayed);
    }
    const auto hm = summarize(b, l.dense_view(m)), hv = summarize(b, l.dense_view(v)), hn = summarize(b, l.dense_view(n));
    const T step = terms.order == adamw_order::galore ? terms.step : T(1);
    if (!hm.finite || !hv.finite || !hn.finite || !cert::dense_update_ok(step, terms.decay, hn.max_abs)) return status::overflow;
    ++l.t;
    b.copy(m.data(), l.m.data(), count);
    b.copy(v.data(), l.v.data(), count);
    // Commit with the checked n through the same fused kernel, set up so that its moments pass n
    // through unchanged (g = v = 0, m = n, β₁ = β₂ = 1, c₁ = c₂ = 0, ε = 1, √(1−β₂ᵗ) = 1):
    //   galore: decay·fma(−step, n, w);   torch: w·decay + (1·n)/(√0/1 + 1) = w·decay + n.
    b.fill(l.dense_view(v), T(0));
    to_commit.beta1 = to_commit.beta2 = to_commit.eps = to_commit.bias2_sqrt = T(1);
    to_commit.c1 = to_commit.c2 = T(0);
    if (terms.order == adamw_order::torch) to_commit.step = T(-1);
    b.adamw_update(weight, l.dense_view(v), l.dense_view(n), l.dense_view(v), to_commit);
    l.m_bound = hm.max_abs;
    l.v_bound = hv.max_abs;
    return status::ok;
}

/// Dense AdamW with a dense gradient. `trouble()` tells, for a non-finite energy, a NaN/Inf in
/// the caller's gradient (non_finite_input) from finite values too large for the arithmetic
/// (overflow).
template <optimizer_backend B, class Config, class Trouble>
status dense_step(step_context<B, Config>& ctx, parameter_state<B>& l, matrix_view<typename B::value_type> weight,
                  const_matrix_view<typename B::value_type> grad, Trouble&& trouble) {
    using T = typename B::value_type;
    using cert = overflow_certificate<T>;
    B& b = ctx.backend;
    const double energy = b.sum_of_squares(grad);
    if (!std::isfinite(energy)) {
        const status s = trouble();
        if (s != status::overflow) return s;
        // A finite gradient whose sum of squares overflowed: the exact path decides.
    }
    if (l.t >= cert::max_steps) return status::overflow;
    // u: the ε the moments' bound uses (ε·√(1−β₂ᵗ) under the torch convention); terms: what the
    // fused kernel takes. Either order adds at most s·|n| (s = lr·√(1−β₂ᵗ)/(1−β₁ᵗ)) to d·w; the
    // torch order also forms s_t·m (s_t = lr/(1−β₁ᵗ)) before dividing, which must stay finite.
    const update_terms<T> u = ctx.rule.terms(ctx.lr, l.t + 1);
    const velora::rules::adamw_terms<T> terms = ctx.rule.dense_terms(ctx.lr, l.t + 1);
    const T step = T(ctx.rule.step_size(ctx.lr, l.t + 1));
    typename cert::moment_bounds next;
    const bool certified = std::isfinite(energy) &&
                           cert::certify(ctx.rule.coefficients(), l.m_bound, l.v_bound, cert::sum_bound(energy, grad.size()), u.eps_value, next) &&
                           cert::dense_update_ok(step, terms.decay, next.n) &&
                           (terms.order == velora::rules::adamw_order::galore || cert::dense_update_ok(terms.step, T(1), next.m));
    if (!certified) return dense_step_exact(ctx, l, weight, grad, terms);
    ++l.t;
    b.adamw_update(weight, grad, l.dense_view(l.m), l.dense_view(l.v), terms);
    l.m_bound = next.m;
    l.v_bound = next.v;
    return status::ok;
}

/// Dense AdamW with any gradient operator: a dense view is used as it is; any other form (a
/// VeLoRA gradient, or the ranks' mean) is expanded into the workspace first.
template <optimizer_backend B, class Config, class Op>
status dense_step_of(step_context<B, Config>& ctx, parameter_state<B>& l, matrix_view<typename B::value_type> weight, const Op& grad) {
    // An expansion of finite inputs that overflowed is an overflow, not a non-finite input.
    const auto trouble = [&] { return grad.finite() ? status::overflow : status::non_finite_input; };
    if constexpr (blockwise_state_backend<B>) {
        if (l.quantized) {   // 8-bit moments (dense_step8.hpp)
            if constexpr (std::is_same_v<Op, dense_gradient<B>>) {
                return dense_step8(ctx, l, weight, grad.view(), trouble);
            } else {
                auto& ws = ctx.workspace;
                ws.grow(ws.dense_gradient, l.rows * l.cols);
                const matrix_view<float> dense = ws.view(ws.dense_gradient, l.rows, l.cols);
                grad.row_block(0, dense);
                return dense_step8(ctx, l, weight, dense, trouble);
            }
        }
    }
    if constexpr (std::is_same_v<Op, dense_gradient<B>>) {
        return dense_step(ctx, l, weight, grad.view(), trouble);
    } else {
        auto& ws = ctx.workspace;
        ws.grow(ws.dense_gradient, l.rows * l.cols);
        const matrix_view<typename B::value_type> dense = ws.view(ws.dense_gradient, l.rows, l.cols);
        grad.row_block(0, dense);
        return dense_step(ctx, l, weight, dense, trouble);
    }
}

} // namespace adarank
