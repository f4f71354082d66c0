#pragma once
/// \file
/// A small versioned binary container for library state (checkpoints).
///
/// Layout (little-endian):
///   "VLRS" | u32 container version | u32 kind length | kind bytes | u32 kind version |
///   u64 payload length | payload | u64 FNV-1a checksum of everything before it
///
/// `state_reader` checks magic, container version, kind, kind version, length and checksum
/// before handing out a single value, and every read is bounds-checked. Loaders parse into
/// temporaries and commit only when the whole blob was consumed, so a truncated, corrupted
/// or foreign blob throws `state_format_error` and leaves the live object untouched.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "error.hpp"
#include "hash.hpp"

namespace velora {

static_assert(std::endian::native == std::endian::little, "velora's state format assumes a little-endian host");

inline constexpr std::uint32_t state_container_version = 1;

class state_writer {
public:
    state_writer(std::string_view kind, std::uint32_t kind_version) {
        // The envelope in one allocation: growing the vector from the 4-byte magic, inlined into
        // some callers, made GCC 12 warn -Wstringop-overflow (a false positive).
        bytes_.reserve(64 + kind.size());
        bytes_.insert(bytes_.end(), {std::byte{'V'}, std::byte{'L'}, std::byte{'R'}, std::byte{'S'}});
        put(state_container_version);
        put(static_cast<std::uint32_t>(kind.size()));
        const auto* k = reinterpret_cast<const std::byte*>(kind.data());
        bytes_.insert(bytes_.end(), k, k + kind.size());
        put(kind_version);
        length_at_ = bytes_.size();
        put(std::uint64_t{0});   // payload length, patched by finish()
    }

    template <class T>
        requires std::is_trivially_copyable_v<T>
    void put(const T& value) {
        const auto* p = reinterpret_cast<const std::byte*>(&value);
        bytes_.insert(bytes_.end(), p, p + sizeof(T));
    }

    /// Writes the element count followed by the elements.
    template <class T>
        requires std::is_trivially_copyable_v<T>
    void put_array(std::span<const T> values) {
        put(static_cast<std::uint64_t>(values.size()));
        const auto* p = reinterpret_cast<const std::byte*>(values.data());
        bytes_.insert(bytes_.end(), p, p + values.size_bytes());
    }

    /// Embeds another finished blob (e.g. one layer's state inside an optimizer's).
    void put_blob(std::span<const std::byte> blob) { put_array<std::byte>(blob); }

    [[nodiscard]] std::vector<std::byte> finish() && {
        const std::uint64_t payload = bytes_.size() - length_at_ - sizeof(std::uint64_t);
        std::memcpy(bytes_.data() + length_at_, &payload, sizeof payload);
        put(fnv1a64(bytes_));
        return std::move(bytes_);
    }

private:
    std::vector<std::byte> bytes_;
    std::size_t length_at_ = 0;
};

class state_reader {
public:
    /// Validates the envelope; throws state_format_error naming `function` on any mismatch.
    state_reader(std::span<const std::byte> blob, std::string_view kind, std::uint32_t max_kind_version, std::string_view function)
        : blob_(blob), function_(function) {
        constexpr std::size_t trailer = sizeof(std::uint64_t);
        if (blob.size() < 4 + 4 + 4 + trailer) bad("blob of ", blob.size(), " bytes is too short to be a state blob");
        if (std::memcmp(blob.data(), "VLRS", 4) != 0) bad("blob does not start with the magic 'VLRS'");
        pos_ = 4;
        const auto container = get<std::uint32_t>();
        if (container != state_container_version)
            bad("container version ", container, " is not supported (expected ", state_container_version, ")");
        const auto kind_length = get<std::uint32_t>();
        need(kind_length);
        const std::string_view found(reinterpret_cast<const char*>(blob.data() + pos_), kind_length);
        if (found != kind) bad("blob holds state of kind '", found, "', expected '", kind, "'");
        pos_ += kind_length;
        version_ = get<std::uint32_t>();
        if (version_ == 0 || version_ > max_kind_version)
            bad("state version ", version_, " of '", kind, "' is not supported (this build reads 1..", max_kind_version, ")");
        const auto payload = get<std::uint64_t>();
        if (payload > blob.size() - pos_ || blob.size() - pos_ - payload != trailer)
            bad("blob is truncated or has trailing bytes: payload says ", payload, " bytes, ", blob.size() - pos_,
                " remain including the ", trailer, "-byte checksum");
        end_ = pos_ + payload;
        std::uint64_t stored = 0;
        std::memcpy(&stored, blob.data() + end_, sizeof stored);
        if (stored != fnv1a64(blob.first(end_))) bad("checksum mismatch: the blob is corrupted");
    }

    [[nodiscard]] std::uint32_t version() const noexcept { return version_; }

    template <class T>
        requires std::is_trivially_copyable_v<T>
    T get() {
        need(sizeof(T));
        T value;
        std::memcpy(&value, blob_.data() + pos_, sizeof(T));
        pos_ += sizeof(T);
        return value;
    }

    /// Reads an array written by put_array; its element count must equal `expected_count`
    /// unless that is negative (any count accepted).
    template <class T>
        requires std::is_trivially_copyable_v<T>
    std::vector<T> get_array(std::ptrdiff_t expected_count = -1) {
        const auto count = get<std::uint64_t>();
        if (expected_count >= 0 && count != static_cast<std::uint64_t>(expected_count))
            bad("array holds ", count, " elements, expected ", expected_count);
        if (count > (limit() - pos_) / sizeof(T)) bad("array of ", count, " elements runs past the end of the payload");
        std::vector<T> values(count);
        if (count > 0) std::memcpy(values.data(), blob_.data() + pos_, count * sizeof(T));
        pos_ += count * sizeof(T);
        return values;
    }

    std::span<const std::byte> get_blob() {
        const auto count = get<std::uint64_t>();
        if (count > limit() - pos_) bad("embedded blob of ", count, " bytes runs past the end of the payload");
        auto out = blob_.subspan(pos_, count);
        pos_ += count;
        return out;
    }

    /// Throws unless the whole payload was consumed.
    void expect_end() const {
        if (pos_ != limit()) bad("payload has ", limit() - pos_, " unread bytes");
    }

    template <class... Parts>
    [[noreturn]] void bad(const Parts&... parts) const {
        detail::fail_as<state_format_error>(function_, parts...);
    }

private:
    [[nodiscard]] std::size_t limit() const noexcept { return end_ ? end_ : blob_.size(); }
    void need(std::size_t n) const {
        if (n > limit() - pos_) bad("blob is truncated: needed ", n, " more bytes at offset ", pos_);
    }

    std::span<const std::byte> blob_;
    std::string_view function_;
    std::size_t pos_ = 0;
    std::size_t end_ = 0;
    std::uint32_t version_ = 0;
};

/// Writes a blob to a file; throws std::runtime_error naming the path on failure.
inline void write_state_file(const std::string& path, std::span<const std::byte> blob) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(blob.data()), static_cast<std::streamsize>(blob.size()));
    if (!out) throw std::runtime_error("velora::write_state_file: cannot write '" + path + "'");
}

/// Reads a whole file; throws std::runtime_error naming the path on failure.
inline std::vector<std::byte> read_state_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw std::runtime_error("velora::read_state_file: cannot open '" + path + "'");
    std::vector<std::byte> blob(static_cast<std::size_t>(in.tellg()));
    in.seekg(0);
    in.read(reinterpret_cast<char*>(blob.data()), static_cast<std::streamsize>(blob.size()));
    if (!in) throw std::runtime_error("velora::read_state_file: cannot read '" + path + "'");
    return blob;
}

} // namespace velora
