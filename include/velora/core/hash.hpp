#pragma once
/// \file
/// The library's one hash: 64-bit FNV-1a of some bytes, continuing from `h`. State blobs carry it
/// as their checksum (serialize.hpp); data-parallel checks compare it across ranks
/// (distributed/communicator.hpp: hash_bytes). Not cryptographic.
#include <cstddef>
#include <cstdint>
#include <span>

namespace velora {

constexpr std::uint64_t fnv1a64(std::span<const std::byte> bytes, std::uint64_t h = 0xcbf29ce484222325ull) noexcept {
    for (std::byte b : bytes) {
        h ^= static_cast<std::uint64_t>(b);
        h *= 0x100000001b3ull;
    }
    return h;
}

} // namespace velora
