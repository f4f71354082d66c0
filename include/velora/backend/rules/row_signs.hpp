#pragma once
/// \file
/// The sign rule of canonicalize_row_signs, written once for every backend: a row is flipped
/// when its entry of largest magnitude is negative; on ties of magnitude the first such entry
/// (the smallest column index) decides. This gives singular vectors a canonical sign whatever
/// QR or SVD produced them.
///
/// The helpers are VELORA_HOST_DEVICE: the CPU backend scans a row with them, the CUDA kernel
/// uses the same comparison in its per-thread scan and its tree reduction.
#include "../../core/host_device.hpp"

namespace velora::rules {

/// Whether a candidate entry (magnitude `mag`, column `at`) replaces the current pivot
/// (`best_mag`, `best_at`): a larger magnitude, or the same magnitude at an earlier column. A
/// NaN magnitude never replaces anything (every comparison with it is false).
template <class M, class I>
[[nodiscard]] VELORA_HOST_DEVICE constexpr bool row_sign_pivot_beats(M mag, I at, M best_mag, I best_at) noexcept {
    return mag > best_mag || (mag == best_mag && at < best_at);
}

/// Whether a row whose pivot (largest-magnitude entry) is `pivot` is flipped.
template <class T>
[[nodiscard]] VELORA_HOST_DEVICE constexpr bool row_sign_flips(T pivot) noexcept {
    return pivot < T(0);
}

/// |x| for the pivot search (−0 stays −0: it compares equal to +0, so the order is |x|'s).
template <class T>
[[nodiscard]] VELORA_HOST_DEVICE constexpr T row_sign_magnitude(T x) noexcept {
    return x < T(0) ? -x : x;
}

/// The pivot column of a row of `cols` >= 1 entries, scanned in order (the CPU backend's scan).
template <class T, class I>
[[nodiscard]] VELORA_HOST_DEVICE constexpr I row_sign_pivot(const T* row, I cols) noexcept {
    I at = 0;
    for (I c = 1; c < cols; ++c)
        if (row_sign_pivot_beats(row_sign_magnitude(row[c]), c, row_sign_magnitude(row[at]), at)) at = c;
    return at;
}

} // namespace velora::rules
