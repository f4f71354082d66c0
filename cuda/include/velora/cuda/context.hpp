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
#include <string>

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

/// Whether this process can use a CUDA device, and if not, why.
enum class device_availability {
    available,   ///< at least one device, and the runtime works
    none,        ///< no GPU here: no NVIDIA driver installed, or a driver that sees no device
    unusable,    ///< a driver is installed but the runtime fails (too old for this CUDA, a broken
                 ///< container, a device in a bad state): an error to report, never "no GPU"
};

constexpr const char* to_string(device_availability a) noexcept {
    switch (a) {
    case device_availability::available: return "available";
    case device_availability::none: return "none";
    case device_availability::unusable: return "unusable";
    }
    return "unknown";
}

/// What `probe_devices` found: the device count (0 unless available), the runtime's answer
/// (`status`, with the CUDA error name and string when cudaGetDeviceCount failed) and the
/// installed driver's CUDA version (cudaDriverGetVersion: 0 when no driver is installed).
struct device_probe {
    device_availability availability = device_availability::none;
    int count = 0;
    int driver_version = 0;
    cuda_status status;

    /// One line for a log: "2 CUDA device(s)", "no CUDA device: <why>" or "CUDA is unusable: <why>".
    [[nodiscard]] std::string describe() const {
        switch (availability) {
        case device_availability::available: return std::to_string(count) + " CUDA device(s), driver CUDA version " + std::to_string(driver_version);
        case device_availability::none:
            return "no CUDA device: " + (status.ok() ? std::string("the driver reports 0 devices") : status.message) +
                   (driver_version == 0 ? " (no NVIDIA driver installed)" : "");
        case device_availability::unusable:
            return "CUDA is unusable: " + status.message + " (driver CUDA version " + std::to_string(driver_version) + ")";
        }
        return "unknown";
    }
};

namespace detail {
/// The classification behind probe_devices, separate so that it can be tested without a GPU.
/// Only "no device" (cudaErrorNoDevice, or success with 0 devices) and "no driver at all"
/// (cudaErrorInsufficientDriver while cudaDriverGetVersion reports 0, i.e. no libcuda) mean
/// that there is no GPU; every other failure is a GPU that is present but cannot be used.
inline device_availability classify_devices(cudaError_t count_result, int count, int driver_version) noexcept {
    if (count_result == cudaSuccess) return count > 0 ? device_availability::available : device_availability::none;
    if (count_result == cudaErrorNoDevice) return device_availability::none;
    if (count_result == cudaErrorInsufficientDriver && driver_version == 0) return device_availability::none;
    return device_availability::unusable;
}
} // namespace detail

/// Asks the CUDA runtime for its devices; never throws for a CUDA failure (only std::bad_alloc
/// could escape, from the message). Programs that skip GPU work where there is no GPU should
/// skip only on `none` and report `unusable` as the error it is.
inline device_probe probe_devices() {
    device_probe p;
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) (void)cudaGetLastError();   // not left pending for the next call
    if (cudaDriverGetVersion(&p.driver_version) != cudaSuccess) {
        (void)cudaGetLastError();
        p.driver_version = 0;
    }
    p.availability = detail::classify_devices(e, n, p.driver_version);
    p.count = p.availability == device_availability::available ? n : 0;
    if (e != cudaSuccess) p.status = detail::make_status("velora::cuda::probe_devices", "cudaGetDeviceCount", e);
    return p;
}

/// Number of usable CUDA devices: 0 when there is no GPU (no driver, or no device). Throws
/// cuda_error with the runtime's error string when a driver is installed but the runtime
/// cannot use it (e.g. a driver too old for this CUDA version): such a machine has a GPU that
/// is broken, not "no GPU" (see probe_devices).
inline int device_count() {
    const device_probe p = probe_devices();
    if (p.availability == device_availability::unusable) throw cuda_error(p.status);
    return p.count;
}

} // namespace velora::cuda
