#pragma once
/// \file
/// Adam(W) on 8-bit blockwise moments on the CPU: each block of `block` elements holds m and v as
/// bytes of the dynamic codes (rules/dynamic_code.hpp) with one float absmax each. One call does a
/// block in one pass over its memory: decode m and v, run backend/rules/adam_element.hpp's update
/// (the same arithmetic as cpu/adam.hpp's float rows), keep the new moments in a block-sized buffer
/// on the stack while their absmax is found, then encode them. Nothing but the bytes, the two
/// absmax and the row `out` (w, or n for adam_row_kind::moments) is written.
///
/// Three bodies, the same bits: AVX-512 (16 lanes), AVX2 + FMA (8 lanes) and scalar; each does
/// whole packets from the block's first element and the scalar code the tail. They agree because
/// every step is exactly rounded and the same in all three: table reads (byte-plane or float
/// permutes in the AVX-512 body, gathers in the AVX2 one, loads in the scalar one; a table entry
/// is exact whichever way it is read), one product for decoding,
/// the rule's explicit fma/product, one product |x|·(1/absmax) for encoding (the reciprocal
/// rounded once per block), and a
/// maximum (order-free). A body is compiled when the target has its instructions (-march=native on
/// an AVX-512 machine compiles all three); `adam8_block` takes the widest.
///
/// The scalar body is rules/adam8_block.hpp's one-lane block, the function the CUDA kernels run
/// per thread; the vector bodies reuse its element functions for their tails.
///
/// A block whose new m, v or out is not finite returns false; the caller must then discard what
/// the call wrote. An all-zero block, or one whose largest value is below the smallest normal
/// float, stores absmax 0 and zero bytes (code 0 is 0 in both codes).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../rules/adam8_block.hpp"
#include "../rules/adam_element.hpp"
#include "../rules/dynamic_code.hpp"
#include "adam.hpp"
#include "simd_body.hpp"
#include "threading.hpp"

namespace velora::cpu {

/// The largest block the CPU bodies take (their stack buffers hold two blocks of floats).
using rules::adam8_max_block;

/// One block's state: n bytes of each moment and their absmax.
using rules::adam8_block_state;

namespace adam8_detail {

// value[q]·absmax, rules/adam8_block.hpp's decoding with the scalar operations.
inline float decoded(const rules::dynamic_code& code, std::uint8_t q, float absmax) noexcept { return rules::adam8::decoded<scalar_ops>(code, q, absmax); }

using rules::adam8::finite_value;
using rules::adam8::stored_absmax;

// The scalar element of pass 1: decode, update, and return the new moments through m, v.
template <adam_row_kind K>
inline void update_scalar(float g, float& m, float& v, float& out, const rules::adamw_terms<float>& c, float minus_step, bool decays) noexcept {
    adam_element<K, scalar_ops>(g, m, v, out, c.beta1, c.c1, c.beta2, c.c2, c.bias2_sqrt, c.eps, minus_step, c.decay, decays);
}

// Pass 2 for elements [j, n): the scalar encoding (the reference the packets match).
inline void encode_scalar(const rules::dynamic_code& code, const float* x, std::uint8_t* q, index_t j, index_t n, float absmax) noexcept {
    rules::adam8::encode_lane(code, x, q, j, 1, n, absmax);
}

} // namespace adam8_detail

/// The scalar body: the reference (rules/adam8_block.hpp's block on one lane).
template <adam_row_kind K>
bool adam8_block_scalar(const float* g, float* out, adam8_block_state s, index_t n, const rules::adamw_terms<float>& c) noexcept {
    float nm[adam8_max_block], nv[adam8_max_block];
    return rules::adam8::block<K, scalar_ops>(rules::signed_dynamic_code(), rules::unsigned_dynamic_code(), g, out, s, n, c, nm, nv);
}

#if defined(__AVX512F__)
namespace adam8_detail {
using V16 = simd::avx512<float>;

// A code's tables in registers: decoding by permutes over the value table (no gathers: they cost
// as much as the rest of the update on the machines measured), encoding by dynamic_code's
// arithmetic with its small tables permuted by binade and group.
struct code16 {
    __m512 value[16];                    // value[16·r + l]; a signed code uses the first 8 (magnitudes)
    __m512i binade_group[2];
    __m512 binade_boundary[2], cells_per_unit, cell_shift;
    __m512i offset, last;
    bool is_signed;
    explicit code16(const rules::dynamic_code& c) noexcept : is_signed(c.sign == rules::code_sign::signed_code) {
        for (int r = 0; r < 16; ++r) value[r] = _mm512_load_ps(c.value.data() + 16 * r);
        for (int r = 0; r < 2; ++r) {
            binade_group[r] = _mm512_load_si512(c.binade_group.data() + 16 * r);
            binade_boundary[r] = _mm512_load_ps(c.binade_boundary.data() + 16 * r);
        }
        cells_per_unit = _mm512_load_ps(c.cells_per_unit.data());
        cell_shift = _mm512_load_ps(c.cell_shift.data());
        offset = _mm512_load_si512(c.offset.data());
        last = _mm512_load_si512(c.last.data());
    }
};

// 16 bytes to 16 values·absmax by 32-entry float permutes (the packets after the 64-byte chunks,
// and every packet where the target lacks AVX512-VBMI).
inline __m512 decode16(const code16& code, const std::uint8_t* q, __m512 absmax) noexcept {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64)),
                    b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    const auto quarter = [&](int r) {   // entries 64·r/2 … : two 32-entry permutes chosen by bit 5
        return _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(code.value[r], idx, code.value[r + 1]),
                                    _mm512_permutex2var_ps(code.value[r + 2], idx, code.value[r + 3]));
    };
    __m512 v = _mm512_mask_blend_ps(b6, quarter(0), quarter(4));   // magnitudes 0 … 127
    if (code.is_signed) v = _mm512_castsi512_ps(_mm512_mask_xor_epi32(_mm512_castps_si512(v), b7, _mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)));
    else v = _mm512_mask_blend_ps(b7, v, _mm512_mask_blend_ps(b6, quarter(8), quarter(12)));
    return V16::product(v, absmax);   // never contracted into the update
}

#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
// 64 bytes at a time by byte permutes: the value table split into its four byte planes (plane p
// holds byte p of every value), each looked up for 64 bytes by one (signed: 128 magnitudes) or two
// (unsigned: 256 values) 128-entry vpermi2b, the planes then interleaved back into floats. This
// does 64 elements in ~20 instructions where decode16 needs ~15-20 per 16. The interleave
// (bytes, then words, within 128-bit lanes) leaves packet j's lane k holding input bytes
// 16k + 4j … 16k + 4j + 3, so the input is first permuted (byte 16k + 4j + i ← 16j + 4k + i) to
// make the four packets come out in order. Table values are exact, so the bits are decode16's.
struct planes64 {
    __m512i plane[4][4];   // plane[p][t]: byte p of value[64·t … 64·t + 63]; a signed code uses t < 2
    bool is_signed;
    explicit planes64(const rules::dynamic_code& c) noexcept : is_signed(c.sign == rules::code_sign::signed_code) {
        alignas(64) std::uint8_t bytes[4][256];
        for (int k = 0; k < 256; ++k) {
            std::uint32_t b;
            std::memcpy(&b, &c.value[static_cast<std::size_t>(k)], sizeof b);
            for (int p = 0; p < 4; ++p) bytes[p][k] = static_cast<std::uint8_t>(b >> (8 * p));
        }
        for (int p = 0; p < 4; ++p)
            for (int t = 0; t < 4; ++t) plane[p][t] = _mm512_load_si512(bytes[p] + 64 * t);
    }
};

inline __m512i decode64_order() noexcept {
    alignas(64) std::uint8_t idx[64];
    for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 4; ++i) idx[16 * k + 4 * j + i] = static_cast<std::uint8_t>(16 * j + 4 * k + i);
    return _mm512_load_si512(idx);
}

inline void decode64(const planes64& t, __m512i order, const std::uint8_t* q, __m512 absmax, float* dst) noexcept {
    const __m512i x = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(q));
    __m512i b[4];
    if (t.is_signed) {
        for (int p = 0; p < 4; ++p) b[p] = _mm512_permutex2var_epi8(t.plane[p][0], x, t.plane[p][1]);   // |value| by the low 7 bits
        b[3] = _mm512_ternarylogic_epi32(b[3], x, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);     // b3 | (x & 0x80): the sign
    } else {
        const __mmask64 high = _mm512_movepi8_mask(x);   // bit 7: entries 128 … 255
        for (int p = 0; p < 4; ++p)
            b[p] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t.plane[p][0], x, t.plane[p][1]),
                                          _mm512_permutex2var_epi8(t.plane[p][2], x, t.plane[p][3]));
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    _mm512_storeu_ps(dst, V16::product(_mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)), absmax));
    _mm512_storeu_ps(dst + 16, V16::product(_mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)), absmax));
    _mm512_storeu_ps(dst + 32, V16::product(_mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)), absmax));
    _mm512_storeu_ps(dst + 48, V16::product(_mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23)), absmax));
}
#endif

// The bytes of one block's moment, decoded into dst (values·absmax).
inline void decode_block(const rules::dynamic_code& code, const std::uint8_t* q, float absmax, float* dst, index_t n) noexcept {
    index_t j = 0;
    const __m512 a = V16::set1(absmax);
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
    {
        static const planes64 signed_planes(rules::signed_dynamic_code()), unsigned_planes(rules::unsigned_dynamic_code());
        const planes64& t = code.sign == rules::code_sign::signed_code ? signed_planes : unsigned_planes;
        const __m512i order = decode64_order();
        for (; j + 64 <= n; j += 64) decode64(t, order, q + j, a, dst + j);
    }
#endif
    if (j + 16 <= n) {
        const code16 packed(code);
        for (; j + 16 <= n; j += 16) _mm512_storeu_ps(dst + j, decode16(packed, q + j, a));
    }
    for (; j < n; ++j) dst[j] = decoded(code, q[j], absmax);
}

// The dword bytes of 16 values: dynamic_code::encode's arithmetic. The binade is y's biased
// exponent clamped below at first_binade and used directly as the permute index (its low 5 bits:
// 96 … 127 → 0 … 31); the reference's clamp above at 127 never acts, as y = |x|·RN(1/absmax) < 2
// for |x| <= absmax.
inline __m512i encode16(const code16& code, __m512 x, __m512 inv) noexcept {
    static_assert(rules::dynamic_code::first_binade % 32 == 0 && rules::dynamic_code::binades == 32);
    const __m512 y = V16::product(_mm512_abs_ps(x), inv);
    const __m512i e = _mm512_max_epi32(_mm512_srli_epi32(_mm512_castps_si512(y), 23), _mm512_set1_epi32(static_cast<int>(rules::dynamic_code::first_binade)));
    __m512i g = _mm512_permutex2var_epi32(code.binade_group[0], e, code.binade_group[1]);
    const __m512 boundary = _mm512_permutex2var_ps(code.binade_boundary[0], e, code.binade_boundary[1]);
    g = _mm512_mask_add_epi32(g, _mm512_cmp_ps_mask(y, boundary, _CMP_GT_OQ), g, _mm512_set1_epi32(1));
    const __m512 cell = V16::fma(y, _mm512_permutexvar_ps(g, code.cells_per_unit), _mm512_permutexvar_ps(g, code.cell_shift));
    __m512i j = _mm512_max_epi32(_mm512_cvttps_epi32(cell), _mm512_setzero_si512());
    j = _mm512_min_epi32(j, _mm512_permutexvar_epi32(g, code.last));
    __m512i byte = _mm512_add_epi32(j, _mm512_permutexvar_epi32(g, code.offset));
    if (code.is_signed) {   // the sign bit where x < 0 and the magnitude is not 0
        const __mmask16 negative = _mm512_mask_cmp_ps_mask(_mm512_test_epi32_mask(byte, byte), x, _mm512_setzero_ps(), _CMP_LT_OQ);
        byte = _mm512_mask_or_epi32(byte, negative, byte, _mm512_set1_epi32(0x80));
    }
    return byte;
}

// One block's moment, encoded from x: 64 values at a time packed to bytes by two saturating packs
// (values are 0 … 255) and one dword permute that undoes the packs' lane interleave (dword 4k + j
// holds packet j's bytes 4k … 4k + 3), 16 at a time by vpmovdb, then the scalar tail.
inline void encode_block(const rules::dynamic_code& code, const float* x, std::uint8_t* q, index_t n, float absmax) noexcept {
    index_t i = 0;
    if (absmax != 0.0f && n >= 16) {
        const code16 packed(code);
        const __m512 inv = V16::set1(rules::dynamic_code::reciprocal(absmax));
        alignas(64) std::int32_t order[16];
        for (int k = 0; k < 4; ++k)
            for (int j = 0; j < 4; ++j) order[4 * j + k] = 4 * k + j;
        const __m512i o = _mm512_load_si512(order);
        for (; i + 64 <= n; i += 64) {
            const __m512i b0 = encode16(packed, _mm512_loadu_ps(x + i), inv), b1 = encode16(packed, _mm512_loadu_ps(x + i + 16), inv);
            const __m512i b2 = encode16(packed, _mm512_loadu_ps(x + i + 32), inv), b3 = encode16(packed, _mm512_loadu_ps(x + i + 48), inv);
            const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(b0, b1), _mm512_packus_epi32(b2, b3));
            _mm512_storeu_si512(q + i, _mm512_permutexvar_epi32(o, bytes));
        }
        for (; i + 16 <= n; i += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(encode16(packed, _mm512_loadu_ps(x + i), inv)));
    }
    encode_scalar(code, x, q, i, n, absmax);
}

// The largest lane (through memory: _mm512_reduce_max_ps trips GCC 12's -Wuninitialized).
inline float max16(__m512 x) noexcept {
    alignas(64) float lane[16];
    _mm512_store_ps(lane, x);
    float r = lane[0];
    for (int l = 1; l < 16; ++l) r = std::max(r, lane[l]);
    return r;
}

// Whether a lane of the sentinel is NaN: it accumulates x·0 + sentinel, which stays +0 while every
// x is finite and becomes NaN for an infinite or NaN x (one fused multiply-add per value, no mask).
inline bool sentinel_bad(__m512 s) noexcept { return _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q) != 0; }
} // namespace adam8_detail

/// The AVX-512 body, in three passes over the block while it sits in L1 (a block of 256 is 1 KiB
/// of floats per moment): decode both moments into stack buffers, update them there (the row
/// `out` written, the absmax and finiteness gathered), encode them. The passes after the first
/// read the buffers, not memory.
template <adam_row_kind K>
bool adam8_block_avx512(const float* g, float* out, adam8_block_state s, index_t n, const rules::adamw_terms<float>& c) noexcept {
    using namespace adam8_detail;
    using R = __m512;
    const auto& cm = rules::signed_dynamic_code();
    const auto& cv = rules::unsigned_dynamic_code();
    alignas(64) float nm[adam8_max_block], nv[adam8_max_block];
    const float minus_step_s = -c.step;
    const bool decays = c.decay != 1.0f;
    decode_block(cm, s.qm, *s.absmax_m, nm, n);
    decode_block(cv, s.qv, *s.absmax_v, nv, n);
    const R beta1 = V16::set1(c.beta1), c1 = V16::set1(c.c1), beta2 = V16::set1(c.beta2), c2 = V16::set1(c.c2), bias2_sqrt = V16::set1(c.bias2_sqrt),
            eps = V16::set1(c.eps), minus_step = V16::set1(minus_step_s), decay = V16::set1(c.decay), zero = _mm512_setzero_ps();
    R max_m = zero, max_v = zero, sent_m = zero, sent_v = zero, sent_o = zero;
    index_t j = 0;
    for (; j + 16 <= n; j += 16) {
        prefetch_ahead(g + j);
        if constexpr (K != adam_row_kind::moments) prefetch_ahead(out + j);
        R m = _mm512_load_ps(nm + j), v = _mm512_load_ps(nv + j), o = K == adam_row_kind::moments ? R{} : V16::load(out + j);
        adam_element<K, V16>(V16::load(g + j), m, v, o, beta1, c1, beta2, c2, bias2_sqrt, eps, minus_step, decay, decays);
        V16::store(out + j, o);
        _mm512_store_ps(nm + j, m);
        _mm512_store_ps(nv + j, v);
        sent_m = _mm512_fmadd_ps(m, zero, sent_m);
        sent_v = _mm512_fmadd_ps(v, zero, sent_v);
        sent_o = _mm512_fmadd_ps(o, zero, sent_o);
        max_m = _mm512_max_ps(max_m, _mm512_abs_ps(m));
        max_v = _mm512_max_ps(max_v, _mm512_abs_ps(v));
    }
    float mm = max16(max_m), mv = max16(max_v);
    bool finite = !sentinel_bad(sent_m) && !sentinel_bad(sent_v) && !sentinel_bad(sent_o);
    for (; j < n; ++j) {
        float m = nm[j], v = nv[j], o = K == adam_row_kind::moments ? 0.0f : out[j];
        update_scalar<K>(g[j], m, v, o, c, minus_step_s, decays);
        out[j] = o;
        nm[j] = m;
        nv[j] = v;
        finite = finite && finite_value(m) && finite_value(v) && finite_value(o);
        mm = std::max(mm, std::fabs(m));
        mv = std::max(mv, std::fabs(v));
    }
    if (!finite) return false;
    mm = stored_absmax(mm);
    mv = stored_absmax(mv);
    encode_block(cm, nm, s.qm, n, mm);
    encode_block(cv, nv, s.qv, n, mv);
    *s.absmax_m = mm;
    *s.absmax_v = mv;
    return true;
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
namespace adam8_detail {
// The AVX2 packet of floats and the operations adam_element.hpp needs beyond + − × ÷.
struct avx2 {
    using reg = __m256;
    static reg set1(float x) noexcept { return _mm256_set1_ps(x); }
    static reg load(const float* p) noexcept { return _mm256_loadu_ps(p); }
    static void store(float* p, reg x) noexcept { _mm256_storeu_ps(p, x); }
    static reg fma(reg a, reg b, reg c) noexcept { return _mm256_fmadd_ps(a, b, c); }
    static reg sqrt(reg a) noexcept { return _mm256_sqrt_ps(a); }
    static reg product(reg a, reg b) noexcept { return _mm256_fmadd_ps(a, b, _mm256_set1_ps(-0.0f)); }
    static reg abs(reg a) noexcept { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
};

inline __m256 decode8(const rules::dynamic_code& code, const std::uint8_t* q, __m256 absmax) noexcept {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    return avx2::product(_mm256_i32gather_ps(code.value.data(), idx, 4), absmax);   // never contracted into the update
}

// dynamic_code's arithmetic with its tables read by gathers (the AVX2 body serves machines
// without AVX-512; it matches the others bit for bit, its speed is not a target).
inline void encode8(const rules::dynamic_code& code, __m256 x, __m256 inv, std::uint8_t* q) noexcept {
    const __m256 y = avx2::product(avx2::abs(x), inv);
    const __m256i first = _mm256_set1_epi32(static_cast<int>(rules::dynamic_code::first_binade));
    const __m256i e = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(_mm256_srli_epi32(_mm256_castps_si256(y), 23), first), _mm256_set1_epi32(127)), first);
    __m256i g = _mm256_i32gather_epi32(code.binade_group.data(), e, 4);
    const __m256 boundary = _mm256_i32gather_ps(code.binade_boundary.data(), e, 4);
    g = _mm256_sub_epi32(g, _mm256_castps_si256(_mm256_cmp_ps(y, boundary, _CMP_GT_OQ)));   // −1 where y > boundary
    const __m256 cell = avx2::fma(y, _mm256_i32gather_ps(code.cells_per_unit.data(), g, 4), _mm256_i32gather_ps(code.cell_shift.data(), g, 4));
    __m256i j = _mm256_max_epi32(_mm256_cvttps_epi32(cell), _mm256_setzero_si256());
    j = _mm256_min_epi32(j, _mm256_i32gather_epi32(code.last.data(), g, 4));
    __m256i byte = _mm256_add_epi32(j, _mm256_i32gather_epi32(code.offset.data(), g, 4));
    if (code.sign == rules::code_sign::signed_code) {
        const __m256i negative = _mm256_andnot_si256(_mm256_cmpeq_epi32(byte, _mm256_setzero_si256()),
                                                     _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ)));
        byte = _mm256_or_si256(byte, _mm256_and_si256(negative, _mm256_set1_epi32(0x80)));
    }
    const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(byte), _mm256_extracti128_si256(byte, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packus_epi16(p16, p16));
}

inline int not_finite8(__m256 x) noexcept {
    return _mm256_movemask_ps(_mm256_cmp_ps(avx2::abs(x), _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ));
}

inline float max8(__m256 x) noexcept {
    alignas(32) float lane[8];
    _mm256_store_ps(lane, x);
    float r = lane[0];
    for (int l = 1; l < 8; ++l) r = std::max(r, lane[l]);
    return r;
}
} // namespace adam8_detail

/// The AVX2 + FMA body.
template <adam_row_kind K>
bool adam8_block_avx2(const float* g, float* out, adam8_block_state s, index_t n, const rules::adamw_terms<float>& c) noexcept {
    using namespace adam8_detail;
    using V = avx2;
    using R = __m256;
    const auto& cm = rules::signed_dynamic_code();
    const auto& cv = rules::unsigned_dynamic_code();
    alignas(32) float nm[adam8_max_block], nv[adam8_max_block];
    const float am = *s.absmax_m, av = *s.absmax_v, minus_step_s = -c.step;
    const bool decays = c.decay != 1.0f;
    const R beta1 = V::set1(c.beta1), c1 = V::set1(c.c1), beta2 = V::set1(c.beta2), c2 = V::set1(c.c2), bias2_sqrt = V::set1(c.bias2_sqrt),
            eps = V::set1(c.eps), minus_step = V::set1(minus_step_s), decay = V::set1(c.decay), am_r = V::set1(am), av_r = V::set1(av);
    R max_m = _mm256_setzero_ps(), max_v = _mm256_setzero_ps();
    int bad = 0;
    index_t j = 0;
    for (; j + 8 <= n; j += 8) {
        R m = decode8(cm, s.qm + j, am_r), v = decode8(cv, s.qv + j, av_r), o = K == adam_row_kind::moments ? R{} : V::load(out + j);
        adam_element<K, V>(V::load(g + j), m, v, o, beta1, c1, beta2, c2, bias2_sqrt, eps, minus_step, decay, decays);
        V::store(out + j, o);
        _mm256_store_ps(nm + j, m);
        _mm256_store_ps(nv + j, v);
        bad |= not_finite8(m) | not_finite8(v) | not_finite8(o);
        max_m = _mm256_max_ps(max_m, V::abs(m));
        max_v = _mm256_max_ps(max_v, V::abs(v));
    }
    float mm = max8(max_m), mv = max8(max_v);
    bool finite = bad == 0;
    for (; j < n; ++j) {
        float m = adam8_detail::decoded(cm, s.qm[j], am), v = adam8_detail::decoded(cv, s.qv[j], av), o = K == adam_row_kind::moments ? 0.0f : out[j];
        update_scalar<K>(g[j], m, v, o, c, minus_step_s, decays);
        out[j] = o;
        nm[j] = m;
        nv[j] = v;
        finite = finite && finite_value(m) && finite_value(v) && finite_value(o);
        mm = std::max(mm, std::fabs(m));
        mv = std::max(mv, std::fabs(v));
    }
    if (!finite) return false;
    mm = stored_absmax(mm);
    mv = stored_absmax(mv);
    const auto encode = [&](const rules::dynamic_code& code, const float* x, std::uint8_t* q, float absmax) {
        index_t i = 0;
        if (absmax != 0.0f) {
            const R inv = V::set1(rules::dynamic_code::reciprocal(absmax));
            for (; i + 8 <= n; i += 8) encode8(code, _mm256_load_ps(x + i), inv, q + i);
        }
        encode_scalar(code, x, q, i, n, absmax);
    };
    encode(cm, nm, s.qm, mm);
    encode(cv, nv, s.qv, mv);
    *s.absmax_m = mm;
    *s.absmax_v = mv;
    return true;
}
#endif

/// Which bodies this build has (simd_body.hpp; the names the 8-bit tests and benchmarks use).
using adam8_body = simd_body;
inline constexpr bool adam8_has_avx512 = has_avx512_body, adam8_has_avx2 = has_avx2_body;

/// One block of n <= adam8_max_block elements through the chosen body (the widest by default; a
/// body this build lacks falls back to the scalar one).
template <adam_row_kind K>
bool adam8_block(const float* g, float* out, adam8_block_state s, index_t n, const rules::adamw_terms<float>& c,
                 adam8_body body = widest_body) noexcept {
#if defined(__AVX512F__)
    if (body == adam8_body::avx512) return adam8_block_avx512<K>(g, out, s, n, c);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (body == adam8_body::avx2) return adam8_block_avx2<K>(g, out, s, n, c);
#endif
    (void)body;
    return adam8_block_scalar<K>(g, out, s, n, c);
}

/// Encodes n floats (finite) as one block: absmax = their largest |x| (0 below the smallest
/// normal float), then the bytes; the bits every body's encoding gives.
inline void adam8_encode_block(const rules::dynamic_code& code, const float* x, std::uint8_t* q, index_t n, float& absmax) noexcept {
    rules::adam8::encode_block(code, x, q, n, absmax);
}

/// A tensor's 8-bit moments (rules/adam8_block.hpp).
using rules::adam8_tensor_state;

/// Every block of a contiguous tensor (g and out: count floats each), on up to `threads` threads;
/// blocks are independent, so the bits do not depend on the thread count. Returns false when some
/// block's result was not finite (what was written must then be discarded).
template <adam_row_kind K>
bool adam8_tensor(int threads, const float* g, float* out, const adam8_tensor_state& s, const rules::adamw_terms<float>& c,
                  adam8_body body = widest_body) noexcept {
    std::atomic<bool> finite{true};
    for_each_row(threads, s.count, s.blocks(), [&](index_t b) {
        const index_t first = b * s.block;
        if (!adam8_block<K>(g + first, out + first, s.at(b), s.size_of(b), c, body)) finite.store(false, std::memory_order_relaxed);
    });
    return finite.load();
}

} // namespace velora::cpu
