#pragma once
/// \file
/// CholeskyQR2's passes and acceptance tests, written once for every backend: a backend
/// supplies the two primitives (form the Gram matrix of the current rows and factor it,
/// L·Lᵀ = A·Aᵀ; replace the rows by L⁻¹·A) and its Householder fallback; this file decides
/// when the Cholesky result is good enough to use.
///
/// Pass 1 accepts cond(L) up to ~1e7 (a lower bound read from L's diagonal: min > 1e-7·max);
/// pass 2 must see an almost orthonormal block (min > 0.5·max), or pass 1 has lost too much
/// and the caller falls back to Householder QR. A failed factorisation (not positive
/// definite) is a refusal too.
#include "../../core/view.hpp"

namespace velora::rules {

/// Passes of CholeskyQR2 (two: the second repairs the first's loss of orthogonality).
inline constexpr int cholesky_qr2_passes = 2;

/// Pass `pass` (0 or 1) accepts its Cholesky factor when min diag(L) > ratio · max diag(L).
[[nodiscard]] constexpr double cholesky_qr2_diagonal_ratio(int pass) noexcept { return pass == 0 ? 1e-7 : 0.5; }

/// The diagonal of a Cholesky factor L (k×k): `size` values `stride` apart (stride k + 1 for
/// the diagonal of a dense k×k matrix in place, 1 for a copy). `data` = null: the
/// factorisation broke down.
struct cholesky_diagonal {
    const double* data = nullptr;
    index_t size = 0;
    index_t stride = 1;
};

/// Whether pass `pass` accepts a Cholesky factor with this diagonal: every entry positive (a
/// NaN is refused) and min > cholesky_qr2_diagonal_ratio(pass) · max.
[[nodiscard]] constexpr bool cholesky_qr2_accepts(int pass, cholesky_diagonal d) noexcept {
    if (d.data == nullptr || d.size <= 0) return false;
    double lo = d.data[0], hi = d.data[0];
    for (index_t i = 0; i < d.size; ++i) {
        const double x = d.data[i * d.stride];
        if (!(x > 0)) return false;
        lo = x < lo ? x : lo;
        hi = x > hi ? x : hi;
    }
    return lo > cholesky_qr2_diagonal_ratio(pass) * hi;
}

/// CholeskyQR2's control flow. For each pass, `factor()` forms the Gram matrix of the current
/// rows, factors it and returns L's diagonal (data = null on a breakdown); when the pass
/// accepts it, `apply()` replaces the rows by L⁻¹·rows. Returns true when both passes were
/// accepted (the rows are now orthonormal); false at the first refusal, after which the
/// caller discards the rows and falls back (Householder QR of the original block).
template <class Factor, class Apply>
bool cholesky_qr2(Factor&& factor, Apply&& apply) {
    for (int pass = 0; pass < cholesky_qr2_passes; ++pass) {
        if (!cholesky_qr2_accepts(pass, factor())) return false;
        apply();
    }
    return true;
}

} // namespace velora::rules
