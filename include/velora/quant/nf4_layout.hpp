#pragma once
/// \file
/// The NF4 format's arithmetic that every backend shares: QLoRA's 16 code values, the packed
/// layout, and how one stored value becomes a number. Plain C++ marked VELORA_HOST_DEVICE, so
/// the CPU backend's loop and the CUDA kernel (cuda/include/velora/cuda/nf4.cuh) compile the
/// same definitions and dequantise to the same bits. No allocation, no exceptions, no includes
/// beyond <cstdint>/<cstddef>: a CUDA translation unit can include it.
///
/// Layout of an O×D weight (row-major, blocks of `block_size` consecutive weights of a row;
/// block_size is even and divides D, so block b covers row b / (D / block_size) and a tile of
/// rows dequantises without reading its neighbours):
/// - codes: O·D/2 bytes; weight i = r·D + c is the nibble of byte i/2, the **high nibble for
///   even i**, the low nibble for odd i (bitsandbytes' order: `(q(w0) << 4) | q(w1)`);
/// - absmax: one float per block, or, double-quantised, one int8 code per block plus one float
///   scale per group of nf4_absmax_group (256) consecutive blocks and one float mean for the
///   whole weight: absmax'(b) = max(+0, fma(float(q[b]), scale[b / 256], mean)).
/// - value: ŵ = nf4_code(nibble) · absmax'(b), one float multiplication (exact in double).
#include <cstddef>
#include <cstdint>

#include "../core/host_device.hpp"

namespace velora {

/// Blocks of absmaxes that share one scale under double quantisation (QLoRA: 256).
inline constexpr std::ptrdiff_t nf4_absmax_group = 256;

/// QLoRA's NF4 code value `i` (0..15), as float: the quantiles of N(0, 1) normalised to
/// [-1, 1] with an exact 0 (bitsandbytes' table, to the last bit). Out-of-range i gives 0.
VELORA_HOST_DEVICE constexpr float nf4_code(unsigned i) noexcept {
    // A function-local table (not a namespace-scope array) so device code can read it too.
    const float table[16] = {-1.0f,
                             -0.6961928009986877f,
                             -0.5250730514526367f,
                             -0.39491748809814453f,
                             -0.28444138169288635f,
                             -0.18477343022823334f,
                             -0.09105003625154495f,
                             0.0f,
                             0.07958029955625534f,
                             0.16093020141124725f,
                             0.24611230194568634f,
                             0.33791524171829224f,
                             0.44070982933044434f,
                             0.5626170039176941f,
                             0.7229568362236023f,
                             1.0f};
    return i < 16 ? table[i] : 0.0f;
}

/// Where one NF4 weight lives: pointers into memory the caller's backend can read (host memory
/// for the CPU backend, device memory for CUDA), and the shape. Non-owning, trivially copyable
/// (passed to kernels by value).
struct nf4_blocks {
    const std::uint8_t* codes = nullptr;         ///< rows·cols/2 packed bytes
    const float* absmax = nullptr;               ///< one per block; null when double-quantised
    const std::int8_t* absmax_codes = nullptr;   ///< one per block (double-quantised only)
    const float* absmax_scales = nullptr;        ///< one per nf4_absmax_group blocks (double-quantised only)
    float absmax_mean = 0.0f;                    ///< added back to every block's absmax (double-quantised only)
    std::ptrdiff_t rows = 0;
    std::ptrdiff_t cols = 0;
    std::ptrdiff_t block_size = 64;

    [[nodiscard]] VELORA_HOST_DEVICE constexpr bool double_quantized() const noexcept { return absmax == nullptr; }
    [[nodiscard]] VELORA_HOST_DEVICE constexpr std::ptrdiff_t blocks_per_row() const noexcept { return cols / block_size; }
};

namespace detail {
/// fma in single precision, one rounding, on both sides (nvcc would contract a·b + c into an
/// fma on the device only: spelling it keeps the host's bits equal to the device's).
VELORA_HOST_DEVICE inline float nf4_fmaf(float a, float b, float c) noexcept {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return __builtin_fmaf(a, b, c);
#endif
}
} // namespace detail

/// The absmax block `b` is scaled by: stored, or rebuilt from its double-quantised code and
/// clamped at +0 (an absmax is never negative; written as a comparison, not fmaxf, so that −0
/// and the operand order cannot make the two sides differ).
VELORA_HOST_DEVICE inline float nf4_block_absmax(const nf4_blocks& w, std::ptrdiff_t b) noexcept {
    if (!w.double_quantized()) return w.absmax[b];
    const float a = detail::nf4_fmaf(static_cast<float>(w.absmax_codes[b]), w.absmax_scales[b / nf4_absmax_group], w.absmax_mean);
    return a > 0.0f ? a : 0.0f;
}

/// The 4-bit code of weight i (row-major index r·cols + c).
VELORA_HOST_DEVICE inline unsigned nf4_nibble(const std::uint8_t* codes, std::ptrdiff_t i) noexcept {
    const unsigned byte = codes[i / 2];
    return (i % 2 == 0) ? (byte >> 4) : (byte & 0x0fu);
}

/// Dequantises W[first_row + r, :] for r < count into out (row stride ld_out), as T: ŵ =
/// nf4_code · absmax in float, then converted (exactly, for float and double). Host loop of
/// the CPU backend; the CUDA kernel computes the same expression per element.
template <class T>
void nf4_dequantize_rows_host(const nf4_blocks& w, std::ptrdiff_t first_row, std::ptrdiff_t count, T* out, std::ptrdiff_t ld_out) {
    const std::ptrdiff_t bpr = w.blocks_per_row();
    for (std::ptrdiff_t r = 0; r < count; ++r) {
        const std::ptrdiff_t row = first_row + r;
        T* dst = out + r * ld_out;
        const std::uint8_t* src = w.codes + row * w.cols / 2;   // cols is even: a row starts on a byte
        for (std::ptrdiff_t k = 0; k < bpr; ++k) {
            const float a = nf4_block_absmax(w, row * bpr + k);
            // The 16 possible values of this block, then a table look-up per nibble.
            float v[16];
            for (unsigned q = 0; q < 16; ++q) v[q] = nf4_code(q) * a;
            const std::uint8_t* bytes = src + k * w.block_size / 2;
            T* d = dst + k * w.block_size;
            for (std::ptrdiff_t j = 0; j < w.block_size / 2; ++j) {
                d[2 * j] = static_cast<T>(v[bytes[j] >> 4]);
                d[2 * j + 1] = static_cast<T>(v[bytes[j] & 0x0fu]);
            }
        }
    }
}

} // namespace velora
