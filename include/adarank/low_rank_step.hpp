#pragma once
/// \file
/// One step of a low-rank parameter, in GaLore's order, as five named phases:
///
///   1. decide            whether this step runs in a new subspace: the first step, a refresh due
///                        by the step count, or the refresh rule on the projection Ĝ = B·M (which
///                        the steady state computes here, or takes from the host: step_projected);
///   2. prepare_subspace  on a refresh: search the new basis (rsvd.hpp), project onto it, and
///                        carry the moments over into the workspace (transport.hpp);
///   3. certify           the overflow certificate of the Adam update (overflow_certificate.hpp);
///                        when it holds, the moments are updated (in place in the steady state);
///   4. exact_fallback    when it does not: the update on copies in the workspace, read back on
///                        the host, and status::overflow unless it is finite;
///   5. commit            the new subspace (if any), the moments, the counters and bounds, and
///                        W = d·W − d·s·α·back_project(n) in one GEMM.
///
/// Nothing of the parameter changes before phase 5, so a step that returns early (NaN/Inf in the
/// gradient, an overflow, a degenerate gradient with no subspace yet) changes nothing but what
/// that status documents. The same functions change a subspace for set_basis.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <optional>
#include <type_traits>

#include <velora/core/error.hpp>

#include "dense_step.hpp"
#include "gradient.hpp"
#include "overflow_certificate.hpp"
#include "parameter.hpp"
#include "policies.hpp"
#include "rank_budget.hpp"
#include "step_context.hpp"
#include "transport.hpp"

namespace adarank {

/// The basis l's steps run in (rank×len): its float buffer, or a quantised basis decoded into the
/// workspace's basis_now (Q = code·scale; valid until another parameter's decode, i.e. its step or
/// projection). A decode that basis_now already holds for l at its current step and refresh
/// counts is not repeated (optimizer_workspace::basis_now_holds): a data-parallel host's
/// project_gradient and step_with_reduced_projection decode once per step.
template <optimizer_backend B>
const_matrix_view<typename B::value_type> current_basis(optimizer_workspace<B>& ws, const parameter_state<B>& l) {
    if (!l.qbasis.quantized() || l.rank == 0) return l.basis_view();
    const typename optimizer_workspace<B>::decoded_basis_mark mark{&l, l.t, l.refreshes};
    if (ws.basis_now_holds != mark) {
        if constexpr (host_float_backend<B>) l.qbasis.decode(ws.basis_now.data(), l.len);   // host memory: the CPU backend
        ws.basis_now_holds = mark;
    }
    return {ws.basis_now.data(), l.rank, l.len, l.len};
}

/// A new basis (rows of `next`, workspace, float) encoded in l's quantised format into the
/// workspace's basis_codes_next and replaced by its decoded values, so that the step that finds it
/// already projects and updates with the Q later steps decode (nothing of l changes).
template <optimizer_backend B>
void quantize_next_basis(optimizer_workspace<B>& ws, const parameter_state<B>& l, matrix_view<typename B::value_type> next) {
    if constexpr (host_float_backend<B>) {   // host memory: the CPU backend (the constructor refuses a quantised basis elsewhere)
        auto& codes = ws.basis_codes_next;
        codes.configure(l.qbasis.format(), l.len, l.qbasis.block());
        codes.encode(next.data, next.rows, next.ld);
        codes.decode(next.data, next.ld);
    }
}

/// Writes l's moments, carried over into the subspace `next` (r×len) by the configured policy,
/// into the workspace's m_next and v_next (r×other); zeros when l has no subspace yet. Changes
/// nothing of l.
template <optimizer_backend B, class Config>
void transport_into_workspace(step_context<B, Config>& ctx, parameter_state<B>& l, const_matrix_view<typename B::value_type> next) {
    const auto old_basis = current_basis(ctx.workspace, l);
    auto& ws = ctx.workspace;
    const index_t r_new = next.rows;
    auto m_next = ws.view(ws.m_next, r_new, l.other);
    auto v_next = ws.view(ws.v_next, r_new, l.other);
    if (l.rank > 0 && l.quantized) {   // 8-bit moments: transported as floats
        if constexpr (blockwise_state_backend<B>) {
            const auto m_old = ws.view(ws.m_old, l.rank, l.other), v_old = ws.view(ws.v_old, l.rank, l.other);
            l.q8.dequantize(ctx.backend, m_old.data, v_old.data);
            transport_moments(ctx.backend, ctx.config.transport, next, old_basis, const_matrix_view<typename B::value_type>(m_old),
                              const_matrix_view<typename B::value_type>(v_old), m_next, v_next, ws.view(ws.rotation, r_new, l.rank),
                              ws.view(ws.rotation_squared, r_new, l.rank));
        }
    } else if (l.rank > 0) {
        transport_moments(ctx.backend, ctx.config.transport, next, old_basis, l.moment_view(std::as_const(l.m)), l.moment_view(std::as_const(l.v)),
                          m_next, v_next, ws.view(ws.rotation, r_new, l.rank), ws.view(ws.rotation_squared, r_new, l.rank));
    } else {
        ctx.backend.fill(m_next, typename B::value_type(0));
        ctx.backend.fill(v_next, typename B::value_type(0));
    }
}

/// Makes `basis` (r×len, workspace) the subspace of `l`: sizes its state for rank r and copies the
/// basis (a quantised one: the codes quantize_next_basis left in `codes`); the caller copies the
/// moments. The refresh rules count from here.
template <optimizer_backend B>
void install_subspace(B& b, parameter_state<B>& l, const_matrix_view<typename B::value_type> basis, const subspace_report& rep,
                      std::uint64_t counter, double basis_norm, const quantized_basis& codes) {
    const index_t r_new = basis.rows;
    l.resize_state(r_new);
    if (l.qbasis.quantized()) l.qbasis.assign(codes);
    else b.copy(basis.data, l.basis.data(), r_new * l.len);
    l.rank = r_new;
    l.since = 0;
    l.anchor2 = -1;   // set from the first projected gradient in the new subspace
    ++l.refreshes;
    l.counter = counter;
    l.last = rep;
    l.basis_norm = basis_norm;
}

template <optimizer_backend B, class Config, class Grad>
class low_rank_step {
public:
    using T = typename B::value_type;
    using cert = overflow_certificate<T>;

    /// `projected` (may be empty): the projection onto the current basis, already reduced by the
    /// host (step_projected).
    low_rank_step(step_context<B, Config>& ctx, parameter_state<B>& l, matrix_view<T> weight, const Grad& grad, const_matrix_view<T> projected)
        : ctx_(ctx), b_(ctx.backend), l_(l), weight_(weight), m_(grad, l.side), projected_(projected), rank_(l.rank), basis_(l.basis_view()),
          basis_norm_(l.basis_norm), m_bound_(l.m_bound), v_bound_(l.v_bound), counter_(l.counter) {
        if (l.qbasis.quantized()) basis_ = current_basis(ctx.workspace, l);   // decoded once per step
    }

    status run() {
        if (const auto early = decide()) return *early;
        if (const auto early = prepare_subspace()) return *early;
        if (l_.t >= cert::max_steps) return status::overflow;   // the step count cannot be incremented
        if (!certify())
            if (const auto early = exact_fallback()) return *early;
        return commit();
    }

private:
    // Called only when a norm or projection is not finite (never in the steady state).
    status trouble() const { return m_.finite() ? status::overflow : status::non_finite_input; }
    matrix_view<T> projection(index_t rank) { return ctx_.workspace.view(ctx_.workspace.projection, rank, l_.other); }

    // Phase 1. A refresh that is due by the step count alone needs no projection onto the old basis.
    std::optional<status> decide() {
        refresh_ = l_.rank == 0 || ctx_.config.refresh.due_by_count(l_.steps_in_subspace());
        if (refresh_) return std::nullopt;
        const auto proj = projection(l_.rank);
        if (projected_.empty()) m_.mul(basis_, proj);
        else for (index_t i = 0; i < l_.rank; ++i) b_.copy(projected_.row(i), proj.row(i), l_.other);
        projected2_ = b_.sum_of_squares(proj);
        if (!std::isfinite(projected2_)) return trouble();
        refresh_inputs in{l_.steps_in_subspace(), projected2_, l_.anchor2, 0.0};
        if (ctx_.config.refresh.needs_gradient_norm()) {
            energy_ = m_.norm2();
            if (!std::isfinite(energy_)) return trouble();
            in.gradient_norm2 = energy_;
        }
        refresh_ = ctx_.config.refresh.due(in);
        return std::nullopt;
    }

    // Phase 2. The subspace the step runs in: the current one, or a new one prepared in the
    // workspace (basis_next, with the transported moments in m_next, v_next) and committed with
    // the step, so that a step that fails changes nothing.
    std::optional<status> prepare_subspace() {
        if (!refresh_) return std::nullopt;
        if (energy_ < 0) energy_ = m_.norm2();
        if (!std::isfinite(energy_)) return trouble();
        if (energy_ == 0) {
            result_ = status::degenerate_input;
            if (l_.rank == 0) return decay_only(ctx_, l_, weight_);   // nothing to find a subspace from yet
            b_.fill(projection(l_.rank), T(0));                       // G = 0: so is its projection (the subspace is kept)
            projected2_ = 0;
            return std::nullopt;
        }
        // The sketch's power iterations form products as large as ‖G‖²: beyond half of T's range
        // they would overflow.
        if (!(energy_ <= cert::half_max)) return trouble();
        auto& ws = ctx_.workspace;
        auto next = ws.view(ws.basis_next, l_.r_cap, l_.len);
        const auto warm = l_.rank > 0 ? basis_ : const_matrix_view<T>{};
        rep_ = find_subspace(warm, next);
        if (!std::isfinite(rep_.captured)) return trouble();
        rank_ = rep_.rank;
        if (l_.qbasis.quantized()) quantize_next_basis(ws, l_, next.row_block(0, rank_));   // this step already runs in Q
        basis_ = next.row_block(0, rank_);
        m_.mul(basis_, projection(rank_));
        projected2_ = b_.sum_of_squares(projection(rank_));
        if (!std::isfinite(projected2_)) return trouble();   // nothing committed yet
        transport_into_workspace(ctx_, l_, basis_);
        basis_norm_ = norm_bound(b_, basis_);
        m_bound_ = l_.rank > 0 ? norm_bound(b_, ws.view(ws.m_next, rank_, l_.other)) : 0.0;
        v_bound_ = l_.rank > 0 ? norm_bound(b_, ws.view(ws.v_next, rank_, l_.other)) : 0.0;
        fresh_ = true;
        return std::nullopt;
    }

    // The search of phase 2, by the configured rank estimator or, under the budget rule, by the
    // allocation across all parameters (rank_budget.hpp).
    subspace_report find_subspace(const_matrix_view<T> warm, matrix_view<T> next) {
        if constexpr (std::is_same_v<typename Config::rank_type, rank_policy>) {
            if (ctx_.budget) {
                const budget_estimator<B> budget{ctx_.config.rank, ctx_.layers, l_, *ctx_.budget};
                return ctx_.finder.find(m_, budget, energy_, warm, l_.seed, counter_, next);
            }
        }
        return ctx_.finder.find(m_, ctx_.config.rank, energy_, warm, l_.seed, counter_, next);
    }

    // Phase 3. n = m/(√v+ε) overwrites the projected gradient; Adam in the subspace runs in place
    // in the steady state, on the transported moments after a refresh.
    bool certify() {
        decay_value_ = ctx_.rule.decay_factor(ctx_.lr);
        decay_ = T(decay_value_);
        terms_ = ctx_.rule.terms(ctx_.lr, l_.t + 1);
        alpha_ = T(-decay_value_ * terms_.step * ctx_.config.scale);
        const auto& coef = ctx_.rule.coefficients();
        certified_ = cert::certify(coef, m_bound_, v_bound_, cert::sum_bound(projected2_, rank_ * l_.other), terms_.eps_value, next_) &&
                     cert::low_rank_update_ok(alpha_, decay_, basis_norm_, rank_, std::sqrt(static_cast<double>(rank_)) * next_.n);
        if (!certified_) return false;
        const auto n = projection(rank_);
        auto& ws = ctx_.workspace;
        if (fresh_) b_.adam_moments(n, ws.view(ws.m_next, rank_, l_.other), ws.view(ws.v_next, rank_, l_.other), coef.beta1, coef.beta2, terms_.eps, n);
        else if (l_.quantized) quantized_moments_in_place(n);
        else b_.adam_moments(n, l_.moment_view(l_.m), l_.moment_view(l_.v), coef.beta1, coef.beta2, terms_.eps, n);
        return true;
    }

    // The steady state on 8-bit moments: each block decoded, updated and encoded in one pass, n
    // written over the projection (the certificate vouches that every result is finite).
    void quantized_moments_in_place(matrix_view<T> n) {
        if constexpr (blockwise_state_backend<B>) {
            const auto& coef = ctx_.rule.coefficients();
            velora::rules::adamw_terms<T> c;
            c.c1 = T(1) - coef.beta1;
            c.c2 = T(1) - coef.beta2;
            c.eps = terms_.eps;
            [[maybe_unused]] const bool finite = b_.adam8_update(velora::rules::adam_row_kind::moments, n.data, n.data, l_.q8.view(), c);
        }
    }

    // Phase 4. The update on a copy in the workspace, read back on the host.
    std::optional<status> exact_fallback() {
        auto& ws = ctx_.workspace;
        const auto n = projection(rank_);
        const auto m_work = ws.view(ws.m_next, rank_, l_.other), v_work = ws.view(ws.v_next, rank_, l_.other);
        if (!fresh_ && l_.quantized) {
            if constexpr (blockwise_state_backend<B>) l_.q8.dequantize(b_, m_work.data, v_work.data);   // the bits the fused 8-bit pass decodes
        } else if (!fresh_) {
            b_.copy(l_.m.data(), m_work.data, rank_ * l_.other);
            b_.copy(l_.v.data(), v_work.data, rank_ * l_.other);
        }
        const auto& coef = ctx_.rule.coefficients();
        b_.adam_moments(n, m_work, v_work, coef.beta1, coef.beta2, terms_.eps, n);
        const auto hm = summarize(b_, m_work), hv = summarize(b_, v_work), hn = summarize(b_, n);
        if (!hm.finite || !hv.finite || !hn.finite || !cert::low_rank_update_ok(alpha_, decay_, basis_norm_, rank_, hn.max_col_norm))
            return status::overflow;
        next_.m = hm.max_abs;
        next_.v = hv.max_abs;
        return std::nullopt;
    }

    // Phase 5. Only a new rank's state allocates, and it does so before changing anything.
    status commit() {
        auto& ws = ctx_.workspace;
        if (fresh_) {
            install_subspace(b_, l_, basis_, rep_, counter_, basis_norm_, ws.basis_codes_next);
            if (ctx_.budget)   // the budget rule reads it at the other parameters' refreshes (capacity reserved at registration)
                energy_fractions(ctx_.finder.singular_values(), rep_.energy, l_.r_cap, l_.spectrum);
        }
        if ((fresh_ || !certified_) && l_.quantized) {
            if constexpr (blockwise_state_backend<B>) l_.q8.quantize(b_, ws.m_next.data(), ws.v_next.data());   // the bits the fused 8-bit pass encodes
        } else if (fresh_ || !certified_) {
            b_.copy(ws.m_next.data(), l_.m.data(), rank_ * l_.other);
            b_.copy(ws.v_next.data(), l_.v.data(), rank_ * l_.other);
        }
        if (l_.anchor2 < 0) l_.anchor2 = projected2_;   // first step in this subspace
        ++l_.t;
        ++l_.since;
        l_.projected_norm2 = projected2_;
        l_.m_bound = next_.m;
        l_.v_bound = next_.v;
        // W = decay·W − decay·step·α·ΔW with ΔW = Bᵀ·N (left) or (Bᵀ·N)ᵀ = Nᵀ·B (right).
        const auto n = projection(rank_);
        const auto basis = l_.qbasis.quantized() ? basis_ : l_.basis_view();   // Q: decoded in the workspace
        if (l_.side == projection_side::left) b_.gemm(velora::op::transpose, velora::op::none, alpha_, basis, n, decay_, weight_);
        else b_.gemm(velora::op::transpose, velora::op::none, alpha_, n, basis, decay_, weight_);
        return result_;
    }

    step_context<B, Config>& ctx_;
    B& b_;
    parameter_state<B>& l_;
    matrix_view<T> weight_;
    const side_matrix<Grad> m_;
    const_matrix_view<T> projected_;
    // decide and prepare_subspace
    bool refresh_ = false, fresh_ = false;
    double projected2_ = 0, energy_ = -1;
    status result_ = status::ok;
    index_t rank_;
    const_matrix_view<T> basis_;
    double basis_norm_, m_bound_, v_bound_;
    subspace_report rep_;
    std::uint64_t counter_;
    // certify and exact_fallback
    bool certified_ = false;
    double decay_value_ = 1;
    T decay_ = T(1), alpha_ = T(0);
    update_terms<T> terms_{};
    typename cert::moment_bounds next_;
};

} // namespace adarank
