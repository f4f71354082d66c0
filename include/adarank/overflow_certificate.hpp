#pragma once
/// \file
/// The overflow certificate: a step writes nothing unless everything it writes is finite, without
/// an extra pass over the weight or the gradient in the steady state.
///
/// Each parameter keeps bounds M >= max|m| and V >= max v (doubles, certificate_bounds in
/// parameter.hpp). The step has already computed E = Σx² of what enters the moments (the dense
/// gradient, or the projected gradient Ĝ), so max x² <= E, and before anything is written:
///   m' = β₁m + (1−β₁)x:  |m'| <= M' = (β₁M + (1−β₁)√E)(1+κ)
///   v' = β₂v + (1−β₂)x²:   v' <= V' = (β₂V + (1−β₂)E)(1+κ)
///   n  = m'/(√v' + ε):    |n| <= M'/ε (1+κ)
/// with κ covering T's rounding. E, M', V' <= max(T)/2 keep x², m' and v' finite; the weight
/// update is certified from |n| (dense_update_ok, low_rank_update_ok). Only when the certificate
/// fails (absurd gradients, states or hyper-parameters) is the step computed exactly in workspace
/// and read back on the host (the steps' exact paths): committed when finite, status::overflow
/// otherwise. The host-side summaries here also serve load_state and set_basis.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "adamw_rule.hpp"
#include "backend.hpp"

namespace adarank {

template <class T>
struct overflow_certificate {
    static constexpr double max_value = static_cast<double>(std::numeric_limits<T>::max());
    static constexpr double half_max = max_value / 2, quarter_max = max_value / 4;
    static constexpr double unit_roundoff = static_cast<double>(std::numeric_limits<T>::epsilon()) / 2;
    /// Per bound: T's rounding of a product and a sum (and of x², the division), plus the few
    /// double operations that evaluate the bound itself.
    static constexpr double slack = 1.0 + 4.0 * unit_roundoff + 8.0 * 0x1p-53;
    /// The largest step count a step may start from (it increments it).
    static constexpr std::uint64_t max_steps = std::numeric_limits<std::uint64_t>::max() - 1;

    /// An upper bound on the exact Σx² of `count` values whose sum of squares the backend returned
    /// as `sum` (in double, in any order): the relative error of such a sum of non-negative terms
    /// is below (count + 1)·2⁻⁵³·(4/3) while that is small; the absolute term covers squares that
    /// underflow double.
    static double sum_bound(double sum, index_t count) noexcept {
        const double nu = (static_cast<double>(count) + 1.0) * 0x1p-53;
        return nu <= 0.125 ? sum * (1.0 + 2.0 * nu) + 1e-300 : std::numeric_limits<double>::infinity();
    }
    /// T's rounding of a sum of r products in a GEMM (any order).
    static double gemm_slack(index_t r) noexcept {
        const double nu = (static_cast<double>(r) + 1.0) * unit_roundoff;
        return nu <= 0.125 ? 1.0 + 2.0 * nu : std::numeric_limits<double>::infinity();
    }

    struct moment_bounds {
        double m = 0, v = 0, n = 0;   ///< >= max |m'|, max v', max |n| after the step
    };
    /// The bounds after one Adam update of moments bounded by (m_bound, v_bound) with an input
    /// whose squares are at most x2; false when they do not certify the update finite (with room
    /// to spare).
    static bool certify(const adam_coefficients<T>& coef, double m_bound, double v_bound, double x2, double eps_value, moment_bounds& out) noexcept {
        const double x = std::sqrt(x2) * slack;
        out.m = (coef.b1 * m_bound + coef.c1 * x) * slack;
        out.v = (coef.b2 * v_bound + coef.c2 * x2) * slack;
        out.n = out.m / eps_value * slack;
        return x2 <= half_max && out.m <= half_max && out.v <= half_max && out.n <= max_value;   // (false for NaN)
    }
    /// w' = decay·(w − step·n) is finite for every |w| <= half_max/max(1, |decay|) (the
    /// precondition) when max(1, |decay|)·|step|·max|n| <= quarter_max.
    static bool dense_update_ok(T step, T decay, double n_max) noexcept {
        const double d = std::max(1.0, std::abs(static_cast<double>(decay)));
        return std::isfinite(step) && std::isfinite(decay) && d * std::abs(static_cast<double>(step)) * n_max * slack <= quarter_max;
    }
    /// W' = alpha·(Bᵀ·N) + decay·W (a GEMM; right side Nᵀ·B, the same sums): the GEMM sums
    /// Σ_k B_ki·N_kj in T before scaling by alpha, and every partial sum is at most
    /// ‖B_:,i‖·‖N_:,j‖ <= basis_norm·n_col (n_col >= every column norm of N, r×other). Both the
    /// sum and alpha times it must stay below quarter_max; with |decay·w| <= half_max (the
    /// precondition) W' is finite.
    static bool low_rank_update_ok(T alpha, T decay, double basis_norm, index_t r, double n_col) noexcept {
        const double sum = basis_norm * n_col * gemm_slack(r);
        return std::isfinite(alpha) && std::isfinite(decay) && sum <= quarter_max && std::abs(static_cast<double>(alpha)) * sum * slack <= quarter_max;
    }

    /// What the exact paths, load_state and set_basis learn from a host copy of an array.
    struct host_summary {
        bool finite = true, negative = false;
        double max_abs = 0;
        double max_col_norm = 0;   ///< of the array as rows×cols, each column's Euclidean norm (× slack)
    };
    static host_summary summarize(const std::vector<T>& host, index_t cols = 1) {
        host_summary s;
        std::vector<double> col2(static_cast<std::size_t>(cols), 0.0);
        for (std::size_t i = 0; i < host.size(); ++i) {
            const T x = host[i];
            if (!std::isfinite(x)) {
                s.finite = false;
                return s;
            }
            s.negative = s.negative || x < T(0);
            const double d = static_cast<double>(x);
            s.max_abs = std::max(s.max_abs, std::abs(d));
            col2[i % static_cast<std::size_t>(cols)] += d * d;
        }
        for (const double c : col2) s.max_col_norm = std::max(s.max_col_norm, std::sqrt(c) * slack);
        return s;
    }

    /// Whether a host copy of a rank×len basis is finite, its deviation max |B·Bᵀ − I| and ‖B‖_F
    /// (× slack), all in double. The Gram matrix is accumulated column by column of B (inner loop
    /// over contiguous entries of a column, which vectorises without reassociating any sum).
    struct basis_check {
        index_t bad_row = -1, bad_col = -1;
        double deviation = 0, norm = 0;
    };
    static basis_check check_basis(const std::vector<T>& b, index_t rank, index_t len) {
        basis_check c;
        const auto r = static_cast<std::size_t>(rank), n = static_cast<std::size_t>(len);
        std::vector<double> bt(r * n);   // Bᵀ, len×rank
        for (std::size_t i = 0; i < r; ++i) {
            for (std::size_t j = 0; j < n; ++j) {
                const T x = b[i * n + j];
                if (!std::isfinite(x)) {
                    c.bad_row = static_cast<index_t>(i);
                    c.bad_col = static_cast<index_t>(j);
                    return c;
                }
                bt[j * r + i] = static_cast<double>(x);
            }
        }
        std::vector<double> gram(r * r, 0.0);
        for (std::size_t k = 0; k < n; ++k) {
            const double* col = &bt[k * r];
            for (std::size_t i = 0; i < r; ++i) {
                const double x = col[i];
                double* g = &gram[i * r];
                for (std::size_t j = i; j < r; ++j) g[j] += x * col[j];
            }
        }
        double trace = 0;
        for (std::size_t i = 0; i < r; ++i) {
            trace += gram[i * r + i];
            for (std::size_t j = i; j < r; ++j) c.deviation = std::max(c.deviation, std::abs(gram[i * r + j] - (i == j ? 1.0 : 0.0)));
        }
        c.norm = std::sqrt(sum_bound(trace, rank * len)) * slack;
        return c;
    }
};

/// >= ‖a‖_F, hence >= max |a| and every column norm (+Inf when the sum is not finite).
template <optimizer_backend B>
double norm_bound(B& b, const_matrix_view<typename B::value_type> a) {
    using cert = overflow_certificate<typename B::value_type>;
    const double sum = b.sum_of_squares(a);
    return std::isfinite(sum) ? std::sqrt(cert::sum_bound(sum, a.size())) * cert::slack : std::numeric_limits<double>::infinity();
}

/// A contiguous array of backend memory read on the host (the exact paths and set_basis only).
template <optimizer_backend B>
std::vector<typename B::value_type> host_copy(B& b, const_matrix_view<typename B::value_type> a) {
    std::vector<typename B::value_type> host(static_cast<std::size_t>(a.size()));
    b.copy_to_host(a.data, host.data(), a.size());
    return host;
}

template <optimizer_backend B>
typename overflow_certificate<typename B::value_type>::host_summary summarize(B& b, const_matrix_view<typename B::value_type> a) {
    return overflow_certificate<typename B::value_type>::summarize(host_copy(b, a), a.cols);
}

} // namespace adarank
