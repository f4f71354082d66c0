#pragma once
/// \file
/// Every deprecated spelling of the libtorch adapter's names (other than AdaRankGradAdamW's
/// members, which stay with it), in one place, each forwarding to its new name
/// (docs/architecture.md has the table old → new). Kept for one release so that host code keeps
/// compiling (with a warning naming the replacement); removed in the next.
#include "factored.hpp"

namespace velora::torch {

/// Renamed factored_gradient_accumulator: it accumulates factored terms, as `.grad` does dense ones.
using factored_weight_grad [[deprecated("renamed factored_gradient_accumulator")]] = factored_gradient_accumulator;

/// A CRTP base of VeloraLinearOptions (`Derived`) with the option's old spelling.
template <class Derived>
class deprecated_linear_options_spellings {
public:
    [[deprecated("renamed factored_gradient")]] Derived& factored_weight_grad(bool on) { return self().factored_gradient(on); }
    [[deprecated("renamed factored_gradient")]] [[nodiscard]] bool factored_weight_grad() const { return self().factored_gradient(); }

private:
    Derived& self() noexcept { return static_cast<Derived&>(*this); }
    const Derived& self() const noexcept { return static_cast<const Derived&>(*this); }
};

} // namespace velora::torch
