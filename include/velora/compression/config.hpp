#pragma once
/// \file
/// The configuration of one compressed input (`compressor_config`, or
/// `basic_compressor_config<Rule>` for a compressor with a rule of its own) and its validation.
#include <cmath>
#include <cstdint>
#include <string>

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "v_mode.hpp"

namespace velora {

/// Hyper-parameters of one compressed input. Validated once, by the compressor's constructor.
template <class Rule>
struct basic_compressor_config {
    index_t groups = 32;                   ///< G, sub-tokens per token; 1 <= G <= D
    Rule v{};                              ///< how v is chosen (a v_rule; default first_batch_mean)
    storage z_storage = storage::f32;      ///< element type of Z; f64 only with a double backend
    /// Multiplies the weight gradient only (never dX or db); carried in factored_gradient::scale.
    /// Not the optimizer's `scale` (adarank::optimizer_config::scale is GaLore's α on the update).
    double scale = 1.0;
};

/// The configuration of the library's `compressor<B>`, whose rule is a `v_mode`.
using compressor_config = basic_compressor_config<v_mode>;

/// Returns `c` when it is valid for `features` = D and the value type T; throws
/// std::invalid_argument naming velora::compressor::compressor otherwise (the rule's own
/// settings are checked last, by its validate()).
template <class T, class Rule>
basic_compressor_config<Rule> validated_compressor_config(index_t features, const basic_compressor_config<Rule>& c) {
    constexpr const char* fn = "velora::compressor::compressor";
    detail::require(features > 0, fn, "argument 'features' must be positive, got D = ", features);
    detail::require(c.groups >= 1 && c.groups <= features, fn, "config.groups must satisfy 1 <= G <= D, got G = ", c.groups,
                    " with D = ", features);
    detail::require(is_valid(c.z_storage), fn, "config.z_storage has the invalid value ", static_cast<int>(c.z_storage));
    detail::require(c.z_storage != storage::f64 || sizeof(T) == 8, fn,
                    "config.z_storage = f64 is wider than the backend's value type (float); use f32, f16 or bf16");
    detail::require(std::isfinite(c.scale) && c.scale > 0, fn, "config.scale must be finite and positive, got ", c.scale);
    c.v.validate(fn);
    return c;
}

/// s = ceil(D/G) for a validated 1 <= G <= D, formed without D + G − 1 (which overflows for D
/// near the index maximum), and short enough that the s-element vectors a compressor keeps
/// (the widest of double) fit in the address space.
inline index_t subtoken_size_for(index_t features, index_t groups) {
    const index_t s = features / groups + (features % groups != 0 ? 1 : 0);
    return detail::checked_elements(s, sizeof(double), "velora::compressor::compressor",
                                    "the sub-token size s = ceil(D/G) for D = " + std::to_string(features) + " and G = " +
                                        std::to_string(groups) + ",");
}

} // namespace velora
