#pragma once
/// \file
/// The exact parts of a linear layer y = x Wᵀ + b and of a scale-and-shift (SSF) layer
/// y = x ⊙ w + b, for hosts that let the library run the whole layer. VeLoRA changes only the
/// weight gradient (see compressor.hpp); the input and bias gradients below are exact and
/// need no stored activations. `dense_weight_grad` is the uncompressed dW = dYᵀX, the
/// baseline VeLoRA replaces.
///
/// Outputs may not share memory with inputs (std::invalid_argument naming both): a product
/// written over its own operand, or a bias read after the output overwrote it, gives wrong
/// numbers silently. The one exception is documented where it is: the SSF helpers work in
/// place when the output is exactly the input (same pointer and leading dimension), because
/// every output element depends only on the input element at the same position. Memory is
/// compared by address range (view.hpp's `overlaps`), so two strided views that interleave
/// without sharing an element are rejected too.
#include "concepts.hpp"
#include "core/error.hpp"
#include "core/view.hpp"

namespace velora {

namespace detail {

// The D (or O) elements of a per-column vector as a one-row view, for the overlap checks.
template <class T>
const_matrix_view<T> vector_view(const T* p, index_t n) noexcept {
    return {p, 1, n, n};
}

// An element-wise output may be its input exactly; any other overlap is rejected.
template <class T>
void check_elementwise_alias(const matrix_view<T>& out, std::string_view out_name, const const_matrix_view<T>& in,
                             std::string_view in_name, std::string_view function) {
    if (out.data == in.data && out.ld == in.ld) return;
    check_no_alias(out, out_name, in, in_name, function);
}

} // namespace detail

/// Y = X Wᵀ + b (T×O); `bias` (O elements) may be null. `y` may not overlap x, w or bias.
template <backend B>
void linear_forward(B& b, const_matrix_view<typename B::value_type> x, const_matrix_view<typename B::value_type> w,
                    const typename B::value_type* bias, matrix_view<typename B::value_type> y) {
    using T = typename B::value_type;
    constexpr const char* fn = "velora::linear_forward";
    check_view(w, fn, "w");
    check_shape(x, x.rows, w.cols, fn, "x");
    check_shape(y, x.rows, w.rows, fn, "y");
    check_no_alias(y, "y", x, "x", fn);
    check_no_alias(y, "y", w, "w", fn);
    if (bias) check_no_alias(y, "y", detail::vector_view(bias, w.rows), "bias", fn);
    b.gemm(op::none, op::transpose, T(1), x, w, T(0), y);
    if (bias) b.scale_shift_columns(y, nullptr, bias, y);
}

/// dX = dY W (T×D): exact, VeLoRA or not. `dx` may not overlap dy or w.
template <backend B>
void linear_input_grad(B& b, const_matrix_view<typename B::value_type> dy, const_matrix_view<typename B::value_type> w,
                       matrix_view<typename B::value_type> dx) {
    using T = typename B::value_type;
    constexpr const char* fn = "velora::linear_input_grad";
    check_view(w, fn, "w");
    check_shape(dy, dy.rows, w.rows, fn, "dy");
    check_shape(dx, dy.rows, w.cols, fn, "dx");
    check_no_alias(dx, "dx", dy, "dy", fn);
    check_no_alias(dx, "dx", w, "w", fn);
    b.gemm(op::none, op::none, T(1), dy, w, T(0), dx);
}

/// dW = dYᵀ X (O×D): the uncompressed weight gradient (needs the full X). `dw` may not overlap
/// dy or x.
template <backend B>
void dense_weight_grad(B& b, const_matrix_view<typename B::value_type> dy, const_matrix_view<typename B::value_type> x,
                       matrix_view<typename B::value_type> dw) {
    using T = typename B::value_type;
    constexpr const char* fn = "velora::dense_weight_grad";
    check_view(dy, fn, "dy");
    check_shape(x, dy.rows, x.cols, fn, "x");
    check_shape(dw, dy.cols, x.cols, fn, "dw");
    check_no_alias(dw, "dw", dy, "dy", fn);
    check_no_alias(dw, "dw", x, "x", fn);
    b.gemm(op::transpose, op::none, T(1), dy, x, T(0), dw);
}

/// db = Σ_t dY[t, :] (O elements): exact for a linear or SSF layer; VeLoRA's scale never
/// applies. `db` may not overlap dy.
template <backend B>
void bias_grad(B& b, const_matrix_view<typename B::value_type> dy, typename B::value_type* db) {
    constexpr const char* fn = "velora::bias_grad";
    check_view(dy, fn, "dy");
    detail::require(db != nullptr, fn, "argument 'db' is null");
    check_no_alias(matrix_view<typename B::value_type>(db, 1, dy.cols), "db", dy, "dy", fn);
    b.column_sums(dy, db);
}

/// SSF forward: Y = X ⊙ w + b, w and b of D elements (b may be null). `y` may be `x` exactly
/// (in place); otherwise it may not overlap x, and it never may overlap w or b.
template <backend B>
void ssf_forward(B& b, const_matrix_view<typename B::value_type> x, const typename B::value_type* w,
                 const typename B::value_type* bias, matrix_view<typename B::value_type> y) {
    constexpr const char* fn = "velora::ssf_forward";
    check_view(x, fn, "x");
    check_shape(y, x.rows, x.cols, fn, "y");
    detail::require(w != nullptr, fn, "argument 'w' is null");
    detail::check_elementwise_alias(y, "y", x, "x", fn);
    check_no_alias(y, "y", detail::vector_view(w, x.cols), "w", fn);
    if (bias) check_no_alias(y, "y", detail::vector_view(bias, x.cols), "bias", fn);
    b.scale_shift_columns(x, w, bias, y);
}

/// SSF input gradient: dX = dY ⊙ w (exact). `dx` may be `dy` exactly (in place); otherwise it
/// may not overlap dy, and it never may overlap w.
template <backend B>
void ssf_input_grad(B& b, const_matrix_view<typename B::value_type> dy, const typename B::value_type* w,
                    matrix_view<typename B::value_type> dx) {
    constexpr const char* fn = "velora::ssf_input_grad";
    check_view(dy, fn, "dy");
    check_shape(dx, dy.rows, dy.cols, fn, "dx");
    detail::require(w != nullptr, fn, "argument 'w' is null");
    detail::check_elementwise_alias(dx, "dx", dy, "dy", fn);
    check_no_alias(dx, "dx", detail::vector_view(w, dy.cols), "w", fn);
    b.scale_shift_columns(dy, w, nullptr, dx);
}

} // namespace velora
