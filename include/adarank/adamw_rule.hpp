#pragma once
/// \file
/// The AdamW rule of `low_rank_adamw`, both conventions: the coefficients as the kernels see them
/// (rounded to T) and what step t adds to a weight. The element-wise arithmetic itself is
/// velora/backend/rules/adam_element.hpp, shared by every backend.
///
///   m = β₁m + (1−β₁)g,  v = β₂v + (1−β₂)g²,  n = m / (√v + ε)      (the backend's adam kernels)
///   galore: W ← d·(W − s·n)                with s = lr·√(1−β₂ᵗ)/(1−β₁ᵗ), d = 1 − lr·wd
///   torch:  W ← d·W − s·m/(√v + ε·√(1−β₂ᵗ))
/// A dense parameter under the torch convention runs torch::optim::AdamW's own order of
/// operations (dense_terms: adamw_order::torch). A low-rank one has no torch counterpart to
/// follow: its update is the same formula written as d·(W − (s/d)·n') with ε' = ε·√(1−β₂ᵗ)
/// (terms), so that the subspace's moments are one adam_moments call in both conventions
/// (adam_convention in policies.hpp says which optimizer each convention reproduces).
#include <cmath>
#include <cstdint>
#include <limits>

#include <velora/core/error.hpp>

#include <velora/backend/rules/adam_element.hpp>

#include "policies.hpp"

namespace adarank {

/// Refuses (std::invalid_argument from `fn`) an ε that T rounds to zero or to a subnormal value:
/// n = m/(√v + ε) is computed in T, so a zero ε divides by zero where v = 0, and a subnormal one
/// makes every step's bound |n| <= max|m|/ε useless (overflow_certificate.hpp). The torch
/// convention's moments are bounded with ε·√(1−β₂ᵗ) >= ε·√(1−β₂), the smallest at t = 1.
template <class T>
void check_eps_representable(const adamw_hyper& adam, const char* fn) {
    velora::detail::require(static_cast<T>(adam.eps) >= std::numeric_limits<T>::min(), fn, "config.adam.eps = ", adam.eps,
                            " is below the smallest normal value of the optimizer's value type (", std::numeric_limits<T>::min(), ")");
    velora::detail::require(adam.convention != adam_convention::torch || static_cast<T>(adam.eps * std::sqrt(1.0 - adam.beta2)) >= std::numeric_limits<T>::min(),
                            fn, "config.adam.eps = ", adam.eps,
                            " times sqrt(1 - beta2) (the torch convention's first ε) is below the smallest normal value of the optimizer's value type (",
                            std::numeric_limits<T>::min(), ")");
}

/// Adam's coefficients as the kernels see them (rounded to T), and in double for the certificate.
template <class T>
struct adam_coefficients {
    T beta1, beta2, eps;
    double b1, c1, b2, c2, eps_value;   ///< β₁, 1 − β₁, β₂, 1 − β₂, ε after rounding to T

    explicit adam_coefficients(const adamw_hyper& h)
        : beta1(T(h.beta1)), beta2(T(h.beta2)), eps(T(h.eps)), b1(static_cast<double>(beta1)), c1(static_cast<double>(T(1) - beta1)),
          b2(static_cast<double>(beta2)), c2(static_cast<double>(T(1) - beta2)), eps_value(static_cast<double>(eps)) {}
};

/// What step t adds to the weight, as the kernels take it: W ← d·(W − step·m/(√v + eps)).
template <class T>
struct update_terms {
    T eps;
    double eps_value;   ///< eps as a double (the certificate's bound on n)
    double step;
};

/// The hyper-parameters and the convention, with the learning rate passed per call (it changes
/// with schedules; the rest is fixed at construction).
template <class T>
class adamw_rule {
public:
    explicit adamw_rule(const adamw_hyper& hyper) : hyper_(hyper), coef_(hyper) {}

    [[nodiscard]] const adam_coefficients<T>& coefficients() const noexcept { return coef_; }

    /// Bias-corrected step size lr·√(1−β₂ᵗ)/(1−β₁ᵗ) for step count t.
    [[nodiscard]] double step_size(double lr, std::uint64_t t) const noexcept {
        const double td = static_cast<double>(t);
        return lr * std::sqrt(1.0 - std::pow(hyper_.beta2, td)) / (1.0 - std::pow(hyper_.beta1, td));
    }
    /// The decoupled weight decay factor 1 − lr·wd.
    [[nodiscard]] double decay_factor(double lr) const noexcept { return 1.0 - lr * hyper_.weight_decay; }

    /// ε and the step the kernels take for step t under the configured convention.
    [[nodiscard]] update_terms<T> terms(double lr, std::uint64_t t) const {
        if (hyper_.convention == adam_convention::galore) return {coef_.eps, coef_.eps_value, step_size(lr, t)};
        const T eps = T(hyper_.eps * std::sqrt(1.0 - std::pow(hyper_.beta2, static_cast<double>(t))));
        return {eps, static_cast<double>(eps), step_size(lr, t) / decay_factor(lr)};
    }

    /// What a dense parameter's fused update (the backend's adamw_update) takes for step t: the
    /// galore order with terms(lr, t)'s ε and step (the step not divided by d), or under the
    /// torch convention torch::optim::AdamW's scalars, computed in double and rounded once, as
    /// torch passes them to its tensor operations.
    [[nodiscard]] velora::rules::adamw_terms<T> dense_terms(double lr, std::uint64_t t) const {
        velora::rules::adamw_terms<T> d;
        d.decay = T(decay_factor(lr));
        d.beta1 = coef_.beta1;
        d.beta2 = coef_.beta2;
        d.eps = coef_.eps;
        const double td = static_cast<double>(t);
        if (hyper_.convention == adam_convention::galore) {
            d.order = velora::rules::adamw_order::galore;
            d.c1 = T(1) - coef_.beta1;
            d.c2 = T(1) - coef_.beta2;
            d.step = T(step_size(lr, t));
        } else {
            d.order = velora::rules::adamw_order::torch;
            d.c1 = T(1.0 - hyper_.beta1);
            d.c2 = T(1.0 - hyper_.beta2);
            d.step = T(lr / (1.0 - std::pow(hyper_.beta1, td)));
            d.bias2_sqrt = T(std::sqrt(1.0 - std::pow(hyper_.beta2, td)));
        }
        return d;
    }

private:
    adamw_hyper hyper_;
    adam_coefficients<T> coef_;
};

} // namespace adarank
