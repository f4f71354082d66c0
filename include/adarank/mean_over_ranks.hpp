#pragma once
/// \file
/// `mean_over_ranks`: the gradient operator of Ḡ = (1/P)·Σ_p G_p, the mean of the gradients the
/// P ranks of a data-parallel run hold, built from each rank's own operator and a communicator.
///
/// Everything the optimizer does with a gradient is a product with a block of vectors (the
/// projection B·M, the sketch products of the randomized SVD) and these are linear in G: each
/// rank forms the product with its own G_p, and an all-reduce of the (small) result gives every
/// rank the product with Ḡ, bit for bit the same on every rank (the communicator's promise).
/// Identical inputs and the backend's deterministic arithmetic then give identical bases, ranks,
/// moments and weights everywhere. The one quantity that is not linear is ‖Ḡ‖²: it is formed
/// from Ḡ's rows, reduced a block at a time (a full gradient's worth of communication, which
/// the optimizer asks for only when it searches a new subspace). Finiteness is a collective
/// "any rank".
///
/// `bytes()` counts what this rank contributed to all-reduces (elements × sizeof(T)).
#include <algorithm>
#include <cstdint>
#include <span>

#include <velora/distributed/communicator.hpp>

#include "backend.hpp"
#include "gradient.hpp"

namespace adarank {

/// out ← (1/P)·Σ_p out_p in place (backend memory; row by row when the view is strided): the one
/// reduction every data-parallel path of the optimizer uses. The same bits on every rank when the
/// communicator keeps its promise (the scaling is the same operation everywhere).
template <optimizer_backend B, velora::communicator C>
void reduce_to_mean(B& b, C& comm, matrix_view<typename B::value_type> out) {
    using T = typename B::value_type;
    if (out.ld == out.cols || out.rows <= 1) {
        comm.all_reduce_sum(std::span<T>(out.data, static_cast<std::size_t>(out.size())));
    } else {
        for (index_t i = 0; i < out.rows; ++i) comm.all_reduce_sum(std::span<T>(out.row(i), static_cast<std::size_t>(out.cols)));
    }
    if (comm.size() > 1) b.scale(out, T(1) / static_cast<T>(comm.size()));
}

template <optimizer_backend B, gradient_operator Local, velora::communicator C>
class mean_over_ranks {
public:
    using T = typename B::value_type;
    using buffer = typename B::template buffer<T>;

    /// `scratch` holds the row blocks of the energy pass (grown on first use to at most 2²⁰
    /// elements); `bytes` is incremented by every all-reduce.
    mean_over_ranks(B& b, const Local& local, C& comm, buffer& scratch, std::uint64_t& bytes)
        : b_(&b), local_(&local), comm_(&comm), scratch_(&scratch), bytes_(&bytes) {}

    [[nodiscard]] index_t rows() const { return local_->rows(); }
    [[nodiscard]] index_t cols() const { return local_->cols(); }

    void times(const_matrix_view<T> s, matrix_view<T> out) const {
        local_->times(s, out);
        mean(out);
    }
    void times_t(const_matrix_view<T> x, matrix_view<T> out) const {
        local_->times_t(x, out);
        mean(out);
    }
    void row_block(index_t first, matrix_view<T> out) const {
        local_->row_block(first, out);
        mean(out);
    }

    /// ‖Ḡ‖_F², the same double on every rank: Ḡ's rows are reduced in blocks and summed in order.
    /// With one rank, the local operator's own (so a 1-rank run is bit-identical to one process).
    [[nodiscard]] double norm2() const {
        if (comm_->size() == 1) return local_->norm2();
        const index_t n = cols();
        const index_t block = std::clamp<index_t>((index_t{1} << 20) / std::max<index_t>(n, 1), 1, rows());
        if (scratch_->size() < static_cast<std::size_t>(block * n)) scratch_->resize(static_cast<std::size_t>(block * n));
        double sum = 0;
        for (index_t first = 0; first < rows(); first += block) {
            const index_t count = std::min(block, rows() - first);
            matrix_view<T> part{scratch_->data(), count, n, n};
            row_block(first, part);
            sum += b_->sum_of_squares(part);
        }
        return sum;
    }

    /// Whether every rank's inputs are finite (a collective; failure paths only).
    [[nodiscard]] bool finite() const { return !comm_->any(!local_->finite()); }

private:
    void mean(matrix_view<T> out) const {
        reduce_to_mean(*b_, *comm_, out);
        *bytes_ += static_cast<std::uint64_t>(out.size()) * sizeof(T);
    }

    B* b_;
    const Local* local_;
    C* comm_;
    buffer* scratch_;
    std::uint64_t* bytes_;
};

} // namespace adarank
