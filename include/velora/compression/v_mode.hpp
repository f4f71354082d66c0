#pragma once
/// \file
/// `v_mode`: the compressor's default v rule, one of the library's five rules (v_rule.hpp)
/// chosen at run time (from a command line, a torch option, a saved configuration). It is a
/// `v_rule` itself, and forwards every decision to the rule type it names, so the five rules
/// are written once, in v_rule.hpp. A host that fixes its rule at compile time can name the
/// rule type instead (`compressor<B, v_rules::ema>`); the state bytes are the same.
#include <cstdint>
#include <span>
#include <string_view>

#include "v_rule.hpp"

namespace velora {

/// How the projection vector v is chosen. Construct with the named factories.
struct v_mode {
    enum class kind : std::uint8_t { first_batch_mean = 0, batch_mean = 1, ema = 2, random = 3, given = 4 };
    kind type = kind::first_batch_mean;
    double decay = 0.0;        ///< ema only: weight of the previous v
    std::uint64_t seed = 0;    ///< random only

    /// Default and the paper's best: v = normalize(mean of all sub-tokens of the first batch), then frozen.
    static constexpr v_mode first_batch_mean() noexcept { return {kind::first_batch_mean, 0.0, 0}; }
    /// v = normalize(mean of this batch's sub-tokens), recomputed on every compress call.
    static constexpr v_mode batch_mean() noexcept { return {kind::batch_mean, 0.0, 0}; }
    /// v ← normalize(decay · v + (1 − decay) · normalize(batch mean)); the first batch sets v.
    /// The batch mean is normalised before mixing so that `decay` means the same whatever the
    /// scale of the activations.
    static constexpr v_mode ema(double decay) noexcept { return {kind::ema, decay, 0}; }
    /// v = normalize(g), g ~ N(0, I_s) drawn from the counter-based generator with `seed`.
    static constexpr v_mode random(std::uint64_t seed) noexcept { return {kind::random, 0.0, seed}; }
    /// The caller supplies v through `compressor::set_v` before the first compress.
    static constexpr v_mode given() noexcept { return {kind::given, 0.0, 0}; }

    friend constexpr bool operator==(const v_mode&, const v_mode&) = default;

    /// Calls f with the library rule this mode names (after validate(), `type` is one of five).
    template <class F>
    constexpr decltype(auto) visit(F&& f) const {
        switch (type) {
        case kind::first_batch_mean: return f(v_rules::first_batch_mean{});
        case kind::batch_mean: return f(v_rules::batch_mean{});
        case kind::ema: return f(v_rules::ema{decay});
        case kind::random: return f(v_rules::random{seed});
        case kind::given: break;
        }
        return f(v_rules::given{});
    }

    // ---- the v_rule members (see v_rule.hpp), each the named rule's own
    [[nodiscard]] std::string_view name() const noexcept {
        return visit([](auto rule) { return std::string_view(rule.name()); });
    }
    void validate(const char* fn) const {
        detail::require(static_cast<std::uint8_t>(type) <= 4, fn, "config.v has the invalid mode ", static_cast<int>(type));
        visit([&](auto rule) { rule.validate(fn); });
    }
    [[nodiscard]] bool initial_v(std::span<double> v) const {
        return visit([&](auto rule) { return rule.initial_v(v); });
    }
    template <class T>
    [[nodiscard]] bool uses_batch(const v_current<T>& now) const noexcept {
        return visit([&](auto rule) { return rule.uses_batch(now); });
    }
    template <class T>
    void update(std::span<double> d, const v_current<T>& now) const noexcept {
        visit([&](auto rule) { rule.update(d, now); });
    }
    // The fields as they are (also the settings a mode does not use), as states always held them.
    void save_settings(state_writer& w) const { v_rules::save_library_settings(w, static_cast<std::uint8_t>(type), decay, seed); }
    void load_settings(state_reader& r) const { v_rules::load_library_settings(r, static_cast<std::uint8_t>(type), decay, seed); }
};

constexpr std::string_view to_string(v_mode::kind k) noexcept {
    return static_cast<std::uint8_t>(k) <= 4 ? v_rules::library_rule_name(static_cast<std::uint8_t>(k)) : "unknown";
}

static_assert(v_rule<v_mode, float> && v_rule<v_mode, double>);

} // namespace velora
