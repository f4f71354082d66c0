#pragma once
/// \file
/// The AdamW rule of `low_rank_adamw`, both conventions: the coefficients as the kernels see them
/// (rounded to T) and what step t adds to a weight.
///
///   m = β₁m + (1−β₁)g,  v = β₂v + (1−β₂)g²,  n = m / (√v + ε)      (the backend's adam kernels)
///   galore: W ← d·(W − s·n)                with s = lr·√(1−β₂ᵗ)/(1−β₁ᵗ), d = 1 − lr·wd
///   torch:  W ← d·W − s·m/(√v + ε·√(1−β₂ᵗ)), the same update written as d·(W − (s/d)·n') with
///           ε' = ε·√(1−β₂ᵗ), so that both conventions are one kernel call
/// (adam_convention in policies.hpp says which optimizer each convention reproduces).
#include <cmath>
#include <cstdint>

#include "policies.hpp"

namespace adarank {

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

private:
    adamw_hyper hyper_;
    adam_coefficients<T> coef_;
};

} // namespace adarank
