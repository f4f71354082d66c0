#pragma once
/// \file
/// `AdaRankGradAdamW`: adarank::low_rank_adamw as a torch::optim::Optimizer (docs/torch.md).
///
/// - Param groups with per-group options (lr, betas, eps, weight decay, the AdamW convention
///   (adarank::adam_convention::torch: dense parameters match torch::optim::AdamW), rank, refresh and
///   transport policies, scale α, side, randomized-SVD settings, seed, parameter kind, and what
///   happens to >2-D parameters). Each group runs its own low_rank_adamw per parameter dtype
///   (float32, float64), built from the group's options when the group first steps; the
///   learning rate is read from the group at every step (so torch's LR schedulers work), every
///   other option is fixed from then on (changing one throws at the next step, naming it).
/// - State is keyed by the parameter tensor (its TensorImpl, as torch's optimizers key
///   state()): each registered parameter has an entry in state() and info(param) reports its
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
///   the options of every group and each low_rank_adamw's state blob (a uint8 tensor). A
///   resumed run continues bit-identically at any thread count.
/// - Threads: every step reads at::get_num_threads() on the calling thread.
#include <ATen/ATen.h>
#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <limits>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <adarank/adarank.hpp>
#include <velora/core/error.hpp>

#include "backend.hpp"
#include "factored.hpp"
#include "linear.hpp"
#include "view.hpp"

namespace velora::torch {

/// How a parameter of three or more dimensions [O, ...] is optimised. Either way it is seen as
/// the O × (Π rest) matrix (a view of its memory); `flatten` lets it be low-rank like a 2-D
/// weight (per the group's `kind`), `dense` always gives it dense AdamW.
enum class higher_dims : std::uint8_t { flatten = 0, dense = 1 };

struct AdaRankGradAdamWOptions : public ::torch::optim::OptimizerCloneableOptions<AdaRankGradAdamWOptions> {
    using betas_t = std::tuple<double, double>;

    AdaRankGradAdamWOptions(double lr = 1e-3) : lr_(lr) {}   // NOLINT: implicit, as torch's options

    TORCH_ARG(double, lr) = 1e-3;
    TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
    TORCH_ARG(double, eps) = 1e-6;
    TORCH_ARG(double, weight_decay) = 0.0;
    /// Where ε and the weight decay enter the update: the library's default (GaLore's) or
    /// torch.optim.AdamW's, under which dense parameters match torch::optim::AdamW to rounding.
    TORCH_ARG(adarank::adam_convention, convention) = adarank::adam_convention::galore;
    TORCH_ARG(double, scale) = 0.25;   ///< α, low-rank parameters only
    TORCH_ARG(adarank::rank_policy, rank) = adarank::rank_policy::adaptive(0.05, 1, 128);
    TORCH_ARG(adarank::refresh_policy, refresh) = adarank::refresh_policy::converged(0.5, 50, 200);
    TORCH_ARG(adarank::transport_policy, transport) = adarank::transport_policy::squared_rotation;
    TORCH_ARG(adarank::side_policy, side) = adarank::side_policy::standard;
    TORCH_ARG(adarank::rsvd_config, rsvd) = {};
    TORCH_ARG(std::uint64_t, seed) = 0x5eedULL;
    TORCH_ARG(adarank::param_kind, kind) = adarank::param_kind::automatic;   ///< 2-D (and flattened) parameters
    TORCH_ARG(higher_dims, nd) = higher_dims::flatten;

public:
    double get_lr() const override { return lr(); }
    void set_lr(const double value) override { lr(value); }

    /// The library configuration these options describe.
    [[nodiscard]] adarank::optimizer_config config() const {
        adarank::optimizer_config c;
        c.adam.lr = lr();
        c.adam.beta1 = std::get<0>(betas());
        c.adam.beta2 = std::get<1>(betas());
        c.adam.eps = eps();
        c.adam.weight_decay = weight_decay();
        c.adam.convention = convention();
        c.scale = scale();
        c.side = side();
        c.rank = rank();
        c.refresh = refresh();
        c.transport = transport();
        c.rsvd = rsvd();
        c.seed = seed();
        return c;
    }
    /// Sets every option a library configuration has (kind and nd are kept).
    AdaRankGradAdamWOptions& config(const adarank::optimizer_config& c) {
        lr(c.adam.lr);
        betas(std::make_tuple(c.adam.beta1, c.adam.beta2));
        eps(c.adam.eps);
        weight_decay(c.adam.weight_decay);
        convention(c.adam.convention);
        scale(c.scale);
        side(c.side);
        rank(c.rank);
        refresh(c.refresh);
        transport(c.transport);
        rsvd(c.rsvd);
        seed(c.seed);
        return *this;
    }
    /// GaLore as options (adarank::optimizer_config::galore).
    static AdaRankGradAdamWOptions galore(std::int64_t rank, std::int64_t interval = 200, double scale = 0.25) {
        AdaRankGradAdamWOptions o;
        o.config(adarank::optimizer_config::galore(rank, interval, scale));
        return o;
    }

    void serialize(::torch::serialize::OutputArchive& archive) const override {
        const adarank::optimizer_config c = config();
        put(archive, "lr", c.adam.lr);
        put(archive, "beta1", c.adam.beta1);
        put(archive, "beta2", c.adam.beta2);
        put(archive, "eps", c.adam.eps);
        put(archive, "weight_decay", c.adam.weight_decay);
        put(archive, "convention", static_cast<std::int64_t>(c.adam.convention));
        put(archive, "scale", c.scale);
        put(archive, "side", static_cast<std::int64_t>(c.side));
        put(archive, "rank/type", static_cast<std::int64_t>(c.rank.type));
        put(archive, "rank/r_min", static_cast<std::int64_t>(c.rank.r_min));
        put(archive, "rank/r_max", static_cast<std::int64_t>(c.rank.r_max));
        put(archive, "rank/xi", c.rank.xi);
        put(archive, "refresh/type", static_cast<std::int64_t>(c.refresh.type));
        put(archive, "refresh/threshold", c.refresh.threshold);
        put(archive, "refresh/min_interval", static_cast<std::int64_t>(c.refresh.min_interval));
        put(archive, "refresh/max_interval", static_cast<std::int64_t>(c.refresh.max_interval));
        put(archive, "transport", static_cast<std::int64_t>(c.transport));
        put(archive, "rsvd/oversampling", static_cast<std::int64_t>(c.rsvd.oversampling));
        put(archive, "rsvd/power_iterations", static_cast<std::int64_t>(c.rsvd.power_iterations));
        put(archive, "rsvd/warm_power_iterations", static_cast<std::int64_t>(c.rsvd.warm_power_iterations));
        put(archive, "rsvd/warm_start", static_cast<std::int64_t>(c.rsvd.warm_start));
        put(archive, "rsvd/exact_fraction", c.rsvd.exact_fraction);
        put(archive, "seed", std::bit_cast<std::int64_t>(c.seed));
        put(archive, "kind", static_cast<std::int64_t>(kind()));
        put(archive, "nd", static_cast<std::int64_t>(nd()));
    }

    void serialize(::torch::serialize::InputArchive& archive) override {
        adarank::optimizer_config c;
        c.adam.lr = get_double(archive, "lr");
        c.adam.beta1 = get_double(archive, "beta1");
        c.adam.beta2 = get_double(archive, "beta2");
        c.adam.eps = get_double(archive, "eps");
        c.adam.weight_decay = get_double(archive, "weight_decay");
        c.adam.convention = static_cast<adarank::adam_convention>(get_int(archive, "convention"));
        c.scale = get_double(archive, "scale");
        c.side = static_cast<adarank::side_policy>(get_int(archive, "side"));
        c.rank.type = static_cast<adarank::rank_policy::kind>(get_int(archive, "rank/type"));
        c.rank.r_min = get_int(archive, "rank/r_min");
        c.rank.r_max = get_int(archive, "rank/r_max");
        c.rank.xi = get_double(archive, "rank/xi");
        c.refresh.type = static_cast<adarank::refresh_policy::kind>(get_int(archive, "refresh/type"));
        c.refresh.threshold = get_double(archive, "refresh/threshold");
        c.refresh.min_interval = get_int(archive, "refresh/min_interval");
        c.refresh.max_interval = get_int(archive, "refresh/max_interval");
        c.transport = static_cast<adarank::transport_policy>(get_int(archive, "transport"));
        c.rsvd.oversampling = get_int(archive, "rsvd/oversampling");
        c.rsvd.power_iterations = static_cast<int>(get_int(archive, "rsvd/power_iterations"));
        c.rsvd.warm_power_iterations = static_cast<int>(get_int(archive, "rsvd/warm_power_iterations"));
        c.rsvd.warm_start = get_int(archive, "rsvd/warm_start") != 0;
        c.rsvd.exact_fraction = get_double(archive, "rsvd/exact_fraction");
        c.seed = std::bit_cast<std::uint64_t>(get_int(archive, "seed"));
        const auto k = get_int(archive, "kind"), n = get_int(archive, "nd");
        velora::detail::require(k >= 0 && k <= 2 && n >= 0 && n <= 1, "velora::torch::AdaRankGradAdamWOptions::serialize",
                                "the archive has the invalid kind ", k, " or nd ", n);
        // The library validates the rest when the optimizer is built from these options.
        config(c);
        kind(static_cast<adarank::param_kind>(k));
        nd(static_cast<higher_dims>(n));
    }

private:
    static void put(::torch::serialize::OutputArchive& a, const std::string& key, double x) { a.write(key, c10::IValue(x)); }
    static void put(::torch::serialize::OutputArchive& a, const std::string& key, std::int64_t x) { a.write(key, c10::IValue(x)); }
    static c10::IValue get(::torch::serialize::InputArchive& a, const std::string& key, bool want_double) {
        c10::IValue v;
        const bool found = a.try_read(key, v);
        if (!found || (want_double ? !v.isDouble() : !v.isInt()))
            velora::detail::fail_as<velora::state_format_error>("velora::torch::AdaRankGradAdamWOptions::serialize", "the archive has no ",
                                                                want_double ? "double" : "integer", " option '", key, "'");
        return v;
    }
    static double get_double(::torch::serialize::InputArchive& a, const std::string& key) { return get(a, key, true).toDouble(); }
    static std::int64_t get_int(::torch::serialize::InputArchive& a, const std::string& key) { return get(a, key, false).toInt(); }
};

/// What torch's state() holds for a registered parameter (a description; the moments and the
/// basis live in the group's low_rank_adamw and are reported by info()).
struct AdaRankGradAdamWParamState : public ::torch::optim::OptimizerCloneableParamState<AdaRankGradAdamWParamState> {
    TORCH_ARG(std::int64_t, group) = 0;
    TORCH_ARG(std::int64_t, index) = 0;   ///< position in the group
    TORCH_ARG(std::int64_t, rows) = 0;
    TORCH_ARG(std::int64_t, cols) = 0;
    TORCH_ARG(bool, low_rank) = false;
};

/// The outcome of one step.
struct step_report {
    /// ok; degenerate_input (some parameter had an all-zero gradient where a subspace was due, it
    /// stepped with the documented fallback); non_finite_input (a gradient held NaN/Inf: the whole
    /// step was skipped, nothing changed); overflow (some parameters were left unchanged, see events).
    velora::status status = velora::status::ok;
    bool skipped = false;
    std::int64_t stepped = 0;   ///< parameters updated
    struct event {
        std::int64_t group = 0, index = 0;
        velora::status status = velora::status::ok;
    };
    std::vector<event> events;   ///< every parameter whose status was not ok
};

class AdaRankGradAdamW : public ::torch::optim::Optimizer {
public:
    explicit AdaRankGradAdamW(std::vector<::torch::optim::OptimizerParamGroup> param_groups, AdaRankGradAdamWOptions defaults = {})
        : Optimizer(std::vector<::torch::optim::OptimizerParamGroup>{}, std::make_unique<AdaRankGradAdamWOptions>(defaults)),
          b32_(std::make_unique<threads_following<float>>()), b64_(std::make_unique<threads_following<double>>()) {
        for (const auto& group : param_groups) add_param_group(group);   // this class's, which keeps the group's options
        // Validate every group's options now, so that a bad one fails at construction, as torch's do.
        for (std::size_t g = 0; g < param_groups_.size(); ++g) checked_config(g, "velora::torch::AdaRankGradAdamW::AdaRankGradAdamW");
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
    /// negative or non-finite lr, a parameter replaced or of an unsupported dtype, a gradient of
    /// the wrong shape or on another device.
    step_report step_checked() {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::step";
        ::torch::NoGradGuard no_grad;
        prepare(fn);
        auto& b32 = b32_->get();
        auto& b64 = b64_->get();
        std::vector<work> items;
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const auto& params = param_groups_[g].params();
            for (std::size_t i = 0; i < params.size(); ++i) {
                const param_entry& r = engines_[g].params[i];
                if (r.id < 0) continue;   // empty parameter
                work w;
                if (gather(params[i], r, w, fn)) items.push_back(std::move(w));
            }
        }
        step_report report;
        // The whole-step check: every gradient, before anything changes.
        for (const work& w : items) {
            const bool finite = w.r->is_double ? finite_gradient(b64, w) : finite_gradient(b32, w);
            if (!finite) report.events.push_back({w.r->group, w.r->index, velora::status::non_finite_input});
        }
        if (!report.events.empty()) {
            report.status = velora::status::non_finite_input;
            report.skipped = true;
            ++skipped_;
            last_ = report;
            return report;
        }
        for (std::size_t g = 0; g < engines_.size(); ++g) {
            const double lr = param_groups_[g].options().get_lr();
            if (engines_[g].f32) engines_[g].f32->set_learning_rate(lr);
            if (engines_[g].f64) engines_[g].f64->set_learning_rate(lr);
        }
        bool degenerate = false, overflow = false;
        for (work& w : items) {
            const velora::status s = w.r->is_double ? apply(b64, *engines_[static_cast<std::size_t>(w.r->group)].f64, w)
                                                    : apply(b32, *engines_[static_cast<std::size_t>(w.r->group)].f32, w);
            if (s == velora::status::ok || s == velora::status::degenerate_input) {
                ++report.stepped;
                if (w.weight_copy.defined()) w.param.copy_(w.weight_copy.view(w.param.sizes()));   // copy_ bumps the version
                else bump_version(w.param);
            }
            if (s != velora::status::ok) report.events.push_back({w.r->group, w.r->index, s});
            degenerate = degenerate || s == velora::status::degenerate_input;
            overflow = overflow || s == velora::status::overflow || s == velora::status::non_finite_input;
        }
        report.status = overflow ? velora::status::overflow : degenerate ? velora::status::degenerate_input : velora::status::ok;
        last_ = report;
        return report;
    }

    [[nodiscard]] const step_report& last_step() const noexcept { return last_; }
    /// Steps skipped by the whole-step finiteness check.
    [[nodiscard]] std::uint64_t skipped_steps() const noexcept { return skipped_; }

    /// Makes `layer` deliver its weight gradient to this optimizer in factored form (when the
    /// layer was built with factored_weight_grad(true)). The weight must be one of this
    /// optimizer's parameters, float32. Throws std::invalid_argument otherwise.
    void attach(const VeloraLinear& layer) { attach(layer->weight, layer->factored_grad()); }
    void attach(const at::Tensor& weight, std::shared_ptr<factored_weight_grad> slot) {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::attach";
        velora::detail::require(slot != nullptr, fn, "argument 'slot' is null");
        velora::detail::require(weight.defined() && weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.size(0) == slot->rows() &&
                                    weight.size(1) == slot->features(),
                                fn, "argument 'weight' (", detail::describe(weight), ") must be the float32 ", slot->rows(), "x", slot->features(),
                                " weight of the layer");
        velora::detail::require(position_of(weight).has_value(), fn, "argument 'weight' (", detail::describe(weight),
                                ") is not a parameter of this optimizer");
        auto [it, inserted] = slots_.try_emplace(weight.unsafeGetTensorImpl(), attached{weight, slot});
        if (!inserted) {
            if (it->second.slot == slot) return;
            it->second.slot->detach();
            it->second = attached{weight, slot};
        }
        slot->attach();
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
        auto& b32 = b32_->get();
        auto& b64 = b64_->get();
        double sum = 0;
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const auto& params = param_groups_[g].params();
            for (std::size_t i = 0; i < params.size(); ++i) {
                const auto shape = shape_of(params[i], options_of(g));
                if (shape.rows * shape.cols == 0) continue;
                param_entry r;
                r.group = static_cast<std::int64_t>(g);
                r.index = static_cast<std::int64_t>(i);
                r.is_double = params[i].scalar_type() == at::kDouble;
                r.rows = shape.rows;
                r.cols = shape.cols;
                work w;
                if (!gather(params[i], r, w, fn)) continue;
                sum += r.is_double ? norm2(b64, w) : norm2(b32, w);
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

    /// What the library reports about `param` (rank, refreshes, state bytes, ...). Throws for a
    /// tensor that is not a registered parameter (a group registers its parameters at its first step).
    [[nodiscard]] adarank::layer_info info(const at::Tensor& param) const {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::info";
        const param_entry* r = find(param);
        velora::detail::require(r != nullptr, fn, "argument 'param' (", detail::describe(param),
                                ") is not a registered parameter (a group registers its parameters when it first steps)");
        if (r->id < 0) {
            adarank::layer_info empty;
            return empty;
        }
        const auto& e = engines_[static_cast<std::size_t>(r->group)];
        return r->is_double ? e.f64->info(r->id) : e.f32->info(r->id);
    }

    /// Bytes of optimizer state held (bases and moments of every group), and what torch AdamW
    /// would hold for the same registered parameters (two moments each).
    [[nodiscard]] std::size_t state_bytes() const {
        std::size_t sum = 0;
        for (const auto& e : engines_) {
            if (e.f32) sum += e.f32->state_bytes();
            if (e.f64) sum += e.f64->state_bytes();
        }
        return sum;
    }
    [[nodiscard]] std::size_t adamw_state_bytes() const {
        std::size_t sum = 0;
        for (const auto& e : engines_)
            for (const auto& r : e.params) sum += static_cast<std::size_t>(2 * r.rows * r.cols) * (r.is_double ? 8 : 4);
        return sum;
    }

    // ------------------------------------------------------------------ serialization
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
                if (engines_[g].f32) group.write("state/float32", blob_tensor(engines_[g].f32->save_state()), /*is_buffer=*/true);
                if (engines_[g].f64) group.write("state/float64", blob_tensor(engines_[g].f64->save_state()), /*is_buffer=*/true);
            }
            archive.write("param_groups/" + std::to_string(g), group);
        }
    }

    /// Restores a state saved by save() into an optimizer whose groups hold parameters of the
    /// same shapes and dtypes in the same order. Restores every group's options (lr included)
    /// and each parameter's state. Throws velora::state_format_error (a std::invalid_argument)
    /// naming the group, the parameter and the field, and changes nothing, when the archive does
    /// not fit.
    void load(::torch::serialize::InputArchive& archive) override {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamW::load";
        const std::int64_t format = read_int(archive, "velora/format", fn);
        if (format != format_version) fail_format(fn, "the archive has format ", format, "; this build reads ", format_version);
        const std::int64_t skipped = read_int(archive, "velora/skipped_steps", fn);
        const std::int64_t groups = read_int(archive, "param_groups/size", fn);
        if (groups != static_cast<std::int64_t>(param_groups_.size()))
            fail_format(fn, "the archive has ", groups, " param groups but this optimizer has ", param_groups_.size());
        std::vector<group_engine> engines(param_groups_.size());
        std::vector<AdaRankGradAdamWOptions> options(param_groups_.size());
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            ::torch::serialize::InputArchive group;
            if (!archive.try_read("param_groups/" + std::to_string(g), group)) fail_format(fn, "the archive has no param group ", g);
            const auto& params = param_groups_[g].params();
            const std::int64_t count = read_int(group, "params/size", fn);
            if (count != static_cast<std::int64_t>(params.size()))
                fail_format(fn, "param group ", g, " has ", count, " parameters in the archive but ", params.size(), " here");
            for (std::size_t i = 0; i < params.size(); ++i) {
                c10::IValue sizes;
                if (!group.try_read("params/" + std::to_string(i) + "/sizes", sizes) || !sizes.isIntList())
                    fail_format(fn, "param group ", g, " parameter ", i, " has no sizes in the archive");
                const std::vector<std::int64_t> saved = sizes.toIntVector();
                const auto dtype = static_cast<c10::ScalarType>(read_int(group, "params/" + std::to_string(i) + "/dtype", fn));
                if (saved != params[i].sizes().vec() || dtype != params[i].scalar_type())
                    fail_format(fn, "param group ", g, " parameter ", i, " was saved with shape ", detail::bracketed(saved), " and dtype ", dtype,
                                " but is ", detail::describe(params[i]));
            }
            ::torch::serialize::InputArchive opts;
            if (!group.try_read("options", opts)) fail_format(fn, "param group ", g, " has no options in the archive");
            options[g].serialize(opts);
            c10::IValue registered_group;
            if (!group.try_read("registered", registered_group) || !registered_group.isBool())
                fail_format(fn, "param group ", g, " has no 'registered' flag in the archive");
            if (!registered_group.toBool()) continue;
            engines[g] = build(g, options[g], fn);
            load_blob(group, "state/float32", engines[g].f32.get(), g, fn);
            load_blob(group, "state/float64", engines[g].f64.get(), g, fn);
        }
        // Commit: nothing above changed this optimizer.
        engines_ = std::move(engines);
        for (std::size_t g = 0; g < param_groups_.size(); ++g) param_groups_[g].set_options(static_cast<const ::torch::optim::OptimizerOptions&>(options[g]).clone());
        rebuild_state_map();
        skipped_ = static_cast<std::uint64_t>(skipped);
    }

private:
    static constexpr std::int64_t format_version = 1;
    template <class T>
    using inner = adarank::low_rank_adamw<eigen_backend<T>>;

    struct param_entry {
        at::TensorImpl* key = nullptr;
        std::int64_t group = 0, index = 0;
        bool is_double = false;
        index_t id = -1;   // -1: empty parameter, nothing to optimise
        index_t rows = 0, cols = 0;
        std::vector<std::int64_t> sizes;
    };
    struct group_engine {
        bool registered = false;
        adarank::optimizer_config config;
        adarank::param_kind kind = adarank::param_kind::automatic;
        higher_dims nd = higher_dims::flatten;
        std::unique_ptr<inner<float>> f32;
        std::unique_ptr<inner<double>> f64;
        std::vector<param_entry> params;
    };
    struct attached {
        at::Tensor weight;
        std::shared_ptr<factored_weight_grad> slot;
    };
    // One parameter's step: its weight as a matrix (a view, or a contiguous copy written back)
    // and its gradient (a dense matrix, or a factored one).
    struct work {
        const param_entry* r = nullptr;
        at::Tensor param, weight_copy;
        std::optional<matrix_input<float>> g32;
        std::optional<matrix_input<double>> g64;
        factored_weight_grad::contents factored;
        index_t factored_subtoken = 0;
    };
    struct matrix_shape {
        index_t rows = 0, cols = 0;
        bool force_dense = false;
    };

    const AdaRankGradAdamWOptions& options_of(std::size_t g) const {
        const auto* o = dynamic_cast<const AdaRankGradAdamWOptions*>(&param_groups_[g].options());
        velora::detail::require(o != nullptr, "velora::torch::AdaRankGradAdamW", "param group ", g,
                                " has options of another optimizer; pass AdaRankGradAdamWOptions");
        return *o;
    }

    adarank::optimizer_config checked_config(std::size_t g, const char* fn) const {
        const AdaRankGradAdamWOptions& o = options_of(g);
        const adarank::optimizer_config c = o.config();
        try {
            adarank::validate(c, fn);
            velora::detail::require(static_cast<unsigned>(o.kind()) <= 2 && static_cast<unsigned>(o.nd()) <= 1, fn, "option kind or nd is invalid");
        } catch (const std::invalid_argument& e) {
            velora::detail::fail(fn, "param group ", g, ": ", e.what());
        }
        return c;
    }

    static matrix_shape shape_of(const at::Tensor& p, const AdaRankGradAdamWOptions& o) {
        matrix_shape s;
        if (p.dim() <= 1) {   // a scalar is 1x1, a vector 1xn: dense
            s.rows = 1;
            s.cols = p.numel();
            s.force_dense = true;
            return s;
        }
        s.rows = p.size(0);
        s.cols = s.rows == 0 ? 0 : p.numel() / s.rows;
        s.force_dense = p.dim() > 2 && o.nd() == higher_dims::dense;
        return s;
    }

    template <class T>
    static std::unique_ptr<inner<T>> make_inner(threads_following<T>& b, const adarank::optimizer_config& c, std::size_t g, const char* fn) {
        try {
            return std::make_unique<inner<T>>(b.current(), c);
        } catch (const std::invalid_argument& e) {
            velora::detail::fail(fn, "param group ", g, ": ", e.what());
        }
    }

    // A group's engines, built from its options, with every parameter registered in order.
    group_engine build(std::size_t g, const AdaRankGradAdamWOptions& o, const char* fn) {
        group_engine e;
        e.registered = true;
        e.config = o.config();
        e.kind = o.kind();
        e.nd = o.nd();
        try {
            adarank::validate(e.config, fn);
        } catch (const std::invalid_argument& err) {
            velora::detail::fail(fn, "param group ", g, ": ", err.what());
        }
        for (std::size_t i = 0; i < param_groups_[g].params().size(); ++i) register_param(e, g, i, o, fn);
        return e;
    }

    void register_param(group_engine& e, std::size_t g, std::size_t i, const AdaRankGradAdamWOptions& o, const char* fn) {
        const at::Tensor& p = param_groups_[g].params()[i];
        velora::detail::require(p.defined(), fn, "param group ", g, " parameter ", i, " is an undefined tensor");
        velora::detail::require(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble, fn, "param group ", g, " parameter ", i, " (",
                                detail::describe(p), ") must be float32 or float64 (the optimizer keeps full-precision weights)");
        velora::detail::require(p.device().is_cpu() && p.layout() == c10::kStrided, fn, "param group ", g, " parameter ", i, " (",
                                detail::describe(p), ") must be a dense CPU tensor");
        param_entry r;
        r.key = p.unsafeGetTensorImpl();
        r.group = static_cast<std::int64_t>(g);
        r.index = static_cast<std::int64_t>(i);
        r.is_double = p.scalar_type() == at::kDouble;
        r.sizes = p.sizes().vec();
        const matrix_shape s = shape_of(p, o);
        r.rows = s.rows;
        r.cols = s.cols;
        if (s.rows * s.cols > 0) {
            const adarank::param_kind kind = s.force_dense ? adarank::param_kind::dense : o.kind();
            if (r.is_double) {
                if (!e.f64) e.f64 = make_inner(*b64_, e.config, g, fn);
                r.id = e.f64->add_parameter(s.rows, s.cols, kind);
            } else {
                if (!e.f32) e.f32 = make_inner(*b32_, e.config, g, fn);
                r.id = e.f32->add_parameter(s.rows, s.cols, kind);
            }
        }
        e.params.push_back(std::move(r));
    }

    // Before a step: every group registered (at its first step), its options unchanged but for
    // lr, its parameters the ones registered. Throws before anything changes.
    void prepare(const char* fn) {
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const AdaRankGradAdamWOptions& o = options_of(g);
            const double lr = o.get_lr();
            velora::detail::require(std::isfinite(lr) && lr >= 0, fn, "param group ", g, " has lr = ", lr, "; it must be finite and >= 0");
            if (g >= engines_.size()) engines_.resize(g + 1);
            group_engine& e = engines_[g];
            if (!e.registered) {
                e = build(g, o, fn);
                rebuild_state_map();
                continue;
            }
            check_unchanged(g, e, o, fn);
            const auto& params = param_groups_[g].params();
            velora::detail::require(params.size() >= e.params.size(), fn, "param group ", g, " has ", params.size(), " parameters but ",
                                    e.params.size(), " were registered; removing parameters from a group is not supported");
            for (std::size_t i = 0; i < e.params.size(); ++i) {
                const param_entry& r = e.params[i];
                velora::detail::require(params[i].unsafeGetTensorImpl() == r.key && params[i].sizes().vec() == r.sizes &&
                                            params[i].scalar_type() == (r.is_double ? at::kDouble : at::kFloat),
                                        fn, "param group ", g, " parameter ", i, " (", detail::describe(params[i]),
                                        ") is not the tensor registered at the group's first step (shape ", detail::bracketed(r.sizes), ", ",
                                        r.is_double ? "Double" : "Float", "); replacing parameters or changing their dtype is not supported");
            }
            if (params.size() > e.params.size()) {
                for (std::size_t i = e.params.size(); i < params.size(); ++i) register_param(e, g, i, o, fn);
                rebuild_state_map();
            }
        }
    }

    static void check_unchanged(std::size_t g, const group_engine& e, const AdaRankGradAdamWOptions& o, const char* fn) {
        adarank::optimizer_config now = o.config();
        now.adam.lr = e.config.adam.lr;
        const char* what = nullptr;
        const adarank::optimizer_config& was = e.config;
        if (now.adam.beta1 != was.adam.beta1 || now.adam.beta2 != was.adam.beta2) what = "betas";
        else if (now.adam.eps != was.adam.eps) what = "eps";
        else if (now.adam.weight_decay != was.adam.weight_decay) what = "weight_decay";
        else if (now.adam.convention != was.adam.convention) what = "convention";
        else if (now.scale != was.scale) what = "scale";
        else if (!(now.rank == was.rank)) what = "rank";
        else if (!(now.refresh == was.refresh)) what = "refresh";
        else if (now.transport != was.transport) what = "transport";
        else if (now.side != was.side) what = "side";
        else if (!(now.rsvd == was.rsvd)) what = "rsvd";
        else if (now.seed != was.seed) what = "seed";
        else if (!(now == was)) what = "an option";
        else if (o.kind() != e.kind) what = "kind";
        else if (o.nd() != e.nd) what = "nd";
        if (what)
            velora::detail::fail(fn, "param group ", g, ": option ", what,
                                 " changed after the group's first step; only lr may change (the state belongs to the options it was made with)");
    }

    // The parameter's gradient, checked; false when it has none (no dense grad, nothing factored).
    bool gather(const at::Tensor& p, const param_entry& r, work& w, const char* fn) {
        const at::Tensor& grad = p.grad();
        factored_weight_grad::contents c;
        const auto slot = slots_.find(p.unsafeGetTensorImpl());
        if (slot != slots_.end()) c = slot->second.slot->get();
        if (!grad.defined() && c.empty()) return false;
        w.r = &r;
        w.param = p;
        const std::string where = "param group " + std::to_string(r.group) + " parameter " + std::to_string(r.index);
        if (grad.defined())
            velora::detail::require(grad.sizes() == p.sizes(), fn, where, ": its gradient (", detail::describe(grad),
                                    ") does not have the parameter's shape ", detail::bracketed(p.sizes()));
        at::Tensor dense;
        if (c.a.defined() && !grad.defined()) {
            w.factored = c;
            w.factored_subtoken = slot->second.slot->subtoken_size();
        } else {
            dense = grad;
            if (c.a.defined() || c.dense.defined()) {   // a weight used by the layer and elsewhere too (tying)
                const at::Tensor extra = c.dense.defined() ? c.dense : slot->second.slot->expand(c.a, c.v, c.scale);
                dense = grad.defined() ? grad.to(at::kFloat) + extra : extra;
            }
            const std::string name = where + " gradient";
            if (r.is_double) w.g64.emplace(dense, name, flatten::outputs_first, fn);
            else w.g32.emplace(dense, name, flatten::outputs_first, fn);
        }
        return true;
    }

    template <class T>
    bool finite_gradient(eigen_backend<T>& b, const work& w) {
        if (w.factored.a.defined()) {
            if constexpr (std::is_same_v<T, float>) return adarank::all_finite(b, factored_of(w));
            return false;
        }
        return adarank::all_finite(b, dense_of<T>(w));
    }

    template <class T>
    double norm2(eigen_backend<T>& b, const work& w) {
        if (w.factored.a.defined()) {
            if constexpr (std::is_same_v<T, float>) {
                typename eigen_backend<float>::template buffer<float> scratch;   // norm2 does not use it
                return adarank::factored_gradient_op<eigen_backend<float>>(b, factored_of(w), scratch).norm2();
            }
            return std::numeric_limits<double>::quiet_NaN();
        }
        return b.sum_of_squares(dense_of<T>(w));
    }

    template <class T>
    static const_matrix_view<T> dense_of(const work& w) {
        if constexpr (std::is_same_v<T, float>) return w.g32->view();
        else return w.g64->view();
    }

    static velora::factored_gradient<float> factored_of(const work& w) {
        const auto& c = w.factored;
        velora::factored_gradient<float> f;
        f.a = view_of<float>(c.a, "factored gradient A");
        f.v = c.v.data_ptr<float>();
        f.subtoken_size = w.factored_subtoken;
        f.features = w.r->cols;
        f.scale = static_cast<float>(c.scale);
        return f;
    }

    template <class T>
    velora::status apply(eigen_backend<T>&, inner<T>& opt, work& w) {
        matrix_view<T> weight;
        const detail::matrix_layout layout = detail::layout_of(w.param, flatten::outputs_first);
        if (layout.ld && !w.param.is_neg()) {
            weight = mutable_view_of<T>(w.param, "parameter", flatten::outputs_first);
        } else {   // a parameter whose memory is not a row-major matrix: step a copy, then write it back
            w.weight_copy = w.param.contiguous();
            weight = mutable_view_of<T>(w.weight_copy, "parameter", flatten::outputs_first);
        }
        if (w.factored.a.defined()) {
            if constexpr (std::is_same_v<T, float>) return opt.step(w.r->id, weight, factored_of(w));
            else velora::detail::fail("velora::torch::AdaRankGradAdamW::step", "a factored gradient for a float64 parameter");
        }
        return opt.step(w.r->id, weight, dense_of<T>(w));
    }

    std::optional<std::pair<std::size_t, std::size_t>> position_of(const at::Tensor& t) const {
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const auto& params = param_groups_[g].params();
            for (std::size_t i = 0; i < params.size(); ++i)
                if (params[i].unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return std::make_pair(g, i);
        }
        return std::nullopt;
    }

    const param_entry* find(const at::Tensor& t) const {
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

    // torch's state(): one entry per registered parameter, keyed as torch keys it.
    void rebuild_state_map() {
        state_.clear();
        for (const auto& e : engines_) {
            for (const auto& r : e.params) {
                auto s = std::make_unique<AdaRankGradAdamWParamState>();
                s->group(r.group).index(r.index).rows(r.rows).cols(r.cols);
                if (r.id >= 0) s->low_rank(r.is_double ? e.f64->info(r.id).low_rank : e.f32->info(r.id).low_rank);
                state_[state_key_of(r.key)] = std::move(s);
            }
        }
    }

    static at::Tensor blob_tensor(const std::vector<std::byte>& blob) {
        at::Tensor t = at::empty({static_cast<std::int64_t>(blob.size())}, at::kByte);
        std::memcpy(t.data_ptr(), blob.data(), blob.size());
        return t;
    }

    template <class T>
    static void load_blob(::torch::serialize::InputArchive& group, const std::string& key, inner<T>* opt, std::size_t g, const char* fn) {
        at::Tensor blob;
        const bool found = group.try_read(key, blob, /*is_buffer=*/true);
        if (found != (opt != nullptr))
            fail_format(fn, "param group ", g, found ? " has " : " lacks ", "'", key, "' in the archive but ", found ? "has no" : "has",
                        " parameters of that dtype here");
        if (!found) return;
        if (blob.scalar_type() != at::kByte || blob.dim() != 1) fail_format(fn, "param group ", g, " '", key, "' is not a byte tensor");
        blob = blob.contiguous();
        const auto* p = static_cast<const std::byte*>(blob.data_ptr());
        try {
            opt->load_state(std::span<const std::byte>(p, static_cast<std::size_t>(blob.numel())));
        } catch (const std::invalid_argument& e) {
            fail_format(fn, "param group ", g, " '", key, "': ", e.what());
        }
    }

    static std::int64_t read_int(::torch::serialize::InputArchive& a, const std::string& key, const char* fn) {
        c10::IValue v;
        if (!a.try_read(key, v) || !v.isInt()) fail_format(fn, "the archive has no integer '", key, "' (not an AdaRankGradAdamW state?)");
        return v.toInt();
    }

    template <class... Parts>
    [[noreturn]] static void fail_format(const char* fn, const Parts&... parts) {
        velora::detail::fail_as<velora::state_format_error>(fn, parts...);
    }

    std::unique_ptr<threads_following<float>> b32_;
    std::unique_ptr<threads_following<double>> b64_;
    std::vector<group_engine> engines_;
    std::unordered_map<at::TensorImpl*, attached> slots_;
    step_report last_;
    std::uint64_t skipped_ = 0;
};

} // namespace velora::torch
