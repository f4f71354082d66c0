#pragma once
/// \file
/// How a VeLoRA module (VeloraLinear, VeloraLoRALinear) keeps its compressor and its two module
/// buffers in step: `velora_state` (uint8, the compressor's state blob) and `v` (s floats, a
/// mirror of v). torch::save / torch::load and clones see only the buffers, so the module
/// publishes the compressor into them whenever v changed, and before a recorded forward restores
/// from them a blob that differs from the one it last published or restored. Each module keeps its
/// own policy on top (VeloraLinear accepts a v written by the caller and a blob converted by
/// Module::to; VeloraLoRALinear refuses both); this holds what they share.
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "view.hpp"

namespace velora::torch::detail {

/// The compressor state last published to, or restored from, the `velora_state` buffer. Used
/// under the module's lock.
class published_compressor_state {
public:
    /// The first blob, for register_buffer("velora_state", ...), at construction.
    template <class Compressor>
    [[nodiscard]] at::Tensor initial_buffer(const Compressor& comp) {
        remember(comp, comp.save_state());
        return blob_tensor(blob_);
    }

    /// Whether the compressor's v moved since it was last published or restored (a recorded
    /// forward updated it): the buffers then need publish().
    template <class Compressor>
    [[nodiscard]] bool stale(const Compressor& comp) const noexcept {
        return comp.v_updates() != published_updates_;
    }

    /// `bytes` is the buffer's content as a contiguous 1-D uint8 CPU tensor. When it differs from
    /// the blob last seen it was loaded (torch::load, a clone) and is restored into `comp`, whose
    /// load_state refuses (std::invalid_argument, nothing changed) a blob that is not this layer's;
    /// returns whether it did.
    template <class Compressor>
    bool restore_if_loaded(Compressor& comp, const at::Tensor& bytes) {
        const auto* p = static_cast<const std::byte*>(bytes.data_ptr());
        const auto n = static_cast<std::size_t>(bytes.numel());
        if (n == blob_.size() && std::memcmp(p, blob_.data(), n) == 0) return false;
        std::vector<std::byte> loaded(p, p + n);
        comp.load_state(loaded);
        remember(comp, std::move(loaded));
        return true;
    }

    /// Writes the compressor's state into `velora_state` (replacing its storage when its size
    /// or dtype no longer fits) and v into `v`.
    template <class Compressor>
    void publish(const Compressor& comp, at::Tensor& velora_state, at::Tensor& v) {
        remember(comp, comp.save_state());
        at::NoGradGuard no_grad;
        if (velora_state.scalar_type() != at::kByte || velora_state.numel() != static_cast<std::int64_t>(blob_.size()))
            velora_state.set_(blob_tensor(blob_));
        else std::memcpy(velora_state.data_ptr(), blob_.data(), blob_.size());
        bump_version(velora_state);
        write_v(comp, v);
    }

    /// The `v` buffer rewritten from the compressor's v (zeros until it exists).
    template <class Compressor>
    static void write_v(const Compressor& comp, at::Tensor& v) {
        at::NoGradGuard no_grad;
        const std::span<const float> current = comp.v();
        if (v.scalar_type() != at::kFloat || v.numel() != comp.subtoken_size()) v.set_(at::zeros({comp.subtoken_size()}));
        if (current.empty()) v.zero_();
        else v.copy_(at::from_blob(const_cast<float*>(current.data()), {static_cast<std::int64_t>(current.size())}, at::kFloat));
    }

private:
    template <class Compressor>
    void remember(const Compressor& comp, std::vector<std::byte> blob) {
        blob_ = std::move(blob);
        published_updates_ = comp.v_updates();
    }

    static at::Tensor blob_tensor(const std::vector<std::byte>& blob) {
        at::Tensor t = at::empty({static_cast<std::int64_t>(blob.size())}, at::kByte);
        std::memcpy(t.data_ptr(), blob.data(), blob.size());
        return t;
    }

    std::vector<std::byte> blob_;
    std::uint64_t published_updates_ = 0;
};

} // namespace velora::torch::detail
