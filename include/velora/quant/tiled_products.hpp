#pragma once
/// \file
/// The two products of a frozen weight stored narrower than the backend's value type, written
/// once for every storage (NF4, bf16/f16): W is turned into value-type tiles of `tile_rows`
/// whole rows inside the caller's workspace, one tile at a time, and the backend's GEMM runs on
/// each tile. No call allocates or holds more of W in the value type than one tile.
///
/// - forward, y = x·Wᵀ: tile k (rows r0..r0+h of W) gives y's columns r0..r0+h,
///   y[:, r0:r0+h] = x · tileᵀ with beta = 0: each output element is one GEMM's dot product of
///   length D, as in the dense product;
/// - input_grad, dX = dY·W = Σ_k dY[:, r0:r0+h] · tile_k: beta = 0 for the first tile, 1
///   after, so the sum over O is cut into ceil(O / tile_rows) partial sums added in tile order
///   (one more rounding per tile than a single GEMM; the same bits at any thread count, since
///   the cut depends on the shape and tile_rows only).
/// Tile size: tile_rows = clamp(frozen_tile_values / D, 1, O) unless the caller chooses it, so
/// the workspace is tile_rows·D ≤ max(frozen_tile_values, D) values (16 MiB in float at the
/// default), whatever O is. Why that large: each tile's GEMM reads all of x (forward) or reads
/// and writes all of dX (input_grad), so the cost beyond the dense product grows with the number
/// of tiles, ceil(O / tile_rows). With 2^18-value tiles (1 MiB, the first default) a LLaMA-7B
/// layer at T = 4096 took 64 (v_proj) and 179 (down_proj) tiles and its LoRA forward + backward
/// over NF4 ran 1.29× and 2.0× the time over a float W; with 2^22 values it is 4 and 11 tiles
/// and 1.02–1.08× (docs/performance.md, "Fine-tuning layers"). The workspace is still 1/4 of a
/// 4096×4096 float W and 1/11 of a 4096×11008 one.
#include <algorithm>
#include <cstddef>
#include <initializer_list>
#include <span>
#include <string_view>

#include "../concepts.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

namespace velora {

/// Default values per tile of a dequantised frozen weight (2^22: 16 MiB in float, 32 MiB in double).
inline constexpr index_t frozen_tile_values = index_t{1} << 22;

namespace detail {

/// tile_rows = 0 chooses the default; otherwise it must be within 1..rows.
inline index_t resolve_tile_rows(std::string_view fn, index_t tile_rows, index_t rows, index_t cols) {
    if (tile_rows == 0) return std::clamp<index_t>(frozen_tile_values / cols, 1, rows);
    require(tile_rows > 0 && tile_rows <= rows, fn, "argument 'tile_rows' = ", tile_rows, " must be 0 (default) or within 1..", rows,
            " (the weight's rows)");
    return tile_rows;
}

/// The checks of a tiled product: `in` is T×in_cols, `out` T×out_cols, the workspace holds at
/// least `needed` values, and `out` overlaps neither `in`, the workspace nor the stored weight
/// (`stored`: its arrays, as bytes); `in` may not overlap the workspace either (a tile would
/// overwrite it).
template <class T>
void check_tiled_call(std::string_view fn, const char* in_name, const_matrix_view<T> in, index_t in_cols, const char* out_name,
                      matrix_view<T> out, index_t out_cols, std::span<T> workspace, std::size_t needed,
                      std::initializer_list<const_matrix_view<std::byte>> stored) {
    check_shape(in, in.rows, in_cols, fn, in_name);
    check_shape(out, in.rows, out_cols, fn, out_name);
    require(workspace.size() >= needed && (needed == 0 || workspace.data() != nullptr), fn, "argument 'workspace' holds ", workspace.size(),
            " values but the weight needs workspace_elements() = ", needed);
    check_no_alias(out, out_name, in, in_name, fn);
    if (needed > 0) {
        const auto ws = make_view<const T>(workspace.data(), 1, static_cast<index_t>(needed));
        check_no_alias(out, out_name, ws, "workspace", fn);
        check_no_alias(ws, "workspace", in, in_name, fn);
    }
    for (const auto& s : stored)
        if (s.data != nullptr) check_no_alias(out, out_name, s, "the stored weight", fn);
}

/// y = x·Wᵀ, W (rows×cols) produced tile by tile by dequantize(first_row, tile view).
template <backend B, class Dequantize>
void tiled_forward(B& b, index_t rows, index_t cols, index_t tile_rows, const_matrix_view<typename B::value_type> x,
                   matrix_view<typename B::value_type> y, typename B::value_type* workspace, Dequantize&& dequantize) {
    using T = typename B::value_type;
    for (index_t r0 = 0; r0 < rows; r0 += tile_rows) {
        const index_t h = std::min(tile_rows, rows - r0);
        const matrix_view<T> tile(workspace, h, cols);
        dequantize(r0, tile);
        b.gemm(op::none, op::transpose, T(1), x, const_matrix_view<T>(tile), T(0), y.col_block(r0, h));
    }
}

/// dX = dY·W, accumulated over the tiles of W in row order.
template <backend B, class Dequantize>
void tiled_input_grad(B& b, index_t rows, index_t cols, index_t tile_rows, const_matrix_view<typename B::value_type> dy,
                      matrix_view<typename B::value_type> dx, typename B::value_type* workspace, Dequantize&& dequantize) {
    using T = typename B::value_type;
    for (index_t r0 = 0; r0 < rows; r0 += tile_rows) {
        const index_t h = std::min(tile_rows, rows - r0);
        const matrix_view<T> tile(workspace, h, cols);
        dequantize(r0, tile);
        b.gemm(op::none, op::none, T(1), dy.col_block(r0, h), const_matrix_view<T>(tile), r0 == 0 ? T(0) : T(1), dx);
    }
}

} // namespace detail
} // namespace velora
