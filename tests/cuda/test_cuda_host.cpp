// The CUDA backend's plain-C++ headers (error, buffer, context), built by the host compiler
// and run on every machine: with no GPU the error paths are what is tested, with one the
// allocation-failure paths are.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/cuda/buffer.hpp>
#include <velora/cuda/context.hpp>
#include <velora/cuda/error.hpp>

#include <cstdint>
#include <string>

using namespace velora::cuda;

namespace {
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
} // namespace

TEST_CASE("a status names the velora function, the failed call, the code's name and the library's own string") {
    const cuda_status ok;
    CHECK(ok.ok());
    const cuda_status rt = detail::make_status("velora::f", "cudaMalloc", cudaErrorMemoryAllocation);
    CHECK_FALSE(rt.ok());
    CHECK(rt.library == cuda_library::runtime);
    CHECK(rt.code == static_cast<int>(cudaErrorMemoryAllocation));
    CHECK(contains(rt.message, "velora::f: cudaMalloc failed: cudaErrorMemoryAllocation"));
    CHECK(contains(rt.message, cudaGetErrorString(cudaErrorMemoryAllocation)));
    const cuda_status blas = detail::make_status("velora::g", "cublasSgemm", CUBLAS_STATUS_INVALID_VALUE);
    CHECK(blas.library == cuda_library::cublas);
    CHECK(contains(blas.message, "CUBLAS_STATUS_INVALID_VALUE"));
    CHECK(contains(blas.message, cublasGetStatusString(CUBLAS_STATUS_INVALID_VALUE)));
    const cuda_status solver = detail::make_status("velora::h", "cusolverDnDpotrf", CUSOLVER_STATUS_EXECUTION_FAILED);
    CHECK(solver.library == cuda_library::cusolver);
    CHECK(contains(solver.message, "CUSOLVER_STATUS_EXECUTION_FAILED"));
    const cuda_error e(rt);
    CHECK(std::string(e.what()) == rt.message);
    CHECK(e.status().code == rt.code);
}

TEST_CASE("device_count never throws") {
    const int n = device_count();
    CHECK(n >= 0);
    MESSAGE("CUDA devices visible: " << n);
}

TEST_CASE("a failed device allocation throws cuda_error with the CUDA error string and leaves the buffer as it was") {
    device_buffer<float> buf;
    std::size_t request = 16;
    if (device_count() > 0) {
        buf.resize(16);   // a live allocation that must survive the failed one
        request = std::size_t{1} << 60;   // more than any device has
    }
    float* const before = buf.data();
    const std::size_t size = buf.size(), capacity = buf.capacity();
    try {
        buf.resize(request);
        FAIL("resize succeeded");
    } catch (const cuda_error& e) {
        CHECK(e.status().library == cuda_library::runtime);
        CHECK(contains(e.what(), "velora::cuda::device_buffer::resize: cudaMalloc of " + std::to_string(request * sizeof(float)) + " bytes failed"));
        CHECK(contains(e.what(), cudaGetErrorString(static_cast<cudaError_t>(e.status().code))));
        MESSAGE(std::string(e.what()));
    }
    CHECK(buf.data() == before);
    CHECK(buf.size() == size);
    CHECK(buf.capacity() == capacity);
    if (device_count() > 0) CHECK(cudaGetLastError() == cudaSuccess);   // the failure was not left pending (without a driver every call fails)
}

TEST_CASE("owned_context: without a device, creation throws cuda_error naming the failed call; with one, all three exist") {
    if (device_count() == 0) {
        try {
            owned_context ctx;
            FAIL("created a context without a device");
        } catch (const cuda_error& e) {
            CHECK(contains(e.what(), "velora::cuda::owned_context::owned_context: "));
            CHECK(contains(e.what(), " failed: "));
            MESSAGE(std::string(e.what()));
        }
    } else {
        owned_context ctx;
        CHECK(ctx.get().stream != nullptr);
        CHECK(ctx.get().blas != nullptr);
        CHECK(ctx.get().solver != nullptr);
    }
}

TEST_CASE("device_buffer moves ownership and never copies") {
    static_assert(!std::is_copy_constructible_v<device_buffer<float>>);
    static_assert(std::is_nothrow_move_constructible_v<device_buffer<float>>);
    device_buffer<double> a;
    device_buffer<double> b(std::move(a));
    CHECK(b.data() == nullptr);
    CHECK(b.size() == 0);
}
