#pragma once
/// \file
/// The forms in which a host may hand `low_rank_adamw::step` a weight gradient, and the one
/// adaptation that turns each into a gradient_operator (gradient.hpp): a dense view (a
/// dense_gradient), a VeLoRA layer's factored gradient (a factored_gradient_operator over the
/// optimizer's workspace), or any gradient_operator (itself). Its own file so that `step` is one
/// function over gradient operators and a new form is one overload here, not another `step`.
#include <concepts>
#include <type_traits>

#include <velora/compressor.hpp>
#include <velora/core/checked.hpp>
#include <velora/core/error.hpp>

#include "backend.hpp"
#include "gradient.hpp"

namespace adarank {

/// A dense gradient view (rows×cols, backend memory) as an operator over it.
template <optimizer_backend B>
dense_gradient<B> as_gradient_operator(B& b, const_matrix_view<typename B::value_type> grad, typename B::template buffer<typename B::value_type>&) {
    return dense_gradient<B>(b, grad);
}
/// A VeLoRA factored gradient c·A·(I_g ⊗ vᵀ) as an operator; `scratch` holds its k×g products.
template <optimizer_backend B>
factored_gradient_operator<B> as_gradient_operator(B& b, const velora::factored_gradient<typename B::value_type>& grad,
                                             typename B::template buffer<typename B::value_type>& scratch) {
    return factored_gradient_operator<B>(b, grad, scratch);
}
/// A gradient operator is already one.
template <optimizer_backend B, gradient_operator Op>
const Op& as_gradient_operator(B&, const Op& grad, typename B::template buffer<typename B::value_type>&) {
    return grad;
}

/// What `step` accepts as a gradient: whatever as_gradient_operator adapts.
template <class Grad, class B>
concept gradient_argument = optimizer_backend<B> && requires(B& b, const Grad& g, typename B::template buffer<typename B::value_type>& scratch) {
    { as_gradient_operator(b, g, scratch) };
};

/// The argument checks of each form against parameter `id`'s rows×cols, std::invalid_argument
/// from `fn` naming 'grad' (before anything is computed).
template <optimizer_backend B>
void check_gradient_argument(const_matrix_view<typename B::value_type> grad, index_t rows, index_t cols, index_t, const char* fn) {
    velora::check_shape(grad, rows, cols, fn, "grad");
}
template <optimizer_backend B>
void check_gradient_argument(const velora::factored_gradient<typename B::value_type>& grad, index_t rows, index_t cols, index_t id, const char* fn) {
    check_factored_gradient(grad, rows, cols, id, fn);
}
template <optimizer_backend B, gradient_operator Op>
void check_gradient_argument(const Op& grad, index_t rows, index_t cols, index_t id, const char* fn) {
    check_gradient_operator<B>(grad, fn);
    velora::detail::require(grad.rows() == rows && grad.cols() == cols, fn, "argument 'grad' is ", grad.rows(), "x", grad.cols(), " but parameter ",
                            id, " is ", rows, "x", cols);
}

} // namespace adarank
