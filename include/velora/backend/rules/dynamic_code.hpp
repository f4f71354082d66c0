#pragma once
/// \file
/// The 8-bit dynamic codes of blockwise-quantised Adam moments (Dettmers et al., "8-bit
/// Optimizers via Block-wise Quantization", ICLR 2022; bitsandbytes' `create_dynamic_map`), and
/// the table that finds a value's nearest code without a search. Written once here; the CPU
/// bodies (cpu/adam8.hpp) and the CUDA kernel read the same tables.
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
/// Rounding is to the nearest code: y = |x|·(1/absmax) (the reciprocal rounded once per block) goes
/// up from magnitude k to k+1 when y > mid[k], where mid[k] is (c_k + c_{k+1})/2 rounded to float
/// with its low 8 mantissa bits replaced by k (so a cell's table entry carries both; the threshold
/// moves by less than 2^-15 of itself, far below the code's resolution). A tie goes down.
///
/// Nearest without a search: y's float bits, shifted right by 16 (exponent and the top 7 bits of
/// the mantissa), name a cell of width 2^e/128 inside y's binade. The construction checks that no
/// cell holds more than one midpoint (the closest code spacing, 0.9/128 in the top unsigned decade,
/// is wider than the widest cell of (0.5, 1), 1/256), so one 32-bit entry per cell gives the
/// nearest code with one table read and one comparison: the bits of mid[k] when the cell holds
/// mid[k] (k = its low byte), otherwise +inf/NaN bits with k in the low byte (the comparison is
/// false). The same in every body. Values below 2^−24 share cell 0 (they all round to 0).
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace velora::rules {

/// Signed (m) or unsigned (v) code.
enum class code_sign : std::uint8_t { signed_code, unsigned_code };

/// One 8-bit dynamic code with its lookup tables (see the file comment).
struct dynamic_code {
    static constexpr std::uint32_t cell_shift = 16;                              ///< keeps sign, exponent, 7 mantissa bits
    static constexpr std::uint32_t first_cell = (127u - 24u) << 7;               ///< the cell of 2^-24
    static constexpr std::uint32_t last_cell = 0x3F800000u >> cell_shift;        ///< the cell of 1.0
    static constexpr std::size_t cells = last_cell - first_cell + 1;

    code_sign sign{};
    int magnitudes = 0;                      ///< 256 unsigned, 128 signed (index = the byte's low 7 bits)
    std::array<float, 256> value{};          ///< decode[byte]: the code's value in [−1, 1]
    std::array<float, 256> mid{};            ///< mid[k]: between magnitudes k and k+1, k in its low byte (+inf for the last)
    alignas(64) std::array<std::uint32_t, cells> cell{};   ///< cell[c]: mid[k]'s bits or +inf/NaN bits, k in the low byte

    /// The reciprocal every body multiplies by: 1/absmax rounded once (absmax > 0).
    [[nodiscard]] static float reciprocal(float absmax) noexcept { return 1.0f / absmax; }

    /// The magnitude index of y ∈ [0, 1] (y > 1 is treated as 1): the reference the bodies match.
    [[nodiscard]] std::uint32_t nearest_magnitude(float y) const noexcept {
        std::uint32_t bits;
        std::memcpy(&bits, &y, sizeof bits);
        std::uint32_t c = bits >> cell_shift;
        c = c < first_cell ? first_cell : (c > last_cell ? last_cell : c);
        const std::uint32_t entry = cell[c - first_cell];
        float threshold;
        std::memcpy(&threshold, &entry, sizeof threshold);
        return (entry & 0xFFu) + (y > threshold ? 1u : 0u);
    }

    /// The byte of x in a block whose absmax has the reciprocal `inv` (reciprocal(absmax)):
    /// y = |x|·inv rounded to the nearest code.
    [[nodiscard]] std::uint8_t encode(float x, float inv) const noexcept {
        const float y = std::fma(std::fabs(x), inv, -0.0f);   // one rounding, as the packets' product
        const std::uint32_t k = nearest_magnitude(y);
        const bool negative = sign == code_sign::signed_code && x < 0 && k != 0;
        return static_cast<std::uint8_t>(k | (negative ? 0x80u : 0u));
    }

    /// The value of byte q in a block of absmax a: value[q]·a, rounded once (an FMA with −0, which
    /// no compiler contracts into a later add).
    [[nodiscard]] float decode(std::uint8_t q, float absmax) const noexcept { return std::fma(value[q], absmax, -0.0f); }

    /// The largest distance between neighbouring magnitudes: |decode(encode(x)) − x| <= a·(this/2)
    /// up to the roundings of y and of the product.
    [[nodiscard]] double largest_gap() const noexcept {
        double g = 0;
        for (int k = 0; k + 1 < magnitudes; ++k) g = std::max(g, static_cast<double>(value[k + 1]) - static_cast<double>(value[k]));
        return g;
    }

    /// Builds the code (see the file comment); throws std::logic_error if a cell held two midpoints
    /// (cannot happen for these two codes: the test of this file checks the tables exhaustively).
    static dynamic_code make(code_sign s) {
        dynamic_code d;
        d.sign = s;
        const bool is_signed = s == code_sign::signed_code;
        std::array<double, 256> mag{};
        int n = 0;
        mag[n++] = 0.0;
        for (int i = 0; i < 7; ++i) {
            const int k = is_signed ? (1 << i) : (1 << (i + 1));
            const double scale = std::pow(10.0, i - 6);
            for (int j = 0; j < k; ++j) {
                const double lo = 0.1 + 0.9 * j / k, hi = 0.1 + 0.9 * (j + 1) / k;
                mag[n++] = scale * (lo + hi) / 2.0;
            }
        }
        if (is_signed) mag[n - 1] = 1.0;   // the top midpoint becomes 1
        else mag[n++] = 1.0;
        d.magnitudes = n;   // 128 or 256
        for (int k = 0; k < n; ++k) d.value[static_cast<std::size_t>(k)] = static_cast<float>(mag[static_cast<std::size_t>(k)]);
        if (is_signed)
            for (int k = 0; k < 128; ++k) d.value[static_cast<std::size_t>(128 + k)] = -d.value[static_cast<std::size_t>(k)];
        for (int k = 0; k < 256; ++k) {
            float m = std::numeric_limits<float>::infinity();
            if (k + 1 < n) {
                m = static_cast<float>((mag[static_cast<std::size_t>(k)] + mag[static_cast<std::size_t>(k + 1)]) / 2.0);
                std::uint32_t bits;
                std::memcpy(&bits, &m, sizeof bits);
                bits = (bits & ~0xFFu) | static_cast<std::uint32_t>(k);
                std::memcpy(&m, &bits, sizeof m);
            }
            d.mid[static_cast<std::size_t>(k)] = m;
        }
        // cell[c]: k = the code of the cell's first value (cell 0 also holds everything below 2^-24)
        // and the midpoint above it when it lies in the cell.
        for (std::uint32_t c = first_cell; c <= last_cell; ++c) {
            const std::uint32_t lo_bits = c == first_cell ? 0u : c << cell_shift, hi_bits = c == last_cell ? 0x3F800000u : ((c + 1) << cell_shift) - 1;
            float lo, hi;
            std::memcpy(&lo, &lo_bits, sizeof lo);
            std::memcpy(&hi, &hi_bits, sizeof hi);
            int k_lo = 0, k_hi = 0;
            while (k_lo + 1 < n && lo > d.mid[static_cast<std::size_t>(k_lo)]) ++k_lo;
            while (k_hi + 1 < n && hi > d.mid[static_cast<std::size_t>(k_hi)]) ++k_hi;
            if (k_hi - k_lo > 1) throw std::logic_error("velora::rules::dynamic_code::make: a cell holds two midpoints");
            std::uint32_t entry = 0x7F800000u | static_cast<std::uint32_t>(k_lo);   // no midpoint: +inf (k = 0) or NaN bits
            if (k_hi > k_lo) std::memcpy(&entry, &d.mid[static_cast<std::size_t>(k_lo)], sizeof entry);
            d.cell[c - first_cell] = entry;
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
