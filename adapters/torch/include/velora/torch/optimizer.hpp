#pragma once
/// \file
/// `AdaRankGradAdamW`: adarank::low_rank_adamw as a torch::optim::Optimizer (docs/torch.md).
///
/// - Param groups with per-group options (lr, betas, eps, weight decay, the AdamW convention
///   (adarank::adam_convention::torch: dense parameters match torch::optim::AdamW), rank, refresh and
///   transport policies, scale α, side, randomized-SVD settings, seed, parameter kind, and what
///   happens to >2-D parameters, quantised moments and bases, how bf16 weights round). Each group
///   runs its own low_rank_adamw per parameter dtype (float32, float64; a bfloat16 parameter is
///   stepped by the float one in float from its bf16 weight, with no float master copy, and
///   rounded back by the option weight_rounding), built from the group's options when the group first steps; the
///   learning rate, betas, eps and weight decay are read from the group at every step (so torch's
///   LR schedulers and β or weight-decay schedules work), every other option is fixed from then
///   on (changing one throws at the next step, naming it).
/// - State is keyed by the parameter tensor (its TensorImpl, as torch's optimizers key
///   state()): each registered parameter has an entry in state() and layer_state(param) reports its
///   rank, refreshes and state bytes. Registration is positional within a group, so a resumed
///   run (load) maps the saved state onto the new run's tensors in the same order, as torch does.
/// - Shapes: a 0-D parameter is 1×1, a 1-D one 1×n (both dense); a 2-D one is rows×cols; one of
///   more dimensions [O, ...] is O × (Π rest), GaLore's convention, low-rank eligible under
///   higher_dims::flatten (default) or optimised densely under higher_dims::dense. An empty
///   parameter (0 elements) has nothing to optimise and is skipped.
/// - step(): a whole-step finiteness check first (GradScaler semantics): every gradient is
///   checked, and if any holds NaN/Inf nothing at all is changed, the step is counted in
///   skipped_steps() and last_step() lists the offending parameters. Then each parameter is
///   stepped; its weight is updated in place and its version counter bumped (autograd refuses a
///   backward that saved the old weight). A parameter whose finite gradient would overflow the
///   arithmetic (the library's status::overflow: values near the type's maximum) is left
///   unchanged while the others step; last_step() says which.
/// - Factored gradients: attach(VeloraLinear) makes the layer deliver its weight gradient as
///   (A, v, scale) to this optimizer, which steps a low-rank weight without forming the O×D
///   matrix; zero_grad() clears them with the dense gradients; grad_norm() and
///   clip_grad_norm() include them.
/// - save/load go through torch archives (torch::save(opt, path) / torch::load(opt, path)):
///   the options of every group (options_format.hpp: the library's configuration block) and each
///   low_rank_adamw's state blob (a uint8 tensor), nothing else of the library's. A resumed run
///   continues bit-identically at any thread count. Archives of format 1 still load.
/// - Threads: every step reads at::get_num_threads() on the calling thread.
/// - Allocation: a step between registrations and refreshes allocates no host memory of its own
///   (tests/torch/test_torch_alloc.cpp; optimizer_engine.hpp says what libtorch may still copy).
///
/// This file is the torch surface; the work is in optimizer_options.hpp (options, param state),
/// group_engine.hpp (a group's registration and engines, its errors), optimizer_engine.hpp (one
/// engine per group and dtype), options_format.hpp and archive_io.hpp.
#include <ATen/ATen.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <adarank/adarank.hpp>
#include <velora/core/error.hpp>

#include "archive_io.hpp"
#include "backend.hpp"
#include "communicator.hpp"
#include "factored.hpp"
#include "group_engine.hpp"
#include "linear.hpp"
#include "optimizer_engine.hpp"
#include "optimizer_options.hpp"
#include "options_format.hpp"
#include "parameter_shape.hpp"
#include "step_report.hpp"
#include "view.hpp"

namespace velora::torch {

class AdaRankGradAdamW : public ::torch::optim::Optimizer {
public:
    explicit AdaRankGradAdamW(std::vector<::torch::optim::OptimizerParamGroup> param_groups, AdaRankGradAdamWOptions defaults = {})
        : Optimizer(std::vector<::torch::optim::OptimizerParamGroup>{}, std::make_unique<AdaRankGradAdamWOptions>(defaults)),
          b32_(std::make_unique<threads_following<float>>()), b64_(std::make_unique<threads_following<double>>()) {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::AdaRankGradAdamW";
        for (const auto& group : param_groups) add_param_group(group);   // this class's, which keeps the group's options
        // Validate every group's options now, so that a bad one fails at construction, as torch's do.
        for (std::size_t g = 0; g < param_groups_.size(); ++g) detail::in_group(g, fn, [&] { detail::check_options(options_of(g).stored(), fn); });
    }
    explicit AdaRankGradAdamW(std::vector<at::Tensor> params, AdaRankGradAdamWOptions defaults = {})
        : AdaRankGradAdamW(std::vector<::torch::optim::OptimizerParamGroup>{::torch::optim::OptimizerParamGroup(std::move(params))}, defaults) {}

    // Attached layers count their consumers: a moved-from optimizer would detach them twice.
    AdaRankGradAdamW(AdaRankGradAdamW&&) = delete;
    AdaRankGradAdamW& operator=(AdaRankGradAdamW&&) = delete;

    ~AdaRankGradAdamW() override {
        for (auto& [key, slot] : slots_) slot.slot->detach();
    }

    /// Adds a param group, as Optimizer::add_param_group: a group with options keeps them as given
    /// (every option; AdaRankGradAdamWOptions expected), one without takes the optimizer's defaults.
    /// Recent libtorch 2.x versions replace the options of a custom optimizer's group with the
    /// defaults in Optimizer::add_param_group (they merge per field only for torch's own optimizers);
    /// this hides it, so call it on the AdaRankGradAdamW, not through a reference to the base class.
    void add_param_group(const ::torch::optim::OptimizerParamGroup& group) {
        Optimizer::add_param_group(group);
        if (group.has_options()) param_groups_.back().set_options(group.options().clone());
    }

    /// One step; returns the closure's loss (evaluated with grad mode on) or an undefined tensor.
    /// See last_step() for what happened.
    at::Tensor step(LossClosure closure = nullptr) override {
        at::Tensor loss;
        if (closure) {
            at::AutoGradMode enable(true);
            loss = closure();
        }
        (void)step_checked();
        return loss;
    }

    /// One step, returning its report (also kept as last_step()). Throws std::invalid_argument,
    /// changing nothing, for a caller mistake: an option changed after the group's first step, a
    /// learning rate the group's configuration refuses, a parameter replaced or of an unsupported
    /// dtype, a gradient of the wrong shape or on another device. Between registrations a step
    /// allocates no host memory of its own (optimizer_engine.hpp says what libtorch may).
    step_report step_checked() {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::step";
        ::torch::NoGradGuard no_grad;
        prepare(fn);
        for (const auto& [key, a] : slots_)
            if (a.slot->stale())
                velora::detail::fail(fn, "the factored gradient of the VeloraLinear weight ", detail::describe(a.weight),
                                     " still holds the term an earlier step consumed, with new terms added on top: zero_grad was not called "
                                     "on this AdaRankGradAdamW (or the layer) since that step. torch::optim::Optimizer::zero_grad is not "
                                     "virtual: through a base-class reference it clears only the dense gradients; call zero_grad on the "
                                     "AdaRankGradAdamW itself");
        for (auto& e : engines_) e.for_each_engine([](auto& engine) { engine.clear(); });
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const auto& params = param_groups_[g].params();
            group_engine& e = engines_[g];
            for (std::size_t i = 0; i < params.size(); ++i) {
                const detail::registered_parameter& r = e.params[i];
                if (r.id < 0) continue;   // empty parameter
                detail::with_dtype(r.is_double, [&]<class T>(std::type_identity<T>) { e.template engine<T>()->queue(params[i], r, slot_of(params[i]), fn); });
            }
        }
        step_report& report = last_;   // reused: its events keep their capacity
        report.status = velora::status::ok;
        report.skipped = false;
        report.stepped = 0;
        report.events.clear();
        // The whole-step check: every gradient, before anything changes (on every rank: one
        // rank's NaN skips the step everywhere).
        for (auto& e : engines_) e.for_each_engine([&](auto& engine) { engine.check_finite(report.events); });
        const bool non_finite = comm_ ? comm_->any(!report.events.empty()) : !report.events.empty();
        if (non_finite) {
            for (auto& e : engines_) e.for_each_engine([](auto& engine) { engine.clear(); });
            in_parameter_order(report.events);
            report.status = velora::status::non_finite_input;
            report.skipped = true;
            ++skipped_;
            return report;
        }
        for (std::size_t g = 0; g < engines_.size(); ++g) {
            const double lr = param_groups_[g].options().get_lr();
            engines_[g].for_each_engine([&](auto& engine) { engine.step_queued(lr, report, comm_.get()); });
        }
        for (auto& [key, a] : slots_) a.slot->mark_consumed();
        in_parameter_order(report.events);
        bool degenerate = false, overflow = false;
        for (const auto& event : report.events) {
            degenerate = degenerate || event.status == velora::status::degenerate_input;
            overflow = overflow || event.status == velora::status::overflow || event.status == velora::status::non_finite_input;
        }
        report.status = overflow ? velora::status::overflow : degenerate ? velora::status::degenerate_input : velora::status::ok;
        return report;
    }

    /// Data-parallel training: from the next step on, every step uses the mean of the ranks'
    /// gradients through `comm` (the library's data-parallel step, docs/distributed.md; null: one
    /// process again). Every rank must build the same optimizer (groups, options, parameters in the
    /// same order) and step together; the whole-step finiteness check then skips a step on every
    /// rank when one rank's gradients are not finite. Dense gradients must not be averaged
    /// elsewhere as well (no DDP gradient hook). The refresh rule captured_energy is refused with
    /// more than one rank (it needs the full gradient's norm at every step).
    void set_communicator(std::shared_ptr<dynamic_communicator> comm) { comm_ = std::move(comm); }
    [[nodiscard]] const std::shared_ptr<dynamic_communicator>& communicator() const noexcept { return comm_; }

    [[nodiscard]] const step_report& last_step() const noexcept { return last_; }
    /// Steps skipped by the whole-step finiteness check.
    [[nodiscard]] std::uint64_t skipped_steps() const noexcept { return skipped_; }

    /// Makes `layer` deliver its weight gradient to this optimizer in factored form (when the
    /// layer was built with factored_gradient(true)). The weight must be one of this
    /// optimizer's parameters, float32. Throws std::invalid_argument otherwise.
    void attach(const VeloraLinear& layer) { attach(layer->weight, layer->factored_grad()); }
    void attach(const at::Tensor& weight, std::shared_ptr<factored_gradient_accumulator> slot) {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::attach";
        velora::detail::require(slot != nullptr, fn, "argument 'slot' is null");
        if (!(weight.defined() && weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.size(0) == slot->rows() &&
              weight.size(1) == slot->features()))
            velora::detail::fail(fn, "argument 'weight' (", detail::describe(weight), ") must be the float32 ", slot->rows(), "x", slot->features(),
                                 " weight of the layer");
        if (!position_of(weight)) velora::detail::fail(fn, "argument 'weight' (", detail::describe(weight), ") is not a parameter of this optimizer");
        auto [it, inserted] = slots_.try_emplace(weight.unsafeGetTensorImpl(), attached{weight, slot});
        if (!inserted) {
            if (it->second.slot == slot) return;
            it->second.slot->detach();
            it->second = attached{weight, slot};
        }
        slot->attach();
        // A weight registered already: size the workspace its factored steps use now.
        if (const detail::registered_parameter* r = find(weight); r != nullptr && r->id >= 0)
            engines_[static_cast<std::size_t>(r->group)].f32->reserve_factored(slot->groups());
    }

    /// Zeroes the parameters' gradients (as Optimizer::zero_grad) and clears the attached layers'
    /// factored gradients. (Optimizer::zero_grad is not virtual: through a reference to the base
    /// class only the dense gradients are cleared; VeloraLinear::zero_grad clears its own.)
    void zero_grad() {
        Optimizer::zero_grad();
        for (auto& [key, a] : slots_) a.slot->clear();
    }

    /// The 2-norm of all gradients (dense ones and attached factored ones) over every group; NaN
    /// or Inf when a gradient is not finite. Factored gradients are measured without forming them:
    /// ‖scale·A·(I_G ⊗ vᵀ)‖² = scale²·Σ_g ‖A[:, g]‖²·‖v restricted to group g's columns‖².
    double grad_norm() {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::grad_norm";
        ::torch::NoGradGuard no_grad;
        double sum = 0;
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const auto& params = param_groups_[g].params();
            for (std::size_t i = 0; i < params.size(); ++i) {
                const auto shape = parameter_matrix_of(params[i], options_of(g).nd());
                if (shape.rows * shape.cols == 0) continue;
                detail::registered_parameter r;
                r.group = static_cast<std::int64_t>(g);
                r.index = static_cast<std::int64_t>(i);
                r.is_double = params[i].scalar_type() == at::kDouble;
                r.rows = shape.rows;
                r.cols = shape.cols;
                r.gradient_name = "param group " + std::to_string(g) + " parameter " + std::to_string(i) + " gradient";
                sum += detail::with_dtype(r.is_double, [&]<class T>(std::type_identity<T>) {
                    detail::gradient_input<T> grad;
                    if (!detail::read_gradient(grad, params[i], r, slot_of(params[i]), fn)) return 0.0;
                    return detail::dtype_engine<T>::norm2(backend<T>().get(), grad);
                });
            }
        }
        return std::sqrt(sum);
    }

    /// Scales every gradient (dense and factored) by max_norm / (norm + 1e-6) when that is below 1,
    /// as torch::nn::utils::clip_grad_norm_ does, and returns the norm before clipping. A
    /// non-finite norm changes nothing (the next step will be skipped). Throws for a max_norm that
    /// is not finite and > 0.
    double clip_grad_norm(double max_norm) {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::clip_grad_norm";
        velora::detail::require(std::isfinite(max_norm) && max_norm > 0, fn, "argument 'max_norm' must be finite and > 0, got ", max_norm);
        const double norm = grad_norm();
        if (!std::isfinite(norm)) return norm;
        const double coef = max_norm / (norm + 1e-6);
        if (coef >= 1) return norm;
        ::torch::NoGradGuard no_grad;
        for (auto& group : param_groups_)
            for (auto& p : group.params())
                if (p.grad().defined()) p.mutable_grad().mul_(coef);
        for (auto& [key, a] : slots_) a.slot->scale_by(coef);
        return norm;
    }

    /// The key of torch's state() map: libtorch 1.x keys it by the parameter's TensorImpl address
    /// written as a string (c10::guts::to_string), 2.x by the address itself.
    using state_key_type = std::remove_cvref_t<decltype(std::declval<const ::torch::optim::Optimizer&>().state())>::key_type;
    /// The key under which state() holds `param`'s entry, as torch's own optimizers key it.
    [[nodiscard]] static state_key_type state_key(const at::Tensor& param) { return state_key_of(param.unsafeGetTensorImpl()); }

    /// `param`'s optimizer state as numbers (adarank::low_rank_adamw::layer_state: rank, refreshes,
    /// state bytes, ...). Throws for a tensor that is not a registered parameter (a group
    /// registers its parameters at its first step).
    [[nodiscard]] adarank::layer_info layer_state(const at::Tensor& param) const {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::layer_state";
        const detail::registered_parameter* r = find(param);
        if (r == nullptr)
            velora::detail::fail(fn, "argument 'param' (", detail::describe(param),
                                 ") is not a registered parameter (a group registers its parameters when it first steps)");
        if (r->id < 0) return adarank::layer_info{};
        const group_engine& e = engines_[static_cast<std::size_t>(r->group)];
        return detail::with_dtype(r->is_double, [&]<class T>(std::type_identity<T>) { return e.template engine<T>()->optimizer().layer_state(r->id); });
    }
    [[deprecated("renamed layer_state")]] [[nodiscard]] adarank::layer_info info(const at::Tensor& param) const { return layer_state(param); }

    /// A copy of the subspace basis of a low-rank `param`: rank×len, orthonormal rows, in the
    /// parameter's dtype (len = the weight's rows when info(param).side is left, its columns when
    /// right; 0×len before its first step). A basis stored quantised (option `basis` int8/int4)
    /// is returned decoded, Q = code·scale, the values the steps project with (its rows are then
    /// orthonormal only within the format's error, adarank/basis_format.hpp). Throws for a
    /// parameter that is not registered or is optimised densely.
    [[nodiscard]] at::Tensor basis(const at::Tensor& param) const {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::basis";
        const detail::registered_parameter& r = low_rank_parameter(param, fn);
        const group_engine& e = engines_[static_cast<std::size_t>(r.group)];
        return detail::with_dtype(r.is_double, [&]<class T>(std::type_identity<T>) {
            auto& opt = e.template engine<T>()->optimizer();
            const adarank::layer_info info = opt.layer_state(r.id);
            const index_t len = info.side == adarank::projection_side::left ? info.rows : info.cols;
            at::Tensor out = at::empty({info.rank, len}, param.options().dtype(c10::CppTypeToScalarType<T>::value).requires_grad(false));
            T* dst = out.data_ptr<T>();
            if (opt.config().basis != adarank::basis_format::float32) {
                // No float basis is held: decode it (basis_values, which allocates).
                const std::vector<T> q = opt.basis_values(r.id);
                std::copy(q.begin(), q.end(), dst);
                return out;
            }
            const const_matrix_view<T> b = opt.basis(r.id);
            for (index_t i = 0; i < b.rows; ++i) std::copy_n(b.row(i), b.cols, dst + i * b.cols);
            return out;
        });
    }

    /// Installs `basis` (rank×len as basis() returns it, orthonormal rows, the parameter's dtype,
    /// on the CPU) as the subspace of a low-rank `param`: the library's set_basis, the moments
    /// transported by the group's policy as a refresh would (they are zero before the first step),
    /// the refresh schedule counting from here. Registers the groups first, as a step would, so it
    /// may precede the first step (which then keeps this basis). Throws std::invalid_argument,
    /// nothing changed, for a wrong shape, dtype or device, a non-finite entry or rows that are not
    /// orthonormal; returns status::overflow (nothing changed) when the transported moments would
    /// not be finite.
    velora::status set_basis(const at::Tensor& param, const at::Tensor& basis) {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::set_basis";
        ::torch::NoGradGuard no_grad;
        prepare(fn);
        const detail::registered_parameter& r = low_rank_parameter(param, fn);
        if (!basis.defined() || basis.dim() != 2 || basis.scalar_type() != (r.is_double ? at::kDouble : at::kFloat) || !basis.device().is_cpu())
            velora::detail::fail(fn, "argument 'basis' (", detail::describe(basis), ") must be a 2-D CPU tensor of the parameter's dtype (float32 for a bfloat16 parameter)");
        group_engine& e = engines_[static_cast<std::size_t>(r.group)];
        const at::Tensor dense = basis.contiguous();
        return detail::with_dtype(r.is_double, [&]<class T>(std::type_identity<T>) {
            const const_matrix_view<T> b(dense.data_ptr<T>(), dense.size(0), dense.size(1));
            return e.template engine<T>()->optimizer().set_basis(r.id, b);
        });
    }

    /// Bytes of optimizer state held (bases and moments of every group), and what torch AdamW
    /// would hold for the same registered parameters (two moments each).
    [[nodiscard]] std::size_t state_bytes() const {
        std::size_t sum = 0;
        for (const auto& e : engines_) e.for_each_engine([&](const auto& engine) { sum += engine.optimizer().state_bytes(); });
        return sum;
    }
    [[nodiscard]] std::size_t adamw_state_bytes() const {
        std::size_t sum = 0;
        for (const auto& e : engines_)
            for (const auto& r : e.params) sum += static_cast<std::size_t>(2 * r.rows * r.cols) * (r.is_double ? 8 : r.is_bf16 ? 2 : 4);   // torch's moments take the parameter's dtype
        return sum;
    }
    /// Bytes of the library's workspaces over every group and dtype (what they hold now; a step
    /// between refreshes does not grow them).
    [[nodiscard]] std::size_t workspace_bytes() const {
        std::size_t sum = 0;
        for (const auto& e : engines_) e.for_each_engine([&](const auto& engine) { sum += engine.optimizer().workspace_bytes(); });
        return sum;
    }

    // ------------------------------------------------------------------ serialization
    /// Format 2: per group its parameters' shapes and dtypes, its options (options_format.hpp),
    /// whether it was registered, and each dtype engine's library state blob.
    void save(::torch::serialize::OutputArchive& archive) const override {
        archive.write("velora/format", c10::IValue(std::int64_t{format_version}));
        archive.write("velora/skipped_steps", c10::IValue(static_cast<std::int64_t>(skipped_)));
        archive.write("param_groups/size", c10::IValue(static_cast<std::int64_t>(param_groups_.size())));
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            ::torch::serialize::OutputArchive group(archive.compilation_unit());
            const auto& params = param_groups_[g].params();
            group.write("params/size", c10::IValue(static_cast<std::int64_t>(params.size())));
            for (std::size_t i = 0; i < params.size(); ++i) {
                group.write("params/" + std::to_string(i) + "/sizes", c10::IValue(params[i].sizes().vec()));
                group.write("params/" + std::to_string(i) + "/dtype", c10::IValue(static_cast<std::int64_t>(params[i].scalar_type())));
            }
            ::torch::serialize::OutputArchive options(archive.compilation_unit());
            options_of(g).serialize(options);
            group.write("options", options);
            const bool registered_group = g < engines_.size() && engines_[g].registered;
            group.write("registered", c10::IValue(registered_group));
            if (registered_group) {
                const group_engine& e = engines_[g];
                if (e.f32) detail::write_blob(group, blob_key<float>, e.f32->optimizer().save_state());
                if (e.f64) detail::write_blob(group, blob_key<double>, e.f64->optimizer().save_state());
            }
            archive.write("param_groups/" + std::to_string(g), group);
        }
    }

    /// Restores a state saved by save() (format 2, or format 1 of earlier versions) into an
    /// optimizer whose groups hold parameters of the same shapes and dtypes in the same order.
    /// Restores every group's options (lr included) and each parameter's state. Throws
    /// velora::state_format_error (a std::invalid_argument) naming the group, the parameter and
    /// the field, and changes nothing, when the archive does not fit or holds options the
    /// constructor would refuse.
    void load(::torch::serialize::InputArchive& archive) override {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::load";
        const std::int64_t format = detail::read_int(archive, "velora/format", fn);
        if (format < 1 || format > format_version) detail::fail_format(fn, "the archive has format ", format, "; this build reads 1..", format_version);
        const std::int64_t skipped = detail::read_int(archive, "velora/skipped_steps", fn);
        const std::int64_t groups = detail::read_int(archive, "param_groups/size", fn);
        if (groups != static_cast<std::int64_t>(param_groups_.size()))
            detail::fail_format(fn, "the archive has ", groups, " param groups but this optimizer has ", param_groups_.size());
        std::vector<group_engine> engines(param_groups_.size());
        std::vector<AdaRankGradAdamWOptions> options(param_groups_.size());
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            ::torch::serialize::InputArchive group;
            if (!archive.try_read("param_groups/" + std::to_string(g), group)) detail::fail_format(fn, "the archive has no param group ", g);
            check_saved_parameters(group, g, fn);
            ::torch::serialize::InputArchive opts;
            if (!group.try_read("options", opts)) detail::fail_format(fn, "param group ", g, " has no options in the archive");
            options[g].serialize(opts);   // format 2's blob, or format 1's keys
            detail::in_group<velora::state_format_error>(g, fn, [&] { detail::check_options(options[g].stored(), fn); });
            c10::IValue registered_group;
            if (!group.try_read("registered", registered_group) || !registered_group.isBool())
                detail::fail_format(fn, "param group ", g, " has no 'registered' flag in the archive");
            if (!registered_group.toBool()) continue;
            engines[g] = build(g, options[g], fn);
            load_blob(group, engines[g].f32.get(), g, fn);
            load_blob(group, engines[g].f64.get(), g, fn);
        }
        // Commit: nothing above changed this optimizer.
        engines_ = std::move(engines);
        for (std::size_t g = 0; g < param_groups_.size(); ++g) param_groups_[g].set_options(static_cast<const ::torch::optim::OptimizerOptions&>(options[g]).clone());
        registered_changed();
        skipped_ = static_cast<std::uint64_t>(skipped);
    }

private:
    using group_engine = detail::group_engine;
    static constexpr std::int64_t format_version = 2;   // 2: the options as the library's configuration block (1: a key per option)
    template <class T>
    static constexpr const char* blob_key = std::is_same_v<T, float> ? "state/float32" : "state/float64";

    struct attached {
        at::Tensor weight;
        std::shared_ptr<factored_gradient_accumulator> slot;
    };

    const AdaRankGradAdamWOptions& options_of(std::size_t g) const {
        const auto* o = dynamic_cast<const AdaRankGradAdamWOptions*>(&param_groups_[g].options());
        if (o == nullptr)
            velora::detail::fail("velora::torch::AdaRankGradAdamW", "param group ", g, " has options of another optimizer; pass AdaRankGradAdamWOptions");
        return *o;
    }

    const factored_gradient_accumulator* slot_of(const at::Tensor& p) const {
        const auto it = slots_.find(p.unsafeGetTensorImpl());
        return it == slots_.end() ? nullptr : it->second.slot.get();
    }

    template <class T>
    threads_following<T>& backend() {
        return backends().get<T>();
    }
    detail::dtype_backends backends() { return {b32_.get(), b64_.get()}; }

    // Group g's engines for options `o`, with its parameters registered in order.
    group_engine build(std::size_t g, const AdaRankGradAdamWOptions& o, const char* fn) {
        return group_engine::build(g, param_groups_[g].params(), o.stored(), backends(), [&](const at::Tensor& p) { return slot_of(p); }, fn);
    }

    // Before a step: every group registered (at its first step), its options unchanged but for
    // lr, its learning rate one its configuration accepts, its parameters the ones registered.
    // Throws before anything changes.
    void prepare(const char* fn) {
        bool registered = false, hyper_changed = false;
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const AdaRankGradAdamWOptions& o = options_of(g);
            const double lr = o.get_lr();
            if (!(std::isfinite(lr) && lr >= 0)) velora::detail::fail(fn, "param group ", g, " has lr = ", lr, "; it must be finite and >= 0");
            if (g >= engines_.size()) engines_.resize(g + 1);
            group_engine& e = engines_[g];
            if (!e.registered) {
                e = build(g, o, fn);
                registered = true;
                continue;
            }
            const detail::stored_options now = o.stored();
            e.check_unchanged(g, now, fn);
            // A β, ε or weight-decay schedule: checked now, applied once every group passed.
            if (e.adam_hyper_changed(now)) {
                e.check_adam_hyper(g, now, lr, fn);
                hyper_changed = true;
            }
            // The library's rule for a learning rate (set_learning_rate's: also lr·wd < 1 under the
            // torch convention), applied to every group before any group steps.
            detail::in_group(g, fn, [&] { adarank::check_learning_rate(lr, now.config.adam, fn, "option lr"); });
            const auto& params = param_groups_[g].params();
            e.check_registered(g, params, fn);
            for (std::size_t i = e.params.size(); i < params.size(); ++i) {
                e.add(params[i], g, i, backends(), slot_of(params[i]), fn);
                registered = true;
            }
        }
        if (hyper_changed)
            for (std::size_t g = 0; g < engines_.size(); ++g) {
                const detail::stored_options now = options_of(g).stored();
                if (engines_[g].registered && engines_[g].adam_hyper_changed(now)) engines_[g].apply_adam_hyper(now);
            }
        if (registered) registered_changed();
    }

    // An archive's group holds parameters of this group's shapes and dtypes.
    void check_saved_parameters(::torch::serialize::InputArchive& group, std::size_t g, const char* fn) const {
        const auto& params = param_groups_[g].params();
        const std::int64_t count = detail::read_int(group, "params/size", fn);
        if (count != static_cast<std::int64_t>(params.size()))
            detail::fail_format(fn, "param group ", g, " has ", count, " parameters in the archive but ", params.size(), " here");
        for (std::size_t i = 0; i < params.size(); ++i) {
            c10::IValue sizes;
            if (!group.try_read("params/" + std::to_string(i) + "/sizes", sizes) || !sizes.isIntList())
                detail::fail_format(fn, "param group ", g, " parameter ", i, " has no sizes in the archive");
            const std::vector<std::int64_t> saved = sizes.toIntVector();
            const auto dtype = static_cast<c10::ScalarType>(detail::read_int(group, "params/" + std::to_string(i) + "/dtype", fn));
            if (saved != params[i].sizes().vec() || dtype != params[i].scalar_type())
                detail::fail_format(fn, "param group ", g, " parameter ", i, " was saved with shape ", detail::bracketed(saved), " and dtype ", dtype,
                                    " but is ", detail::describe(params[i]));
        }
    }

    template <class T>
    static void load_blob(::torch::serialize::InputArchive& group, detail::dtype_engine<T>* engine, std::size_t g, const char* fn) {
        const std::optional<at::Tensor> blob = detail::read_blob(group, blob_key<T>, fn);
        if (blob.has_value() != (engine != nullptr))
            detail::fail_format(fn, "param group ", g, blob ? " has " : " lacks ", "'", blob_key<T>, "' in the archive but ", blob ? "has no" : "has",
                                " parameters of that dtype here");
        if (blob) detail::in_group<velora::state_format_error>(g, fn, [&] { engine->optimizer().load_state(detail::bytes_of(*blob)); });
    }

    std::optional<std::pair<std::size_t, std::size_t>> position_of(const at::Tensor& t) const {
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const auto& params = param_groups_[g].params();
            for (std::size_t i = 0; i < params.size(); ++i)
                if (params[i].unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return std::make_pair(g, i);
        }
        return std::nullopt;
    }

    const detail::registered_parameter& low_rank_parameter(const at::Tensor& param, const char* fn) const {
        const detail::registered_parameter* r = find(param);
        if (r == nullptr)
            velora::detail::fail(fn, "argument 'param' (", detail::describe(param),
                                 ") is not a registered parameter (a group registers its parameters when it first steps)");
        const bool low_rank = r->id >= 0 && detail::with_dtype(r->is_double, [&]<class T>(std::type_identity<T>) {
            return engines_[static_cast<std::size_t>(r->group)].template engine<T>()->optimizer().layer_state(r->id).low_rank;
        });
        if (!low_rank) velora::detail::fail(fn, "argument 'param' (", detail::describe(param), ") is optimised densely; it has no basis");
        return *r;
    }

    const detail::registered_parameter* find(const at::Tensor& t) const {
        if (!t.defined()) return nullptr;
        for (const auto& e : engines_)
            for (const auto& r : e.params)
                if (r.key == t.unsafeGetTensorImpl()) return &r;
        return nullptr;
    }

    template <class Key = state_key_type>   // a template, so that the branch not taken is discarded
    static Key state_key_of(at::TensorImpl* impl) {
        if constexpr (std::is_same_v<Key, std::string>) {
            std::ostringstream s;   // c10::guts::to_string of a pointer (libtorch 1.x; gone in 2.x)
            s << static_cast<const void*>(impl);
            return s.str();
        } else {
            return impl;
        }
    }

    // After parameters were registered: torch's state() (one entry per registered parameter, keyed
    // as torch keys it) and the report's room for an event per parameter (a step then does not
    // allocate for its events).
    void registered_changed() {
        state_.clear();
        std::size_t count = 0;
        for (const auto& e : engines_) {
            for (const auto& r : e.params) {
                auto s = std::make_unique<AdaRankGradAdamWParamState>();
                s->group(r.group).index(r.index).rows(r.rows).cols(r.cols);
                if (r.id >= 0)
                    s->low_rank(detail::with_dtype(r.is_double, [&]<class T>(std::type_identity<T>) { return e.template engine<T>()->optimizer().layer_state(r.id).low_rank; }));
                state_[state_key_of(r.key)] = std::move(s);
                ++count;
            }
        }
        last_.events.reserve(count);
    }

    // Events in parameter order (each engine reports its own parameters in order).
    static void in_parameter_order(std::vector<step_report::event>& events) {
        std::sort(events.begin(), events.end(), [](const step_report::event& a, const step_report::event& b) {
            return a.group != b.group ? a.group < b.group : a.index < b.index;
        });
    }

    std::unique_ptr<threads_following<float>> b32_;
    std::unique_ptr<threads_following<double>> b64_;
    std::vector<group_engine> engines_;
    std::unordered_map<at::TensorImpl*, attached> slots_;
    std::shared_ptr<dynamic_communicator> comm_;
    step_report last_;
    std::uint64_t skipped_ = 0;
};

} // namespace velora::torch
