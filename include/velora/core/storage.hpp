#pragma once
/// \file
/// Storage element types for compressed activations.
///
/// Arithmetic always runs in the backend's value type (float or double); only what is kept
/// between the forward and the backward pass may be narrower. `half` (IEEE binary16) and
/// `bfloat16` are plain 16-bit containers with round-to-nearest-even conversions written out
/// here, so every backend (CPU or GPU) stores bit-identical values.
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

namespace velora {

enum class storage : std::uint8_t { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

constexpr std::size_t storage_bytes(storage s) noexcept {
    switch (s) {
    case storage::f32: return 4;
    case storage::f64: return 8;
    case storage::f16: return 2;
    case storage::bf16: return 2;
    }
    return 0;
}

constexpr std::string_view to_string(storage s) noexcept {
    switch (s) {
    case storage::f32: return "f32";
    case storage::f64: return "f64";
    case storage::f16: return "f16";
    case storage::bf16: return "bf16";
    }
    return "unknown";
}

constexpr bool is_valid(storage s) noexcept { return static_cast<std::uint8_t>(s) <= 3; }

/// IEEE 754 binary16 bits.
struct half {
    std::uint16_t bits = 0;
};

/// bfloat16 bits (upper half of a binary32).
struct bfloat16 {
    std::uint16_t bits = 0;
};

namespace detail {

constexpr std::uint16_t float_to_half_bits(float value) noexcept {
    const std::uint32_t f = std::bit_cast<std::uint32_t>(value);
    const std::uint32_t sign = (f >> 16) & 0x8000u;
    const std::uint32_t abs = f & 0x7fffffffu;
    if (abs >= 0x7f800000u) {                      // Inf or NaN
        return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    }
    if (abs >= 0x477ff000u) {                      // rounds to >= 65520: overflow to Inf
        return static_cast<std::uint16_t>(sign | 0x7c00u);
    }
    if (abs < 0x38800000u) {                       // below the smallest normal half: subnormal or zero
        if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);   // < 2^-25 rounds to 0
        const std::uint32_t exponent = abs >> 23;
        const std::uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
        const std::uint32_t shift = 126u - exponent;   // 14..24
        std::uint32_t result = mantissa >> shift;
        const std::uint32_t remainder = mantissa & ((1u << shift) - 1u);
        const std::uint32_t halfway = 1u << (shift - 1u);
        if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
        return static_cast<std::uint16_t>(sign | result);
    }
    std::uint32_t result = abs - 0x38000000u;      // rebias exponent 127 -> 15
    const std::uint32_t remainder = result & 0x1fffu;
    result >>= 13;
    if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u))) ++result;
    return static_cast<std::uint16_t>(sign | result);
}

constexpr float half_bits_to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        if (mantissa == 0) return std::bit_cast<float>(sign);
        // subnormal half: value = mantissa * 2^-24, exactly representable in float
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

constexpr std::uint16_t float_to_bfloat16_bits(float value) noexcept {
    const std::uint32_t f = std::bit_cast<std::uint32_t>(value);
    if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((f >> 16) | 0x40u);   // quiet NaN
    const std::uint32_t rounding = 0x7fffu + ((f >> 16) & 1u);
    return static_cast<std::uint16_t>((f + rounding) >> 16);
}

constexpr float bfloat16_bits_to_float(std::uint16_t b) noexcept {
    return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

} // namespace detail

/// Converts between arithmetic types and storage types. Specialised for half and bfloat16;
/// the primary template is a plain static_cast (float <-> double).
template <class To>
struct storage_cast {
    template <class From>
    static constexpr To from(From x) noexcept { return static_cast<To>(x); }
};
template <>
struct storage_cast<half> {
    template <class From>
    static constexpr half from(From x) noexcept { return half{detail::float_to_half_bits(static_cast<float>(x))}; }
};
template <>
struct storage_cast<bfloat16> {
    template <class From>
    static constexpr bfloat16 from(From x) noexcept { return bfloat16{detail::float_to_bfloat16_bits(static_cast<float>(x))}; }
};

template <class To, class From>
constexpr To to_arithmetic(From x) noexcept {
    if constexpr (std::is_same_v<From, half>) return static_cast<To>(detail::half_bits_to_float(x.bits));
    else if constexpr (std::is_same_v<From, bfloat16>) return static_cast<To>(detail::bfloat16_bits_to_float(x.bits));
    else return static_cast<To>(x);
}

/// Calls f(tag) with a value-initialised object of the C++ type that stores `s`.
template <class F>
constexpr decltype(auto) visit_storage(storage s, F&& f) {
    switch (s) {
    case storage::f64: return f(double{});
    case storage::f16: return f(half{});
    case storage::bf16: return f(bfloat16{});
    case storage::f32: break;
    }
    return f(float{});
}

} // namespace velora
