#pragma once
/// \file
/// The AVX-512 sub-token projection (float data stored as float, sub-token length s a multiple
/// of 16 up to 16·max_packets): Z[t, g] = Σ_j X[t, g·s + j]·v[j], reading X once, in address
/// order. Used by the CPU backend's project_subtokens when the build targets AVX-512
/// (-march=native on such a machine, or -mavx512f); other builds never see this file's code.
#if defined(__AVX512F__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "threading.hpp"

namespace velora::cpu::avx512 {

// ---- AVX-512 sub-token projection (T = U = float, s a multiple of 16) ----
//
// Sixteen groups of a row are done at once: accumulator k gathers the products of one
// group with v, and a shuffle tree then folds the sixteen accumulators into one vector
// holding the sixteen dot products. The tree leaves the result of accumulator 4i + m in
// lane 4m + i, so group g is accumulated in kSlot[g] (that 4x4 transpose is its own
// inverse) and the lanes come out in group order. X is read strictly in address order
// (group by group, packet by packet): that keeps the hardware prefetchers streaming,
// which matters as much as the arithmetic once X is out of L1/L2.
inline constexpr int kSlot[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
// Software prefetch distance in floats (512 bytes, eight lines ahead; one prefetch per
// line read). With X in L3 the hardware prefetchers alone leave this kernel ~20% slower
// than a plain streaming read on the AVX-512 machine it was tuned on (Zen 4, 2 cores).
// Prefetches past the end of X are harmless (they never fault); the address is formed as
// an integer so that no out-of-range pointer is ever computed.
inline constexpr index_t kPrefetchAhead = 128;
// Longest sub-token (in 16-float packets) for the kernel: v then needs P of the 32 vector
// registers besides the 16 accumulators. Longer sub-tokens (G < 8 for D = 1024) are few
// long dot products, which the generic paths handle well.
inline constexpr index_t max_packets = 8;

// Accumulates N (16, 8 or 4) consecutive groups of P = s/16 packets each, v held in
// registers. With fewer than 16 groups, each group spreads its packets over K = 16/N
// accumulators (the slots no group uses), which keeps more FMA chains in flight; they are
// folded together before the shuffle tree.
template <int P, std::size_t... G>
inline void fma_groups(__m512 (&acc)[16], const float* x, const __m512 (&vp)[P], std::index_sequence<G...>) {
    constexpr int N = sizeof...(G);
    constexpr int K = 16 / N;
    auto group = [&](int g) {
        for (int p = 0; p < P; ++p) {
            const float* xp = x + (g * P + p) * 16;
            _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(xp) + kPrefetchAhead * sizeof(float)),
                         _MM_HINT_T0);
            __m512& a = acc[kSlot[g + N * (p % K)]];
            a = _mm512_fmadd_ps(_mm512_loadu_ps(xp), vp[p], a);
        }
    };
    (group(static_cast<int>(G)), ...);
    if constexpr (K > 1) {
        auto fold = [&](int g) {
            for (int k = 1; k < K; ++k) {
                acc[kSlot[g]] = _mm512_add_ps(acc[kSlot[g]], acc[kSlot[g + N * k]]);
                acc[kSlot[g + N * k]] = _mm512_setzero_ps();
            }
        };
        (fold(static_cast<int>(G)), ...);
    }
}

// GCC 12 raises a false -Wmaybe-uninitialized at each inlined use of an intrinsic whose
// pass-through operand is _mm512_undefined_*() (unpack, shuffle, max, reduce, ...). Their
// zero-masking forms with a full mask compile to the same unmasked instructions and stay
// quiet, so those are used below.
inline constexpr __mmask16 kAll16 = 0xFFFF;
inline constexpr __mmask8 kAll8 = 0xFF;

// Lane k of the result = horizontal sum of acc[kSlot[k]] (see above).
inline __m512 transpose_sum_16(const __m512 (&a)[16]) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; ++i)   // 256-bit halves: b[i] = [a(2i) x2 | a(2i+1) x2]
        b[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll16, a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_maskz_shuffle_f32x4(kAll16, a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)   // c[i], 128-bit lane m: 4 partial sums of a(4i + m)
        c[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll16, b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_maskz_shuffle_f32x4(kAll16, b[2 * i], b[2 * i + 1], 0xDD));
    const __m512 d0 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(kAll16, c[0], c[1]), _mm512_maskz_unpackhi_ps(kAll16, c[0], c[1]));
    const __m512 d1 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(kAll16, c[2], c[3]), _mm512_maskz_unpackhi_ps(kAll16, c[2], c[3]));
    const __m512d e0 = _mm512_castps_pd(d0), e1 = _mm512_castps_pd(d1);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, e0, e1)),
                         _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, e0, e1)));
}

// Σ_j x[j] · v[j] for j < n (any n >= 0; the last partial packet is a masked load).
inline float dot_avx512(const float* x, const float* v, index_t n) {
    __m512 acc = _mm512_setzero_ps();
    index_t j = 0;
    for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(v + j), acc);
    if (j < n) {
        const auto m = static_cast<__mmask16>((1u << (n - j)) - 1u);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + j), _mm512_maskz_loadu_ps(m, v + j), acc);
    }
    acc = _mm512_add_ps(acc, _mm512_maskz_shuffle_f32x4(kAll16, acc, acc, 0x4E));   // swap 256-bit halves
    acc = _mm512_add_ps(acc, _mm512_maskz_shuffle_f32x4(kAll16, acc, acc, 0xB1));   // swap 128-bit lanes
    acc = _mm512_add_ps(acc, _mm512_maskz_permute_ps(kAll16, acc, 0x4E));            // swap 64-bit pairs
    acc = _mm512_add_ps(acc, _mm512_maskz_permute_ps(kAll16, acc, 0xB1));            // swap neighbours
    return _mm512_cvtss_f32(acc);
}

// Finiteness is tracked as the running maximum of |value|'s bit pattern: some value was
// Inf or NaN iff that maximum reaches the all-ones exponent 0x7F800000. Integer
// operations, so -ffast-math cannot fold the test away.
inline constexpr std::int32_t kAbsMask = 0x7FFFFFFF;
inline constexpr std::int32_t kInfBits = 0x7F800000;

// N (16, 8 or 4) consecutive groups from x: their dot products with v go to out[0, N);
// returns max_bits updated with them.
template <int P, int N>
inline __m512i block_avx512(const float* x, const __m512 (&vp)[P], float* out, __m512i max_bits) {
    __m512 acc[16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    fma_groups<P>(acc, x, vp, std::make_index_sequence<N>{});
    const __m512 r = transpose_sum_16(acc);
    if constexpr (N == 16) _mm512_storeu_ps(out, r);
    else _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << N) - 1u), r);
    return _mm512_maskz_max_epi32(kAll16, max_bits, _mm512_and_si512(_mm512_castps_si512(r), _mm512_set1_epi32(kAbsMask)));   // idle lanes are 0
}

template <int P>
inline bool project_rows_avx512(const_matrix_view<float> x, const float* v, index_t s, matrix_view<float> z, index_t first,
                                index_t last) {
    const index_t d = x.cols;
    const index_t full = std::min<index_t>(d / s, z.cols);        // groups made only of data
    const index_t tail = full < z.cols ? std::min<index_t>(d - full * s, s) : 0;   // data in the partial group
    __m512i max_bits = _mm512_setzero_si512();
    std::int32_t max_bits_rest = 0;
    __m512 vp[P];
    for (int p = 0; p < P; ++p) vp[p] = _mm512_loadu_ps(v + 16 * p);
    for (index_t t = first; t < last; ++t) {
        const float* row = x.row(t);
        float* out = z.row(t);
        auto put = [&](index_t col, float value) {
            out[col] = value;
            std::int32_t bits;
            std::memcpy(&bits, &value, sizeof bits);
            max_bits_rest = std::max(max_bits_rest, bits & kAbsMask);
        };
        // Blocks of 16 groups; the last < 16 whole groups as a block of 8 and one of 4 (with
        // idle zero accumulators and a masked store), then single dot products.
        index_t g0 = 0;
        for (; g0 + 16 <= full; g0 += 16) max_bits = block_avx512<P, 16>(row + g0 * s, vp, out + g0, max_bits);
        if (g0 + 8 <= full) {
            max_bits = block_avx512<P, 8>(row + g0 * s, vp, out + g0, max_bits);
            g0 += 8;
        }
        if (g0 + 4 <= full) {
            max_bits = block_avx512<P, 4>(row + g0 * s, vp, out + g0, max_bits);
            g0 += 4;
        }
        for (; g0 < full; ++g0) put(g0, dot_avx512(row + g0 * s, v, s));
        index_t g = full;
        if (tail > 0) {   // the group that runs past the data: a dot product with a masked last packet
            put(g, dot_avx512(row + g * s, v, tail));
            ++g;
        }
        for (; g < z.cols; ++g) out[g] = 0.0f;   // all-padding groups
    }
    alignas(64) std::int32_t lanes[16];
    _mm512_store_si512(lanes, max_bits);
    for (std::int32_t bits : lanes) max_bits_rest = std::max(max_bits_rest, bits);
    return max_bits_rest < kInfBits;
}

inline bool project_rows_avx512(const_matrix_view<float> x, const float* v, index_t s, matrix_view<float> z, index_t first,
                                index_t last) {
    switch (s / 16) {
    case 1: return project_rows_avx512<1>(x, v, s, z, first, last);
    case 2: return project_rows_avx512<2>(x, v, s, z, first, last);
    case 3: return project_rows_avx512<3>(x, v, s, z, first, last);
    case 4: return project_rows_avx512<4>(x, v, s, z, first, last);
    case 5: return project_rows_avx512<5>(x, v, s, z, first, last);
    case 6: return project_rows_avx512<6>(x, v, s, z, first, last);
    case 7: return project_rows_avx512<7>(x, v, s, z, first, last);
    case 8: return project_rows_avx512<8>(x, v, s, z, first, last);
    default: return false;   // not reached: project_subtokens checks s
    }
}

inline bool project_subtokens(int threads, const_matrix_view<float> x, const float* v, index_t s, matrix_view<float> z) {
    const int parts = fixed_parts(x.rows, x.size());
    if (parts <= 1) return project_rows_avx512(x, v, s, z, 0, x.rows);
    int bad = 0;
    parallel_for_parts(threads, parts, [&](int part) {
        const auto [first, last] = part_range(x.rows, parts, part);
        if (first < last && !project_rows_avx512(x, v, s, z, first, last)) {
#if defined(_OPENMP)
#pragma omp atomic write
#endif
            bad = 1;
        }
    });
    return bad == 0;
}

} // namespace velora::cpu::avx512
#endif
