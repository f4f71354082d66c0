#pragma once
/// \file
/// QLoRA's NF4 (4-bit NormalFloat) for frozen base weights: blockwise quantisation of a
/// row-major O×D float matrix, the packed host form (`nf4_weight`), its dequantisation and its
/// checksummed state blob. The GEMMs over it are nf4_frozen_weight.hpp; the format is
/// docs/nf4.md; the arithmetic shared with the GPU is nf4_layout.hpp.
///
/// Quantisation, as bitsandbytes' kQuantizeBlockwise does it for NF4:
/// - blocks of `block_size` (default 64) consecutive weights of a row; block_size must be even
///   and divide D, so blocks never straddle rows and a tile of rows dequantises on its own
///   (bitsandbytes blocks the flattened tensor; with block_size | D the blocks are the same);
/// - absmax = max |w| over the block, in float, stored as is;
/// - x = w · (1/absmax), the reciprocal and the product in float (bitsandbytes multiplies by
///   the reciprocal: its bits, not w/absmax's). Where 1/absmax is not a normal float (absmax
///   above 2^126 or below 2^-126) x = w/absmax in double, rounded to float, so no block loses
///   its precision to a subnormal reciprocal;
/// - code = the number of the 15 thresholds t_i that x exceeds, t_i = the midpoint of codes i
///   and i + 1 computed in double and rounded to float (bitsandbytes' decision tree with its
///   literals, which are exactly these midpoints). So: the nearest code, a tie going to the
///   lower code; and at the six thresholds where float(t_i) lies above the exact midpoint
///   (i = 0, 1, 3, 4, 12, 14), x == float(t_i) also goes to the lower code although the upper
///   one is nearer by less than an ulp. A NaN x cannot occur (W is checked finite);
/// - an all-zero block stores absmax 0 and code 7 (the exact 0) throughout. (bitsandbytes
///   computes 0 · (1/0) = NaN there and stores code 0, which dequantises to −0: the same
///   weights up to the sign of zero.)
/// - packing: weight i (= r·D + c) is the high nibble of byte i/2 when i is even, the low
///   nibble when odd (bitsandbytes: `(q(w0) << 4) | q(w1)`).
///
/// Double quantisation (QLoRA §3, optional): the block absmaxes a_b lose their mean
/// μ = float(Σ a_b / n) (summed in double in block order), then every group of 256 consecutive
/// blocks (the last may be shorter) is quantised **linearly** to int8: s_g = float(max |a_b − μ|
/// / 127), q_b = clamp(round_half_even((a_b − μ)/s_g), −127, 127), in double (s_g = 0 ⇒ q_b = 0).
/// Dequantised: a'_b = max(0, fma(q_b, s_g, μ)) in float (an absmax is never negative; the
/// clamp can only bring a'_b nearer to a_b). bitsandbytes uses its dynamic (log-spaced) 8-bit
/// map here instead, which keeps more relative precision for small absmaxes; the linear code
/// is simpler and has the same storage: 8 bits per block + 32 bits per 256 blocks + 32 bits
/// once. Its error: |a_b − a'_b| ≤ s_g/2 = max_g |a − μ| / 254 (plus float rounding).
///
/// Storage (bits per weight, O·D weights, n = O·D/block_size blocks):
///   plain:   4 + 32/block_size                                     (64: 4.5)
///   double:  4 + 8/block_size + 32·ceil(n/256)/(O·D) + 32/(O·D)   (64: ≈ 4.1270; 4096×4096:
///            4.126953 + 2e-6 = 4.1269550)
/// stored_bytes() counts exactly these bytes (codes, absmaxes or their codes, scales, mean).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/serialize.hpp"
#include "../core/view.hpp"
#include "nf4_layout.hpp"

namespace velora {

/// The 16 NF4 code values in order (the same table as nf4_code(i)).
inline constexpr std::array<float, 16> nf4_code_table = [] {
    std::array<float, 16> t{};
    for (unsigned i = 0; i < 16; ++i) t[i] = nf4_code(i);
    return t;
}();

/// The 15 decision thresholds: float(midpoint of codes i and i + 1, computed in double).
inline constexpr std::array<float, 15> nf4_thresholds = [] {
    std::array<float, 15> t{};
    for (unsigned i = 0; i < 15; ++i) t[i] = static_cast<float>((static_cast<double>(nf4_code(i)) + static_cast<double>(nf4_code(i + 1))) / 2);
    return t;
}();

/// The NF4 code of a normalised value x (bitsandbytes' dQuantizeNF4: x > t_i moves up a code).
constexpr unsigned nf4_quantize_value(float x) noexcept {
    unsigned code = 0;
    for (float t : nf4_thresholds) code += x > t ? 1u : 0u;
    return code;
}

/// Largest half gap between adjacent codes (between −1 and −0.6962…: 0.1519): |x − code(x)| ≤ this for
/// x in [−1, 1], so |w − ŵ| ≤ absmax · nf4_max_half_gap per weight (plus float rounding).
inline constexpr double nf4_max_half_gap = [] {
    double g = 0;
    for (unsigned i = 0; i < 15; ++i) g = std::max(g, (static_cast<double>(nf4_code(i + 1)) - static_cast<double>(nf4_code(i))) / 2);
    return g;
}();

struct nf4_options {
    index_t block_size = 64;     ///< weights per absmax; even, divides the row length D
    bool double_quant = false;   ///< quantise the absmaxes to int8 (groups of nf4_absmax_group blocks)
};

/// An NF4-quantised O×D weight in host memory (owning). A value type: copyable, movable; an
/// empty one (default-constructed) has 0 rows.
class nf4_weight {
public:
    static constexpr std::string_view state_kind = "velora.nf4_weight";
    static constexpr std::uint32_t state_version = 1;

    nf4_weight() = default;

    /// Quantises W (O×D, host memory, any leading dimension). Throws std::invalid_argument
    /// naming velora::nf4_weight::quantize, the argument and the values when W is empty, when
    /// options.block_size is not a positive even divisor of D, when W has a non-finite value
    /// (its position and value), or when O·D does not fit the address space.
    [[nodiscard]] static nf4_weight quantize(const_matrix_view<float> w, nf4_options options = {}) {
        constexpr const char* fn = "velora::nf4_weight::quantize";
        check_view(w, fn, "w");
        check_block_size(fn, options.block_size, w.cols);
        const index_t n = checked_weights(fn, w.rows, w.cols);
        for (index_t r = 0; r < w.rows; ++r)
            for (index_t c = 0; c < w.cols; ++c)
                detail::require(std::isfinite(w(r, c)), fn, "argument 'w' has a non-finite value: w[", r, ", ", c, "] = ", w(r, c),
                                " (NF4 scales each block by its largest magnitude, which must be finite)");
        nf4_weight q;
        q.rows_ = w.rows;
        q.cols_ = w.cols;
        q.block_size_ = options.block_size;
        q.codes_.assign(static_cast<std::size_t>(n / 2), std::uint8_t{0});
        std::vector<float> absmax(static_cast<std::size_t>(n / options.block_size));
        const index_t bpr = w.cols / options.block_size;
        for (index_t r = 0; r < w.rows; ++r)
            for (index_t k = 0; k < bpr; ++k)
                absmax[static_cast<std::size_t>(r * bpr + k)] =
                    quantize_block(w.row(r) + k * options.block_size, options.block_size, q.codes_.data() + (r * w.cols + k * options.block_size) / 2);
        if (options.double_quant) q.double_quantize(fn, absmax);
        else q.absmax_ = std::move(absmax);
        return q;
    }

    [[nodiscard]] index_t rows() const noexcept { return rows_; }
    [[nodiscard]] index_t cols() const noexcept { return cols_; }
    [[nodiscard]] index_t block_size() const noexcept { return block_size_; }
    [[nodiscard]] bool double_quantized() const noexcept { return double_quant_; }
    [[nodiscard]] bool empty() const noexcept { return rows_ == 0; }
    /// Number of absmax blocks, O·D / block_size.
    [[nodiscard]] index_t blocks() const noexcept { return rows_ == 0 ? 0 : rows_ * (cols_ / block_size_); }
    /// Number of double-quantisation groups (0 when not double-quantised).
    [[nodiscard]] index_t absmax_groups() const noexcept { return static_cast<index_t>(absmax_scales_.size()); }

    /// The packed codes, O·D/2 bytes (nibble order: nf4_layout.hpp).
    [[nodiscard]] std::span<const std::uint8_t> codes() const noexcept { return codes_; }
    /// One float per block (empty when double-quantised).
    [[nodiscard]] std::span<const float> absmax() const noexcept { return absmax_; }
    /// Double quantisation: one int8 code per block, one float scale per group, the mean.
    [[nodiscard]] std::span<const std::int8_t> absmax_codes() const noexcept { return absmax_codes_; }
    [[nodiscard]] std::span<const float> absmax_scales() const noexcept { return absmax_scales_; }
    [[nodiscard]] float absmax_mean() const noexcept { return absmax_mean_; }
    /// The absmax block b is dequantised with (stored, or rebuilt from its int8 code).
    [[nodiscard]] float block_absmax(index_t b) const noexcept { return nf4_block_absmax(blocks_view(), b); }

    /// Host pointers in the shape the dequantisation kernels take.
    [[nodiscard]] nf4_blocks blocks_view() const noexcept {
        nf4_blocks v;
        v.codes = codes_.data();
        v.absmax = double_quant_ ? nullptr : absmax_.data();
        v.absmax_codes = double_quant_ ? absmax_codes_.data() : nullptr;
        v.absmax_scales = double_quant_ ? absmax_scales_.data() : nullptr;
        v.absmax_mean = absmax_mean_;
        v.rows = rows_;
        v.cols = cols_;
        v.block_size = block_size_;
        return v;
    }

    /// out = Ŵ[first_row : first_row + out.rows, :] (out.cols must be D), T = float or double:
    /// the dequantised values exactly (float products, exact in double). Throws
    /// std::invalid_argument for a row range outside W or a wrong width.
    template <class T>
        requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
    void dequantize_rows(index_t first_row, matrix_view<T> out) const {
        constexpr const char* fn = "velora::nf4_weight::dequantize_rows";
        check_rows(fn, first_row, out);
        nf4_dequantize_rows_host(blocks_view(), first_row, out.rows, out.data, out.ld);
    }

    /// Bytes of the stored weight: codes + absmaxes (or their codes + group scales + mean).
    [[nodiscard]] std::size_t stored_bytes() const noexcept {
        return codes_.size() + absmax_.size() * sizeof(float) + absmax_codes_.size() + absmax_scales_.size() * sizeof(float) +
               (double_quant_ ? sizeof(float) : 0);
    }
    /// 8 · stored_bytes() / (O·D); 0 for an empty weight.
    [[nodiscard]] double bits_per_weight() const noexcept {
        return rows_ == 0 ? 0.0 : 8.0 * static_cast<double>(stored_bytes()) / (static_cast<double>(rows_) * static_cast<double>(cols_));
    }
    /// What stored_bytes() is for an O×D weight quantised with `options` (the formula; sizes
    /// assumed valid).
    [[nodiscard]] static constexpr std::size_t stored_bytes_for(index_t rows, index_t cols, nf4_options options) noexcept {
        const auto n = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
        const std::size_t blocks = n / static_cast<std::size_t>(options.block_size);
        if (!options.double_quant) return n / 2 + 4 * blocks;
        const std::size_t groups = (blocks + nf4_absmax_group - 1) / nf4_absmax_group;
        return n / 2 + blocks + 4 * groups + 4;
    }

    // ------------------------------------------------------------------ state
    /// "velora.nf4_weight" version 1: rows (i64), cols (i64), block size (i64), double
    /// quantisation (u8), absmax group (i64, 256), codes (u8 array, O·D/2), then either the
    /// absmaxes (f32 array, one per block) or their int8 codes (i8 array, one per block), the
    /// group scales (f32 array) and the mean (f32).
    [[nodiscard]] std::vector<std::byte> save_state() const {
        detail::require(!empty(), "velora::nf4_weight::save_state", "the weight is empty (nothing was quantised or loaded)");
        state_writer w(state_kind, state_version);
        w.put(static_cast<std::int64_t>(rows_));
        w.put(static_cast<std::int64_t>(cols_));
        w.put(static_cast<std::int64_t>(block_size_));
        w.put(static_cast<std::uint8_t>(double_quant_));
        w.put(static_cast<std::int64_t>(nf4_absmax_group));
        w.put_array(std::span<const std::uint8_t>(codes_));
        if (double_quant_) {
            w.put_array(std::span<const std::int8_t>(absmax_codes_));
            w.put_array(std::span<const float>(absmax_scales_));
            w.put(absmax_mean_);
        } else {
            w.put_array(std::span<const float>(absmax_));
        }
        return std::move(w).finish();
    }

    /// Replaces this weight (shape included) with the one in `blob`. Throws state_format_error
    /// (a std::invalid_argument) naming velora::nf4_weight::load_state and changes nothing when
    /// the blob is truncated, corrupted, of another kind or version, or describes a weight that
    /// quantize() cannot produce: a shape or block size it refuses, array lengths that do not
    /// match the shape, an absmax that is negative, −0 or not finite, a block whose codes are
    /// neither all 7 (zero block) nor contain a 0 or 15 (the block's extreme maps to ±1), a
    /// zero block with a non-zero absmax or the reverse, an int8 code of −128, a group scale
    /// that is negative, −0 or not finite, a zero scale with non-zero codes, a mean that is
    /// negative or not finite, or a rebuilt absmax that is not finite.
    void load_state(std::span<const std::byte> blob) {
        constexpr const char* fn = "velora::nf4_weight::load_state";
        state_reader r(blob, state_kind, state_version, fn);
        const auto rows = r.get<std::int64_t>();
        const auto cols = r.get<std::int64_t>();
        const auto block = r.get<std::int64_t>();
        const auto dq = r.get<std::uint8_t>();
        const auto group = r.get<std::int64_t>();
        if (rows < 1 || cols < 1) r.bad("state has a ", rows, "x", cols, " weight (needs at least one row and one column)");
        if (block < 2 || block % 2 != 0 || cols % block != 0)
            r.bad("state has block size ", block, " for rows of ", cols, " weights (must be a positive even divisor of the row length)");
        std::int64_t n = 0;
        if (__builtin_mul_overflow(rows, cols, &n) || n > std::numeric_limits<std::int64_t>::max() / 8)
            r.bad("state has a ", rows, "x", cols, " weight, more weights than the address space holds");
        if (dq > 1) r.bad("state has the double quantisation flag = ", +dq, " (must be 0 or 1)");
        if (group != nf4_absmax_group) r.bad("state has absmax groups of ", group, " blocks (this build uses ", nf4_absmax_group, ")");
        nf4_weight q;
        q.rows_ = rows;
        q.cols_ = cols;
        q.block_size_ = block;
        q.double_quant_ = dq != 0;
        q.codes_ = r.get_array<std::uint8_t>(n / 2);
        const index_t blocks = n / block;
        if (q.double_quant_) {
            q.absmax_codes_ = r.get_array<std::int8_t>(blocks);
            q.absmax_scales_ = r.get_array<float>((blocks + nf4_absmax_group - 1) / nf4_absmax_group);
            q.absmax_mean_ = r.get<float>();
        } else {
            q.absmax_ = r.get_array<float>(blocks);
        }
        r.expect_end();
        q.check_meaning(r);
        *this = std::move(q);
    }

private:
    static void check_block_size(const char* fn, index_t block, index_t cols) {
        detail::require(block > 0 && block % 2 == 0, fn, "argument 'options.block_size' = ", block,
                        " must be a positive even number (two 4-bit codes per byte)");
        detail::require(cols % block == 0, fn, "argument 'options.block_size' = ", block, " does not divide a row of 'w' (", cols,
                        " columns); NF4 blocks may not straddle rows");
    }

    static index_t checked_weights(const char* fn, index_t rows, index_t cols) {
        return detail::checked_elements(detail::checked_mul(rows, cols, fn, "the number of weights of 'w'"), 8, fn,
                                        "the number of weights of 'w'");
    }

    template <class T>
    void check_rows(const char* fn, index_t first_row, const matrix_view<T>& out) const {
        detail::require(!empty(), fn, "the weight is empty");
        check_view(out, fn, "out");
        detail::require(out.cols == cols_, fn, "argument 'out' has ", out.cols, " columns but the weight has D = ", cols_);
        detail::require(first_row >= 0 && first_row <= rows_ && out.rows <= rows_ - first_row, fn, "rows [", first_row, ", ", first_row,
                        " + ", out.rows, ") are not within the weight's ", rows_, " rows");
    }

    // Quantises one block of `size` weights into size/2 bytes at `dst`; returns its absmax.
    static float quantize_block(const float* w, index_t size, std::uint8_t* dst) noexcept {
        float absmax = 0.0f;
        for (index_t j = 0; j < size; ++j) absmax = std::max(absmax, std::fabs(w[j]));
        if (absmax == 0.0f) {   // the exact zero, code 7, for every weight
            std::fill_n(dst, size / 2, std::uint8_t{0x77});
            return 0.0f;
        }
        const float inv = 1.0f / absmax;
        const bool reciprocal = std::isnormal(inv);
        auto code = [&](float v) {
            const float x = reciprocal ? v * inv : static_cast<float>(static_cast<double>(v) / static_cast<double>(absmax));
            return nf4_quantize_value(x);
        };
        for (index_t j = 0; j < size / 2; ++j) dst[j] = static_cast<std::uint8_t>((code(w[2 * j]) << 4) | code(w[2 * j + 1]));
        return absmax;
    }

    void double_quantize(const char* fn, const std::vector<float>& absmax) {
        double_quant_ = true;
        double sum = 0;
        for (float a : absmax) sum += a;
        absmax_mean_ = static_cast<float>(sum / static_cast<double>(absmax.size()));
        const double mean = absmax_mean_;
        const auto n = static_cast<index_t>(absmax.size());
        absmax_codes_.assign(absmax.size(), std::int8_t{0});
        absmax_scales_.assign(static_cast<std::size_t>((n + nf4_absmax_group - 1) / nf4_absmax_group), 0.0f);
        for (index_t g = 0; g * nf4_absmax_group < n; ++g) {
            const index_t first = g * nf4_absmax_group, last = std::min(n, first + nf4_absmax_group);
            double m = 0;
            for (index_t b = first; b < last; ++b) m = std::max(m, std::fabs(static_cast<double>(absmax[static_cast<std::size_t>(b)]) - mean));
            const float scale = static_cast<float>(m / 127.0);
            absmax_scales_[static_cast<std::size_t>(g)] = scale;
            if (scale == 0.0f) continue;   // all equal to the mean (or differences below the smallest float): q = 0
            for (index_t b = first; b < last; ++b) {
                const double q = std::nearbyint((static_cast<double>(absmax[static_cast<std::size_t>(b)]) - mean) / static_cast<double>(scale));
                absmax_codes_[static_cast<std::size_t>(b)] = static_cast<std::int8_t>(std::clamp(q, -127.0, 127.0));
            }
        }
        for (index_t b = 0; b < n; ++b)
            detail::require(std::isfinite(block_absmax(b)), fn, "the double-quantised absmax of block ", b, " (absmax ",
                            absmax[static_cast<std::size_t>(b)], ") is not finite; quantise 'w' without double quantisation");
    }

    // The invariants of every weight quantize() produces (see load_state).
    void check_meaning(const state_reader& r) const {
        const index_t bpr = cols_ / block_size_;
        const index_t n = blocks();
        for (index_t b = 0; b < n; ++b) {
            const std::uint8_t* bytes = codes_.data() + ((b / bpr) * cols_ + (b % bpr) * block_size_) / 2;
            bool all_zero = true, extreme = false;
            for (index_t j = 0; j < block_size_ / 2; ++j) {
                const unsigned hi = bytes[j] >> 4, lo = bytes[j] & 0x0fu;
                all_zero = all_zero && hi == 7 && lo == 7;
                extreme = extreme || hi == 0 || hi == 15 || lo == 0 || lo == 15;
            }
            if (!all_zero && !extreme)
                r.bad("state has block ", b, " whose codes are neither all 7 (a zero block) nor include 0 or 15 (its largest magnitude)");
            if (!double_quant_) {
                const float a = absmax_[static_cast<std::size_t>(b)];
                if (!std::isfinite(a) || a < 0.0f || std::signbit(a)) r.bad("state has absmax[", b, "] = ", a, " (must be finite and >= +0)");
                if ((a == 0.0f) != all_zero)
                    r.bad("state has absmax[", b, "] = ", a, all_zero ? " for a block of zeros (must be 0)" : " for a block that is not all zero");
            } else {
                const auto q = absmax_codes_[static_cast<std::size_t>(b)];
                if (q == std::numeric_limits<std::int8_t>::min()) r.bad("state has absmax code[", b, "] = -128 (codes are -127..127)");
            }
        }
        if (!double_quant_) return;
        if (!std::isfinite(absmax_mean_) || absmax_mean_ < 0.0f || std::signbit(absmax_mean_))
            r.bad("state has absmax mean ", absmax_mean_, " (must be finite and >= +0)");
        for (std::size_t g = 0; g < absmax_scales_.size(); ++g) {
            const float s = absmax_scales_[g];
            if (!std::isfinite(s) || s < 0.0f || std::signbit(s)) r.bad("state has absmax scale[", g, "] = ", s, " (must be finite and >= +0)");
            if (s == 0.0f) {
                const auto first = g * static_cast<std::size_t>(nf4_absmax_group);
                const auto last = std::min(absmax_codes_.size(), first + static_cast<std::size_t>(nf4_absmax_group));
                for (auto b = first; b < last; ++b)
                    if (absmax_codes_[b] != 0) r.bad("state has absmax scale[", g, "] = 0 but absmax code[", b, "] = ", +absmax_codes_[b], " (must be 0)");
            }
        }
        for (index_t b = 0; b < n; ++b)
            if (!std::isfinite(block_absmax(b))) r.bad("state has block ", b, " whose rebuilt absmax ", block_absmax(b), " is not finite");
    }

    index_t rows_ = 0;
    index_t cols_ = 0;
    index_t block_size_ = 64;
    bool double_quant_ = false;
    std::vector<std::uint8_t> codes_;
    std::vector<float> absmax_;
    std::vector<std::int8_t> absmax_codes_;
    std::vector<float> absmax_scales_;
    float absmax_mean_ = 0.0f;
};

} // namespace velora
