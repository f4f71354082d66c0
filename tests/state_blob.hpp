#pragma once
// Reading and editing a saved optimizer state in the tests that check what load_state refuses
// (optimizer_state_io.hpp describes the format; core/serialize.hpp the envelope).
#include <velora/core/hash.hpp>
#include <velora/core/view.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace test {

// The checksum of a blob recomputed after its payload was edited (FNV-1a 64 of everything
// before the last 8 bytes), so that the loader's own checks are the ones that refuse it.
inline void reseal(std::vector<std::byte>& blob) {
    const std::uint64_t sum = velora::fnv1a64(std::span<const std::byte>(blob.data(), blob.size() - 8));
    std::memcpy(blob.data() + blob.size() - 8, &sum, 8);
}

// The 8-bit moments of the last parameter of a saved state (state_format::int8_blockwise): the
// bytes of m and of v (count each), then the absmax of m's and of v's blocks (one float per
// block each), every array preceded by its 8-byte length; only the checksum follows them.
struct saved_moments8 {
    std::size_t qm_at = 0, qv_at = 0, am_at = 0, av_at = 0;   // offsets of the arrays' first elements
    std::vector<std::uint8_t> qm, qv;
    std::vector<float> am, av;
};

inline saved_moments8 last_moments8(const std::vector<std::byte>& blob, velora::index_t count, velora::index_t block) {
    const auto n = static_cast<std::size_t>(count), blocks = static_cast<std::size_t>((count + block - 1) / block);
    saved_moments8 s;
    s.av_at = blob.size() - 8 - 4 * blocks;
    s.am_at = s.av_at - 8 - 4 * blocks;
    s.qv_at = s.am_at - 8 - n;
    s.qm_at = s.qv_at - 8 - n;
    const auto length_before = [&](std::size_t at) {
        std::uint64_t length = 0;
        std::memcpy(&length, blob.data() + at - 8, 8);
        return length;
    };
    REQUIRE(length_before(s.qm_at) == n);   // the layout is the one described above
    REQUIRE(length_before(s.qv_at) == n);
    REQUIRE(length_before(s.am_at) == blocks);
    REQUIRE(length_before(s.av_at) == blocks);
    const auto bytes = [&](std::size_t at) {
        std::vector<std::uint8_t> v(n);
        std::memcpy(v.data(), blob.data() + at, n);
        return v;
    };
    const auto floats = [&](std::size_t at) {
        std::vector<float> v(blocks);
        std::memcpy(v.data(), blob.data() + at, 4 * blocks);
        return v;
    };
    s.qm = bytes(s.qm_at);
    s.qv = bytes(s.qv_at);
    s.am = floats(s.am_at);
    s.av = floats(s.av_at);
    return s;
}

} // namespace test
