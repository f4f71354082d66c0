// libFuzzer harness: velora::state_reader, the envelope and typed reads under both loaders.
//
// Each input is offered as a blob of three kinds: the compressor's, the optimizer's (each read
// field by field the way its loader reads it, arrays of any length) and "fuzz.reader", whose
// payload is a little program of typed reads (every get<T> width, get_array of float, double and
// bytes with and without an expected count, get_blob with the embedded blob read again
// recursively, expect_end). Checked:
//  - nothing but velora::state_format_error is ever thrown (never a crash, a bad_alloc or a
//    length_error; ASan/UBSan see every read);
//  - the constructor accepts exactly the envelopes an independent parser written here accepts
//    (magic, container version, kind, kind version in 1..max, payload length, FNV-1a checksum);
//  - every read is shadowed by a cursor kept here: a read succeeds exactly when the bytes it
//    needs lie inside the payload (and an array's count equals the expected one), the value it
//    returns is the bytes at that position, an embedded blob is a span of the input at that
//    position, and expect_end succeeds exactly at the end of the payload.
// Repair mode (fuzz_state_reader_repair) rewrites the envelope for the kind the input names (or
// "fuzz.reader") first, so the typed reads see mutated payloads.
#include <adarank/optimizer.hpp>
#include <velora/compressor.hpp>

#include "fuzz_common.hpp"

#include <algorithm>
#include <exception>
#include <stdexcept>

namespace {

constexpr const char* harness_name = "fuzz_state_reader";
constexpr std::string_view program_kind = "fuzz.reader";
constexpr std::uint32_t program_max_version = 3;
constexpr int max_depth = 4;

using optimizer = adarank::low_rank_adamw<fuzz::B>;
using compressor = velora::compressor<fuzz::B>;

struct kind_info {
    std::string_view kind;
    std::uint32_t max_version;
};
const kind_info kinds[] = {
    {compressor::state_kind, compressor::state_version},
    {optimizer::state_kind, optimizer::state_version},
    {program_kind, program_max_version},
};

template <class T>
T load_at(std::span<const std::byte> b, std::size_t pos) {
    T v;
    std::memcpy(&v, b.data() + pos, sizeof(T));
    return v;
}

// The reference envelope parser: the version when the envelope is valid for (kind, max), else 0.
std::uint32_t reference_envelope(std::span<const std::byte> b, std::string_view kind, std::uint32_t max_version) {
    const std::size_t n = b.size();
    if (n < 20 || std::memcmp(b.data(), "VLRS", 4) != 0) return 0;
    if (load_at<std::uint32_t>(b, 4) != velora::state_container_version) return 0;
    const std::uint64_t klen = load_at<std::uint32_t>(b, 8);
    if (klen > n - 12) return 0;
    if (std::string_view(reinterpret_cast<const char*>(b.data() + 12), klen) != kind) return 0;
    std::size_t pos = 12 + klen;
    if (n - pos < 4) return 0;
    const auto version = load_at<std::uint32_t>(b, pos);
    pos += 4;
    if (version == 0 || version > max_version) return 0;
    if (n - pos < 8) return 0;
    const auto payload = load_at<std::uint64_t>(b, pos);
    pos += 8;
    if (n - pos < 8 || payload != n - pos - 8) return 0;
    if (load_at<std::uint64_t>(b, n - 8) != velora::fnv1a64(b.first(n - 8))) return 0;
    return version;
}

struct stop {};   // the read failed as the shadow predicted: the loader would stop here

void process(std::span<const std::byte> blob, int depth);

// state_reader with a shadow cursor; every call checks the reader against the shadow.
class shadow {
public:
    shadow(velora::state_reader& r, std::span<const std::byte> blob, std::size_t start)
        : r_(r), blob_(blob), pos_(start), limit_(blob.size() - 8) {}

    template <class T>
    T get() {
        const bool fits = sizeof(T) <= limit_ - pos_;
        T value{};
        bool threw = false;
        try {
            value = r_.get<T>();
        } catch (const velora::state_format_error&) {
            threw = true;
        }
        FUZZ_CHECK(threw == !fits, harness_name, "get<" + std::to_string(sizeof(T)) + "-byte> at payload offset " + std::to_string(pos_) +
                                                     " of " + std::to_string(limit_) + (threw ? " threw although it fits" : " did not throw although it does not fit"));
        if (threw) throw stop{};
        FUZZ_CHECK(std::memcmp(&value, blob_.data() + pos_, sizeof(T)) == 0, harness_name, "get<T> returned bytes other than those at the cursor");
        pos_ += sizeof(T);
        return value;
    }

    template <class T>
    std::vector<T> get_array(std::ptrdiff_t expected) {
        const bool has_count = 8 <= limit_ - pos_;
        const std::uint64_t count = has_count ? load_at<std::uint64_t>(blob_, pos_) : 0;
        const bool ok = has_count && (expected < 0 || count == static_cast<std::uint64_t>(expected)) && count <= (limit_ - pos_ - 8) / sizeof(T);
        std::vector<T> values;
        bool threw = false;
        try {
            values = r_.get_array<T>(expected);
        } catch (const velora::state_format_error&) {
            threw = true;
        }
        FUZZ_CHECK(threw == !ok, harness_name, "get_array (count " + std::to_string(count) + ", expected " + std::to_string(expected) + ") at payload offset " +
                                                   std::to_string(pos_) + (threw ? " threw although valid" : " did not throw although invalid"));
        if (threw) throw stop{};
        FUZZ_CHECK(values.size() == count, harness_name, "get_array returned " + std::to_string(values.size()) + " elements, the blob says " + std::to_string(count));
        FUZZ_CHECK(count == 0 || std::memcmp(values.data(), blob_.data() + pos_ + 8, count * sizeof(T)) == 0, harness_name,
                   "get_array returned bytes other than those at the cursor");
        pos_ += 8 + count * sizeof(T);
        return values;
    }

    std::span<const std::byte> get_blob() {
        const bool has_count = 8 <= limit_ - pos_;
        const std::uint64_t count = has_count ? load_at<std::uint64_t>(blob_, pos_) : 0;
        const bool ok = has_count && count <= limit_ - pos_ - 8;
        std::span<const std::byte> out;
        bool threw = false;
        try {
            out = r_.get_blob();
        } catch (const velora::state_format_error&) {
            threw = true;
        }
        FUZZ_CHECK(threw == !ok, harness_name, "get_blob (" + std::to_string(count) + " bytes) at payload offset " + std::to_string(pos_) +
                                                   (threw ? " threw although valid" : " did not throw although invalid"));
        if (threw) throw stop{};
        FUZZ_CHECK(out.data() == blob_.data() + pos_ + 8 && out.size() == count, harness_name, "get_blob returned a span other than the one at the cursor");
        pos_ += 8 + count;
        return out;
    }

    void expect_end() {
        bool threw = false;
        try {
            r_.expect_end();
        } catch (const velora::state_format_error&) {
            threw = true;
        }
        FUZZ_CHECK(threw == (pos_ != limit_), harness_name,
                   "expect_end at payload offset " + std::to_string(pos_) + " of " + std::to_string(limit_) + (threw ? " threw" : " did not throw"));
        if (threw) throw stop{};
    }

private:
    velora::state_reader& r_;
    std::span<const std::byte> blob_;
    std::size_t pos_, limit_;
};

// The compressor loader's reads, arrays of any length.
void read_compressor_like(shadow& s) {
    s.get<std::uint8_t>();
    s.get<std::int64_t>();
    s.get<std::int64_t>();
    s.get<std::uint8_t>();
    s.get<double>();
    s.get<std::uint64_t>();
    s.get<std::uint8_t>();
    s.get<double>();
    s.get<std::uint8_t>();
    s.get<std::uint8_t>();
    s.get<std::uint64_t>();
    s.get_array<float>(-1);
    s.expect_end();
}

// A realistic read pattern, the field order of an early (version 2) optimizer state: configuration,
// learning rate, then per parameter shape, progress and three arrays (the first of a length
// derived from fields, as a loader does). It exercises the reader's primitives; the optimizer's
// own loader, in every version, is fuzzed by fuzz_optimizer_state.
void read_optimizer_like(shadow& s) {
    s.get<std::uint8_t>();
    for (int i = 0; i < 6; ++i) s.get<double>();
    s.get<std::uint8_t>();
    s.get<std::uint8_t>();
    s.get<std::int64_t>();
    s.get<std::int64_t>();
    s.get<double>();
    s.get<std::uint8_t>();
    s.get<double>();
    s.get<std::int64_t>();
    s.get<std::int64_t>();
    s.get<std::uint8_t>();
    s.get<std::int64_t>();
    s.get<std::int32_t>();
    s.get<std::int32_t>();
    s.get<std::uint8_t>();
    s.get<double>();
    s.get<std::uint64_t>();
    s.get<double>();
    const auto count = s.get<std::uint64_t>();
    for (std::uint64_t i = 0; i < std::min<std::uint64_t>(count, 64); ++i) {
        const auto rows = s.get<std::int64_t>();
        s.get<std::int64_t>();
        s.get<std::uint8_t>();
        s.get<std::uint8_t>();
        const auto rank = s.get<std::int64_t>();
        for (int k = 0; k < 4; ++k) s.get<std::uint64_t>();
        s.get<double>();
        s.get<double>();
        s.get<std::int64_t>();
        s.get<std::int64_t>();
        s.get<std::int32_t>();
        s.get<std::uint8_t>();
        s.get<std::uint8_t>();
        s.get<double>();
        s.get<double>();
        const bool small = rows >= 0 && rows < (1 << 20) && rank >= 0 && rank < (1 << 20);
        s.get_array<float>(small ? static_cast<std::ptrdiff_t>(rows * rank) : -1);
        s.get_array<float>(-1);
        s.get_array<float>(-1);
    }
    s.expect_end();
}

// "fuzz.reader": a program of typed reads, its opcodes read from the payload itself.
void read_program(shadow& s, int depth) {
    for (int ops = 0; ops < 4096; ++ops) {
        switch (s.get<std::uint8_t>() % 14) {
        case 0: s.get<std::uint8_t>(); break;
        case 1: s.get<std::uint16_t>(); break;
        case 2: s.get<std::uint32_t>(); break;
        case 3: s.get<std::uint64_t>(); break;
        case 4: s.get<std::int32_t>(); break;
        case 5: s.get<double>(); break;
        case 6: s.get<float>(); break;
        case 7: s.get_array<float>(-1); break;
        case 8: s.get_array<double>(static_cast<std::ptrdiff_t>(s.get<std::uint8_t>())); break;
        case 9: s.get_array<std::byte>(-1); break;
        case 10: s.get_array<std::uint16_t>(static_cast<std::ptrdiff_t>(s.get<std::int64_t>())); break;
        case 11: {
            const auto nested = s.get_blob();
            if (depth < max_depth) process(nested, depth + 1);
            break;
        }
        case 12: s.get_array<std::int64_t>(-1); break;
        default: s.expect_end(); return;
        }
    }
}

void process(std::span<const std::byte> blob, int depth) {
    for (const auto& k : kinds) {
        const std::uint32_t expected_version = reference_envelope(blob, k.kind, k.max_version);
        std::unique_ptr<velora::state_reader> r;
        try {
            r = std::make_unique<velora::state_reader>(blob, k.kind, k.max_version, "fuzz_state_reader");
        } catch (const velora::state_format_error& e) {
            FUZZ_CHECK(expected_version == 0, harness_name,
                       "state_reader rejected an envelope of kind '" + std::string(k.kind) + "' that the reference parser accepts: " + e.what());
            continue;
        } catch (const std::exception& e) {
            fuzz::fail(harness_name, std::string("state_reader's constructor threw something other than state_format_error: ") + e.what());
        }
        FUZZ_CHECK(expected_version != 0, harness_name,
                   "state_reader accepted an envelope of kind '" + std::string(k.kind) + "' that the reference parser rejects: " + fuzz::hex_prefix(blob));
        FUZZ_CHECK(r->version() == expected_version, harness_name, "state_reader reports another kind version than the envelope holds");
        shadow s(*r, blob, fuzz::header_bytes(k.kind));
        try {
            if (k.kind == compressor::state_kind) read_compressor_like(s);
            else if (k.kind == optimizer::state_kind) read_optimizer_like(s);
            else read_program(s, depth);
        } catch (const stop&) {
        } catch (const std::exception& e) {
            fuzz::fail(harness_name, std::string("a typed read threw something other than state_format_error: ") + e.what());
        }
    }
}

// Repair: the kind the input's header names when it is one of ours, else "fuzz.reader"; its
// kind version folded into 1..max.
std::vector<std::byte> repair(std::span<const std::byte> raw) {
    kind_info chosen = kinds[2];
    std::uint32_t version = 1;
    if (raw.size() >= 12) {
        const std::uint64_t klen = load_at<std::uint32_t>(raw, 8);
        if (klen <= raw.size() - 12) {
            const std::string_view found(reinterpret_cast<const char*>(raw.data() + 12), klen);
            for (const auto& k : kinds)
                if (found == k.kind) chosen = k;
        }
    }
    const std::size_t at = 12 + chosen.kind.size();
    if (raw.size() >= at + 4) version = (load_at<std::uint32_t>(raw, at) + chosen.max_version - 1) % chosen.max_version + 1;
    return fuzz::repair_envelope(raw, chosen.kind, version);
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
    fuzz::select_mode(argc, argv);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::span<const std::byte> raw(reinterpret_cast<const std::byte*>(data), size);
    if (fuzz::repair_mode) {
        const auto repaired = repair(raw);
        process(repaired, 0);
    } else {
        process(raw, 0);
    }
    return 0;
}
