#pragma once
/// \file
/// The steps of `low_rank_adamw` for a host that stores a weight only in bf16 (no float master
/// copy; bf16_weights.hpp has the conversions, docs/adarankgrad.md "bf16 weights"): the weight
/// is widened to float (exact) into the optimizer workspace's rows·cols floats shared by all
/// parameters (optimizer_workspace::bf16_widened: sized by reserve with plan.bf16_weights, and
/// otherwise grown on the first such step of a larger parameter), stepped exactly as a float weight
/// would be, and rounded back to bf16 (stochastically by default, the noise a function of
/// (config.seed, id, step count, element)). Its own file because it is the only part of the
/// optimizer that owns a weight copy and rounds weights; the float step is untouched by it.
///
/// A CRTP base of low_rank_adamw (`Derived`), which befriends it: `step` (one function for both
/// weight forms) hands a bf16 weight to step_bf16 here; the float step, the parameter table and
/// the configuration stay the optimizer's.
#include <cstddef>
#include <cstdint>

#include <velora/core/checked.hpp>
#include <velora/core/error.hpp>

#include "backend.hpp"
#include "bf16_weights.hpp"
#include "optimizer_workspace.hpp"

namespace adarank {

template <class Derived, optimizer_backend B>
class bf16_weight_steps {
public:
    using T = typename B::value_type;
    using status = velora::status;

    /// Bytes of the float workspace bf16-weight steps use (0 before the first one or a reserve
    /// with plan.bf16_weights; part of workspace_bytes()).
    [[nodiscard]] std::size_t bf16_workspace_bytes() const noexcept {
        return static_cast<const Derived&>(*this).ws_.bf16_widened.capacity() * sizeof(T);
    }

protected:
    // A bf16 weight's step: widen, `float_step` on the widened copy, round back when it was taken
    // (ok, or degenerate_input, which still applied the old subspace's update): non_finite_input
    // and overflow leave the bf16 weight untouched too.
    template <class FloatStep>
    status step_bf16(index_t id, const bf16_weight_view& weight, FloatStep&& float_step) {
        constexpr const char* fn = "adarank::low_rank_adamw::step";
        Derived& self = static_cast<Derived&>(*this);
        const auto& l = self.checked_layer(id, fn);
        velora::check_shape(weight.values, l.rows, l.cols, fn, "weight");
        velora::detail::require(weight.rounding == bf16_rounding::stochastic || weight.rounding == bf16_rounding::nearest, fn,
                                "argument 'weight.rounding' has the invalid value ", static_cast<int>(weight.rounding));
        auto& widened = self.ws_.bf16_widened;
        optimizer_workspace<B>::grow(widened, l.rows * l.cols);   // nothing after reserve with plan.bf16_weights
        widen_bf16(self.b_->threads(), weight.values, widened.data());
        const matrix_view<T> w(widened.data(), l.rows, l.cols, l.cols);
        const status s = float_step(w);
        if (s == status::ok || s == status::degenerate_input)
            narrow_to_bf16(self.b_->threads(), widened.data(), weight.values, weight.rounding,
                           weight_rounding_key(self.config_.seed, static_cast<std::uint64_t>(id), l.t));
        return s;
    }
};

} // namespace adarank
