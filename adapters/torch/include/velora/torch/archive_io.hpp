#pragma once
/// \file
/// The few things AdaRankGradAdamW's torch archive holds besides torch's own values: byte blobs
/// (the library's state blobs, the options' configuration block) as 1-D uint8 tensors, and the
/// one way a malformed archive is reported (velora::state_format_error naming the function).
#include <ATen/ATen.h>
#include <torch/serialize/archive.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>

#include <velora/core/error.hpp>

namespace velora::torch::detail {

template <class... Parts>
[[noreturn]] void fail_format(std::string_view fn, const Parts&... parts) {
    velora::detail::fail_as<velora::state_format_error>(fn, parts...);
}

inline void write_blob(::torch::serialize::OutputArchive& archive, const std::string& key, std::span<const std::byte> blob) {
    at::Tensor t = at::empty({static_cast<std::int64_t>(blob.size())}, at::kByte);
    if (!blob.empty()) std::memcpy(t.data_ptr(), blob.data(), blob.size());
    archive.write(key, t, /*is_buffer=*/true);
}

/// The blob under `key`, contiguous (std::nullopt when the archive has no such key). Throws
/// velora::state_format_error when the key holds something else than a 1-D uint8 tensor.
inline std::optional<at::Tensor> read_blob(::torch::serialize::InputArchive& archive, const std::string& key, std::string_view fn) {
    at::Tensor blob;
    if (!archive.try_read(key, blob, /*is_buffer=*/true)) return std::nullopt;
    if (blob.scalar_type() != at::kByte || blob.dim() != 1) fail_format(fn, "'", key, "' in the archive is not a byte tensor");
    return blob.contiguous();
}

inline std::span<const std::byte> bytes_of(const at::Tensor& blob) {
    return {static_cast<const std::byte*>(blob.data_ptr()), static_cast<std::size_t>(blob.numel())};
}

inline std::int64_t read_int(::torch::serialize::InputArchive& archive, const std::string& key, std::string_view fn) {
    c10::IValue v;
    if (!archive.try_read(key, v) || !v.isInt()) fail_format(fn, "the archive has no integer '", key, "' (not an AdaRankGradAdamW state?)");
    return v.toInt();
}

} // namespace velora::torch::detail
