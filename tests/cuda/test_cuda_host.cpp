// The CUDA backend's plain-C++ headers (error, buffer, context), built by the host compiler
// and run on every machine: with no GPU the error paths are what is tested, with one the
// allocation-failure paths are.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/cuda/buffer.hpp>
#include <velora/cuda/context.hpp>
#include <velora/cuda/determinism.hpp>
#include <velora/cuda/error.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "compare.hpp"
#include "gpu_gate.hpp"

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

TEST_CASE("probe_devices: only no driver or no device means no GPU; any other failure is an unusable GPU") {
    using detail::classify_devices;
    CHECK(classify_devices(cudaSuccess, 2, 13000) == device_availability::available);
    CHECK(classify_devices(cudaSuccess, 0, 13000) == device_availability::none);
    CHECK(classify_devices(cudaErrorNoDevice, 0, 13000) == device_availability::none);
    CHECK(classify_devices(cudaErrorInsufficientDriver, 0, 0) == device_availability::none);   // no libcuda at all
    CHECK(classify_devices(cudaErrorInsufficientDriver, 0, 12040) == device_availability::unusable);   // a driver too old for this CUDA
    CHECK(classify_devices(cudaErrorSystemDriverMismatch, 0, 13000) == device_availability::unusable);
    CHECK(classify_devices(cudaErrorDevicesUnavailable, 0, 13000) == device_availability::unusable);
    CHECK(classify_devices(cudaErrorUnknown, 0, 13000) == device_availability::unusable);

    const device_probe p = probe_devices();
    MESSAGE("probe_devices here: " << p.describe());
    CHECK(p.availability != device_availability::unusable);   // this test's machines: a working GPU or none
    if (p.availability == device_availability::available) {
        CHECK(p.count > 0);
        CHECK(p.status.ok());
        CHECK(device_count() == p.count);
    } else {
        CHECK(p.count == 0);
        CHECK(device_count() == 0);
        if (!p.status.ok()) {   // the runtime's own name and string reach the message
            CHECK(contains(p.describe(), "velora::cuda::probe_devices: cudaGetDeviceCount failed: "));
            CHECK(contains(p.describe(), cudaGetErrorString(static_cast<cudaError_t>(p.status.code))));
        }
    }
}

TEST_CASE("the GPU gate: run, skip (77) or fail (1); VELORA_REQUIRE_GPU turns a skip into a failure; an unusable GPU always fails") {
    using action = test::gpu_decision::action;
    device_probe none;
    none.status = detail::make_status("velora::cuda::probe_devices", "cudaGetDeviceCount", cudaErrorNoDevice);
    device_probe one;
    one.availability = device_availability::available;
    one.count = 1;
    device_probe broken;
    broken.availability = device_availability::unusable;
    broken.driver_version = 12040;
    broken.status = detail::make_status("velora::cuda::probe_devices", "cudaGetDeviceCount", cudaErrorInsufficientDriver);

    CHECK(test::decide_gpu(one, 1, false).what == action::run);
    CHECK(test::decide_gpu(one, 1, true).what == action::run);
    CHECK(test::decide_gpu(none, 1, false).what == action::skip);
    const auto required = test::decide_gpu(none, 1, true);
    CHECK(required.what == action::fail);
    CHECK(contains(required.message, "VELORA_REQUIRE_GPU=1"));
    CHECK(contains(required.message, "cudaErrorNoDevice"));
    CHECK(contains(required.message, cudaGetErrorString(cudaErrorNoDevice)));
    CHECK(test::decide_gpu(one, 2, false).what == action::skip);   // a two-GPU test on one GPU
    const auto two = test::decide_gpu(one, 2, true);
    CHECK(two.what == action::fail);
    CHECK(contains(two.message, "needs 2 CUDA devices, 1 CUDA device(s)"));
    for (const bool env : {false, true}) {
        const auto d = test::decide_gpu(broken, 1, env);
        CHECK(d.what == action::fail);
        CHECK(contains(d.message, "CUDA is unusable: velora::cuda::probe_devices: cudaGetDeviceCount failed: cudaErrorInsufficientDriver"));
        CHECK(contains(d.message, cudaGetErrorString(cudaErrorInsufficientDriver)));
    }
}

TEST_CASE("the comparison helpers fail on NaN and on infinities that do not match, never skip over them") {
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    const std::vector<double> ref{1.0, -2.0, 0.5};
    CHECK(test::rel_diff(std::vector<double>{1.0, -2.0, 0.5}, ref) == 0);
    CHECK(test::rel_diff(std::vector<double>{1.0, -2.0, 0.5 + 1e-3}, ref) == doctest::Approx(5e-4));
    CHECK(test::rel_diff(std::vector<double>{nan, nan, nan}, ref) == inf);   // std::max(acc, NaN) == acc would have passed this
    CHECK(test::rel_diff(std::vector<double>{1.0, nan, 0.5}, ref) == inf);
    CHECK(test::rel_diff(std::vector<double>{1.0, -2.0, inf}, ref) == inf);
    CHECK(test::rel_diff(std::vector<double>{1.0, -inf}, std::vector<double>{1.0, inf}) == inf);
    CHECK(test::rel_diff(std::vector<double>{1.0, nan}, std::vector<double>{1.0, nan}) == 0);   // the reference's own NaN, reproduced
    CHECK(test::rel_diff(std::vector<float>{1.0f}, ref) == inf);                                  // sizes differ
    CHECK_FALSE(test::rel_diff(std::vector<double>{nan}, std::vector<double>{1.0}) < 1e-5);
    const auto id = [](double e) { return e; };
    CHECK(test::elementwise_rel_diff(std::vector<double>{nan, 1.0}, std::vector<double>{1.0, 1.0}, 1e-3, id) == inf);
    CHECK(test::elementwise_rel_diff(std::vector<double>{1e-4, 2.0}, std::vector<double>{0.0, 2.0}, 1e-3, id) == doctest::Approx(0.1));
    // Orthonormality: a NaN Q is +inf, not 0.
    const std::vector<double> q{1, 0, 0, 0, 1, 0};   // 2×3, orthonormal rows
    CHECK(test::orthonormality_error(q, 2, 3) == 0);
    CHECK(test::orthonormality_error(std::vector<double>(6, nan), 2, 3) == inf);
    CHECK(test::orthonormality_error(std::vector<double>{1, 0, 0, 0, 2, 0}, 2, 3) == doctest::Approx(3.0));
    // Span: rows in the span give 0, a row outside gives its share outside, NaN gives +inf.
    CHECK(test::span_residual(std::vector<double>{2, 3, 0, 0, 0, 0}, 2, q, 2, 3) == doctest::Approx(0.0));
    CHECK(test::span_residual(std::vector<double>{0, 0, 1}, 1, q, 2, 3) == doctest::Approx(1.0));
    CHECK(test::span_residual(std::vector<double>{nan, 0, 1}, 1, q, 2, 3) == inf);
}

TEST_CASE("determinism rules for the host's handles: full-precision math, no atomics, deterministic cuSOLVER") {
    using detail::determinism_problem;
    CHECK(determinism_problem(CUBLAS_DEFAULT_MATH, CUBLAS_ATOMICS_NOT_ALLOWED, CUSOLVER_DETERMINISTIC_RESULTS).empty());
    CHECK(determinism_problem(CUBLAS_PEDANTIC_MATH, CUBLAS_ATOMICS_NOT_ALLOWED, CUSOLVER_DETERMINISTIC_RESULTS).empty());
    CHECK(determinism_problem(cublasMath_t(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION), CUBLAS_ATOMICS_NOT_ALLOWED,
                              CUSOLVER_DETERMINISTIC_RESULTS)
              .empty());
    for (const cublasMath_t m : {CUBLAS_TF32_TENSOR_OP_MATH, CUBLAS_TENSOR_OP_MATH, CUBLAS_FP32_EMULATED_BF16X9_MATH, CUBLAS_FP64_EMULATED_FIXEDPOINT_MATH,
                                 cublasMath_t(CUBLAS_TF32_TENSOR_OP_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)}) {
        CAPTURE(int(m));
        const std::string p = determinism_problem(m, CUBLAS_ATOMICS_NOT_ALLOWED, CUSOLVER_DETERMINISTIC_RESULTS);
        CHECK(contains(p, "the cuBLAS handle's math mode is CUBLAS_"));
        CHECK(contains(p, "give the backend its own handle"));
    }
    CHECK(contains(determinism_problem(CUBLAS_DEFAULT_MATH, CUBLAS_ATOMICS_ALLOWED, CUSOLVER_DETERMINISTIC_RESULTS), "CUBLAS_ATOMICS_ALLOWED"));
    CHECK(contains(determinism_problem(CUBLAS_DEFAULT_MATH, CUBLAS_ATOMICS_NOT_ALLOWED, CUSOLVER_ALLOW_NON_DETERMINISTIC_RESULTS),
                   "CUSOLVER_ALLOW_NON_DETERMINISTIC_RESULTS"));
}

TEST_CASE("a kernel launch check tells its own failure from an earlier sticky fault") {
    CHECK(detail::is_sticky(cudaErrorIllegalAddress));
    CHECK(detail::is_sticky(cudaErrorLaunchFailure));
    CHECK(detail::is_sticky(cudaErrorAssert));
    CHECK_FALSE(detail::is_sticky(cudaErrorInvalidConfiguration));
    CHECK_FALSE(detail::is_sticky(cudaErrorLaunchOutOfResources));
    CHECK_FALSE(detail::is_sticky(cudaErrorNoKernelImageForDevice));
    const cuda_status own = detail::launch_status("velora::f", cudaErrorInvalidConfiguration);
    CHECK(own.message == detail::make_status("velora::f", "kernel launch", cudaErrorInvalidConfiguration).message);
    const cuda_status earlier = detail::launch_status("velora::f", cudaErrorIllegalAddress);
    CHECK(earlier.code == static_cast<int>(cudaErrorIllegalAddress));
    CHECK(contains(earlier.message, "velora::f: kernel launch refused: an earlier asynchronous fault on the device: cudaErrorIllegalAddress"));
    CHECK(contains(earlier.message, "this launch did not cause it"));
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
