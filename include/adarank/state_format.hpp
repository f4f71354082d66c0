#pragma once
/// \file
/// How `low_rank_adamw` stores the Adam moments (`optimizer_config::state`, `state_block`): in the
/// parameter's float type, or as 8-bit blockwise dynamic codes (velora/backend/rules/dynamic_code.hpp:
/// a float absmax per block of `state_block` elements, m signed, v unsigned; bitsandbytes' 8-bit
/// optimizers' format). Kept apart from policies.hpp so the two fields are one include there.
#include <cstdint>
#include <string_view>

#include <velora/core/error.hpp>
#include <velora/core/view.hpp>

namespace adarank {

using velora::index_t;

/// The moments' storage.
enum class state_format : std::uint8_t {
    float32 = 0,          ///< the parameter's value type (float or double)
    int8_blockwise = 1,   ///< one byte per moment element + one float absmax per block and moment (float optimizers on a blockwise_state_backend: the CPU and CUDA backends)
};

/// The block sizes the 8-bit format supports: powers of two from 64 to 4096 (the CPU bodies keep
/// two blocks of floats on the stack). 256 is the default: bitsandbytes' block size, and with
/// 512 the fastest measured (64 takes ~1.4x its time, 128 and 1024-4096 1.1-1.3x;
/// docs/performance.md, bench_state8), while the dequantisation error per element is bounded by
/// its own block's absmax (smaller blocks follow the moments' dynamic range more closely).
inline constexpr index_t min_state_block = 64, max_state_block = 4096, default_state_block = 256;

/// Throws std::invalid_argument naming `function` and the value unless `block` is supported.
inline void check_state_block(index_t block, std::string_view function) {
    velora::detail::require(block >= min_state_block && block <= max_state_block && (block & (block - 1)) == 0, function,
                            "config.state_block must be a power of two in [", min_state_block, ", ", max_state_block, "], got ", block);
}

} // namespace adarank
