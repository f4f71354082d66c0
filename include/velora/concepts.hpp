#pragma once
/// \file
/// The concepts that connect algorithms to backends and host frameworks.
///
/// `backend` is what the VeLoRA algorithms need from a device and nothing more: owning
/// buffers, copies to and from the host, a GEMM, and the four sub-token kernels of the
/// operator K = I_G ⊗ vᵀ (project X Kᵀ, expand A K, sum of sub-tokens, the SSF weighted
/// column sums) plus column sums, a per-column scale-and-shift and a seeded Gaussian fill. `eigen_backend<T>` implements it
/// on the CPU; `velora::cuda::cuda_backend<T>` (cuda/include) implements the same members on device memory, so one
/// implementation of each algorithm serves both.
#include <concepts>
#include <cstdint>

#include "core/error.hpp"
#include "core/storage.hpp"
#include "core/view.hpp"

namespace velora {

/// Transposition flag for GEMM operands.
enum class op : std::uint8_t { none, transpose };

/// Tag of an optional backend overload `project_subtokens(x, v, s, z, skip_finite_check)`: the
/// same Z without the finiteness report, for callers that never read it (a factored gradient's
/// products). A backend may leave it out (see project_subtokens_unchecked); on a GPU the report
/// costs a round trip to the host.
struct skip_finite_check_t {
    explicit skip_finite_check_t() = default;
};
inline constexpr skip_finite_check_t skip_finite_check{};

namespace detail {
template <class B, class U>
concept subtoken_kernels_for = requires(B& b, const_matrix_view<typename B::value_type> x, const_matrix_view<U> z,
                                        matrix_view<U> out_z, const typename B::value_type* v, index_t s,
                                        typename B::value_type scale, matrix_view<typename B::value_type> out,
                                        typename B::value_type* out_vec) {
    { b.project_subtokens(x, v, s, out_z) } -> std::same_as<bool>;
    b.expand_subtokens(z, v, s, scale, out);
    b.weighted_subtoken_column_sums(x, z, v, s, scale, out_vec);
    b.convert(z, out);
};
} // namespace detail

/// A compute backend over value type float or double.
template <class B>
concept backend =
    (std::same_as<typename B::value_type, float> || std::same_as<typename B::value_type, double>) &&
    requires { typename B::template buffer<typename B::value_type>; } &&
    requires(B& b, typename B::template buffer<typename B::value_type>& buf, op o, typename B::value_type alpha,
             const_matrix_view<typename B::value_type> a, matrix_view<typename B::value_type> c,
             const typename B::value_type* src, typename B::value_type* dst, index_t n, std::uint64_t seed) {
        buf.resize(std::size_t{});
        { buf.data() } -> std::same_as<typename B::value_type*>;
        b.gemm(o, o, alpha, a, a, alpha, c);
        b.column_sums(a, dst);
        b.scale_shift_columns(a, src, src, c);
        b.sum_subtokens(a, n, dst);
        b.fill_gaussian(seed, std::uint64_t{}, dst, n);
        b.copy(src, dst, n);
        b.copy_to_host(src, dst, n);
        b.copy_from_host(src, dst, n);
    } &&
    detail::subtoken_kernels_for<B, typename B::value_type> && detail::subtoken_kernels_for<B, float> &&
    detail::subtoken_kernels_for<B, half> && detail::subtoken_kernels_for<B, bfloat16>;

/// Z = X·Kᵀ (project_subtokens) where the caller does not need to know whether Z is finite:
/// through the backend's skip_finite_check overload when it has one, otherwise the checked call
/// with its answer dropped.
template <backend B, class U>
void project_subtokens_unchecked(B& b, const_matrix_view<typename B::value_type> x, const typename B::value_type* v, index_t s,
                                 matrix_view<U> z) {
    if constexpr (requires { b.project_subtokens(x, v, s, z, skip_finite_check); })
        b.project_subtokens(x, v, s, z, skip_finite_check);
    else
        (void)b.project_subtokens(x, v, s, z);
}

/// A backend whose reductions keep scratch sized on first use (the CPU backend's, per thread
/// part) and that can size it ahead: reserve_reductions(width) makes every column sum up to
/// `width` wide allocation-free. Optional; reserve_reductions_for() calls it where present.
template <class B>
concept reduction_reserving = backend<B> && requires(B& b, index_t width) {
    b.reserve_reductions(width);
    { B::reduction_workspace_bytes(width) } -> std::same_as<std::size_t>;
};

/// What a reserve() of the library calls for its backend: sizes the reductions' scratch where
/// the backend has one (nothing otherwise).
template <backend B>
void reserve_reductions_for(B& b, index_t width) {
    if constexpr (reduction_reserving<B>) b.reserve_reductions(width);
}

} // namespace velora

namespace velora {

/// An activation compressor: keeps a record of its input in the forward pass and turns it,
/// with the output gradient, into a (factored) weight gradient in the backward pass.
/// `velora::compressor<B>` is the library's; a host can plug in its own.
template <class C>
concept activation_compressor = requires(C& c, typename C::record_type& out, const typename C::record_type& rec,
                                         const_matrix_view<typename C::value_type> x,
                                         matrix_view<typename C::value_type> grad) {
    { c.compress(x, out) } -> std::same_as<status>;
    c.gradient_factor(rec, x, grad);      // the factor A = dYᵀZ of dW (the old spelling is not accepted: deprecated.hpp)
    c.expand_weight_grad(rec, x, grad);   // dense gradient dW on request
    { rec.bytes() } -> std::convertible_to<std::size_t>;
};

} // namespace velora
