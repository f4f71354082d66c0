#pragma once
// The optimizer configurations ("targets") of fuzz_optimizer_state, and how they are warmed up;
// make_corpus saves states of exactly these.
#include <adarank/adarank.hpp>

#include "fuzz_common.hpp"

namespace fuzz {

using optimizer = adarank::low_rank_adamw<B>;

// ------------------------------------------------------------------------------ optimizer targets
struct param_shape {
    index_t rows, cols;
    adarank::param_kind kind;
};

struct optimizer_target {
    const char* name;
    adarank::optimizer_config config;
    std::vector<param_shape> params;
    int warm_steps;   // steps the harness's live optimizer takes before each load
};

inline std::vector<optimizer_target> optimizer_targets() {
    using adarank::param_kind;
    std::vector<optimizer_target> t;
    {   // AdaRankGrad: adaptive rank, refresh on convergence (every 2 to 3 steps), squared-rotation
        // transport, randomized sketch (k = r_max + 1 = 5 < 6 = half of min(m, n)); a left-side
        // and a right-side low-rank parameter, a bias (dense by the automatic rule), a dense matrix.
        adarank::optimizer_config c;
        c.adam = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-6, .weight_decay = 0.01};
        c.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
        c.refresh = adarank::refresh_policy::converged(0.5, 2, 3);
        c.rsvd.oversampling = 1;
        t.push_back({"adarank", c,
                     {{12, 20, param_kind::low_rank}, {20, 12, param_kind::low_rank}, {1, 20, param_kind::automatic}, {6, 5, param_kind::dense}},
                     4});
    }
    {   // GaLore: fixed rank 3, exact SVD every 2 steps, moments reused unchanged.
        auto c = adarank::optimizer_config::galore(3, 2, 0.25);
        c.adam.lr = 1e-2;
        t.push_back({"galore", c, {{12, 20, param_kind::low_rank}, {20, 12, param_kind::low_rank}, {1, 12, param_kind::automatic}}, 3});
    }
    {   // Captured-energy refresh, clamped-rotation transport, reverse-standard sides, rank in [2, 3],
        // one power iteration, randomized unless the sketch covers the whole matrix.
        adarank::optimizer_config c;
        c.adam = {.lr = 5e-3, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.0};
        c.scale = 0.5;
        c.side = adarank::side_policy::reverse_standard;
        c.rank = adarank::rank_policy::adaptive(0.3, 2, 3);
        c.refresh = adarank::refresh_policy::captured_energy(0.6, 1, 4);
        c.transport = adarank::transport_policy::clamped_rotation;
        c.rsvd.oversampling = 2;
        c.rsvd.power_iterations = 1;
        c.rsvd.exact_fraction = 1.0;
        c.seed = 77;
        t.push_back({"energy", c, {{10, 16, param_kind::low_rank}, {16, 10, param_kind::low_rank}, {3, 3, param_kind::dense}}, 5});
    }
    {   // 8-bit blockwise moments (blocks of 64: several blocks and a short last one in the dense
        // 12x20 matrix), low-rank and dense parameters, refresh every 2 steps (moments transported
        // through their dequantised values).
        auto c = adarank::optimizer_config::galore(3, 2, 0.25);
        c.adam.lr = 1e-2;
        c.transport = adarank::transport_policy::squared_rotation;
        c.state = adarank::state_format::int8_blockwise;
        c.state_block = 64;
        t.push_back({"state8", c, {{12, 20, param_kind::low_rank}, {20, 12, param_kind::low_rank}, {12, 20, param_kind::dense}, {1, 12, param_kind::automatic}}, 3});
    }
    {   // The global memory-budget rank rule: ranks in [1, 4] for the two low-rank parameters within
        // 1200 bytes of state (the bias's 160 + five rank units of 208 bytes), spectra in the state.
        adarank::optimizer_config c;
        c.adam.lr = 1e-2;
        c.rank = adarank::rank_policy::budget(1200, 1, 4);
        c.refresh = adarank::refresh_policy::converged(0.5, 2, 3);
        c.rsvd.oversampling = 1;
        c.seed = 91;
        t.push_back({"budget", c, {{12, 20, param_kind::low_rank}, {20, 12, param_kind::low_rank}, {1, 20, param_kind::automatic}}, 4});
    }
    {   // Quantised bases: int4 codes in blocks of 32 (rows of 12 and 13: one block each, an even
        // and an odd length), with 8-bit moments; int8 codes with float moments and the
        // adaptive rank; refresh every 2 steps (moments transported between decoded bases).
        auto c = adarank::optimizer_config::galore(3, 2, 0.25);
        c.adam.lr = 1e-2;
        c.transport = adarank::transport_policy::squared_rotation;
        c.state = adarank::state_format::int8_blockwise;
        c.state_block = 64;
        c.basis = adarank::basis_format::int4;
        c.basis_block = 32;
        t.push_back({"basis4", c, {{12, 20, param_kind::low_rank}, {20, 13, param_kind::low_rank}, {12, 20, param_kind::dense}}, 3});
        adarank::optimizer_config d;
        d.adam.lr = 1e-2;
        d.rank = adarank::rank_policy::adaptive(0.2, 1, 4);
        d.refresh = adarank::refresh_policy::converged(0.5, 2, 3);
        d.rsvd.oversampling = 1;
        d.basis = adarank::basis_format::int8;
        d.basis_block = 32;
        t.push_back({"basis8", d, {{12, 40, param_kind::low_rank}, {40, 12, param_kind::low_rank}, {1, 20, param_kind::automatic}}, 4});
    }
    return t;
}

inline optimizer make_optimizer(B& backend, const optimizer_target& t) {
    optimizer o(backend, t.config);
    for (const auto& p : t.params) o.add_parameter(p.rows, p.cols, p.kind);
    return o;
}

// Initial weights of parameter p, and its gradient at step s (finite, deterministic).
inline std::vector<float> initial_weight(std::size_t target, std::size_t p, const param_shape& s) {
    return gaussian(static_cast<std::size_t>(s.rows * s.cols), 1000 * target + p, 0.5);
}
inline std::vector<float> gradient(std::size_t target, std::size_t p, const param_shape& s, std::uint64_t step) {
    return gaussian(static_cast<std::size_t>(s.rows * s.cols), 0x6a0000 + 10000 * target + 100 * p + step, 1.0);
}

// One step of every parameter; aborts (through `harness`) unless each returns ok.
inline void step_all(const char* harness, optimizer& o, std::size_t target_index, const optimizer_target& t,
                     std::vector<std::vector<float>>& weights, std::uint64_t step) {
    for (std::size_t p = 0; p < t.params.size(); ++p) {
        const auto& s = t.params[p];
        const auto g = gradient(target_index, p, s, step);
        const auto st = o.step(static_cast<index_t>(p), velora::make_view(weights[p].data(), s.rows, s.cols),
                               velora::make_view(g.data(), s.rows, s.cols));
        FUZZ_CHECK(st == velora::status::ok, harness, std::string("warm-up step of target ") + t.name + " returned " + std::string(velora::to_string(st)));
    }
}

} // namespace fuzz
