#pragma once
/// \file
/// The VeLoRA projection vector v as an open extension point: the `v_rule` concept, which a
/// user type can implement without editing the library, and the library's five rules as types
/// that implement it (`v_rules::first_batch_mean`, `batch_mean`, `ema`, `random`, `given`).
/// `v_mode` (v_mode.hpp) picks one of the five at run time and is the compressor's default.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>

#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../core/serialize.hpp"

namespace velora {

/// What a rule sees of the compressor's current v when it decides and updates.
template <class T>
struct v_current {
    std::span<const T> v;         ///< s elements: the current unit v, or all zeros before the first one
    bool initialised = false;     ///< a v exists (set_v, a first batch, load_state or the rule's initial_v)
    std::uint64_t updates = 0;    ///< times v was set or updated so far (saturates at 2^64 − 1)
};

/// Scales d to unit norm and returns its former norm (0 leaves d as it is; the norm returned
/// may be Inf for huge finite entries). When the squares overflow or underflow (sums of
/// activations of 1e200 in double, a set_v argument of 1e-300), d is first scaled by its
/// largest magnitude, so the result is still the unit direction. Every v the library makes
/// goes through this function.
inline double normalise_in_place(std::span<double> d) noexcept {
    double norm2 = 0;
    for (double e : d) norm2 += e * e;
    if (norm2 >= std::numeric_limits<double>::min() && norm2 <= std::numeric_limits<double>::max()) {
        const double norm = std::sqrt(norm2);
        for (double& e : d) e /= norm;
        return norm;
    }
    double largest = 0;
    for (double e : d) largest = std::max(largest, std::abs(e));
    if (!(largest > 0)) return 0.0;
    double scaled2 = 0;
    for (double e : d) scaled2 += (e / largest) * (e / largest);
    const double scaled = std::sqrt(scaled2);
    for (double& e : d) e = e / largest / scaled;
    return largest * scaled;
}

/// A rule that chooses the projection vector v ∈ R^s of a `velora::compressor<B, Rule>` whose
/// backend value type is T. A rule is configuration: it holds settings, never evolving state.
/// What evolves (v, whether it exists, the update count, the fallback flag) is kept, saved and
/// restored by the compressor and handed to the rule as `v_current<T>`. Every member is const.
///
/// A rule provides, for `const R rule`, a `v_current<T> now` and `std::span<double> d` of s
/// elements:
/// - `rule.name()` → string_view: how messages name the rule (e.g. "v_mode::ema").
/// - `rule.validate(fn)`: throws std::invalid_argument (with detail::require, naming `fn`) for
///   settings it cannot work with; called once by the compressor's constructor.
/// - `rule.initial_v(d)` → bool: true when the rule has a v before any data. It then fills d
///   with a finite unit vector (use normalise_in_place), which the constructor commits as v
///   (rounded to T; one update). Such a compressor is initialised from construction on, and
///   load_state refuses a state that says it is not. False leaves d unspecified.
/// - `rule.uses_batch(now)` → bool: whether the compress call about to run takes v from its
///   batch. When it is false, the call projects with the current v unchanged; it throws
///   std::invalid_argument ("<name> requires set_v() before the first compress") when no v
///   exists yet. So a rule that needs a first batch answers true while `!now.initialised`, and
///   a rule whose v comes only from the caller (set_v) answers false.
/// - `rule.update(d, now)`: only when uses_batch(now) was true, and only for a batch that is
///   finite. On entry d holds the sum of all T·G sub-tokens of the batch in double (the padded
///   zeros of the last group included; the sum, not the mean: only its direction matters). On
///   return d holds the new v up to its length: the compressor then normalises it with
///   normalise_in_place, or, when d is exactly zero, uses the fallback 1/√s·(1, …, 1) and
///   reports status::degenerate_input. The new v is committed only when the whole call succeeds.
/// - `rule.save_settings(w)` (state_writer&): writes the rule's settings into the
///   compressor's state; `rule.load_settings(r)` (state_reader&) reads exactly those fields and
///   calls r.bad(…) when they differ from this rule's, so that a state saved under another rule
///   is refused. The library's rules write (tag u8 0..4, decay f64, seed u64); a user rule
///   should begin with a tag byte of its own (say ≥ 128) so that the library rules refuse its
///   states and it refuses theirs.
///
/// No call may allocate in uses_batch or update (compress calls them) if the host relies on
/// compress allocating nothing.
template <class R, class T>
concept v_rule = std::copy_constructible<R> &&
                 requires(const R& rule, const v_current<T>& now, std::span<double> d, const char* fn, state_writer& w, state_reader& r) {
                     { rule.name() } -> std::convertible_to<std::string_view>;
                     rule.validate(fn);
                     { rule.initial_v(d) } -> std::same_as<bool>;
                     { rule.uses_batch(now) } -> std::same_as<bool>;
                     rule.update(d, now);
                     rule.save_settings(w);
                     rule.load_settings(r);
                 };

/// The library's five rules. Each saves the same settings bytes as the `v_mode` that selects
/// it, so a state moves between `compressor<B, v_rules::ema>` and `compressor<B>` with
/// v_mode::ema(decay).
namespace v_rules {

/// The names of the library rules by tag, as states and messages spell them.
constexpr std::string_view library_rule_name(std::uint8_t tag) noexcept {
    constexpr std::string_view names[] = {"first_batch_mean", "batch_mean", "ema", "random", "given"};
    return tag < 5 ? names[tag] : "invalid";
}

/// Writes a library rule's settings: tag, ema decay, random seed.
inline void save_library_settings(state_writer& w, std::uint8_t tag, double decay, std::uint64_t seed) {
    w.put(tag);
    w.put(decay);
    w.put(seed);
}

/// Reads what save_library_settings wrote and refuses settings other than these.
inline void load_library_settings(state_reader& r, std::uint8_t tag, double decay, std::uint64_t seed) {
    const auto stored = r.get<std::uint8_t>();
    if (stored != tag)
        r.bad("state was saved with v mode ", library_rule_name(stored), " but this compressor uses ", library_rule_name(tag));
    const auto stored_decay = r.get<double>();
    if (!(stored_decay == decay)) r.bad("state was saved with ema decay = ", stored_decay, " but this compressor has ", decay);
    const auto stored_seed = r.get<std::uint64_t>();
    if (stored_seed != seed) r.bad("state was saved with random seed = ", stored_seed, " but this compressor has ", seed);
}

/// The default and the paper's best: v = normalize(mean of all sub-tokens of the first batch),
/// then frozen.
struct first_batch_mean {
    static constexpr std::uint8_t tag = 0;
    static constexpr std::string_view name() noexcept { return "v_mode::first_batch_mean"; }
    void validate(const char*) const noexcept {}
    bool initial_v(std::span<double>) const noexcept { return false; }
    template <class T>
    bool uses_batch(const v_current<T>& now) const noexcept { return !now.initialised; }
    template <class T>
    void update(std::span<double>, const v_current<T>&) const noexcept {}   // v is the batch direction
    void save_settings(state_writer& w) const { save_library_settings(w, tag, 0.0, 0); }
    void load_settings(state_reader& r) const { load_library_settings(r, tag, 0.0, 0); }
};

/// v = normalize(mean of this batch's sub-tokens), on every compress call.
struct batch_mean {
    static constexpr std::uint8_t tag = 1;
    static constexpr std::string_view name() noexcept { return "v_mode::batch_mean"; }
    void validate(const char*) const noexcept {}
    bool initial_v(std::span<double>) const noexcept { return false; }
    template <class T>
    bool uses_batch(const v_current<T>&) const noexcept { return true; }
    template <class T>
    void update(std::span<double>, const v_current<T>&) const noexcept {}   // v is the batch direction
    void save_settings(state_writer& w) const { save_library_settings(w, tag, 0.0, 0); }
    void load_settings(state_reader& r) const { load_library_settings(r, tag, 0.0, 0); }
};

/// v ← normalize(decay · v + (1 − decay) · normalize(batch mean)); the first batch sets v. The
/// batch mean is normalised before mixing so that `decay` means the same whatever the scale of
/// the activations.
struct ema {
    static constexpr std::uint8_t tag = 2;
    double decay = 0.0;   ///< weight of the previous v, 0 <= decay < 1
    static constexpr std::string_view name() noexcept { return "v_mode::ema"; }
    bool initial_v(std::span<double>) const noexcept { return false; }
    void validate(const char* fn) const {
        detail::require(decay >= 0 && decay < 1, fn, "v_mode::ema(decay) needs 0 <= decay < 1, got ", decay);
    }
    template <class T>
    bool uses_batch(const v_current<T>&) const noexcept { return true; }
    template <class T>
    void update(std::span<double> d, const v_current<T>& now) const noexcept {
        normalise_in_place(d);
        if (!now.initialised) return;
        for (std::size_t j = 0; j < d.size(); ++j) d[j] = decay * static_cast<double>(now.v[j]) + (1.0 - decay) * d[j];
    }
    void save_settings(state_writer& w) const { save_library_settings(w, tag, decay, 0); }
    void load_settings(state_reader& r) const { load_library_settings(r, tag, decay, 0); }
};

/// v = normalize(g), g ~ N(0, I_s): the first s values of the counter-based generator with
/// `seed`. Should they all be zero (each one is with probability 2^-53), the next s are taken.
/// v exists from construction on; set_v replaces it.
struct random {
    static constexpr std::uint8_t tag = 3;
    std::uint64_t seed = 0;
    void validate(const char*) const noexcept {}
    static constexpr std::string_view name() noexcept { return "v_mode::random"; }
    bool initial_v(std::span<double> v) const noexcept {
        const auto s = static_cast<std::uint64_t>(v.size());
        for (std::uint64_t round = 0;; ++round) {
            for (std::uint64_t j = 0; j < s; ++j) v[j] = gaussian_at(seed, round * s + j);
            if (normalise_in_place(v) > 0) return true;
        }
    }
    template <class T>
    bool uses_batch(const v_current<T>&) const noexcept { return false; }
    template <class T>
    void update(std::span<double>, const v_current<T>&) const noexcept {}   // never called: uses_batch is false
    void save_settings(state_writer& w) const { save_library_settings(w, tag, 0.0, seed); }
    void load_settings(state_reader& r) const { load_library_settings(r, tag, 0.0, seed); }
};

/// The caller supplies v through `compressor::set_v` before the first compress.
struct given {
    static constexpr std::uint8_t tag = 4;
    static constexpr std::string_view name() noexcept { return "v_mode::given"; }
    void validate(const char*) const noexcept {}
    bool initial_v(std::span<double>) const noexcept { return false; }
    template <class T>
    bool uses_batch(const v_current<T>&) const noexcept { return false; }
    template <class T>
    void update(std::span<double>, const v_current<T>&) const noexcept {}   // never called: uses_batch is false
    void save_settings(state_writer& w) const { save_library_settings(w, tag, 0.0, 0); }
    void load_settings(state_reader& r) const { load_library_settings(r, tag, 0.0, 0); }
};

} // namespace v_rules

static_assert(v_rule<v_rules::first_batch_mean, float> && v_rule<v_rules::batch_mean, float> && v_rule<v_rules::ema, double> &&
              v_rule<v_rules::random, float> && v_rule<v_rules::given, double>);

} // namespace velora
