#pragma once
/// \file
/// Every deprecated spelling of velora's public names, in one place, each forwarding to its new
/// name (docs/architecture.md has the table old → new). Kept for one release so that host code
/// keeps compiling (with a warning naming the replacement); removed in the next.
///
/// The member functions are a CRTP base of compressor (`Derived`); they call only its public
/// surface.
///
/// The `activation_compressor` concept (concepts.hpp) requires the new spelling only: a host type
/// that implements the old one and not `gradient_factor` no longer satisfies it. A concept that
/// accepted either spelling would oblige every generic caller to dispatch on the spelling, and no
/// warning can be attached to a concept check, so the old spelling would live on unnoticed; a
/// failed static_assert naming the concept is the clearer signal for a one-line rename.
#include "core/view.hpp"

namespace velora {

template <class Derived, class Record, class T>
class deprecated_compressor_spellings {
public:
    // Spellings before 0.x.
    [[deprecated("renamed gradient_factor (it writes the factor A = dYᵀZ, not dW)")]] void
    weight_grad(const Record& record, const_matrix_view<T> dy, matrix_view<T> a) {
        static_cast<Derived&>(*this).gradient_factor(record, dy, a);
    }
};

} // namespace velora
