#pragma once
/// \file
/// The public data-parallel surface of `low_rank_adamw` besides `step` with a communicator: the
/// step in phases, for a host that runs the steady-state collective itself (started as soon as
/// a layer's gradient exists and overlapped with the rest of the backward pass), and the bucketed
/// mean of dense gradients. Its own file because only a data-parallel host calls these; the work
/// they do is data_parallel.hpp's and the step's.
///
///   1. projection_to_reduce(id): r×other, or std::nullopt when the next step needs the
///      gradient itself;
///   2. project_gradient(id, grad, out): out = B·M of this rank's gradient (local);
///   3. the host reduces `out` to the mean over ranks (same bits on every rank);
///   4. step_with_reduced_projection(id, weight, reduced, grad, comm): decides the refresh from
///      the reduced projection and updates; only a step that finds a new subspace reads `grad`
///      again, through `comm` (collective).
/// The result is bit for bit that of step(id, weight, grad, comm) when the host's reduction
/// gives the same bits as the communicator's (tests/test_distributed.cpp).
///
/// A CRTP base of low_rank_adamw (`Derived`), which befriends it.
#include <algorithm>
#include <optional>
#include <span>
#include <utility>

#include <velora/compressor.hpp>
#include <velora/core/checked.hpp>
#include <velora/core/error.hpp>
#include <velora/distributed/communicator.hpp>

#include "backend.hpp"
#include "data_parallel.hpp"
#include "gradient.hpp"
#include "low_rank_step.hpp"   // current_basis

namespace adarank {

template <class Derived, optimizer_backend B>
class data_parallel_phases {
public:
    using T = typename B::value_type;
    using status = velora::status;

    /// The shape (rank × other) of the projection `project_gradient` writes for the next step of
    /// low-rank parameter `id`, or std::nullopt when that step searches a new subspace whatever
    /// the gradient (the first step, or a refresh due by the step count): call step with a
    /// communicator then.
    [[nodiscard]] std::optional<std::pair<index_t, index_t>> projection_to_reduce(index_t id) const {
        constexpr const char* fn = "adarank::low_rank_adamw::projection_to_reduce";
        const Derived& self = static_cast<const Derived&>(*this);
        const auto& l = self.checked_layer(id, fn);
        velora::detail::require(l.low_rank, fn, "parameter ", id, " is optimised densely");
        if (l.rank == 0 || self.config_.refresh.due_by_count(l.steps_in_subspace())) return std::nullopt;
        return std::pair<index_t, index_t>{l.rank, l.other};
    }

    /// Phase 1, local: out = B·M for this rank's gradient (rank×other, backend memory). Throws
    /// std::invalid_argument, before anything is computed, for a view of `grad` or `out` that
    /// check_view refuses, an `out` that shares memory with the gradient, a gradient of another
    /// shape than the parameter's, when projection_to_reduce(id) is std::nullopt, or when `out`
    /// has another shape.
    template <gradient_operator Op>
    void project_gradient(index_t id, const Op& grad, matrix_view<T> out) {
        constexpr const char* fn = "adarank::low_rank_adamw::project_gradient";
        Derived& self = static_cast<Derived&>(*this);
        const auto& l = self.checked_layer(id, fn);
        check_gradient_operator<B>(grad, fn);
        velora::detail::require(grad.rows() == l.rows && grad.cols() == l.cols, fn, "argument 'grad' is ", grad.rows(), "x", grad.cols(),
                                " but parameter ", id, " is ", l.rows, "x", l.cols);
        const auto shape = projection_to_reduce(id);
        velora::detail::require(shape.has_value(), fn, "parameter ", id, "'s next step searches a new subspace: call step with a communicator");
        velora::check_shape(out, shape->first, shape->second, fn, "out");
        side_matrix<Op>(grad, l.side).mul(current_basis(self.ws_, l), out);   // a quantised basis: its decoded Q
    }
    void project_gradient(index_t id, const_matrix_view<T> grad, matrix_view<T> out) {
        constexpr const char* fn = "adarank::low_rank_adamw::project_gradient";
        Derived& self = static_cast<Derived&>(*this);
        velora::check_view(grad, fn, "grad");
        velora::check_view(out, fn, "out");
        velora::check_no_alias(out, "out", grad, "grad", fn);
        project_gradient(id, dense_gradient<B>(*self.b_, grad), out);
    }
    void project_gradient(index_t id, const velora::factored_gradient<T>& grad, matrix_view<T> out) {
        constexpr const char* fn = "adarank::low_rank_adamw::project_gradient";
        Derived& self = static_cast<Derived&>(*this);
        const auto& checked = self.checked_layer(id, fn);
        check_factored_gradient(grad, checked.rows, checked.cols, id, fn);
        velora::check_view(out, fn, "out");
        velora::check_no_alias(out, "out", grad.a, "grad.a", fn);
        const index_t used = std::min(grad.subtoken_size, grad.features);   // the entries of v the kernels read
        velora::check_no_alias(out, "out", const_matrix_view<T>(grad.v, 1, used, used), "grad.v", fn);
        project_gradient(id, factored_gradient_operator<B>(*self.b_, grad, self.ws_.fused), out);
    }

    /// Phases 2–5 with `reduced`, the mean over the ranks of their `project_gradient` outputs (the
    /// same bits on every rank; in one process, the projection itself). Statuses as for step. When
    /// projection_to_reduce(id) is std::nullopt this is step(id, weight, grad, comm) and `reduced`
    /// is not read.
    template <gradient_operator Op, velora::communicator C>
    status step_with_reduced_projection(index_t id, matrix_view<T> weight, const_matrix_view<T> reduced, const Op& grad, C& comm) {
        constexpr const char* fn = "adarank::low_rank_adamw::step_with_reduced_projection";
        Derived& self = static_cast<Derived&>(*this);
        auto& l = self.checked_layer(id, fn);
        velora::check_shape(weight, l.rows, l.cols, fn, "weight");
        velora::detail::require(l.low_rank, fn, "parameter ", id, " is optimised densely");
        check_gradient_operator<B>(grad, fn);
        velora::detail::require(grad.rows() == l.rows && grad.cols() == l.cols, fn, "argument 'grad' is ", grad.rows(), "x", grad.cols(),
                                " but parameter ", id, " is ", l.rows, "x", l.cols);
        check_distributable(l, self.config_.refresh, comm, fn);
        const auto shape = projection_to_reduce(id);
        if (!shape) return self.step_with(l, weight, grad, comm);
        velora::check_shape(reduced, shape->first, shape->second, fn, "reduced");
        return self.step_with(l, weight, grad, comm, reduced);
    }
    template <velora::communicator C>
    status step_with_reduced_projection(index_t id, matrix_view<T> weight, const_matrix_view<T> reduced, const_matrix_view<T> grad, C& comm) {
        Derived& self = static_cast<Derived&>(*this);
        velora::check_view(grad, "adarank::low_rank_adamw::step_with_reduced_projection", "grad");
        return step_with_reduced_projection(id, weight, reduced, dense_gradient<B>(*self.b_, grad), comm);
    }
    template <velora::communicator C>
    status step_with_reduced_projection(index_t id, matrix_view<T> weight, const_matrix_view<T> reduced, const velora::factored_gradient<T>& grad,
                                        C& comm) {
        constexpr const char* fn = "adarank::low_rank_adamw::step_with_reduced_projection";
        Derived& self = static_cast<Derived&>(*this);
        const auto& checked = self.checked_layer(id, fn);
        check_factored_gradient(grad, checked.rows, checked.cols, id, fn);
        if (comm.any(factored_has_non_finite(*self.b_, grad))) return status::non_finite_input;   // as step does
        return step_with_reduced_projection(id, weight, reduced, factored_gradient_operator<B>(*self.b_, grad, self.ws_.fused), comm);
    }

    /// Replaces each gradient grads[i] (of parameter ids[i]: its rows×cols, backend memory) by
    /// its mean over the ranks of `comm`, in place, packing them into all-reduces of at most
    /// `bucket_elements` values (one for a larger gradient): the data-parallel reduction for
    /// parameters optimised densely, bucketed as DDP does, after which they are stepped without
    /// a communicator. Every rank passes the same ids in the same order; a mismatch or an invalid
    /// argument on any rank throws std::invalid_argument on every rank, nothing reduced (a rank
    /// whose gradient view check_shape refuses names it, e.g. 'grads[2]'). The bucket is allocated
    /// on first use.
    template <velora::communicator C>
    void all_reduce_mean(std::span<const index_t> ids, std::span<const matrix_view<T>> grads, C& comm, index_t bucket_elements = index_t{1} << 22) {
        Derived& self = static_cast<Derived&>(*this);
        all_reduce_mean_bucketed(*self.b_, self.ws_, self.layers_, ids, grads, comm, bucket_elements);
    }
};

} // namespace adarank
