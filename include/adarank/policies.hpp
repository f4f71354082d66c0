#pragma once
/// \file
/// AdaRankGrad's policies and hyper-parameters: plain aggregates, validated once by the
/// optimizer's constructor (see `validate`). Where the paper's exact rule is not public
/// (marked OPEN in docs/adarankgrad.md) the alternatives are policies with a documented default.
///
/// The rank estimator and the refresh rule are open for extension: `low_rank_adamw<B, Rank,
/// Refresh>` takes any types satisfying `rank_estimator` / `refresh_rule` and
/// `persistent_policy` (validate itself, save and load its settings), held by value in
/// `basic_optimizer_config<Rank, Refresh>`; `rank_policy` and `refresh_policy` are the library's
/// (docs/adarankgrad.md, "Your own policies").
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <string_view>

#include <velora/core/error.hpp>
#include <velora/core/serialize.hpp>
#include <velora/core/view.hpp>

#include "basis_format.hpp"
#include "state_format.hpp"

namespace adarank {

using velora::index_t;

// ------------------------------------------------------------------------------------ side
/// Which side of an m×n gradient G the basis lives on.
///  - left:  P ∈ R^{m×r}, Ĝ = Pᵀ G (r×n), ΔW = P N
///  - right: Q ∈ R^{r×n}, Ĝ = G Qᵀ (m×r), ΔW = N Q
enum class projection_side : std::uint8_t { left = 0, right = 1 };

/// How the side is chosen from the full shape (once per parameter, at registration).
enum class side_policy : std::uint8_t {
    standard = 0,           ///< GaLore's "std": right if m >= n, else left (moments r·max(m,n), basis r·min(m,n))
    reverse_standard = 1,   ///< the opposite: moments r·min(m,n), basis r·max(m,n) (less memory in total)
    left = 2,
    right = 3,
};

constexpr std::string_view to_string(side_policy p) noexcept {
    switch (p) {
    case side_policy::standard: return "std";
    case side_policy::reverse_standard: return "reverse_std";
    case side_policy::left: return "left";
    case side_policy::right: return "right";
    }
    return "invalid";
}
constexpr std::string_view to_string(projection_side s) noexcept { return s == projection_side::left ? "left" : "right"; }

constexpr projection_side choose_side(side_policy p, index_t rows, index_t cols) noexcept {
    switch (p) {
    case side_policy::standard: return rows >= cols ? projection_side::right : projection_side::left;
    case side_policy::reverse_standard: return rows >= cols ? projection_side::left : projection_side::right;
    case side_policy::left: return projection_side::left;
    case side_policy::right: return projection_side::right;
    }
    return projection_side::left;
}

// ------------------------------------------------------------------------------------ policies
/// What the optimizer needs to keep a policy in its configuration: `validate(function)` throws
/// std::invalid_argument naming `function` for invalid settings (called once, by the
/// optimizer's constructor); `save` writes the settings into a state (the bytes are also how a
/// saved policy is compared with the live one, bit for bit) and `load` reads them back.
template <class P>
concept persistent_policy = std::copyable<P> && requires(const P& p, std::string_view function, velora::state_writer& w, velora::state_reader& r) {
    p.validate(function);
    p.save(w);
    { P::load(r) } -> std::same_as<P>;
};

// ------------------------------------------------------------------------------------ rank
/// Chooses the rank of a new subspace from the singular values σ₁ ≥ σ₂ ≥ … of the sketch and
/// the exact energy ‖G‖_F². `cap` (>= 1) bounds the answer from above (the sketch size).
template <class E>
concept rank_estimator = requires(const E& e, std::span<const double> sigma, double energy, index_t cap) {
    { e.estimate(sigma, energy, cap) } -> std::convertible_to<index_t>;
    { e.max_rank() } -> std::convertible_to<index_t>;
};

/// The library's rank estimator: fixed (GaLore), adaptive (AdaRankGrad) or a global memory
/// budget shared by all parameters of one optimizer (this library's).
struct rank_policy {
    enum class kind : std::uint8_t { fixed = 0, adaptive = 1, budget = 2 };
    kind type = kind::adaptive;
    index_t r_min = 1;
    index_t r_max = 128;
    double xi = 0.05;   ///< adaptive: allowed relative Frobenius residual (ξ² of the energy may be dropped)
    std::uint64_t budget_bytes = 0;   ///< budget: the bound on the optimizer's state_bytes() (0 otherwise)

    /// Always rank r.
    static constexpr rank_policy fixed(index_t r) noexcept { return {kind::fixed, r, r, 0.0, 0}; }
    /// The smallest r in [r_min, r_max] with ‖G‖_F² − Σ_{i≤r} σ_i² ≤ ξ²‖G‖_F²; r_max if none.
    /// OPEN: the paper's exact threshold is not public. The default ξ = 0.05 (99.75% of the
    /// energy kept) comes from the demo's iso-memory study (docs/results.md, "Which optimizer for
    /// the bytes you have"): it ties GaLore at equal optimizer state, where ξ = 0.1-0.35 (0.2 is
    /// a public re-implementation's value, this library's default until 2026-12-02) lose
    /// 0.06-0.16 nats.
    static constexpr rank_policy adaptive(double xi, index_t r_min, index_t r_max) noexcept {
        return {kind::adaptive, r_min, r_max, xi, 0};
    }

    /// Ranks in [r_min, r_max] for all low-rank parameters of one optimizer, chosen together at
    /// each refresh to keep the most gradient energy (Σ σ_i² of the sketches) with the optimizer's
    /// state_bytes() (dense parameters' AdamW moments included) never above `bytes`: greedy
    /// water-filling on the latest sketched spectra, deterministic (rank_budget.hpp has the exact
    /// rule; docs/adarankgrad.md, "A global memory budget"). The optimizer applies it; `estimate`
    /// alone, which sees one parameter only, answers the largest rank allowed.
    static constexpr rank_policy budget(std::uint64_t bytes, index_t r_min, index_t r_max) noexcept {
        return {kind::budget, r_min, r_max, 0.0, bytes};
    }

    [[nodiscard]] constexpr index_t max_rank() const noexcept { return r_max; }
    [[nodiscard]] constexpr bool is_budget() const noexcept { return type == kind::budget; }

    [[nodiscard]] index_t estimate(std::span<const double> sigma, double energy, index_t cap) const noexcept {
        const index_t hi = std::max<index_t>(1, std::min(r_max, cap));
        const index_t lo = std::min(r_min, hi);
        if (type != kind::adaptive) return hi;
        const double allowed = xi * xi * energy;
        double kept = 0;
        for (index_t r = 1; r <= hi; ++r) {
            if (r - 1 < static_cast<index_t>(sigma.size())) kept += sigma[static_cast<std::size_t>(r - 1)] * sigma[static_cast<std::size_t>(r - 1)];
            if (r >= lo && energy - kept <= allowed) return r;
        }
        return hi;
    }

    void validate(std::string_view function) const {
        using velora::detail::require;
        require(static_cast<unsigned>(type) <= 2, function, "config.rank has the invalid kind ", static_cast<int>(type));
        require(r_min >= 1, function, "config.rank.r_min must be >= 1, got ", r_min);
        require(r_min <= r_max, function, "config.rank needs r_min <= r_max, got r_min = ", r_min, " > r_max = ", r_max);
        require(type != kind::adaptive || (std::isfinite(xi) && xi >= 0 && xi < 1), function, "config.rank.xi must be in [0, 1), got ", xi);
        require(type != kind::budget || budget_bytes > 0, function, "config.rank.budget_bytes must be > 0 for the budget rank rule, got ", budget_bytes);
        require(type == kind::budget || budget_bytes == 0, function, "config.rank.budget_bytes = ", budget_bytes,
                " is set but the rank rule is not the budget one (kind ", static_cast<int>(type), ")");
    }
    /// The budget (kind 2) is written after ξ only for the budget rule, so that fixed and
    /// adaptive policies save the bytes they always did (states of earlier versions still load).
    void save(velora::state_writer& w) const {
        w.put(static_cast<std::uint8_t>(type));
        w.put(static_cast<std::int64_t>(r_min));
        w.put(static_cast<std::int64_t>(r_max));
        w.put(xi);
        if (type == kind::budget) w.put(budget_bytes);
    }
    static rank_policy load(velora::state_reader& r) {
        rank_policy p;
        p.type = static_cast<kind>(r.get<std::uint8_t>());
        p.r_min = static_cast<index_t>(r.get<std::int64_t>());
        p.r_max = static_cast<index_t>(r.get<std::int64_t>());
        p.xi = r.get<double>();
        if (p.type == kind::budget) p.budget_bytes = r.get<std::uint64_t>();
        return p;
    }

    friend constexpr bool operator==(const rank_policy&, const rank_policy&) = default;
};

// ------------------------------------------------------------------------------------ refresh
/// What a refresh rule sees at each step of a parameter that has a subspace.
struct refresh_inputs {
    index_t steps_in_subspace = 0;   ///< steps taken since the last refresh (0 right after one)
    double projected_norm2 = 0;      ///< ‖Ĝ_t‖_F² in the current subspace
    double anchor_norm2 = 0;         ///< ‖Ĝ_{t₀}‖_F², t₀ = the first step in this subspace (< 0: not yet known)
    double gradient_norm2 = 0;       ///< ‖G_t‖_F² (computed only when `needs_gradient_norm()`)
};

template <class R>
concept refresh_rule = requires(const R& r, const refresh_inputs& in, index_t steps) {
    { r.due(in) } -> std::same_as<bool>;
    { r.due_by_count(steps) } -> std::same_as<bool>;   // due whatever the norms: no projection needed to decide
    { r.needs_gradient_norm() } -> std::same_as<bool>;
};

/// When to find a new subspace. The first step of a parameter always finds one.
struct refresh_policy {
    enum class kind : std::uint8_t { every = 0, converged = 1, captured_energy = 2 };
    kind type = kind::converged;
    double threshold = 0.5;      ///< converged: ε; captured_energy: τ
    index_t min_interval = 50;   ///< no refresh before this many steps in a subspace (converged, captured_energy)
    index_t max_interval = 200;  ///< always refresh after this many (every: the interval T)

    /// GaLore: every T steps.
    static constexpr refresh_policy every(index_t interval) noexcept { return {kind::every, 0.0, interval, interval}; }
    /// AdaRankGrad: the optimisation inside the subspace has converged, ‖Ĝ_t‖_F ≤ ε·‖Ĝ_{t₀}‖_F,
    /// after at least `min_interval` and at most `max_interval` steps. OPEN: the paper's exact test.
    static constexpr refresh_policy converged(double epsilon, index_t min_interval, index_t max_interval) noexcept {
        return {kind::converged, epsilon, min_interval, max_interval};
    }
    /// The subspace went stale: ‖Ĝ_t‖_F² < τ·‖G_t‖_F² (costs one extra read of G per step).
    static constexpr refresh_policy captured_energy(double tau, index_t min_interval, index_t max_interval) noexcept {
        return {kind::captured_energy, tau, min_interval, max_interval};
    }

    [[nodiscard]] constexpr bool needs_gradient_norm() const noexcept { return type == kind::captured_energy; }

    [[nodiscard]] constexpr bool due_by_count(index_t steps_in_subspace) const noexcept { return steps_in_subspace >= max_interval; }

    [[nodiscard]] constexpr bool due(const refresh_inputs& in) const noexcept {
        if (due_by_count(in.steps_in_subspace)) return true;
        if (in.anchor_norm2 < 0) return false;   // the first step in a subspace installed by set_basis
        if (type == kind::every || in.steps_in_subspace < min_interval) return false;
        if (type == kind::converged) return in.projected_norm2 <= threshold * threshold * in.anchor_norm2;
        return in.projected_norm2 < threshold * in.gradient_norm2;
    }

    void validate(std::string_view function) const;   // below, after to_string(kind)
    void save(velora::state_writer& w) const {
        w.put(static_cast<std::uint8_t>(type));
        w.put(threshold);
        w.put(static_cast<std::int64_t>(min_interval));
        w.put(static_cast<std::int64_t>(max_interval));
    }
    static refresh_policy load(velora::state_reader& r) {
        refresh_policy p;
        p.type = static_cast<kind>(r.get<std::uint8_t>());
        p.threshold = r.get<double>();
        p.min_interval = static_cast<index_t>(r.get<std::int64_t>());
        p.max_interval = static_cast<index_t>(r.get<std::int64_t>());
        return p;
    }

    friend constexpr bool operator==(const refresh_policy&, const refresh_policy&) = default;
};

constexpr std::string_view to_string(refresh_policy::kind k) noexcept {
    switch (k) {
    case refresh_policy::kind::every: return "every";
    case refresh_policy::kind::converged: return "converged";
    case refresh_policy::kind::captured_energy: return "captured_energy";
    }
    return "invalid";
}

inline void refresh_policy::validate(std::string_view function) const {
    using velora::detail::require;
    require(static_cast<unsigned>(type) <= 2, function, "config.refresh has the invalid kind ", static_cast<int>(type));
    require(max_interval >= 1, function, "config.refresh.max_interval (every: the interval) must be >= 1, got ", max_interval);
    require(min_interval >= 1 && min_interval <= max_interval, function, "config.refresh needs 1 <= min_interval <= max_interval, got ",
            min_interval, " and ", max_interval);
    require(type == kind::every || (std::isfinite(threshold) && threshold >= 0 && threshold <= 1), function, "config.refresh.threshold (",
            to_string(type), ") must be in [0, 1], got ", threshold);
}

// ------------------------------------------------------------------------------------ transport
/// What happens to Adam's moments when the subspace changes from B_old to B_new
/// (R = B_new B_oldᵀ, r_new × r_old):
enum class transport_policy : std::uint8_t {
    squared_rotation = 0,   ///< default: M ← R M, V ← (R∘R) V (exact for signed permutations, V stays ≥ 0)
    clamped_rotation = 1,   ///< M ← R M, V ← max(R V, 0)
    reset = 2,              ///< M ← 0, V ← 0
    none = 3,               ///< GaLore: reuse M and V unchanged in the new basis (rows cut or zero-padded if r changes)
};

constexpr std::string_view to_string(transport_policy p) noexcept {
    switch (p) {
    case transport_policy::squared_rotation: return "squared_rotation";
    case transport_policy::clamped_rotation: return "clamped_rotation";
    case transport_policy::reset: return "reset";
    case transport_policy::none: return "none";
    }
    return "invalid";
}

// ------------------------------------------------------------------------------------ rSVD
/// The randomized subspace finder (Halko–Martinsson–Tropp range finder with power iterations).
struct rsvd_config {
    index_t oversampling = 10;        ///< p: the sketch has k = min(r_max + p, m, n) vectors
    int power_iterations = 2;         ///< q for a cold start
    int warm_power_iterations = 1;    ///< q when starting from the previous basis
    bool warm_start = true;           ///< start from the previous basis padded with fresh random vectors
    double exact_fraction = 0.5;      ///< exact SVD when k >= exact_fraction · min(m, n) (0: always exact)

    friend constexpr bool operator==(const rsvd_config&, const rsvd_config&) = default;
};

// ------------------------------------------------------------------------------------ Adam
/// Where ε and the weight decay enter AdamW's update (s = lr·√(1−β₂ᵗ)/(1−β₁ᵗ), d = 1 − lr·wd):
enum class adam_convention : std::uint8_t {
    /// GaLore's and Hugging Face's AdamW: W ← d·(W − s·m/(√v + ε)); ε added before the bias
    /// correction, the decay applied to the updated weight.
    galore = 0,
    /// torch.optim.AdamW's: W ← d·W − s·m/(√v + ε·√(1−β₂ᵗ)), i.e. ε added to the bias-corrected
    /// √v̂ and the decay applied to the old weight only. Dense parameters then match
    /// torch::optim::AdamW to rounding. Needs lr·wd < 1.
    torch = 1,
};

constexpr std::string_view to_string(adam_convention c) noexcept {
    switch (c) {
    case adam_convention::galore: return "galore";
    case adam_convention::torch: return "torch";
    }
    return "invalid";
}

/// AdamW hyper-parameters (GaLore's defaults for eps).
struct adamw_hyper {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-6;
    double weight_decay = 0.0;   ///< decoupled: W ← (1 − lr·wd)·W (see adam_convention for where)
    adam_convention convention = adam_convention::galore;

    friend constexpr bool operator==(const adamw_hyper&, const adamw_hyper&) = default;
};

namespace detail {
// The library's defaults for its own policies; a user's policy type starts value-initialised.
template <class P, class Library>
constexpr P default_policy(Library library) {
    if constexpr (std::same_as<P, Library>) return library;
    else return P{};
}
} // namespace detail

/// Everything that configures `low_rank_adamw<B, Rank, Refresh>`. The default
/// (`optimizer_config`) is AdaRankGrad: adaptive rank (ξ = 0.05, r ∈ [1, 128]), refresh on
/// convergence (ε = 0.5, every 50 to 200 steps), moments carried over by squared rotation,
/// randomized SVD with warm start, GaLore's α = 0.25.
template <class Rank = rank_policy, class Refresh = refresh_policy>
struct basic_optimizer_config {
    using rank_type = Rank;
    using refresh_type = Refresh;
    adamw_hyper adam{};
    /// GaLore's α: multiplies the back-projected update (low-rank parameters only). Not the
    /// compressor's `scale` (velora::compressor_config::scale multiplies the weight gradient a
    /// VeLoRA layer hands over); the name stays because a member alias would break aggregate
    /// initialisation and saved states.
    double scale = 0.25;
    side_policy side = side_policy::standard;
    Rank rank = detail::default_policy<Rank>(rank_policy::adaptive(0.05, 1, 128));
    Refresh refresh = detail::default_policy<Refresh>(refresh_policy::converged(0.5, 50, 200));
    transport_policy transport = transport_policy::squared_rotation;
    rsvd_config rsvd{};
    std::uint64_t seed = 0x5eedULL;   ///< of the Gaussian sketches (each parameter draws from its own stream)
    state_format state = state_format::float32;   ///< how the moments are stored (state_format.hpp)
    index_t state_block = default_state_block;    ///< elements per absmax block of the 8-bit format
    basis_format basis = basis_format::float32;   ///< how low-rank bases are stored (basis_format.hpp)
    index_t basis_block = default_basis_block;    ///< elements per scale block (within a row) of a quantised basis

    /// GaLore (Zhao et al. 2024) as a configuration: fixed rank, refresh every `interval`
    /// steps by an exact SVD, moments reused unchanged.
    static basic_optimizer_config galore(index_t rank, index_t interval = 200, double scale = 0.25)
        requires std::same_as<Rank, rank_policy> && std::same_as<Refresh, refresh_policy>
    {
        basic_optimizer_config c;
        c.scale = scale;
        c.rank = rank_policy::fixed(rank);
        c.refresh = refresh_policy::every(interval);
        c.transport = transport_policy::none;
        c.rsvd.warm_start = false;
        c.rsvd.exact_fraction = 0.0;
        return c;
    }

    friend constexpr bool operator==(const basic_optimizer_config&, const basic_optimizer_config&) = default;
};

/// The library's configuration: its own rank estimator and refresh rule.
using optimizer_config = basic_optimizer_config<>;

/// The one rule for a learning rate `lr` under the AdamW hyper-parameters `adam` (their weight
/// decay and convention): finite and >= 0, and lr·wd < 1 under the torch convention (its decay
/// factor 1 − lr·wd divides the step). The constructor (through validate), set_learning_rate and
/// load_state all apply it. Throws `Error` (std::invalid_argument or a class derived from it)
/// naming `function`, `what` (the argument or field) and the values.
template <class Error = std::invalid_argument>
void check_learning_rate(double lr, const adamw_hyper& adam, std::string_view function, std::string_view what) {
    if (!(std::isfinite(lr) && lr >= 0)) velora::detail::fail_as<Error>(function, what, " must be finite and >= 0, got ", lr);
    if (adam.convention == adam_convention::torch && !(lr * adam.weight_decay < 1))
        velora::detail::fail_as<Error>(function, what, " = ", lr, " with weight_decay = ", adam.weight_decay,
                                       " gives lr x wd >= 1; the torch convention needs lr x weight_decay < 1 (the decay factor 1 - lr x wd divides the step)");
}

// validate(config, function) is config_fields.hpp's: a loop over the configuration's field table.

} // namespace adarank
