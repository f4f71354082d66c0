#pragma once
/// \file
/// A param group as AdaRankGradAdamW runs it: `group_engine`, its options as at its first step,
/// its parameters registered in order, and one dtype_engine per parameter dtype it holds; and
/// `in_group`, the one path by which a group's errors reach the caller.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <adarank/config_fields.hpp>
#include <velora/core/error.hpp>

#include "backend.hpp"
#include "factored.hpp"
#include "optimizer_engine.hpp"
#include "options_format.hpp"
#include "parameter_shape.hpp"
#include "view.hpp"

namespace velora::torch::detail {

/// Runs f; a caller mistake (std::invalid_argument) it reports is rethrown as `Error` naming
/// `fn` and param group g ("fn: param group g: <what f said>").
template <class Error = std::invalid_argument, class F>
std::invoke_result_t<F> in_group(std::size_t g, std::string_view fn, F&& f) {
    try {
        return std::forward<F>(f)();
    } catch (const std::invalid_argument& e) {
        velora::detail::fail_as<Error>(fn, "param group ", g, ": ", e.what());
    }
}

/// The CPU backends an optimizer's engines share, one per dtype.
struct dtype_backends {
    threads_following<float>* f32 = nullptr;
    threads_following<double>* f64 = nullptr;
    template <class T>
    threads_following<T>& get() const {
        if constexpr (std::is_same_v<T, float>) return *f32;
        else return *f64;
    }
};

struct group_engine {
    bool registered = false;
    stored_options options;   // as at the group's first step
    std::unique_ptr<dtype_engine<float>> f32;
    std::unique_ptr<dtype_engine<double>> f64;
    std::vector<registered_parameter> params;

    template <class T>
    std::unique_ptr<dtype_engine<T>>& engine() {
        if constexpr (std::is_same_v<T, float>) return f32;
        else return f64;
    }
    template <class T>
    const std::unique_ptr<dtype_engine<T>>& engine() const {
        if constexpr (std::is_same_v<T, float>) return f32;
        else return f64;
    }
    template <class F>
    void for_each_engine(F&& f) {
        if (f32) f(*f32);
        if (f64) f(*f64);
    }
    template <class F>
    void for_each_engine(F&& f) const {
        if (f32) f(std::as_const(*f32));
        if (f64) f(std::as_const(*f64));
    }

    /// Group g's engines for `options` (checked), with `params` registered in order; `slot_of(p)`
    /// is the factored gradient slot attached to p (or null).
    template <class SlotOf>
    static group_engine build(std::size_t g, const std::vector<at::Tensor>& params, const stored_options& options, dtype_backends backends,
                              const SlotOf& slot_of, std::string_view fn) {
        group_engine e;
        e.registered = true;
        e.options = options;
        in_group(g, fn, [&] { check_options(e.options, fn); });
        for (std::size_t i = 0; i < params.size(); ++i) e.add(params[i], g, i, backends, slot_of(params[i]), fn);
        return e;
    }

    /// Registers p as parameter i of group g (a parameter appended to the group, or one of build's).
    void add(const at::Tensor& p, std::size_t g, std::size_t i, dtype_backends backends, const factored_gradient_accumulator* slot, std::string_view fn) {
        if (!p.defined()) velora::detail::fail(fn, "param group ", g, " parameter ", i, " is an undefined tensor");
        if (p.scalar_type() != at::kFloat && p.scalar_type() != at::kDouble && p.scalar_type() != at::kBFloat16)
            velora::detail::fail(fn, "param group ", g, " parameter ", i, " (", describe(p),
                                 ") must be float32, float64 or bfloat16 (stepped in float and rounded back, option weight_rounding)");
        if (!p.device().is_cpu() || p.layout() != c10::kStrided)
            velora::detail::fail(fn, "param group ", g, " parameter ", i, " (", describe(p), ") must be a dense CPU tensor");
        registered_parameter r;
        r.key = p.unsafeGetTensorImpl();
        r.group = static_cast<std::int64_t>(g);
        r.index = static_cast<std::int64_t>(i);
        r.is_double = p.scalar_type() == at::kDouble;
        r.is_bf16 = p.scalar_type() == at::kBFloat16;
        r.sizes = p.sizes().vec();
        r.gradient_name = "param group " + std::to_string(g) + " parameter " + std::to_string(i) + " gradient";
        const parameter_matrix s = parameter_matrix_of(p, options.nd);
        r.rows = s.rows;
        r.cols = s.cols;
        if (s.rows * s.cols > 0) {
            const adarank::param_kind kind = s.force_dense ? adarank::param_kind::dense : options.kind;
            r.id = with_dtype(r.is_double, [&]<class T>(std::type_identity<T>) {
                auto& e = engine<T>();
                if (!e) e = in_group(g, fn, [&] { return std::make_unique<dtype_engine<T>>(backends.get<T>(), options.config, options.weight_rounding); });
                const index_t id = e->add(s.rows, s.cols, kind);
                if constexpr (std::is_same_v<T, float>)
                    if (slot != nullptr) e->reserve_factored(slot->groups());
                return id;
            });
        }
        params.push_back(std::move(r));
    }

    /// Only lr may change after a group's first step. The configurations are compared with ==
    /// (first_different_field compares policies by their saved bytes, which allocates: only when
    /// they differ is it asked which field to name, in the field table's order, as a torch option).
    void check_unchanged(std::size_t g, stored_options now, std::string_view fn) const {
        now.config.adam.lr = options.config.adam.lr;
        // β, ε and the weight decay may follow a schedule (with_adam_hyper applies them).
        now.config.adam.beta1 = options.config.adam.beta1;
        now.config.adam.beta2 = options.config.adam.beta2;
        now.config.adam.eps = options.config.adam.eps;
        now.config.adam.weight_decay = options.config.adam.weight_decay;
        std::string_view what;
        if (!(now.config == options.config)) {
            const auto field = adarank::first_different_field(now.config, options.config);
            what = field ? option_name(field->name) : "an option";
        } else if (now.kind != options.kind) {
            what = "kind";
        } else if (now.nd != options.nd) {
            what = "nd";
        } else if (now.weight_rounding != options.weight_rounding) {
            what = "weight_rounding";
        }
        if (!what.empty())
            velora::detail::fail(fn, "param group ", g, ": option ", what,
                                 " changed after the group's first step; only lr, betas, eps and weight_decay may change (the state belongs to "
                                 "the options it was made with)");
    }

    /// Whether `now`'s β, ε or weight decay differ from the engines' (a schedule changed them).
    [[nodiscard]] bool adam_hyper_changed(const stored_options& now) const noexcept {
        const auto &a = now.config.adam, &b = options.config.adam;
        return a.beta1 != b.beta1 || a.beta2 != b.beta2 || a.eps != b.eps || a.weight_decay != b.weight_decay;
    }
    /// Checks `now`'s β, ε and weight decay at learning rate `lr` as the engines would, changing nothing.
    void check_adam_hyper(std::size_t g, const stored_options& now, double lr, const char* fn) const {
        auto c = options.config;
        c.adam.beta1 = now.config.adam.beta1;
        c.adam.beta2 = now.config.adam.beta2;
        c.adam.eps = now.config.adam.eps;
        c.adam.weight_decay = now.config.adam.weight_decay;
        c.adam.lr = lr;
        in_group(g, fn, [&] {
            adarank::validate(c, fn);
            if (f32) adarank::check_eps_representable<float>(c.adam, fn);
            if (f64) adarank::check_eps_representable<double>(c.adam, fn);
        });
    }
    /// Gives the engines `now`'s β, ε and weight decay (checked by check_adam_hyper first).
    void apply_adam_hyper(const stored_options& now) {
        const auto& a = now.config.adam;
        for_each_engine([&](auto& engine) { engine.optimizer().set_adam_hyper(a.beta1, a.beta2, a.eps, a.weight_decay); });
        options.config.adam.beta1 = a.beta1;
        options.config.adam.beta2 = a.beta2;
        options.config.adam.eps = a.eps;
        options.config.adam.weight_decay = a.weight_decay;
    }

    /// The group's first params.size() tensors are the ones registered (same tensor, shape and
    /// dtype); fewer is an error. Tensors beyond them are new (the caller registers them).
    void check_registered(std::size_t g, const std::vector<at::Tensor>& now, std::string_view fn) const {
        if (now.size() < params.size())
            velora::detail::fail(fn, "param group ", g, " has ", now.size(), " parameters but ", params.size(),
                                 " were registered; removing parameters from a group is not supported");
        for (std::size_t i = 0; i < params.size(); ++i) {
            const registered_parameter& r = params[i];
            if (now[i].unsafeGetTensorImpl() != r.key || now[i].sizes() != c10::IntArrayRef(r.sizes) || now[i].scalar_type() != r.dtype())
                velora::detail::fail(fn, "param group ", g, " parameter ", i, " (", describe(now[i]),
                                     ") is not the tensor registered at the group's first step (shape ", bracketed(r.sizes), ", ",
                                     r.dtype(), "); replacing parameters or changing their dtype is not supported");
        }
    }
};

} // namespace velora::torch::detail
