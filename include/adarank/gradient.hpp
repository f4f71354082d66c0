#pragma once
/// \file
/// The two forms in which the optimizer accepts a weight gradient G (m×n), and the side view
/// that the subspace finder and the projection work on.
///
/// Everything AdaRankGrad does with G is one of two products with a block of row vectors,
///     times(S)   = S · G    (S: k×m → k×n)
///     times_t(X) = X · Gᵀ   (X: k×n → k×m),
/// plus ‖G‖_F². A dense gradient does them with one GEMM each. A VeLoRA layer's gradient
/// G = c·A·K, A = dYᵀZ ∈ R^{m×g}, K = I_g ⊗ vᵀ, does them through the small A and the
/// sub-token kernels, at O(k·m·g + k·n) instead of O(k·m·n), and the m×n matrix never exists:
///     S·G  = c · expand(S·A)          X·Gᵀ = c · project(X) · Aᵀ
///     ‖G‖² = c² · Σ_g ‖A[:, g]‖² · ‖v restricted to group g's columns‖²
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <vector>

#include <velora/compressor.hpp>
#include <velora/core/checked.hpp>

#include "backend.hpp"
#include "policies.hpp"

namespace adarank {

/// Whether every entry of `a` (backend memory) is finite. For the paths that have already met a
/// non-finite sum of squares and must tell a NaN/Inf input (status::non_finite_input) from finite
/// values too large for the arithmetic (status::overflow): the sum is recomputed, and only when T's
/// squares can exceed double's range (T = double) and the sum is +Inf are the entries read on the
/// host (this allocates; never on a steady-state step).
template <optimizer_backend B>
[[nodiscard]] bool all_finite(B& b, const_matrix_view<typename B::value_type> a) {
    using T = typename B::value_type;
    const double sum = b.sum_of_squares(a);
    if (std::isfinite(sum)) return true;
    // Up to 2^63 squares of finite values below 2^max_exponent add up to less than
    // 2^(2·max_exponent + 63): for float that is far inside double's range, so a non-finite sum
    // can only come from a non-finite entry.
    if constexpr (2 * std::numeric_limits<T>::max_exponent + 63 < std::numeric_limits<double>::max_exponent) {
        return false;
    } else {
        if (std::isnan(sum)) return false;   // squares of finite values are never NaN, nor are their sums
        std::vector<T> row(static_cast<std::size_t>(a.cols));
        for (index_t i = 0; i < a.rows; ++i) {
            b.copy_to_host(a.row(i), row.data(), a.cols);
            for (const T x : row)
                if (!std::isfinite(x)) return false;
        }
        return true;
    }
}

/// Whether the inputs of a factored gradient c·A·(I_g ⊗ vᵀ) are finite: A, c and the entries of v
/// that the kernels read (min(s, D) of them). A product of finite inputs that overflows is then
/// an overflow, not a non-finite input.
template <optimizer_backend B>
[[nodiscard]] bool all_finite(B& b, const velora::factored_gradient<typename B::value_type>& f) {
    using T = typename B::value_type;
    const index_t used = std::min(f.subtoken_size, f.features);
    return std::isfinite(f.scale) && all_finite(b, f.a) && all_finite(b, const_matrix_view<T>(f.v, 1, used, used));
}

/// What the optimizer needs of a weight gradient G (m×n), whatever form it is held in: its
/// shape, ‖G‖_F², whether its inputs are finite (failure paths only), the two products with a
/// block of row vectors, and a block of its rows (to expand G where it is needed densely).
/// `dense_gradient` and `factored_gradient_operator` are the library's; `mean_over_ranks` turns any
/// of them into the mean of the ranks' gradients (data-parallel training, see
/// docs/distributed.md). A host can implement its own (a sharded G, a custom collective).
template <class G>
concept gradient_operator = requires(const G& g, const_matrix_view<typename G::T> s, matrix_view<typename G::T> out, index_t first) {
    { g.rows() } -> std::convertible_to<index_t>;
    { g.cols() } -> std::convertible_to<index_t>;
    { g.norm2() } -> std::same_as<double>;
    { g.finite() } -> std::same_as<bool>;
    g.times(s, out);           // out = S·G    (S: k×rows, out: k×cols)
    g.times_t(s, out);         // out = X·Gᵀ   (X: k×cols, out: k×rows)
    g.row_block(first, out);   // out = G[first : first + out.rows, :]
};

/// A dense gradient: a view of G.
template <optimizer_backend B>
class dense_gradient {
public:
    using T = typename B::value_type;
    dense_gradient(B& b, const_matrix_view<T> g) : b_(&b), g_(g) {}

    [[nodiscard]] index_t rows() const noexcept { return g_.rows; }
    [[nodiscard]] index_t cols() const noexcept { return g_.cols; }
    [[nodiscard]] double norm2() const { return b_->sum_of_squares(g_); }
    /// Whether every entry of G is finite (failure paths only, see all_finite).
    [[nodiscard]] bool finite() const { return all_finite(*b_, g_); }
    void times(const_matrix_view<T> s, matrix_view<T> out) const { b_->gemm(velora::op::none, velora::op::none, T(1), s, g_, T(0), out); }
    void times_t(const_matrix_view<T> x, matrix_view<T> out) const {
        b_->gemm(velora::op::none, velora::op::transpose, T(1), x, g_, T(0), out);
    }
    void row_block(index_t first, matrix_view<T> out) const {
        for (index_t i = 0; i < out.rows; ++i) b_->copy(g_.row(first + i), out.row(i), g_.cols);
    }
    [[nodiscard]] const_matrix_view<T> view() const noexcept { return g_; }

private:
    B* b_;
    const_matrix_view<T> g_;
};

/// A VeLoRA gradient c·A·(I_g ⊗ vᵀ) (m×n with n = features). `scratch` holds the k×g
/// intermediate and grows on first use to the largest k×g seen.
template <optimizer_backend B>
class factored_gradient_operator {
public:
    using T = typename B::value_type;
    using buffer = typename B::template buffer<T>;
    factored_gradient_operator(B& b, const velora::factored_gradient<T>& f, buffer& scratch) : b_(&b), f_(f), scratch_(&scratch) {}

    [[nodiscard]] index_t rows() const noexcept { return f_.a.rows; }
    [[nodiscard]] index_t cols() const noexcept { return f_.features; }
    [[nodiscard]] index_t groups() const noexcept { return f_.a.cols; }

    [[nodiscard]] double norm2() const {
        // Columns of A that cover only padding do not contribute to G, but a NaN there must
        // still be reported: the sketch products read every column.
        const double all = b_->sum_of_squares(f_.a);
        if (!std::isfinite(all)) return all;
        const index_t s = f_.subtoken_size;
        const index_t full = std::min(f_.features / s, groups());   // groups made only of data
        const index_t tail = full < groups() ? std::min(f_.features - full * s, s) : 0;
        double sum = b_->sum_of_squares(f_.a.col_block(0, full));
        if (tail > 0) sum += b_->sum_of_squares(f_.a.col_block(full, 1)) * b_->sum_of_squares(const_matrix_view<T>(f_.v, 1, tail, tail));
        const double c = static_cast<double>(f_.scale);
        return c * c * sum;
    }

    /// Whether A, c and v are finite (failure paths only, see all_finite).
    [[nodiscard]] bool finite() const { return all_finite(*b_, f_); }

    void times(const_matrix_view<T> s, matrix_view<T> out) const {
        auto tmp = scratch_view(s.rows);
        b_->gemm(velora::op::none, velora::op::none, T(1), s, f_.a, T(0), tmp);
        b_->expand_subtokens(const_matrix_view<T>(tmp), f_.v, f_.subtoken_size, f_.scale, out);
    }
    void times_t(const_matrix_view<T> x, matrix_view<T> out) const {
        auto tmp = scratch_view(x.rows);
        velora::project_subtokens_unchecked(*b_, x, f_.v, f_.subtoken_size, tmp);   // finiteness: the optimizer's own checks
        b_->gemm(velora::op::none, velora::op::transpose, f_.scale, const_matrix_view<T>(tmp), f_.a, T(0), out);
    }
    void row_block(index_t first, matrix_view<T> out) const {
        b_->expand_subtokens(f_.a.row_block(first, out.rows), f_.v, f_.subtoken_size, f_.scale, out);
    }

private:
    matrix_view<T> scratch_view(index_t k) const {
        const auto need = static_cast<std::size_t>(k * groups());
        if (scratch_->size() < need) scratch_->resize(need);
        return {scratch_->data(), k, groups(), groups()};
    }

    B* b_;
    velora::factored_gradient<T> f_;
    buffer* scratch_;
};

/// The matrix whose leading left singular vectors form the basis: M = G (left side, len = m)
/// or M = Gᵀ (right side, len = n). Bases are stored as rows (r×len, orthonormal rows), so
///     projection    Ĝ = B·M      (r×other: Pᵀ G on the left, (G Qᵀ)ᵀ on the right)
///     back-project  ΔM = Bᵀ·N
/// and on the right the projected gradient and the moments are kept transposed (r×m), which
/// makes both sides the same code.
template <class Grad>
class side_matrix {
public:
    using T = typename Grad::T;
    side_matrix(const Grad& g, projection_side side) : g_(&g), side_(side) {}

    [[nodiscard]] projection_side side() const noexcept { return side_; }
    [[nodiscard]] index_t len() const noexcept { return side_ == projection_side::left ? g_->rows() : g_->cols(); }
    [[nodiscard]] index_t other() const noexcept { return side_ == projection_side::left ? g_->cols() : g_->rows(); }
    [[nodiscard]] double norm2() const { return g_->norm2(); }
    [[nodiscard]] bool finite() const { return g_->finite(); }
    /// out = S·M (S: k×len, out: k×other).
    void mul(const_matrix_view<T> s, matrix_view<T> out) const {
        if (side_ == projection_side::left) g_->times(s, out);
        else g_->times_t(s, out);
    }
    /// out = X·Mᵀ (X: k×other, out: k×len).
    void mul_t(const_matrix_view<T> x, matrix_view<T> out) const {
        if (side_ == projection_side::left) g_->times_t(x, out);
        else g_->times(x, out);
    }

private:
    const Grad* g_;
    projection_side side_;
};

/// A dense_gradient built by the host holds a view, checked as a dense gradient's view is (by
/// `fn`); any other gradient operator is the host's own.
template <optimizer_backend B, class Op>
void check_gradient_operator(const Op& grad, const char* fn) {
    if constexpr (std::is_same_v<Op, dense_gradient<B>>) velora::check_view(grad.view(), fn, "grad");
}

/// A VeLoRA factored gradient must describe parameter `id`'s rows×cols shape consistently
/// (std::invalid_argument from `fn` otherwise).
template <class T>
void check_factored_gradient(const velora::factored_gradient<T>& grad, index_t rows, index_t cols, index_t id, const char* fn) {
    velora::check_view(grad.a, fn, "grad.a");
    velora::detail::require(grad.a.rows == rows && grad.features == cols, fn, "argument 'grad' describes a ", grad.a.rows, "x", grad.features,
                            " gradient but parameter ", id, " is ", rows, "x", cols);
    velora::detail::require(grad.v != nullptr && grad.subtoken_size > 0, fn, "argument 'grad' is inconsistent: sub-token size s = ",
                            grad.subtoken_size, " must be > 0", grad.v ? "" : " (and v is null)");
    // s·G is formed with checked arithmetic: a product that wraps around could pass the check below.
    const index_t covered = velora::detail::checked_mul(grad.subtoken_size, grad.a.cols, fn, "grad.subtoken_size x grad.a.cols (s x G)");
    velora::detail::require(covered >= grad.features, fn, "argument 'grad' is inconsistent: ", grad.a.cols, " groups of s = ", grad.subtoken_size,
                            " cannot cover D = ", grad.features);
}

/// Whether A of a factored gradient holds a NaN/Inf. Every column of A is read by some product
/// (also those covering only padding), so a NaN anywhere in A is reported the same way on every
/// kind of step (and, collectively, on every rank).
template <optimizer_backend B>
bool factored_has_non_finite(B& b, const velora::factored_gradient<typename B::value_type>& grad) {
    return !std::isfinite(b.sum_of_squares(grad.a)) && !all_finite(b, grad.a);
}

} // namespace adarank
