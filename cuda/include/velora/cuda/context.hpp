#pragma once
/// \file
/// What a host hands the CUDA backend: its stream and library handles (`cuda_context`) and a
/// block of device memory for scratch (`device_workspace`). The host owns all of them, as
/// with CUTLASS and CUB: the backend never creates a stream or handle and never allocates
/// scratch behind the host's back. `owned_context` creates and destroys a set for programs
/// that have none of their own (tests, benchmarks, examples).
///
/// A plain C++ header: it needs the CUDA toolkit's include directory, not nvcc.
#include <cstddef>

#include "buffer.hpp"
#include "error.hpp"

namespace velora::cuda {

/// The stream all backend work is ordered on, and the handles it uses. The backend binds
/// the handles to `stream` before each use (cublasSetStream / cusolverDnSetStream) and sets
/// the cuBLAS pointer mode to host; the math mode is the host's choice (the default is exact
/// FP32/FP64; CUBLAS_TF32_TENSOR_OP_MATH trades float precision for speed).
struct cuda_context {
    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    cusolverDnHandle_t solver = nullptr;
};

/// Device memory the backend may use as scratch, owned by the host. Its required size
/// depends on the largest problem (see cuda_backend::workspace_bytes).
struct device_workspace {
    void* data = nullptr;
    std::size_t bytes = 0;
};

/// A stream, a cuBLAS and a cuSOLVER handle on the current device, created together and
/// destroyed together. Throws cuda_error (nothing leaked) when any creation fails, e.g.
/// when there is no CUDA device.
class owned_context {
public:
    owned_context() {
        constexpr const char* fn = "velora::cuda::owned_context::owned_context";
        try {
            detail::check(cudaStreamCreateWithFlags(&ctx_.stream, cudaStreamNonBlocking), fn, "cudaStreamCreateWithFlags");
            detail::check(cublasCreate(&ctx_.blas), fn, "cublasCreate");
            detail::check(cusolverDnCreate(&ctx_.solver), fn, "cusolverDnCreate");
        } catch (...) {
            destroy();
            throw;
        }
    }
    owned_context(const owned_context&) = delete;
    owned_context& operator=(const owned_context&) = delete;
    ~owned_context() { destroy(); }

    [[nodiscard]] const cuda_context& get() const noexcept { return ctx_; }
    operator cuda_context() const noexcept { return ctx_; }

private:
    void destroy() noexcept {
        if (ctx_.solver) (void)cusolverDnDestroy(ctx_.solver);
        if (ctx_.blas) (void)cublasDestroy(ctx_.blas);
        if (ctx_.stream) (void)cudaStreamDestroy(ctx_.stream);
        ctx_ = {};
    }
    cuda_context ctx_;
};

/// Number of CUDA devices visible to this process; 0 (never an exception) when there is no
/// driver or no device, so programs can skip GPU work cleanly.
inline int device_count() noexcept {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

} // namespace velora::cuda
