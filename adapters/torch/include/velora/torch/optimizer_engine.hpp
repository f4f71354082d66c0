#pragma once
/// \file
/// What AdaRankGradAdamW runs per param group and parameter dtype: `dtype_engine<T>`, one
/// adarank::low_rank_adamw<eigen_backend<T>> with the gradients queued for the current step.
/// A step is three passes over the engines (queue every gradient, check them all, then step):
/// the whole-step finiteness check needs every gradient before any weight changes.
///
/// Steady-state steps allocate nothing here: the queue is reserved at registration to hold every
/// parameter, error messages are built only when an error is thrown, and the library's own
/// workspace is sized at registration (and for factored gradients by reserve_factored). What
/// libtorch may still allocate: a gradient whose dtype is not the parameter's or whose layout is
/// not a row-major matrix is copied (matrix_input), a parameter whose memory is not a row-major
/// matrix is stepped through a contiguous copy, and a weight that gets both a dense and a
/// factored gradient (tying) sums them into a new tensor.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <adarank/optimizer.hpp>
#include <velora/core/error.hpp>

#include "backend.hpp"
#include "communicator.hpp"
#include "factored.hpp"
#include "step_report.hpp"
#include "view.hpp"

namespace velora::torch::detail {

/// A parameter as its group registered it at its first step.
struct registered_parameter {
    at::TensorImpl* key = nullptr;
    std::int64_t group = 0, index = 0;
    bool is_double = false;
    bool is_bf16 = false;   // a bfloat16 weight, stepped by the float engine through a bf16_weight_view
    index_t id = -1;   // -1: empty, nothing to optimise
    index_t rows = 0, cols = 0;
    std::vector<std::int64_t> sizes;
    std::string gradient_name;   // "param group g parameter i gradient" (made once: matrix_input names it in errors)

    [[nodiscard]] c10::ScalarType dtype() const noexcept { return is_double ? at::kDouble : is_bf16 ? at::kBFloat16 : at::kFloat; }
};

/// Calls f(std::type_identity<T>{}) with T the parameter's value type: the one place the
/// adapter branches on float32 / float64 (a bfloat16 parameter's steps run in float).
template <class F>
decltype(auto) with_dtype(bool is_double, F&& f) {
    return is_double ? f(std::type_identity<double>{}) : f(std::type_identity<float>{});
}

/// One parameter's gradient for a step, in the form the library takes it.
template <class T>
struct gradient_input {
    const registered_parameter* r = nullptr;
    at::Tensor param;
    std::optional<matrix_input<T>> dense;
    factored_gradient_accumulator::contents factored;   // float parameters only (attach checks it)
    index_t subtoken = 0;

    [[nodiscard]] bool is_factored() const noexcept { return factored.a.defined() && !dense; }
    [[nodiscard]] velora::factored_gradient<float> factored_view() const {
        velora::factored_gradient<float> f;
        f.a = view_of<float>(factored.a, "factored gradient A");
        f.v = factored.v.template data_ptr<float>();
        f.subtoken_size = subtoken;
        f.features = r->cols;
        f.scale = static_cast<float>(factored.scale);
        return f;
    }
};

/// Reads p's gradient into `out`: its dense gradient, the factored one delivered to `slot`, or
/// (a weight used by an attached layer and elsewhere too) their sum; false when it has neither.
/// Throws std::invalid_argument naming `fn` for a gradient of another shape or a kind of tensor
/// matrix_input refuses.
template <class T>
bool read_gradient(gradient_input<T>& out, const at::Tensor& p, const registered_parameter& r, const factored_gradient_accumulator* slot, const char* fn) {
    const at::Tensor& grad = p.grad();
    factored_gradient_accumulator::contents c;
    if (slot != nullptr) c = slot->get();
    if (!grad.defined() && c.empty()) return false;
    out.r = &r;
    out.param = p;
    if (grad.defined() && grad.sizes() != p.sizes())
        velora::detail::fail(fn, "param group ", r.group, " parameter ", r.index, ": its gradient (", describe(grad),
                             ") does not have the parameter's shape ", bracketed(p.sizes()));
    if (c.a.defined() && !grad.defined()) {
        out.factored = std::move(c);
        out.subtoken = slot->subtoken_size();
        return true;
    }
    at::Tensor dense = grad;
    if (c.a.defined() || c.dense.defined()) {
        const at::Tensor extra = c.dense.defined() ? c.dense : slot->expand(c.a, c.v, c.scale);
        dense = grad.defined() ? grad.to(at::kFloat) + extra : extra;
    }
    out.dense.emplace(dense, r.gradient_name, flatten::outputs_first, fn);
    return true;
}

template <class T>
class dtype_engine {
public:
    using backend_type = eigen_backend<T>;
    using optimizer_type = adarank::low_rank_adamw<backend_type>;

    /// Throws std::invalid_argument (the library's message) for a configuration T cannot run.
    /// `rounding`: how the steps of bfloat16 parameters round their new weights (float engines only).
    dtype_engine(threads_following<T>& backend, const adarank::optimizer_config& config, velora::bf16_rounding rounding = velora::bf16_rounding::stochastic)
        : backend_(&backend), opt_(backend.current(), config), rounding_(rounding) {}

    /// Registers a rows×cols parameter; reserves its place in the step's queue.
    index_t add(index_t rows, index_t cols, adarank::param_kind kind) {
        const index_t id = opt_.add_parameter(rows, cols, kind);
        pending_.reserve(static_cast<std::size_t>(opt_.size()));
        return id;
    }

    /// Sizes the library's workspace for factored gradients of up to `groups` groups, so that
    /// their first step does not allocate it.
    void reserve_factored(index_t groups) {
        adarank::workspace_plan plan;
        plan.factored_groups = groups;
        opt_.reserve(plan);
    }

    [[nodiscard]] optimizer_type& optimizer() noexcept { return opt_; }
    [[nodiscard]] const optimizer_type& optimizer() const noexcept { return opt_; }

    // ------------------------------------------------------------------ a step, in three passes
    /// Forgets the gradients queued by a step that did not finish.
    void clear() noexcept { pending_.clear(); }

    /// Pass 1: queues parameter r's gradient (nothing when it has none).
    void queue(const at::Tensor& p, const registered_parameter& r, const factored_gradient_accumulator* slot, const char* fn) {
        pending_.emplace_back();
        if (!read_gradient(pending_.back(), p, r, slot, fn)) pending_.pop_back();
    }

    /// Pass 2: appends every queued parameter whose gradient holds NaN/Inf to `events`.
    void check_finite(std::vector<step_report::event>& events) {
        backend_type& b = backend_->get();
        for (const gradient_input<T>& g : pending_)
            if (!finite(b, g)) events.push_back({g.r->group, g.r->index, velora::status::non_finite_input});
    }

    /// Pass 3: steps every queued parameter at learning rate `lr`, in place (bumping its version
    /// counter when it changed), counting it in `report` and adding an event when its status is
    /// not ok. Empties the queue.
    /// With `comm` (AdaRankGradAdamW::set_communicator) each step uses the mean of the ranks'
    /// gradients (the library's data-parallel step: every rank steps the same parameters in the
    /// same order and ends with the same bits).
    void step_queued(double lr, step_report& report, dynamic_communicator* comm = nullptr) {
        opt_.set_learning_rate(lr);
        for (gradient_input<T>& g : pending_) {
            at::Tensor copy;
            const velora::status s = step_one(g, copy, comm);
            if (s == velora::status::ok || s == velora::status::degenerate_input) {
                ++report.stepped;
                if (copy.defined()) g.param.copy_(copy.view(g.param.sizes()));   // copy_ bumps the version
                else bump_version(g.param);
            }
            if (s != velora::status::ok) report.events.push_back({g.r->group, g.r->index, s});
        }
        pending_.clear();
    }

    /// ‖G‖² of a gradient read by read_gradient (for grad_norm).
    static double norm2(backend_type& b, const gradient_input<T>& g) {
        if (g.is_factored()) {
            if constexpr (std::is_same_v<T, float>) {
                typename backend_type::template buffer<float> scratch;   // norm2 does not use it
                return adarank::factored_gradient_operator<backend_type>(b, g.factored_view(), scratch).norm2();
            }
            return std::numeric_limits<double>::quiet_NaN();
        }
        return b.sum_of_squares(g.dense->view());
    }

private:
    static bool finite(backend_type& b, const gradient_input<T>& g) {
        if (g.is_factored()) {
            if constexpr (std::is_same_v<T, float>) return adarank::all_finite(b, g.factored_view());
            return false;
        }
        return adarank::all_finite(b, g.dense->view());
    }

    // The weight as a matrix: a view of its memory, or (memory that is not a row-major matrix) a
    // contiguous copy in `copy`, which the caller writes back.
    velora::status step_one(gradient_input<T>& g, at::Tensor& copy, dynamic_communicator* comm) {
        const matrix_layout layout = layout_of(g.param, flatten::outputs_first);
        const at::Tensor& memory = layout.ld && !g.param.is_neg() ? g.param : (copy = g.param.contiguous());
        if constexpr (std::is_same_v<T, float>) {
            if (g.r->is_bf16) {
                const matrix_layout m = layout_of(memory, flatten::outputs_first);
                // c10::BFloat16 and velora::bfloat16 are both the 16 bits of a bf16 value.
                const matrix_view<velora::bfloat16> bits(static_cast<velora::bfloat16*>(memory.data_ptr()), m.rows, m.cols, m.ld.value_or(m.cols));
                return step_weight(g, adarank::bf16_weight_view{bits, rounding_}, comm);
            }
        }
        return step_weight(g, mutable_view_of<T>(memory, "parameter", flatten::outputs_first), comm);
    }

    // A step of `weight` (a float/double view, or a bf16 weight) with g's gradient.
    template <class Weight>
    velora::status step_weight(gradient_input<T>& g, const Weight& weight, dynamic_communicator* comm) {
        if (g.is_factored()) {
            if constexpr (std::is_same_v<T, float>) {
                if (comm != nullptr) return opt_.step(g.r->id, weight, g.factored_view(), *comm);
                return opt_.step(g.r->id, weight, g.factored_view());
            } else {
                velora::detail::fail("velora::torch::AdaRankGradAdamW::step", "a factored gradient for a float64 parameter");
            }
        }
        if (comm != nullptr) return opt_.step(g.r->id, weight, g.dense->view(), *comm);
        return opt_.step(g.r->id, weight, g.dense->view());
    }

    threads_following<T>* backend_;
    optimizer_type opt_;
    velora::bf16_rounding rounding_;
    std::vector<gradient_input<T>> pending_;
};

} // namespace velora::torch::detail
