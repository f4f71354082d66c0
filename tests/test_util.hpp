#pragma once
// Helpers shared by the test programs.
#include <velora/backend/cpu/gemm.hpp>
#include <velora/core/rng.hpp>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace test {

// Deterministic test data: Gaussian noise around `mean` plus a slow wiggle, so sub-token means
// have a direction and no two columns are alike.
template <class T>
std::vector<T> data(std::size_t n, std::uint64_t seed, double mean = 0.0) {
    std::vector<T> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<T>(mean + 0.3 * std::sin(double(i % 97)) + velora::gaussian_at(seed, i));
    return v;
}

// The message of the std::invalid_argument that f throws, or a marker that none was thrown.
template <class F>
std::string invalid_argument_message(F&& f) {
    try {
        f();
    } catch (const std::invalid_argument& e) {
        return e.what();
    }
    return "<no std::invalid_argument thrown>";
}

// The GEMM engines this build has: Eigen's product always, the BLAS when one is linked.
inline std::vector<velora::cpu::gemm_engine> gemm_engines() {
    std::vector<velora::cpu::gemm_engine> e{velora::cpu::gemm_engine::eigen};
    if (velora::cpu::has_blas) e.push_back(velora::cpu::gemm_engine::blas);
    return e;
}

} // namespace test
