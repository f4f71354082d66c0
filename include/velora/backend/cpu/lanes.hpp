#pragma once
/// \file
/// Scalar building blocks whose bits do not depend on where the data lies: a spelled-out fused
/// multiply-add and reductions over a fixed number of lanes.
///
/// Eigen starts its packets at the first aligned address and computes the elements before it
/// one at a time, and GCC (-ffp-contract=fast, its default) fuses products into adds
/// differently in the two, so an Eigen expression or reduction gives bits that depend on the
/// caller's pointer. These helpers index lanes from the start of the data (lane i % lanes) and
/// fold them in a fixed tree.
#include <cmath>

#include "../../core/view.hpp"

namespace velora::cpu {

/// a·b + c, rounded once where the machine has an FMA instruction (and the vector kernels use
/// it too), otherwise rounded twice: either way the same on every call.
template <class T>
T fused(T a, T b, T c) noexcept {
#if defined(__FP_FAST_FMAF) || defined(__FP_FAST_FMA) || defined(__FMA__)
    return std::fma(a, b, c);
#else
    return a * b + c;   // no FMA instruction: nothing to contract
#endif
}

inline constexpr index_t lanes = 16;

template <class S>
S fold_lanes(S (&lane)[lanes]) noexcept {
    for (index_t width = lanes / 2; width > 0; width /= 2)
        for (index_t l = 0; l < width; ++l) lane[l] += lane[l + width];
    return lane[0];
}

/// Σ p[i]², accumulated in double.
template <class T>
double sum_of_squares_in_lanes(const T* p, index_t n) noexcept {
    double lane[lanes] = {};
    index_t i = 0;
    for (; i + lanes <= n; i += lanes)
        for (index_t l = 0; l < lanes; ++l) {
            const double x = static_cast<double>(p[i + l]);
            lane[l] += x * x;
        }
    for (index_t l = 0; i + l < n; ++l) {
        const double x = static_cast<double>(p[i + l]);
        lane[l] += x * x;
    }
    return fold_lanes(lane);
}

/// Σ x[i]·y[i], accumulated in T.
template <class T>
T dot_in_lanes(const T* x, const T* y, index_t n) noexcept {
    T lane[lanes] = {};
    index_t i = 0;
    for (; i + lanes <= n; i += lanes)
        for (index_t l = 0; l < lanes; ++l) lane[l] += x[i + l] * y[i + l];
    for (index_t l = 0; i + l < n; ++l) lane[l] += x[i + l] * y[i + l];
    return fold_lanes(lane);
}

} // namespace velora::cpu
