#pragma once
/// \file
/// `lora_linear<B, Base>`: a linear layer with a frozen base weight W (O×D, any `frozen_weight`:
/// dense, bf16, NF4, ...), an optional frozen bias b, and LoRA's trainable adapters A (r×D) and
/// B (O×r) with scaling s = α/r (Hu et al., arXiv 2106.09685; PEFT's conventions):
///
///     H = x_a·Aᵀ  (T×r),     y = x·Wᵀ + b + s·H·Bᵀ,
///
/// where x_a is the adapter path's input: x itself, or the host's dropout of x (dropout is the
/// host's; the layer takes x_a separately). With G = dY (T×O) and P = s·G·B (T×r):
///
///     dB = s·Gᵀ·H (exact),   dA = Pᵀ·x_a (exact) or, from a VeLoRA record Z of x_a,
///     dA ≈ scale_v · (Pᵀ·Z)·(I_G ⊗ vᵀ) (factored, x̂ never formed),
///     dX = G·W + P·A  (x_a = x), or dX = G·W and dX_a = P·A returned apart (with dropout: the
///     host sends dX_a back through its dropout mask and adds it to dX).
///
/// What is kept between forward and backward (`lora_record`): H, plus for A's gradient either a
/// view of the host's x_a, a copy of x_a, or a VeLoRA activation record (Z, T×G in its storage
/// type, and v) — never x in the VeLoRA case. Nothing is kept for W: it is frozen. A trainable
/// base (W trained too) needs dW = Gᵀ·x from the host: layers.hpp's dense_weight_grad, or a
/// VeLoRA compressor on x (tests/test_lora.cpp shows both).
///
/// Ownership: the layer does not own A, B, W or b. They are the host's parameters (the
/// optimizer steps them through the same views), given to the layer as views of backend
/// memory that must outlive it; A and B are mutable so that init() can write them. The layer
/// owns its scratch and, in the VeLoRA case, its compressor (whose v is state: see
/// compressor::save_state).
///
/// Numerical events follow the library's status rule (core/error.hpp): forward returns
/// non_finite_input when x, x_a, A, B, b or a dense W holds NaN/Inf, overflow when they are
/// finite but H or y is not (or VeLoRA's projection overflows its storage type), and in both
/// cases leaves the record and the compressor exactly as they were (y is written but
/// meaningless). backward returns non_finite_input for NaN/Inf in dY (or A, B), overflow when
/// they are finite but a gradient is not; the outputs are then meaningless and nothing else
/// changed. `ok` never comes with a non-finite output. The finiteness checks read each output
/// (and A and B) once more, through the backend's sub-token projection on a zero vector, and
/// the inputs again only on the failure path, to tell NaN/Inf from overflow.
///
/// Allocation: after reserve(max_tokens) and reserve(max_tokens, record) for each record,
/// forward and backward allocate nothing for batches of up to max_tokens tokens (as far as the
/// backend's GEMM does not; see backend/cpu/gemm.hpp).
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <iterator>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "../compressor.hpp"
#include "../concepts.hpp"
#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../core/view.hpp"
#include "frozen_weight.hpp"

namespace velora {

/// What a LoRA layer keeps of the adapter input x_a for A's gradient.
enum class lora_keep : std::uint8_t {
    input_view = 0,   ///< a view of the host's x_a (exact dA); the host keeps x_a alive and unchanged until backward
    input_copy = 1,   ///< a copy of x_a in the record (exact dA)
    velora = 2,       ///< a VeLoRA activation record of x_a (factored dA); x_a is not kept
};

/// The hyper-parameters of one LoRA layer.
struct lora_config {
    index_t rank = 8;                       ///< r, 1 <= r <= min(O, D)
    double alpha = 16;                      ///< scaling s = alpha / r; finite and non-zero
    lora_keep keep = lora_keep::input_view;
    /// The compressor of x_a when keep == velora. Defaults to the official fine-tuning code's
    /// choice: G = 32, velora_scale 0.1 (it multiplies only A's compressed gradient), v = the
    /// first batch's sub-token mean.
    compressor_config velora{.groups = 32, .v = {}, .z_storage = storage::f32, .scale = 0.1};
};

template <backend B, frozen_weight Base>
class lora_linear;

/// What one forward keeps for the backward pass of a `lora_linear`: H = x_a·Aᵀ (T×r, owned) and,
/// per the layer's lora_keep, a view of x_a, a copy of x_a, or a VeLoRA activation_record.
/// A record is reused across steps without allocating once reserve(max_tokens, record) sized it
/// (or once it has seen the largest T). A forward that returns a status other than ok or
/// degenerate_input, or throws, leaves the record exactly as it was.
template <backend B>
class lora_record {
public:
    using value_type = typename B::value_type;
    using T = value_type;

    [[nodiscard]] bool empty() const noexcept { return tokens_ == 0; }
    [[nodiscard]] index_t tokens() const noexcept { return tokens_; }
    [[nodiscard]] index_t rank() const noexcept { return rank_; }
    [[nodiscard]] index_t features() const noexcept { return features_; }
    [[nodiscard]] lora_keep keep() const noexcept { return keep_; }

    /// H (T×r) in backend memory.
    [[nodiscard]] const_matrix_view<T> h() const {
        detail::require(!empty(), "velora::lora_record::h", "the record is empty (no successful forward wrote it)");
        return {h_.data(), tokens_, rank_, rank_};
    }
    /// The exact x_a (T×D) kept for A's gradient: the host's view or the record's copy. Throws for
    /// a VeLoRA record (it keeps no x).
    [[nodiscard]] const_matrix_view<T> input() const {
        constexpr const char* fn = "velora::lora_record::input";
        detail::require(!empty(), fn, "the record is empty (no successful forward wrote it)");
        detail::require(keep_ != lora_keep::velora, fn, "the record keeps a VeLoRA record of x_a, not x_a");
        if (keep_ == lora_keep::input_view) return x_view_;
        return {x_.data(), tokens_, features_, features_};
    }
    /// The VeLoRA activation record of x_a (empty unless keep() == velora).
    [[nodiscard]] const activation_record<B>& compressed() const noexcept { return z_; }

    /// Bytes the backward pass needs kept alive from the forward: T·r·sizeof(T) for H, plus
    /// T·D·sizeof(T) for x_a (viewed or copied) or the VeLoRA record's bytes (T·G·storage bytes
    /// for Z and s·sizeof(T) for its v). A viewed x_a is the host's memory and counts here
    /// because backward needs it; viewed_bytes() says how much of the total that is, for a host
    /// that keeps x_a alive anyway for another use.
    [[nodiscard]] std::size_t bytes() const noexcept {
        const std::size_t h = static_cast<std::size_t>(tokens_) * static_cast<std::size_t>(rank_) * sizeof(T);
        if (empty()) return 0;
        if (keep_ == lora_keep::velora) return h + z_.bytes();
        return h + static_cast<std::size_t>(tokens_) * static_cast<std::size_t>(features_) * sizeof(T);
    }
    /// The part of bytes() that is the host's x_a seen through a view (0 unless input_view).
    [[nodiscard]] std::size_t viewed_bytes() const noexcept {
        if (empty() || keep_ != lora_keep::input_view) return 0;
        return static_cast<std::size_t>(tokens_) * static_cast<std::size_t>(features_) * sizeof(T);
    }

    /// Forgets the content (keeps the memory for reuse).
    void clear() noexcept {
        tokens_ = 0;
        x_view_ = {};
        z_.clear();
    }

private:
    template <backend, frozen_weight>
    friend class lora_linear;

    typename B::template buffer<T> h_;   // H, T×r contiguous
    typename B::template buffer<T> x_;   // input_copy: x_a, T×D contiguous
    const_matrix_view<T> x_view_{};      // input_view: the host's x_a
    activation_record<B> z_;             // velora: Z and v
    index_t tokens_ = 0, rank_ = 0, features_ = 0;
    lora_keep keep_ = lora_keep::input_view;
};

/// The gradients backward writes. Views of backend memory; any may be left empty ({}) where the
/// comment says so.
template <class T>
struct lora_gradients {
    /// T×D: dY·W, plus P·A when dx_adapter is empty (the adapter input was x itself).
    matrix_view<T> dx{};
    /// T×D or empty: P·A, the gradient at the adapter input x_a, for a host whose x_a is a
    /// dropout of x (it applies its mask and adds the result to dx).
    matrix_view<T> dx_adapter{};
    /// r×D. Exact modes: dA = Pᵀ·x_a (required). VeLoRA: the expansion scale_v·A_f·(I_G ⊗ vᵀ)
    /// of the factor, written only when given (a low-rank optimizer wants a_factor instead).
    matrix_view<T> da{};
    /// r×G, VeLoRA only: A_f = Pᵀ·Z (unscaled; lora_linear::factored_a adds v and the scale).
    /// At least one of da and a_factor is required in that mode; must be empty otherwise.
    matrix_view<T> a_factor{};
    /// O×r: dB = s·dYᵀ·H (required).
    matrix_view<T> db{};
};

template <backend B, frozen_weight Base = dense_frozen_weight<B>>
class lora_linear {
    static_assert(std::same_as<typename Base::backend_type, B>, "velora::lora_linear<B, Base>: Base must be a frozen weight over backend B");

public:
    using backend_type = B;
    using base_type = Base;
    using value_type = typename B::value_type;
    using T = value_type;
    using record_type = lora_record<B>;
    using compressor_type = compressor<B>;

    /// `bias` (O elements of backend memory) may be null. `lora_a` must be r×D and `lora_b` O×r
    /// with r = config.rank and W = base O×D. Throws std::invalid_argument naming
    /// velora::lora_linear::lora_linear, the argument and the values for r = 0, r > min(O, D), a
    /// non-finite or zero alpha, an invalid keep, adapters of another shape, adapters that
    /// overlap each other or the bias, and (VeLoRA) an invalid compressor configuration (named
    /// by velora::compressor::compressor).
    lora_linear(B& backend, Base base, const T* bias, matrix_view<T> lora_a, matrix_view<T> lora_b, lora_config config)
        : backend_(&backend), base_(std::move(base)), bias_(bias), a_(lora_a), b_(lora_b), config_(checked(base_, lora_a, lora_b, bias, config)),
          scaling_(static_cast<T>(config.alpha / static_cast<double>(config.rank))) {
        if (config_.keep == lora_keep::velora) compressor_.emplace(backend, base_.cols(), config_.velora);
        base_ws_.resize(base_.workspace_elements());
        grow_zeros(static_cast<std::size_t>(std::max(base_.rows(), base_.cols())));
    }

    [[nodiscard]] index_t in_features() const noexcept { return base_.cols(); }
    [[nodiscard]] index_t out_features() const noexcept { return base_.rows(); }
    [[nodiscard]] index_t rank() const noexcept { return config_.rank; }
    /// s = α/r, rounded to T.
    [[nodiscard]] T scaling() const noexcept { return scaling_; }
    [[nodiscard]] const lora_config& config() const noexcept { return config_; }
    [[nodiscard]] const Base& base() const noexcept { return base_; }
    [[nodiscard]] const T* bias() const noexcept { return bias_; }
    [[nodiscard]] matrix_view<T> a() const noexcept { return a_; }
    [[nodiscard]] matrix_view<T> b() const noexcept { return b_; }
    /// True between merge() and unmerge().
    [[nodiscard]] bool merged() const noexcept { return merged_; }
    /// The compressor of x_a (null unless keep == velora): its v is state a resumed run restores.
    [[nodiscard]] compressor_type* velora_compressor() noexcept { return compressor_ ? &*compressor_ : nullptr; }
    [[nodiscard]] const compressor_type* velora_compressor() const noexcept { return compressor_ ? &*compressor_ : nullptr; }

    // ------------------------------------------------------------------ initialisation
    /// LoRA's initialisation as PEFT does it: A from nn.Linear's Kaiming-uniform (a = √5 on
    /// fan_in = D: gain √(2/(1+5)), bound gain·√(3/D) = 1/√D), B = 0, so the layer starts equal
    /// to its base. A[i, j] = bound·(2u − 1) with u = uniform_at(seed, i·D + j) ∈ (0, 1]: a pure
    /// function of (seed, i, j), the same bits on every backend and at every thread count.
    /// Allocates a host row (not a steady-state call). Throws while merged.
    void init(std::uint64_t seed) {
        constexpr const char* fn = "velora::lora_linear::init";
        require_unmerged(fn);
        const index_t d = in_features(), r = rank();
        const double bound = 1.0 / std::sqrt(static_cast<double>(d));
        std::vector<T> row(static_cast<std::size_t>(std::max(d, r)));
        for (index_t i = 0; i < r; ++i) {
            for (index_t j = 0; j < d; ++j) {
                const double u = uniform_at(seed, static_cast<std::uint64_t>(i) * static_cast<std::uint64_t>(d) + static_cast<std::uint64_t>(j));
                row[static_cast<std::size_t>(j)] = static_cast<T>(bound * (2.0 * u - 1.0));
            }
            backend_->copy_from_host(row.data(), a_.row(i), d);
        }
        std::fill(row.begin(), row.end(), T(0));
        for (index_t o = 0; o < out_features(); ++o) backend_->copy_from_host(row.data(), b_.row(o), r);
    }

    // ------------------------------------------------------------------ memory
    /// Bytes a record of this layer keeps for backward at `tokens` tokens (record_type::bytes()
    /// of a forward at that T): T·r·sizeof(T) + T·D·sizeof(T) (input_view, input_copy) or
    /// T·r·sizeof(T) + T·G·storage bytes + s·sizeof(T) (velora). Nothing for W.
    [[nodiscard]] std::size_t kept_bytes(index_t tokens) const {
        constexpr const char* fn = "velora::lora_linear::kept_bytes";
        const std::size_t h = elements(tokens, rank(), fn, "H (tokens x r)", "tokens") * sizeof(T);
        if (compressor_) return h + compressor_->record_bytes(tokens);
        return h + elements(tokens, in_features(), fn, "x_a (tokens x D)", "tokens") * sizeof(T);
    }
    /// Bytes of scratch the layer itself grows for batches of up to `max_tokens` tokens: the
    /// spare H and P (T·r values each), the base's workspace, the finiteness checks' zero vector
    /// and row projections (max(D, O) + max(T, O) values), the VeLoRA factor when only the dense
    /// dA is asked for (r·G values) and the compressor's workspace. Records are the caller's
    /// (kept_bytes).
    [[nodiscard]] std::size_t workspace_bytes(index_t max_tokens) const {
        constexpr const char* fn = "velora::lora_linear::workspace_bytes";
        std::size_t n = 2 * elements(max_tokens, rank(), fn, "H (tokens x r)") + base_.workspace_elements() +
                        static_cast<std::size_t>(std::max(in_features(), out_features()) + std::max(max_tokens, out_features()));
        std::size_t bytes = n * sizeof(T);
        if (compressor_) bytes += static_cast<std::size_t>(rank() * compressor_->groups()) * sizeof(T) + compressor_->workspace_bytes(max_tokens);
        return bytes;
    }
    /// Allocates the layer's scratch for up to `max_tokens` tokens now.
    void reserve(index_t max_tokens) {
        constexpr const char* fn = "velora::lora_linear::reserve";
        const std::size_t hr = elements(max_tokens, rank(), fn, "H (tokens x r)");
        grow(h_next_, hr);
        grow(p_, hr);
        grow(finite_z_, static_cast<std::size_t>(std::max(max_tokens, out_features())));
        if (compressor_) {
            grow(af_, static_cast<std::size_t>(rank() * compressor_->groups()));
            compressor_->reserve(max_tokens);
        }
    }
    /// Gives `record` the memory of a forward of up to `max_tokens` tokens. A record that must
    /// grow forgets its content; call it before the record's first forward.
    void reserve(index_t max_tokens, record_type& record) {
        constexpr const char* fn = "velora::lora_linear::reserve";
        const std::size_t hr = elements(max_tokens, rank(), fn, "H (tokens x r)");
        const std::size_t xd = config_.keep == lora_keep::input_copy ? elements(max_tokens, in_features(), fn, "x_a (tokens x D)") : 0;
        if (record.h_.capacity() < hr || record.x_.capacity() < xd) record.clear();
        grow(record.h_, hr);
        grow(record.x_, xd);
        if (compressor_) compressor_->reserve(max_tokens, record.z_);
    }

    // ------------------------------------------------------------------ forward
    /// y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with the adapter input x itself (no dropout).
    status forward(const_matrix_view<T> x, matrix_view<T> y, record_type& record) { return forward_impl(x, x, y, record); }

    /// y = x·Wᵀ + b + s·(x_a·Aᵀ)·Bᵀ, x_a = the host's dropout of x (T×D, same T). With
    /// input_view, `record` keeps a view of x_a: the host keeps it alive and unchanged until
    /// backward. `y` (T×O) may not overlap x, x_a, W, A, B or b. Statuses: see the file comment;
    /// degenerate_input (VeLoRA's first-batch mean was zero; the documented fallback v was used)
    /// writes the record like ok.
    status forward(const_matrix_view<T> x, const_matrix_view<T> x_adapter, matrix_view<T> y, record_type& record) {
        return forward_impl(x, x_adapter, y, record);
    }

    // ------------------------------------------------------------------ backward
    /// The gradients of the last forward that wrote `record`, for dY (T×O); see lora_gradients
    /// for what is written where. Reads A, B and W as they are now: the host steps them only
    /// after backward. Outputs may not overlap each other or any input. Statuses: see the file
    /// comment.
    status backward(const record_type& record, const_matrix_view<T> dy, const lora_gradients<T>& g) {
        constexpr const char* fn = "velora::lora_linear::backward";
        require_unmerged(fn);
        check_record(record, fn);
        const index_t t = record.tokens(), d = in_features(), o = out_features(), r = rank();
        check_shape(dy, t, o, fn, "dy");
        check_shape(g.dx, t, d, fn, "g.dx");
        if (!g.dx_adapter.empty()) check_shape(g.dx_adapter, t, d, fn, "g.dx_adapter");
        check_shape(g.db, o, r, fn, "g.db");
        const bool velora = config_.keep == lora_keep::velora;
        if (velora) {
            detail::require(!g.da.empty() || !g.a_factor.empty(), fn,
                            "arguments 'g.da' and 'g.a_factor' are both empty; a VeLoRA layer writes at least one");
            if (!g.a_factor.empty()) check_shape(g.a_factor, r, compressor_->groups(), fn, "g.a_factor");
        } else {
            detail::require(g.a_factor.empty(), fn, "argument 'g.a_factor' is ", g.a_factor.rows, "x", g.a_factor.cols,
                            " but only a VeLoRA layer (lora_keep::velora) has a factored gradient; leave it empty");
        }
        if (!velora || !g.da.empty()) check_shape(g.da, r, d, fn, "g.da");
        check_outputs_apart(record, dy, g, fn);

        const std::size_t tr = static_cast<std::size_t>(t * r);
        p_.resize(tr);
        if (velora && g.a_factor.empty()) af_.resize(static_cast<std::size_t>(r * compressor_->groups()));
        const matrix_view<T> p{p_.data(), t, r, r};

        // P = s·G·B; dB = s·Gᵀ·H.
        backend_->gemm(op::none, op::none, scaling_, dy, const_matrix_view<T>(b_), T(0), p);
        backend_->gemm(op::transpose, op::none, scaling_, dy, record.h(), T(0), g.db);
        // dA = Pᵀ·x_a, or A_f = Pᵀ·Z (and its expansion when asked).
        if (!velora) {
            backend_->gemm(op::transpose, op::none, T(1), const_matrix_view<T>(p), record.input(), T(0), g.da);
        } else {
            const matrix_view<T> af = g.a_factor.empty() ? matrix_view<T>{af_.data(), r, compressor_->groups(), compressor_->groups()} : g.a_factor;
            compressor_->gradient_factor(record.z_, const_matrix_view<T>(p), af);
            if (!g.da.empty()) compressor_->expand_weight_grad(record.z_, const_matrix_view<T>(af), g.da);
        }
        // dX = G·W (+ P·A), or dX_a = P·A apart.
        base_.input_grad(*backend_, dy, g.dx, std::span<T>(base_ws_.data(), base_ws_.size()));
        if (g.dx_adapter.empty()) backend_->gemm(op::none, op::none, T(1), const_matrix_view<T>(p), const_matrix_view<T>(a_), T(1), g.dx);
        else backend_->gemm(op::none, op::none, T(1), const_matrix_view<T>(p), const_matrix_view<T>(a_), T(0), g.dx_adapter);

        bool finite = all_finite(g.dx) && all_finite(g.db) && (g.dx_adapter.empty() || all_finite(g.dx_adapter));
        if (velora) finite = finite && (g.da.empty() || all_finite(g.da)) && (g.a_factor.empty() || all_finite(g.a_factor));
        else finite = finite && all_finite(g.da);
        if (finite) return status::ok;
        const bool bad_input = !all_finite(dy) || !all_finite(const_matrix_view<T>(a_)) || !all_finite(const_matrix_view<T>(b_)) || !base_finite();
        return bad_input ? status::non_finite_input : status::overflow;
    }

    /// A's gradient as the factored form a low-rank optimizer (or a dense one, which expands it)
    /// takes: dA = scale_v · a_factor · (I_G ⊗ vᵀ), with v and scale_v from the record. Views of
    /// the record's and a_factor's memory. VeLoRA layers only.
    [[nodiscard]] factored_gradient<T> factored_a(const record_type& record, const_matrix_view<T> a_factor) const {
        constexpr const char* fn = "velora::lora_linear::factored_a";
        detail::require(compressor_.has_value(), fn, "this layer keeps x_a (lora_keep ", static_cast<int>(config_.keep),
                        "), so dA is exact and dense; only lora_keep::velora has a factored gradient");
        check_record(record, fn);
        check_shape(a_factor, rank(), compressor_->groups(), fn, "a_factor");
        return compressor_->factored(record.z_, a_factor);
    }

    // ------------------------------------------------------------------ merge
    /// W ← W + s·B·A: the adapted layer as one dense weight, for inference. `w` must be the
    /// memory the dense base reads (base().view(): same pointer, shape and leading dimension),
    /// so the base sees the merged weight. While merged, forward/backward/init/merge throw; A
    /// and B must not change until unmerge(). Exact to rounding: each W element gets one
    /// rounding more. Only for a base stored in T (dense_frozen_weight): a quantised base
    /// (NF4, bf16) cannot hold W + s·B·A exactly, so merging it is refused at compile time —
    /// dequantise, merge, and requantise in the host if that loss is acceptable.
    void merge(matrix_view<T> w) { merge_impl(w, scaling_, true, "velora::lora_linear::merge"); }
    /// W ← W − s·B·A: undoes merge() to rounding (W + s·B·A − s·B·A need not be W bit for bit).
    void unmerge(matrix_view<T> w) { merge_impl(w, -scaling_, false, "velora::lora_linear::unmerge"); }

private:
    using buffer = typename B::template buffer<T>;

    static lora_config checked(const Base& base, const matrix_view<T>& a, const matrix_view<T>& b, const T* bias, const lora_config& c) {
        constexpr const char* fn = "velora::lora_linear::lora_linear";
        const index_t o = base.rows(), d = base.cols();
        detail::require(c.rank >= 1 && c.rank <= std::min(o, d), fn, "config.rank must satisfy 1 <= r <= min(O, D) = ", std::min(o, d),
                        ", got r = ", c.rank, " with W ", o, "x", d);
        detail::require(std::isfinite(c.alpha) && c.alpha != 0, fn, "config.alpha must be finite and non-zero, got ", c.alpha);
        detail::require(static_cast<unsigned>(c.keep) <= 2, fn, "config.keep has the invalid value ", static_cast<int>(c.keep));
        check_shape(a, c.rank, d, fn, "lora_a");
        check_shape(b, o, c.rank, fn, "lora_b");
        check_no_alias(a, "lora_a", b, "lora_b", fn);
        if (bias) {
            check_no_alias(a, "lora_a", const_matrix_view<T>(bias, 1, o), "bias", fn);
            check_no_alias(b, "lora_b", const_matrix_view<T>(bias, 1, o), "bias", fn);
        }
        return c;
    }

    // rows·cols for a token count `rows` from the caller (argument `arg`), checked so that its
    // bytes fit in the address space.
    static std::size_t elements(index_t rows, index_t cols, const char* fn, const char* what, const char* arg = "max_tokens") {
        detail::require(rows > 0, fn, "argument '", arg, "' must be positive, got ", rows);
        return static_cast<std::size_t>(
            detail::checked_elements(detail::checked_mul(rows, cols, fn, what), sizeof(T), fn, what));
    }

    static void grow(buffer& buf, std::size_t n) {
        if (buf.capacity() < n) {
            buf = buffer();
            buf.resize(n);
        }
    }

    void require_unmerged(const char* fn) const {
        detail::require(!merged_, fn, "the layer is merged (W holds W + s*B*A); call unmerge() first");
    }

    void check_record(const record_type& rec, const char* fn) const {
        detail::require(!rec.empty(), fn, "argument 'record' is empty (no successful forward wrote it)");
        detail::require(rec.keep() == config_.keep && rec.rank() == rank() && rec.features() == in_features(), fn,
                        "argument 'record' (keep ", static_cast<int>(rec.keep()), ", r = ", rec.rank(), ", D = ", rec.features(),
                        ") was not written by a layer like this one (keep ", static_cast<int>(config_.keep), ", r = ", rank(),
                        ", D = ", in_features(), ")");
    }

    // Every output of backward apart from every input and from each other.
    void check_outputs_apart(const record_type& rec, const_matrix_view<T> dy, const lora_gradients<T>& g, const char* fn) const {
        const matrix_view<T> outs[] = {g.dx, g.dx_adapter, g.da, g.a_factor, g.db};
        const char* names[] = {"g.dx", "g.dx_adapter", "g.da", "g.a_factor", "g.db"};
        constexpr std::size_t n = std::size(outs);
        for (std::size_t i = 0; i < n; ++i) {
            const matrix_view<T>& out = outs[i];
            const char* name = names[i];
            if (out.empty()) continue;
            check_no_alias(out, name, dy, "dy", fn);
            check_no_alias(out, name, const_matrix_view<T>(a_), "lora_a", fn);
            check_no_alias(out, name, const_matrix_view<T>(b_), "lora_b", fn);
            check_no_alias(out, name, rec.h(), "record.h", fn);
            if (rec.keep() != lora_keep::velora) check_no_alias(out, name, rec.input(), "record.input", fn);
            if constexpr (requires { base_.view(); }) check_no_alias(out, name, base_.view(), "w", fn);
            for (std::size_t j = i + 1; j < n; ++j)
                if (!outs[j].empty()) check_no_alias(out, name, outs[j], names[j], fn);
        }
    }

    status forward_impl(const_matrix_view<T> x, const_matrix_view<T> xa, matrix_view<T> y, record_type& record) {
        constexpr const char* fn = "velora::lora_linear::forward";
        require_unmerged(fn);
        const index_t d = in_features(), o = out_features(), r = rank();
        check_view(x, fn, "x");
        check_shape(x, x.rows, d, fn, "x");
        check_shape(xa, x.rows, d, fn, "x_adapter");
        check_shape(y, x.rows, o, fn, "y");
        const index_t t = x.rows;
        check_no_alias(y, "y", x, "x", fn);
        check_no_alias(y, "y", xa, "x_adapter", fn);
        check_no_alias(y, "y", const_matrix_view<T>(a_), "lora_a", fn);
        check_no_alias(y, "y", const_matrix_view<T>(b_), "lora_b", fn);
        if (bias_) check_no_alias(y, "y", const_matrix_view<T>(bias_, 1, o), "bias", fn);
        if constexpr (requires { base_.view(); }) check_no_alias(y, "y", base_.view(), "w", fn);

        // Every buffer this call writes is sized before anything changes, so an allocation
        // failure (only when a record or the spare must grow) leaves the record as it was.
        const std::size_t tr = static_cast<std::size_t>(t * r);
        h_next_.resize(tr);
        buffer grown_x;
        if (config_.keep == lora_keep::input_copy && record.x_.capacity() < static_cast<std::size_t>(t * d))
            grown_x.resize(static_cast<std::size_t>(t * d));
        const matrix_view<T> h{h_next_.data(), t, r, r};

        // H = x_a·Aᵀ; y = x·Wᵀ + b + s·H·Bᵀ.
        backend_->gemm(op::none, op::transpose, T(1), xa, const_matrix_view<T>(a_), T(0), h);
        base_.forward(*backend_, x, y, std::span<T>(base_ws_.data(), base_ws_.size()));
        if (bias_) backend_->scale_shift_columns(y, nullptr, bias_, y);
        backend_->gemm(op::none, op::transpose, scaling_, const_matrix_view<T>(h), const_matrix_view<T>(b_), T(1), y);

        // A and B are checked themselves as well: a product may skip a zero operand (a reference
        // BLAS does), and B = 0 at initialisation would hide a NaN in A from y.
        if (!(all_finite(const_matrix_view<T>(h)) && all_finite(const_matrix_view<T>(y)) && all_finite(const_matrix_view<T>(a_)) &&
              all_finite(const_matrix_view<T>(b_))))
            return classify_forward_failure(x, xa);

        status outcome = status::ok;
        if (compressor_) {
            outcome = compressor_->compress(xa, record.z_);   // changes nothing unless ok or degenerate_input
            if (outcome != status::ok && outcome != status::degenerate_input) return outcome;
        }
        // Commit: nothing below can fail.
        using std::swap;
        swap(record.h_, h_next_);
        if (config_.keep == lora_keep::input_copy) {
            if (grown_x.capacity() > 0) swap(record.x_, grown_x);
            record.x_.resize(static_cast<std::size_t>(t * d));
            for (index_t i = 0; i < t; ++i) backend_->copy(xa.row(i), record.x_.data() + i * d, d);
        }
        record.x_view_ = config_.keep == lora_keep::input_view ? xa : const_matrix_view<T>{};
        record.tokens_ = t;
        record.rank_ = r;
        record.features_ = d;
        record.keep_ = config_.keep;
        return outcome;
    }

    status classify_forward_failure(const_matrix_view<T> x, const_matrix_view<T> xa) {
        const bool bad_input = !all_finite(x) || !all_finite(xa) || !all_finite(const_matrix_view<T>(a_)) ||
                               !all_finite(const_matrix_view<T>(b_)) || (bias_ && !all_finite(const_matrix_view<T>(bias_, 1, out_features()))) ||
                               !base_finite();
        return bad_input ? status::non_finite_input : status::overflow;
    }

    // Whether the base W is finite, where the base exposes it as a view (a quantised base was
    // checked when it was quantised).
    bool base_finite() {
        if constexpr (requires { base_.view(); }) return all_finite(base_.view());
        else return true;
    }

    // Whether every element of v is finite. x·0 is NaN exactly where x is NaN or ±Inf (IEEE 754)
    // and 0 elsewhere, so the projection of each row on a zero vector (the backend's sub-token
    // kernel with one group of s = cols) is finite exactly when the row is: the compressor's own
    // test (compressor::classify_failure), exact for any magnitude, one pass over v.
    bool all_finite(const_matrix_view<T> v) {
        grow_zeros(static_cast<std::size_t>(v.cols));
        finite_z_.resize(static_cast<std::size_t>(v.rows));
        return backend_->project_subtokens(v, zeros_.data(), v.cols, matrix_view<T>{finite_z_.data(), v.rows, 1, 1});
    }
    void grow_zeros(std::size_t n) {
        if (zeros_.size() >= n) return;
        std::vector<T> host(n, T(0));
        buffer grown;
        grown.resize(n);
        backend_->copy_from_host(host.data(), grown.data(), static_cast<index_t>(n));
        zeros_ = std::move(grown);
    }

    void merge_impl(matrix_view<T> w, T factor, bool merging, const char* fn) {
        static_assert(requires(const Base& base) { { base.view() } -> std::convertible_to<const_matrix_view<T>>; },
                      "velora::lora_linear::merge/unmerge: the base weight is not stored densely in the backend's value type (e.g. "
                      "NF4 or bf16), so W + s*B*A cannot be stored exactly; dequantise, merge and requantise in the host instead");
        const const_matrix_view<T> base = base_.view();
        check_view(w, fn, "w");
        detail::require(w.data == base.data && w.rows == base.rows && w.cols == base.cols && w.ld == base.ld, fn, "argument 'w' (", w.rows,
                        "x", w.cols, ", ld ", w.ld, ") is not the memory the base weight reads (", base.rows, "x", base.cols, ", ld ", base.ld,
                        ")");
        detail::require(merged_ != merging, fn, merging ? "the layer is already merged" : "the layer is not merged");
        backend_->gemm(op::none, op::none, factor, const_matrix_view<T>(b_), const_matrix_view<T>(a_), T(1), w);
        merged_ = merging;
    }

    B* backend_;
    Base base_;
    const T* bias_;
    matrix_view<T> a_, b_;
    lora_config config_;
    T scaling_;
    std::optional<compressor_type> compressor_;
    bool merged_ = false;
    buffer h_next_;    // H of the forward in flight; trades places with the record's on success
    buffer p_;         // P = s·dY·B (T×r)
    buffer af_;        // A_f when the caller asks only for the dense dA (VeLoRA)
    buffer base_ws_;   // the base's workspace (base.workspace_elements())
    buffer zeros_;     // all_finite's zero vector (max(D, O) elements)
    buffer finite_z_;  // all_finite's projections (one per row checked)
};

} // namespace velora
