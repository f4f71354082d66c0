#pragma once
/// \file
/// A parameter's Adam moments in the 8-bit blockwise format (state_format::int8_blockwise): the
/// bytes of m (signed dynamic code) and v (unsigned), one float absmax per block and moment, in
/// the backend's memory (host memory for the CPU backend, device memory for the CUDA one). The
/// step updates them in place through the backend's adam8_update (decode, update, encode, one
/// block at a time: velora/backend/cpu/adam8.hpp, cuda/adam8.cuh, both on
/// velora/backend/rules/adam8_block.hpp); this class sizes them, reports their bytes, and
/// converts whole tensors to and from float through the backend's adam8_decode and adam8_encode
/// for what works on dequantised moments (the transport at a refresh, the exact fall-back path),
/// the bits the fused update decodes and encodes. Saving and loading go through host copies of
/// the four arrays (the saved format does not depend on the backend).
#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <velora/backend/rules/adam8_block.hpp>
#include <velora/backend/rules/adam_element.hpp>
#include <velora/backend/rules/dynamic_code.hpp>
#include <velora/core/view.hpp>

#include "state_format.hpp"

namespace adarank {

/// A backend the optimizer keeps 8-bit moments for, in its own memory (the CPU backend and the
/// CUDA backend, in float): adam8_update on rules/adam8_block.hpp's layout, whole-tensor
/// adam8_decode and adam8_encode giving the bits adam8_update decodes and encodes, and raw byte
/// copies to and from the host (save and load).
template <class B>
concept blockwise_state_backend =
    std::same_as<typename B::value_type, float> &&
    requires(B& b, const float* x, float* out, const std::uint8_t* q, std::uint8_t* q_out, const float* absmax, float* absmax_out, velora::index_t n,
             const velora::rules::adam8_tensor_state& s, const velora::rules::adamw_terms<float>& terms, const void* src, void* dst, std::size_t bytes) {
        { b.adam8_update(velora::rules::adam_row_kind::moments, x, out, s, terms) } -> std::convertible_to<bool>;
        b.adam8_decode(velora::rules::code_sign::signed_code, q, absmax, n, n, out);
        b.adam8_encode(velora::rules::code_sign::signed_code, x, n, n, q_out, absmax_out);
        b.copy(q, q_out, n);
        b.copy(absmax, absmax_out, n);
        b.copy_bytes_to_host(src, dst, bytes);
        b.copy_bytes_from_host(src, dst, bytes);
    };

/// The four arrays of 8-bit moments in host memory: what is saved, and what the loader checks
/// before blockwise_moments::upload takes it.
struct blockwise_host_arrays {
    std::vector<std::uint8_t> qm, qv;   ///< one byte per element
    std::vector<float> am, av;          ///< one absmax per block
};

/// The moments of one parameter. Sizing, saving and loading need only the byte copies every
/// backend has (a parameter of a backend that is not a blockwise_state_backend holds them empty:
/// the optimizer refuses the configuration); view, dequantize and quantize need the adam8 members.
template <class B>
class blockwise_moments {
    template <class U>
    using buffer = typename B::template buffer<U>;

public:
    /// Sized for `count` elements in blocks of `block`, contents unspecified (a refresh writes
    /// them with quantize before any step reads them); allocates everything before replacing
    /// anything.
    void resize(index_t count, index_t block) {
        buffer<std::uint8_t> qm, qv;
        buffer<float> am, av;
        const auto blocks = static_cast<std::size_t>((count + block - 1) / block);
        qm.resize(static_cast<std::size_t>(count));
        qv.resize(static_cast<std::size_t>(count));
        am.resize(blocks);
        av.resize(blocks);
        qm_ = std::move(qm);
        qv_ = std::move(qv);
        am_ = std::move(am);
        av_ = std::move(av);
        count_ = count;
        block_ = block;
    }

    /// Sized as resize, every moment 0 (every byte and absmax 0, as saved). Host zeros are
    /// copied in (allocates; registration only).
    void assign_zero(B& b, index_t count, index_t block) {
        const auto n = static_cast<std::size_t>(count), blocks = static_cast<std::size_t>((count + block - 1) / block);
        *this = upload(b, count, block, blockwise_host_arrays{std::vector<std::uint8_t>(n, 0), std::vector<std::uint8_t>(n, 0), std::vector<float>(blocks, 0.0f),
                                                              std::vector<float>(blocks, 0.0f)});
    }

    [[nodiscard]] index_t count() const noexcept { return count_; }
    [[nodiscard]] index_t block() const noexcept { return block_; }
    [[nodiscard]] index_t blocks() const noexcept { return static_cast<index_t>(am_.size()); }
    /// Bytes held: one per element and moment, plus a float per block and moment.
    [[nodiscard]] std::size_t bytes() const noexcept { return 2 * qm_.size() + 2 * sizeof(float) * am_.size(); }

    /// The arrays as adam8_update takes them (backend memory).
    [[nodiscard]] velora::rules::adam8_tensor_state view() noexcept { return {qm_.data(), qv_.data(), am_.data(), av_.data(), count_, block_}; }

    /// The largest |m| and v the bytes can stand for (the overflow certificate's bounds): the
    /// largest absmax, read on the host (the exact fall-back path only, at most once per step;
    /// allocates).
    [[nodiscard]] double m_bound(B& b) const { return largest(b, am_); }
    [[nodiscard]] double v_bound(B& b) const { return largest(b, av_); }

    /// m and v as floats (count each, backend memory).
    void dequantize(B& b, float* m, float* v) const {
        b.adam8_decode(velora::rules::code_sign::signed_code, qm_.data(), am_.data(), count_, block_, m);
        b.adam8_decode(velora::rules::code_sign::unsigned_code, qv_.data(), av_.data(), count_, block_, v);
    }

    /// Replaces the moments by m and v (count each, backend memory, finite, v >= 0), block by block.
    void quantize(B& b, const float* m, const float* v) {
        b.adam8_encode(velora::rules::code_sign::signed_code, m, count_, block_, qm_.data(), am_.data());
        b.adam8_encode(velora::rules::code_sign::unsigned_code, v, count_, block_, qv_.data(), av_.data());
    }

    /// A copy in newly allocated backend memory (the exact fall-back path steps on it).
    [[nodiscard]] blockwise_moments copy(B& b) const {
        blockwise_moments c;
        c.resize(count_, block_);
        b.copy(qm_.data(), c.qm_.data(), static_cast<index_t>(qm_.size()));
        b.copy(qv_.data(), c.qv_.data(), static_cast<index_t>(qv_.size()));
        b.copy(am_.data(), c.am_.data(), static_cast<index_t>(am_.size()));
        b.copy(av_.data(), c.av_.data(), static_cast<index_t>(av_.size()));
        return c;
    }

    /// The arrays on the host, as saved (optimizer_state_io.hpp).
    [[nodiscard]] blockwise_host_arrays to_host(B& b) const {
        blockwise_host_arrays h;
        h.qm.resize(qm_.size());
        h.qv.resize(qv_.size());
        h.am.resize(am_.size());
        h.av.resize(av_.size());
        b.copy_bytes_to_host(qm_.data(), h.qm.data(), h.qm.size());
        b.copy_bytes_to_host(qv_.data(), h.qv.data(), h.qv.size());
        b.copy_bytes_to_host(am_.data(), h.am.data(), h.am.size() * sizeof(float));
        b.copy_bytes_to_host(av_.data(), h.av.data(), h.av.size() * sizeof(float));
        return h;
    }

    /// Host arrays checked by the loader (count bytes each, blocks of `block`) copied into newly
    /// allocated backend memory; the caller commits the result by a move (which cannot fail).
    [[nodiscard]] static blockwise_moments upload(B& b, index_t count, index_t block, const blockwise_host_arrays& h) {
        blockwise_moments u;
        u.resize(count, block);
        b.copy_bytes_from_host(h.qm.data(), u.qm_.data(), u.qm_.size());
        b.copy_bytes_from_host(h.qv.data(), u.qv_.data(), u.qv_.size());
        b.copy_bytes_from_host(h.am.data(), u.am_.data(), u.am_.size() * sizeof(float));
        b.copy_bytes_from_host(h.av.data(), u.av_.data(), u.av_.size() * sizeof(float));
        return u;
    }

private:
    static double largest(B& b, const buffer<float>& absmax) {
        std::vector<float> host(absmax.size());
        b.copy_bytes_to_host(absmax.data(), host.data(), host.size() * sizeof(float));
        return host.empty() ? 0.0 : *std::max_element(host.begin(), host.end());
    }

    index_t count_ = 0, block_ = default_state_block;
    buffer<std::uint8_t> qm_, qv_;
    buffer<float> am_, av_;
};

} // namespace adarank
