#pragma once
/// \file
/// Weights stored in bfloat16 with no float master copy (`low_rank_adamw::step` with a
/// `bf16_weight_view`): the step is computed in float from the bf16 weight, and the new weight is
/// rounded back to bf16, stochastically by default (velora/core/stochastic_rounding.hpp).
///
/// The rounding noise of element i of parameter p at its step t is a pure function of
/// (config.seed, p, t, i) (`weight_rounding_key`), so the weights are bit-identical at any thread
/// count and on every data-parallel rank, and a resumed run rounds as the uninterrupted one did.
#include <concepts>
#include <cstdint>

#include <velora/backend/cpu/threading.hpp>
#include <velora/core/rng.hpp>
#include <velora/core/stochastic_rounding.hpp>
#include <velora/core/storage.hpp>
#include <velora/core/view.hpp>

#include "backend.hpp"   // host_float_backend

namespace adarank {

using velora::bf16_rounding;
using velora::index_t;
using velora::matrix_view;

/// A weight the host stores in bf16, and how its steps round. Converts implicitly from a bf16
/// view, so `opt.step(id, w_bf16, grad)` rounds stochastically; round-to-nearest is spelled
/// `opt.step(id, adarank::bf16_weight_view{w_bf16, velora::bf16_rounding::nearest}, grad)`.
struct bf16_weight_view {
    matrix_view<velora::bfloat16> values;
    bf16_rounding rounding = bf16_rounding::stochastic;

    bf16_weight_view(matrix_view<velora::bfloat16> v, bf16_rounding r = bf16_rounding::stochastic) noexcept : values(v), rounding(r) {}
};


/// The rounding key of parameter `param`'s step number `step` (its step count after the step)
/// under the configuration's seed.
constexpr std::uint64_t weight_rounding_key(std::uint64_t config_seed, std::uint64_t param, std::uint64_t step) noexcept {
    return velora::rounding_key(config_seed ^ velora::mix64(param), step);
}

/// `out` (rows×cols, contiguous) = the bf16 weight as floats (exact).
inline void widen_bf16(int threads, matrix_view<const velora::bfloat16> w, float* out) {
    const index_t rows = w.rows, cols = w.cols;
    const int parts = velora::cpu::fixed_parts(rows, rows * cols);
    velora::cpu::parallel_for_parts(threads, parts, [&](int part) {
        const auto [first, last] = velora::cpu::part_range(rows, parts, part);
        for (index_t r = first; r < last; ++r)
            for (index_t c = 0; c < cols; ++c) out[r * cols + c] = velora::detail::bfloat16_bits_to_float(w(r, c).bits);
    });
}

/// The bf16 weight = `in` (rows×cols, contiguous) rounded by `mode`; element (r, c) draws the noise
/// of index r·cols + c of the pass `key`, so the bits do not depend on how rows are cut.
inline void narrow_to_bf16(int threads, const float* in, matrix_view<velora::bfloat16> w, bf16_rounding mode, std::uint64_t key) {
    const index_t rows = w.rows, cols = w.cols;
    const int parts = velora::cpu::fixed_parts(rows, rows * cols);
    velora::cpu::parallel_for_parts(threads, parts, [&](int part) {
        const auto [first, last] = velora::cpu::part_range(rows, parts, part);
        for (index_t r = first; r < last; ++r)
            for (index_t c = 0; c < cols; ++c) {
                const auto i = static_cast<std::uint64_t>(r * cols + c);
                w(r, c) = velora::round_to_bfloat16(in[i], mode, key, i);
            }
    });
}

} // namespace adarank
