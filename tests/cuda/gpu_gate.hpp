#pragma once
// When a GPU program (test or benchmark) may run, skip, or must fail. Plain C++: the decision
// is tested without a GPU in test_cuda_host.
//
//   - enough usable devices: run;
//   - no GPU (no NVIDIA driver, or no device), or fewer devices than the program needs: skip
//     (exit 77, CTest's SKIP_RETURN_CODE), unless VELORA_REQUIRE_GPU=1, which turns the skip
//     into a failure (exit 1) that prints why, the CUDA error string included;
//   - a GPU that is present but unusable (driver too old, broken container, ...): always a
//     failure with the CUDA error string, never a skip.
#include <velora/cuda/context.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace test {

struct gpu_decision {
    enum class action { run, skip, fail };
    action what = action::run;
    std::string message;   // empty when run
};

/// The decision for a program that needs `needed` devices, given what the probe found and
/// whether VELORA_REQUIRE_GPU=1 is set.
inline gpu_decision decide_gpu(const velora::cuda::device_probe& probe, int needed, bool required) {
    using velora::cuda::device_availability;
    if (probe.availability == device_availability::unusable)
        return {gpu_decision::action::fail, probe.describe() + "; a GPU that is present but unusable is an error, not a skip"};
    if (probe.availability == device_availability::available && probe.count >= needed) return {};
    const std::string why = probe.availability == device_availability::none
                                ? probe.describe()
                                : "needs " + std::to_string(needed) + " CUDA devices, " + probe.describe();
    if (required) return {gpu_decision::action::fail, "GPU required (VELORA_REQUIRE_GPU=1) but not run: " + why};
    return {gpu_decision::action::skip, why + "; skipped (set VELORA_REQUIRE_GPU=1 to fail instead)"};
}

inline bool gpu_required_by_environment() {
    const char* v = std::getenv("VELORA_REQUIRE_GPU");
    return v != nullptr && std::strcmp(v, "1") == 0;
}

/// For main(): -1 to run, otherwise the exit code to return (77 skip, 1 failure), after
/// printing the reason prefixed with the program's name.
inline int gpu_gate(const char* program, int needed = 1) {
    const gpu_decision d = decide_gpu(velora::cuda::probe_devices(), needed, gpu_required_by_environment());
    if (d.what == gpu_decision::action::run) return -1;
    std::fprintf(d.what == gpu_decision::action::fail ? stderr : stdout, "%s: %s\n", program, d.message.c_str());
    return d.what == gpu_decision::action::skip ? 77 : 1;
}

} // namespace test
