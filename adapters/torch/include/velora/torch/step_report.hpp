#pragma once
/// \file
/// `step_report`: what one AdaRankGradAdamW step did.
#include <cstdint>
#include <vector>

#include <velora/core/error.hpp>

namespace velora::torch {

/// The outcome of one step.
struct step_report {
    /// ok; degenerate_input (some parameter had an all-zero gradient where a subspace was due, it
    /// stepped with the documented fallback); non_finite_input (a gradient held NaN/Inf: the whole
    /// step was skipped, nothing changed); overflow (some parameters were left unchanged, see events).
    velora::status status = velora::status::ok;
    bool skipped = false;
    std::int64_t stepped = 0;   ///< parameters updated
    struct event {
        std::int64_t group = 0, index = 0;
        velora::status status = velora::status::ok;
    };
    std::vector<event> events;   ///< every parameter whose status was not ok, in parameter order
};

} // namespace velora::torch
