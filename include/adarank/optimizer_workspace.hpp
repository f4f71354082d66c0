#pragma once
/// \file
/// The scratch `low_rank_adamw` shares between all its parameters (backend memory), sized for
/// the largest one as parameters are registered, so that a steady-state step allocates nothing:
///   - the low-rank step's projection (r×other), the transported moments and the next basis of
///     a refresh (r×other, r×len), and the r×r rotations of the moment transport;
///   - the products of a VeLoRA factored gradient (fused), and a dense parameter's expanded
///     gradient when it arrives in another form;
///   - data-parallel: the energy pass's row blocks and all_reduce_mean's bucket;
///   - a bf16 weight widened to float for its step (bf16_weight_steps.hpp).
/// The randomized SVD's workspace is the subspace finder's own (rsvd.hpp).
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "backend.hpp"
#include "basis_format.hpp"

namespace adarank {

/// What a host will do beyond plain steps, so that `low_rank_adamw::reserve` can size the
/// workspace up front (and `workspace_bytes(plan)` say how much that is before anything is held).
struct workspace_plan {
    index_t factored_groups = 0;       ///< the most groups G of any VeLoRA factored gradient a step will get (0: none)
    bool data_parallel = false;        ///< steps with a communicator of more than one rank
    index_t bucket_elements = 0;       ///< all_reduce_mean's bucket_elements (0: all_reduce_mean is not used)
    bool bf16_weights = false;         ///< steps with a bf16 weight (CPU backend in float): a float copy of the largest weight
};

template <optimizer_backend B>
struct optimizer_workspace {
    using T = typename B::value_type;
    using buffer = typename B::template buffer<T>;

    buffer projection, m_next, v_next, basis_next;   ///< low-rank step and refresh
    buffer rotation, rotation_squared;               ///< moment transport, r×r each
    buffer fused;                                    ///< a factored gradient's products
    buffer dense_gradient;                           ///< a dense parameter's expanded gradient
    buffer reduce, bucket;                           ///< data-parallel: energy pass, all_reduce_mean
    buffer m_old, v_old;                             ///< 8-bit low-rank moments dequantised for the transport and the exact path
    buffer bf16_widened;                             ///< a bf16 weight widened to float (rows×cols, host memory)
    /// A quantised basis decoded for the step that runs in it (r×len: one basis, the largest, for
    /// all parameters; decoded once per step, O(r·len) beside the projection's O(r·len·other)),
    /// and a refresh's new basis encoded before it is committed (host memory).
    buffer basis_now;
    quantized_basis basis_codes_next;

    /// Whose basis basis_now holds: the parameter's state (its address) at its step and refresh
    /// counts when it was decoded. A parameter's basis changes only where its refresh count does
    /// (install_subspace) or where the parameter table is rebuilt (registration, which may move
    /// the states, and load_state, which replaces them: both forget the mark), so a decode is
    /// reused exactly while the mark matches: project_gradient's decode by the
    /// step_with_reduced_projection that follows, and a step's by its own refresh. Any other
    /// parameter's decode overwrites the mark.
    struct decoded_basis_mark {
        const void* parameter = nullptr;
        std::uint64_t step = 0, refreshes = 0;
        friend bool operator==(const decoded_basis_mark&, const decoded_basis_mark&) = default;
    };
    decoded_basis_mark basis_now_holds;
    void forget_decoded_basis() noexcept { basis_now_holds = {}; }

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

    /// Sizes the buffers that hold a low-rank parameter's 8-bit moments as floats (n = r_cap·other).
    void reserve_dequantized(index_t n) {
        grow(m_old, n);
        grow(v_old, n);
    }

    /// Sizes the buffers of a quantised basis of rows `len` long and rank at most r_cap (grows only).
    void reserve_quantized_basis(basis_format format, index_t len, index_t r_cap, index_t block) {
        grow(basis_now, r_cap * len);
        quantized_basis sizing;
        sizing.configure(format, len, block);
        basis_codes_next.reserve_bytes(static_cast<std::size_t>(r_cap * sizing.row_bytes()), static_cast<std::size_t>(r_cap * sizing.blocks_per_row()));
    }

    /// Element counts of the buffers a plan needs for parameters of the given shapes: the rows of
    /// X in a factored gradient's products are at most min(rows, cols) (a sketch, a basis, or the
    /// exact path's full set), a dense parameter fed anything but a dense view expands it, the
    /// energy pass of a data-parallel refresh reads row blocks of about 2²⁰ elements, and the
    /// bucket holds the gradients smaller than it; a bf16 weight is widened whole.
    struct planned_sizes {
        index_t fused = 0, dense_gradient = 0, reduce = 0, bucket = 0, bf16_widened = 0;
    };
    template <class Parameters>
    static planned_sizes plan_sizes(const Parameters& parameters, const workspace_plan& plan) {
        planned_sizes n;
        for (const auto& l : parameters) {
            const index_t size = l.rows * l.cols;
            if (l.low_rank) {
                if (plan.factored_groups > 0) n.fused = std::max(n.fused, std::min(l.rows, l.cols) * plan.factored_groups);
                if (plan.data_parallel) {
                    const index_t block = std::clamp<index_t>((index_t{1} << 20) / std::max<index_t>(l.cols, 1), 1, l.rows);
                    n.reduce = std::max(n.reduce, block * l.cols);
                }
            } else if (plan.factored_groups > 0 || plan.data_parallel) {
                n.dense_gradient = std::max(n.dense_gradient, size);
            }
            if (plan.bucket_elements > 0 && size < plan.bucket_elements) n.bucket = std::min(plan.bucket_elements, n.bucket + size);
            if (plan.bf16_weights) n.bf16_widened = std::max(n.bf16_widened, size);
        }
        return n;
    }

    /// Grows the buffers to what `plan` needs (never shrinks).
    template <class Parameters>
    void reserve(const Parameters& parameters, const workspace_plan& plan) {
        const planned_sizes n = plan_sizes(parameters, plan);
        grow(fused, n.fused);
        grow(dense_gradient, n.dense_gradient);
        grow(reduce, n.reduce);
        grow(bucket, n.bucket);
        grow(bf16_widened, n.bf16_widened);
    }

    /// bytes() after reserve(parameters, plan), computed without allocating.
    template <class Parameters>
    [[nodiscard]] std::size_t bytes_after(const Parameters& parameters, const workspace_plan& plan) const {
        const planned_sizes n = plan_sizes(parameters, plan);
        const auto after = [](const buffer& b, index_t need) { return std::max(b.capacity(), static_cast<std::size_t>(need)); };
        return bytes() + (after(fused, n.fused) - fused.capacity() + after(dense_gradient, n.dense_gradient) - dense_gradient.capacity() +
                          after(reduce, n.reduce) - reduce.capacity() + after(bucket, n.bucket) - bucket.capacity() +
                          after(bf16_widened, n.bf16_widened) - bf16_widened.capacity()) *
                             sizeof(T);
    }

    /// Bytes held (capacities).
    [[nodiscard]] std::size_t bytes() const noexcept {
        return (projection.capacity() + m_next.capacity() + v_next.capacity() + basis_next.capacity() + rotation.capacity() +
                rotation_squared.capacity() + fused.capacity() + dense_gradient.capacity() + reduce.capacity() + bucket.capacity() + m_old.capacity() +
                v_old.capacity() + basis_now.capacity() + bf16_widened.capacity()) *
                   sizeof(T) +
               basis_codes_next.reserved_bytes();
    }

    /// Grows `buf` to at least n elements (never shrinks; contents are not kept on growth).
    static void grow(buffer& buf, index_t n) {
        if (buf.size() < static_cast<std::size_t>(n)) buf.resize(static_cast<std::size_t>(n));
    }
    static matrix_view<T> view(buffer& buf, index_t rows, index_t cols) { return {buf.data(), rows, cols, cols}; }
};

} // namespace adarank
