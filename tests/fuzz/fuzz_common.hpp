#pragma once
// Shared by the libFuzzer harnesses (fuzz_*.cpp) and the seed-corpus generator (make_corpus.cpp):
// assertion reporting, the envelope repair of the "_repair" modes and deterministic data (what
// the three state harnesses share beyond that is state_harness.hpp's). The
// configurations the harnesses load states into are in optimizer_targets.hpp and
// compressor_targets.hpp; the corpus generator saves states of exactly those, so every seed is a
// state that one of a harness's targets accepts.
#include <velora/backend/eigen.hpp>
#include <velora/core/rng.hpp>
#include <velora/core/serialize.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace fuzz {

using B = velora::eigen_backend<float>;
using velora::index_t;

// ------------------------------------------------------------------------------ reporting
// A failed invariant prints the harness, the invariant and the details, then aborts: libFuzzer
// reports a deadly signal and writes the input to build/fuzz/artifacts/<harness>/crash-<sha1>.
[[noreturn]] inline void fail(const char* harness, const std::string& what) {
    std::fprintf(stderr, "\n==== FUZZ ASSERTION FAILED [%s]: %s\n", harness, what.c_str());
    std::fflush(stderr);
    std::abort();
}
#define FUZZ_CHECK(cond, harness, what)                                                        \
    do {                                                                                       \
        if (!(cond)) ::fuzz::fail(harness, std::string(what) + "  (check: " #cond ")");        \
    } while (0)

// ------------------------------------------------------------------------------ modes
// One compiled program per harness; it runs in repair mode when invoked through its
// "<name>_repair" link (argv[0]) or with VELORA_FUZZ_REPAIR=1 in the environment.
inline bool repair_mode = false;
// VELORA_FUZZ_VERBOSE=1: the harnesses describe what each accepted load and the step after it
// did (to read a finding: `VELORA_FUZZ_VERBOSE=1 build/fuzz/<harness> <crash file>`).
inline bool verbose = false;
inline void select_mode(int* argc, char*** argv) {
    if (const char* env = std::getenv("VELORA_FUZZ_REPAIR"); env && std::string_view(env) == "1") repair_mode = true;
    if (const char* env = std::getenv("VELORA_FUZZ_VERBOSE"); env && std::string_view(env) == "1") verbose = true;
    if (argc && *argc > 0 && argv && *argv && (*argv)[0]) {
        const std::string_view name((*argv)[0]);
        if (name.size() >= 7 && name.substr(name.size() - 7) == "_repair") repair_mode = true;
    }
    std::fprintf(stderr, "velora fuzz harness: %s mode\n", repair_mode ? "repair (envelope rewritten before loading)" : "raw");
}

// Bytes of the envelope before the payload for a given kind.
inline std::size_t header_bytes(std::string_view kind) { return 4 + 4 + 4 + kind.size() + 4 + 8; }

// Rewrites the envelope of `input` so that it is valid for (kind, version): magic, container
// version, kind, kind version and payload length are written afresh and the checksum is
// recomputed. The payload is what lies between the header (as long as it is for `kind`) and
// the last 8 bytes (the old checksum); inputs too short for that keep what is past the header.
// A valid blob of that kind comes back unchanged, so mutations of a seed's payload reach the
// loader's field validation instead of failing at the checksum.
inline std::vector<std::byte> repair_envelope(std::span<const std::byte> input, std::string_view kind, std::uint32_t version) {
    const std::size_t h = header_bytes(kind);
    std::span<const std::byte> payload;
    if (input.size() >= h + 8) payload = input.subspan(h, input.size() - h - 8);
    else if (input.size() > h) payload = input.subspan(h);
    std::vector<std::byte> out;
    out.reserve(h + payload.size() + 8);
    auto put = [&](const void* p, std::size_t n) {
        const auto* b = static_cast<const std::byte*>(p);
        out.insert(out.end(), b, b + n);
    };
    put("VLRS", 4);
    const std::uint32_t container = velora::state_container_version;
    put(&container, 4);
    const auto kind_length = static_cast<std::uint32_t>(kind.size());
    put(&kind_length, 4);
    put(kind.data(), kind.size());
    put(&version, 4);
    const std::uint64_t length = payload.size();
    put(&length, 8);
    put(payload.data(), payload.size());
    const std::uint64_t sum = velora::fnv1a64(out);
    put(&sum, 8);
    return out;
}

// ------------------------------------------------------------------------------ data
// Deterministic N(0, scale²) values: element i of stream `seed`.
inline std::vector<float> gaussian(std::size_t n, std::uint64_t seed, double scale = 1.0) {
    std::vector<float> x(n);
    for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<float>(scale * velora::gaussian_at(seed, i));
    return x;
}

inline bool all_finite(std::span<const float> x) {
    for (float e : x)
        if (!std::isfinite(e)) return false;
    return true;
}

inline double max_abs(std::span<const float> x) {
    double m = 0;
    for (float e : x) m = std::isnan(e) || std::abs(static_cast<double>(e)) > m ? std::abs(static_cast<double>(e)) : m;
    return m;
}

inline bool same_bytes(std::span<const float> a, std::span<const float> b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size_bytes()) == 0);
}

inline std::string hex_prefix(std::span<const std::byte> b, std::size_t n = 64) {
    static const char* digits = "0123456789abcdef";
    std::string s;
    for (std::size_t i = 0; i < b.size() && i < n; ++i) {
        const auto v = static_cast<unsigned>(b[i]);
        s += digits[v >> 4];
        s += digits[v & 15];
    }
    if (b.size() > n) s += "...";
    return s;
}

} // namespace fuzz
