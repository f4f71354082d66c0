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

// Under nvcc the transform below is also compiled for the device, so a CUDA kernel draws
// the same numbers (the macro is empty for every other compiler; no CUDA header is needed).
#include "host_device.hpp"

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

/// Standard normal variates 2p and 2p + 1 of stream `seed`: both outputs of one Box-Muller
/// transform of the uniforms 2p and 2p + 1 (one log, one sqrt, one sin/cos pair for two values).
struct gaussian_pair {
    double even, odd;
};
VELORA_HOST_DEVICE inline gaussian_pair gaussian_pair_at(std::uint64_t seed, std::uint64_t p) noexcept {
    const double radius = std::sqrt(-2.0 * std::log(uniform_at(seed, 2 * p)));
    const double angle = 2.0 * std::numbers::pi * uniform_at(seed, 2 * p + 1);
    return {radius * std::cos(angle), radius * std::sin(angle)};
}

/// Standard normal variate number `i` of stream `seed`.
VELORA_HOST_DEVICE inline double gaussian_at(std::uint64_t seed, std::uint64_t i) noexcept {
    const gaussian_pair g = gaussian_pair_at(seed, i / 2);
    return i % 2 == 0 ? g.even : g.odd;
}

} // namespace velora
