#pragma once
/// \file
/// `low_rank_adamw<B>`: AdaRankGrad's low-rank AdamW (Refael et al., arXiv 2410.17881), with
/// GaLore (Zhao et al., arXiv 2403.03507) as the configuration `optimizer_config::galore`
/// (docs/adarankgrad.md has the algorithm, its settings and the step's order).
///
/// A host registers each parameter with its shape, then calls `step` for one parameter at a
/// time, as soon as that parameter's gradient exists. A 2-D parameter registered as low-rank
/// keeps Adam's moments in a rank-r subspace of its gradient (r chosen per refresh by the rank
/// policy); everything else gets plain AdamW with the same hyper-parameters. A VeLoRA layer's
/// gradient may be passed in factored form; the m×n gradient is then never formed. Steps
/// between refreshes allocate nothing (after reserve for factored, data-parallel and bf16-weight steps); a
/// refresh may allocate (the state buffers when the rank changes).
///
/// Numerical trouble never corrupts the state: NaN/Inf in a gradient returns
/// status::non_finite_input, a result that would not be finite in T returns status::overflow
/// (overflow_certificate.hpp), an all-zero gradient where a new subspace is due returns
/// status::degenerate_input, each with nothing changed. Sizes whose products do not fit are
/// std::invalid_argument at registration; load_state accepts exactly the states the optimizer
/// can be in (optimizer_state_io.hpp).
///
/// This file is the public surface. The work lives in files of one concern each: parameter.hpp,
/// adamw_rule.hpp, dense_step.hpp, low_rank_step.hpp (five named phases), given_basis.hpp,
/// overflow_certificate.hpp, optimizer_state_io.hpp, data_parallel.hpp, optimizer_workspace.hpp,
/// gradient_argument.hpp (the gradient forms `step` takes), rank_budget.hpp (with the budget's
/// admission checks). Three bases carry the rest of the public surface: bf16_weight_steps.hpp,
/// data_parallel_phases.hpp and deprecated.hpp (the old spellings).
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
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

#include "adamw_rule.hpp"
#include "backend.hpp"
#include "bf16_weight_steps.hpp"
#include "bf16_weights.hpp"
#include "data_parallel.hpp"
#include "data_parallel_phases.hpp"
#include "deprecated.hpp"
#include "dense_step.hpp"
#include "given_basis.hpp"
#include "gradient.hpp"
#include "gradient_argument.hpp"
#include "low_rank_step.hpp"
#include "mean_over_ranks.hpp"
#include "optimizer_state_io.hpp"
#include "optimizer_workspace.hpp"
#include "overflow_certificate.hpp"
#include "parameter.hpp"
#include "policies.hpp"
#include "rank_budget.hpp"
#include "rsvd.hpp"
#include "step_context.hpp"

namespace adarank {

using velora::status;

/// `Rank` and `Refresh` are the rank estimator and the refresh rule (the library's by default;
/// any types satisfying the concepts in policies.hpp, held by value in the configuration, so a
/// step calls them without allocating or dispatching).
template <optimizer_backend B, rank_estimator Rank = rank_policy, refresh_rule Refresh = refresh_policy>
    requires persistent_policy<Rank> && persistent_policy<Refresh>
class low_rank_adamw : public bf16_weight_steps<low_rank_adamw<B, Rank, Refresh>, B>,
                       public data_parallel_phases<low_rank_adamw<B, Rank, Refresh>, B>,
                       public deprecated_optimizer_spellings<low_rank_adamw<B, Rank, Refresh>, B> {
    // The bases are this class's surface in files of one concern; they reach its state through it.
    friend class bf16_weight_steps<low_rank_adamw, B>;
    friend class data_parallel_phases<low_rank_adamw, B>;

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
    static constexpr double orthonormality_tolerance = adarank::orthonormality_tolerance<T>;

    /// Throws std::invalid_argument for an invalid configuration (see policies.hpp: validate), and
    /// for an ε that T rounds to zero or to a subnormal value (n = m/(√v + ε) is computed in T).
    explicit low_rank_adamw(B& backend, config_type config = {})
        : b_(&backend), config_(checked(config)), rule_(config_.adam), lr_(config.adam.lr), finder_(backend, config.rsvd) {}

    [[nodiscard]] const config_type& config() const noexcept { return config_; }
    [[nodiscard]] index_t size() const noexcept { return static_cast<index_t>(layers_.size()); }

    /// The learning rate of the next steps (for schedules). Throws for a negative or non-finite
    /// value, and under the torch convention for lr·wd >= 1 (check_learning_rate, policies.hpp).
    void set_learning_rate(double lr) {
        check_learning_rate(lr, config_.adam, "adarank::low_rank_adamw::set_learning_rate", "argument 'lr'");
        lr_ = lr;
    }
    [[nodiscard]] double learning_rate() const noexcept { return lr_; }

    /// β₁, β₂, ε and the weight decay of the next steps: torch's optimizers read them from the
    /// param group at every step, so schedules of β or of the decay exist. Bias corrections use
    /// the current β (1 − βᵗ), as torch's do; the moments carry on. The convention is fixed.
    /// Throws std::invalid_argument, changing nothing, for values the constructor would refuse
    /// (with the current learning rate in the lr·wd rule of the torch convention).
    void set_adam_hyper(double beta1, double beta2, double eps, double weight_decay) {
        constexpr const char* fn = "adarank::low_rank_adamw::set_adam_hyper";
        config_type c = config_;
        c.adam.beta1 = beta1;
        c.adam.beta2 = beta2;
        c.adam.eps = eps;
        c.adam.weight_decay = weight_decay;
        c.adam.lr = lr_;
        validate(c, fn);
        check_eps_representable<T>(c.adam, fn);
        c.adam.lr = config_.adam.lr;
        rule_ = adamw_rule<T>(c.adam);
        config_ = c;
    }

    /// Registers a rows×cols parameter (a vector is 1×n) and sizes every buffer its steps need.
    /// Throws std::invalid_argument, registering nothing, for a non-positive shape, an invalid
    /// kind, or sizes whose products (rows·cols, the state at the largest rank, in bytes of T) do
    /// not fit in the address space.
    param_id add_parameter(index_t rows, index_t cols, param_kind kind = param_kind::automatic) {
        constexpr const char* fn = "adarank::low_rank_adamw::add_parameter";
        layer l = layer::plan(rows, cols, kind, config_.side, config_.rank.max_rank(), config_.seed, layers_.size(), fn);
        l.quantized = config_.state == state_format::int8_blockwise;
        if (l.quantized) l.q8.assign_zero(*b_, 0, config_.state_block);
        if (uses_rank_budget(config_.rank)) check_budget_admits(config_.rank, std::span<const layer>(layers_), budget_, l, fn);
        if (l.low_rank && config_.basis != basis_format::float32) {   // a quantised basis (basis_format.hpp)
            l.qbasis.configure(config_.basis, l.len, config_.basis_block);
            ws_.reserve_quantized_basis(config_.basis, l.len, l.r_cap, config_.basis_block);
        }
        if (l.low_rank) {
            ws_.reserve_low_rank(l.len, l.other, l.r_cap);
            finder_.reserve(l.len, l.other, l.r_cap);
            if (l.quantized) ws_.reserve_dequantized(l.r_cap * l.other);
        } else if (l.quantized) {
            l.q8.assign_zero(*b_, rows * cols, config_.state_block);
        } else {
            l.m.resize(static_cast<std::size_t>(rows * cols));
            l.v.resize(static_cast<std::size_t>(rows * cols));
            b_->fill(l.dense_view(l.m), T(0));
            b_->fill(l.dense_view(l.v), T(0));
        }
        ws_.forget_decoded_basis();   // the states may move
        layers_.push_back(std::move(l));
        if (uses_rank_budget(config_.rank)) {
            layers_.back().spectrum.reserve(static_cast<std::size_t>(layers_.back().r_cap));
            budget_.reserve(layers_.size(), std::max<index_t>(config_.rank.max_rank(), 1));
        }
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
        const std::uint64_t fingerprint = error ? 0 : io::registration_fingerprint(config_, id, layers_[static_cast<std::size_t>(id)]);
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

    // ------------------------------------------------------------------ the step
    // One step of parameter `id` with its gradient in one of three forms: a dense view, a VeLoRA
    // layer's factored gradient, or any gradient_operator. Each takes an optional communicator:
    // without one (one process) the gradient is this process's; with one, every rank passes its
    // own and the step uses the mean over the ranks (every rank calls step for the same
    // parameters in the same order, and ends with the same bits and the same status). A
    // low-rank parameter then all-reduces its projected gradient (rank×other values) and, when
    // it searches a new subspace, the sketch products and Ḡ's energy; a dense one all-reduces
    // its gradient (or reduce many at once with all_reduce_mean and step them without `comm`).
    // With P > 1 ranks, the captured_energy refresh rule throws std::invalid_argument on every
    // rank (it needs ‖Ḡ‖² at every step, i.e. the full gradient all-reduced). docs/distributed.md.
    //
    // Statuses: ok; degenerate_input (an all-zero gradient where a new subspace was due: the old
    // one is kept); non_finite_input (NaN/Inf in the gradient) or overflow (a finite gradient,
    // state or step whose result would not be finite in T, or a step count at its limit), both
    // with nothing changed. Precondition for the overflow guarantee: the weights satisfy
    // max(1, |1 − lr·wd|)·|w| <= max(T)/2 (the optimizer never reads W to check it).

    /// `weight`: the parameter (rows×cols, backend memory) as a matrix_view<T>, or as a
    /// bf16_weight_view for a host that stores it only in bf16 (CPU backend in float only;
    /// bf16_weight_steps.hpp: the weight is widened to float, stepped exactly as a float weight
    /// would be, and rounded back; non_finite_input and overflow leave it untouched too, and under
    /// the precondition above an `ok` step never rounds a weight to Inf).
    /// `grad`: the gradient (rows×cols) in any form as_gradient_operator adapts
    /// (gradient_argument.hpp): a dense view; a VeLoRA layer's factored gradient
    /// (velora::compressor::factored), which a low-rank parameter never forms as rows×cols (with a
    /// communicator its projection is formed locally from A and v, which must be the same on every
    /// rank, see velora/distributed/shared_v.hpp, and reduced); or any gradient_operator. A dense
    /// parameter expands a non-dense form into the workspace reserve() sizes.
    template <class Weight = matrix_view<T>, class Grad = const_matrix_view<T>, velora::communicator C = velora::single_process>
        requires(std::convertible_to<Weight, matrix_view<T>> || (std::convertible_to<Weight, bf16_weight_view> && host_float_backend<B>)) &&
                gradient_argument<Grad, B>
    status step(param_id id, Weight weight, const Grad& grad, C&& comm = C{}) {
        if constexpr (!std::convertible_to<Weight, matrix_view<T>>) {   // a bf16 weight (a bf16_weight_view or a view of bf16 values)
            return this->step_bf16(id, weight, [&](matrix_view<T> w) { return step(id, w, grad, comm); });
        } else {
            constexpr const char* fn = "adarank::low_rank_adamw::step";
            const matrix_view<T> w = weight;
            layer& l = checked_layer(id, fn);
            velora::check_shape(w, l.rows, l.cols, fn, "weight");
            check_gradient_argument<B>(grad, l.rows, l.cols, id, fn);
            check_distributable(l, config_.refresh, comm, fn);
            if (non_finite_before_products(*b_, grad, comm)) return status::non_finite_input;
            return step_with(l, w, as_gradient_operator(*b_, grad, ws_.fused), comm);
        }
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
        if (uses_rank_budget(config_.rank) && l.low_rank && basis.rows >= 0 && basis.rows <= l.r_cap) check_budget_admits_rank(config_.rank, std::span<const layer>(layers_), budget_, l, basis.rows, fn);
        auto ctx = context();
        const status s = install_given_basis(ctx, l, id, basis, orthonormality_tolerance, fn);
        if (s == status::ok) l.spectrum.clear();   // a given subspace has no sketched spectrum: the budget rule holds it fixed
        return s;
    }

    /// Parameter `id`'s state as numbers: its shape, kind, side, rank, step and refresh counters,
    /// state bytes, the last step's ‖Ĝ‖² and bytes communicated, the last subspace search (named
    /// info() before 0.x; that spelling is deprecated.hpp's).
    [[nodiscard]] layer_info layer_state(param_id id) const { return checked_layer(id, "adarank::low_rank_adamw::layer_state").info(); }

    /// Basis (rank×len) and moments (rank×other, or rows×cols for a dense parameter) of a
    /// parameter, as views of backend memory (valid until its next step or set_basis).
    /// Throws std::invalid_argument for a quantised basis (config.basis int8/int4: no float basis
    /// is held; basis_values gives its decoded Q).
    [[nodiscard]] const_matrix_view<T> basis(param_id id) const {
        const layer& l = checked_layer(id, "adarank::low_rank_adamw::basis");
        velora::detail::require(!l.qbasis.quantized(), "adarank::low_rank_adamw::basis", "parameter ", id,
                                "'s basis is stored quantised (config.basis); basis_values returns its values");
        return l.basis_view();
    }
    /// The basis the steps use (rank×len, row-major, host memory): a float basis copied, a quantised
    /// one decoded (Q = code·scale). Allocates.
    [[nodiscard]] std::vector<T> basis_values(param_id id) {
        layer& l = checked_layer(id, "adarank::low_rank_adamw::basis_values");
        return host_copy(*b_, current_basis(ws_, l));
    }
    [[nodiscard]] const_matrix_view<T> first_moment(param_id id) const { return moment(id, &layer::m); }
    [[nodiscard]] const_matrix_view<T> second_moment(param_id id) const { return moment(id, &layer::v); }

    /// Bytes of optimizer state over all parameters: for a low-rank parameter of rank r,
    /// (r·len + 2·r·other)·sizeof(T); for a dense one 2·rows·cols·sizeof(T).
    [[nodiscard]] std::size_t state_bytes() const noexcept {
        std::size_t sum = 0;
        for (const layer& l : layers_) sum += l.state_bytes();
        return sum;
    }
    /// Bytes of workspace shared by all parameters (sized for the largest one).
    [[nodiscard]] std::size_t workspace_bytes() const noexcept { return ws_.bytes() + finder_.workspace_bytes(); }

    /// Sizes the workspace for what `plan` says the host will do with the parameters registered so
    /// far (factored gradients of up to plan.factored_groups groups, data-parallel steps,
    /// all_reduce_mean's bucket, bf16 weights), so that those steps do not allocate on first use:
    /// after it, only a step that finds a subspace of a new rank allocates (that parameter's
    /// state). Registration already sizes what plain steps use. Grows only; call it again after
    /// registering more. Throws std::invalid_argument for negative sizes, and for bf16 weights on
    /// a backend that has no bf16-weight steps (host_float_backend).
    void reserve(const workspace_plan& plan) {
        ws_.reserve(layers_, checked_plan(plan, "adarank::low_rank_adamw::reserve"));
    }
    /// What workspace_bytes() will report after reserve(plan), computed without allocating.
    [[nodiscard]] std::size_t workspace_bytes(const workspace_plan& plan) const {
        return ws_.bytes_after(layers_, checked_plan(plan, "adarank::low_rank_adamw::workspace_bytes")) + finder_.workspace_bytes();
    }

    // ------------------------------------------------------------------ state
    static constexpr std::string_view state_kind = optimizer_state_io<B, Rank, Refresh>::kind;
    static constexpr std::uint32_t state_version = optimizer_state_io<B, Rank, Refresh>::version;   // 2: adds the Adam convention (version 1 states load as galore); 3: the moment state format

    /// Everything a resumed run needs to continue bit-identically: the configuration it belongs
    /// to, the learning rate, and per parameter its shape, side, rank, step counters, random
    /// stream position, basis and moments (the format: optimizer_state_io.hpp).
    [[nodiscard]] std::vector<std::byte> save_state() const { return io::save(*b_, config_, lr_, layers_); }

    /// Restores a state saved by an optimizer with the same configuration (the learning rate may
    /// differ; the saved one is restored) and the same parameters registered in the same order.
    /// The blob must be intact and describe a state this optimizer can be in (the exact rules:
    /// optimizer_state_io.hpp, "a valid state"); anything else throws velora::state_format_error
    /// naming the parameter and the field, and changes nothing.
    void load_state(std::span<const std::byte> blob) {
        io::load(*b_, config_, lr_, layers_, blob, budget_);
        ws_.forget_decoded_basis();   // the bases were replaced (a load that throws changes nothing: the mark stays true)
    }

private:
    using layer = parameter_state<B>;
    using io = optimizer_state_io<B, Rank, Refresh>;
    using cert = overflow_certificate<T>;

    static config_type checked(const config_type& c) {
        constexpr const char* fn = "adarank::low_rank_adamw::low_rank_adamw";
        validate(c, fn);
        check_eps_representable<T>(c.adam, fn);
        velora::detail::require(c.state == state_format::float32 || blockwise_state_backend<B>, fn,
                                "config.state = int8_blockwise needs a backend in float with 8-bit moment kernels (eigen_backend<float> or "
                                "cuda_backend<float>); this backend's value type has ",
                                sizeof(T), "-byte values");
        velora::detail::require(c.basis == basis_format::float32 || host_float_backend<B>, fn,
                                "config.basis = int8/int4 needs the CPU backend in float (eigen_backend<float>), which decodes the basis in host memory; this "
                                "backend (",
                                sizeof(T), "-byte values) is not a host_float_backend");
        return c;
    }

    static const workspace_plan& checked_plan(const workspace_plan& plan, const char* fn) {
        velora::detail::require(plan.factored_groups >= 0 && plan.bucket_elements >= 0, fn, "plan.factored_groups = ", plan.factored_groups,
                                " and plan.bucket_elements = ", plan.bucket_elements, " must be >= 0");
        velora::detail::require(!plan.bf16_weights || host_float_backend<B>, fn,
                                "plan.bf16_weights = true, but this backend has no bf16-weight steps (they need host_float_backend: the CPU backend in float, eigen_backend<float>)");
        return plan;
    }

    layer& checked_layer(param_id id, const char* fn) {
        velora::detail::require(id >= 0 && id < size(), fn, "argument 'id' is ", id, " but ", size(), " parameters are registered");
        return layers_[static_cast<std::size_t>(id)];
    }
    const layer& checked_layer(param_id id, const char* fn) const { return const_cast<low_rank_adamw*>(this)->checked_layer(id, fn); }

    const_matrix_view<T> moment(param_id id, typename layer::buffer layer::*which) const {
        const layer& l = checked_layer(id, "adarank::low_rank_adamw::moment");
        if (l.low_rank) return {(l.*which).data(), l.rank, l.other, l.other};
        return {(l.*which).data(), l.rows, l.cols, l.cols};
    }

    // What a step works with besides its parameter (step_context.hpp).
    step_context<B, config_type> context() {
        return {*b_, config_, rule_, lr_, ws_, finder_, std::span<const layer>(layers_), uses_rank_budget(config_.rank) ? &budget_ : nullptr};
    }

    // A step of `l` with gradient operator `local`: in one process directly; with P > 1 ranks
    // through mean_over_ranks, so that every quantity the step reads is the ranks' mean.
    // `projected` (low-rank only, may be empty): the projection onto the current basis, already
    // reduced by the host (step_projected).
    template <class Local, class C>
    status step_with(layer& l, matrix_view<T> weight, const Local& local, C& comm, const_matrix_view<T> projected = {}) {
        auto ctx = context();
        if constexpr (std::is_same_v<std::remove_cvref_t<C>, velora::single_process>) {
            l.communicated = l.pending_bytes;   // a gradient reduced by all_reduce_mean
            l.pending_bytes = 0;
            return l.low_rank ? low_rank_step<B, config_type, Local>(ctx, l, weight, local, projected).run() : dense_step_of(ctx, l, weight, local);
        } else {
            std::uint64_t bytes = l.pending_bytes;
            l.pending_bytes = 0;
            using mean_type = mean_over_ranks<B, Local, std::remove_cvref_t<C>>;
            const mean_type mean(*b_, local, comm, ws_.reduce, bytes);
            const status s = l.low_rank ? low_rank_step<B, config_type, mean_type>(ctx, l, weight, mean, projected).run() : dense_step_of(ctx, l, weight, mean);
            l.communicated = bytes;
            return s;
        }
    }

    B* b_;
    config_type config_;
    adamw_rule<T> rule_;
    double lr_;
    subspace_finder<B> finder_;
    std::vector<layer> layers_;
    optimizer_workspace<B> ws_;   // shared by all parameters, sized at registration for the largest (data-parallel, factored and bf16-weight parts by reserve, or on first use)
    rank_budget_scratch budget_;  // the budget rank rule's scratch, sized at registration
};

/// A low-rank optimizer as a host drives it: register shapes, step one parameter at a time.
template <class O>
concept low_rank_optimizer = requires(O& o, index_t n, typename O::param_id id, matrix_view<typename O::value_type> w,
                                      const_matrix_view<typename O::value_type> g) {
    { o.add_parameter(n, n) } -> std::same_as<typename O::param_id>;
    { o.step(id, w, g) } -> std::same_as<status>;
    { o.layer_state(id) } -> std::same_as<layer_info>;
    { o.state_bytes() } -> std::convertible_to<std::size_t>;
    { o.save_state() } -> std::same_as<std::vector<std::byte>>;
};

} // namespace adarank
