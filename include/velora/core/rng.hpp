#pragma once
/// \file
/// Counter-based random numbers: value i of stream `seed` is a pure function of (seed, i).
///
/// Every backend (a CPU loop, a CUDA kernel with one thread per element) can therefore
/// produce the same numbers in any order, and a saved state needs nothing but the seed and a
/// counter to resume bit-identically.
#include <cmath>
#include <cstdint>
#include <numbers>

namespace velora {

/// SplitMix64 finaliser: a bijective 64-bit mixer with good avalanche.
constexpr std::uint64_t mix64(std::uint64_t x) noexcept {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/// Uniform double in (0, 1] (never 0, so log() below is finite).
constexpr double uniform_at(std::uint64_t seed, std::uint64_t counter) noexcept {
    const std::uint64_t bits = mix64(mix64(seed) ^ counter);
    return (static_cast<double>(bits >> 11) + 1.0) * 0x1.0p-53;
}

/// Standard normal variate number `i` of stream `seed` (Box-Muller on two uniforms).
inline double gaussian_at(std::uint64_t seed, std::uint64_t i) noexcept {
    const double u1 = uniform_at(seed, 2 * i);
    const double u2 = uniform_at(seed, 2 * i + 1);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

} // namespace velora
