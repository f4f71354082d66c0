#pragma once
/// \file
/// The exact parts of a linear layer y = x Wᵀ + b and of a scale-and-shift (SSF) layer
/// y = x ⊙ w + b, for hosts that let the library run the whole layer. VeLoRA changes only the
/// weight gradient (see compressor.hpp); the input and bias gradients below are exact and
/// need no stored activations. `dense_weight_grad` is the uncompressed dW = dYᵀX, the
/// baseline VeLoRA replaces.
#include "concepts.hpp"
#include "core/error.hpp"
#include "core/view.hpp"

namespace velora {

/// Y = X Wᵀ + b (T×O); `bias` (O elements) may be null.
template <backend B>
void linear_forward(B& b, const_matrix_view<typename B::value_type> x, const_matrix_view<typename B::value_type> w,
                    const typename B::value_type* bias, matrix_view<typename B::value_type> y) {
    using T = typename B::value_type;
    constexpr const char* fn = "velora::linear_forward";
    check_view(w, fn, "w");
    check_shape(x, x.rows, w.cols, fn, "x");
    check_shape(y, x.rows, w.rows, fn, "y");
    b.gemm(op::none, op::transpose, T(1), x, w, T(0), y);
    if (bias) b.scale_shift_columns(y, nullptr, bias, y);
}

/// dX = dY W (T×D): exact, VeLoRA or not.
template <backend B>
void linear_input_grad(B& b, const_matrix_view<typename B::value_type> dy, const_matrix_view<typename B::value_type> w,
                       matrix_view<typename B::value_type> dx) {
    using T = typename B::value_type;
    constexpr const char* fn = "velora::linear_input_grad";
    check_view(w, fn, "w");
    check_shape(dy, dy.rows, w.rows, fn, "dy");
    check_shape(dx, dy.rows, w.cols, fn, "dx");
    b.gemm(op::none, op::none, T(1), dy, w, T(0), dx);
}

/// dW = dYᵀ X (O×D): the uncompressed weight gradient (needs the full X).
template <backend B>
void dense_weight_grad(B& b, const_matrix_view<typename B::value_type> dy, const_matrix_view<typename B::value_type> x,
                       matrix_view<typename B::value_type> dw) {
    using T = typename B::value_type;
    constexpr const char* fn = "velora::dense_weight_grad";
    check_view(dy, fn, "dy");
    check_shape(x, dy.rows, x.cols, fn, "x");
    check_shape(dw, dy.cols, x.cols, fn, "dw");
    b.gemm(op::transpose, op::none, T(1), dy, x, T(0), dw);
}

/// db = Σ_t dY[t, :] (O elements): exact for a linear or SSF layer; VeLoRA's scale never applies.
template <backend B>
void bias_grad(B& b, const_matrix_view<typename B::value_type> dy, typename B::value_type* db) {
    constexpr const char* fn = "velora::bias_grad";
    check_view(dy, fn, "dy");
    detail::require(db != nullptr, fn, "argument 'db' is null");
    b.column_sums(dy, db);
}

/// SSF forward: Y = X ⊙ w + b, w and b of D elements (b may be null).
template <backend B>
void ssf_forward(B& b, const_matrix_view<typename B::value_type> x, const typename B::value_type* w,
                 const typename B::value_type* bias, matrix_view<typename B::value_type> y) {
    constexpr const char* fn = "velora::ssf_forward";
    check_view(x, fn, "x");
    check_shape(y, x.rows, x.cols, fn, "y");
    detail::require(w != nullptr, fn, "argument 'w' is null");
    b.scale_shift_columns(x, w, bias, y);
}

/// SSF input gradient: dX = dY ⊙ w (exact).
template <backend B>
void ssf_input_grad(B& b, const_matrix_view<typename B::value_type> dy, const typename B::value_type* w,
                    matrix_view<typename B::value_type> dx) {
    constexpr const char* fn = "velora::ssf_input_grad";
    check_view(dy, fn, "dy");
    check_shape(dx, dy.rows, dy.cols, fn, "dx");
    detail::require(w != nullptr, fn, "argument 'w' is null");
    b.scale_shift_columns(dy, w, nullptr, dx);
}

} // namespace velora
