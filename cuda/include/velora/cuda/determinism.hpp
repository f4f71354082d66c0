#pragma once
/// \file
/// What the CUDA backend needs of the host's cuBLAS and cuSOLVER handles for its results to be
/// the same bits on every run and every rank, checked when a `cuda_backend` is constructed:
///
///   - cuBLAS math mode CUBLAS_DEFAULT_MATH or CUBLAS_PEDANTIC_MATH (either with the
///     CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION flag or without): TF32, BF16x9,
///     FP64 fixed-point emulation and the deprecated CUBLAS_TENSOR_OP_MATH compute float or
///     double GEMMs in less precision than the CPU backend and the tests' tolerances assume,
///     and a rank whose handle differs would drift from the others;
///   - cuBLAS atomics CUBLAS_ATOMICS_NOT_ALLOWED (the default): the atomics variants are not
///     reproducible from run to run;
///   - cuSOLVER CUSOLVER_DETERMINISTIC_RESULTS (the default): the other mode lets potrf,
///     geqrf and syevd reorder their sums between runs.
///
/// A handle set otherwise is refused with std::invalid_argument naming the setting, never
/// changed behind the host's back (the host may use the same handle for its own work); a host
/// that wants TF32 for its own GEMMs gives the backend a second handle.
///
/// cuBLAS promises identical bits only while one stream uses a handle at a time (cuBLAS guide,
/// "Results reproducibility"): a host that runs GEMMs on other streams concurrently gives those
/// streams their own handle (or its own cublasSetWorkspace per stream).
///
/// A plain C++ header: it needs the CUDA toolkit's include directory, not nvcc.
#include <cublas_v2.h>
#include <cusolverDn.h>

#include <string>

#include <velora/core/error.hpp>

#include "context.hpp"
#include "error.hpp"

namespace velora::cuda {

namespace detail {

inline const char* math_mode_name(int base) noexcept {
    switch (base) {
    case CUBLAS_DEFAULT_MATH: return "CUBLAS_DEFAULT_MATH";
    case CUBLAS_TENSOR_OP_MATH: return "CUBLAS_TENSOR_OP_MATH";
    case CUBLAS_PEDANTIC_MATH: return "CUBLAS_PEDANTIC_MATH";
    case CUBLAS_TF32_TENSOR_OP_MATH: return "CUBLAS_TF32_TENSOR_OP_MATH";
    case CUBLAS_FP32_EMULATED_BF16X9_MATH: return "CUBLAS_FP32_EMULATED_BF16X9_MATH";
    case CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH: return "CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH";
    default: return "an unknown cuBLAS math mode";
    }
}

/// What is wrong with these handle settings for the backend ("" when nothing): the rules of the
/// file comment, separate from the queries so that they can be tested without a GPU.
inline std::string determinism_problem(cublasMath_t math, cublasAtomicsMode_t atomics, cusolverDeterministicMode_t solver) {
    const int base = static_cast<int>(math) & ~static_cast<int>(CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    if (base != CUBLAS_DEFAULT_MATH && base != CUBLAS_PEDANTIC_MATH)
        return std::string("the cuBLAS handle's math mode is ") + math_mode_name(base) + " (" + std::to_string(static_cast<int>(math)) +
               "); the backend needs full-precision float/double GEMMs: CUBLAS_DEFAULT_MATH or CUBLAS_PEDANTIC_MATH (give the backend its own handle)";
    if (atomics != CUBLAS_ATOMICS_NOT_ALLOWED)
        return "the cuBLAS handle allows atomics (CUBLAS_ATOMICS_ALLOWED), whose results differ from run to run; the backend needs "
               "CUBLAS_ATOMICS_NOT_ALLOWED";
    if (solver != CUSOLVER_DETERMINISTIC_RESULTS)
        return "the cuSOLVER handle allows non-deterministic results (CUSOLVER_ALLOW_NON_DETERMINISTIC_RESULTS); the backend needs "
               "CUSOLVER_DETERMINISTIC_RESULTS";
    return {};
}

} // namespace detail

/// Queries the context's handles and throws std::invalid_argument, naming `function` and the
/// setting, when they would make the backend's results differ between runs or ranks; a failed
/// query throws cuda_error.
inline void require_deterministic_handles(const cuda_context& context, const char* function) {
    cublasMath_t math = CUBLAS_DEFAULT_MATH;
    cublasAtomicsMode_t atomics = CUBLAS_ATOMICS_NOT_ALLOWED;
    cusolverDeterministicMode_t solver = CUSOLVER_DETERMINISTIC_RESULTS;
    detail::check(cublasGetMathMode(context.blas, &math), function, "cublasGetMathMode");
    detail::check(cublasGetAtomicsMode(context.blas, &atomics), function, "cublasGetAtomicsMode");
    detail::check(cusolverDnGetDeterministicMode(context.solver, &solver), function, "cusolverDnGetDeterministicMode");
    const std::string problem = detail::determinism_problem(math, atomics, solver);
    velora::detail::require(problem.empty(), function, problem);
}

} // namespace velora::cuda
