#pragma once
// Comparisons for the GPU tests that cannot pass on NaN: std::max(acc, NaN) returns acc, so a
// maximum that skips over NaN would let an all-NaN result pass every check. Here any element
// that is not finite where the reference is finite (or a NaN against a number, or an infinity
// of the other sign) makes the result +inf, which fails every "< tolerance" check. Plain C++:
// tested without a GPU in test_cuda_host.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace test {

/// Whether a and b disagree in a way no tolerance can accept: one is NaN and the other is not,
/// or one is infinite and they differ.
inline bool nonfinite_mismatch(double a, double b) {
    if (std::isnan(a) || std::isnan(b)) return std::isnan(a) != std::isnan(b);
    if (std::isinf(a) || std::isinf(b)) return a != b;
    return false;
}

/// max |a − b| / max(1e-30, max |b|) over the finite pairs; +inf when any pair is a non-finite
/// mismatch or the sizes differ. Equal non-finite pairs (NaN against NaN, the same infinity)
/// agree and add nothing.
template <class A, class B>
double rel_diff(const std::vector<A>& a, const std::vector<B>& b) {
    if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
    double diff = 0, scale = 1e-30;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
        if (nonfinite_mismatch(x, y)) return std::numeric_limits<double>::infinity();
        if (!std::isfinite(x)) continue;   // the same non-finite value on both sides
        diff = std::max(diff, std::abs(x - y));
        scale = std::max(scale, std::abs(y));
    }
    return diff / scale;
}

/// max over i of |a_i − b_i| / max(|b_i|, floor), element-wise relative error (for values stored
/// in 16 bits, whose error is relative to each value); +inf on a non-finite mismatch.
template <class A, class B, class Convert>
double elementwise_rel_diff(const std::vector<A>& a, const std::vector<B>& b, double floor, Convert to_double) {
    if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
    double worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const double x = to_double(a[i]), y = to_double(b[i]);
        if (nonfinite_mismatch(x, y)) return std::numeric_limits<double>::infinity();
        if (!std::isfinite(x)) continue;
        worst = std::max(worst, std::abs(x - y) / std::max(std::abs(y), floor));
    }
    return worst;
}

/// ‖Q·Qᵀ − I‖_max for a row-major k×c block; +inf when any entry of Q is not finite.
template <class T>
double orthonormality_error(const std::vector<T>& q, long long k, long long c) {
    for (const T& e : q)
        if (!std::isfinite(static_cast<double>(e))) return std::numeric_limits<double>::infinity();
    double worst = 0;
    for (long long i = 0; i < k; ++i)
        for (long long j = 0; j < k; ++j) {
            double dot = 0;
            for (long long l = 0; l < c; ++l) dot += static_cast<double>(q[static_cast<std::size_t>(i * c + l)]) * static_cast<double>(q[static_cast<std::size_t>(j * c + l)]);
            worst = std::max(worst, std::abs(dot - (i == j ? 1.0 : 0.0)));
        }
    return worst;
}

/// max over the rows x of A (row-major k×c) of ‖x − x·QᵀQ‖ / max(‖x‖, 1e-300): how far A's rows lie
/// outside the row space of the orthonormal Q (m×c); +inf when anything is not finite. 0 for a
/// zero row.
template <class TA, class TQ>
double span_residual(const std::vector<TA>& a, long long k, const std::vector<TQ>& q, long long m, long long c) {
    double worst = 0;
    std::vector<double> coeff(static_cast<std::size_t>(m));
    for (long long i = 0; i < k; ++i) {
        double norm = 0;
        for (long long l = 0; l < c; ++l) norm += static_cast<double>(a[static_cast<std::size_t>(i * c + l)]) * static_cast<double>(a[static_cast<std::size_t>(i * c + l)]);
        for (long long j = 0; j < m; ++j) {
            double dot = 0;
            for (long long l = 0; l < c; ++l) dot += static_cast<double>(a[static_cast<std::size_t>(i * c + l)]) * static_cast<double>(q[static_cast<std::size_t>(j * c + l)]);
            coeff[static_cast<std::size_t>(j)] = dot;
        }
        double residual = 0;
        for (long long l = 0; l < c; ++l) {
            double x = static_cast<double>(a[static_cast<std::size_t>(i * c + l)]);
            for (long long j = 0; j < m; ++j) x -= coeff[static_cast<std::size_t>(j)] * static_cast<double>(q[static_cast<std::size_t>(j * c + l)]);
            residual += x * x;
        }
        const double r = std::sqrt(residual) / std::max(std::sqrt(norm), 1e-300);
        if (!std::isfinite(r)) return std::numeric_limits<double>::infinity();
        if (norm > 0) worst = std::max(worst, r);
    }
    return worst;
}

} // namespace test
