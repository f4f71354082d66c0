#pragma once
/// \file
/// How the CUDA backend reports failures of the CUDA runtime, cuBLAS and cuSOLVER (and, through
/// velora/cuda/nccl.hpp, of NCCL).
///
/// Every failed call becomes a `cuda_status`: the library that failed, its numeric code, the
/// code's name and the library's own error string, prefixed with the velora function that
/// made the call. Calls that cannot continue (an allocation, a launch, a copy) throw it as a
/// `cuda_error`; `cuda_backend::synchronize()` returns it without throwing, for hosts that
/// poll for asynchronous errors once per step. Caller mistakes (shapes, null pointers, a
/// workspace that is too small) stay `std::invalid_argument`, as on the CPU.
///
/// A plain C++ header: it needs the CUDA toolkit's include directory, not nvcc.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace velora::cuda {

/// Which library a `cuda_status` comes from.
enum class cuda_library { none, runtime, cublas, cusolver, nccl };

constexpr std::string_view to_string(cuda_library l) noexcept {
    switch (l) {
    case cuda_library::none: return "none";
    case cuda_library::runtime: return "CUDA runtime";
    case cuda_library::cublas: return "cuBLAS";
    case cuda_library::cusolver: return "cuSOLVER";
    case cuda_library::nccl: return "NCCL";
    }
    return "unknown";
}

/// The outcome of a CUDA-side operation: ok, or which library failed with which code and why.
struct cuda_status {
    cuda_library library = cuda_library::none;
    int code = 0;              ///< cudaError_t, cublasStatus_t, cusolverStatus_t or ncclResult_t
    std::string message;       ///< "<velora function>: <call> failed: <name> (<library's error string>)"

    [[nodiscard]] bool ok() const noexcept { return library == cuda_library::none; }
    explicit operator bool() const noexcept { return ok(); }
};

/// Thrown by backend calls that cannot continue; carries the status.
class cuda_error : public std::runtime_error {
public:
    explicit cuda_error(cuda_status s) : std::runtime_error(s.message), status_(std::move(s)) {}
    [[nodiscard]] const cuda_status& status() const noexcept { return status_; }

private:
    cuda_status status_;
};

namespace detail {

inline const char* cublas_name(cublasStatus_t s) noexcept {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    }
    return "unknown cuBLAS status";
}

inline const char* cusolver_name(cusolverStatus_t s) noexcept {
    switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    default: return "cuSOLVER error";
    }
}

inline cuda_status make_status(std::string_view function, std::string_view call, cudaError_t e) {
    return {cuda_library::runtime, static_cast<int>(e),
            std::string(function) + ": " + std::string(call) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")"};
}
inline cuda_status make_status(std::string_view function, std::string_view call, cublasStatus_t e) {
    return {cuda_library::cublas, static_cast<int>(e),
            std::string(function) + ": " + std::string(call) + " failed: " + cublas_name(e) + " (" + cublasGetStatusString(e) + ")"};
}
inline cuda_status make_status(std::string_view function, std::string_view call, cusolverStatus_t e) {
    return {cuda_library::cusolver, static_cast<int>(e),
            std::string(function) + ": " + std::string(call) + " failed: " + cusolver_name(e) + " (code " + std::to_string(static_cast<int>(e)) + ")"};
}

inline bool failed(cudaError_t e) noexcept { return e != cudaSuccess; }
inline bool failed(cublasStatus_t e) noexcept { return e != CUBLAS_STATUS_SUCCESS; }
inline bool failed(cusolverStatus_t e) noexcept { return e != CUSOLVER_STATUS_SUCCESS; }

/// Whether a CUDA runtime error is "sticky": a fault of device code that ran earlier (an illegal
/// address, a device-side assert, ...), which leaves the CUDA context unusable and is returned by
/// every later call, a kernel launch's error check included. Such an error says nothing about the
/// call that reports it. (The errors whose documentation in driver_types.h says that further CUDA
/// work will return the same error or that the process must be relaunched.)
constexpr bool is_sticky(cudaError_t e) noexcept {
    switch (e) {
    case cudaErrorContained:
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure:
    case cudaErrorTensorMemoryLeak:
    case cudaErrorExternalDevice:
        return true;
    default:
        return false;
    }
}

/// The status of a kernel launch whose check (cudaGetLastError) returned `e`: the launch's own
/// failure (a bad configuration, a missing kernel image, ...), or, for a sticky error, an earlier
/// asynchronous fault that this launch merely reports, said as such.
inline cuda_status launch_status(std::string_view function, cudaError_t e) {
    cuda_status s = make_status(function, "kernel launch", e);
    if (is_sticky(e))
        s.message = std::string(function) + ": kernel launch refused: an earlier asynchronous fault on the device: " + cudaGetErrorName(e) +
                    " (" + cudaGetErrorString(e) + "); sticky: the CUDA context is unusable, so this launch did not cause it and every later call fails";
    return s;
}

/// Throws cuda_error when `result` (of `call`, made by `function`) is a failure.
template <class Code>
void check(Code result, std::string_view function, std::string_view call) {
    if (failed(result)) {
        if constexpr (std::is_same_v<Code, cudaError_t>) (void)cudaGetLastError();   // clear a non-sticky error
        throw cuda_error(make_status(function, call, result));
    }
}

} // namespace detail
} // namespace velora::cuda
