#pragma once
/// \file
/// Which vector bodies this build of a CPU kernel has. A kernel with vector bodies (cpu/adam8.hpp,
/// cpu/int4_decode.hpp) writes an AVX-512 body (16 float lanes), an AVX2 + FMA body (8 lanes) and
/// a scalar one that give the same bits; a body is compiled when the target has its instructions
/// (-march=native on an AVX-512 machine compiles all three), the kernel runs the widest by
/// default, and tests pick each in turn to compare it with the scalar one.
#include <string_view>

namespace velora::cpu {

/// A kernel's bodies, widest first; a body the build lacks falls back to the scalar one.
enum class simd_body { avx512, avx2, scalar };

/// Whether this build compiles the AVX-512 body (AVX512F).
inline constexpr bool has_avx512_body =
#if defined(__AVX512F__)
    true;
#else
    false;
#endif

/// Whether this build compiles the AVX2 body (AVX2 and FMA).
inline constexpr bool has_avx2_body =
#if defined(__AVX2__) && defined(__FMA__)
    true;
#else
    false;
#endif

/// The body a kernel runs unless told otherwise.
inline constexpr simd_body widest_body = has_avx512_body ? simd_body::avx512 : has_avx2_body ? simd_body::avx2 : simd_body::scalar;

/// "avx512", "avx2" or "scalar" (benchmarks report the body they ran).
constexpr std::string_view simd_body_name(simd_body b) noexcept { return b == simd_body::avx512 ? "avx512" : b == simd_body::avx2 ? "avx2" : "scalar"; }

} // namespace velora::cpu
