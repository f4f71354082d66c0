#pragma once
/// \file
/// The global memory-budget rank rule (`rank_policy::budget`): ranks for all low-rank parameters
/// of one optimizer chosen together, to keep the most gradient energy within a byte budget on
/// the optimizer state. Two pieces:
///
/// - `allocate_rank_budget`: greedy water-filling on spectra. Each extra rank unit of item q
///   costs `unit_bytes` (its basis row and two moment rows) and buys `energy[r]`, the share of
///   q's gradient energy its next singular direction holds; the unit with the most energy per
///   byte that still fits is bought next (ties: the smallest item index), until nothing that fits
///   buys energy. A pure function of integers and doubles compared by `>` on a division: the
///   same bits on every machine, thread count and rank.
///
///   The energy of a unit is relative, σ_{r+1}²/‖G‖_F² (`energy_fractions`): the rule keeps the
///   most of Σ_q (the fraction of q's gradient energy its subspace holds), the budget analogue of
///   ξ, which bounds each matrix's relative residual. Absolute σ² would not do: the spectra of
///   parameters refreshed at different steps would be compared, and gradient norms fall by
///   orders of magnitude over training, so a stale spectrum from early steps would outbid every
///   fresh one (measured on the demo: ranks fell to a third of the budget after the first
///   round of refreshes).
///
/// - `budget_rank`: the rank a refreshing parameter p gets (docs/adarankgrad.md, "A global
///   memory budget"). Refreshes happen per parameter at different steps, so the rule is:
///     1. the target: the greedy allocation over every low-rank parameter, with p's new sketched
///        spectrum and each other parameter's spectrum from its own latest refresh; a parameter
///        without a spectrum (no refresh yet, or a subspace from set_basis) is held fixed at its
///        current rank, or, with no subspace yet, at the uniform rank (the largest common rank
///        that fits, i.e. GaLore's rank for this budget) so that the first refreshes do not
///        starve the parameters that step later;
///     2. the grant: the target, cut to what fits beside the others' state as it is now (their
///        current ranks; r_min for one without a subspace yet), and at least r_min.
///   So state_bytes() never exceeds the budget (registration refuses a parameter whose r_min
///   would not fit), and the ranks move to the target over one round of refreshes. The inputs
///   are the spectra of the all-reduced gradient (mean_over_ranks), the same on every rank.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include <velora/core/error.hpp>

#include "backend.hpp"
#include "parameter.hpp"
#include "policies.hpp"

namespace adarank {

namespace detail {
// a + r·u, saturating at the largest uint64 (budgets are compared with sums of products).
constexpr std::uint64_t add_units(std::uint64_t a, index_t r, std::uint64_t u) noexcept {
    constexpr std::uint64_t top = std::numeric_limits<std::uint64_t>::max();
    const auto n = static_cast<std::uint64_t>(r);
    if (n != 0 && u > (top - a) / n) return top;
    return a + n * u;
}
} // namespace detail

/// One parameter as the allocator sees it: the energy each rank unit buys (non-increasing;
/// empty = held fixed at `lo`), its rank bounds and the bytes one rank unit costs.
struct budget_item {
    std::span<const double> energy;
    index_t lo = 1, hi = 1;
    std::uint64_t unit_bytes = 1;
};

/// Bytes of `ranks` over `items` (Σ rank·unit_bytes), saturating at the largest uint64.
inline std::uint64_t budget_bytes_of(std::span<const budget_item> items, std::span<const index_t> ranks) noexcept {
    std::uint64_t sum = 0;
    for (std::size_t i = 0; i < items.size(); ++i) sum = detail::add_units(sum, ranks[i], items[i].unit_bytes);
    return sum;
}

/// Greedy water-filling: writes into `ranks` (one per item) lo + the units bought within
/// `budget` bytes. An item buys at most min(hi, energy.size()) units in all, and never a unit of
/// zero energy. When Σ lo·unit_bytes exceeds the budget every item stays at lo (the callers'
/// rules make that impossible; the allocation still ends). Throws std::invalid_argument for
/// items with lo > hi, lo < 0, unit_bytes = 0, or `ranks` of another size.
inline void allocate_rank_budget(std::span<const budget_item> items, std::uint64_t budget, std::span<index_t> ranks) {
    constexpr const char* fn = "adarank::allocate_rank_budget";
    velora::detail::require(ranks.size() == items.size(), fn, "argument 'ranks' has ", ranks.size(), " entries for ", items.size(), " items");
    for (std::size_t i = 0; i < items.size(); ++i) {
        velora::detail::require(items[i].lo >= 0 && items[i].lo <= items[i].hi && items[i].unit_bytes > 0, fn, "item ", i, " has lo = ", items[i].lo,
                                ", hi = ", items[i].hi, ", unit_bytes = ", items[i].unit_bytes, " (needs 0 <= lo <= hi and unit_bytes > 0)");
        ranks[i] = items[i].lo;
    }
    const std::uint64_t floor_bytes = budget_bytes_of(items, ranks);
    if (floor_bytes >= budget) return;
    std::uint64_t remaining = budget - floor_bytes;
    for (;;) {
        std::size_t best = items.size();
        double best_gain = 0;   // energy per byte; a unit must buy > 0
        for (std::size_t i = 0; i < items.size(); ++i) {
            const budget_item& it = items[i];
            const index_t r = ranks[i];
            if (r >= it.hi || r >= static_cast<index_t>(it.energy.size()) || it.unit_bytes > remaining) continue;
            const double gain = it.energy[static_cast<std::size_t>(r)] / static_cast<double>(it.unit_bytes);
            if (gain > best_gain) {   // strict: the smallest index wins a tie
                best = i;
                best_gain = gain;
            }
        }
        if (best == items.size()) return;
        ++ranks[best];
        remaining -= items[best].unit_bytes;
    }
}

/// What `budget_rank` reads of the optimizer's low-rank parameters, in registration order
/// (dense ones are fixed bytes, `dense_bytes`).
struct budget_parameter {
    std::span<const double> spectrum;   ///< energy fractions of the latest refresh (r_cap values), empty if none
    index_t rank = 0;                   ///< current rank (0: no subspace yet)
    index_t r_cap = 1;                  ///< the largest rank (min(r_max, rows, cols))
    std::uint64_t unit_bytes = 1;       ///< (len + 2·other)·sizeof(T)
};

/// The smallest rank a parameter may have under `policy`: r_min, within [1, r_cap].
inline index_t budget_floor(const rank_policy& policy, index_t r_cap) noexcept { return std::clamp<index_t>(policy.r_min, 1, r_cap); }


/// The largest r such that every parameter at clamp(r, floor, r_cap) fits in the budget beside
/// `dense_bytes` (0 when not even r = 1 fits): GaLore's uniform rank for this budget.
inline index_t uniform_budget_rank(const rank_policy& policy, std::span<const budget_parameter> params, std::uint64_t dense_bytes) noexcept {
    index_t top = 0;
    for (const budget_parameter& p : params) top = std::max(top, p.r_cap);
    index_t best = 0;
    for (index_t r = 1; r <= top; ++r) {
        std::uint64_t sum = dense_bytes;
        for (const budget_parameter& p : params) sum = detail::add_units(sum, std::clamp<index_t>(r, budget_floor(policy, p.r_cap), p.r_cap), p.unit_bytes);
        if (sum > policy.budget_bytes) break;
        best = r;
    }
    return best;
}

/// Bytes the parameters hold now, counting one without a subspace at its floor (what it will
/// hold at least after its first step), plus `dense_bytes`; `skip` (an index, or -1) is left out.
inline std::uint64_t budget_held_bytes(const rank_policy& policy, std::span<const budget_parameter> params, std::uint64_t dense_bytes,
                                       std::ptrdiff_t skip = -1) noexcept {
    std::uint64_t sum = dense_bytes;
    for (std::size_t q = 0; q < params.size(); ++q) {
        if (static_cast<std::ptrdiff_t>(q) == skip) continue;
        const budget_parameter& p = params[q];
        const index_t r = p.rank > 0 ? p.rank : budget_floor(policy, p.r_cap);
        sum = detail::add_units(sum, r, p.unit_bytes);
    }
    return sum;
}

/// The rank parameter `p` gets at a refresh whose sketch found the energy fractions `fractions`
/// (energy_fractions), by the rule in this file's header. `items` and `ranks` are scratch space
/// of params.size() entries.
inline index_t budget_rank(const rank_policy& policy, std::span<const budget_parameter> params, std::uint64_t dense_bytes, std::size_t p,
                           std::span<const double> fractions, std::span<budget_item> items, std::span<index_t> ranks) {
    const index_t uniform = uniform_budget_rank(policy, params, dense_bytes);
    for (std::size_t q = 0; q < params.size(); ++q) {
        const budget_parameter& b = params[q];
        const index_t lo = budget_floor(policy, b.r_cap);
        budget_item& it = items[q];
        it.unit_bytes = b.unit_bytes;
        it.hi = b.r_cap;
        if (q == p) {
            it.energy = fractions.first(std::min(fractions.size(), static_cast<std::size_t>(b.r_cap)));
            it.lo = lo;
        } else if (!b.spectrum.empty()) {
            it.energy = b.spectrum;
            it.lo = lo;
        } else {
            it.energy = {};
            it.lo = std::clamp<index_t>(b.rank > 0 ? b.rank : uniform, lo, b.r_cap);
            it.hi = it.lo;
        }
    }
    const std::uint64_t budget = policy.budget_bytes - std::min(policy.budget_bytes, dense_bytes);
    allocate_rank_budget(std::span<const budget_item>(items.data(), params.size()), budget, ranks.first(params.size()));
    const index_t target = ranks[p];
    // What fits beside the others as they are now.
    const std::uint64_t others = budget_held_bytes(policy, params, dense_bytes, static_cast<std::ptrdiff_t>(p));
    const std::uint64_t free_bytes = policy.budget_bytes - std::min(policy.budget_bytes, others);
    const auto fits = static_cast<index_t>(std::min<std::uint64_t>(free_bytes / params[p].unit_bytes, static_cast<std::uint64_t>(params[p].r_cap)));
    return std::clamp<index_t>(std::min(target, fits), budget_floor(policy, params[p].r_cap), params[p].r_cap);
}


/// Scratch space of the budget rule, sized at registration (a refresh may allocate anyway; these
/// do not grow in a step).
struct rank_budget_scratch {
    std::vector<budget_parameter> params;
    std::vector<budget_item> items;
    std::vector<index_t> ranks;
    std::vector<double> fractions;   ///< the refreshing parameter's (up to the largest r_cap)
    void reserve(std::size_t n, index_t r_cap) {
        params.reserve(n);
        items.resize(n);
        ranks.resize(n);
        fractions.reserve(static_cast<std::size_t>(r_cap));
    }
};

/// σ_i²/‖G‖_F² for the first min(|σ|, r_cap) singular values `sigma` of a sketch of G (energy =
/// ‖G‖_F² > 0), into `out` (cleared first; within its capacity it does not allocate). What the
/// budget rule compares, and what the state keeps per parameter.
inline void energy_fractions(std::span<const double> sigma, double energy, index_t r_cap, std::vector<double>& out) {
    out.clear();
    const std::size_t n = std::min(sigma.size(), static_cast<std::size_t>(std::max<index_t>(r_cap, 0)));
    for (std::size_t i = 0; i < n; ++i) out.push_back(sigma[i] * sigma[i] / energy);
}

/// Whether a configuration's rank estimator is the library's policy in budget mode.
template <class Rank>
constexpr bool uses_rank_budget(const Rank& rank) noexcept {
    if constexpr (std::is_same_v<Rank, rank_policy>) return rank.is_budget();
    else return false;
}

/// Bytes of one rank unit of a low-rank parameter: a basis row and a row of each moment.
template <optimizer_backend B>
std::uint64_t budget_unit_bytes(const parameter_state<B>& l) noexcept {
    return static_cast<std::uint64_t>(l.len + 2 * l.other) * sizeof(typename B::value_type);
}

/// Fills s.params with the low-rank parameters of `layers` (in order) and returns the dense
/// ones' state bytes; `position` gets the index in s.params of `which` (if it is among them).
template <optimizer_backend B>
std::uint64_t collect_budget_parameters(std::span<const parameter_state<B>> layers, rank_budget_scratch& s, const parameter_state<B>* which = nullptr,
                                        std::size_t* position = nullptr) {
    s.params.clear();
    std::uint64_t dense = 0;
    for (const parameter_state<B>& l : layers) {
        if (!l.low_rank) {
            dense += l.state_bytes();
            continue;
        }
        if (&l == which && position) *position = s.params.size();
        s.params.push_back({std::span<const double>(l.spectrum), l.rank, l.r_cap, budget_unit_bytes(l)});
    }
    return dense;
}

/// The bytes `layers` hold now by budget_held_bytes' count (a low-rank parameter without a
/// subspace counted at its floor).
template <optimizer_backend B>
std::uint64_t budget_held_bytes(const rank_policy& policy, std::span<const parameter_state<B>> layers, rank_budget_scratch& s) {
    const std::uint64_t dense = collect_budget_parameters(layers, s);
    return budget_held_bytes(policy, std::span<const budget_parameter>(s.params), dense);
}

/// The budget rule as a rank_estimator for the refresh of `refreshing` (one of `layers`): the
/// subspace finder hands it the new sketch's σ and ‖G‖_F².
template <optimizer_backend B>
struct budget_estimator {
    const rank_policy& policy;
    std::span<const parameter_state<B>> layers;
    const parameter_state<B>& refreshing;
    rank_budget_scratch& scratch;

    [[nodiscard]] index_t max_rank() const noexcept { return policy.r_max; }
    [[nodiscard]] index_t estimate(std::span<const double> sigma, double energy, index_t cap) const {
        std::size_t p = 0;
        const std::uint64_t dense = collect_budget_parameters(layers, scratch, &refreshing, &p);
        const std::span<const budget_parameter> params(scratch.params);
        if (scratch.items.size() < params.size()) scratch.reserve(params.size(), refreshing.r_cap);
        energy_fractions(sigma, energy, refreshing.r_cap, scratch.fractions);
        return std::min(cap, budget_rank(policy, params, dense, p, std::span<const double>(scratch.fractions), std::span<budget_item>(scratch.items),
                                         std::span<index_t>(scratch.ranks)));
    }
};

/// The budget rule's admission of a new parameter (registration): `candidate` must fit beside
/// the parameters registered before it at its floor rank (r_min; dense: its AdamW moments), so
/// that every parameter can always get r_min. Throws std::invalid_argument from `fn` otherwise.
/// A rank estimator other than the library's policy has no budget: nothing to check.
template <class Rank, optimizer_backend B>
void check_budget_admits(const Rank& rank, std::span<const parameter_state<B>> layers, rank_budget_scratch& s, const parameter_state<B>& candidate,
                         const char* fn) {
    if constexpr (std::is_same_v<Rank, rank_policy>) {
        const std::uint64_t others = budget_held_bytes(rank, layers, s);
        const std::uint64_t own = candidate.low_rank ? static_cast<std::uint64_t>(budget_floor(rank, candidate.r_cap)) * budget_unit_bytes(candidate)
                                                     : static_cast<std::uint64_t>(candidate.state_bytes_dense());
        velora::detail::require(own <= rank.budget_bytes && others <= rank.budget_bytes - own, fn, "parameter ", layers.size(), " (", candidate.rows,
                                "x", candidate.cols, candidate.low_rank ? ", low-rank" : ", dense", ") needs ", own,
                                " bytes of state at least, and the parameters registered before it hold ", others,
                                ": over config.rank.budget_bytes = ", rank.budget_bytes);
    }
}

/// set_basis under the budget rule: a given basis of `rank_` rows for `l` (one of `layers`) must
/// fit beside the others as they are. Throws std::invalid_argument from `fn` otherwise.
template <class Rank, optimizer_backend B>
void check_budget_admits_rank(const Rank& rank, std::span<const parameter_state<B>> layers, rank_budget_scratch& s, const parameter_state<B>& l,
                              index_t rank_, const char* fn) {
    if constexpr (std::is_same_v<Rank, rank_policy>) {
        std::size_t p = 0;
        const std::uint64_t dense = collect_budget_parameters(layers, s, &l, &p);
        const std::uint64_t others = budget_held_bytes(rank, std::span<const budget_parameter>(s.params), dense, static_cast<std::ptrdiff_t>(p));
        const std::uint64_t own = static_cast<std::uint64_t>(rank_) * budget_unit_bytes(l);
        velora::detail::require(own <= rank.budget_bytes && others <= rank.budget_bytes - own, fn, "a basis of rank ", rank_, " needs ", own,
                                " bytes of state beside the others' ", others, ": over config.rank.budget_bytes = ", rank.budget_bytes);
    }
}

} // namespace adarank
