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
/// status::non_finite_input before anything changes; a finite gradient, state or step whose
/// result would not be finite in T returns status::overflow before anything changes (an
/// overflow certificate from quantities the step computes anyway, with an exact slow path when
/// it is inconclusive; see "overflow certificate" below); an all-zero gradient where a new
/// subspace is due returns status::degenerate_input and keeps the old subspace. Sizes whose
/// products do not fit are std::invalid_argument at registration, and load_state accepts
/// exactly the states the optimizer can be in (see load_state).
#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <velora/compressor.hpp>
#include <velora/core/checked.hpp>
#include <velora/core/error.hpp>
#include <velora/core/rng.hpp>
#include <velora/core/serialize.hpp>
#include <velora/distributed/communicator.hpp>

#include "backend.hpp"
#include "gradient.hpp"
#include "mean_over_ranks.hpp"
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
    /// Bytes this rank put into all-reduces for this parameter's last step (elements × sizeof(T),
    /// including an all_reduce_mean before it); 0 for a step without a communicator (a
    /// communicator of size 1 still counts its no-op all-reduces). Not saved with the state.
    std::uint64_t communicated_bytes = 0;
};

/// `Rank` and `Refresh` are the rank estimator and the refresh rule (the library's by default;
/// any types satisfying the concepts in policies.hpp, held by value in the configuration, so a
/// step calls them without allocating or dispatching).
template <optimizer_backend B, rank_estimator Rank = rank_policy, refresh_rule Refresh = refresh_policy>
    requires persistent_policy<Rank> && persistent_policy<Refresh>
class low_rank_adamw {
public:
    using value_type = typename B::value_type;
    using T = value_type;
    using param_id = index_t;
    using config_type = basic_optimizer_config<Rank, Refresh>;

    /// A basis handed to set_basis or found in a loaded state must have orthonormal rows within
    /// this tolerance: max |B·Bᵀ − I| (entry-wise, computed in double). The library's own bases are
    /// U_Cᵀ·S, one GEMM in T of factors orthonormal to double precision (CholeskyQR2, the Gram
    /// eigenvectors) or to T's (the Householder fall-back), so they deviate by a few hundred units
    /// of T's rounding at most (~1e-5 in float, ~1e-13 in double for sketches and lengths in the
    /// thousands); the tolerance leaves a margin of 100× (float) and 1e5× (double) over that and
    /// still rejects what is not a basis (a zero row deviates by 1, a doubled one by 3).
    static constexpr double orthonormality_tolerance = std::numeric_limits<T>::digits <= 24 ? 1e-3 : 1e-8;

    /// Throws std::invalid_argument for an invalid configuration (see policies.hpp: validate), and
    /// for an ε that T rounds to zero or to a subnormal value (n = m/(√v + ε) is computed in T).
    explicit low_rank_adamw(B& backend, config_type config = {})
        : b_(&backend), config_(checked(config)), coef_(coefficients(config_)), lr_(config.adam.lr), finder_(backend, config.rsvd) {}

    [[nodiscard]] const config_type& config() const noexcept { return config_; }
    [[nodiscard]] index_t size() const noexcept { return static_cast<index_t>(layers_.size()); }

    /// The learning rate of the next steps (for schedules). Throws for a negative or non-finite
    /// value, and under the torch convention for lr·wd >= 1 (check_learning_rate, policies.hpp).
    void set_learning_rate(double lr) {
        check_learning_rate(lr, config_.adam, "adarank::low_rank_adamw::set_learning_rate", "argument 'lr'");
        lr_ = lr;
    }
    [[nodiscard]] double learning_rate() const noexcept { return lr_; }

    /// Registers a rows×cols parameter (a vector is 1×n) and sizes every buffer its steps need.
    /// Throws std::invalid_argument, registering nothing, for a non-positive shape, an invalid
    /// kind, or sizes whose products (rows·cols, the state at the largest rank, in bytes of T) do
    /// not fit in the address space.
    param_id add_parameter(index_t rows, index_t cols, param_kind kind = param_kind::automatic) {
        constexpr const char* fn = "adarank::low_rank_adamw::add_parameter";
        using velora::detail::checked_add;
        using velora::detail::checked_elements;
        using velora::detail::checked_mul;
        velora::detail::require(rows > 0 && cols > 0, fn, "the shape must be positive, got ", rows, "x", cols);
        velora::detail::require(static_cast<unsigned>(kind) <= 2, fn, "argument 'kind' has the invalid value ", static_cast<int>(kind));
        // Every buffer below is a product of rows, cols and r_cap <= min(rows, cols) with at most
        // rows·cols elements, except the states (dense AdamW's two moments; basis and moments at
        // rank r_cap), which are checked on their own: no size formed later can wrap.
        const index_t elements = checked_elements(checked_mul(rows, cols, fn, "argument 'rows' x 'cols'"), sizeof(T), fn, "argument 'rows' x 'cols'");
        const index_t r_cap = std::min<index_t>(config_.rank.max_rank(), std::min(rows, cols));
        if (kind == param_kind::automatic) {
            const bool left = choose_side(config_.side, rows, cols) == projection_side::left;
            const double low = static_cast<double>(r_cap) * (left ? static_cast<double>(rows) + 2.0 * static_cast<double>(cols)
                                                                  : static_cast<double>(cols) + 2.0 * static_cast<double>(rows));
            kind = rows >= 2 && cols >= 2 && low < 2.0 * static_cast<double>(rows) * static_cast<double>(cols) ? param_kind::low_rank
                                                                                                                : param_kind::dense;
        }
        layer l;
        l.rows = rows;
        l.cols = cols;
        l.seed = velora::mix64(config_.seed ^ velora::mix64(static_cast<std::uint64_t>(layers_.size())));
        l.low_rank = kind == param_kind::low_rank;
        if (l.low_rank) {
            l.side = choose_side(config_.side, rows, cols);
            l.len = l.side == projection_side::left ? rows : cols;
            l.other = l.side == projection_side::left ? cols : rows;
            l.r_cap = r_cap;
            // basis + two moments at the largest rank: what state_bytes() may have to report
            (void)checked_elements(checked_mul(r_cap, checked_add(l.len, checked_mul(index_t{2}, l.other, fn, "2 x other"), fn, "len + 2 x other"), fn,
                                               "the low-rank state r_cap x (len + 2 x other)"),
                                   sizeof(T), fn, "the low-rank state r_cap x (len + 2 x other)");
            grow(proj_, r_cap * l.other);
            grow(m_next_, r_cap * l.other);
            grow(v_next_, r_cap * l.other);
            grow(basis_next_, r_cap * l.len);
            grow(r_, r_cap * r_cap);
            grow(r2_, r_cap * r_cap);
            finder_.reserve(l.len, l.other, r_cap);
        } else {
            (void)checked_elements(checked_mul(index_t{2}, elements, fn, "dense AdamW's two moments 2 x rows x cols"), sizeof(T), fn,
                                   "dense AdamW's two moments 2 x rows x cols");
            l.m.resize(static_cast<std::size_t>(elements));
            l.v.resize(static_cast<std::size_t>(elements));
            b_->fill(dense_view(l.m, l), T(0));
            b_->fill(dense_view(l.v, l), T(0));
        }
        layers_.push_back(std::move(l));
        return size() - 1;
    }

    /// Registers a parameter as above on every rank of `comm` and checks, collectively, that every
    /// rank registered the same one (shape, kind, side, index) with the same configuration: two
    /// small collectives. A mismatch throws std::invalid_argument on every rank (instead of a
    /// hang or silently different training later) and registers nothing anywhere; a rank whose
    /// own registration threw rethrows its error.
    template <velora::communicator C>
    param_id add_parameter(index_t rows, index_t cols, param_kind kind, C& comm) {
        std::exception_ptr error;
        param_id id = -1;
        try {
            id = add_parameter(rows, cols, kind);
        } catch (...) {
            error = std::current_exception();
        }
        const std::uint64_t fingerprint = error ? 0 : registration_fingerprint(id);
        if (velora::same_on_all_ranks(comm, fingerprint)) {
            if (error) std::rethrow_exception(error);   // every rank failed the same way
            return id;
        }
        if (error) std::rethrow_exception(error);
        const bool low_rank = layers_.back().low_rank;
        layers_.pop_back();
        velora::detail::fail("adarank::low_rank_adamw::add_parameter", "parameter ", id, " (", rows, "x", cols, low_rank ? ", low-rank" : ", dense",
                             ") is not registered the same way on every rank (this is rank ", comm.rank(), " of ", comm.size(),
                             "): the shapes, kinds, registration order or optimizer configurations differ across ranks");
    }

    /// One AdamW step of parameter `id` with a dense gradient (both rows×cols, backend memory).
    /// Returns ok; degenerate_input (an all-zero gradient where a new subspace was due: the old
    /// one is kept); non_finite_input (NaN/Inf in the gradient) or overflow (a finite gradient,
    /// state or step whose result would not be finite in T, or a step count at its limit), both
    /// with nothing changed. Precondition for the overflow guarantee: the weights satisfy
    /// max(1, |1 − lr·wd|)·|w| <= max(T)/2 (the optimizer never reads W to check it).
    status step(param_id id, matrix_view<T> weight, const_matrix_view<T> grad) {
        velora::single_process one;
        return step(id, weight, grad, one);
    }

    /// Data-parallel: one step of parameter `id` with the mean over the ranks of `comm` of the
    /// gradients they pass (each rank passes its own; every rank calls this in the same order).
    /// A low-rank parameter all-reduces its projected gradient (rank×other values) and, when it
    /// searches a new subspace, the sketch products and Ḡ's energy; a dense one all-reduces its
    /// gradient (or reduce many at once with all_reduce_mean and step them without `comm`).
    /// Every rank ends with the same bits and returns the same status. Throws
    /// std::invalid_argument on every rank for the captured_energy refresh rule (it needs ‖Ḡ‖²
    /// at every step, i.e. the full gradient all-reduced). See docs/distributed.md.
    template <velora::communicator C>
    status step(param_id id, matrix_view<T> weight, const_matrix_view<T> grad, C& comm) {
        constexpr const char* fn = "adarank::low_rank_adamw::step";
        layer& l = checked_layer(id, fn);
        velora::check_shape(weight, l.rows, l.cols, fn, "weight");
        velora::check_shape(grad, l.rows, l.cols, fn, "grad");
        check_distributable(l, comm, fn);
        const dense_gradient<B> g(*b_, grad);
        return step_with(l, weight, g, comm);
    }

    /// One step with a gradient in any form a gradient_operator describes (rows×cols); with a
    /// communicator, the mean over the ranks as above. A dense parameter expands the operator
    /// into a workspace (allocated on first use).
    template <gradient_operator Op, velora::communicator C = velora::single_process>
    status step(param_id id, matrix_view<T> weight, const Op& grad, C&& comm = C{}) {
        constexpr const char* fn = "adarank::low_rank_adamw::step";
        layer& l = checked_layer(id, fn);
        velora::check_shape(weight, l.rows, l.cols, fn, "weight");
        check_operator(grad, fn);
        velora::detail::require(grad.rows() == l.rows && grad.cols() == l.cols, fn, "argument 'grad' is ", grad.rows(), "x", grad.cols(),
                                " but parameter ", id, " is ", l.rows, "x", l.cols);
        check_distributable(l, comm, fn);
        return step_with(l, weight, grad, comm);
    }

    /// One step with a VeLoRA layer's gradient in factored form (velora::compressor::factored):
    /// a low-rank parameter never forms the rows×cols gradient; a dense one expands it into a
    /// workspace (allocated on first use). Statuses as for the dense gradient.
    status step(param_id id, matrix_view<T> weight, const velora::factored_gradient<T>& grad) {
        velora::single_process one;
        return step(id, weight, grad, one);
    }

    /// Data-parallel step with a factored gradient: the projection is formed locally from A and
    /// v (which must be the same on every rank, see velora/distributed/shared_v.hpp) and reduced
    /// as for a dense gradient.
    template <velora::communicator C>
    status step(param_id id, matrix_view<T> weight, const velora::factored_gradient<T>& grad, C& comm) {
        constexpr const char* fn = "adarank::low_rank_adamw::step";
        layer& l = checked_layer(id, fn);
        velora::check_shape(weight, l.rows, l.cols, fn, "weight");
        check_factored(l, id, grad, fn);
        check_distributable(l, comm, fn);
        if (comm.any(factored_not_finite(grad))) return status::non_finite_input;
        const factored_gradient_op<B> g(*b_, grad, fused_scratch_);
        return step_with(l, weight, g, comm);
    }

    // ------------------------------------------------------------------ the step in phases
    // For a data-parallel host that runs the steady-state collective itself, e.g. started as soon
    // as a layer's gradient exists and overlapped with the rest of the backward pass:
    //   1. projection_shape(id): r×other, or 0×0 when the next step needs the gradient itself;
    //   2. project(id, grad, out): out = B·M of this rank's gradient (local);
    //   3. the host reduces `out` to the mean over ranks (same bits on every rank);
    //   4. step_projected(id, weight, reduced, grad, comm): decides the refresh from the reduced
    //      projection and updates; only a step that finds a new subspace reads `grad` again,
    //      through `comm` (collective).
    // The result is bit for bit that of step(id, weight, grad, comm) when the host's reduction
    // gives the same bits as the communicator's (tests/test_distributed.cpp).

    /// The shape (rank × other) of the projection `project` writes for the next step of low-rank
    /// parameter `id`, or 0×0 when that step searches a new subspace whatever the gradient (the
    /// first step, or a refresh due by the step count): call step with a communicator then.
    [[nodiscard]] std::pair<index_t, index_t> projection_shape(param_id id) const {
        const layer& l = checked_layer(id, "adarank::low_rank_adamw::projection_shape");
        velora::detail::require(l.low_rank, "adarank::low_rank_adamw::projection_shape", "parameter ", id, " is optimised densely");
        if (l.rank == 0 || config_.refresh.due_by_count(steps_in_subspace(l))) return {0, 0};
        return {l.rank, l.other};
    }

    /// Phase 1, local: out = B·M for this rank's gradient (rank×other, backend memory). Throws
    /// std::invalid_argument, before anything is computed, for a view of `grad` or `out` that
    /// check_view refuses, an `out` that shares memory with the gradient, a gradient of another
    /// shape than the parameter's, when projection_shape(id) is 0×0, or when `out` has another shape.
    template <gradient_operator Op>
    void project(param_id id, const Op& grad, matrix_view<T> out) {
        constexpr const char* fn = "adarank::low_rank_adamw::project";
        const layer& l = checked_layer(id, fn);
        check_operator(grad, fn);
        velora::detail::require(grad.rows() == l.rows && grad.cols() == l.cols, fn, "argument 'grad' is ", grad.rows(), "x", grad.cols(),
                                " but parameter ", id, " is ", l.rows, "x", l.cols);
        const auto [rows, cols] = projection_shape(id);
        velora::detail::require(rows > 0, fn, "parameter ", id, "'s next step searches a new subspace: call step with a communicator");
        velora::check_shape(out, rows, cols, fn, "out");
        side_matrix<Op>(grad, l.side).mul(basis_view(l), out);
    }
    void project(param_id id, const_matrix_view<T> grad, matrix_view<T> out) {
        constexpr const char* fn = "adarank::low_rank_adamw::project";
        velora::check_view(grad, fn, "grad");
        velora::check_view(out, fn, "out");
        velora::check_no_alias(out, "out", grad, "grad", fn);
        project(id, dense_gradient<B>(*b_, grad), out);
    }
    void project(param_id id, const velora::factored_gradient<T>& grad, matrix_view<T> out) {
        constexpr const char* fn = "adarank::low_rank_adamw::project";
        check_factored(checked_layer(id, fn), id, grad, fn);
        velora::check_view(out, fn, "out");
        velora::check_no_alias(out, "out", grad.a, "grad.a", fn);
        const index_t used = std::min(grad.subtoken_size, grad.features);   // the entries of v the kernels read
        velora::check_no_alias(out, "out", const_matrix_view<T>(grad.v, 1, used, used), "grad.v", fn);
        project(id, factored_gradient_op<B>(*b_, grad, fused_scratch_), out);
    }

    /// Phases 2–5 with `reduced`, the mean over the ranks of their `project` outputs (the same bits
    /// on every rank; in one process, the projection itself). Statuses as for step. When projection_shape(id)
    /// is 0×0 this is step(id, weight, grad, comm) and `reduced` is not read.
    template <gradient_operator Op, velora::communicator C>
    status step_projected(param_id id, matrix_view<T> weight, const_matrix_view<T> reduced, const Op& grad, C& comm) {
        constexpr const char* fn = "adarank::low_rank_adamw::step_projected";
        layer& l = checked_layer(id, fn);
        velora::check_shape(weight, l.rows, l.cols, fn, "weight");
        velora::detail::require(l.low_rank, fn, "parameter ", id, " is optimised densely");
        check_operator(grad, fn);
        velora::detail::require(grad.rows() == l.rows && grad.cols() == l.cols, fn, "argument 'grad' is ", grad.rows(), "x", grad.cols(),
                                " but parameter ", id, " is ", l.rows, "x", l.cols);
        check_distributable(l, comm, fn);
        const auto [rows, cols] = projection_shape(id);
        if (rows == 0) return step_with(l, weight, grad, comm);
        velora::check_shape(reduced, rows, cols, fn, "reduced");
        return step_with(l, weight, grad, comm, reduced);
    }
    template <velora::communicator C>
    status step_projected(param_id id, matrix_view<T> weight, const_matrix_view<T> reduced, const_matrix_view<T> grad, C& comm) {
        velora::check_view(grad, "adarank::low_rank_adamw::step_projected", "grad");
        return step_projected(id, weight, reduced, dense_gradient<B>(*b_, grad), comm);
    }
    template <velora::communicator C>
    status step_projected(param_id id, matrix_view<T> weight, const_matrix_view<T> reduced, const velora::factored_gradient<T>& grad, C& comm) {
        constexpr const char* fn = "adarank::low_rank_adamw::step_projected";
        check_factored(checked_layer(id, fn), id, grad, fn);
        if (comm.any(factored_not_finite(grad))) return status::non_finite_input;   // as step does
        return step_projected(id, weight, reduced, factored_gradient_op<B>(*b_, grad, fused_scratch_), comm);
    }

    /// Replaces each gradient grads[i] (of parameter ids[i]: its rows×cols, backend memory) by
    /// its mean over the ranks of `comm`, in place, packing them into all-reduces of at most
    /// `bucket_elements` values (one for a larger gradient): the data-parallel reduction for
    /// parameters optimised densely, bucketed as DDP does, after which they are stepped without
    /// a communicator. Every rank passes the same ids in the same order; a mismatch or an invalid
    /// argument on any rank throws std::invalid_argument on every rank, nothing reduced (a rank
    /// whose gradient view check_shape refuses names it, e.g. 'grads[2]'). The bucket is allocated
    /// on first use.
    template <velora::communicator C>
    void all_reduce_mean(std::span<const param_id> ids, std::span<const matrix_view<T>> grads, C& comm, index_t bucket_elements = index_t{1} << 22) {
        constexpr const char* fn = "adarank::low_rank_adamw::all_reduce_mean";
        bool valid = ids.size() == grads.size() && bucket_elements > 0;
        std::exception_ptr bad_view;   // this rank's first gradient view that check_shape refuses, rethrown after the collective
        std::uint64_t fingerprint = 0x9e3779b97f4a7c15ULL ^ ids.size();
        for (std::size_t i = 0; valid && i < ids.size(); ++i) {
            const param_id id = ids[i];
            valid = id >= 0 && id < size();
            if (valid) {
                char name[32] = "grads[";   // "grads[i]", formed without allocating
                char* end = std::to_chars(name + 6, name + sizeof name - 1, i).ptr;
                *end++ = ']';
                try {
                    const layer& l = layers_[static_cast<std::size_t>(id)];
                    velora::check_shape(grads[i], l.rows, l.cols, fn, std::string_view(name, static_cast<std::size_t>(end - name)));
                } catch (const std::invalid_argument&) {
                    valid = false;
                    bad_view = std::current_exception();
                }
            }
            fingerprint = velora::mix64(fingerprint ^ static_cast<std::uint64_t>(id));
        }
        const bool consistent = velora::same_on_all_ranks(comm, valid ? fingerprint : 0);
        if (bad_view) std::rethrow_exception(bad_view);   // every other rank throws below
        velora::detail::require(valid && consistent, fn, valid ? "the parameters differ across ranks (ids or their order); this is rank "
                                                              : "invalid arguments (ids and grads must have the same length, each id registered, each "
                                                                "gradient of its parameter's shape, bucket_elements > 0); this is rank ",
                                comm.rank(), " of ", comm.size());
        index_t small = 0;   // the bucket is sized before anything is packed into it
        for (const matrix_view<T>& g : grads)
            if (g.size() < bucket_elements) small = std::min(bucket_elements, small + g.size());
        grow(bucket_, small);
        index_t used = 0;
        std::size_t first = 0;   // grads[first..i) are packed in the bucket
        const auto flush = [&](std::size_t end) {
            if (used == 0) return;
            reduce_to_mean(*b_, comm, view(bucket_, 1, used));
            index_t at = 0;
            for (std::size_t j = first; j < end; ++j) {
                const matrix_view<T>& g = grads[j];
                if (g.size() >= bucket_elements) continue;
                for (index_t r = 0; r < g.rows; ++r) b_->copy(bucket_.data() + at + r * g.cols, g.row(r), g.cols);
                at += g.size();
            }
            used = 0;
        };
        for (std::size_t i = 0; i < grads.size(); ++i) {
            const matrix_view<T>& g = grads[i];
            layers_[static_cast<std::size_t>(ids[i])].pending_bytes += static_cast<std::uint64_t>(g.size()) * sizeof(T);
            if (g.size() >= bucket_elements) {   // alone, in place
                reduce_to_mean(*b_, comm, g);
                continue;
            }
            if (used + g.size() > bucket_elements) {
                flush(i);
                first = i;
            }
            if (used == 0) first = i;
            for (index_t r = 0; r < g.rows; ++r) b_->copy(g.row(r), bucket_.data() + used + r * g.cols, g.cols);
            used += g.size();
        }
        flush(grads.size());
    }

    /// Replaces the subspace of a low-rank parameter with `basis` (r×len, orthonormal rows within
    /// orthonormality_tolerance, backend memory; len = rows on the left side, cols on the right),
    /// transporting the moments by the configured policy as a refresh would. The refresh policy
    /// counts from here. Throws std::invalid_argument (nothing changed) for a wrong shape, a
    /// non-finite entry or rows that are not orthonormal (naming the measured deviation); returns
    /// status::overflow (nothing changed) when the transported moments would not be finite, ok
    /// otherwise. Reads the basis on the host (allocates).
    status set_basis(param_id id, const_matrix_view<T> basis) {
        constexpr const char* fn = "adarank::low_rank_adamw::set_basis";
        layer& l = checked_layer(id, fn);
        velora::detail::require(l.low_rank, fn, "parameter ", id, " is optimised densely; it has no basis");
        velora::check_view(basis, fn, "basis");
        velora::detail::require(basis.cols == l.len && basis.rows <= l.r_cap, fn, "argument 'basis' is ", basis.rows, "x", basis.cols,
                                " but parameter ", id, " needs r x ", l.len, " with 1 <= r <= ", l.r_cap);
        auto next = view(basis_next_, basis.rows, l.len);
        for (index_t i = 0; i < basis.rows; ++i) b_->copy(basis.row(i), next.row(i), l.len);
        const basis_check check = check_basis(host_copy(next), basis.rows, l.len);
        if (check.bad_row >= 0)
            velora::detail::fail(fn, "argument 'basis' has an entry that is not finite at (", check.bad_row, ", ", check.bad_col, ")");
        velora::detail::require(check.deviation <= orthonormality_tolerance, fn, "argument 'basis' (", basis.rows, "x", basis.cols,
                                ") does not have orthonormal rows: the deviation max |B·Bᵀ − I| = ", check.deviation,
                                " exceeds the tolerance ", orthonormality_tolerance);
        const auto m_next = view(m_next_, basis.rows, l.other), v_next = view(v_next_, basis.rows, l.other);
        transport_into_workspace(l, next);
        const host_summary m = summarize(m_next), v = summarize(v_next);
        if (!m.finite || !v.finite) return status::overflow;
        subspace_report rep;
        rep.rank = basis.rows;
        install_subspace(l, next, rep, l.counter, check.norm);
        b_->copy(m_next.data, l.m.data(), basis.rows * l.other);
        b_->copy(v_next.data, l.v.data(), basis.rows * l.other);
        l.m_bound = m.max_abs;
        l.v_bound = v.max_abs;
        return status::ok;
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
        i.communicated_bytes = l.communicated;
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
                fused_scratch_.capacity() + dense_grad_.capacity() + reduce_scratch_.capacity() + bucket_.capacity()) *
                   sizeof(T) +
               finder_.workspace_bytes();
    }

    // ------------------------------------------------------------------ state
    static constexpr std::string_view state_kind = "adarank.low_rank_adamw";
    static constexpr std::uint32_t state_version = 2;   // 2: adds the Adam convention (version 1 states load as galore)

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
    ///
    /// The blob must be intact (envelope, kind, version, checksum, length) and describe a state
    /// this optimizer can be in; a valid state is exactly:
    /// - the value width, the configuration and the registered shapes, kinds and sides match;
    ///   the saved learning rate is one set_learning_rate accepts (finite and >= 0, and lr·wd < 1
    ///   under the torch convention); flag bytes are 0 or 1;
    /// - per parameter: the step count t <= 2^64 − 2 (a step can increment it; a step refuses to
    ///   go further); the steps in the current subspace <= t, and 0 without a subspace (rank 0);
    ///   0 <= rank <= min(r_max, rows, cols), and 0 for a dense parameter;
    /// - the anchor ‖Ĝ_t0‖² is -1 (not yet known) or finite and >= 0; the last ‖Ĝ‖² is finite
    ///   and >= 0; the last refresh report has the parameter's rank, 0 <= sketch <= min(rows,
    ///   cols), 0 <= power iterations <= 64, and finite energies >= 0;
    /// - the basis (rank×len) is finite with orthonormal rows: max |B·Bᵀ − I| <=
    ///   orthonormality_tolerance; both moments are finite and the second one is >= 0 (their
    ///   size is not bounded: a step whose result would overflow returns status::overflow).
    /// The refresh count and the random-stream position may hold any value. Every state the
    /// optimizer writes is valid. Anything else throws velora::state_format_error naming the
    /// parameter and the field, and changes nothing.
    void load_state(std::span<const std::byte> blob) {
        constexpr const char* fn = "adarank::low_rank_adamw::load_state";
        velora::state_reader r(blob, state_kind, state_version, fn);
        const auto width = r.get<std::uint8_t>();
        if (width != sizeof(T)) r.bad("state was saved with ", int(width), "-byte values but this optimizer uses ", sizeof(T));
        config_type saved = get_config(r, r.version());
        saved.adam.lr = config_.adam.lr;
        if (const std::string difference = describe_difference(saved, config_); !difference.empty())
            r.bad("state was saved with a different optimizer configuration (", difference, ")");
        const auto lr = r.get<double>();
        const auto count = r.get<std::uint64_t>();
        if (count != layers_.size()) r.bad("state holds ", count, " parameters but ", layers_.size(), " are registered");
        std::vector<loaded_layer> loaded(layers_.size());
        for (std::size_t i = 0; i < layers_.size(); ++i) {
            const layer& l = layers_[i];
            loaded_layer& s = loaded[i];
            const auto rows = r.get<std::int64_t>(), cols = r.get<std::int64_t>();
            const auto low_rank_flag = r.get<std::uint8_t>();
            const auto side = r.get<std::uint8_t>();
            if (low_rank_flag > 1) r.bad("parameter ", i, " has the kind flag ", int(low_rank_flag), " (0 or 1 expected)");
            const bool low_rank = low_rank_flag != 0;
            if (rows != l.rows || cols != l.cols || low_rank != l.low_rank || side != static_cast<std::uint8_t>(l.side))
                r.bad("parameter ", i, " was saved as ", rows, "x", cols, low_rank ? " low-rank" : " dense", " but is registered as ", l.rows,
                      "x", l.cols, l.low_rank ? " low-rank" : " dense");
            static_cast<progress&>(s) = get_progress(r, i);
            check_progress(r, i, l, s);
            const index_t moment_size = l.low_rank ? s.rank * l.other : l.rows * l.cols;
            s.basis = r.get_array<T>(l.low_rank ? s.rank * l.len : 0);
            s.m = r.get_array<T>(moment_size);
            s.v = r.get_array<T>(moment_size);
            if (s.rank > 0) {
                const basis_check check = check_basis(s.basis, s.rank, l.len);
                if (check.bad_row >= 0) r.bad("parameter ", i, " has a basis entry that is not finite at (", check.bad_row, ", ", check.bad_col, ")");
                if (!(check.deviation <= orthonormality_tolerance))
                    r.bad("parameter ", i, ": the basis rows are not orthonormal: max |B·Bᵀ − I| = ", check.deviation, " exceeds the tolerance ",
                          orthonormality_tolerance);
                s.basis_norm = check.norm;
            }
            const host_summary m = summarize(s.m), v = summarize(s.v);
            if (!m.finite) r.bad("parameter ", i, ": the first moment has a non-finite entry");
            if (!v.finite || v.negative) r.bad("parameter ", i, ": the second moment has a non-finite or negative entry");
            s.m_bound = m.max_abs;
            s.v_bound = v.max_abs;
        }
        r.expect_end();
        // The rule of the constructor and set_learning_rate: a learning rate neither accepts cannot be loaded either.
        check_learning_rate<velora::state_format_error>(lr, config_.adam, fn, "the saved learning rate");
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
            // The certificate's bounds are not saved: they are recomputed exactly from the arrays.
            layers_[i].m_bound = loaded[i].m_bound;
            layers_[i].v_bound = loaded[i].v_bound;
            layers_[i].basis_norm = loaded[i].basis_norm;
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

    // Upper bounds that certify a step finite without reading the state (see certify). Not
    // saved: exact values are recomputed from the arrays by load_state and set_basis.
    struct bounds {
        double m_bound = 0;      // >= max |m|
        double v_bound = 0;      // >= max v
        double basis_norm = 0;   // >= ‖B‖_F >= the norm of every column of B
    };

    struct layer : progress, bounds {
        index_t rows = 0, cols = 0;
        bool low_rank = false;
        projection_side side = projection_side::left;
        index_t len = 0, other = 0, r_cap = 0;
        std::uint64_t seed = 0;       // of this parameter's Gaussian stream
        buffer basis, m, v;
        // Data-parallel bookkeeping (not state): bytes reduced by all_reduce_mean since the last
        // step, and bytes of the last step (see layer_info::communicated_bytes).
        std::uint64_t pending_bytes = 0, communicated = 0;
    };

    struct loaded_layer : progress, bounds {
        std::vector<T> basis, m, v;
    };

    // Adam's coefficients as the kernels see them (rounded to T), and in double for the certificate.
    struct adam_coefficients {
        T beta1, beta2, eps;
        double b1, c1, b2, c2, eps_value;   // β₁, 1 − β₁, β₂, 1 − β₂, ε after rounding to T
    };
    static adam_coefficients coefficients(const config_type& c) {
        adam_coefficients k{T(c.adam.beta1), T(c.adam.beta2), T(c.adam.eps), 0, 0, 0, 0, 0};
        k.b1 = static_cast<double>(k.beta1);
        k.c1 = static_cast<double>(T(1) - k.beta1);
        k.b2 = static_cast<double>(k.beta2);
        k.c2 = static_cast<double>(T(1) - k.beta2);
        k.eps_value = static_cast<double>(k.eps);
        return k;
    }

    static config_type checked(const config_type& c) {
        constexpr const char* fn = "adarank::low_rank_adamw::low_rank_adamw";
        validate(c, fn);
        // n = m/(√v + ε) is computed in T: an ε that T rounds to 0 divides by zero where v = 0, and a
        // subnormal one makes every step's bound |n| <= max|m|/ε useless (see certify).
        velora::detail::require(static_cast<T>(c.adam.eps) >= std::numeric_limits<T>::min(), fn, "config.adam.eps = ", c.adam.eps,
                                " is below the smallest normal value of the optimizer's value type (", std::numeric_limits<T>::min(), ")");
        // The torch convention adds ε·√(1−β₂ᵗ) >= ε·√(1−β₂), the smallest at t = 1.
        velora::detail::require(c.adam.convention != adam_convention::torch ||
                                    static_cast<T>(c.adam.eps * std::sqrt(1.0 - c.adam.beta2)) >= std::numeric_limits<T>::min(),
                                fn, "config.adam.eps = ", c.adam.eps, " times sqrt(1 - beta2) (the torch convention's first ε) is below the smallest normal value of the optimizer's value type (",
                                std::numeric_limits<T>::min(), ")");
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

    // The refresh rules take the steps in the subspace as an index; a count beyond its range (only
    // a loaded state can have one) saturates rather than turning negative.
    static index_t steps_in_subspace(const layer& l) noexcept {
        constexpr auto most = static_cast<std::uint64_t>(std::numeric_limits<index_t>::max());
        return static_cast<index_t>(std::min(l.since, most));
    }

    // Bias-corrected step size lr·√(1−β₂ᵗ)/(1−β₁ᵗ) for step count t, and the decay factor 1 − lr·wd.
    [[nodiscard]] double step_size(std::uint64_t t) const noexcept {
        const double td = static_cast<double>(t);
        return lr_ * std::sqrt(1.0 - std::pow(config_.adam.beta2, td)) / (1.0 - std::pow(config_.adam.beta1, td));
    }
    [[nodiscard]] double decay_factor() const noexcept { return 1.0 - lr_ * config_.adam.weight_decay; }

    // What step t adds to the weight, as the kernels take it: W ← d·(W − step·m/(√v + eps)).
    // The torch convention is the same update with ε·√(1−β₂ᵗ) and step/d (d·W − step_size·n).
    struct update_terms {
        T eps;
        double eps_value;   // eps as a double (the certificate's bound on n)
        double step;
    };
    [[nodiscard]] update_terms terms(std::uint64_t t) const {
        if (config_.adam.convention == adam_convention::galore) return {coef_.eps, coef_.eps_value, step_size(t)};
        const T eps = T(config_.adam.eps * std::sqrt(1.0 - std::pow(config_.adam.beta2, static_cast<double>(t))));
        return {eps, static_cast<double>(eps), step_size(t) / decay_factor()};
    }

    // ------------------------------------------------------------------ overflow certificate
    //
    // A step writes nothing unless everything it writes is finite, without an extra pass over the
    // weight or the gradient in the steady state. Each parameter keeps bounds M >= max|m| and
    // V >= max v (doubles). The step has already computed E = Σx² of what enters the moments (the
    // dense gradient, or the projected gradient Ĝ), so max x² <= E, and before anything is written:
    //   m' = β₁m + (1−β₁)x:  |m'| <= M' = (β₁M + (1−β₁)√E)(1+κ)
    //   v' = β₂v + (1−β₂)x²:   v' <= V' = (β₂V + (1−β₂)E)(1+κ)
    //   n  = m'/(√v' + ε):    |n| <= M'/ε (1+κ)
    // with κ covering T's rounding. E, M', V' <= max(T)/2 keep x², m' and v' finite; the weight
    // update is certified from |n| below (dense_update_ok, low_rank_update_ok). Only when the
    // certificate fails (absurd gradients, states or hyper-parameters) is the step computed
    // exactly in workspace and read back on the host (step_dense_exact, and the exact branch of
    // step_low_rank): committed when finite, status::overflow otherwise.
    static constexpr double max_value = static_cast<double>(std::numeric_limits<T>::max());
    static constexpr double half_max = max_value / 2, quarter_max = max_value / 4;
    static constexpr double unit_roundoff = static_cast<double>(std::numeric_limits<T>::epsilon()) / 2;
    // Per bound: T's rounding of a product and a sum (and of x², the division), plus the few
    // double operations that evaluate the bound itself.
    static constexpr double slack = 1.0 + 4.0 * unit_roundoff + 8.0 * 0x1p-53;
    static constexpr std::uint64_t max_steps = std::numeric_limits<std::uint64_t>::max() - 1;

    // An upper bound on the exact Σx² of `count` values whose sum of squares the backend returned
    // as `sum` (in double, in any order): the relative error of such a sum of non-negative terms
    // is below (count + 1)·2⁻⁵³·(4/3) while that is small; the absolute term covers squares that
    // underflow double.
    static double sum_bound(double sum, index_t count) noexcept {
        const double nu = (static_cast<double>(count) + 1.0) * 0x1p-53;
        return nu <= 0.125 ? sum * (1.0 + 2.0 * nu) + 1e-300 : std::numeric_limits<double>::infinity();
    }
    // >= ‖a‖_F, hence >= max |a| and every column norm (+Inf when the sum is not finite).
    double norm_bound(const_matrix_view<T> a) {
        const double sum = b_->sum_of_squares(a);
        return std::isfinite(sum) ? std::sqrt(sum_bound(sum, a.size())) * slack : std::numeric_limits<double>::infinity();
    }
    // T's rounding of a sum of r products in a GEMM (any order).
    static double gemm_slack(index_t r) noexcept {
        const double nu = (static_cast<double>(r) + 1.0) * unit_roundoff;
        return nu <= 0.125 ? 1.0 + 2.0 * nu : std::numeric_limits<double>::infinity();
    }

    struct moment_bounds {
        double m = 0, v = 0, n = 0;   // >= max |m'|, max v', max |n| after the step
    };
    // The bounds after one Adam update of moments bounded by (m_bound, v_bound) with an input whose
    // squares are at most x2; false when they do not certify the update finite (with room to spare).
    [[nodiscard]] bool certify(double m_bound, double v_bound, double x2, double eps_value, moment_bounds& out) const noexcept {
        const double x = std::sqrt(x2) * slack;
        out.m = (coef_.b1 * m_bound + coef_.c1 * x) * slack;
        out.v = (coef_.b2 * v_bound + coef_.c2 * x2) * slack;
        out.n = out.m / eps_value * slack;
        return x2 <= half_max && out.m <= half_max && out.v <= half_max && out.n <= max_value;   // (false for NaN)
    }
    // w' = decay·(w − step·n) is finite for every |w| <= half_max/max(1, |decay|) (the precondition)
    // when max(1, |decay|)·|step|·max|n| <= quarter_max.
    static bool dense_update_ok(T step, T decay, double n_max) noexcept {
        const double d = std::max(1.0, std::abs(static_cast<double>(decay)));
        return std::isfinite(step) && std::isfinite(decay) && d * std::abs(static_cast<double>(step)) * n_max * slack <= quarter_max;
    }
    // W' = alpha·(Bᵀ·N) + decay·W (a GEMM; right side Nᵀ·B, the same sums): the GEMM sums
    // Σ_k B_ki·N_kj in T before scaling by alpha, and every partial sum is at most
    // ‖B_:,i‖·‖N_:,j‖ <= basis_norm·n_col (n_col >= every column norm of N, r×other). Both the sum
    // and alpha times it must stay below quarter_max; with |decay·w| <= half_max (the precondition)
    // W' is finite.
    static bool low_rank_update_ok(T alpha, T decay, double basis_norm, index_t r, double n_col) noexcept {
        const double sum = basis_norm * n_col * gemm_slack(r);
        return std::isfinite(alpha) && std::isfinite(decay) && sum <= quarter_max &&
               std::abs(static_cast<double>(alpha)) * sum * slack <= quarter_max;
    }

    // A contiguous array of backend memory read on the host (the exact paths and set_basis only).
    std::vector<T> host_copy(const_matrix_view<T> a) const {
        std::vector<T> host(static_cast<std::size_t>(a.size()));
        b_->copy_to_host(a.data, host.data(), a.size());
        return host;
    }
    struct host_summary {
        bool finite = true, negative = false;
        double max_abs = 0;
        double max_col_norm = 0;   // of the array as rows×cols, each column's Euclidean norm (× slack)
    };
    static host_summary summarize(const std::vector<T>& host, index_t cols = 1) {
        host_summary s;
        std::vector<double> col2(static_cast<std::size_t>(cols), 0.0);
        for (std::size_t i = 0; i < host.size(); ++i) {
            const T x = host[i];
            if (!std::isfinite(x)) {
                s.finite = false;
                return s;
            }
            s.negative = s.negative || x < T(0);
            const double d = static_cast<double>(x);
            s.max_abs = std::max(s.max_abs, std::abs(d));
            col2[i % static_cast<std::size_t>(cols)] += d * d;
        }
        for (const double c : col2) s.max_col_norm = std::max(s.max_col_norm, std::sqrt(c) * slack);
        return s;
    }
    host_summary summarize(const_matrix_view<T> a) const { return summarize(host_copy(a), a.cols); }

    // Whether a host copy of a rank×len basis is finite, its deviation max |B·Bᵀ − I| and ‖B‖_F
    // (× slack), all in double. The Gram matrix is accumulated column by column of B (inner loop
    // over contiguous entries of a column, which vectorises without reassociating any sum).
    struct basis_check {
        index_t bad_row = -1, bad_col = -1;
        double deviation = 0, norm = 0;
    };
    static basis_check check_basis(const std::vector<T>& b, index_t rank, index_t len) {
        basis_check c;
        const auto r = static_cast<std::size_t>(rank), n = static_cast<std::size_t>(len);
        std::vector<double> bt(r * n);   // Bᵀ, len×rank
        for (std::size_t i = 0; i < r; ++i) {
            for (std::size_t j = 0; j < n; ++j) {
                const T x = b[i * n + j];
                if (!std::isfinite(x)) {
                    c.bad_row = static_cast<index_t>(i);
                    c.bad_col = static_cast<index_t>(j);
                    return c;
                }
                bt[j * r + i] = static_cast<double>(x);
            }
        }
        std::vector<double> gram(r * r, 0.0);
        for (std::size_t k = 0; k < n; ++k) {
            const double* col = &bt[k * r];
            for (std::size_t i = 0; i < r; ++i) {
                const double x = col[i];
                double* g = &gram[i * r];
                for (std::size_t j = i; j < r; ++j) g[j] += x * col[j];
            }
        }
        double trace = 0;
        for (std::size_t i = 0; i < r; ++i) {
            trace += gram[i * r + i];
            for (std::size_t j = i; j < r; ++j) c.deviation = std::max(c.deviation, std::abs(gram[i * r + j] - (i == j ? 1.0 : 0.0)));
        }
        c.norm = std::sqrt(sum_bound(trace, rank * len)) * slack;
        return c;
    }

    // ------------------------------------------------------------------ steps
    // A step of `l` with gradient operator `local`: in one process directly; with P > 1 ranks
    // through mean_over_ranks, so that every quantity the step reads is the ranks' mean.
    // `projected` (low-rank only, may be empty): the projection onto the current basis, already
    // reduced by the host (step_projected).
    template <class Local, class C>
    status step_with(layer& l, matrix_view<T> weight, const Local& local, C& comm, const_matrix_view<T> projected = {}) {
        if constexpr (std::is_same_v<std::remove_cvref_t<C>, velora::single_process>) {
            l.communicated = l.pending_bytes;   // a gradient reduced by all_reduce_mean
            l.pending_bytes = 0;
            return l.low_rank ? step_low_rank(l, weight, local, projected) : step_dense_of(l, weight, local);
        } else {
            std::uint64_t bytes = l.pending_bytes;
            l.pending_bytes = 0;
            const mean_over_ranks<B, Local, std::remove_cvref_t<C>> mean(*b_, local, comm, reduce_scratch_, bytes);
            const status s = l.low_rank ? step_low_rank(l, weight, mean, projected) : step_dense_of(l, weight, mean);
            l.communicated = bytes;
            return s;
        }
    }

    // Dense AdamW with a gradient operator: a dense view is used as it is; any other form is
    // expanded into the workspace first (a VeLoRA gradient, or the ranks' mean).
    template <class Op>
    status step_dense_of(layer& l, matrix_view<T> weight, const Op& grad) {
        // An expansion of finite inputs that overflowed is an overflow, not a non-finite input.
        const auto trouble = [&] { return grad.finite() ? status::overflow : status::non_finite_input; };
        if constexpr (std::is_same_v<Op, dense_gradient<B>>) {
            return step_dense(l, weight, grad.view(), trouble);
        } else {
            grow(dense_grad_, l.rows * l.cols);
            const matrix_view<T> dense = view(dense_grad_, l.rows, l.cols);
            grad.row_block(0, dense);
            return step_dense(l, weight, dense, trouble);
        }
    }

    // A dense_gradient built by the host holds a view, checked as a dense gradient's view is; any
    // other gradient operator is the host's own.
    template <class Op>
    static void check_operator(const Op& grad, const char* fn) {
        if constexpr (std::is_same_v<Op, dense_gradient<B>>) velora::check_view(grad.view(), fn, "grad");
    }

    // A VeLoRA factored gradient must describe parameter l's shape consistently.
    static void check_factored(const layer& l, param_id id, const velora::factored_gradient<T>& grad, const char* fn) {
        velora::check_view(grad.a, fn, "grad.a");
        velora::detail::require(grad.a.rows == l.rows && grad.features == l.cols, fn, "argument 'grad' describes a ", grad.a.rows, "x",
                                grad.features, " gradient but parameter ", id, " is ", l.rows, "x", l.cols);
        velora::detail::require(grad.v != nullptr && grad.subtoken_size > 0, fn, "argument 'grad' is inconsistent: sub-token size s = ",
                                grad.subtoken_size, " must be > 0", grad.v ? "" : " (and v is null)");
        // s·G is formed with checked arithmetic: a product that wraps around could pass the check below.
        const index_t covered = velora::detail::checked_mul(grad.subtoken_size, grad.a.cols, fn, "grad.subtoken_size x grad.a.cols (s x G)");
        velora::detail::require(covered >= grad.features, fn, "argument 'grad' is inconsistent: ", grad.a.cols, " groups of s = ",
                                grad.subtoken_size, " cannot cover D = ", grad.features);
    }
    // Every column of A is read by some product (also those covering only padding), so a NaN
    // anywhere in A is reported the same way on every kind of step (and, collectively, on every rank).
    bool factored_not_finite(const velora::factored_gradient<T>& grad) {
        return !std::isfinite(b_->sum_of_squares(grad.a)) && !all_finite(*b_, grad.a);
    }

    // Data-parallel training reads only reduced quantities; the captured_energy rule would need
    // ‖Ḡ‖² at every step, i.e. the full gradient reduced. Refused before anything happens (the
    // same on every rank: the configuration is checked equal at registration).
    template <class C>
    void check_distributable(const layer& l, const C& comm, const char* fn) const {
        velora::detail::require(comm.size() == 1 || !l.low_rank || !config_.refresh.needs_gradient_norm(), fn,
                                "the refresh policy captured_energy needs the full gradient's norm at every step, which data-parallel training "
                                "could only get by all-reducing the full gradient; use converged or every with ",
                                comm.size(), " ranks");
    }

    // What every rank must agree on about parameter `id` (just registered): its index, shape,
    // kind and side, and the configuration.
    [[nodiscard]] std::uint64_t registration_fingerprint(param_id id) const {
        const layer& l = layers_[static_cast<std::size_t>(id)];
        velora::state_writer w("adarank.registration", 1);
        put_config(w, config_);
        w.put(static_cast<std::int64_t>(id));
        w.put(static_cast<std::int64_t>(l.rows));
        w.put(static_cast<std::int64_t>(l.cols));
        w.put(static_cast<std::uint8_t>(l.low_rank));
        w.put(static_cast<std::uint8_t>(l.side));
        const std::vector<std::byte> blob = std::move(w).finish();
        return velora::hash_bytes(blob) | 1;   // never 0, the value of a failed registration
    }

    // Dense AdamW. `trouble()` tells, for a non-finite energy, a NaN/Inf in the caller's gradient
    // (non_finite_input) from finite values too large for the arithmetic (overflow).
    template <class Trouble>
    status step_dense(layer& l, matrix_view<T> weight, const_matrix_view<T> grad, Trouble&& trouble) {
        const double energy = b_->sum_of_squares(grad);
        if (!std::isfinite(energy)) {
            const status s = trouble();
            if (s != status::overflow) return s;
            // A finite gradient whose sum of squares overflowed: the exact path decides.
        }
        if (l.t >= max_steps) return status::overflow;
        const update_terms u = terms(l.t + 1);
        const T step = T(u.step), decay = T(decay_factor());
        moment_bounds next;
        const bool certified = std::isfinite(energy) && certify(l.m_bound, l.v_bound, sum_bound(energy, grad.size()), u.eps_value, next) &&
                               dense_update_ok(step, decay, next.n);
        if (!certified) return step_dense_exact(l, weight, grad, step, decay, u.eps);
        ++l.t;
        b_->adamw_update(weight, grad, dense_view(l.m, l), dense_view(l.v, l), coef_.beta1, coef_.beta2, u.eps, step, decay);
        l.m_bound = next.m;
        l.v_bound = next.v;
        return status::ok;
    }

    // The dense step computed exactly into temporaries (allocated here: this path is never taken
    // by a step the certificate vouches for) and read back on the host; committed only when the
    // moments and n are finite and the weight update is bounded.
    status step_dense_exact(layer& l, matrix_view<T> weight, const_matrix_view<T> grad, T step, T decay, T eps) {
        const index_t count = l.rows * l.cols;
        buffer m, v, n;
        m.resize(static_cast<std::size_t>(count));
        v.resize(static_cast<std::size_t>(count));
        n.resize(static_cast<std::size_t>(count));
        b_->copy(l.m.data(), m.data(), count);
        b_->copy(l.v.data(), v.data(), count);
        b_->adam_moments(grad, dense_view(m, l), dense_view(v, l), coef_.beta1, coef_.beta2, eps, dense_view(n, l));
        const host_summary hm = summarize(dense_view(m, l)), hv = summarize(dense_view(v, l)), hn = summarize(dense_view(n, l));
        if (!hm.finite || !hv.finite || !hn.finite || !dense_update_ok(step, decay, hn.max_abs)) return status::overflow;
        ++l.t;
        b_->copy(m.data(), l.m.data(), count);
        b_->copy(v.data(), l.v.data(), count);
        // w = decay·(w − step·n) with the checked n: adamw_update with β₁ = β₂ = 1, ε = 1, m = n and
        // v = g = 0 computes exactly that (m stays n, v stays 0, n/(√0 + 1) = n).
        b_->fill(dense_view(v, l), T(0));
        b_->adamw_update(weight, dense_view(v, l), dense_view(n, l), dense_view(v, l), T(1), T(1), T(1), step, decay);
        l.m_bound = hm.max_abs;
        l.v_bound = hv.max_abs;
        return status::ok;
    }

    // A step of a parameter with no subspace yet and an all-zero gradient: the weight decay only,
    // as AdamW would do with G = 0.
    status decay_only(layer& l, matrix_view<T> weight) {
        if (l.t >= max_steps) return status::overflow;
        const double decay = decay_factor();
        if (!std::isfinite(T(decay))) return status::overflow;
        ++l.t;
        if (decay != 1.0) b_->scale(weight, T(decay));
        return status::degenerate_input;
    }

    template <class Grad>
    status step_low_rank(layer& l, matrix_view<T> weight, const Grad& grad, const_matrix_view<T> projected) {
        const side_matrix<Grad> m(grad, l.side);
        // Called only when a norm or projection is not finite (never in the steady state).
        const auto trouble = [&] { return m.finite() ? status::overflow : status::non_finite_input; };
        // A refresh that is due by the step count alone needs no projection onto the old basis.
        bool refresh = l.rank == 0 || config_.refresh.due_by_count(steps_in_subspace(l));
        double projected2 = 0, energy = -1;
        if (!refresh) {
            if (projected.empty()) m.mul(basis_view(l), view(proj_, l.rank, l.other));
            else for (index_t i = 0; i < l.rank; ++i) b_->copy(projected.row(i), view(proj_, l.rank, l.other).row(i), l.other);
            projected2 = b_->sum_of_squares(view(proj_, l.rank, l.other));
            if (!std::isfinite(projected2)) return trouble();
            refresh_inputs in{steps_in_subspace(l), projected2, l.anchor2, 0.0};
            if (config_.refresh.needs_gradient_norm()) {
                energy = m.norm2();
                if (!std::isfinite(energy)) return trouble();
                in.gradient_norm2 = energy;
            }
            refresh = config_.refresh.due(in);
        }
        status result = status::ok;
        // The subspace the step runs in: the current one, or a new one prepared in the workspace
        // (basis_next_, with the transported moments in m_next_, v_next_) and committed together
        // with the step, so that a step that fails changes nothing.
        bool fresh = false;
        index_t rank = l.rank;
        const_matrix_view<T> basis = basis_view(l);
        double basis_norm = l.basis_norm, m_bound = l.m_bound, v_bound = l.v_bound;
        subspace_report rep;
        std::uint64_t counter = l.counter;
        if (refresh) {
            if (energy < 0) energy = m.norm2();
            if (!std::isfinite(energy)) return trouble();
            if (energy == 0) {
                result = status::degenerate_input;
                if (l.rank == 0) return decay_only(l, weight);   // nothing to find a subspace from yet
                b_->fill(view(proj_, l.rank, l.other), T(0));     // G = 0: so is its projection (the subspace is kept)
                projected2 = 0;
            } else {
                // The sketch's power iterations form products as large as ‖G‖²: beyond half of T's
                // range they would overflow.
                if (!(energy <= half_max)) return trouble();
                auto next = view(basis_next_, l.r_cap, l.len);
                const auto warm = l.rank > 0 ? basis_view(l) : const_matrix_view<T>{};
                rep = finder_.find(m, config_.rank, energy, warm, l.seed, counter, next);
                if (!std::isfinite(rep.captured)) return trouble();
                rank = rep.rank;
                basis = next.row_block(0, rank);
                m.mul(basis, view(proj_, rank, l.other));
                projected2 = b_->sum_of_squares(view(proj_, rank, l.other));
                if (!std::isfinite(projected2)) return trouble();   // nothing committed yet
                transport_into_workspace(l, basis);
                basis_norm = norm_bound(basis);
                m_bound = l.rank > 0 ? norm_bound(view(m_next_, rank, l.other)) : 0.0;
                v_bound = l.rank > 0 ? norm_bound(view(v_next_, rank, l.other)) : 0.0;
                fresh = true;
            }
        }
        if (l.t >= max_steps) return status::overflow;
        const double decay_value = decay_factor();
        const T decay = T(decay_value);
        const update_terms u = terms(l.t + 1);
        const T alpha = T(-decay_value * u.step * config_.scale);
        const auto n = view(proj_, rank, l.other);   // n = m/(√v+ε) overwrites the projected gradient
        const auto m_work = view(m_next_, rank, l.other), v_work = view(v_next_, rank, l.other);
        moment_bounds next;
        const bool certified = certify(m_bound, v_bound, sum_bound(projected2, rank * l.other), u.eps_value, next) &&
                               low_rank_update_ok(alpha, decay, basis_norm, rank, std::sqrt(static_cast<double>(rank)) * next.n);
        if (certified) {
            // Adam in the subspace: in place in the steady state, on the transported moments after a refresh.
            if (fresh) b_->adam_moments(n, m_work, v_work, coef_.beta1, coef_.beta2, u.eps, n);
            else b_->adam_moments(n, moment_view(l, l.m), moment_view(l, l.v), coef_.beta1, coef_.beta2, u.eps, n);
        } else {
            // The exact path: the update on a copy in the workspace, read back on the host.
            if (!fresh) {
                b_->copy(l.m.data(), m_work.data, rank * l.other);
                b_->copy(l.v.data(), v_work.data, rank * l.other);
            }
            b_->adam_moments(n, m_work, v_work, coef_.beta1, coef_.beta2, u.eps, n);
            const host_summary hm = summarize(m_work), hv = summarize(v_work), hn = summarize(n);
            if (!hm.finite || !hv.finite || !hn.finite || !low_rank_update_ok(alpha, decay, basis_norm, rank, hn.max_col_norm))
                return status::overflow;
            next.m = hm.max_abs;
            next.v = hv.max_abs;
        }

        // Commit. Only a new rank's state allocates, and it does so before changing anything.
        if (fresh) install_subspace(l, basis, rep, counter, basis_norm);
        if (fresh || !certified) {
            b_->copy(m_work.data, l.m.data(), rank * l.other);
            b_->copy(v_work.data, l.v.data(), rank * l.other);
        }
        if (l.anchor2 < 0) l.anchor2 = projected2;   // first step in this subspace
        ++l.t;
        ++l.since;
        l.projected_norm2 = projected2;
        l.m_bound = next.m;
        l.v_bound = next.v;
        // W = decay·W − decay·step·α·ΔW with ΔW = Bᵀ·N (left) or (Bᵀ·N)ᵀ = Nᵀ·B (right).
        if (l.side == projection_side::left) b_->gemm(velora::op::transpose, velora::op::none, alpha, basis_view(l), n, decay, weight);
        else b_->gemm(velora::op::transpose, velora::op::none, alpha, n, basis_view(l), decay, weight);
        return result;
    }

    // Writes l's moments, carried over into the subspace `next` (r×len) by the configured policy,
    // into m_next_ and v_next_ (r×other); zeros when l has no subspace yet. Changes nothing of l.
    void transport_into_workspace(const layer& l, const_matrix_view<T> next) {
        const index_t r_new = next.rows;
        auto m_next = view(m_next_, r_new, l.other);
        auto v_next = view(v_next_, r_new, l.other);
        if (l.rank > 0) {
            transport_moments(*b_, config_.transport, next, basis_view(l), moment_view(l, l.m), moment_view(l, l.v), m_next, v_next,
                              view(r_, r_new, l.rank), view(r2_, r_new, l.rank));
        } else {
            b_->fill(m_next, T(0));
            b_->fill(v_next, T(0));
        }
    }

    // Makes `basis` (r×len, workspace) the subspace of `l`: sizes its state for rank r and copies
    // the basis; the caller copies the moments. The refresh rules count from here.
    void install_subspace(layer& l, const_matrix_view<T> basis, const subspace_report& rep, std::uint64_t counter, double basis_norm) {
        const index_t r_new = basis.rows;
        resize_state(l, r_new);
        b_->copy(basis.data, l.basis.data(), r_new * l.len);
        l.rank = r_new;
        l.since = 0;
        l.anchor2 = -1;   // set from the first projected gradient in the new subspace
        ++l.refreshes;
        l.counter = counter;
        l.last = rep;
        l.basis_norm = basis_norm;
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
    static matrix_view<T> moment_view(layer& l, buffer& b) { return {b.data(), l.rank, l.other, l.other}; }
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
    static progress get_progress(velora::state_reader& r, std::size_t i) {
        progress p;
        p.rank = static_cast<index_t>(r.get<std::int64_t>());
        p.t = r.get<std::uint64_t>();
        p.since = r.get<std::uint64_t>();
        p.refreshes = r.get<std::uint64_t>();
        p.counter = r.get<std::uint64_t>();
        p.anchor2 = r.get<double>();
        p.projected_norm2 = r.get<double>();
        p.last = get_report(r, i);
        return p;
    }

    // The counters, rank, norms and report of a loaded parameter (see load_state for the rules).
    static void check_progress(const velora::state_reader& r, std::size_t i, const layer& l, const progress& p) {
        if (p.t > max_steps) r.bad("parameter ", i, " has the step count t = ", p.t, ", which cannot be incremented (at most ", max_steps, ")");
        const index_t cap = l.low_rank ? l.r_cap : 0;
        if (p.rank < 0 || p.rank > cap) r.bad("parameter ", i, " has the invalid rank ", p.rank, " (at most ", cap, ")");
        if (p.since > p.t) r.bad("parameter ", i, " has ", p.since, " steps in the subspace but only ", p.t, " steps");
        if (p.rank == 0 && p.since != 0) r.bad("parameter ", i, " has ", p.since, " steps in the subspace but no subspace");
        if (!(p.anchor2 == -1.0 || (std::isfinite(p.anchor2) && p.anchor2 >= 0)))
            r.bad("parameter ", i, " has the anchor ‖Ĝ_t0‖² = ", p.anchor2, ", neither -1 (not yet known) nor finite and >= 0");
        if (!(std::isfinite(p.projected_norm2) && p.projected_norm2 >= 0))
            r.bad("parameter ", i, " has the projected gradient energy ‖Ĝ‖² = ", p.projected_norm2, ", not finite and >= 0");
        const subspace_report& rep = p.last;
        if (rep.rank != p.rank) r.bad("parameter ", i, " has rank ", p.rank, " but its last refresh report has rank ", rep.rank);
        if (rep.sketch < 0 || rep.sketch > std::min(l.rows, l.cols))
            r.bad("parameter ", i, " has the report sketch size ", rep.sketch, " outside [0, ", std::min(l.rows, l.cols), "]");
        if (rep.power_iterations < 0 || rep.power_iterations > 64)
            r.bad("parameter ", i, " has the report power iterations ", rep.power_iterations, " outside [0, 64]");
        if (!(std::isfinite(rep.energy) && rep.energy >= 0)) r.bad("parameter ", i, " has the report energy ", rep.energy, ", not finite and >= 0");
        if (!(std::isfinite(rep.captured) && rep.captured >= 0))
            r.bad("parameter ", i, " has the report captured energy ", rep.captured, ", not finite and >= 0");
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
    static subspace_report get_report(velora::state_reader& r, std::size_t i) {
        subspace_report rep;
        rep.rank = static_cast<index_t>(r.get<std::int64_t>());
        rep.sketch = static_cast<index_t>(r.get<std::int64_t>());
        rep.power_iterations = r.get<std::int32_t>();
        const auto exact = r.get<std::uint8_t>(), warm = r.get<std::uint8_t>();
        // Only 0 and 1 are written; any other byte would not re-save to the same blob.
        if (exact > 1 || warm > 1) r.bad("parameter ", i, " has a report flag byte ", int(exact > 1 ? exact : warm), " (0 or 1 expected)");
        rep.exact = exact != 0;
        rep.warm = warm != 0;
        rep.energy = r.get<double>();
        rep.captured = r.get<double>();
        return rep;
    }

    static void put_config(velora::state_writer& w, const config_type& c) {
        w.put(c.adam.lr);
        w.put(c.adam.beta1);
        w.put(c.adam.beta2);
        w.put(c.adam.eps);
        w.put(c.adam.weight_decay);
        w.put(static_cast<std::uint8_t>(c.adam.convention));
        w.put(c.scale);
        w.put(static_cast<std::uint8_t>(c.side));
        c.rank.save(w);
        c.refresh.save(w);
        w.put(static_cast<std::uint8_t>(c.transport));
        w.put(static_cast<std::int64_t>(c.rsvd.oversampling));
        w.put(static_cast<std::int32_t>(c.rsvd.power_iterations));
        w.put(static_cast<std::int32_t>(c.rsvd.warm_power_iterations));
        w.put(static_cast<std::uint8_t>(c.rsvd.warm_start));
        w.put(c.rsvd.exact_fraction);
        w.put(c.seed);
    }

    static config_type get_config(velora::state_reader& r, std::uint32_t version) {
        config_type c;
        c.adam.lr = r.get<double>();
        c.adam.beta1 = r.get<double>();
        c.adam.beta2 = r.get<double>();
        c.adam.eps = r.get<double>();
        c.adam.weight_decay = r.get<double>();
        if (version >= 2) {
            const auto convention = r.get<std::uint8_t>();
            if (convention > 1) r.bad("the configuration's Adam convention byte is ", int(convention), " (0 or 1 expected)");
            c.adam.convention = static_cast<adam_convention>(convention);
        }
        c.scale = r.get<double>();
        c.side = static_cast<side_policy>(r.get<std::uint8_t>());
        c.rank = Rank::load(r);
        c.refresh = Refresh::load(r);
        c.transport = static_cast<transport_policy>(r.get<std::uint8_t>());
        c.rsvd.oversampling = static_cast<index_t>(r.get<std::int64_t>());
        c.rsvd.power_iterations = r.get<std::int32_t>();
        c.rsvd.warm_power_iterations = r.get<std::int32_t>();
        const auto warm_start = r.get<std::uint8_t>();
        if (warm_start > 1) r.bad("the configuration's warm_start flag byte is ", int(warm_start), " (0 or 1 expected)");
        c.rsvd.warm_start = warm_start != 0;
        c.rsvd.exact_fraction = r.get<double>();
        c.seed = r.get<std::uint64_t>();
        return c;
    }

    // The first difference between a saved and the live configuration, "" when there is none.
    // Doubles are compared bit for bit: a saved -0.0 where 0.0 is configured compares equal
    // but would not re-save to the same blob.
    static std::string describe_difference(const config_type& saved, const config_type& live) {
        const auto same = [](double a, double b) { return std::bit_cast<std::uint64_t>(a) == std::bit_cast<std::uint64_t>(b); };
        const adamw_hyper &a = saved.adam, &b = live.adam;
        if (!same(a.lr, b.lr) || !same(a.beta1, b.beta1) || !same(a.beta2, b.beta2) || !same(a.eps, b.eps) || !same(a.weight_decay, b.weight_decay))
            return "adam hyper-parameters differ";
        if (a.convention != b.convention) return "adam convention differs";
        if (!same(saved.scale, live.scale)) return "scale differs";
        if (saved.side != live.side) return "side policy differs";
        if (policy_bytes(saved.rank) != policy_bytes(live.rank)) return "rank policy differs";
        if (policy_bytes(saved.refresh) != policy_bytes(live.refresh)) return "refresh policy differs";
        if (saved.transport != live.transport) return "transport policy differs";
        const rsvd_config &x = saved.rsvd, &y = live.rsvd;
        if (x.oversampling != y.oversampling || x.power_iterations != y.power_iterations || x.warm_power_iterations != y.warm_power_iterations ||
            x.warm_start != y.warm_start || !same(x.exact_fraction, y.exact_fraction))
            return "rsvd settings differ";
        if (saved.seed != live.seed) return "seed differs";
        return "";
    }

    // A policy's settings as it saves them: policies are compared by these bytes.
    template <class P>
    static std::vector<std::byte> policy_bytes(const P& p) {
        velora::state_writer w("adarank.policy", 1);
        p.save(w);
        return std::move(w).finish();
    }

    B* b_;
    config_type config_;
    adam_coefficients coef_;
    double lr_;
    subspace_finder<B> finder_;
    std::vector<layer> layers_;
    // Workspace shared by all parameters, sized at registration for the largest.
    buffer proj_, m_next_, v_next_, basis_next_, r_, r2_;
    buffer fused_scratch_, dense_grad_;   // grown on first use
    buffer reduce_scratch_, bucket_;      // data-parallel: the energy pass's row blocks, all_reduce_mean's bucket (first use)
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
