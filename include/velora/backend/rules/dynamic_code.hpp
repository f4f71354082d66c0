#pragma once
/// \file
/// The 8-bit dynamic codes of blockwise-quantised Adam moments (Dettmers et al., "8-bit
/// Optimizers via Block-wise Quantization", ICLR 2022; bitsandbytes' `create_dynamic_map`), and
/// the table that finds a value's nearest code without a search. Written once here; the CPU
/// bodies (cpu/adam8.hpp) and the CUDA kernels (cuda/adam8.cuh) read the same tables; what the
/// encoding and decoding compute is VELORA_HOST_DEVICE, one definition for both sides.
///
/// Construction (a "dynamic tree" code): a value y ∈ [0, 1] (|x| divided by its block's absmax)
/// is written as 10^(i−6) · f with a decimal exponent i ∈ {0, …, 6} and a linear fraction
/// f ∈ (0.1, 1); decade i holds the midpoints of k_i equal cells of [0.1, 1], so the small decades
/// are coarse and the top decade fine:
///  - unsigned (v ≥ 0): k_i = 2^(i+1) → 2 + 4 + … + 128 = 254 values, plus 0 and 1: 256 codes,
///    bitsandbytes' `create_dynamic_map(signed=False)` value for value (to float rounding);
///  - signed (m): sign and magnitude; k_i = 2^i → 1 + 2 + … + 64 = 127 magnitudes, plus 0. The top
///    magnitude (decade 6's last midpoint, 0.99297) is replaced by 1, so the block's absmax element
///    is exact on both signs. bitsandbytes' signed map instead keeps 0.99297 and adds +1 only (its
///    −1 is not representable); byte 0x80 (−0) is never produced and decodes to −0.
/// Rounding is to the nearest code, found by arithmetic instead of a search (no gathers in the
/// vector bodies). y = |x|·(1/absmax), the reciprocal rounded once per block. The codes fall into
/// groups: zero, the seven decades (in decade i the codes are the midpoints of k_i equal cells of
/// [0.1, 1]·10^(i−6), so the nearest code is the cell holding y) and, unsigned, the one. So:
///  1. the group: a group boundary (the midpoint between a group's top code and the next group's
///     bottom code) lies in no binade with another, so y's binary exponent names a binade whose
///     first group `binade_group[e]` and boundary `binade_boundary[e]` (+inf if none) give the
///     group as binade_group[e] + (y > binade_boundary[e]);
///  2. the code in the group: offset[g] + min(max(trunc(fma(y, cells_per_unit[g], cell_shift[g])), 0), last[g]),
///     the cell index k_i·(y·10^(6−i) − 0.1)/0.9 in one fused multiply-add (a group with one code
///     has cells_per_unit = cell_shift = 0).
/// A value on a cell boundary (a midpoint between neighbouring codes) may round either way by the
/// rounding of that fused multiply-add (a relative 2^-20 of the cell width); the result is the
/// same in every body and differs from the exact nearest code only there. The construction
/// checks step 1's premise (at most one boundary per binade) and throws std::logic_error otherwise.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "../../core/host_device.hpp"

namespace velora::rules {

/// Signed (m) or unsigned (v) code.
enum class code_sign : std::uint8_t { signed_code, unsigned_code };

/// One 8-bit dynamic code with its lookup tables (see the file comment).
struct dynamic_code {
    static constexpr std::uint32_t first_binade = 96;   ///< y below 2^(96−127) = 2^−31 is in binade 0 (rounds to 0)
    static constexpr int binades = 32;                  ///< binary exponents 96 … 127 (y ≤ 1)

    code_sign sign{};
    int magnitudes = 0;                                  ///< 256 unsigned, 128 signed (index = the byte's low 7 bits)
    int groups = 0;
    alignas(64) std::array<float, 256> value{};          ///< value[byte]: the code's value in [−1, 1]
    alignas(64) std::array<std::int32_t, binades> binade_group{};
    alignas(64) std::array<float, binades> binade_boundary{};
    alignas(64) std::array<float, 16> cells_per_unit{};
    alignas(64) std::array<float, 16> cell_shift{};
    alignas(64) std::array<std::int32_t, 16> offset{};
    alignas(64) std::array<std::int32_t, 16> last{};

    /// The reciprocal every body multiplies by: 1/absmax rounded once (absmax > 0).
    [[nodiscard]] VELORA_HOST_DEVICE static float reciprocal(float absmax) noexcept { return 1.0f / absmax; }

    /// The binade index of y >= 0 (y <= 1 after rounding; larger values take the last binade).
    [[nodiscard]] VELORA_HOST_DEVICE static std::uint32_t binade_of(float y) noexcept {
        std::uint32_t bits;
        std::memcpy(&bits, &y, sizeof bits);
        const std::uint32_t e = bits >> 23;
        return (e < first_binade ? first_binade : (e > 127u ? 127u : e)) - first_binade;
    }

    /// The magnitude index of y ∈ [0, 1]: the reference the vector bodies match.
    [[nodiscard]] VELORA_HOST_DEVICE std::uint32_t nearest_magnitude(float y) const noexcept {
        const std::uint32_t b = binade_of(y);
        const auto g = static_cast<std::size_t>(binade_group[b] + (y > binade_boundary[b] ? 1 : 0));
        const float cell = std::fma(y, cells_per_unit[g], cell_shift[g]);
        std::int32_t j = static_cast<std::int32_t>(cell);   // truncation, as the packets' conversion
        j = j < 0 ? 0 : (j > last[g] ? last[g] : j);
        return static_cast<std::uint32_t>(offset[g] + j);
    }

    /// The byte of x in a block whose absmax has the reciprocal `inv` (reciprocal(absmax)):
    /// y = |x|·inv rounded to the nearest code; a negative x that rounds to 0 gives byte 0.
    [[nodiscard]] VELORA_HOST_DEVICE std::uint8_t encode(float x, float inv) const noexcept {
        const float y = std::fma(std::fabs(x), inv, -0.0f);   // one rounding, as the packets' product
        const std::uint32_t k = nearest_magnitude(y);
        const bool negative = sign == code_sign::signed_code && x < 0 && k != 0;
        return static_cast<std::uint8_t>(k | (negative ? 0x80u : 0u));
    }

    /// The value of byte q in a block of absmax a: value[q]·a, rounded once (an FMA with −0, which
    /// no compiler contracts into a later add).
    [[nodiscard]] VELORA_HOST_DEVICE float decode(std::uint8_t q, float absmax) const noexcept { return std::fma(value[q], absmax, -0.0f); }

    /// The largest distance between neighbouring magnitudes: |decode(encode(x)) − x| <= a·(this/2)
    /// up to the roundings of y, of the cell index and of the product.
    [[nodiscard]] double largest_gap() const noexcept {
        double g = 0;
        for (int k = 0; k + 1 < magnitudes; ++k) g = std::max(g, static_cast<double>(value[static_cast<std::size_t>(k + 1)]) - value[static_cast<std::size_t>(k)]);
        return g;
    }

    /// Builds the code (see the file comment).
    static dynamic_code make(code_sign s) {
        dynamic_code d;
        d.sign = s;
        const bool is_signed = s == code_sign::signed_code;
        std::array<double, 256> mag{};
        int n = 0;
        // group 0: zero
        mag[n++] = 0.0;
        d.offset[0] = 0;
        d.last[0] = 0;
        int g = 1;
        for (int i = 0; i < 7; ++i, ++g) {
            const int k = is_signed ? (1 << i) : (1 << (i + 1));
            const double scale = std::pow(10.0, i - 6);
            d.offset[static_cast<std::size_t>(g)] = n;
            for (int j = 0; j < k; ++j) mag[static_cast<std::size_t>(n++)] = scale * (0.1 + 0.9 * (j + 0.5) / k);
            // cell index = k·(y/scale − 0.1)/0.9 = y·(k/(0.9·scale)) − k/9
            d.cells_per_unit[static_cast<std::size_t>(g)] = static_cast<float>(k / (0.9 * scale));
            d.cell_shift[static_cast<std::size_t>(g)] = static_cast<float>(-k / 9.0);
            d.last[static_cast<std::size_t>(g)] = k - 1;
        }
        // the one: its own group (signed: in place of decade 6's top midpoint, 0.99297)
        if (is_signed) {
            --n;
            d.last[static_cast<std::size_t>(g - 1)] -= 1;
        }
        d.offset[static_cast<std::size_t>(g)] = n;
        d.last[static_cast<std::size_t>(g)] = 0;
        mag[static_cast<std::size_t>(n++)] = 1.0;
        d.groups = g + 1;
        d.magnitudes = n;   // 128 or 256
        for (int k = 0; k < n; ++k) d.value[static_cast<std::size_t>(k)] = static_cast<float>(mag[static_cast<std::size_t>(k)]);
        if (is_signed)
            for (int k = 0; k < 128; ++k) d.value[static_cast<std::size_t>(128 + k)] = -d.value[static_cast<std::size_t>(k)];
        // group boundaries: between group h−1's top code and group h's bottom code
        std::array<float, 16> boundary{};
        for (int h = 1; h < d.groups; ++h) {
            const auto lo = static_cast<std::size_t>(d.offset[static_cast<std::size_t>(h - 1)] + d.last[static_cast<std::size_t>(h - 1)]);
            const auto hi = static_cast<std::size_t>(d.offset[static_cast<std::size_t>(h)]);
            boundary[static_cast<std::size_t>(h)] = static_cast<float>((mag[lo] + mag[hi]) / 2.0);
        }
        for (int b = 0; b < binades; ++b) {
            const double first = b == 0 ? 0.0 : std::ldexp(1.0, static_cast<int>(first_binade) + b - 127), next = std::ldexp(1.0, static_cast<int>(first_binade) + b - 126);
            int below = 0, inside = 0;
            float in = std::numeric_limits<float>::infinity();
            for (int h = 1; h < d.groups; ++h) {
                const double t = boundary[static_cast<std::size_t>(h)];
                if (t < first) ++below;
                else if (t < next) {
                    ++inside;
                    in = boundary[static_cast<std::size_t>(h)];
                }
            }
            if (inside > 1) throw std::logic_error("velora::rules::dynamic_code::make: a binade holds two group boundaries");
            d.binade_group[static_cast<std::size_t>(b)] = below;
            d.binade_boundary[static_cast<std::size_t>(b)] = in;
        }
        return d;
    }
};

/// The two codes, built once per program.
inline const dynamic_code& signed_dynamic_code() {
    static const dynamic_code c = dynamic_code::make(code_sign::signed_code);
    return c;
}
inline const dynamic_code& unsigned_dynamic_code() {
    static const dynamic_code c = dynamic_code::make(code_sign::unsigned_code);
    return c;
}

} // namespace velora::rules
