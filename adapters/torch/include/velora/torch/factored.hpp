#pragma once
/// \file
/// `factored_gradient_accumulator`: where a VeloraLinear layer delivers its weight gradient in factored
/// form, dW = scale · A · (I_G ⊗ vᵀ) with A = dYᵀZ (O×G), instead of as a dense O×D `grad`.
/// The layer writes it in its backward pass; AdaRankGradAdamW reads it in its step (it never
/// forms the O×D matrix for a low-rank parameter) and clears it in zero_grad().
///
/// Accumulation follows torch's `.grad`: backward passes add up until zero_grad(). Terms made
/// with the same v (bit for bit) and scale add their A's (O×G values); a term with another v
/// (v changes in the batch_mean and ema modes, or when v is set) cannot be added in factored
/// form, so the accumulated gradient is then expanded to a dense O×D tensor and later terms
/// are added to it densely.
///
/// A term an optimizer step consumed stays until zero_grad; one added on top of it (a backward
/// pass after the step, with no zero_grad in between) makes the gradient stale, and the next
/// step refuses it (AdaRankGradAdamW::step throws std::invalid_argument). That is the trap of a
/// training loop holding a torch::optim::Optimizer&: Optimizer::zero_grad is not virtual and
/// clears only the dense gradients, so the factored ones would otherwise accumulate silently.
///
/// Thread-safe: backward passes on several threads may add concurrently.
#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>
#include <utility>

#include <velora/core/error.hpp>

#include "view.hpp"

namespace velora::torch {

class factored_gradient_accumulator {
public:
    /// For a weight of rows × features (O × D) with G groups of s = ceil(D/G) features.
    factored_gradient_accumulator(std::int64_t rows, std::int64_t features, std::int64_t groups, std::int64_t subtoken)
        : rows_(rows), features_(features), groups_(groups), subtoken_(subtoken) {}

    /// What has been accumulated: nothing, a factored term (a, v, scale) or a dense O×D tensor.
    struct contents {
        at::Tensor a;       ///< O×G float, or undefined
        at::Tensor v;       ///< s floats (unit norm), with a
        double scale = 1;   ///< with a
        at::Tensor dense;   ///< O×D float, or undefined
        [[nodiscard]] bool empty() const noexcept { return !a.defined() && !dense.defined(); }
    };

    /// Adds one backward pass's term; takes ownership of `a` (it is accumulated into).
    void add(at::Tensor a, const at::Tensor& v, double scale) {
        constexpr const char* fn = "velora::torch::factored_gradient_accumulator::add";
        velora::detail::require(a.defined() && a.dim() == 2 && a.size(0) == rows_ && a.size(1) == groups_ && a.scalar_type() == at::kFloat &&
                                    a.is_contiguous() && v.defined() && v.dim() == 1 && v.size(0) == subtoken_ && v.scalar_type() == at::kFloat &&
                                    v.is_contiguous(),
                                fn, "arguments 'a' (", detail::describe(a), ") and 'v' (", detail::describe(v), ") must be contiguous float32 ",
                                rows_, "x", groups_, " and ", subtoken_, " for a ", rows_, "x", features_, " weight with G = ", groups_, ", s = ",
                                subtoken_);
        std::lock_guard<std::mutex> lock(mutex_);
        if (consumed_) stale_ = true;
        if (c_.empty()) {
            c_.a = std::move(a);
            c_.v = v;
            c_.scale = scale;
        } else if (c_.a.defined() && c_.scale == scale && c_.v.equal(v)) {
            c_.a.add_(a);
        } else {
            if (c_.a.defined()) {
                c_.dense = expand(c_.a, c_.v, c_.scale);
                c_.a = at::Tensor();
                c_.v = at::Tensor();
            }
            c_.dense.add_(expand(a, v, scale));
        }
    }

    /// Adds a dense O×D term (the layer's empty-batch and non-finite-record cases).
    void add_dense(const at::Tensor& dw) {
        velora::detail::require(dw.defined() && dw.dim() == 2 && dw.size(0) == rows_ && dw.size(1) == features_ && dw.scalar_type() == at::kFloat,
                                "velora::torch::factored_gradient_accumulator::add_dense", "argument 'dw' (", detail::describe(dw), ") must be float32 ",
                                rows_, "x", features_);
        std::lock_guard<std::mutex> lock(mutex_);
        if (consumed_) stale_ = true;
        if (c_.a.defined()) {
            c_.dense = expand(c_.a, c_.v, c_.scale);
            c_.a = at::Tensor();
            c_.v = at::Tensor();
        }
        if (c_.dense.defined()) c_.dense.add_(dw);
        else c_.dense = dw.clone();
    }

    /// The accumulated gradient (tensor handles, not copies).
    [[nodiscard]] contents get() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return c_;
    }
    [[nodiscard]] bool empty() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return c_.empty();
    }
    /// Forgets the accumulated gradient (zero_grad).
    void clear() {
        std::lock_guard<std::mutex> lock(mutex_);
        c_ = contents{};
        consumed_ = false;
        stale_ = false;
    }
    /// Called by an optimizer after a step that read a non-empty gradient: a term added later
    /// without clear() makes it stale().
    void mark_consumed() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!c_.empty()) consumed_ = true;
    }
    /// Whether the gradient holds a term an earlier step consumed plus terms added since.
    [[nodiscard]] bool stale() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return stale_;
    }
    /// Multiplies the accumulated gradient by `factor` (gradient clipping).
    void scale_by(double factor) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (c_.a.defined()) c_.a.mul_(factor);
        if (c_.dense.defined()) c_.dense.mul_(factor);
    }
    /// The accumulated gradient as a dense O×D float tensor (a new tensor; undefined when empty).
    [[nodiscard]] at::Tensor dense() const {
        std::lock_guard<std::mutex> lock(mutex_);
        if (c_.dense.defined()) return c_.dense.clone();
        if (c_.a.defined()) return expand(c_.a, c_.v, c_.scale);
        return {};
    }

    /// Optimizers that read this gradient. A layer delivers factored terms only while one is
    /// attached (otherwise its weight would silently get no gradient): without one it writes a
    /// dense `grad` like torch::nn::Linear.
    [[nodiscard]] int consumers() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return consumers_;
    }
    void attach() {
        std::lock_guard<std::mutex> lock(mutex_);
        ++consumers_;
    }
    void detach() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (consumers_ > 0) --consumers_;
    }

    [[nodiscard]] std::int64_t rows() const noexcept { return rows_; }
    [[nodiscard]] std::int64_t features() const noexcept { return features_; }
    [[nodiscard]] std::int64_t groups() const noexcept { return groups_; }
    [[nodiscard]] std::int64_t subtoken_size() const noexcept { return subtoken_; }

    /// scale · A · (I_G ⊗ vᵀ), O×D, with torch operations (only on the rare paths above).
    [[nodiscard]] at::Tensor expand(const at::Tensor& a, const at::Tensor& v, double scale) const {
        return (a.unsqueeze(2) * v.view({1, 1, subtoken_})).reshape({rows_, groups_ * subtoken_}).narrow(1, 0, features_).mul(scale).contiguous();
    }

private:
    mutable std::mutex mutex_;
    contents c_;
    bool consumed_ = false;   // a step read c_ and no clear() followed
    bool stale_ = false;      // a term was added while consumed_
    int consumers_ = 0;
    std::int64_t rows_, features_, groups_, subtoken_;
};

} // namespace velora::torch
