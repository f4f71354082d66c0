#pragma once
// A fixed run of a float low_rank_adamw on the CPU backend, shared by the test programs that
// compare the same run under different storage formats (test_quantized_basis, test_state8_optimizer):
// the parameters' weights and gradients are deterministic Gaussians, so two runs differ only by
// the configuration and the thread count.
#include <adarank/adarank.hpp>
#include <velora/backend/eigen.hpp>
#include <velora/core/rng.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace test {

// n values scale·N(0, 1), the stream `seed` of the library's counter-based Gaussian.
inline std::vector<float> gaussian(velora::index_t n, std::uint64_t seed, double scale) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (velora::index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = static_cast<float>(scale * velora::gaussian_at(seed, static_cast<std::uint64_t>(i)));
    return v;
}

struct parameter_shape {
    velora::index_t rows, cols;
    adarank::param_kind kind;
};

struct optimizer_run {
    std::vector<std::vector<float>> weights;
    std::vector<std::byte> state;
    std::size_t state_bytes = 0;
};

// The parameters registered in order (weights of parameter p: gaussian(rows·cols, 10 + p, 0.5)),
// then `steps` rounds of one step per parameter (gradient of p at round t: gaussian(rows·cols,
// 1000 + 10·t + p, 1)), each required to return ok; the weights, save_state() and state_bytes().
inline optimizer_run run_optimizer(const adarank::optimizer_config& c, int threads, int steps, std::span<const parameter_shape> parameters) {
    velora::eigen_backend<float> backend(threads);
    adarank::low_rank_adamw<velora::eigen_backend<float>> o(backend, c);
    optimizer_run r;
    for (std::size_t p = 0; p < parameters.size(); ++p) {
        o.add_parameter(parameters[p].rows, parameters[p].cols, parameters[p].kind);
        r.weights.push_back(gaussian(parameters[p].rows * parameters[p].cols, 10 + p, 0.5));
    }
    for (int t = 0; t < steps; ++t)
        for (std::size_t p = 0; p < parameters.size(); ++p) {
            const velora::index_t rows = parameters[p].rows, cols = parameters[p].cols;
            const auto g = gaussian(rows * cols, 1000 + 10 * static_cast<std::uint64_t>(t) + p, 1.0);
            REQUIRE(o.step(static_cast<velora::index_t>(p), velora::make_view(r.weights[p].data(), rows, cols), velora::make_view(g.data(), rows, cols)) ==
                    velora::status::ok);
        }
    r.state = o.save_state();
    r.state_bytes = o.state_bytes();
    return r;
}

} // namespace test
