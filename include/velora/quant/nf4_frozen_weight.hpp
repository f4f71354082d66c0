#pragma once
/// \file
/// `nf4_frozen_weight<B>`: an NF4 base weight (nf4.hpp) in backend B's memory, satisfying
/// velora::frozen_weight (finetune/frozen_weight.hpp). forward (y = x·Wᵀ) and input_grad
/// (dX = dY·W) dequantise W a tile of rows at a time into the caller's workspace with the
/// backend's dequantize_nf4 (kernels.hpp) and call the backend's GEMM on each tile
/// (tiled_products.hpp): never a dense copy of W. The dequantised values are exactly the
/// nf4_weight's (float products, the same on every backend), so the GEMM engine's determinism
/// carries over.
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "../concepts.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "kernels.hpp"
#include "nf4.hpp"
#include "tiled_products.hpp"

namespace velora {

template <backend B>
    requires nf4_kernels<B>
class nf4_frozen_weight {
public:
    using backend_type = B;
    using value_type = typename B::value_type;

    /// Copies the packed weight into B's memory. `tile_rows` = 0 chooses clamp(2^22 / D, 1, O)
    /// rows per tile (tiled_products.hpp); otherwise 1..O. Throws std::invalid_argument for an
    /// empty weight or a tile_rows out of range.
    nf4_frozen_weight(B& b, const nf4_weight& w, index_t tile_rows = 0) {
        constexpr const char* fn = "velora::nf4_frozen_weight::nf4_frozen_weight";
        detail::require(!w.empty(), fn, "argument 'w' is an empty nf4_weight (quantize or load one first)");
        tile_rows_ = detail::resolve_tile_rows(fn, tile_rows, w.rows(), w.cols());
        stored_bytes_ = w.stored_bytes();
        blocks_ = w.blocks_view();
        blocks_.codes = upload(b, codes_, w.codes());
        if (w.double_quantized()) {
            blocks_.absmax_codes = upload(b, absmax_codes_, w.absmax_codes());
            blocks_.absmax_scales = upload(b, absmax_scales_, w.absmax_scales());
        } else {
            blocks_.absmax = upload(b, absmax_, w.absmax());
        }
    }

    [[nodiscard]] index_t rows() const noexcept { return blocks_.rows; }
    [[nodiscard]] index_t cols() const noexcept { return blocks_.cols; }
    [[nodiscard]] index_t tile_rows() const noexcept { return tile_rows_; }
    /// tile_rows · D values of B's memory.
    [[nodiscard]] std::size_t workspace_elements() const noexcept {
        return static_cast<std::size_t>(tile_rows_) * static_cast<std::size_t>(blocks_.cols);
    }
    /// The packed weight's bytes (nf4_weight::stored_bytes).
    [[nodiscard]] std::size_t stored_bytes() const noexcept { return stored_bytes_; }
    /// The weight as the kernels see it (pointers into B's memory).
    [[nodiscard]] const nf4_blocks& blocks() const noexcept { return blocks_; }

    /// y = x·Wᵀ (x: T×D, y: T×O, overwritten). Throws std::invalid_argument for wrong shapes,
    /// a workspace below workspace_elements(), or y overlapping x, the workspace or W; x may
    /// not overlap the workspace.
    void forward(B& b, const_matrix_view<value_type> x, matrix_view<value_type> y, std::span<value_type> workspace) const {
        detail::check_tiled_call<value_type>("velora::nf4_frozen_weight::forward", "x", x, cols(), "y", y, rows(), workspace,
                                             workspace_elements(), {stored(codes_), stored(absmax_), stored(absmax_codes_), stored(absmax_scales_)});
        detail::tiled_forward(b, rows(), cols(), tile_rows_, x, y, workspace.data(),
                              [&](index_t r0, matrix_view<value_type> tile) { b.dequantize_nf4(blocks_, r0, tile); });
    }

    /// dX = dY·W (dy: T×O, dx: T×D, overwritten). Throws like forward.
    void input_grad(B& b, const_matrix_view<value_type> dy, matrix_view<value_type> dx, std::span<value_type> workspace) const {
        detail::check_tiled_call<value_type>("velora::nf4_frozen_weight::input_grad", "dy", dy, rows(), "dx", dx, cols(), workspace,
                                             workspace_elements(), {stored(codes_), stored(absmax_), stored(absmax_codes_), stored(absmax_scales_)});
        detail::tiled_input_grad(b, rows(), cols(), tile_rows_, dy, dx, workspace.data(),
                                 [&](index_t r0, matrix_view<value_type> tile) { b.dequantize_nf4(blocks_, r0, tile); });
    }

private:
    template <class U>
    static const U* upload(B& b, typename B::template buffer<U>& buf, std::span<const U> host) {
        buf.resize(host.size());
        b.copy_bytes_from_host(host.data(), buf.data(), host.size_bytes());
        return buf.data();
    }

    // One stored array as bytes, for the aliasing checks.
    template <class Buffer>
    static const_matrix_view<std::byte> stored(const Buffer& buf) noexcept {
        using U = std::remove_cvref_t<decltype(*buf.data())>;
        return {reinterpret_cast<const std::byte*>(buf.data()), 1, static_cast<index_t>(buf.size() * sizeof(U))};
    }

    index_t tile_rows_ = 1;
    std::size_t stored_bytes_ = 0;
    nf4_blocks blocks_;
    typename B::template buffer<std::uint8_t> codes_;
    typename B::template buffer<float> absmax_;
    typename B::template buffer<std::int8_t> absmax_codes_;
    typename B::template buffer<float> absmax_scales_;
};

} // namespace velora
