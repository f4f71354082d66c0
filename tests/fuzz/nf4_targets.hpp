#pragma once
// The NF4 weights ("targets") of fuzz_nf4_state, and the weights make_corpus saves as seeds:
// small shapes that still reach every branch of nf4_weight::load_state (plain and
// double-quantised absmaxes, two absmax groups, zero blocks, blocks of huge and subnormal values).
#include <velora/quant/nf4.hpp>
#include <velora/quant/nf4_frozen_weight.hpp>

#include "fuzz_common.hpp"

namespace fuzz {

struct nf4_target {
    const char* name;
    index_t rows, cols;
    velora::nf4_options options;
};

inline std::vector<nf4_target> nf4_targets() {
    return {
        {"plain_4x64_b64", 4, 64, {.block_size = 64, .double_quant = false}},
        {"dq_3x32_b16", 3, 32, {.block_size = 16, .double_quant = true}},
        {"dq_40x32_b4", 40, 32, {.block_size = 4, .double_quant = true}},   // 320 blocks: two absmax groups
        {"plain_6x8_b2", 6, 8, {.block_size = 2, .double_quant = false}},
    };
}

// Weight of target t: Gaussian, with a zero block, a block of huge values and one of subnormals.
inline std::vector<float> nf4_weight_values(std::size_t target, const nf4_target& t) {
    auto w = gaussian(static_cast<std::size_t>(t.rows * t.cols), 0xf4000 + target, 0.05);
    const auto b = static_cast<std::size_t>(t.options.block_size);
    if (w.size() >= 4 * b) {
        std::fill_n(w.begin(), b, 0.0f);
        for (std::size_t j = 0; j < b; ++j) w[b + j] *= 1e38f;
        for (std::size_t j = 0; j < b; ++j) w[2 * b + j] *= 1e-39f;
    }
    return w;
}

inline velora::nf4_weight make_nf4(std::size_t target, const nf4_target& t) {
    const auto w = nf4_weight_values(target, t);
    return velora::nf4_weight::quantize(velora::make_view(w.data(), t.rows, t.cols), t.options);
}

} // namespace fuzz
