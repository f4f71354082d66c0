#pragma once
// A fixed run of a float low_rank_adamw on the CPU backend, shared by the test programs that
// compare the same run under different storage formats (test_quantized_basis, test_state8_optimizer):
// the parameters' weights and gradients are deterministic Gaussians, so two runs differ only by
// the configuration, the thread count and the rank.
#include <adarank/adarank.hpp>
#include <velora/backend/eigen.hpp>
#include <velora/core/rng.hpp>

#include <doctest/doctest.h>

#include "mirrored_pair.hpp"

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
    std::vector<adarank::layer_info> layers;   // each parameter's layer_state() after the last step
};

// The parameters registered in order (weights of parameter p: gaussian(rows·cols, 10 + p, 0.5)),
// then `steps` rounds of one step per parameter (gradient of p at round t: gaussian(rows·cols,
// 1000 + 10·t + p, 1)), each required to return ok; the weights, save_state(), state_bytes() and
// the parameters' layer_state().
// rank >= 0: every step as that rank of a mirrored_pair (the data-parallel path, whose mean
// gradient is the one-process gradient); rank < 0: one process.
inline optimizer_run run_optimizer(const adarank::optimizer_config& c, int threads, int steps, std::span<const parameter_shape> parameters, int rank = -1) {
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
            const auto id = static_cast<velora::index_t>(p);
            const auto w = velora::make_view(r.weights[p].data(), rows, cols);
            const auto gv = velora::make_view(g.data(), rows, cols);
            mirrored_pair comm{rank};
            REQUIRE((rank < 0 ? o.step(id, w, gv) : o.step(id, w, gv, comm)) == velora::status::ok);
        }
    r.state = o.save_state();
    r.state_bytes = o.state_bytes();
    for (std::size_t p = 0; p < parameters.size(); ++p) r.layers.push_back(o.layer_state(static_cast<velora::index_t>(p)));
    return r;
}

} // namespace test
