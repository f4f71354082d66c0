#pragma once
/// \file
/// Moment transport: re-expressing Adam's moments in a new subspace on a refresh.
///
/// Moments are stored as rows in the basis' coordinates (see gradient.hpp), so with
/// R = B_new·B_oldᵀ (r_new×r_old, rectangular when the rank changes) both sides are
///     M_new = R·M_old
///     V_new = (R∘R)·V_old          squared_rotation (default)
///           = max(R·V_old, 0)      clamped_rotation
/// `reset` zeroes both, `none` keeps them as they are (GaLore), cutting or zero-padding rows
/// when the rank changes; it is the same GEMM with R = the rectangular identity, which
/// reproduces the old rows bit for bit. R∘R has rows of sum ≤ 1 (the new basis vectors
/// are unit vectors), so squared rotation keeps V ≥ 0 and never inflates it; for a signed
/// permutation R it is exactly the permutation of V.
#include "backend.hpp"
#include "policies.hpp"

namespace adarank {

/// Writes the transported moments into m_new, v_new (r_new×other). `r` and `r2` are r_new×r_old
/// scratch. The old and new moments must not overlap.
template <optimizer_backend B>
void transport_moments(B& b, transport_policy policy, const_matrix_view<typename B::value_type> new_basis,
                       const_matrix_view<typename B::value_type> old_basis, const_matrix_view<typename B::value_type> m_old,
                       const_matrix_view<typename B::value_type> v_old, matrix_view<typename B::value_type> m_new,
                       matrix_view<typename B::value_type> v_new, matrix_view<typename B::value_type> r,
                       matrix_view<typename B::value_type> r2) {
    using T = typename B::value_type;
    using velora::op;
    constexpr const char* fn = "adarank::transport_moments";
    velora::check_view(new_basis, fn, "new_basis");
    velora::check_shape(old_basis, old_basis.rows, new_basis.cols, fn, "old_basis");
    velora::check_view(m_old, fn, "m_old");
    velora::check_shape(m_old, old_basis.rows, m_old.cols, fn, "m_old");
    velora::check_shape(v_old, old_basis.rows, m_old.cols, fn, "v_old");
    velora::check_shape(m_new, new_basis.rows, m_old.cols, fn, "m_new");
    velora::check_shape(v_new, new_basis.rows, m_old.cols, fn, "v_new");
    velora::check_shape(r, new_basis.rows, old_basis.rows, fn, "r");
    velora::check_shape(r2, new_basis.rows, old_basis.rows, fn, "r2");

    if (policy == transport_policy::reset) {
        b.gemm(op::none, op::none, T(0), r, m_old, T(0), m_new);   // beta = 0 writes zeros
        b.gemm(op::none, op::none, T(0), r, v_old, T(0), v_new);
        return;
    }
    if (policy == transport_policy::none) b.set_identity(r);
    else b.gemm(op::none, op::transpose, T(1), new_basis, old_basis, T(0), r);
    b.gemm(op::none, op::none, T(1), const_matrix_view<T>(r), m_old, T(0), m_new);
    switch (policy) {
    case transport_policy::squared_rotation:
        b.square(r, r2);
        b.gemm(op::none, op::none, T(1), const_matrix_view<T>(r2), v_old, T(0), v_new);
        break;
    case transport_policy::clamped_rotation:
        b.gemm(op::none, op::none, T(1), const_matrix_view<T>(r), v_old, T(0), v_new);
        b.clamp_nonnegative(v_new);
        break;
    default:   // none
        b.gemm(op::none, op::none, T(1), const_matrix_view<T>(r), v_old, T(0), v_new);
        break;
    }
}

} // namespace adarank
