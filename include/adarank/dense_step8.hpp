#pragma once
/// \file
/// Dense AdamW for a parameter whose moments are 8-bit blockwise (state_format::int8_blockwise):
/// the backend's adam8_update does each block in one pass (decode, update, encode) in place when
/// the overflow certificate vouches for the step and the weight and gradient are contiguous;
/// otherwise the step runs on copies in backend memory (allocated here: never in a certified step
/// on contiguous arrays; the new weights and the absmax are read on the host) and is committed
/// only when every moment and weight came out finite and the new weights are bounded by max(T)/2
/// (the optimizer's precondition for the next step's certificate).
#include <cmath>
#include <limits>

#include <velora/core/error.hpp>

#include "blockwise_moments.hpp"
#include "overflow_certificate.hpp"
#include "parameter.hpp"
#include "step_context.hpp"

namespace adarank {

template <optimizer_backend B, class Config, class Trouble>
    requires blockwise_state_backend<B>
velora::status dense_step8(step_context<B, Config>& ctx, parameter_state<B>& l, matrix_view<float> weight, const_matrix_view<float> grad,
                           Trouble&& trouble) {
    using velora::status;
    using cert = overflow_certificate<float>;
    B& b = ctx.backend;
    const double energy = b.sum_of_squares(grad);
    if (!std::isfinite(energy)) {
        const status s = trouble();
        if (s != status::overflow) return s;   // NaN/Inf in the gradient: nothing changed
    }
    if (l.t >= cert::max_steps) return status::overflow;
    const update_terms<float> u = ctx.rule.terms(ctx.lr, l.t + 1);
    const velora::rules::adamw_terms<float> terms = ctx.rule.dense_terms(ctx.lr, l.t + 1);
    const float step = float(ctx.rule.step_size(ctx.lr, l.t + 1));
    const auto kind = terms.order == velora::rules::adamw_order::torch ? velora::rules::adam_row_kind::torch_weight : velora::rules::adam_row_kind::galore_weight;
    const bool contiguous = (weight.rows == 1 || weight.ld == weight.cols) && (grad.rows == 1 || grad.ld == grad.cols);
    // The dequantised moments are bounded by the block absmax, itself at most the bounds kept.
    typename cert::moment_bounds next;
    const bool certified = contiguous && std::isfinite(energy) &&
                           cert::certify(ctx.rule.coefficients(), l.m_bound, l.v_bound, cert::sum_bound(energy, grad.size()), u.eps_value, next) &&
                           cert::dense_update_ok(step, terms.decay, next.n) &&
                           (terms.order == velora::rules::adamw_order::galore || cert::dense_update_ok(terms.step, 1.0f, next.m));
    if (certified) {
        [[maybe_unused]] const bool finite = b.adam8_update(kind, grad.data, weight.data, l.q8.view(), terms);   // finite: certified
        ++l.t;
        l.m_bound = next.m;
        l.v_bound = next.v;
        return status::ok;
    }
    // On copies in backend memory, committed when finite and bounded.
    const index_t count = l.rows * l.cols;
    typename B::template buffer<float> w, g;
    w.resize(static_cast<std::size_t>(count));
    g.resize(static_cast<std::size_t>(count));
    for (index_t r = 0; r < l.rows; ++r) {
        b.copy(weight.row(r), w.data() + r * l.cols, l.cols);
        b.copy(grad.row(r), g.data() + r * l.cols, l.cols);
    }
    blockwise_moments<B> moments = l.q8.copy(b);
    if (!b.adam8_update(kind, g.data(), w.data(), moments.view(), terms)) return status::overflow;
    const auto hw = summarize(b, const_matrix_view<float>{w.data(), l.rows, l.cols, l.cols});
    if (!hw.finite || !(hw.max_abs <= static_cast<double>(std::numeric_limits<float>::max() / 2))) return status::overflow;
    for (index_t r = 0; r < l.rows; ++r) b.copy(w.data() + r * l.cols, weight.row(r), l.cols);
    l.q8 = std::move(moments);
    ++l.t;
    l.m_bound = l.q8.m_bound(b);
    l.v_bound = l.q8.v_bound(b);
    return status::ok;
}

} // namespace adarank
