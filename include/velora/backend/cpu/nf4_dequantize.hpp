#pragma once
/// \file
/// The CPU backend's NF4 dequantisation of one row (quant/nf4_layout.hpp's arithmetic, the same
/// bits): per block, the 16 values nf4_code(q)·absmax in float, then one table look-up per
/// nibble. With AVX-512 (float output, block_size a multiple of 32) the table lives in one
/// register and 32 weights are looked up with two `vpermps` per 16 packed bytes; otherwise the
/// portable loop of nf4_layout.hpp. Either way each output is the same float product, so the
/// bits do not depend on the path.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../../quant/nf4_layout.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace velora::cpu {

/// out[c] = Ŵ[row, c] for c < w.cols.
template <class T>
void nf4_dequantize_row(const nf4_blocks& w, std::ptrdiff_t row, T* out) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
        if (w.block_size % 32 == 0) {
            alignas(64) static constexpr float codes[16] = {nf4_code(0),  nf4_code(1),  nf4_code(2),  nf4_code(3),  nf4_code(4),  nf4_code(5),
                                                            nf4_code(6),  nf4_code(7),  nf4_code(8),  nf4_code(9),  nf4_code(10), nf4_code(11),
                                                            nf4_code(12), nf4_code(13), nf4_code(14), nf4_code(15)};
            const __m512 code_values = _mm512_load_ps(codes);
            // Weight 2j is byte j's high nibble, 2j + 1 its low nibble: interleave the two.
            const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            const __m512i low_mask = _mm512_set1_epi32(0x0f);
            const std::ptrdiff_t bpr = w.blocks_per_row();
            const std::uint8_t* src = w.codes + row * w.cols / 2;
            for (std::ptrdiff_t k = 0; k < bpr; ++k) {
                // The same float products as the portable loop: nf4_code(q) · absmax, rounded once.
                const __m512 table = _mm512_mul_ps(code_values, _mm512_set1_ps(nf4_block_absmax(w, row * bpr + k)));
                const std::uint8_t* bytes = src + k * w.block_size / 2;
                float* d = out + k * w.block_size;
                for (std::ptrdiff_t j = 0; j < w.block_size / 2; j += 16) {
                    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
                    const __m512i hi = _mm512_srli_epi32(b, 4), lo = _mm512_and_si512(b, low_mask);
                    _mm512_storeu_ps(d + 2 * j, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, lo), table));
                    _mm512_storeu_ps(d + 2 * j + 16, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, lo), table));
                }
            }
            return;
        }
    }
#endif
    nf4_dequantize_rows_host(w, row, 1, out, w.cols);
}

} // namespace velora::cpu
