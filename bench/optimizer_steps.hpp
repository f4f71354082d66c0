#pragma once
/// \file
/// Whole `low_rank_adamw` steps as a benchmark: one parameter with Gaussian weights and a fixed
/// Gaussian gradient, one warm-up step (it finds the first basis), then the timed steps, each
/// required to return status::ok, and the optimizer's state bytes as a counter. bench_state8
/// (moment formats) and bench_basis (basis formats) time it; they differ only in the
/// configuration and the shape they pass.
#include <benchmark/benchmark.h>

#include <stdexcept>
#include <vector>

#include <adarank/adarank.hpp>
#include <velora/backend/eigen.hpp>

#include "common.hpp"

namespace bench {

struct optimizer_step_fixture {
    adarank::low_rank_adamw<velora::eigen_backend<float>> opt;
    velora::index_t rows, cols;
    std::vector<float> w, g;
    velora::index_t id;
    optimizer_step_fixture(velora::eigen_backend<float>& backend, const adarank::optimizer_config& config, adarank::param_kind kind, velora::index_t r,
                           velora::index_t c)
        : opt(backend, config), rows(r), cols(c), w(static_cast<std::size_t>(r * c)), g(static_cast<std::size_t>(r * c)), id(opt.add_parameter(r, c, kind)) {
        fill_gaussian(w.data(), r * c, 3, 0.02);
        fill_gaussian(g.data(), r * c, 4, 1e-3);
        if (step() != velora::status::ok) throw std::runtime_error("warm-up step did not return status::ok");
    }
    velora::status step() { return opt.step(id, velora::matrix_view<float>(w.data(), rows, cols), velora::const_matrix_view<float>(g.data(), rows, cols)); }
};

/// Times steps of an r×c parameter of `kind` under `config` (the fixture's set-up is not timed).
inline void time_optimizer_steps(benchmark::State& state, velora::eigen_backend<float>& backend, const adarank::optimizer_config& config,
                                 adarank::param_kind kind, velora::index_t r, velora::index_t c) {
    guarded(state, [&] {
        optimizer_step_fixture f(backend, config, kind, r, c);
        for (auto _ : state) {
            if (f.step() != velora::status::ok) return state.SkipWithError("step did not return status::ok");
            benchmark::ClobberMemory();
        }
        state.counters["state_bytes"] = static_cast<double>(f.opt.state_bytes());
    });
}

} // namespace bench
