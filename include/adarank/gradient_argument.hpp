#pragma once
/// \file
/// The forms in which a host may hand `low_rank_adamw::step` a weight gradient, and the one
/// adaptation that turns each into a gradient_operator (gradient.hpp): a dense view (a
/// dense_gradient), a VeLoRA layer's factored gradient (a factored_gradient_operator over the
/// optimizer's workspace), or any gradient_operator (itself); and each form's argument checks.
/// Its own file so that `step` and the data-parallel phases are each one function over gradient
/// operators and a new form is one overload per function here, not another `step`.
#include <algorithm>
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

/// The checks of an output `out` a phase writes while it reads `grad` (std::invalid_argument
/// from `fn`, before anything is computed): a view check_view accepts, in no memory of the
/// gradient's values (for a factored gradient: A and the entries of v the kernels read; for a
/// gradient operator: a dense_gradient's view, nothing for an operator whose memory is its own).
template <optimizer_backend B>
void check_output_argument(matrix_view<typename B::value_type> out, const_matrix_view<typename B::value_type> grad, const char* fn) {
    velora::check_view(out, fn, "out");
    velora::check_no_alias(out, "out", grad, "grad", fn);
}
template <optimizer_backend B>
void check_output_argument(matrix_view<typename B::value_type> out, const velora::factored_gradient<typename B::value_type>& grad, const char* fn) {
    using T = typename B::value_type;
    velora::check_view(out, fn, "out");
    velora::check_no_alias(out, "out", grad.a, "grad.a", fn);
    const index_t used = std::min(grad.subtoken_size, grad.features);   // the entries of v the kernels read
    velora::check_no_alias(out, "out", const_matrix_view<T>(grad.v, 1, used, used), "grad.v", fn);
}
template <optimizer_backend B, gradient_operator Op>
void check_output_argument(matrix_view<typename B::value_type> out, const Op& grad, const char* fn) {
    velora::check_view(out, fn, "out");
    if constexpr (std::is_same_v<Op, dense_gradient<B>>) velora::check_no_alias(out, "out", grad.view(), "grad", fn);
}

/// Whether the gradient is known not to be finite before any product is formed, on any rank of
/// `comm` (collective for a factored gradient, whose A is checked up front so that a rank whose A
/// holds a NaN makes every rank return non_finite_input; the other forms are found by the step's
/// own norms, so this is false for them and nothing is communicated).
template <optimizer_backend B, class Grad, class C>
bool non_finite_before_products(B& b, const Grad& grad, C& comm) {
    if constexpr (std::is_same_v<Grad, velora::factored_gradient<typename B::value_type>>) return comm.any(factored_has_non_finite(b, grad));
    else return false;
}

} // namespace adarank
