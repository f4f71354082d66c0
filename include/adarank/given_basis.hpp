#pragma once
/// \file
/// A subspace given by the host (low_rank_adamw::set_basis): checked on the host (shape, finite,
/// orthonormal rows within the tolerance), then installed as a refresh would install a found
/// one (quantised first when the basis format is, the check applying to the given float rows),
/// with the moments transported by the configured policy. Nothing changes unless it is
/// accepted and the transported moments are finite.
#include <velora/core/error.hpp>

#include "low_rank_step.hpp"
#include "overflow_certificate.hpp"
#include "parameter.hpp"
#include "step_context.hpp"

namespace adarank {

/// Replaces l's subspace with `basis` (r×len, backend memory). Throws std::invalid_argument (from
/// `fn`, naming parameter `id`) for a wrong shape, a non-finite entry or rows that are not
/// orthonormal within `tolerance`; returns status::overflow when the transported moments would
/// not be finite, ok otherwise. Reads the basis on the host (allocates).
template <optimizer_backend B, class Config>
velora::status install_given_basis(step_context<B, Config>& ctx, parameter_state<B>& l, index_t id, const_matrix_view<typename B::value_type> basis,
                                   double tolerance, const char* fn) {
    using cert = overflow_certificate<typename B::value_type>;
    B& b = ctx.backend;
    auto& ws = ctx.workspace;
    velora::detail::require(l.low_rank, fn, "parameter ", id, " is optimised densely; it has no basis");
    velora::check_view(basis, fn, "basis");
    velora::detail::require(basis.cols == l.len && basis.rows <= l.r_cap, fn, "argument 'basis' is ", basis.rows, "x", basis.cols, " but parameter ",
                            id, " needs r x ", l.len, " with 1 <= r <= ", l.r_cap);
    auto next = ws.view(ws.basis_next, basis.rows, l.len);
    for (index_t i = 0; i < basis.rows; ++i) b.copy(basis.row(i), next.row(i), l.len);
    const auto check = cert::check_basis(host_copy(b, next), basis.rows, l.len);
    if (check.bad_row >= 0) velora::detail::fail(fn, "argument 'basis' has an entry that is not finite at (", check.bad_row, ", ", check.bad_col, ")");
    velora::detail::require(check.deviation <= tolerance, fn, "argument 'basis' (", basis.rows, "x", basis.cols,
                            ") does not have orthonormal rows: the deviation max |B·Bᵀ − I| = ", check.deviation, " exceeds the tolerance ",
                            tolerance);
    double norm = check.norm;
    if (l.qbasis.quantized()) {   // the subspace is the quantised Q of the given basis, as after a refresh
        quantize_next_basis(ws, l, next);
        norm = cert::check_basis(host_copy(b, next), basis.rows, l.len).norm;
    }
    const auto m_next = ws.view(ws.m_next, basis.rows, l.other), v_next = ws.view(ws.v_next, basis.rows, l.other);
    transport_into_workspace(ctx, l, next);
    const auto m = summarize(b, m_next), v = summarize(b, v_next);
    if (!m.finite || !v.finite) return velora::status::overflow;
    subspace_report rep;
    rep.rank = basis.rows;
    install_subspace(b, l, next, rep, l.counter, norm, ws.basis_codes_next);
    if (l.quantized) {   // 8-bit moments: encoded from the transported floats
        if constexpr (blockwise_state_backend<B>) l.q8.quantize(b, m_next.data, v_next.data);
    } else {
        b.copy(m_next.data, l.m.data(), basis.rows * l.other);
        b.copy(v_next.data, l.v.data(), basis.rows * l.other);
    }
    l.m_bound = m.max_abs;
    l.v_bound = v.max_abs;
    return velora::status::ok;
}

} // namespace adarank
