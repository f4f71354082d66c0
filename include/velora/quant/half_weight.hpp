#pragma once
/// \file
/// Frozen base weights stored in 16 bits: bf16 or IEEE f16 (velora::bfloat16 / velora::half,
/// core/storage.hpp, round to nearest even).
/// - `half_weight<U>`: the O×D weight rounded to U, in host memory (owning);
/// - `half_frozen_weight<B, U>`: the same in backend B's memory, satisfying
///   velora::frozen_weight: forward and input_grad widen a tile of rows at a time into the
///   caller's workspace with the backend's `convert` (exact: every bf16/f16 value is a float)
///   and call its GEMM per tile (tiled_products.hpp), never a dense copy of W.
/// Storage: 16 bits per weight, nothing else.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "../concepts.hpp"
#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "kernels.hpp"
#include "tiled_products.hpp"

namespace velora {

template <class U>
concept half_storage = std::is_same_v<U, half> || std::is_same_v<U, bfloat16>;

template <half_storage U>
class half_weight {
public:
    using storage_type = U;

    half_weight() = default;

    /// Rounds W (O×D, host, any leading dimension) to U, to nearest even. Throws
    /// std::invalid_argument naming velora::half_weight::quantize, the argument and the values
    /// when W is empty, holds a non-finite value, or (f16) a value whose rounding overflows to
    /// infinity (|w| ≥ 65520).
    [[nodiscard]] static half_weight quantize(const_matrix_view<float> w) {
        constexpr const char* fn = "velora::half_weight::quantize";
        check_view(w, fn, "w");
        const index_t n = detail::checked_elements(detail::checked_mul(w.rows, w.cols, fn, "the number of weights of 'w'"), sizeof(U), fn,
                                                   "the number of weights of 'w'");
        half_weight h;
        h.rows_ = w.rows;
        h.cols_ = w.cols;
        h.values_.resize(static_cast<std::size_t>(n));
        for (index_t r = 0; r < w.rows; ++r)
            for (index_t c = 0; c < w.cols; ++c) {
                const float v = w(r, c);
                detail::require(std::isfinite(v), fn, "argument 'w' has a non-finite value: w[", r, ", ", c, "] = ", v);
                const U stored = storage_cast<U>::from(v);
                detail::require(std::isfinite(to_arithmetic<float>(stored)), fn, "argument 'w' has w[", r, ", ", c, "] = ", v, ", which overflows ",
                                to_string(std::is_same_v<U, half> ? storage::f16 : storage::bf16));
                h.values_[static_cast<std::size_t>(r * w.cols + c)] = stored;
            }
        return h;
    }

    [[nodiscard]] index_t rows() const noexcept { return rows_; }
    [[nodiscard]] index_t cols() const noexcept { return cols_; }
    [[nodiscard]] bool empty() const noexcept { return rows_ == 0; }
    /// The O·D stored values, row-major.
    [[nodiscard]] std::span<const U> values() const noexcept { return values_; }
    [[nodiscard]] std::size_t stored_bytes() const noexcept { return values_.size() * sizeof(U); }
    [[nodiscard]] double bits_per_weight() const noexcept { return rows_ == 0 ? 0.0 : 8.0 * sizeof(U); }

    /// out = Ŵ[first_row : first_row + out.rows, :] as T (exact). Throws std::invalid_argument
    /// for a row range outside W or a wrong width.
    template <class T>
        requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
    void dequantize_rows(index_t first_row, matrix_view<T> out) const {
        constexpr const char* fn = "velora::half_weight::dequantize_rows";
        detail::require(!empty(), fn, "the weight is empty");
        check_view(out, fn, "out");
        detail::require(out.cols == cols_, fn, "argument 'out' has ", out.cols, " columns but the weight has D = ", cols_);
        detail::require(first_row >= 0 && first_row <= rows_ && out.rows <= rows_ - first_row, fn, "rows [", first_row, ", ", first_row,
                        " + ", out.rows, ") are not within the weight's ", rows_, " rows");
        for (index_t r = 0; r < out.rows; ++r)
            for (index_t c = 0; c < cols_; ++c) out(r, c) = to_arithmetic<T>(values_[static_cast<std::size_t>((first_row + r) * cols_ + c)]);
    }

private:
    index_t rows_ = 0;
    index_t cols_ = 0;
    std::vector<U> values_;
};

using bf16_weight = half_weight<bfloat16>;
using f16_weight = half_weight<half>;

/// A 16-bit base weight in B's memory (see the file comment).
template <backend B, half_storage U>
    requires byte_upload<B>
class half_frozen_weight {
public:
    using backend_type = B;
    using value_type = typename B::value_type;

    /// Copies the weight into B's memory. `tile_rows` = 0 chooses clamp(2^22 / D, 1, O);
    /// otherwise 1..O. Throws std::invalid_argument for an empty weight or tile_rows out of range.
    half_frozen_weight(B& b, const half_weight<U>& w, index_t tile_rows = 0) : rows_(w.rows()), cols_(w.cols()) {
        constexpr const char* fn = "velora::half_frozen_weight::half_frozen_weight";
        detail::require(!w.empty(), fn, "argument 'w' is an empty half_weight");
        tile_rows_ = detail::resolve_tile_rows(fn, tile_rows, rows_, cols_);
        values_.resize(w.values().size());
        b.copy_bytes_from_host(w.values().data(), values_.data(), w.values().size_bytes());
    }

    [[nodiscard]] index_t rows() const noexcept { return rows_; }
    [[nodiscard]] index_t cols() const noexcept { return cols_; }
    [[nodiscard]] index_t tile_rows() const noexcept { return tile_rows_; }
    [[nodiscard]] std::size_t workspace_elements() const noexcept { return static_cast<std::size_t>(tile_rows_) * static_cast<std::size_t>(cols_); }
    [[nodiscard]] std::size_t stored_bytes() const noexcept { return static_cast<std::size_t>(rows_) * static_cast<std::size_t>(cols_) * sizeof(U); }
    /// W in B's memory, row-major.
    [[nodiscard]] const_matrix_view<U> stored() const noexcept { return {values_.data(), rows_, cols_}; }

    /// y = x·Wᵀ (x: T×D, y: T×O, overwritten). Throws std::invalid_argument for wrong shapes,
    /// a workspace below workspace_elements(), or y overlapping x, the workspace or W; x may
    /// not overlap the workspace.
    void forward(B& b, const_matrix_view<value_type> x, matrix_view<value_type> y, std::span<value_type> workspace) const {
        detail::check_tiled_call<value_type>("velora::half_frozen_weight::forward", "x", x, cols_, "y", y, rows_, workspace, workspace_elements(),
                                             {stored_bytes_view()});
        detail::tiled_forward(b, rows_, cols_, tile_rows_, x, y, workspace.data(), [&](index_t r0, matrix_view<value_type> tile) { widen(b, r0, tile); });
    }

    /// dX = dY·W (dy: T×O, dx: T×D, overwritten). Throws like forward.
    void input_grad(B& b, const_matrix_view<value_type> dy, matrix_view<value_type> dx, std::span<value_type> workspace) const {
        detail::check_tiled_call<value_type>("velora::half_frozen_weight::input_grad", "dy", dy, rows_, "dx", dx, cols_, workspace,
                                             workspace_elements(), {stored_bytes_view()});
        detail::tiled_input_grad(b, rows_, cols_, tile_rows_, dy, dx, workspace.data(),
                                 [&](index_t r0, matrix_view<value_type> tile) { widen(b, r0, tile); });
    }

private:
    void widen(B& b, index_t r0, matrix_view<value_type> tile) const { b.convert(stored().row_block(r0, tile.rows), tile); }
    [[nodiscard]] const_matrix_view<std::byte> stored_bytes_view() const noexcept {
        return {reinterpret_cast<const std::byte*>(values_.data()), 1, static_cast<index_t>(stored_bytes())};
    }

    index_t rows_;
    index_t cols_;
    index_t tile_rows_ = 1;
    typename B::template buffer<U> values_;
};

template <backend B>
using bf16_frozen_weight = half_frozen_weight<B, bfloat16>;
template <backend B>
using f16_frozen_weight = half_frozen_weight<B, half>;

} // namespace velora
