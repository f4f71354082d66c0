#pragma once
/// \file
/// How `low_rank_adamw` stores a low-rank parameter's projection basis (`optimizer_config::basis`,
/// `basis_block`): in the parameter's float type, or quantised as Q-GaLore stores its INT4
/// projection, with a symmetric linear code and one float scale per block of a row:
///
///   s_b = absmax_b / qmax,  code = round_to_nearest_even(x · (qmax / absmax_b)) in [-qmax, qmax],
///   Q = code · s_b,         qmax = 127 (int8) or 7 (int4, two codes per byte, low nibble first)
///
/// Blocks lie within a row (a row of `len` values has ceil(len / block) of them), so each row's
/// error is bounded by its own blocks' scales: |x − Q| <= s_b/2 per element (plus one rounding of
/// the product), hence ‖P_i − Q_i‖ <= δ_i = ½·sqrt(Σ_b n_b·s_b²) and, for P with orthonormal rows,
/// max |Q·Qᵀ − I| <= max_{i,j} (δ_i + δ_j + δ_i·δ_j) (plus P's own deviation). A linear code
/// (not the dynamic code of the 8-bit moments) because a basis row's entries are of one size,
/// about 1/sqrt(len), with no long tail to spend code points on; and the scale (not the absmax)
/// is stored so that decoding is one product whose bits do not depend on how it was encoded.
///
/// The projection with a quantised basis is Q's, used as it is (Q-GaLore does the same; no
/// re-orthonormalisation, which would need a float copy of the basis per parameter or a QR per
/// step): R = Q·M (M = G or Gᵀ), ΔW = Qᵀ·N. docs/adarankgrad.md says what that changes.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>
#include <utility>
#include <vector>

#include <velora/backend/cpu/int4_decode.hpp>
#include <velora/core/error.hpp>
#include <velora/core/view.hpp>

namespace adarank {

using velora::index_t;

/// The basis' storage.
enum class basis_format : std::uint8_t {
    float32 = 0,   ///< the parameter's value type (float or double)
    int8 = 1,      ///< one signed byte per element + one float scale per block (CPU backend, float)
    int4 = 2,      ///< half a byte per element + one float scale per block (CPU backend, float)
};

/// Block sizes of the quantised formats: powers of two from 32 to 4096 (a block lies within a
/// row; a row shorter than the block is one block). 256 by default: Q-GaLore's group size for
/// its INT4 projection; the measured deviations per block size are in docs/adarankgrad.md.
inline constexpr index_t min_basis_block = 32, max_basis_block = 4096, default_basis_block = 256;

/// Throws std::invalid_argument naming `function` and the value unless `block` is supported.
inline void check_basis_block(index_t block, std::string_view function) {
    velora::detail::require(block >= min_basis_block && block <= max_basis_block && (block & (block - 1)) == 0, function,
                            "config.basis_block must be a power of two in [", min_basis_block, ", ", max_basis_block, "], got ", block);
}

/// The largest code magnitude of a quantised format (0 for float32).
constexpr int basis_qmax(basis_format f) noexcept { return f == basis_format::int8 ? 127 : f == basis_format::int4 ? 7 : 0; }

/// A rank×len basis in a quantised format: codes row by row (len bytes per row for int8,
/// ceil(len/2) for int4) and the scales of each row's blocks. Host memory. Encoding and decoding
/// are element-wise (no sum), so their bits depend on nothing but the values.
class quantized_basis {
public:
    /// Empty, for rows `len` long in `format` with blocks of `block`.
    void configure(basis_format format, index_t len, index_t block) noexcept {
        format_ = format;
        len_ = len;
        block_ = block;
        rows_ = 0;
        codes_.clear();
        scales_.clear();
    }

    [[nodiscard]] basis_format format() const noexcept { return format_; }
    [[nodiscard]] bool quantized() const noexcept { return format_ != basis_format::float32; }
    [[nodiscard]] index_t rows() const noexcept { return rows_; }
    [[nodiscard]] index_t len() const noexcept { return len_; }
    [[nodiscard]] index_t block() const noexcept { return block_; }
    [[nodiscard]] index_t row_bytes() const noexcept { return format_ == basis_format::int4 ? (len_ + 1) / 2 : len_; }
    [[nodiscard]] index_t blocks_per_row() const noexcept { return (len_ + block_ - 1) / block_; }
    /// Bytes held: the codes and a float per block.
    [[nodiscard]] std::size_t bytes() const noexcept { return codes_.size() + sizeof(float) * scales_.size(); }
    /// Bytes a rank-r basis holds.
    [[nodiscard]] std::size_t bytes_at(index_t r) const noexcept {
        return static_cast<std::size_t>(r) * (static_cast<std::size_t>(row_bytes()) + sizeof(float) * static_cast<std::size_t>(blocks_per_row()));
    }

    /// Room for that many codes bytes and scales (allocates; configure and encode keep the
    /// capacity, so later encodes within it allocate nothing, whatever the shape).
    void reserve_bytes(std::size_t codes, std::size_t scales) {
        codes_.reserve(codes);
        scales_.reserve(scales);
    }
    /// Bytes reserved (capacities).
    [[nodiscard]] std::size_t reserved_bytes() const noexcept { return codes_.capacity() + sizeof(float) * scales_.capacity(); }

    /// Encodes `rows` rows of `src` (row stride `ld`, finite values) in place of what is held.
    void encode(const float* src, index_t rows, index_t ld) {
        codes_.assign(static_cast<std::size_t>(rows * row_bytes()), 0);
        scales_.assign(static_cast<std::size_t>(rows * blocks_per_row()), 0.0f);
        rows_ = rows;
        const int qmax = basis_qmax(format_);
        for (index_t i = 0; i < rows; ++i) {
            const float* x = src + i * ld;
            for (index_t b = 0; b < blocks_per_row(); ++b) {
                const index_t first = b * block_, last = std::min(len_, first + block_);
                float absmax = 0;
                for (index_t j = first; j < last; ++j) absmax = std::max(absmax, std::abs(x[j]));
                // The scale as stored and the inverse the encoder multiplies by; an all-zero block
                // (or one below the smallest normal float) is stored as scale 0, codes 0.
                const bool zero = !(absmax >= std::numeric_limits<float>::min());   // (its inverse could overflow)
                scales_[static_cast<std::size_t>(i * blocks_per_row() + b)] = zero ? 0.0f : absmax / static_cast<float>(qmax);
                const float inverse = zero ? 0.0f : static_cast<float>(qmax) / absmax;
                for (index_t j = first; j < last; ++j) {
                    const float q = std::clamp(std::nearbyint(x[j] * inverse), -static_cast<float>(qmax), static_cast<float>(qmax));
                    put_code(i, j, static_cast<int>(q));
                }
            }
        }
    }

    /// Q's rows into `dst` (row stride `ld`): code · scale, one product per element, block by
    /// block. int8: a plain widening and product, which the compiler vectorises; int4: through
    /// velora/backend/cpu/int4_decode.hpp's explicit vector bodies (g++ 12 left the plain nibble
    /// loop scalar, ~10x the int8 one, docs/performance.md), `body` choosing one for tests (every
    /// body gives the same bits).
    void decode(float* dst, index_t ld, velora::cpu::simd_body body = velora::cpu::widest_body) const noexcept {
        for (index_t i = 0; i < rows_; ++i) {
            float* y = dst + i * ld;
            const std::uint8_t* row = codes_.data() + i * row_bytes();
            for (index_t b = 0; b < blocks_per_row(); ++b) {
                const float s = scales_[static_cast<std::size_t>(i * blocks_per_row() + b)];
                const index_t first = b * block_, last = std::min(len_, first + block_);
                if (format_ == basis_format::int8) {
                    for (index_t j = first; j < last; ++j) y[j] = static_cast<float>(static_cast<std::int8_t>(row[j])) * s;
                } else {   // two codes a byte: `first` is even (blocks are powers of two >= 32), so a block starts at a byte
                    velora::cpu::int4_decode(row + first / 2, last - first, s, y + first, body);
                }
            }
        }
    }

    /// δ_i = ½·sqrt(Σ_b n_b·s_b²) of row i (in double): the bound on ‖P_i − Q_i‖ (see the file's comment).
    [[nodiscard]] double row_error_bound(index_t i) const noexcept {
        double sum = 0;
        for (index_t b = 0; b < blocks_per_row(); ++b) {
            const double s = scales_[static_cast<std::size_t>(i * blocks_per_row() + b)];
            const double n = static_cast<double>(std::min(len_, (b + 1) * block_) - b * block_);
            sum += n * s * s;
        }
        return 0.5 * std::sqrt(sum);
    }

    /// The bound on max |Q·Qᵀ − I| for a quantised P whose rows are orthonormal within `tolerance`
    /// (max |P·Pᵀ − I| <= tolerance, so every ‖P_i‖ <= sqrt(1 + tolerance)): Q_i·Q_j − δ_ij =
    /// (P_i·P_j − δ_ij) + P_i·e_j + e_i·P_j + e_i·e_j, hence 2δ·sqrt(1 + tolerance) + δ² + tolerance
    /// with δ the largest row bound (plus the decode's rounding, one unit per element, relative).
    [[nodiscard]] double deviation_bound(double tolerance = 0) const noexcept {
        double delta = 0;
        for (index_t i = 0; i < rows_; ++i) delta = std::max(delta, row_error_bound(i));
        delta += 0x1p-23;
        return 2 * delta * std::sqrt(1 + tolerance) + delta * delta + tolerance;
    }

    /// The a-priori bound on δ for any row of norm <= 1: n_b·s_b² <= block·absmax_b²/qmax² and
    /// Σ_b absmax_b² <= ‖row‖² <= 1, so δ <= sqrt(block)/(2·qmax).
    [[nodiscard]] static double a_priori_row_bound(basis_format f, index_t block) noexcept {
        return std::sqrt(static_cast<double>(block)) / (2.0 * basis_qmax(f));
    }

    // The arrays as saved (optimizer_state_io.hpp).
    [[nodiscard]] const std::vector<std::uint8_t>& codes() const noexcept { return codes_; }
    [[nodiscard]] const std::vector<float>& scales() const noexcept { return scales_; }
    /// Takes arrays checked by the loader (rows·row_bytes() codes, rows·blocks_per_row() scales).
    void adopt(index_t rows, std::vector<std::uint8_t> codes, std::vector<float> scales) noexcept {
        codes_ = std::move(codes);
        scales_ = std::move(scales);
        rows_ = rows;
    }
    /// Copies another basis' rows and arrays into this one's storage (same format and shape;
    /// allocates only beyond the reserved capacity).
    void assign(const quantized_basis& o) {
        codes_.assign(o.codes_.begin(), o.codes_.end());
        scales_.assign(o.scales_.begin(), o.scales_.end());
        rows_ = o.rows_;
    }
    /// Whether a saved code byte is one the encoder writes: int8 codes are -127..127 (the byte
    /// 0x80, -128, is not); int4 nibbles hold code + 8 in 1..15 (0 is not), and the unused high
    /// nibble of an odd-length row's last byte is 0.
    [[nodiscard]] static bool valid_code_byte(basis_format f, std::uint8_t byte, bool half) noexcept {
        if (f == basis_format::int8) return byte != 0x80;
        const unsigned lo = byte & 0xFu, hi = byte >> 4;
        return lo != 0 && (half ? hi == 0 : hi != 0);
    }

private:
    void put_code(index_t i, index_t j, int q) noexcept {
        std::uint8_t* row = codes_.data() + i * row_bytes();
        if (format_ == basis_format::int8) {
            row[j] = static_cast<std::uint8_t>(static_cast<std::int8_t>(q));
            return;
        }
        const auto nibble = static_cast<std::uint8_t>(q + 8);
        row[j / 2] = static_cast<std::uint8_t>(j % 2 == 0 ? (row[j / 2] & 0xF0u) | nibble : (row[j / 2] & 0x0Fu) | (nibble << 4));
    }

    basis_format format_ = basis_format::float32;
    index_t len_ = 0, block_ = default_basis_block, rows_ = 0;
    std::vector<std::uint8_t> codes_;
    std::vector<float> scales_;
};

} // namespace adarank
