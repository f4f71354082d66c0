#pragma once
/// \file
/// The configuration of `low_rank_adamw` described once: every field of
/// `basic_optimizer_config`, in the state format's order, with its name, the message that says
/// it differs, the state version that introduced it and the values it accepts. Validating,
/// saving, loading and comparing a configuration (validate below, optimizer_state_io.hpp) are
/// loops over this table, so a new field is one line here and nowhere else.
///
/// `for_each_config_field(f, c...)` calls f(field, c.<field>...) for every field, on one
/// configuration (save, load) or on several side by side (compare). A field's value is a double,
/// an integer, a bool, an enum, or a policy (anything with save/load, persistent_policy).
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <velora/core/serialize.hpp>

#include "policies.hpp"

namespace adarank {

/// The values a number or an enumeration field accepts (a policy field validates itself; a bool
/// or the seed accepts anything). A number must be finite and lie in [lo, hi] (an end excluded
/// where `*_open`; hi = +inf: no upper bound); an enumeration's underlying value must be <= max.
struct field_values {
    double lo = -std::numeric_limits<double>::infinity(), hi = std::numeric_limits<double>::infinity();
    bool lo_open = false, hi_open = false;
    unsigned max = 0;   ///< enumerations: the largest valid value
};
constexpr field_values at_least(double lo) { return {lo}; }
constexpr field_values above(double lo) { return {lo, std::numeric_limits<double>::infinity(), true}; }
constexpr field_values within(double lo, double hi, bool hi_open = false) { return {lo, hi, false, hi_open}; }
constexpr field_values enumeration(unsigned max) { field_values v; v.max = max; return v; }

/// One row of the table.
struct config_field {
    std::string_view name;        ///< as the configuration spells it, e.g. "adam.beta1"
    std::string_view differs;     ///< what load_state says when a saved configuration differs here
    std::uint32_t since_version;  ///< the first state version that saves it (older states hold the default)
    field_values values{};        ///< what validate accepts
};

template <class F, class... Configs>
constexpr void for_each_config_field(F&& f, Configs&... c) {
    f(config_field{"adam.lr", "adam hyper-parameters differ", 1, at_least(0)}, c.adam.lr...);
    f(config_field{"adam.beta1", "adam hyper-parameters differ", 1, within(0, 1, true)}, c.adam.beta1...);
    f(config_field{"adam.beta2", "adam hyper-parameters differ", 1, within(0, 1, true)}, c.adam.beta2...);
    f(config_field{"adam.eps", "adam hyper-parameters differ", 1, above(0)}, c.adam.eps...);
    f(config_field{"adam.weight_decay", "adam hyper-parameters differ", 1, at_least(0)}, c.adam.weight_decay...);
    f(config_field{"adam.convention", "adam convention differs", 2, enumeration(1)}, c.adam.convention...);
    f(config_field{"scale", "scale differs", 1, above(0)}, c.scale...);
    f(config_field{"side", "side policy differs", 1, enumeration(3)}, c.side...);
    f(config_field{"rank", "rank policy differs", 1}, c.rank...);
    f(config_field{"refresh", "refresh policy differs", 1}, c.refresh...);
    f(config_field{"transport", "transport policy differs", 1, enumeration(3)}, c.transport...);
    f(config_field{"rsvd.oversampling", "rsvd settings differ", 1, at_least(0)}, c.rsvd.oversampling...);
    f(config_field{"rsvd.power_iterations", "rsvd settings differ", 1, within(0, 64)}, c.rsvd.power_iterations...);
    f(config_field{"rsvd.warm_power_iterations", "rsvd settings differ", 1, within(0, 64)}, c.rsvd.warm_power_iterations...);
    f(config_field{"rsvd.warm_start", "rsvd settings differ", 1}, c.rsvd.warm_start...);
    f(config_field{"rsvd.exact_fraction", "rsvd settings differ", 1, within(0, 1)}, c.rsvd.exact_fraction...);
    f(config_field{"seed", "seed differs", 1}, c.seed...);
    f(config_field{"state", "moment state format differs", 3, enumeration(1)}, c.state...);
    f(config_field{"state_block", "moment state block size differs", 3, within(static_cast<double>(min_state_block), static_cast<double>(max_state_block))},
      c.state_block...);
    f(config_field{"basis", "basis format differs", 4, enumeration(2)}, c.basis...);
    f(config_field{"basis_block", "basis block size differs", 4, within(static_cast<double>(min_basis_block), static_cast<double>(max_basis_block))},
      c.basis_block...);
}

/// The newest `since_version` in the table: a configuration block written by put_config is read
/// back by get_config with this version (an adapter that stores a configuration on its own, e.g.
/// the torch archive's options, records it next to the block).
inline constexpr std::uint32_t config_version = [] {
    std::uint32_t newest = 0;
    for_each_config_field([&](const config_field& field) { newest = field.since_version > newest ? field.since_version : newest; });
    return newest;
}();

namespace detail {

// How each kind of field is written: doubles and uint64 as they are, other integers as int64 or
// int32 (their declared width), bools and enums as one byte, policies by their own save.
template <class V>
void put_field(velora::state_writer& w, const V& v) {
    if constexpr (std::is_same_v<V, double> || std::is_same_v<V, std::uint64_t>) w.put(v);
    else if constexpr (std::is_same_v<V, bool> || std::is_enum_v<V>) w.put(static_cast<std::uint8_t>(v));
    else if constexpr (std::is_same_v<V, int>) w.put(static_cast<std::int32_t>(v));
    else if constexpr (std::is_integral_v<V>) w.put(static_cast<std::int64_t>(v));
    else v.save(w);
}

// The inverse of put_field. A flag byte must be 0 or 1, and the convention's byte a convention
// (only these are written; any other byte would not re-save to the same blob); the other enums
// are compared with the live configuration by the caller.
template <class V>
void get_field(velora::state_reader& r, const config_field& field, V& v) {
    if constexpr (std::is_same_v<V, double> || std::is_same_v<V, std::uint64_t>) {
        v = r.get<V>();
    } else if constexpr (std::is_same_v<V, bool>) {
        const auto byte = r.get<std::uint8_t>();
        if (byte > 1) r.bad("the configuration's ", field.name, " flag byte is ", int(byte), " (0 or 1 expected)");
        v = byte != 0;
    } else if constexpr (std::is_same_v<V, adam_convention>) {
        const auto byte = r.get<std::uint8_t>();
        if (byte > 1) r.bad("the configuration's ", field.name, " byte is ", int(byte), " (0 or 1 expected)");
        v = static_cast<V>(byte);
    } else if constexpr (std::is_enum_v<V>) {
        v = static_cast<V>(r.get<std::uint8_t>());
    } else if constexpr (std::is_same_v<V, int>) {
        v = r.get<std::int32_t>();
    } else if constexpr (std::is_integral_v<V>) {
        v = static_cast<V>(r.get<std::int64_t>());
    } else {
        v = V::load(r);
    }
}

// Two values of a field compared as they would be saved: doubles bit for bit (a saved -0.0 where
// 0.0 is configured compares equal but would not re-save to the same blob), policies by the bytes
// they save.
template <class V>
bool same_field(const V& a, const V& b) {
    if constexpr (std::is_same_v<V, double>) {
        return std::bit_cast<std::uint64_t>(a) == std::bit_cast<std::uint64_t>(b);
    } else if constexpr (std::is_arithmetic_v<V> || std::is_enum_v<V>) {
        return a == b;
    } else {
        const auto bytes = [](const V& p) {
            velora::state_writer w("adarank.policy", 1);
            p.save(w);
            return std::move(w).finish();
        };
        return bytes(a) == bytes(b);
    }
}

} // namespace detail

/// Writes every field of `c` (the state format's configuration block).
template <class Rank, class Refresh>
void put_config(velora::state_writer& w, const basic_optimizer_config<Rank, Refresh>& c) {
    for_each_config_field([&](const config_field&, const auto& v) { detail::put_field(w, v); }, c);
}

/// Reads a configuration block written by state `version` (fields introduced later keep their
/// defaults).
template <class Rank, class Refresh>
basic_optimizer_config<Rank, Refresh> get_config(velora::state_reader& r, std::uint32_t version) {
    basic_optimizer_config<Rank, Refresh> c;
    for_each_config_field(
        [&](const config_field& field, auto& v) {
            if (version >= field.since_version) detail::get_field(r, field, v);
        },
        c);
    return c;
}

/// The first field (in the table's order) whose values differ as saved bytes, std::nullopt
/// when none does.
template <class Rank, class Refresh>
std::optional<config_field> first_different_field(const basic_optimizer_config<Rank, Refresh>& a, const basic_optimizer_config<Rank, Refresh>& b) {
    std::optional<config_field> first;
    for_each_config_field(
        [&](const config_field& field, const auto& x, const auto& y) {
            if (!first && !detail::same_field(x, y)) first = field;
        },
        a, b);
    return first;
}

/// What the first field that differs between a saved and the live configuration says ("" when
/// none does).
template <class Rank, class Refresh>
std::string describe_difference(const basic_optimizer_config<Rank, Refresh>& saved, const basic_optimizer_config<Rank, Refresh>& live) {
    const std::optional<config_field> first = first_different_field(saved, live);
    return first ? std::string(first->differs) : std::string();
}

namespace detail {

// One field against its row's accepted values; the message names the field as the
// configuration spells it ("config.adam.beta1 must be in [0, 1), got 1.5").
template <class V>
void check_field(const config_field& f, const V& v, std::string_view function) {
    using velora::detail::require;
    const field_values& ok = f.values;
    if constexpr (std::is_enum_v<V>) {
        require(static_cast<unsigned>(v) <= ok.max, function, "config.", f.name, " has the invalid value ", static_cast<int>(v));
    } else if constexpr (std::is_same_v<V, bool>) {
        // any value
    } else if constexpr (std::is_arithmetic_v<V>) {
        if constexpr (std::is_same_v<V, std::uint64_t>) return;   // the seed: any value
        const double x = static_cast<double>(v);
        const bool finite = std::isfinite(x) || std::is_integral_v<V>;
        const bool fits = (ok.lo_open ? x > ok.lo : x >= ok.lo) && (ok.hi_open ? x < ok.hi : x <= ok.hi);
        if (finite && fits) return;
        if (std::isinf(ok.hi)) {   // a lower bound only
            if constexpr (std::is_integral_v<V>) velora::detail::fail(function, "config.", f.name, " must be ", ok.lo_open ? "> " : ">= ", ok.lo, ", got ", v);
            else velora::detail::fail(function, "config.", f.name, " must be finite and ", ok.lo_open ? "> " : ">= ", ok.lo, ", got ", v);
        }
        velora::detail::fail(function, "config.", f.name, " must be in ", ok.lo_open ? "(" : "[", ok.lo, ", ", ok.hi, ok.hi_open ? ")" : "]", ", got ", v);
    } else {
        v.validate(function);   // a policy checks its own settings
    }
}

} // namespace detail

/// Throws std::invalid_argument naming `function`, the field and its value for an invalid
/// configuration: every field against its row of the table (the rank estimator and the refresh
/// rule validate themselves), then the 8-bit moments' and the quantised basis' block sizes (powers
/// of two, state_format.hpp, basis_format.hpp) and the rules across fields: the learning rate's
/// under the torch convention (check_learning_rate, policies.hpp), and the budget rank rule only
/// with float moments and float bases.
template <class Rank, class Refresh>
void validate(const basic_optimizer_config<Rank, Refresh>& c, std::string_view function) {
    for_each_config_field([&](const config_field& f, const auto& v) { detail::check_field(f, v, function); }, c);
    check_state_block(c.state_block, function);
    check_basis_block(c.basis_block, function);
    check_learning_rate(c.adam.lr, c.adam, function, "config.adam.lr");
    // The budget rule prices a rank unit at a basis row and two moment rows in the value type
    // (rank_budget.hpp); with 8-bit moments it would spend a budget it does not count correctly.
    if constexpr (std::is_same_v<Rank, rank_policy>)
        if (c.rank.is_budget() && c.state != state_format::float32)
            velora::detail::fail(function, "config.rank is the budget rule (", c.rank.budget_bytes, " bytes), which counts moments in the value type; "
                                 "config.state must then be float32, got int8_blockwise");
    // The same for a quantised basis: the budget would count its rows at sizeof(T) per element.
    if constexpr (std::is_same_v<Rank, rank_policy>)
        if (c.rank.is_budget() && c.basis != basis_format::float32)
            velora::detail::fail(function, "config.rank is the budget rule (", c.rank.budget_bytes, " bytes), which counts bases in the value type; "
                                 "config.basis must then be float32, got ", c.basis == basis_format::int8 ? "int8" : "int4");
}

} // namespace adarank
