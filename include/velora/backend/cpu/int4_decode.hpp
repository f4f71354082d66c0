#pragma once
/// \file
/// The CPU decoding of one block of a quantised basis' int4 codes (adarank/basis_format.hpp): n
/// codes packed two a byte, low nibble first, each nibble holding code + 8, become
/// out[j] = float(code_j)·scale.
///
/// Three bodies (simd_body.hpp), the same bits: every output is the one product
/// float(nibble − 8)·scale, exactly rounded, and the integer and its conversion are exact
/// whichever way they are computed. The scalar body is the reference; g++ 12 does not vectorise
/// it (1.6 G codes/s measured, where the int8 decode's widening runs at 17, docs/performance.md),
/// so the vector bodies spell the unpacking out:
/// - AVX-512: the block's 16 possible values (nibble − 8)·scale are computed once, as one vector
///   product, and each nibble picks its value with a float permute (vpermps reads only an index's
///   low 4 bits, so a byte's low nibble needs no mask): 16 bytes → 32 floats in two permutes of
///   the bytes into element order, two shifts, two look-ups.
/// - AVX2 + FMA: the nibbles split and interleaved into element order as bytes, offset by 8,
///   widened to 32 bits, converted and multiplied: 16 bytes → 32 floats.
/// Each does whole packets of 32 elements from the block's first and the scalar body the tail
/// (fewer than 32, an odd last element included), so no byte past the block's codes is read.
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../../core/view.hpp"
#include "simd_body.hpp"

namespace velora::cpu {

/// The value of one nibble (code + 8) in a block of scale `scale`.
inline float int4_value(unsigned nibble, float scale) noexcept { return static_cast<float>(static_cast<int>(nibble) - 8) * scale; }

/// The scalar body, the reference: a byte (two elements) at a time, then an odd last element
/// from its byte's low nibble.
inline void int4_decode_scalar(const std::uint8_t* codes, index_t n, float scale, float* out) noexcept {
    const index_t pairs = n / 2;
    for (index_t k = 0; k < pairs; ++k) {
        const unsigned byte = codes[k];
        out[2 * k] = int4_value(byte & 0xFu, scale);
        out[2 * k + 1] = int4_value(byte >> 4, scale);
    }
    if (n % 2 != 0) out[n - 1] = int4_value(codes[pairs] & 0xFu, scale);
}

#if defined(__AVX512F__)
/// The AVX-512 body.
inline void int4_decode_avx512(const std::uint8_t* codes, index_t n, float scale, float* out) noexcept {
    // value[q] = (q − 8)·scale: the scalar body's products, rounded once each
    const __m512 value = _mm512_mul_ps(_mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_ps(scale));
    // Element 2k is byte k's low nibble and 2k + 1 its high one: each byte twice, shifted by 0 then 4.
    const __m512i first_half = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i second_half = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    const __m512i nibble_shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    index_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j / 2)));
        const __m512i first = _mm512_srlv_epi32(_mm512_permutexvar_epi32(first_half, bytes), nibble_shift);
        const __m512i second = _mm512_srlv_epi32(_mm512_permutexvar_epi32(second_half, bytes), nibble_shift);
        _mm512_storeu_ps(out + j, _mm512_permutexvar_ps(first, value));   // indices' bits above the low 4 ignored
        _mm512_storeu_ps(out + j + 16, _mm512_permutexvar_ps(second, value));
    }
    int4_decode_scalar(codes + j / 2, n - j, scale, out + j);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/// The AVX2 + FMA body (no fused operation: the product is the only rounding).
inline void int4_decode_avx2(const std::uint8_t* codes, index_t n, float scale, float* out) noexcept {
    const __m256 s = _mm256_set1_ps(scale);
    const __m128i low_nibble = _mm_set1_epi8(0x0F), offset = _mm_set1_epi8(8);
    // 8 codes (the low 8 signed bytes of c) to 8 floats
    const auto eight = [&](__m128i c, float* y) { _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), s)); };
    index_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j / 2));
        const __m128i lo = _mm_and_si128(bytes, low_nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibble);
        // the codes of elements j … j + 15 and j + 16 … j + 31, in order, as signed bytes
        const __m128i first = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), offset), second = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), offset);
        eight(first, out + j);
        eight(_mm_srli_si128(first, 8), out + j + 8);
        eight(second, out + j + 16);
        eight(_mm_srli_si128(second, 8), out + j + 24);
    }
    int4_decode_scalar(codes + j / 2, n - j, scale, out + j);
}
#endif

/// One block: n codes from the byte `codes` (its low nibble first) to out[0 … n), through the
/// chosen body (the widest this build has by default; one it lacks falls back to the scalar one).
inline void int4_decode(const std::uint8_t* codes, index_t n, float scale, float* out, simd_body body = widest_body) noexcept {
#if defined(__AVX512F__)
    if (body == simd_body::avx512) return int4_decode_avx512(codes, n, scale, out);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (body == simd_body::avx2) return int4_decode_avx2(codes, n, scale, out);
#endif
    (void)body;
    int4_decode_scalar(codes, n, scale, out);
}

} // namespace velora::cpu
