#pragma once
/// \file
/// `v_state`: what a compressor learns as it runs — v (a host copy and backend memory), whether
/// it exists, whether it is the fallback, and how often it was set — with its part of the saved
/// state and the checks that a loaded state is one the compressor can be in. The rule that
/// changes v is not here (v_rule.hpp); the compressor decides, this keeps.
///
/// The compressor's state blob ("velora.compressor", version 1) is, in order: value type size
/// (u8), D (i64), G (i64), the rule's settings (v_mode: kind u8, decay f64, seed u64), Z's
/// storage type (u8), the gradient scale (f64), then v_state::save: initialised (u8), fallback
/// (u8), update count (u64), v (s elements of T).
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "../concepts.hpp"
#include "../core/serialize.hpp"
#include "v_rule.hpp"

namespace velora {

template <backend B>
class v_state {
public:
    using T = typename B::value_type;

    /// What load() needs to know of the rule to tell a possible state from an impossible one.
    struct rule_facts {
        std::string_view name;          ///< rule.name()
        bool draws_initial_v = false;   ///< rule.initial_v gave v at construction
        bool computes_mean = false;     ///< rule.uses_batch for an uninitialised v or an initialised one
    };

    /// s zeros on the host; backend memory for v and for a candidate v, uninitialised.
    v_state(B& backend, index_t subtoken)
        : backend_(&backend), subtoken_(subtoken), host_v_(static_cast<std::size_t>(subtoken)), host_candidate_(host_v_.size()) {
        v_.resize(host_v_.size());
        candidate_.resize(host_v_.size());
    }

    [[nodiscard]] bool initialised() const noexcept { return initialised_; }
    [[nodiscard]] bool fallback() const noexcept { return fallback_; }
    [[nodiscard]] std::uint64_t updates() const noexcept { return updates_; }
    /// The host copy: all zero until initialised.
    [[nodiscard]] std::span<const T> host() const noexcept { return host_v_; }
    /// v in backend memory (unspecified until initialised).
    [[nodiscard]] const T* device() const noexcept { return v_.data(); }
    [[nodiscard]] v_current<T> current() const noexcept { return {host_v_, initialised_, updates_}; }

    /// |‖v‖₂ − 1| that load accepts for an initialised v: every v the compressor writes is a
    /// unit vector computed in double and rounded to T, so its norm is within ε_T/2 of 1 up to
    /// the double sums' rounding (≤ s·ε_f64/2 over saving and checking); the bound leaves a
    /// wide margin above both and rejects anything that was not meant to be a unit vector.
    [[nodiscard]] double unit_norm_tolerance() const noexcept {
        return 64 * static_cast<double>(std::numeric_limits<T>::epsilon()) +
               4 * static_cast<double>(subtoken_) * std::numeric_limits<double>::epsilon();
    }
    /// Every entry of the documented fallback v, 1/√s·(1, …, 1), in T.
    [[nodiscard]] T fallback_entry() const noexcept { return static_cast<T>(1.0 / std::sqrt(static_cast<double>(subtoken_))); }

    /// Commits a unit vector w (s entries, already normalised) as v: one update, no fallback.
    void commit(std::span<const double> w) {
        for (index_t j = 0; j < subtoken_; ++j) host_v_[static_cast<std::size_t>(j)] = static_cast<T>(w[static_cast<std::size_t>(j)]);
        backend_->copy_from_host(host_v_.data(), v_.data(), subtoken_);
        initialised_ = true;
        fallback_ = false;
        count_update();
    }

    /// A compress call's candidate v: the fallback when `fallback`, else d rounded to T, copied
    /// to backend memory. Nothing of v changes until adopt_candidate().
    const T* stage_candidate(std::span<const double> d, bool fallback) {
        const T entry = fallback_entry();
        for (std::size_t j = 0; j < d.size(); ++j) host_candidate_[j] = fallback ? entry : static_cast<T>(d[j]);
        backend_->copy_from_host(host_candidate_.data(), candidate_.data(), subtoken_);
        return candidate_.data();
    }
    /// Makes the staged candidate v (no allocation: the buffers trade places).
    void adopt_candidate(bool fallback) noexcept {
        host_v_.swap(host_candidate_);
        using std::swap;
        swap(v_, candidate_);
        initialised_ = true;
        fallback_ = fallback;
        count_update();
    }

    /// Writes initialised, fallback, the update count and v.
    void save(state_writer& w) const {
        w.put(static_cast<std::uint8_t>(initialised_));
        w.put(static_cast<std::uint8_t>(fallback_));
        w.put(updates_);
        w.put_array(std::span<const T>(host_v_));
    }

    /// Reads what save() wrote, which ends the blob, and commits it when it is a state the
    /// compressor can be in (see compressor::load_state); otherwise r.bad(…), nothing changed.
    void load(state_reader& r, const rule_facts& rule) {
        const auto initialised = r.get<std::uint8_t>();
        const auto fallback = r.get<std::uint8_t>();
        const auto updates = r.get<std::uint64_t>();
        auto v = r.get_array<T>(subtoken_);
        r.expect_end();
        check_meaning(r, rule, initialised, fallback, updates, v);
        host_v_ = std::move(v);
        backend_->copy_from_host(host_v_.data(), v_.data(), subtoken_);
        initialised_ = initialised != 0;
        fallback_ = fallback != 0;
        updates_ = updates;
    }

private:
    // The invariants every state written by save() satisfies.
    void check_meaning(const state_reader& r, const rule_facts& rule, std::uint8_t initialised, std::uint8_t fallback,
                       std::uint64_t updates, const std::vector<T>& v) const {
        if (initialised > 1) r.bad("state has the initialised flag = ", +initialised, " (must be 0 or 1)");
        if (fallback > 1) r.bad("state has the fallback flag = ", +fallback, " (must be 0 or 1)");
        for (std::size_t j = 0; j < v.size(); ++j)
            if (!std::isfinite(v[j])) r.bad("state has v[", j, "] = ", v[j], ", which is not finite");
        if (!initialised) {
            if (rule.draws_initial_v) r.bad("state says v is not initialised, but v rule ", rule.name, " draws v at construction");
            if (fallback) r.bad("state says v is not initialised but has the fallback flag set");
            if (updates != 0) r.bad("state says v is not initialised but its update count = ", updates, " (must be 0)");
            for (std::size_t j = 0; j < v.size(); ++j)
                if (v[j] != T(0)) r.bad("state says v is not initialised but v[", j, "] = ", v[j], " (must be 0)");
            return;
        }
        if (updates == 0) r.bad("state says v is initialised but its update count = 0 (must be >= 1)");
        double norm2 = 0;
        for (T e : v) norm2 += static_cast<double>(e) * static_cast<double>(e);
        const double norm = std::sqrt(norm2);
        if (!(std::abs(norm - 1.0) <= unit_norm_tolerance()))
            r.bad("state has v of norm ", norm, "; v must have unit norm (within ", unit_norm_tolerance(), ")");
        if (fallback) {
            if (!rule.computes_mean)
                r.bad("state has the fallback flag set, but v rule ", rule.name, " never computes a mean to fall back from");
            const T expected = fallback_entry();
            for (std::size_t j = 0; j < v.size(); ++j)
                if (v[j] != expected)
                    r.bad("state has the fallback flag set but v is not the fallback 1/sqrt(s) (1, ..., 1): v[", j, "] = ", v[j],
                          " instead of ", expected);
        }
    }

    // Saturates instead of wrapping: an initialised compressor never reports 0 updates.
    void count_update() noexcept {
        if (updates_ != std::numeric_limits<std::uint64_t>::max()) ++updates_;
    }

    B* backend_;
    index_t subtoken_;
    std::vector<T> host_v_;                    // current v, host copy (all zero until initialised)
    std::vector<T> host_candidate_;            // candidate v of a compress call
    typename B::template buffer<T> v_;         // current v, backend memory
    typename B::template buffer<T> candidate_; // candidate v of a compress call, backend memory
    bool initialised_ = false;
    bool fallback_ = false;
    std::uint64_t updates_ = 0;
};

} // namespace velora
