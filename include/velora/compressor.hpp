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
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "concepts.hpp"
#include "core/checked.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "core/serialize.hpp"
#include "core/storage.hpp"
#include "core/view.hpp"

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
};

constexpr std::string_view to_string(v_mode::kind k) noexcept {
    switch (k) {
    case v_mode::kind::first_batch_mean: return "first_batch_mean";
    case v_mode::kind::batch_mean: return "batch_mean";
    case v_mode::kind::ema: return "ema";
    case v_mode::kind::random: return "random";
    case v_mode::kind::given: return "given";
    }
    return "unknown";
}

/// Hyper-parameters of one compressed input. Validated once, by the compressor's constructor.
struct compressor_config {
    index_t groups = 32;                   ///< G, sub-tokens per token; 1 <= G <= D
    v_mode v = v_mode::first_batch_mean();
    storage z_storage = storage::f32;      ///< element type of Z; f64 only with a double backend
    double scale = 1.0;                    ///< multiplies the weight gradient only (never dX or db)
};

template <backend B>
class compressor;

/// What one compress call keeps for the backward pass: Z (T×G in the storage type) and a copy
/// of the v it was projected with (so later changes of v, e.g. in batch_mean mode, cannot
/// desynchronise forward and backward). Several layers that read the same input share one
/// record. A record is reused across steps without allocating once it has seen the largest T
/// (its Z buffer trades places with the compressor's spare on every successful compress). A
/// compress that returns a status other than ok or degenerate_input, or throws for a caller
/// mistake or an allocation failure, leaves the record exactly as it was.
template <backend B>
class activation_record {
public:
    using value_type = typename B::value_type;

    [[nodiscard]] bool empty() const noexcept { return tokens_ == 0; }
    [[nodiscard]] index_t tokens() const noexcept { return tokens_; }
    [[nodiscard]] index_t features() const noexcept { return features_; }
    [[nodiscard]] index_t groups() const noexcept { return groups_; }
    [[nodiscard]] index_t subtoken_size() const noexcept { return subtoken_; }
    [[nodiscard]] storage z_storage() const noexcept { return storage_; }
    [[nodiscard]] value_type scale() const noexcept { return scale_; }
    /// Bytes of activation state this record stands for: T·G·sizeof(storage) + s·sizeof(value_type).
    [[nodiscard]] std::size_t bytes() const noexcept {
        return static_cast<std::size_t>(tokens_ * groups_) * storage_bytes(storage_) + static_cast<std::size_t>(subtoken_) * sizeof(value_type);
    }
    /// Bytes actually held (capacity may exceed bytes() after a larger batch).
    [[nodiscard]] std::size_t capacity_bytes() const noexcept { return z_.capacity() + v_.capacity() * sizeof(value_type); }

    /// Z as a view of its storage type U (U must match z_storage()). Backend memory.
    template <class U>
    [[nodiscard]] const_matrix_view<U> z() const {
        detail::require(storage_bytes(storage_) == sizeof(U) && !empty(), "velora::activation_record::z",
                        "requested element size ", sizeof(U), " but the record holds ", to_string(storage_),
                        empty() ? " and is empty" : "");
        return {reinterpret_cast<const U*>(z_.data()), tokens_, groups_, groups_};
    }
    /// v (s elements) in backend memory.
    [[nodiscard]] const value_type* v() const noexcept { return v_.data(); }

    /// Forgets the content (keeps the memory for reuse).
    void clear() noexcept { tokens_ = 0; }

private:
    friend class compressor<B>;
    typename B::template buffer<std::byte> z_;
    typename B::template buffer<value_type> v_;
    index_t tokens_ = 0, features_ = 0, groups_ = 0, subtoken_ = 0;
    storage storage_ = storage::f32;
    value_type scale_ = 1;
};

/// The weight gradient of a VeLoRA layer in factored form: dW = scale · A · (I_G ⊗ vᵀ), with
/// the last group's columns past `features` dropped. Views of backend memory; this is what a
/// low-rank optimizer can consume without ever forming the O×D gradient.
template <class T>
struct factored_gradient {
    const_matrix_view<T> a;   ///< O×G
    const T* v = nullptr;     ///< s elements, unit norm
    index_t subtoken_size = 0;
    index_t features = 0;     ///< D
    T scale = 1;
};

template <backend B>
class compressor {
public:
    using value_type = typename B::value_type;
    using record_type = activation_record<B>;
    using T = value_type;

    /// |‖v‖₂ − 1| that load_state accepts for an initialised v, with s = subtoken_size(): every
    /// v the compressor writes is a unit vector computed in double and rounded to T, so its norm
    /// is within ε_T/2 of 1 up to the double sums' rounding (≤ s·ε_f64/2 over saving and
    /// checking); the bound leaves a wide margin above both and rejects anything that was not
    /// meant to be a unit vector.
    [[nodiscard]] double unit_norm_tolerance() const noexcept {
        return 64 * static_cast<double>(std::numeric_limits<T>::epsilon()) +
               4 * static_cast<double>(subtoken_) * std::numeric_limits<double>::epsilon();
    }

    /// Throws std::invalid_argument if the configuration is invalid for `features` = D, or if
    /// the sub-token size s = ceil(D/G) is too large for the address space.
    compressor(B& backend, index_t features, compressor_config config = {})
        : backend_(&backend), config_(validated(features, config)), features_(features),
          subtoken_(subtoken_size_for(features, config.groups)), host_v_(static_cast<std::size_t>(subtoken_)),
          host_v_scratch_(host_v_.size()), host_sum_(host_v_.size()), next_(host_v_.size()) {
        v_.resize(host_v_.size());
        v_next_.resize(host_v_.size());
        sum_.resize(host_v_.size());
        zero_v_.resize(host_v_.size());
        backend_->copy_from_host(host_v_.data(), zero_v_.data(), subtoken_);   // host_v_ is all zeros until initialised
        if (config_.v.type == v_mode::kind::random) {
            // v is the first s values of the seeded stream. Should they all be zero (each one is
            // with probability 2^-53), the next s are taken: random mode is initialised from
            // construction on, which load_state relies on.
            std::vector<double> g(static_cast<std::size_t>(subtoken_));
            for (std::uint64_t round = 0; !initialised_; ++round) {
                for (index_t j = 0; j < subtoken_; ++j)
                    g[static_cast<std::size_t>(j)] = gaussian_at(config_.v.seed, round * static_cast<std::uint64_t>(subtoken_) + static_cast<std::uint64_t>(j));
                if (normalise(g) > 0) commit_v(g);
            }
        }
    }

    [[nodiscard]] const compressor_config& config() const noexcept { return config_; }
    [[nodiscard]] index_t features() const noexcept { return features_; }
    [[nodiscard]] index_t groups() const noexcept { return config_.groups; }
    [[nodiscard]] index_t subtoken_size() const noexcept { return subtoken_; }
    /// True once v exists (after the first compress, set_v, load_state, or at construction in random mode).
    [[nodiscard]] bool initialised() const noexcept { return initialised_; }
    /// True when the current v is the documented fallback 1/√s·(1, …, 1), used when the mean to
    /// normalise was exactly zero (e.g. an all-zero batch).
    [[nodiscard]] bool fallback_used() const noexcept { return fallback_; }
    /// Number of times v has been set or updated (saturates at 2^64 − 1).
    [[nodiscard]] std::uint64_t v_updates() const noexcept { return updates_; }
    /// The current v (host copy, s elements); empty until initialised().
    [[nodiscard]] std::span<const T> v() const noexcept {
        return initialised_ ? std::span<const T>(host_v_) : std::span<const T>();
    }

    /// Sets v (normalised here). Allowed in every mode; in first_batch_mean mode it replaces
    /// the first-batch estimate. Throws for a wrong length, non-finite or all-zero vector.
    /// `v` may be this compressor's own v() (it is copied before anything changes).
    void set_v(std::span<const T> v) {
        constexpr const char* fn = "velora::compressor::set_v";
        detail::require(static_cast<index_t>(v.size()) == subtoken_, fn, "argument 'v' has ", v.size(),
                        " elements but the sub-token size is s = ", subtoken_);
        std::vector<double> w(v.begin(), v.end());
        for (std::size_t j = 0; j < w.size(); ++j)
            detail::require(std::isfinite(w[j]), fn, "argument 'v' has a non-finite entry: v[", j, "] = ", w[j]);
        detail::require(normalise(w) > 0, fn, "argument 'v' is the zero vector");
        commit_v(w);
    }

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
    /// T it has seen allocate nothing once each record has been written at that T.
    status compress(const_matrix_view<T> x, record_type& out) {
        constexpr const char* fn = "velora::compressor::compress";
        check_view(x, fn, "x");
        detail::require(x.cols == features_, fn, "argument 'x' has ", x.cols, " columns but the compressor was built for D = ", features_);
        detail::require(config_.v.type != v_mode::kind::given || initialised_, fn,
                        "v_mode::given requires set_v() before the first compress");
        // check_view bounded X's extent, and G <= D = X.cols while a storage element is no wider
        // than T, so Z's bytes cannot exceed X's today; the checked forms make that an error
        // message instead of an assumption, here where the allocation size is formed.
        const index_t z_elements = detail::checked_mul(x.rows, config_.groups, fn, "Z's element count T x G");
        const std::size_t z_bytes =
            static_cast<std::size_t>(detail::checked_elements(z_elements, storage_bytes(config_.z_storage), fn, "Z")) * storage_bytes(config_.z_storage);

        // Size the spare Z first: an allocation that fails here has changed nothing. The record's
        // buffer becomes the next spare when this call succeeds; if it is too small for this T,
        // its replacement is sized now for the same reason.
        z_next_.resize(z_bytes);
        if (out.z_.capacity() < z_bytes) z_spare_.resize(z_bytes);

        // 1. The v for this call, decided without touching the compressor's state.
        const bool update = needs_batch_mean();
        bool zero_mean = false;
        if (update) {
            if (!batch_direction(x)) return failure_outcome(x);   // into next_
            if (config_.v.type == v_mode::kind::ema && initialised_) {
                for (std::size_t j = 0; j < next_.size(); ++j)
                    next_[j] = config_.v.decay * static_cast<double>(host_v_[j]) + (1.0 - config_.v.decay) * next_[j];
            }
            zero_mean = normalise(next_) == 0.0;
            const T fallback = fallback_entry();
            for (std::size_t j = 0; j < next_.size(); ++j) host_v_scratch_[j] = zero_mean ? fallback : static_cast<T>(next_[j]);
            backend_->copy_from_host(host_v_scratch_.data(), v_next_.data(), subtoken_);
        }
        const T* v = update ? v_next_.data() : v_.data();

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
        if (update) {
            host_v_.swap(host_v_scratch_);
            swap(v_, v_next_);
            initialised_ = true;
            fallback_ = zero_mean;
            count_update();
        }
        return zero_mean ? status::degenerate_input : status::ok;
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

    /// A = dYᵀ Z (O×G): the factored weight gradient, without the scale (see factored()).
    /// `a` may not overlap `dy`.
    void weight_grad(const record_type& record, const_matrix_view<T> dy, matrix_view<T> a) {
        constexpr const char* fn = "velora::compressor::weight_grad";
        check_record(record, fn);
        check_view(dy, fn, "dy");
        detail::require(dy.rows == record.tokens(), fn, "argument 'dy' has ", dy.rows, " rows but the record holds T = ", record.tokens(), " tokens");
        check_shape(a, dy.cols, record.groups(), fn, "a");
        check_no_alias(a, "a", dy, "dy", fn);
        with_z_as_value_type(record, [&](const_matrix_view<T> z, index_t first_token, bool first_chunk) {
            backend_->gemm(op::transpose, op::none, T(1), dy.row_block(first_token, z.rows), z, first_chunk ? T(0) : T(1), a);
        });
    }

    /// The factored gradient (A, v, scale) for a low-rank optimizer; `a` from weight_grad().
    [[nodiscard]] factored_gradient<T> factored(const record_type& record, const_matrix_view<T> a) const {
        constexpr const char* fn = "velora::compressor::factored";
        check_record(record, fn);
        check_view(a, fn, "a");
        detail::require(a.cols == record.groups(), fn, "argument 'a' has ", a.cols, " columns but G = ", record.groups());
        return {a, record.v(), record.subtoken_size(), record.features(), record.scale()};
    }

    /// dW = scale · A · (I_G ⊗ vᵀ), O×D, from the factored gradient. Only when a dense gradient
    /// is needed. `dw` may not overlap `a`.
    void expand_weight_grad(const record_type& record, const_matrix_view<T> a, matrix_view<T> dw) {
        constexpr const char* fn = "velora::compressor::expand_weight_grad";
        check_record(record, fn);
        check_view(a, fn, "a");
        detail::require(a.cols == record.groups(), fn, "argument 'a' has ", a.cols, " columns but G = ", record.groups());
        check_shape(dw, a.rows, record.features(), fn, "dw");
        check_no_alias(dw, "dw", a, "a", fn);
        backend_->expand_subtokens(a, record.v(), record.subtoken_size(), record.scale(), dw);
    }

    /// X̂ = Z · (I_G ⊗ vᵀ), T×D: the coarse reconstruction, only for callers that need it.
    void reconstruct(const record_type& record, matrix_view<T> xhat) {
        constexpr const char* fn = "velora::compressor::reconstruct";
        check_record(record, fn);
        check_shape(xhat, record.tokens(), record.features(), fn, "xhat");
        visit_storage(record.z_storage(), [&](auto tag) {
            backend_->expand_subtokens(record.template z<decltype(tag)>(), record.v(), record.subtoken_size(), T(1), xhat);
        });
    }

    /// VeLoRA weight gradient of a scale-and-shift layer y = x ⊙ w + b whose input was
    /// compressed into `record`: dw[g·s + j] = scale · v[j] · Σ_t dY[t, g·s + j] · Z[t, g].
    /// `dw` holds D elements of backend memory and may not overlap `dy`.
    void ssf_weight_grad(const record_type& record, const_matrix_view<T> dy, T* dw) {
        constexpr const char* fn = "velora::compressor::ssf_weight_grad";
        check_record(record, fn);
        check_shape(dy, record.tokens(), record.features(), fn, "dy");
        detail::require(dw != nullptr, fn, "argument 'dw' is null");
        check_no_alias(const_matrix_view<T>(dw, 1, record.features()), "dw", dy, "dy", fn);
        visit_storage(record.z_storage(), [&](auto tag) {
            backend_->weighted_subtoken_column_sums(dy, record.template z<decltype(tag)>(), record.v(), record.subtoken_size(),
                                                    record.scale(), dw);
        });
    }

    // ------------------------------------------------------------------ state
    static constexpr std::string_view state_kind = "velora.compressor";
    static constexpr std::uint32_t state_version = 1;

    /// v, its initialised and fallback flags, the update count (the EMA's state) and the
    /// configuration they belong to.
    [[nodiscard]] std::vector<std::byte> save_state() const {
        state_writer w(state_kind, state_version);
        w.put(static_cast<std::uint8_t>(sizeof(T)));
        w.put(static_cast<std::int64_t>(features_));
        w.put(static_cast<std::int64_t>(config_.groups));
        w.put(static_cast<std::uint8_t>(config_.v.type));
        w.put(config_.v.decay);
        w.put(config_.v.seed);
        w.put(static_cast<std::uint8_t>(config_.z_storage));
        w.put(config_.scale);
        w.put(static_cast<std::uint8_t>(initialised_));
        w.put(static_cast<std::uint8_t>(fallback_));
        w.put(updates_);
        w.put_array(std::span<const T>(host_v_));
        return std::move(w).finish();
    }

    /// Restores state saved by save_state() of a compressor with the same configuration.
    /// Throws state_format_error (a std::invalid_argument) and changes nothing when the blob is
    /// malformed, was saved with another configuration, or describes a state that no sequence
    /// of calls can put a compressor in:
    /// - a v entry that is not finite;
    /// - not initialised, but a v that is not all zero, a non-zero update count or the
    ///   fallback flag set, or random mode (which draws v at construction);
    /// - initialised, but an update count of 0 or a v whose norm is not 1 within
    ///   unit_norm_tolerance();
    /// - the fallback flag in a mode without a batch mean (random, given), or with a v that is
    ///   not exactly the fallback 1/√s·(1, …, 1);
    /// - a flag byte other than 0 or 1.
    void load_state(std::span<const std::byte> blob) {
        constexpr const char* fn = "velora::compressor::load_state";
        state_reader r(blob, state_kind, state_version, fn);
        expect_equal(r, "value type size", r.get<std::uint8_t>(), static_cast<std::uint8_t>(sizeof(T)));
        expect_equal(r, "features D", r.get<std::int64_t>(), static_cast<std::int64_t>(features_));
        expect_equal(r, "groups G", r.get<std::int64_t>(), static_cast<std::int64_t>(config_.groups));
        const auto kind = r.get<std::uint8_t>();
        if (kind != static_cast<std::uint8_t>(config_.v.type))
            r.bad("state was saved with v mode ", kind <= 4 ? to_string(static_cast<v_mode::kind>(kind)) : "invalid",
                  " but this compressor uses ", to_string(config_.v.type));
        expect_equal(r, "ema decay", r.get<double>(), config_.v.decay);
        expect_equal(r, "random seed", r.get<std::uint64_t>(), config_.v.seed);
        const auto stored = r.get<std::uint8_t>();
        if (stored != static_cast<std::uint8_t>(config_.z_storage))
            r.bad("state was saved with storage type ", is_valid(storage{stored}) ? to_string(storage{stored}) : "invalid",
                  " but this compressor stores ", to_string(config_.z_storage));
        expect_equal(r, "gradient scale", r.get<double>(), config_.scale);
        const auto initialised = r.get<std::uint8_t>();
        const auto fallback = r.get<std::uint8_t>();
        const auto updates = r.get<std::uint64_t>();
        auto v = r.get_array<T>(subtoken_);
        r.expect_end();
        check_meaning(r, initialised, fallback, updates, v);
        // Commit.
        host_v_ = std::move(v);
        backend_->copy_from_host(host_v_.data(), v_.data(), subtoken_);
        initialised_ = initialised != 0;
        fallback_ = fallback != 0;
        updates_ = updates;
    }

private:
    static compressor_config validated(index_t features, const compressor_config& c) {
        constexpr const char* fn = "velora::compressor::compressor";
        detail::require(features > 0, fn, "argument 'features' must be positive, got D = ", features);
        detail::require(c.groups >= 1 && c.groups <= features, fn, "config.groups must satisfy 1 <= G <= D, got G = ", c.groups,
                        " with D = ", features);
        detail::require(is_valid(c.z_storage), fn, "config.z_storage has the invalid value ", static_cast<int>(c.z_storage));
        detail::require(c.z_storage != storage::f64 || sizeof(T) == 8, fn,
                        "config.z_storage = f64 is wider than the backend's value type (float); use f32, f16 or bf16");
        detail::require(std::isfinite(c.scale) && c.scale > 0, fn, "config.scale must be finite and positive, got ", c.scale);
        detail::require(static_cast<std::uint8_t>(c.v.type) <= 4, fn, "config.v has the invalid mode ", static_cast<int>(c.v.type));
        detail::require(c.v.type != v_mode::kind::ema || (c.v.decay >= 0 && c.v.decay < 1), fn,
                        "v_mode::ema(decay) needs 0 <= decay < 1, got ", c.v.decay);
        return c;
    }

    // s = ceil(D/G) for a validated 1 <= G <= D, formed without D + G − 1 (which overflows for D
    // near the index maximum), and short enough that the s-element vectors the compressor
    // keeps (the widest of double) fit in the address space.
    static index_t subtoken_size_for(index_t features, index_t groups) {
        const index_t s = features / groups + (features % groups != 0 ? 1 : 0);
        return detail::checked_elements(s, sizeof(double), "velora::compressor::compressor",
                                        "the sub-token size s = ceil(D/G) for D = " + std::to_string(features) + " and G = " +
                                            std::to_string(groups) + ",");
    }

    template <class V>
    static void expect_equal(const state_reader& r, std::string_view field, V stored, V live) {
        if (!(stored == live)) r.bad("state was saved with ", field, " = ", +stored, " but this compressor has ", +live);
    }

    // The invariants every state written by save_state() satisfies (see load_state).
    void check_meaning(const state_reader& r, std::uint8_t initialised, std::uint8_t fallback, std::uint64_t updates,
                       const std::vector<T>& v) const {
        if (initialised > 1) r.bad("state has the initialised flag = ", +initialised, " (must be 0 or 1)");
        if (fallback > 1) r.bad("state has the fallback flag = ", +fallback, " (must be 0 or 1)");
        for (std::size_t j = 0; j < v.size(); ++j)
            if (!std::isfinite(v[j])) r.bad("state has v[", j, "] = ", v[j], ", which is not finite");
        if (!initialised) {
            if (config_.v.type == v_mode::kind::random)
                r.bad("state says v is not initialised, but v mode random draws v at construction");
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
            if (!computes_batch_mean())
                r.bad("state has the fallback flag set, but v mode ", to_string(config_.v.type), " never computes a mean to fall back from");
            const T expected = fallback_entry();
            for (std::size_t j = 0; j < v.size(); ++j)
                if (v[j] != expected)
                    r.bad("state has the fallback flag set but v is not the fallback 1/sqrt(s) (1, ..., 1): v[", j, "] = ", v[j],
                          " instead of ", expected);
        }
    }

    [[nodiscard]] bool computes_batch_mean() const noexcept {
        return config_.v.type == v_mode::kind::first_batch_mean || config_.v.type == v_mode::kind::batch_mean ||
               config_.v.type == v_mode::kind::ema;
    }

    [[nodiscard]] bool needs_batch_mean() const noexcept {
        switch (config_.v.type) {
        case v_mode::kind::first_batch_mean: return !initialised_;
        case v_mode::kind::batch_mean:
        case v_mode::kind::ema: return true;
        default: return false;
        }
    }

    // Every entry of the documented fallback v, 1/√s·(1, …, 1), in T.
    [[nodiscard]] T fallback_entry() const noexcept { return static_cast<T>(1.0 / std::sqrt(static_cast<double>(subtoken_))); }

    // next_ = the sub-token sum of x (normalised in ema mode, so that decay weighs two unit
    // vectors). False when the sum is not finite (NaN/Inf in x, or a sum that overflows T).
    [[nodiscard]] bool batch_direction(const_matrix_view<T> x) {
        backend_->sum_subtokens(x, subtoken_, sum_.data());
        backend_->copy_to_host(sum_.data(), host_sum_.data(), subtoken_);
        for (std::size_t j = 0; j < next_.size(); ++j) {
            next_[j] = static_cast<double>(host_sum_[j]);
            if (!std::isfinite(next_[j])) return false;
        }
        if (config_.v.type == v_mode::kind::ema) normalise(next_);
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

    // Scales d to unit norm and returns its former norm (0 leaves d as it is; the norm returned
    // may be Inf for huge finite entries). When the squares overflow or underflow (sums of
    // activations of 1e200 in double, a set_v argument of 1e-300), d is first scaled by its
    // largest magnitude, so v is still the unit direction.
    static double normalise(std::vector<double>& d) {
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

    // Commits a unit vector w (already normalised) as v.
    void commit_v(const std::vector<double>& w) {
        for (index_t j = 0; j < subtoken_; ++j) host_v_[static_cast<std::size_t>(j)] = static_cast<T>(w[static_cast<std::size_t>(j)]);
        backend_->copy_from_host(host_v_.data(), v_.data(), subtoken_);
        initialised_ = true;
        fallback_ = false;
        count_update();
    }

    // Saturates instead of wrapping: an initialised compressor never reports 0 updates.
    void count_update() noexcept {
        if (updates_ != std::numeric_limits<std::uint64_t>::max()) ++updates_;
    }

    static void check_record(const record_type& r, const char* fn) {
        detail::require(!r.empty(), fn, "argument 'record' is empty (no successful compress wrote it)");
    }

    // Calls f(Z as a T view, first token, first chunk?) over Z: the whole record when it is
    // stored as T, otherwise converted chunk by chunk through a fixed-size scratch, so a narrow
    // storage type never costs a full-size wide copy.
    template <class F>
    void with_z_as_value_type(const record_type& record, F&& f) {
        visit_storage(record.z_storage(), [&](auto tag) {
            using U = decltype(tag);
            const auto z = record.template z<U>();
            if constexpr (std::is_same_v<U, T>) {
                f(z, 0, true);
            } else {
                const index_t chunk = std::max<index_t>(1, convert_chunk_elements / record.groups());
                z_chunk_.resize(static_cast<std::size_t>(std::min(chunk, z.rows) * z.cols));
                for (index_t first = 0; first < z.rows; first += chunk) {
                    const index_t rows = std::min(chunk, z.rows - first);
                    matrix_view<T> wide{z_chunk_.data(), rows, z.cols, z.cols};
                    backend_->convert(z.row_block(first, rows), wide);
                    f(const_matrix_view<T>(wide), first, first == 0);
                }
            }
        });
    }

    static constexpr index_t convert_chunk_elements = 1 << 15;

    B* backend_;
    compressor_config config_;
    index_t features_;
    index_t subtoken_;
    std::vector<T> host_v_;                              // current v, host copy (all zero until initialised)
    std::vector<T> host_v_scratch_;                      // candidate v of a compress call
    std::vector<T> host_sum_;
    std::vector<double> next_;
    typename B::template buffer<T> v_;                  // current v, backend memory
    typename B::template buffer<T> v_next_;             // candidate v of a compress call, backend memory
    typename B::template buffer<T> zero_v_;             // s zeros: the finiteness test of X (failure_outcome)
    typename B::template buffer<T> sum_;                // sub-token sum, backend memory
    typename B::template buffer<T> z_chunk_;            // storage -> T conversion scratch
    typename B::template buffer<std::byte> z_next_;     // the spare Z: projected into, swapped with the record's on success
    typename B::template buffer<std::byte> z_spare_;    // replaces a record's too-small buffer as the next spare
    bool initialised_ = false;
    bool fallback_ = false;
    std::uint64_t updates_ = 0;
};

} // namespace velora
