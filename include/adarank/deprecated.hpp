#pragma once
/// \file
/// Every deprecated spelling of adarank's public names, in one place, each forwarding to its
/// new name (docs/architecture.md has the table old → new). Kept for one release so that host
/// code keeps compiling (with a warning naming the replacement); removed in the next.
///
/// The member functions are a CRTP base of low_rank_adamw (`Derived`); they call only its public
/// surface.
#include <optional>
#include <utility>

#include <velora/distributed/communicator.hpp>

#include "backend.hpp"
#include "gradient.hpp"
#include "parameter.hpp"

namespace adarank {

/// Renamed factored_gradient_operator: the gradient_operator over a velora::factored_gradient
/// (the `_op` suffix read like velora::op, the transposition flag).
template <optimizer_backend B>
using factored_gradient_op [[deprecated("renamed factored_gradient_operator")]] = factored_gradient_operator<B>;

template <class Derived, optimizer_backend B>
class deprecated_optimizer_spellings {
public:
    using T = typename B::value_type;

    // Spellings before 0.x.
    [[deprecated("renamed layer_state")]] [[nodiscard]] layer_info info(index_t id) const { return self().layer_state(id); }
    [[deprecated("renamed projection_to_reduce, which returns std::nullopt where this returned 0x0")]] [[nodiscard]] std::pair<index_t, index_t>
    projection_shape(index_t id) const {
        return self().projection_to_reduce(id).value_or(std::pair<index_t, index_t>{0, 0});
    }
    template <class Grad>
    [[deprecated("renamed project_gradient")]] void project(index_t id, const Grad& grad, matrix_view<T> out) {
        self().project_gradient(id, grad, out);
    }
    template <class Grad, velora::communicator C>
    [[deprecated("renamed step_with_reduced_projection")]] velora::status step_projected(index_t id, matrix_view<T> weight, const_matrix_view<T> reduced,
                                                                                     const Grad& grad, C& comm) {
        return self().step_with_reduced_projection(id, weight, reduced, grad, comm);
    }

private:
    Derived& self() noexcept { return static_cast<Derived&>(*this); }
    const Derived& self() const noexcept { return static_cast<const Derived&>(*this); }
};

} // namespace adarank
