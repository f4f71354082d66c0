#pragma once
/// \file
/// A parameter's Adam moments in the 8-bit blockwise format (state_format::int8_blockwise): the
/// bytes of m (signed dynamic code) and v (unsigned), one float absmax per block and moment, in
/// host memory (the CPU backend's). The step updates them in place through the backend's
/// adam8_update (velora/backend/cpu/adam8.hpp: decode, update, encode, one block at a time);
/// this class sizes them, reports their bytes, and converts whole tensors to and from float for
/// what works on dequantised moments (the transport at a refresh, the exact fall-back path).
/// dequantize and quantize give the bits the kernel's decode and encode give.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <velora/backend/cpu/adam8.hpp>
#include <velora/core/buffer.hpp>

#include "state_format.hpp"

namespace adarank {

/// A backend that updates 8-bit blockwise moments in its own memory (velora::cpu and the CUDA
/// backend in float: adam8_update on rules/adam8_block.hpp's layout).
template <class B>
concept blockwise_update_backend = std::same_as<typename B::value_type, float> &&
    requires(B& b, const float* g, float* out, velora::cpu::adam8_tensor_state s, const velora::rules::adamw_terms<float>& terms) {
        { b.adam8_update(velora::cpu::adam_row_kind::moments, g, out, s, terms) } -> std::convertible_to<bool>;
    };

/// A backend the optimizer keeps 8-bit moments for: one that updates them in host memory, where
/// blockwise_moments holds them (the CPU backend in float). The CUDA backend updates them in
/// device memory (blockwise_update_backend) but this class does not keep them there yet.
template <class B>
concept blockwise_state_backend = blockwise_update_backend<B> && std::same_as<typename B::template buffer<float>, velora::host_buffer<float>>;

class blockwise_moments {
public:
    /// Sized for `count` elements in blocks of `block`, every moment 0; allocates everything
    /// before replacing anything.
    void assign_zero(index_t count, index_t block) {
        const auto blocks = static_cast<std::size_t>((count + block - 1) / block);
        std::vector<std::uint8_t> qm(static_cast<std::size_t>(count), 0), qv(static_cast<std::size_t>(count), 0);
        std::vector<float> am(blocks, 0.0f), av(blocks, 0.0f);
        qm_ = std::move(qm);
        qv_ = std::move(qv);
        am_ = std::move(am);
        av_ = std::move(av);
        count_ = count;
        block_ = block;
    }

    [[nodiscard]] index_t count() const noexcept { return count_; }
    [[nodiscard]] index_t block() const noexcept { return block_; }
    [[nodiscard]] index_t blocks() const noexcept { return static_cast<index_t>(am_.size()); }
    /// Bytes held: one per element and moment, plus a float per block and moment.
    [[nodiscard]] std::size_t bytes() const noexcept { return 2 * qm_.size() + 2 * sizeof(float) * am_.size(); }

    [[nodiscard]] velora::cpu::adam8_tensor_state view() noexcept { return {qm_.data(), qv_.data(), am_.data(), av_.data(), count_, block_}; }

    /// The largest |m| and v the bytes can stand for (the overflow certificate's bounds).
    [[nodiscard]] double m_bound() const noexcept { return am_.empty() ? 0.0 : *std::max_element(am_.begin(), am_.end()); }
    [[nodiscard]] double v_bound() const noexcept { return av_.empty() ? 0.0 : *std::max_element(av_.begin(), av_.end()); }

    /// m and v as floats (count each).
    void dequantize(float* m, float* v) const noexcept {
        const auto& cm = velora::rules::signed_dynamic_code();
        const auto& cv = velora::rules::unsigned_dynamic_code();
        for (index_t i = 0; i < count_; ++i) {
            const auto b = static_cast<std::size_t>(i / block_);
            m[i] = cm.decode(qm_[static_cast<std::size_t>(i)], am_[b]);
            v[i] = cv.decode(qv_[static_cast<std::size_t>(i)], av_[b]);
        }
    }

    /// Replaces the moments by m and v (count each, finite, v >= 0), block by block.
    void quantize(const float* m, const float* v) noexcept {
        for (index_t b = 0; b < blocks(); ++b) {
            const index_t first = b * block_, n = std::min(block_, count_ - first);
            const auto ub = static_cast<std::size_t>(b);
            velora::cpu::adam8_encode_block(velora::rules::signed_dynamic_code(), m + first, qm_.data() + first, n, am_[ub]);
            velora::cpu::adam8_encode_block(velora::rules::unsigned_dynamic_code(), v + first, qv_.data() + first, n, av_[ub]);
        }
    }

    // The arrays as saved (optimizer_state_io.hpp).
    [[nodiscard]] const std::vector<std::uint8_t>& m_bytes() const noexcept { return qm_; }
    [[nodiscard]] const std::vector<std::uint8_t>& v_bytes() const noexcept { return qv_; }
    [[nodiscard]] const std::vector<float>& m_absmax() const noexcept { return am_; }
    [[nodiscard]] const std::vector<float>& v_absmax() const noexcept { return av_; }
    /// Takes arrays checked by the loader (sizes count and blocks).
    void adopt(index_t count, index_t block, std::vector<std::uint8_t> qm, std::vector<std::uint8_t> qv, std::vector<float> am, std::vector<float> av) noexcept {
        qm_ = std::move(qm);
        qv_ = std::move(qv);
        am_ = std::move(am);
        av_ = std::move(av);
        count_ = count;
        block_ = block;
    }

private:
    index_t count_ = 0, block_ = default_state_block;
    std::vector<std::uint8_t> qm_, qv_;
    std::vector<float> am_, av_;
};

} // namespace adarank
