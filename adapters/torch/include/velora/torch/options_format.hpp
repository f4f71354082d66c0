#pragma once
/// \file
/// A param group's options as an archive stores them: the library's configuration block
/// (adarank::put_config, the field table of adarank/config_fields.hpp, so the torch archive has
/// no schema of its own) plus the options only the adapter has, `kind`, `nd` and
/// `weight_rounding`, in one checksummed state blob of kind
/// "velora.torch.adarankgrad_adamw_options" (version 2; a version-1 blob, written before
/// weight_rounding existed, loads with its default, stochastic).
///
/// Archives of format 1 (before 2026-12) kept each option under its own key ("lr", "beta1",
/// "rank/type", ...: 25 keys); `read_format1_options` still reads them. Both readers return the
/// options unchecked: `check_options` applies the constructor's rules.
#include <torch/serialize/archive.h>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <adarank/config_fields.hpp>
#include <adarank/parameter.hpp>
#include <adarank/policies.hpp>
#include <velora/core/error.hpp>
#include <velora/core/serialize.hpp>
#include <velora/core/stochastic_rounding.hpp>

#include "parameter_shape.hpp"

namespace velora::torch::detail {

/// Everything a param group's options say.
struct stored_options {
    adarank::optimizer_config config;
    adarank::param_kind kind = adarank::param_kind::automatic;
    higher_dims nd = higher_dims::flatten;
    velora::bf16_rounding weight_rounding = velora::bf16_rounding::stochastic;
};

inline constexpr std::string_view options_blob_kind = "velora.torch.adarankgrad_adamw_options";
inline constexpr std::uint32_t options_blob_version = 2;

/// The constructor's rules (adarank::validate, and kind, nd and weight_rounding among their
/// values); throws std::invalid_argument naming `fn`.
inline void check_options(const stored_options& o, std::string_view fn) {
    adarank::validate(o.config, fn);
    velora::detail::require(static_cast<unsigned>(o.kind) <= 2 && static_cast<unsigned>(o.nd) <= 1, fn, "option kind (",
                            static_cast<int>(o.kind), ") or nd (", static_cast<int>(o.nd), ") is invalid");
    velora::detail::require(o.weight_rounding == velora::bf16_rounding::stochastic || o.weight_rounding == velora::bf16_rounding::nearest, fn,
                            "option weight_rounding has the invalid value ", static_cast<int>(o.weight_rounding), " (0 stochastic, 1 nearest)");
}

// The configuration block is written with the field table's newest version, so that a later
// library that adds a field still reads it (the field then keeps its default).
inline std::vector<std::byte> save_options(const stored_options& o) {
    velora::state_writer w(options_blob_kind, options_blob_version);
    w.put(adarank::config_version);
    adarank::put_config(w, o.config);
    w.put(static_cast<std::uint8_t>(o.kind));
    w.put(static_cast<std::uint8_t>(o.nd));
    w.put(static_cast<std::uint8_t>(o.weight_rounding));
    return std::move(w).finish();
}

/// Throws velora::state_format_error naming `fn` for a blob that is not an intact options blob.
inline stored_options load_options(std::span<const std::byte> blob, std::string_view fn) {
    velora::state_reader r(blob, options_blob_kind, options_blob_version, fn);
    const auto config_version = r.get<std::uint32_t>();
    if (config_version == 0 || config_version > adarank::config_version)
        r.bad("the configuration block has version ", config_version, " (this build reads 1..", adarank::config_version, ")");
    stored_options o;
    o.config = adarank::get_config<adarank::rank_policy, adarank::refresh_policy>(r, config_version);
    o.kind = static_cast<adarank::param_kind>(r.get<std::uint8_t>());
    o.nd = static_cast<higher_dims>(r.get<std::uint8_t>());
    if (r.version() >= 2) o.weight_rounding = static_cast<velora::bf16_rounding>(r.get<std::uint8_t>());
    r.expect_end();
    return o;
}

/// Format 1: one archive key per option (the names below are that format's, kept as they were).
inline stored_options read_format1_options(::torch::serialize::InputArchive& a) {
    constexpr std::string_view fn = "velora::torch::AdaRankGradAdamWOptions::serialize";
    const auto get = [&](const char* key, bool want_double) {
        c10::IValue v;
        const bool found = a.try_read(key, v);
        if (!found || (want_double ? !v.isDouble() : !v.isInt()))
            velora::detail::fail_as<velora::state_format_error>(fn, "the archive has no ", want_double ? "double" : "integer", " option '", key, "'");
        return v;
    };
    const auto real = [&](const char* key) { return get(key, true).toDouble(); };
    const auto integer = [&](const char* key) { return get(key, false).toInt(); };
    stored_options o;
    adarank::optimizer_config& c = o.config;
    c.adam.lr = real("lr");
    c.adam.beta1 = real("beta1");
    c.adam.beta2 = real("beta2");
    c.adam.eps = real("eps");
    c.adam.weight_decay = real("weight_decay");
    c.adam.convention = static_cast<adarank::adam_convention>(integer("convention"));
    c.scale = real("scale");
    c.side = static_cast<adarank::side_policy>(integer("side"));
    c.rank.type = static_cast<adarank::rank_policy::kind>(integer("rank/type"));
    c.rank.r_min = integer("rank/r_min");
    c.rank.r_max = integer("rank/r_max");
    c.rank.xi = real("rank/xi");
    c.refresh.type = static_cast<adarank::refresh_policy::kind>(integer("refresh/type"));
    c.refresh.threshold = real("refresh/threshold");
    c.refresh.min_interval = integer("refresh/min_interval");
    c.refresh.max_interval = integer("refresh/max_interval");
    c.transport = static_cast<adarank::transport_policy>(integer("transport"));
    c.rsvd.oversampling = integer("rsvd/oversampling");
    c.rsvd.power_iterations = static_cast<int>(integer("rsvd/power_iterations"));
    c.rsvd.warm_power_iterations = static_cast<int>(integer("rsvd/warm_power_iterations"));
    c.rsvd.warm_start = integer("rsvd/warm_start") != 0;
    c.rsvd.exact_fraction = real("rsvd/exact_fraction");
    c.seed = std::bit_cast<std::uint64_t>(integer("seed"));
    const auto k = integer("kind"), n = integer("nd");
    velora::detail::require(k >= 0 && k <= 2 && n >= 0 && n <= 1, fn, "the archive has the invalid kind ", k, " or nd ", n);
    o.kind = static_cast<adarank::param_kind>(k);
    o.nd = static_cast<higher_dims>(n);
    return o;
}

/// The torch option that holds a field of the table (the options group a few: betas, rsvd).
constexpr std::string_view option_name(std::string_view field) noexcept {
    if (field == "adam.beta1" || field == "adam.beta2") return "betas";
    if (field.starts_with("adam.")) return field.substr(5);
    if (field.starts_with("rsvd.")) return "rsvd";
    return field;
}

} // namespace velora::torch::detail
