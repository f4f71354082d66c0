#pragma once
// The compressor configurations ("targets") of fuzz_compressor_state, and how they are warmed up;
// make_corpus saves states of exactly these.
#include <velora/compressor.hpp>

#include "fuzz_common.hpp"

namespace fuzz {

using compressor = velora::compressor<B>;

// ------------------------------------------------------------------------------ compressor targets
struct compressor_target {
    const char* name;
    index_t features;
    velora::compressor_config config;
    int warm_batches;   // compress calls the harness's live compressor makes before each load
};

inline constexpr index_t compress_tokens = 6;

inline std::vector<compressor_target> compressor_targets() {
    using velora::storage;
    using velora::v_mode;
    return {
        {"first_batch_mean_f32", 20, {.groups = 4, .v = v_mode::first_batch_mean(), .z_storage = storage::f32, .scale = 1.0}, 2},
        {"ema_f16_padded", 21, {.groups = 5, .v = v_mode::ema(0.9), .z_storage = storage::f16, .scale = 0.5}, 3},
        {"random_f32_s16", 32, {.groups = 2, .v = v_mode::random(7), .z_storage = storage::f32, .scale = 1.0}, 1},
        {"given_bf16", 12, {.groups = 3, .v = v_mode::given(), .z_storage = storage::bf16, .scale = 2.0}, 1},
        {"batch_mean_s1", 10, {.groups = 10, .v = v_mode::batch_mean(), .z_storage = storage::f32, .scale = 1.0}, 2},
    };
}

// Batch b of target t (T×D, finite, with a non-zero sub-token mean).
inline std::vector<float> batch(std::size_t target, const compressor_target& t, std::uint64_t b) {
    auto x = gaussian(static_cast<std::size_t>(compress_tokens * t.features), 0xc0000 + 1000 * target + b, 0.5);
    for (auto& e : x) e += 0.25f;
    return x;
}

inline compressor make_compressor(B& backend, const compressor_target& t) {
    compressor c(backend, t.features, t.config);
    if (t.config.v.type == velora::v_mode::kind::given) {
        const auto v = gaussian(static_cast<std::size_t>(c.subtoken_size()), 4242, 1.0);
        c.set_v(v);
    }
    return c;
}

inline void compress_batches(const char* harness, compressor& c, std::size_t target_index, const compressor_target& t, std::uint64_t first,
                             std::uint64_t count) {
    compressor::record_type r;
    for (std::uint64_t b = first; b < first + count; ++b) {
        const auto x = batch(target_index, t, b);
        const auto st = c.compress(velora::make_view(x.data(), compress_tokens, t.features), r);
        FUZZ_CHECK(st == velora::status::ok, harness, std::string("warm-up compress of target ") + t.name + " returned " + std::string(velora::to_string(st)));
    }
}

} // namespace fuzz
