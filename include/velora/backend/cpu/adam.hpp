#pragma once
/// \file
/// Adam(W)'s element-wise update on the CPU, the same bits wherever the rows lie in memory.
///
///   m += c1·(g − m),  v += c2·fma(g, g, −v),  n = m / (√v + ε)
///   then either out = n (moments only; out may alias g) or w = decay·fma(−step, n, w).
///
/// Every multiply-add is spelled out as a fused one, in the AVX-512 body (whole 64-byte packets
/// from the row's first element, unaligned loads) and in the scalar tail alike, so a row gives
/// the same bits whatever its alignment (see lanes.hpp for why an Eigen expression would not).
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "lanes.hpp"

namespace velora::cpu {

template <class T>
struct adam_coefficients {
    T c1, c2, eps, step, decay;   // 1−β₁, 1−β₂, ε, step size, 1 − lr·wd
};

#if defined(__AVX512F__)
namespace simd {
// The few AVX-512 operations the Adam row needs, for float and double alike.
template <class T>
struct avx512;
template <>
struct avx512<float> {
    using reg = __m512;
    static constexpr index_t width = 16;
    static reg set1(float x) noexcept { return _mm512_set1_ps(x); }
    static reg load(const float* p) noexcept { return _mm512_loadu_ps(p); }
    static void store(float* p, reg x) noexcept { _mm512_storeu_ps(p, x); }
    static reg add(reg a, reg b) noexcept { return _mm512_add_ps(a, b); }
    static reg sub(reg a, reg b) noexcept { return _mm512_sub_ps(a, b); }
    static reg mul(reg a, reg b) noexcept { return _mm512_mul_ps(a, b); }
    static reg div(reg a, reg b) noexcept { return _mm512_div_ps(a, b); }
    static reg sqrt(reg a) noexcept { return _mm512_sqrt_ps(a); }
    static reg fmadd(reg a, reg b, reg c) noexcept { return _mm512_fmadd_ps(a, b, c); }
    static reg fmsub(reg a, reg b, reg c) noexcept { return _mm512_fmsub_ps(a, b, c); }
};
template <>
struct avx512<double> {
    using reg = __m512d;
    static constexpr index_t width = 8;
    static reg set1(double x) noexcept { return _mm512_set1_pd(x); }
    static reg load(const double* p) noexcept { return _mm512_loadu_pd(p); }
    static void store(double* p, reg x) noexcept { _mm512_storeu_pd(p, x); }
    static reg add(reg a, reg b) noexcept { return _mm512_add_pd(a, b); }
    static reg sub(reg a, reg b) noexcept { return _mm512_sub_pd(a, b); }
    static reg mul(reg a, reg b) noexcept { return _mm512_mul_pd(a, b); }
    static reg div(reg a, reg b) noexcept { return _mm512_div_pd(a, b); }
    static reg sqrt(reg a) noexcept { return _mm512_sqrt_pd(a); }
    static reg fmadd(reg a, reg b, reg c) noexcept { return _mm512_fmadd_pd(a, b, c); }
    static reg fmsub(reg a, reg b, reg c) noexcept { return _mm512_fmsub_pd(a, b, c); }
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
template <bool kWeight, class T>
index_t adam_row_avx512(const T* g, T* m, T* v, T* out, index_t n, const adam_coefficients<T>& c) noexcept {
    using V = simd::avx512<T>;
    const auto c1 = V::set1(c.c1), c2 = V::set1(c.c2), eps = V::set1(c.eps), minus_step = V::set1(-c.step), decay = V::set1(c.decay);
    index_t j = 0;
    for (; j + V::width <= n; j += V::width) {
        prefetch_ahead(g + j);
        prefetch_ahead(m + j);
        prefetch_ahead(v + j);
        if (out != g) prefetch_ahead(out + j);
        const auto gj = V::load(g + j), mj0 = V::load(m + j), vj0 = V::load(v + j);
        const auto mj = V::fmadd(c1, V::sub(gj, mj0), mj0);
        const auto vj = V::fmadd(c2, V::fmsub(gj, gj, vj0), vj0);
        V::store(m + j, mj);
        V::store(v + j, vj);
        const auto nj = V::div(mj, V::add(V::sqrt(vj), eps));
        if constexpr (kWeight) {
            const auto wj = V::fmadd(minus_step, nj, V::load(out + j));
            V::store(out + j, c.decay == T(1) ? wj : V::mul(decay, wj));
        } else {
            V::store(out + j, nj);
        }
    }
    return j;
}
#endif

/// One row of n elements (see the file comment).
template <bool kWeight, class T>
void adam_row(const T* g, T* m, T* v, T* out, index_t n, const adam_coefficients<T>& c) noexcept {
    index_t j = 0;
#if defined(__AVX512F__)
    j = adam_row_avx512<kWeight>(g, m, v, out, n, c);
#endif
    for (; j < n; ++j) {
        const T gj = g[j];
        const T mj = fused(c.c1, gj - m[j], m[j]);
        const T vj = fused(c.c2, fused(gj, gj, -v[j]), v[j]);
        m[j] = mj;
        v[j] = vj;
        const T nj = mj / (std::sqrt(vj) + c.eps);
        if constexpr (kWeight) out[j] = c.decay == T(1) ? fused(-c.step, nj, out[j]) : c.decay * fused(-c.step, nj, out[j]);
        else out[j] = nj;
    }
}

} // namespace velora::cpu
