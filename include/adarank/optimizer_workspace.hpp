#pragma once
/// \file
/// The scratch `low_rank_adamw` shares between all its parameters (backend memory), sized for
/// the largest one as parameters are registered, so that a steady-state step allocates nothing:
///   - the low-rank step's projection (r×other), the transported moments and the next basis of
///     a refresh (r×other, r×len), and the r×r rotations of the moment transport;
///   - the products of a VeLoRA factored gradient (fused), and a dense parameter's expanded
///     gradient when it arrives in another form;
///   - data-parallel: the energy pass's row blocks and all_reduce_mean's bucket.
/// The randomized SVD's workspace is the subspace finder's own (rsvd.hpp).
#include <cstddef>

#include "backend.hpp"

namespace adarank {

template <optimizer_backend B>
struct optimizer_workspace {
    using T = typename B::value_type;
    using buffer = typename B::template buffer<T>;

    buffer projection, m_next, v_next, basis_next;   ///< low-rank step and refresh
    buffer rotation, rotation_squared;               ///< moment transport, r×r each
    buffer fused;                                    ///< a factored gradient's products
    buffer dense_gradient;                           ///< a dense parameter's expanded gradient
    buffer reduce, bucket;                           ///< data-parallel: energy pass, all_reduce_mean

    /// Sizes the low-rank buffers for a parameter whose basis rows are `len` long, moments `other`
    /// wide, of rank at most r_cap (grows only).
    void reserve_low_rank(index_t len, index_t other, index_t r_cap) {
        grow(projection, r_cap * other);
        grow(m_next, r_cap * other);
        grow(v_next, r_cap * other);
        grow(basis_next, r_cap * len);
        grow(rotation, r_cap * r_cap);
        grow(rotation_squared, r_cap * r_cap);
    }

    /// Bytes held (capacities).
    [[nodiscard]] std::size_t bytes() const noexcept {
        return (projection.capacity() + m_next.capacity() + v_next.capacity() + basis_next.capacity() + rotation.capacity() +
                rotation_squared.capacity() + fused.capacity() + dense_gradient.capacity() + reduce.capacity() + bucket.capacity()) *
               sizeof(T);
    }

    /// Grows `buf` to at least n elements (never shrinks; contents are not kept on growth).
    static void grow(buffer& buf, index_t n) {
        if (buf.size() < static_cast<std::size_t>(n)) buf.resize(static_cast<std::size_t>(n));
    }
    static matrix_view<T> view(buffer& buf, index_t rows, index_t cols) { return {buf.data(), rows, cols, cols}; }
};

} // namespace adarank
