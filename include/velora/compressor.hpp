#pragma once
/// \file
/// VeLoRA activation compression (Miles et al., arXiv 2405.17991).
///
/// A linear layer keeps its input X (T×D) only to form dW = dYᵀX in the backward pass.
/// `compressor` keeps Z = X Kᵀ (T×G) instead, with K = I_G ⊗ vᵀ (G×D, orthonormal rows):
/// every token is cut into G sub-tokens of s = ceil(D/G) features (the last one zero-padded)
/// and each sub-token is replaced by its coordinate along the unit vector v ∈ R^s.
/// The weight gradient then comes out in factored form,
///
///     dW ≈ scale · dYᵀ X̂ = scale · (dYᵀ Z) K = scale · A K,     A = dYᵀ Z ∈ R^{O×G},
///
/// which costs 2·T·O·G flops instead of 2·T·O·D and never materialises X̂. The expansion to a
/// dense O×D gradient, and the reconstruction X̂ = Z K, happen only when a caller asks.
///
/// The compressor is assembled from files of one concern each, under velora/compression/:
/// record.hpp (activation_record, factored_gradient), v_rule.hpp (the v_rule concept and the
/// library's five rules), v_mode.hpp (the run-time choice among them, the default rule),
/// config.hpp (compressor_config), state.hpp (v and its flags, their saved form),
/// gradient_products.hpp (the backward products of a record); deprecated.hpp holds the old
/// spellings. This file holds `compressor` itself: construction, set_v, compress, workspaces and
/// the state blob.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "compression/config.hpp"
#include "compression/gradient_products.hpp"
#include "compression/record.hpp"
#include "compression/state.hpp"
#include "compression/v_mode.hpp"
#include "compression/v_rule.hpp"
#include "concepts.hpp"
#include "core/checked.hpp"
#include "core/error.hpp"
#include "core/serialize.hpp"
#include "core/storage.hpp"
#include "core/view.hpp"
#include "deprecated.hpp"

namespace velora {

/// The library's activation compressor. `Rule` chooses v: the default `v_mode` picks one of
/// the library's five rules at run time; any type that models `v_rule<Rule, value_type>`
/// (v_rule.hpp) can replace it, with no virtual call or allocation added to compress.
template <backend B, class Rule = v_mode>
class compressor : public deprecated_compressor_spellings<compressor<B, Rule>, activation_record<B>, typename B::value_type> {
    static_assert(v_rule<Rule, typename B::value_type>,
                  "velora::compressor<B, Rule>: Rule must model velora::v_rule<Rule, B::value_type> (see velora/compression/v_rule.hpp)");

public:
    using value_type = typename B::value_type;
    using record_type = activation_record<B>;
    using rule_type = Rule;
    using config_type = basic_compressor_config<Rule>;
    using T = value_type;

    /// |‖v‖₂ − 1| that load_state accepts for an initialised v, with s = subtoken_size() (see
    /// v_state::unit_norm_tolerance).
    [[nodiscard]] double unit_norm_tolerance() const noexcept { return v_.unit_norm_tolerance(); }

    /// Throws std::invalid_argument if the configuration is invalid for `features` = D (the
    /// rule's own settings included), if the sub-token size s = ceil(D/G) is too large for the
    /// address space, or if the rule's initial_v is not a finite unit vector.
    compressor(B& backend, index_t features, config_type config = {})
        : backend_(&backend), config_(validated_compressor_config<T>(features, config)), features_(features),
          subtoken_(subtoken_size_for(features, config.groups)), v_(backend, subtoken_), host_sum_(static_cast<std::size_t>(subtoken_)),
          next_(host_sum_.size()), products_(backend) {
        sum_.resize(host_sum_.size());
        zero_v_.resize(host_sum_.size());
        backend_->copy_from_host(v_.host().data(), zero_v_.data(), subtoken_);   // the host v is all zeros until initialised
        // A rule with a v before any data (random mode) is initialised from construction on,
        // which load_state relies on.
        if (config_.v.initial_v(std::span<double>(next_))) {
            double norm2 = 0;
            for (double e : next_) norm2 += e * e;
            detail::require(std::abs(std::sqrt(norm2) - 1.0) <= unit_norm_tolerance(), "velora::compressor::compressor", "the v rule ",
                            config_.v.name(), "'s initial_v is not a finite unit vector (norm ", std::sqrt(norm2), ")");
            v_.commit(next_);
            initial_v_ = true;
        }
    }

    [[nodiscard]] const config_type& config() const noexcept { return config_; }
    [[nodiscard]] index_t features() const noexcept { return features_; }
    [[nodiscard]] index_t groups() const noexcept { return config_.groups; }
    [[nodiscard]] index_t subtoken_size() const noexcept { return subtoken_; }
    /// True once v exists (after the first compress, set_v, load_state, or at construction in random mode).
    [[nodiscard]] bool initialised() const noexcept { return v_.initialised(); }
    /// True when the current v is the documented fallback 1/√s·(1, …, 1), used when the mean to
    /// normalise was exactly zero (e.g. an all-zero batch).
    [[nodiscard]] bool fallback_used() const noexcept { return v_.fallback(); }
    /// Number of times v has been set or updated (saturates at 2^64 − 1).
    [[nodiscard]] std::uint64_t v_updates() const noexcept { return v_.updates(); }
    /// The current v (host copy, s elements); empty until initialised().
    [[nodiscard]] std::span<const T> v() const noexcept { return v_.initialised() ? v_.host() : std::span<const T>(); }

    /// Sets v (normalised here). Allowed with every rule; in first_batch_mean mode it replaces
    /// the first-batch estimate. Throws for a wrong length, non-finite or all-zero vector.
    /// `v` may be this compressor's own v() (it is copied before anything changes).
    void set_v(std::span<const T> v) {
        constexpr const char* fn = "velora::compressor::set_v";
        detail::require(static_cast<index_t>(v.size()) == subtoken_, fn, "argument 'v' has ", v.size(),
                        " elements but the sub-token size is s = ", subtoken_);
        std::vector<double> w(v.begin(), v.end());
        for (std::size_t j = 0; j < w.size(); ++j)
            detail::require(std::isfinite(w[j]), fn, "argument 'v' has a non-finite entry: v[", j, "] = ", w[j]);
        detail::require(normalise_in_place(w) > 0, fn, "argument 'v' is the zero vector");
        v_.commit(w);
    }

    // ------------------------------------------------------------------ workspaces
    /// Bytes of scratch the compressor itself grows for batches of up to `max_tokens` tokens,
    /// from the shapes and the configuration: the spare Z that compress projects into
    /// (T·G·storage bytes) and the chunk in which the gradient products widen a narrow Z
    /// (min(T, 2^15/G)·G value-type elements; none when Z is stored as the value type). The
    /// s-element vectors allocated at construction are not counted; records are the caller's
    /// (record_bytes).
    [[nodiscard]] std::size_t workspace_bytes(index_t max_tokens) const {
        return z_bytes(max_tokens, "velora::compressor::workspace_bytes") +
               gradient_products<B>::workspace_bytes(max_tokens, config_.groups, config_.z_storage);
    }
    /// Bytes a record written by this compressor holds at `max_tokens` tokens (Z and its v).
    [[nodiscard]] std::size_t record_bytes(index_t max_tokens) const {
        return z_bytes(max_tokens, "velora::compressor::record_bytes") + static_cast<std::size_t>(subtoken_) * sizeof(T);
    }
    /// Allocates the workspace for up to `max_tokens` tokens now. Together with
    /// reserve(max_tokens, record) for every record it writes, compress, gradient_factor,
    /// expand_weight_grad, reconstruct, ssf_weight_grad and factored allocate nothing for
    /// batches of up to `max_tokens` tokens; it also sizes the backend's reduction scratch for
    /// this compressor's widths (D), where the backend keeps one (concept reduction_reserving).
    void reserve(index_t max_tokens) {
        grow(z_next_, z_bytes(max_tokens, "velora::compressor::reserve"));
        products_.reserve(max_tokens, config_.groups, config_.z_storage);
        reserve_reductions_for(*backend_, features_);
    }
    /// Gives `record` the memory of a compress of up to `max_tokens` tokens. A record that must
    /// grow forgets its content (as clear()); call it before the record's first compress.
    void reserve(index_t max_tokens, record_type& record) {
        const std::size_t bytes = z_bytes(max_tokens, "velora::compressor::reserve");
        if (record.z_.capacity() < bytes) {
            record.clear();
            record.z_.resize(bytes);
        }
        grow(record.v_, static_cast<std::size_t>(subtoken_));
    }

    // ------------------------------------------------------------------ compress
    /// Compresses X (T×D) into `out`, updating v first as the mode prescribes.
    ///
    /// Returns status::ok, or status::degenerate_input when the mean to normalise was zero and
    /// the fallback v was used (the record is then made with it). A numerical event in X leaves
    /// the compressor AND `out` exactly as they were (a record that held a valid compress still
    /// holds it, bit for bit) and returns
    /// - status::non_finite_input when X holds a NaN or an Inf (an activation that diverged,
    ///   e.g. under mixed precision), or
    /// - status::overflow when X is finite but a result is not: the sub-token sum behind the
    ///   batch mean, or a projected value in the value type or once narrowed to the storage
    ///   type (|Z| > 65504 in f16).
    /// Throws std::invalid_argument (nothing changed) for a wrong shape, or given mode without
    /// set_v.
    ///
    /// Z is projected into a buffer that the compressor owns, which is swapped with the record's
    /// on success: a compressor keeps one spare Z of the largest T it compressed, and calls at a
    /// T it has seen allocate nothing once each record has been written at that T (or, after
    /// reserve(max_tokens) and reserve(max_tokens, record), at any T up to max_tokens).
    status compress(const_matrix_view<T> x, record_type& out) {
        constexpr const char* fn = "velora::compressor::compress";
        check_view(x, fn, "x");
        detail::require(x.cols == features_, fn, "argument 'x' has ", x.cols, " columns but the compressor was built for D = ", features_);
        const v_current<T> now = v_.current();
        const bool update = config_.v.uses_batch(now);
        detail::require(update || v_.initialised(), fn, config_.v.name(), " requires set_v() before the first compress");
        const std::size_t z_bytes = this->z_bytes(x.rows, fn);

        // Size the spare Z first: an allocation that fails here has changed nothing. The record's
        // buffer becomes the next spare when this call succeeds; if it is too small for this T,
        // its replacement is sized now for the same reason.
        z_next_.resize(z_bytes);
        if (out.z_.capacity() < z_bytes) z_spare_.resize(z_bytes);

        // 1. The v for this call, decided by the rule without touching the compressor's state.
        bool zero_mean = false;
        const T* v = v_.device();
        if (update) {
            if (!batch_sum(x)) return failure_outcome(x);   // into next_
            config_.v.update(std::span<double>(next_), now);
            zero_mean = normalise_in_place(next_) == 0.0;
            v = v_.stage_candidate(next_, zero_mean);
        }

        // 2. Project into the spare Z; the record is not touched.
        if (!project(x, v)) return failure_outcome(x);

        // 3. Commit. The record's v grows on its first use only, before anything is changed.
        out.v_.resize(static_cast<std::size_t>(subtoken_));
        backend_->copy(v, out.v_.data(), subtoken_);
        using std::swap;
        swap(out.z_, z_next_);
        if (z_next_.capacity() < z_bytes) z_next_ = std::move(z_spare_);
        out.tokens_ = x.rows;
        out.features_ = features_;
        out.groups_ = config_.groups;
        out.subtoken_ = subtoken_;
        out.storage_ = config_.z_storage;
        out.scale_ = static_cast<T>(config_.scale);
        if (update) v_.adopt_candidate(zero_mean);
        return zero_mean ? status::degenerate_input : status::ok;
    }

    /// What compress reports for a batch whose sub-token sum or projection is not finite:
    /// status::non_finite_input when x holds a NaN or an Inf, status::overflow when x is finite.
    /// For a caller that met such a sum itself (share_first_batch_v's reduced sum). One pass over
    /// x; sizes the spare Z for x's tokens (the only allocation, on this failure path), changes no
    /// state.
    [[nodiscard]] status classify_failure(const_matrix_view<T> x) {
        constexpr const char* fn = "velora::compressor::classify_failure";
        check_view(x, fn, "x");
        detail::require(x.cols == features_, fn, "argument 'x' has ", x.cols, " columns but the compressor was built for D = ", features_);
        z_next_.resize(z_bytes(x.rows, fn));
        return failure_outcome(x);
    }

    /// Convenience overload that returns a new record (allocates; reuse a record in a loop).
    /// Having no status to return, it throws velora::numerical_error carrying
    /// status::non_finite_input or status::overflow where the other overload returns them
    /// (nothing changed, as there). A degenerate_input batch still gives a record, made with
    /// the fallback v; fallback_used() says whether a record was made with it.
    [[nodiscard]] record_type compress(const_matrix_view<T> x) {
        record_type record;
        const status outcome = compress(x, record);
        if (outcome == status::non_finite_input || outcome == status::overflow) {
            std::ostringstream what;
            what << "velora::compressor::compress: argument 'x' (" << x.rows << "x" << x.cols << ") "
                 << (outcome == status::non_finite_input ? "contains NaN or Inf"
                                                         : "is finite but its sub-token sum or projection overflows the value or storage type")
                 << " (status " << to_string(outcome) << "; compress(x, record) returns it instead of throwing)";
            throw numerical_error(outcome, what.str());
        }
        return record;
    }

    // ------------------------------------------------------------------ gradient products
    // See gradient_products.hpp for what each computes. gradient_factor writes A = dYᵀZ, the
    // factor of dW; expand_weight_grad turns A into dW itself.
    void gradient_factor(const record_type& record, const_matrix_view<T> dy, matrix_view<T> a) { products_.gradient_factor(record, dy, a); }
    [[nodiscard]] factored_gradient<T> factored(const record_type& record, const_matrix_view<T> a) const {
        return products_.factored(record, a);
    }
    void expand_weight_grad(const record_type& record, const_matrix_view<T> a, matrix_view<T> dw) {
        products_.expand_weight_grad(record, a, dw);
    }
    void reconstruct(const record_type& record, matrix_view<T> xhat) { products_.reconstruct(record, xhat); }
    void ssf_weight_grad(const record_type& record, const_matrix_view<T> dy, T* dw) { products_.ssf_weight_grad(record, dy, dw); }

    // ------------------------------------------------------------------ state
    static constexpr std::string_view state_kind = "velora.compressor";
    static constexpr std::uint32_t state_version = 1;

    /// v, its initialised and fallback flags, the update count (the EMA's state) and the
    /// configuration they belong to (the layout is in state.hpp).
    [[nodiscard]] std::vector<std::byte> save_state() const {
        state_writer w(state_kind, state_version);
        w.put(static_cast<std::uint8_t>(sizeof(T)));
        w.put(static_cast<std::int64_t>(features_));
        w.put(static_cast<std::int64_t>(config_.groups));
        config_.v.save_settings(w);
        w.put(static_cast<std::uint8_t>(config_.z_storage));
        w.put(config_.scale);
        v_.save(w);
        return std::move(w).finish();
    }

    /// Restores state saved by save_state() of a compressor with the same configuration.
    /// Throws state_format_error (a std::invalid_argument) and changes nothing when the blob is
    /// malformed, was saved with another configuration, or describes a state that no sequence
    /// of calls can put a compressor in:
    /// - a v entry that is not finite;
    /// - not initialised, but a v that is not all zero, a non-zero update count or the
    ///   fallback flag set, or a rule that draws v at construction (random mode);
    /// - initialised, but an update count of 0 or a v whose norm is not 1 within
    ///   unit_norm_tolerance();
    /// - the fallback flag with a rule that never takes v from a batch (random, given), or with a v that is
    ///   not exactly the fallback 1/√s·(1, …, 1);
    /// - a flag byte other than 0 or 1.
    void load_state(std::span<const std::byte> blob) {
        constexpr const char* fn = "velora::compressor::load_state";
        state_reader r(blob, state_kind, state_version, fn);
        expect_equal(r, "value type size", r.get<std::uint8_t>(), static_cast<std::uint8_t>(sizeof(T)));
        expect_equal(r, "features D", r.get<std::int64_t>(), static_cast<std::int64_t>(features_));
        expect_equal(r, "groups G", r.get<std::int64_t>(), static_cast<std::int64_t>(config_.groups));
        config_.v.load_settings(r);
        const auto stored = r.get<std::uint8_t>();
        if (stored != static_cast<std::uint8_t>(config_.z_storage))
            r.bad("state was saved with storage type ", is_valid(storage{stored}) ? to_string(storage{stored}) : "invalid",
                  " but this compressor stores ", to_string(config_.z_storage));
        expect_equal(r, "gradient scale", r.get<double>(), config_.scale);
        // Reads and checks the rest, then commits; r.bad before anything changed otherwise.
        const bool computes_mean = config_.v.uses_batch(v_current<T>{v_.host(), false, 0}) ||
                                   config_.v.uses_batch(v_current<T>{v_.host(), true, 1});
        v_.load(r, {config_.v.name(), initial_v_, computes_mean});
    }

private:
    template <class V>
    static void expect_equal(const state_reader& r, std::string_view field, V stored, V live) {
        if (!(stored == live)) r.bad("state was saved with ", field, " = ", +stored, " but this compressor has ", +live);
    }

    // Bytes of Z at `tokens` tokens. check_view bounded X's extent, and G <= D = X.cols while a
    // storage element is no wider than T, so Z's bytes cannot exceed X's in compress; the
    // checked forms make that an error message instead of an assumption, here where the
    // allocation size is formed (and for the sizes a host asks about).
    [[nodiscard]] std::size_t z_bytes(index_t tokens, const char* fn) const {
        detail::require(tokens >= 0, fn, "argument 'max_tokens' must not be negative, got ", tokens);
        const index_t z_elements = detail::checked_mul(tokens, config_.groups, fn, "Z's element count T x G");
        return static_cast<std::size_t>(detail::checked_elements(z_elements, storage_bytes(config_.z_storage), fn, "Z")) *
               storage_bytes(config_.z_storage);
    }

    template <class Buffer>
    static void grow(Buffer& buffer, std::size_t n) {
        if (buffer.capacity() < n) buffer.resize(n);
    }

    // next_ = the sub-token sum of x in double. False when it is not finite (NaN/Inf in x, or a
    // sum that overflows T).
    [[nodiscard]] bool batch_sum(const_matrix_view<T> x) {
        backend_->sum_subtokens(x, subtoken_, sum_.data());
        backend_->copy_to_host(sum_.data(), host_sum_.data(), subtoken_);
        for (std::size_t j = 0; j < next_.size(); ++j) {
            next_[j] = static_cast<double>(host_sum_[j]);
            if (!std::isfinite(next_[j])) return false;
        }
        return true;
    }

    // Z = x (I_G ⊗ vᵀ) into the spare Z (z_next_) in the storage type; false when a value as
    // stored is not finite.
    [[nodiscard]] bool project(const_matrix_view<T> x, const T* v) {
        return visit_storage(config_.z_storage, [&](auto tag) {
            using U = decltype(tag);
            matrix_view<U> z{reinterpret_cast<U*>(z_next_.data()), x.rows, config_.groups, config_.groups};
            return backend_->project_subtokens(x, v, subtoken_, z);
        });
    }

    // Only after a sum or projection was not finite: non_finite_input when x holds a NaN or an
    // Inf, overflow when x is finite. x·0 is NaN exactly where x is NaN or ±Inf (IEEE 754) and
    // 0 elsewhere, so the projection of x on the zero vector is finite exactly when x is: one
    // more pass over x, with the backend's own kernel, on the failure path only. The spare Z
    // it writes holds nothing of value at this point.
    [[nodiscard]] status failure_outcome(const_matrix_view<T> x) {
        return project(x, zero_v_.data()) ? status::overflow : status::non_finite_input;
    }

    B* backend_;
    config_type config_;
    index_t features_;
    index_t subtoken_;
    v_state<B> v_;                                      // v, its flags and update count: the state
    bool initial_v_ = false;                            // the rule gave v at construction
    std::vector<T> host_sum_;                           // sub-token sum, host copy
    std::vector<double> next_;                          // the batch direction, then the candidate v, in double
    typename B::template buffer<T> zero_v_;             // s zeros: the finiteness test of X (failure_outcome)
    typename B::template buffer<T> sum_;                // sub-token sum, backend memory
    typename B::template buffer<std::byte> z_next_;     // the spare Z: projected into, swapped with the record's on success
    typename B::template buffer<std::byte> z_spare_;    // replaces a record's too-small buffer as the next spare
    gradient_products<B> products_;                     // the backward products and their conversion scratch
};

} // namespace velora
