#pragma once
/// \file
/// `optimizer_backend`: what AdaRankGrad needs from a device on top of velora's `backend`.
///
/// A refinement, not a second interface: the GEMM, the Gaussian fill, the copies and the
/// sub-token kernels (for gradients in VeLoRA's factored form) come from `velora::backend`;
/// this adds the orthonormalisation of a row block, the SVD of a wide k×n sketch, a Frobenius
/// reduction, the element-wise Adam(W) updates and six small helpers. `velora::eigen_backend`
/// satisfies it, and so does `velora::cuda::cuda_backend` (cuda/include) on device memory.
#include <concepts>

#include <velora/backend/rules/adam_element.hpp>
#include <velora/concepts.hpp>

namespace adarank {

using velora::const_matrix_view;
using velora::index_t;
using velora::matrix_view;

template <class B>
concept optimizer_backend =
    velora::backend<B> &&
    requires(B& b, matrix_view<typename B::value_type> a, const_matrix_view<typename B::value_type> c, double* host_sigma,
             typename B::value_type x, const velora::rules::adamw_terms<typename B::value_type>& terms) {
        b.orthonormalize_rows(a);              // rows of a made orthonormal, same row space
        b.gram_svd(c, a, host_sigma);          // left singular vectors and values of a wide k×n matrix
        { b.sum_of_squares(c) } -> std::same_as<double>;
        b.adam_moments(c, a, a, x, x, x, a);   // m, v update and n = m / (√v + ε)
        b.adamw_update(a, c, a, a, terms);     // dense AdamW in one pass, in terms.order's order of operations
        b.square(c, a);
        b.clamp_nonnegative(a);
        b.fill(a, x);
        b.scale(a, x);
        b.set_identity(a);
        b.canonicalize_row_signs(a);
    };

/// Backends whose memory the host can read and write in place and whose steps run in float: the
/// CPU backend, eigen_backend<float>, which reports its thread count. What the bf16-weight steps
/// (bf16_weights.hpp) and a quantised basis (decoded on the host: basis_format.hpp) need.
template <class B>
concept host_float_backend = std::same_as<typename B::value_type, float> && requires(const B& b) {
    { b.threads() } -> std::convertible_to<int>;
};

} // namespace adarank
