#pragma once
/// \file
/// Adam(W)'s element-wise update on the CPU, the same bits wherever the rows lie in memory.
///
/// The arithmetic is backend/rules/adam_element.hpp's, instantiated twice per row: on AVX-512
/// packets (whole 64-byte packets from the row's first element, unaligned loads) and on scalars
/// for the tail. Its multiply-adds are spelled out as fused ones in both (see lanes.hpp for why
/// an Eigen expression would not give alignment-independent bits). Three row kinds:
///   moments:        m, v updated, out = n = m / (√v + ε) (out may alias g);
///   galore_weight:  m, v updated, w = decay·fma(−step, n, w);
///   torch_weight:   torch::optim::AdamW's order of operations (adam_element.hpp).
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../rules/adam_element.hpp"
#include "lanes.hpp"
#include "simd_body.hpp"

namespace velora::cpu {

/// Which update a row runs (see the file comment; defined with the rule).
using rules::adam_row_kind;

/// The scalar operations adam_element.hpp needs, on one T.
struct scalar_ops {
    template <class T>
    static T fma(T a, T b, T c) noexcept { return fused(a, b, c); }
    template <class T>
    static T sqrt(T a) noexcept { return std::sqrt(a); }
    // a·b + (−0) is a·b rounded once, for every a·b (−0 included), and an FMA's result is never
    // contracted into a later add, as a plain product would be by GCC.
    template <class T>
    static T product(T a, T b) noexcept { return std::fma(a, b, T(-0.0)); }
};

/// One element of a row of kind K (rules/adam_element.hpp).
using rules::adam_element;

#if defined(__AVX512F__)
namespace simd {
// The AVX-512 packet of T and the two operations adam_element.hpp needs beyond + − × ÷ (which
// GCC and clang provide on vector types).
template <class T>
struct avx512;
template <>
struct avx512<float> {
    using reg = __m512;
    static constexpr index_t width = 16;
    static reg set1(float x) noexcept { return _mm512_set1_ps(x); }
    static reg load(const float* p) noexcept { return _mm512_loadu_ps(p); }
    static void store(float* p, reg x) noexcept { _mm512_storeu_ps(p, x); }
    static reg fma(reg a, reg b, reg c) noexcept { return _mm512_fmadd_ps(a, b, c); }
    static reg sqrt(reg a) noexcept { return _mm512_sqrt_ps(a); }
    static reg product(reg a, reg b) noexcept { return _mm512_fmadd_ps(a, b, _mm512_set1_ps(-0.0f)); }
};
template <>
struct avx512<double> {
    using reg = __m512d;
    static constexpr index_t width = 8;
    static reg set1(double x) noexcept { return _mm512_set1_pd(x); }
    static reg load(const double* p) noexcept { return _mm512_loadu_pd(p); }
    static void store(double* p, reg x) noexcept { _mm512_storeu_pd(p, x); }
    static reg fma(reg a, reg b, reg c) noexcept { return _mm512_fmadd_pd(a, b, c); }
    static reg sqrt(reg a) noexcept { return _mm512_sqrt_pd(a); }
    static reg product(reg a, reg b) noexcept { return _mm512_fmadd_pd(a, b, _mm512_set1_pd(-0.0)); }
};
} // namespace simd

// Software prefetch distance of the Adam pass, in bytes ahead of each of its four streams. The
// hardware prefetchers alone leave this four-stream pass ~20% slower on the AVX-512 machine it
// was measured on (Zen 4, 2 cores; docs/performance.md). The address is formed as an integer:
// prefetching past the end of an array is harmless and no out-of-range pointer is computed.
inline constexpr std::uintptr_t adam_prefetch_bytes = 2048;

template <class T>
void prefetch_ahead(const T* p) noexcept {
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) + adam_prefetch_bytes), _MM_HINT_T0);
}

// The packets of adam_row; returns how many elements it did.
template <adam_row_kind K, class T>
index_t adam_row_avx512(const T* g, T* m, T* v, T* out, index_t n, const rules::adamw_terms<T>& c) noexcept {
    using V = simd::avx512<T>;
    using R = typename V::reg;
    const R beta1 = V::set1(c.beta1), c1 = V::set1(c.c1), beta2 = V::set1(c.beta2), c2 = V::set1(c.c2), bias2_sqrt = V::set1(c.bias2_sqrt),
            eps = V::set1(c.eps), minus_step = V::set1(-c.step), decay = V::set1(c.decay);
    const bool decays = c.decay != T(1);
    index_t j = 0;
    for (; j + V::width <= n; j += V::width) {
        prefetch_ahead(g + j);
        prefetch_ahead(m + j);
        prefetch_ahead(v + j);
        if (out != g) prefetch_ahead(out + j);
        R mj = V::load(m + j), vj = V::load(v + j), oj = K == adam_row_kind::moments ? R{} : V::load(out + j);
        adam_element<K, V>(V::load(g + j), mj, vj, oj, beta1, c1, beta2, c2, bias2_sqrt, eps, minus_step, decay, decays);
        V::store(m + j, mj);
        V::store(v + j, vj);
        V::store(out + j, oj);
    }
    return j;
}
#endif

/// Whether adam_row runs its AVX-512 body (this build was compiled with AVX-512F); the scalar
/// one otherwise, several times slower (the same bits in the same build). Reported by the Python package's
/// velora.build_info().
inline constexpr bool adam_has_avx512 = has_avx512_body;

/// One row of n elements (see the file comment).
template <adam_row_kind K, class T>
void adam_row(const T* g, T* m, T* v, T* out, index_t n, const rules::adamw_terms<T>& c) noexcept {
    index_t j = 0;
#if defined(__AVX512F__)
    j = adam_row_avx512<K>(g, m, v, out, n, c);
#endif
    const T minus_step = -c.step;
    const bool decays = c.decay != T(1);
    for (; j < n; ++j) {
        T mj = m[j], vj = v[j], oj = K == adam_row_kind::moments ? T(0) : out[j];
        adam_element<K, scalar_ops>(g[j], mj, vj, oj, c.beta1, c.c1, c.beta2, c.c2, c.bias2_sqrt, c.eps, minus_step, c.decay, decays);
        m[j] = mj;
        v[j] = vj;
        out[j] = oj;
    }
}

} // namespace velora::cpu
