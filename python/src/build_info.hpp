// velora._C.build_info(): what this extension was compiled with, as a dict. The CPU kernels pick
// their SIMD bodies at compile time (backend/cpu/adam.hpp, adam8.hpp), so a build without the
// host's instruction sets runs the scalar bodies, several times slower (and, without FMA, with
// multiply-adds rounded twice: other bits than a native build's, cpu/lanes.hpp). This says
// which bodies a build holds, so that a slow install can be told from a slow machine.
// Included by bindings.cpp (the extension is one translation unit).
#pragma once

#include <torch/extension.h>

#include <string>

#include <velora/backend/cpu/adam.hpp>
#include <velora/backend/cpu/adam8.hpp>
#include <velora/backend/cpu/gemm.hpp>

// Set by python/CMakeLists.txt: the architecture flags it added ("" for a portable build) and
// whether VELORA_PYTHON_NATIVE was ON.
#if !defined(VELORA_PYTHON_ARCH_FLAGS) || !defined(VELORA_PYTHON_NATIVE)
#error "VELORA_PYTHON_ARCH_FLAGS and VELORA_PYTHON_NATIVE are defined by python/CMakeLists.txt"
#endif

namespace velora_python {

inline pybind11::dict build_info() {
    namespace cpu = velora::cpu;
    pybind11::dict d;
    d["adamw8_body"] = cpu::adam8_has_avx512 ? "avx512" : cpu::adam8_has_avx2 ? "avx2" : "scalar";
    d["adamw_body"] = cpu::adam_has_avx512 ? "avx512" : "scalar";
    d["blas"] = cpu::blas_name();
    d["native"] = VELORA_PYTHON_NATIVE != 0;
    d["arch_flags"] = VELORA_PYTHON_ARCH_FLAGS;
    pybind11::list isa;   // the instruction sets the compiler was told it may use, of those the kernels test
#if defined(__AVX512F__)
    isa.append("avx512f");
#endif
#if defined(__AVX512BW__) && defined(__AVX512VBMI__)
    isa.append("avx512vbmi");   // with BW: the 8-bit body's 64-byte table look-ups
#endif
#if defined(__AVX2__)
    isa.append("avx2");
#endif
#if defined(__FMA__)
    isa.append("fma");
#endif
    d["isa"] = isa;
#if defined(_OPENMP)
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#if defined(__VERSION__)
    d["compiler"] = std::string(__VERSION__);
#else
    d["compiler"] = std::string("unknown");
#endif
    return d;
}

} // namespace velora_python
