#pragma once
/// \file
/// Rounding a float to bfloat16 stochastically, with the noise from a counter-based stream.
///
/// A bf16 weight updated by steps smaller than half its ulp never moves under round-to-nearest;
/// rounding up with probability equal to the fraction of the ulp that was cut off keeps every
/// rounding unbiased (E[round(x)] = x), so small updates accumulate in expectation. The noise of
/// element i is a pure function of (key, i) (core/rng.hpp's mixer), so a loop split over any
/// number of threads, a CUDA kernel or another data-parallel rank rounds to the same bits.
#include <bit>
#include <cstdint>

#include "rng.hpp"
#include "storage.hpp"

namespace velora {

/// bf16 bits of `x` rounded stochastically with 16 bits of `noise`: x's float bits plus the noise,
/// truncated to the upper half. x lies between the consecutive bf16 values lo (its truncation) and
/// hi; the low 16 bits f of its float bits place it at lo + (f/2¹⁶)·(hi − lo) (float bits are
/// linear in the value between two consecutive bf16 values, subnormals included), and the sum
/// carries into the upper half exactly when noise ≥ 2¹⁶ − f, i.e. with probability f/2¹⁶ for
/// uniform noise: the rounding is unbiased. Representable values (f = 0) are returned unchanged
/// whatever the noise; the sign is never touched (the magnitude cannot carry into it); ±Inf stays
/// ±Inf; a NaN becomes a quiet NaN as under round-to-nearest. A finite x above the largest bf16
/// (0x1.fep127, within 2⁻⁸ of float's largest) may round to Inf.
constexpr std::uint16_t float_to_bfloat16_bits_stochastic(float x, std::uint16_t noise) noexcept {
    const std::uint32_t f = std::bit_cast<std::uint32_t>(x);
    if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((f >> 16) | 0x40u);   // quiet NaN
    return static_cast<std::uint16_t>((f + noise) >> 16);
}

/// The key of one rounding pass: a pure function of a stream seed and a pass number (e.g. a
/// parameter's seed and its step count), mixed so that neighbouring passes share nothing.
constexpr std::uint64_t rounding_key(std::uint64_t seed, std::uint64_t pass) noexcept {
    constexpr std::uint64_t domain = 0x5d0c4a57b16ed00dull;   // apart from the Gaussian streams of rng.hpp
    return mix64(mix64(seed ^ domain) ^ pass);
}

/// 16 uniform bits for element `i` of the pass `key`.
constexpr std::uint16_t rounding_noise(std::uint64_t key, std::uint64_t i) noexcept {
    return static_cast<std::uint16_t>(mix64(key ^ i) >> 48);
}

/// How a float result is stored in bf16.
enum class bf16_rounding : std::uint8_t {
    stochastic = 0,   ///< unbiased: rounds up with the probability of the cut-off fraction (the noise of rounding_noise)
    nearest = 1,      ///< round-to-nearest-even (storage.hpp's conversion): drops updates below half an ulp
};

/// `x` rounded to bf16 by `mode`, element `i` of the pass `key` (the key is ignored for nearest).
constexpr bfloat16 round_to_bfloat16(float x, bf16_rounding mode, std::uint64_t key, std::uint64_t i) noexcept {
    if (mode == bf16_rounding::nearest) return bfloat16{detail::float_to_bfloat16_bits(x)};
    return bfloat16{float_to_bfloat16_bits_stochastic(x, rounding_noise(key, i))};
}

} // namespace velora
