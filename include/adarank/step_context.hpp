#pragma once
/// \file
/// What one step of one parameter works with besides the parameter itself: the backend, the
/// configuration and its AdamW rule, the learning rate of this step, the shared workspace and
/// the subspace finder, and what the budget rank rule reads of the other parameters. `low_rank_adamw` lends them to dense_step.hpp and low_rank_step.hpp.
#include "adamw_rule.hpp"
#include "backend.hpp"
#include "optimizer_workspace.hpp"
#include "parameter.hpp"
#include "rank_budget.hpp"
#include "rsvd.hpp"

namespace adarank {

template <optimizer_backend B, class Config>
struct step_context {
    using T = typename B::value_type;
    using config_type = Config;

    B& backend;
    const Config& config;
    const adamw_rule<T>& rule;
    double lr;
    optimizer_workspace<B>& workspace;
    subspace_finder<B>& finder;
    /// The budget rank rule (rank_budget.hpp): every registered parameter and the rule's scratch;
    /// `budget` is null when the rule does not apply.
    std::span<const parameter_state<B>> layers;
    rank_budget_scratch* budget;
};

} // namespace adarank
