#pragma once
/// \file
/// Dense AdamW for a parameter registered as dense: one fused pass (the backend's adamw_update)
/// when the overflow certificate vouches for it, otherwise the exact path, which computes the
/// step into temporaries, reads it back and commits it only when it is finite.
#include <cmath>

#include <velora/core/error.hpp>

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
/// moments and n are finite and the weight update is bounded.
template <optimizer_backend B, class Config>
status dense_step_exact(step_context<B, Config>& ctx, parameter_state<B>& l, matrix_view<typename B::value_type> weight,
                        const_matrix_view<typename B::value_type> grad, typename B::value_type step, typename B::value_type decay,
                        typename B::value_type eps) {
    using T = typename B::value_type;
    using cert = overflow_certificate<T>;
    B& b = ctx.backend;
    const auto& coef = ctx.rule.coefficients();
    const index_t count = l.rows * l.cols;
    typename B::template buffer<T> m, v, n;
    m.resize(static_cast<std::size_t>(count));
    v.resize(static_cast<std::size_t>(count));
    n.resize(static_cast<std::size_t>(count));
    b.copy(l.m.data(), m.data(), count);
    b.copy(l.v.data(), v.data(), count);
    b.adam_moments(grad, l.dense_view(m), l.dense_view(v), coef.beta1, coef.beta2, eps, l.dense_view(n));
    const auto hm = summarize(b, l.dense_view(m)), hv = summarize(b, l.dense_view(v)), hn = summarize(b, l.dense_view(n));
    if (!hm.finite || !hv.finite || !hn.finite || !cert::dense_update_ok(step, decay, hn.max_abs)) return status::overflow;
    ++l.t;
    b.copy(m.data(), l.m.data(), count);
    b.copy(v.data(), l.v.data(), count);
    // w = decay·(w − step·n) with the checked n: adamw_update with β₁ = β₂ = 1, ε = 1, m = n and
    // v = g = 0 computes exactly that (m stays n, v stays 0, n/(√0 + 1) = n).
    b.fill(l.dense_view(v), T(0));
    b.adamw_update(weight, l.dense_view(v), l.dense_view(n), l.dense_view(v), T(1), T(1), T(1), step, decay);
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
    const update_terms<T> u = ctx.rule.terms(ctx.lr, l.t + 1);
    const T step = T(u.step), decay = T(ctx.rule.decay_factor(ctx.lr));
    typename cert::moment_bounds next;
    const bool certified = std::isfinite(energy) &&
                           cert::certify(ctx.rule.coefficients(), l.m_bound, l.v_bound, cert::sum_bound(energy, grad.size()), u.eps_value, next) &&
                           cert::dense_update_ok(step, decay, next.n);
    if (!certified) return dense_step_exact(ctx, l, weight, grad, step, decay, u.eps);
    ++l.t;
    const auto& coef = ctx.rule.coefficients();
    b.adamw_update(weight, grad, l.dense_view(l.m), l.dense_view(l.v), coef.beta1, coef.beta2, u.eps, step, decay);
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
