#pragma once
/// \file
/// `low_rank_adamw<B>`: AdaRankGrad's low-rank AdamW (Refael et al., arXiv 2410.17881), with
/// GaLore (Zhao et al., arXiv 2403.03507) as the configuration `optimizer_config::galore`.
///
/// A host registers each parameter with its shape, then calls `step` for one parameter at a
/// time, as soon as that parameter's gradient exists, so it never has to hold all gradients
/// at once. A 2-D parameter registered as low-rank keeps Adam's moments in a rank-r subspace
/// of its gradient (r chosen per refresh by the rank policy); everything else gets plain
/// AdamW with the same hyper-parameters. One low-rank step, in GaLore's order:
///
///   Ĝ = B·M                          project (M = G or Gᵀ, B the r×len basis, gradient.hpp)
///   if due: new B (rsvd.hpp), transport the moments (transport.hpp), Ĝ = B·M again
///   m = β₁m + (1−β₁)Ĝ,  v = β₂v + (1−β₂)Ĝ²,  t += 1 (never reset)
///   W = (1 − lr·wd) · (W − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · α · back_project(m / (√v + ε)))
///
/// A VeLoRA layer's gradient may be passed in factored form (velora::factored_gradient); the
/// m×n gradient is then never formed. Steps between refreshes allocate nothing; a refresh may
/// allocate (Eigen's QR/SVD temporaries, and the state buffers when the rank changes).
///
/// Numerical trouble never corrupts the state: a gradient with NaN or Inf makes `step` return
/// status::non_finite_input before anything changes, and an all-zero gradient where a new
/// subspace is due returns status::degenerate_input and keeps the old subspace.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include <velora/compressor.hpp>
#include <velora/core/error.hpp>
#include <velora/core/rng.hpp>
#include <velora/core/serialize.hpp>

#include "backend.hpp"
#include "gradient.hpp"
#include "policies.hpp"
#include "rsvd.hpp"
#include "transport.hpp"

namespace adarank {

using velora::status;

/// How a registered parameter is optimised.
enum class param_kind : std::uint8_t {
    automatic = 0,   ///< low-rank when 2-D and the low-rank state at the maximum rank is smaller than dense AdamW's
    low_rank = 1,
    dense = 2,
};

/// What the optimizer reports about one parameter.
struct layer_info {
    index_t rows = 0, cols = 0;
    bool low_rank = false;
    projection_side side = projection_side::left;   ///< low-rank only
    index_t rank = 0;                                ///< current rank (0 before the first step)
    std::uint64_t steps = 0;                         ///< Adam steps taken (t)
    std::uint64_t refreshes = 0;                     ///< subspaces found
    std::uint64_t steps_in_subspace = 0;
    std::size_t state_bytes = 0;                     ///< basis + moments held for this parameter
    double projected_norm2 = 0;                      ///< ‖Ĝ‖_F² of the last step
    subspace_report last_refresh{};                  ///< what the last subspace search did
};

template <optimizer_backend B>
class low_rank_adamw {
public:
    using value_type = typename B::value_type;
    using T = value_type;
    using param_id = index_t;

    /// Throws std::invalid_argument for an invalid configuration (see policies.hpp: validate).
    explicit low_rank_adamw(B& backend, optimizer_config config = {})
        : b_(&backend), config_(checked(config)), lr_(config.adam.lr), finder_(backend, config.rsvd) {}

    [[nodiscard]] const optimizer_config& config() const noexcept { return config_; }
    [[nodiscard]] index_t size() const noexcept { return static_cast<index_t>(layers_.size()); }

    /// The learning rate of the next steps (for schedules). Throws for a negative or non-finite value.
    void set_learning_rate(double lr) {
        velora::detail::require(std::isfinite(lr) && lr >= 0, "adarank::low_rank_adamw::set_learning_rate",
                                "argument 'lr' must be finite and >= 0, got ", lr);
        lr_ = lr;
    }
    [[nodiscard]] double learning_rate() const noexcept { return lr_; }

    /// Registers a rows×cols parameter (a vector is 1×n) and sizes every buffer its steps need.
    param_id add_parameter(index_t rows, index_t cols, param_kind kind = param_kind::automatic) {
        constexpr const char* fn = "adarank::low_rank_adamw::add_parameter";
        velora::detail::require(rows > 0 && cols > 0, fn, "the shape must be positive, got ", rows, "x", cols);
        velora::detail::require(static_cast<unsigned>(kind) <= 2, fn, "argument 'kind' has the invalid value ", static_cast<int>(kind));
        layer l;
        l.rows = rows;
        l.cols = cols;
        l.seed = velora::mix64(config_.seed ^ velora::mix64(static_cast<std::uint64_t>(layers_.size())));
        const index_t r_cap = std::min(config_.rank.r_max, std::min(rows, cols));
        if (kind == param_kind::automatic) {
            const bool left = choose_side(config_.side, rows, cols) == projection_side::left;
            const double low = static_cast<double>(r_cap) * static_cast<double>(left ? rows + 2 * cols : cols + 2 * rows);
            kind = rows >= 2 && cols >= 2 && low < 2.0 * static_cast<double>(rows) * static_cast<double>(cols) ? param_kind::low_rank
                                                                                                                : param_kind::dense;
        }
        l.low_rank = kind == param_kind::low_rank;
        if (l.low_rank) {
            l.side = choose_side(config_.side, rows, cols);
            l.len = l.side == projection_side::left ? rows : cols;
            l.other = l.side == projection_side::left ? cols : rows;
            l.r_cap = r_cap;
            grow(proj_, r_cap * l.other);
            grow(m_next_, r_cap * l.other);
            grow(v_next_, r_cap * l.other);
            grow(basis_next_, r_cap * l.len);
            grow(r_, r_cap * r_cap);
            grow(r2_, r_cap * r_cap);
            finder_.reserve(l.len, l.other, r_cap);
        } else {
            l.m.resize(static_cast<std::size_t>(rows * cols));
            l.v.resize(static_cast<std::size_t>(rows * cols));
            b_->fill(dense_view(l.m, l), T(0));
            b_->fill(dense_view(l.v, l), T(0));
        }
        layers_.push_back(std::move(l));
        return size() - 1;
    }

    /// One AdamW step of parameter `id` with a dense gradient (both rows×cols, backend memory).
    status step(param_id id, matrix_view<T> weight, const_matrix_view<T> grad) {
        constexpr const char* fn = "adarank::low_rank_adamw::step";
        layer& l = checked_layer(id, fn);
        velora::check_shape(weight, l.rows, l.cols, fn, "weight");
        velora::check_shape(grad, l.rows, l.cols, fn, "grad");
        if (!l.low_rank) return step_dense(l, weight, grad);
        const dense_gradient<B> g(*b_, grad);
        return step_low_rank(l, weight, g);
    }

    /// One step with a VeLoRA layer's gradient in factored form (velora::compressor::factored):
    /// a low-rank parameter never forms the rows×cols gradient; a dense one expands it into a
    /// workspace (allocated on first use).
    status step(param_id id, matrix_view<T> weight, const velora::factored_gradient<T>& grad) {
        constexpr const char* fn = "adarank::low_rank_adamw::step";
        layer& l = checked_layer(id, fn);
        velora::check_shape(weight, l.rows, l.cols, fn, "weight");
        velora::check_view(grad.a, fn, "grad.a");
        velora::detail::require(grad.a.rows == l.rows && grad.features == l.cols, fn, "argument 'grad' describes a ", grad.a.rows, "x",
                                grad.features, " gradient but parameter ", id, " is ", l.rows, "x", l.cols);
        velora::detail::require(grad.v != nullptr && grad.subtoken_size > 0 && grad.subtoken_size * grad.a.cols >= grad.features, fn,
                                "argument 'grad' is inconsistent: ", grad.a.cols, " groups of s = ", grad.subtoken_size,
                                " cannot cover D = ", grad.features, grad.v ? "" : " (and v is null)");
        // Every column of A is read by some product (also those covering only padding), so a
        // NaN anywhere in A is reported the same way on every kind of step.
        if (!std::isfinite(b_->sum_of_squares(grad.a))) return status::non_finite_input;
        if (l.low_rank) {
            const factored_gradient_op<B> g(*b_, grad, fused_scratch_);
            return step_low_rank(l, weight, g);
        }
        grow(dense_grad_, l.rows * l.cols);
        matrix_view<T> dense{dense_grad_.data(), l.rows, l.cols, l.cols};
        b_->expand_subtokens(grad.a, grad.v, grad.subtoken_size, grad.scale, dense);
        return step_dense(l, weight, dense);
    }

    /// Replaces the subspace of a low-rank parameter with `basis` (r×len, orthonormal rows, backend
    /// memory; len = rows on the left side, cols on the right), transporting the moments by the
    /// configured policy as a refresh would. The refresh policy counts from here.
    void set_basis(param_id id, const_matrix_view<T> basis) {
        constexpr const char* fn = "adarank::low_rank_adamw::set_basis";
        layer& l = checked_layer(id, fn);
        velora::detail::require(l.low_rank, fn, "parameter ", id, " is optimised densely; it has no basis");
        velora::check_view(basis, fn, "basis");
        velora::detail::require(basis.cols == l.len && basis.rows <= l.r_cap, fn, "argument 'basis' is ", basis.rows, "x", basis.cols,
                                " but parameter ", id, " needs r x ", l.len, " with 1 <= r <= ", l.r_cap);
        auto next = view(basis_next_, basis.rows, l.len);
        for (index_t i = 0; i < basis.rows; ++i) b_->copy(basis.row(i), next.row(i), l.len);
        subspace_report rep;
        rep.rank = basis.rows;
        commit_subspace(l, next, rep, l.counter);
    }

    [[nodiscard]] layer_info info(param_id id) const {
        const layer& l = checked_layer(id, "adarank::low_rank_adamw::info");
        layer_info i;
        i.rows = l.rows;
        i.cols = l.cols;
        i.low_rank = l.low_rank;
        i.side = l.side;
        i.rank = l.rank;
        i.steps = l.t;
        i.refreshes = l.refreshes;
        i.steps_in_subspace = l.since;
        i.state_bytes = state_bytes(l);
        i.projected_norm2 = l.projected_norm2;
        i.last_refresh = l.last;
        return i;
    }

    /// Basis (rank×len) and moments (rank×other, or rows×cols for a dense parameter) of a
    /// parameter, as views of backend memory (valid until its next step or set_basis).
    [[nodiscard]] const_matrix_view<T> basis(param_id id) const {
        const layer& l = checked_layer(id, "adarank::low_rank_adamw::basis");
        return {l.basis.data(), l.rank, l.len, l.len};
    }
    [[nodiscard]] const_matrix_view<T> first_moment(param_id id) const { return moment(id, &layer::m); }
    [[nodiscard]] const_matrix_view<T> second_moment(param_id id) const { return moment(id, &layer::v); }

    /// Bytes of optimizer state over all parameters: for a low-rank parameter of rank r,
    /// (r·len + 2·r·other)·sizeof(T); for a dense one 2·rows·cols·sizeof(T).
    [[nodiscard]] std::size_t state_bytes() const noexcept {
        std::size_t sum = 0;
        for (const layer& l : layers_) sum += state_bytes(l);
        return sum;
    }
    /// Bytes of workspace shared by all parameters (sized for the largest one).
    [[nodiscard]] std::size_t workspace_bytes() const noexcept {
        return (proj_.capacity() + m_next_.capacity() + v_next_.capacity() + basis_next_.capacity() + r_.capacity() + r2_.capacity() +
                fused_scratch_.capacity() + dense_grad_.capacity()) *
                   sizeof(T) +
               finder_.workspace_bytes();
    }

    // ------------------------------------------------------------------ state
    static constexpr std::string_view state_kind = "adarank.low_rank_adamw";
    static constexpr std::uint32_t state_version = 1;

    /// Everything a resumed run needs to continue bit-identically: the configuration it belongs
    /// to, the learning rate, and per parameter its shape, side, rank, step counters, random
    /// stream position, basis and moments.
    [[nodiscard]] std::vector<std::byte> save_state() const {
        velora::state_writer w(state_kind, state_version);
        w.put(static_cast<std::uint8_t>(sizeof(T)));
        put_config(w, config_);
        w.put(lr_);
        w.put(static_cast<std::uint64_t>(layers_.size()));
        std::vector<T> host;
        for (const layer& l : layers_) {
            w.put(static_cast<std::int64_t>(l.rows));
            w.put(static_cast<std::int64_t>(l.cols));
            w.put(static_cast<std::uint8_t>(l.low_rank));
            w.put(static_cast<std::uint8_t>(l.side));
            put_progress(w, l);
            const index_t moment_size = l.low_rank ? l.rank * l.other : l.rows * l.cols;
            put_buffer(w, l.basis, l.low_rank ? l.rank * l.len : 0, host);
            put_buffer(w, l.m, moment_size, host);
            put_buffer(w, l.v, moment_size, host);
        }
        return std::move(w).finish();
    }

    /// Restores a state saved by an optimizer with the same configuration (the learning rate may
    /// differ; the saved one is restored) and the same parameters registered in the same order.
    /// Throws velora::state_format_error and changes nothing on any mismatch or damage.
    void load_state(std::span<const std::byte> blob) {
        constexpr const char* fn = "adarank::low_rank_adamw::load_state";
        velora::state_reader r(blob, state_kind, state_version, fn);
        const auto width = r.get<std::uint8_t>();
        if (width != sizeof(T)) r.bad("state was saved with ", int(width), "-byte values but this optimizer uses ", sizeof(T));
        optimizer_config saved = get_config(r);
        saved.adam.lr = config_.adam.lr;
        if (!(saved == config_)) r.bad("state was saved with a different optimizer configuration (", describe_difference(saved, config_), ")");
        const auto lr = r.get<double>();
        const auto count = r.get<std::uint64_t>();
        if (count != layers_.size()) r.bad("state holds ", count, " parameters but ", layers_.size(), " are registered");
        std::vector<loaded_layer> loaded(layers_.size());
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            const layer& l = layers_[i];
            loaded_layer& s = loaded[i];
            const auto rows = r.get<std::int64_t>(), cols = r.get<std::int64_t>();
            const bool low_rank = r.get<std::uint8_t>() != 0;
            const auto side = r.get<std::uint8_t>();
            if (rows != l.rows || cols != l.cols || low_rank != l.low_rank || side != static_cast<std::uint8_t>(l.side))
                r.bad("parameter ", i, " was saved as ", rows, "x", cols, low_rank ? " low-rank" : " dense", " but is registered as ", l.rows,
                      "x", l.cols, l.low_rank ? " low-rank" : " dense");
            static_cast<progress&>(s) = get_progress(r);
            if (s.rank < 0 || s.rank > l.r_cap || (!l.low_rank && s.rank != 0))
                r.bad("parameter ", i, " has the invalid rank ", s.rank, " (at most ", l.r_cap, ")");
            const index_t moment_size = l.low_rank ? s.rank * l.other : l.rows * l.cols;
            s.basis = r.get_array<T>(l.low_rank ? s.rank * l.len : 0);
            s.m = r.get_array<T>(moment_size);
            s.v = r.get_array<T>(moment_size);
            const auto finite = [](const std::vector<T>& x) {
                return std::all_of(x.begin(), x.end(), [](T e) { return std::isfinite(e); });
            };
            if (!finite(s.basis) || !finite(s.m) || !finite(s.v) || std::any_of(s.v.begin(), s.v.end(), [](T e) { return e < T(0); }))
                r.bad("parameter ", i, " has non-finite state or a negative second moment");
        }
        r.expect_end();
        if (!std::isfinite(lr) || lr < 0) r.bad("the saved learning rate ", lr, " is not finite and >= 0");
        // Allocate every buffer whose size changes before changing anything (buffers of the right
        // size are reused: loading does not double the memory of dense moments), then commit.
        std::vector<buffer> fresh(3 * layers_.size());
        auto live = [&](std::size_t i, int which) -> buffer& {
            return which == 0 ? layers_[i].basis : which == 1 ? layers_[i].m : layers_[i].v;
        };
        auto loaded_part = [&](std::size_t i, int which) -> const std::vector<T>& {
            return which == 0 ? loaded[i].basis : which == 1 ? loaded[i].m : loaded[i].v;
        };
        for (std::size_t i = 0; i < layers_.size(); ++i)
            for (int which = 0; which < 3; ++which)
                if (live(i, which).size() != loaded_part(i, which).size()) fresh[3 * i + static_cast<std::size_t>(which)].resize(loaded_part(i, which).size());
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            for (int which = 0; which < 3; ++which) {
                buffer& target = live(i, which);
                const std::vector<T>& source = loaded_part(i, which);
                if (target.size() != source.size()) target = std::move(fresh[3 * i + static_cast<std::size_t>(which)]);
                b_->copy_from_host(source.data(), target.data(), static_cast<index_t>(source.size()));
            }
            static_cast<progress&>(layers_[i]) = loaded[i];
        }
        lr_ = lr;
    }

private:
    using buffer = typename B::template buffer<T>;

    // What a parameter's steps change, besides its buffers; saved and restored as one piece.
    struct progress {
        index_t rank = 0;
        std::uint64_t t = 0, since = 0, refreshes = 0;
        std::uint64_t counter = 0;    // position in this parameter's Gaussian stream
        double anchor2 = 0;           // ‖Ĝ‖² at the first step in this subspace (-1 until known)
        double projected_norm2 = 0;
        subspace_report last{};
    };

    struct layer : progress {
        index_t rows = 0, cols = 0;
        bool low_rank = false;
        projection_side side = projection_side::left;
        index_t len = 0, other = 0, r_cap = 0;
        std::uint64_t seed = 0;       // of this parameter's Gaussian stream
        buffer basis, m, v;
    };

    struct loaded_layer : progress {
        std::vector<T> basis, m, v;
    };

    static optimizer_config checked(const optimizer_config& c) {
        validate(c, "adarank::low_rank_adamw::low_rank_adamw");
        return c;
    }

    layer& checked_layer(param_id id, const char* fn) {
        velora::detail::require(id >= 0 && id < size(), fn, "argument 'id' is ", id, " but ", size(), " parameters are registered");
        return layers_[static_cast<std::size_t>(id)];
    }
    const layer& checked_layer(param_id id, const char* fn) const { return const_cast<low_rank_adamw*>(this)->checked_layer(id, fn); }

    const_matrix_view<T> moment(param_id id, buffer layer::*which) const {
        const layer& l = checked_layer(id, "adarank::low_rank_adamw::moment");
        if (l.low_rank) return {(l.*which).data(), l.rank, l.other, l.other};
        return {(l.*which).data(), l.rows, l.cols, l.cols};
    }

    static std::size_t state_bytes(const layer& l) noexcept {
        const index_t elements = l.low_rank ? l.rank * (l.len + 2 * l.other) : 2 * l.rows * l.cols;
        return static_cast<std::size_t>(elements) * sizeof(T);
    }

    static void grow(buffer& buf, index_t n) {
        if (buf.size() < static_cast<std::size_t>(n)) buf.resize(static_cast<std::size_t>(n));
    }
    static matrix_view<T> view(buffer& buf, index_t rows, index_t cols) { return {buf.data(), rows, cols, cols}; }
    static matrix_view<T> dense_view(buffer& buf, const layer& l) { return view(buf, l.rows, l.cols); }

    // Bias-corrected step size lr·√(1−β₂ᵗ)/(1−β₁ᵗ) for step count t, and the decay factor 1 − lr·wd.
    [[nodiscard]] double step_size(std::uint64_t t) const noexcept {
        const double td = static_cast<double>(t);
        return lr_ * std::sqrt(1.0 - std::pow(config_.adam.beta2, td)) / (1.0 - std::pow(config_.adam.beta1, td));
    }
    [[nodiscard]] double decay_factor() const noexcept { return 1.0 - lr_ * config_.adam.weight_decay; }

    status step_dense(layer& l, matrix_view<T> weight, const_matrix_view<T> grad) {
        if (!std::isfinite(b_->sum_of_squares(grad))) return status::non_finite_input;
        ++l.t;
        b_->adamw_update(weight, grad, dense_view(l.m, l), dense_view(l.v, l), T(config_.adam.beta1), T(config_.adam.beta2),
                         T(config_.adam.eps), T(step_size(l.t)), T(decay_factor()));
        return status::ok;
    }

    template <class Grad>
    status step_low_rank(layer& l, matrix_view<T> weight, const Grad& grad) {
        const side_matrix<Grad> m(grad, l.side);
        // A refresh that is due by the step count alone needs no projection onto the old basis.
        bool refresh = l.rank == 0 || config_.refresh.due_by_count(static_cast<index_t>(l.since));
        double projected2 = 0, energy = -1;
        if (!refresh) {
            m.mul(basis_view(l), view(proj_, l.rank, l.other));
            projected2 = b_->sum_of_squares(view(proj_, l.rank, l.other));
            if (!std::isfinite(projected2)) return status::non_finite_input;
            refresh_inputs in{static_cast<index_t>(l.since), projected2, l.anchor2, 0.0};
            if (config_.refresh.needs_gradient_norm()) {
                energy = m.norm2();
                if (!std::isfinite(energy)) return status::non_finite_input;
                in.gradient_norm2 = energy;
            }
            refresh = config_.refresh.due(in);
        }
        status result = status::ok;
        if (refresh) {
            if (energy < 0) energy = m.norm2();
            if (!std::isfinite(energy)) return status::non_finite_input;
            if (energy == 0) {
                result = status::degenerate_input;
                if (l.rank == 0) {   // nothing to find a subspace from yet: decay only, as AdamW would with G = 0
                    ++l.t;
                    const double decay = decay_factor();
                    if (decay != 1.0) b_->scale(weight, T(decay));
                    return result;
                }
            }
            if (energy > 0) {   // an all-zero gradient keeps the existing subspace
                std::uint64_t counter = l.counter;
                auto next = view(basis_next_, l.r_cap, l.len);
                const auto warm = l.rank > 0 ? basis_view(l) : const_matrix_view<T>{};
                const subspace_report rep = finder_.find(m, config_.rank, energy, warm, l.seed, counter, next);
                const auto chosen = next.row_block(0, rep.rank);
                m.mul(chosen, view(proj_, rep.rank, l.other));
                projected2 = b_->sum_of_squares(view(proj_, rep.rank, l.other));
                if (!std::isfinite(projected2)) return status::non_finite_input;   // nothing committed yet
                commit_subspace(l, chosen, rep, counter);
            } else {
                b_->fill(view(proj_, l.rank, l.other), T(0));   // G = 0: so is its projection
                projected2 = 0;
            }
        }
        if (l.anchor2 < 0) l.anchor2 = projected2;   // first step in this subspace

        // Adam in the subspace; n = m/(√v+ε) overwrites the projected gradient.
        auto n = view(proj_, l.rank, l.other);
        b_->adam_moments(n, view(l.m, l.rank, l.other), view(l.v, l.rank, l.other), T(config_.adam.beta1), T(config_.adam.beta2),
                         T(config_.adam.eps), n);
        ++l.t;
        ++l.since;
        l.projected_norm2 = projected2;
        const double decay = decay_factor();
        const T alpha = T(-decay * step_size(l.t) * config_.scale);
        // W = decay·W − decay·step·α·ΔW with ΔW = Bᵀ·N (left) or (Bᵀ·N)ᵀ = Nᵀ·B (right).
        if (l.side == projection_side::left) b_->gemm(velora::op::transpose, velora::op::none, alpha, basis_view(l), n, T(decay), weight);
        else b_->gemm(velora::op::transpose, velora::op::none, alpha, n, basis_view(l), T(decay), weight);
        return result;
    }

    // Makes `next` (r×len, in basis_next_) the subspace of `l`, carrying the moments over.
    void commit_subspace(layer& l, matrix_view<T> next, const subspace_report& rep, std::uint64_t counter) {
        const index_t r_new = next.rows;
        auto m_next = view(m_next_, r_new, l.other);
        auto v_next = view(v_next_, r_new, l.other);
        if (l.rank > 0) {
            transport_moments(*b_, config_.transport, const_matrix_view<T>(next), basis_view(l), moment_view(l, l.m), moment_view(l, l.v),
                              m_next, v_next, view(r_, r_new, l.rank), view(r2_, r_new, l.rank));
        } else {
            b_->fill(m_next, T(0));
            b_->fill(v_next, T(0));
        }
        resize_state(l, r_new);
        b_->copy(next.data, l.basis.data(), r_new * l.len);
        b_->copy(m_next.data, l.m.data(), r_new * l.other);
        b_->copy(v_next.data, l.v.data(), r_new * l.other);
        l.rank = r_new;
        l.since = 0;
        l.anchor2 = -1;   // set from the first projected gradient in the new subspace
        ++l.refreshes;
        l.counter = counter;
        l.last = rep;
    }

    // State buffers sized exactly for rank r (so state_bytes is what is held); reallocated
    // only when the rank changes.
    static void resize_state(layer& l, index_t r) {
        if (r == l.rank && l.basis.size() == static_cast<std::size_t>(r * l.len)) return;
        // Allocate everything first, so that a failed allocation leaves the layer as it was.
        buffer basis, m, v;
        basis.resize(static_cast<std::size_t>(r * l.len));
        m.resize(static_cast<std::size_t>(r * l.other));
        v.resize(static_cast<std::size_t>(r * l.other));
        l.basis = std::move(basis);
        l.m = std::move(m);
        l.v = std::move(v);
    }

    static const_matrix_view<T> basis_view(const layer& l) { return {l.basis.data(), l.rank, l.len, l.len}; }
    static const_matrix_view<T> moment_view(const layer& l, const buffer& b) { return {b.data(), l.rank, l.other, l.other}; }

    void put_buffer(velora::state_writer& w, const buffer& buf, index_t n, std::vector<T>& host) const {
        host.resize(static_cast<std::size_t>(n));
        b_->copy_to_host(buf.data(), host.data(), n);
        w.put_array(std::span<const T>(host));
    }

    // Field by field: a struct's padding bytes are not part of the format.
    static void put_progress(velora::state_writer& w, const progress& p) {
        w.put(static_cast<std::int64_t>(p.rank));
        w.put(p.t);
        w.put(p.since);
        w.put(p.refreshes);
        w.put(p.counter);
        w.put(p.anchor2);
        w.put(p.projected_norm2);
        put_report(w, p.last);
    }
    static progress get_progress(velora::state_reader& r) {
        progress p;
        p.rank = static_cast<index_t>(r.get<std::int64_t>());
        p.t = r.get<std::uint64_t>();
        p.since = r.get<std::uint64_t>();
        p.refreshes = r.get<std::uint64_t>();
        p.counter = r.get<std::uint64_t>();
        p.anchor2 = r.get<double>();
        p.projected_norm2 = r.get<double>();
        p.last = get_report(r);
        return p;
    }

    static void put_report(velora::state_writer& w, const subspace_report& rep) {
        w.put(static_cast<std::int64_t>(rep.rank));
        w.put(static_cast<std::int64_t>(rep.sketch));
        w.put(static_cast<std::int32_t>(rep.power_iterations));
        w.put(static_cast<std::uint8_t>(rep.exact));
        w.put(static_cast<std::uint8_t>(rep.warm));
        w.put(rep.energy);
        w.put(rep.captured);
    }
    static subspace_report get_report(velora::state_reader& r) {
        subspace_report rep;
        rep.rank = static_cast<index_t>(r.get<std::int64_t>());
        rep.sketch = static_cast<index_t>(r.get<std::int64_t>());
        rep.power_iterations = r.get<std::int32_t>();
        rep.exact = r.get<std::uint8_t>() != 0;
        rep.warm = r.get<std::uint8_t>() != 0;
        rep.energy = r.get<double>();
        rep.captured = r.get<double>();
        return rep;
    }

    static void put_config(velora::state_writer& w, const optimizer_config& c) {
        w.put(c.adam.lr);
        w.put(c.adam.beta1);
        w.put(c.adam.beta2);
        w.put(c.adam.eps);
        w.put(c.adam.weight_decay);
        w.put(c.scale);
        w.put(static_cast<std::uint8_t>(c.side));
        w.put(static_cast<std::uint8_t>(c.rank.type));
        w.put(static_cast<std::int64_t>(c.rank.r_min));
        w.put(static_cast<std::int64_t>(c.rank.r_max));
        w.put(c.rank.xi);
        w.put(static_cast<std::uint8_t>(c.refresh.type));
        w.put(c.refresh.threshold);
        w.put(static_cast<std::int64_t>(c.refresh.min_interval));
        w.put(static_cast<std::int64_t>(c.refresh.max_interval));
        w.put(static_cast<std::uint8_t>(c.transport));
        w.put(static_cast<std::int64_t>(c.rsvd.oversampling));
        w.put(static_cast<std::int32_t>(c.rsvd.power_iterations));
        w.put(static_cast<std::int32_t>(c.rsvd.warm_power_iterations));
        w.put(static_cast<std::uint8_t>(c.rsvd.warm_start));
        w.put(c.rsvd.exact_fraction);
        w.put(c.seed);
    }

    static optimizer_config get_config(velora::state_reader& r) {
        optimizer_config c;
        c.adam.lr = r.get<double>();
        c.adam.beta1 = r.get<double>();
        c.adam.beta2 = r.get<double>();
        c.adam.eps = r.get<double>();
        c.adam.weight_decay = r.get<double>();
        c.scale = r.get<double>();
        c.side = static_cast<side_policy>(r.get<std::uint8_t>());
        c.rank.type = static_cast<rank_policy::kind>(r.get<std::uint8_t>());
        c.rank.r_min = static_cast<index_t>(r.get<std::int64_t>());
        c.rank.r_max = static_cast<index_t>(r.get<std::int64_t>());
        c.rank.xi = r.get<double>();
        c.refresh.type = static_cast<refresh_policy::kind>(r.get<std::uint8_t>());
        c.refresh.threshold = r.get<double>();
        c.refresh.min_interval = static_cast<index_t>(r.get<std::int64_t>());
        c.refresh.max_interval = static_cast<index_t>(r.get<std::int64_t>());
        c.transport = static_cast<transport_policy>(r.get<std::uint8_t>());
        c.rsvd.oversampling = static_cast<index_t>(r.get<std::int64_t>());
        c.rsvd.power_iterations = r.get<std::int32_t>();
        c.rsvd.warm_power_iterations = r.get<std::int32_t>();
        c.rsvd.warm_start = r.get<std::uint8_t>() != 0;
        c.rsvd.exact_fraction = r.get<double>();
        c.seed = r.get<std::uint64_t>();
        return c;
    }

    static std::string describe_difference(const optimizer_config& saved, const optimizer_config& live) {
        if (!(saved.adam == live.adam)) return "adam hyper-parameters differ";
        if (saved.scale != live.scale) return "scale differs";
        if (saved.side != live.side) return "side policy differs";
        if (!(saved.rank == live.rank)) return "rank policy differs";
        if (!(saved.refresh == live.refresh)) return "refresh policy differs";
        if (saved.transport != live.transport) return "transport policy differs";
        if (!(saved.rsvd == live.rsvd)) return "rsvd settings differ";
        return "seed differs";
    }

    B* b_;
    optimizer_config config_;
    double lr_;
    subspace_finder<B> finder_;
    std::vector<layer> layers_;
    // Workspace shared by all parameters, sized at registration for the largest.
    buffer proj_, m_next_, v_next_, basis_next_, r_, r2_;
    buffer fused_scratch_, dense_grad_;   // grown on first use
};

/// A low-rank optimizer as a host drives it: register shapes, step one parameter at a time.
template <class O>
concept low_rank_optimizer = requires(O& o, index_t n, typename O::param_id id, matrix_view<typename O::value_type> w,
                                      const_matrix_view<typename O::value_type> g) {
    { o.add_parameter(n, n) } -> std::same_as<typename O::param_id>;
    { o.step(id, w, g) } -> std::same_as<status>;
    { o.info(id) } -> std::same_as<layer_info>;
    { o.state_bytes() } -> std::convertible_to<std::size_t>;
    { o.save_state() } -> std::same_as<std::vector<std::byte>>;
};

} // namespace adarank
