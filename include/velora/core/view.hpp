#pragma once
/// \file
/// Non-owning row-major matrix views: the currency at the library's API boundary.
///
/// A host framework owns its tensors; it hands the library a pointer, the shape and the
/// leading dimension (distance in elements between the starts of consecutive rows). The same
/// type describes host memory (Eigen backend) and device memory (CUDA backend): the view
/// never dereferences anything itself except through operator(), which is host-only.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>

#include "error.hpp"

namespace velora {

using index_t = std::ptrdiff_t;

template <class T>
struct matrix_view {
    using element_type = T;
    using value_type = std::remove_cv_t<T>;

    T* data = nullptr;
    index_t rows = 0;
    index_t cols = 0;
    index_t ld = 0;   ///< leading dimension (row stride) in elements, >= cols

    constexpr matrix_view() = default;
    constexpr matrix_view(T* p, index_t r, index_t c, index_t leading) : data(p), rows(r), cols(c), ld(leading) {}
    constexpr matrix_view(T* p, index_t r, index_t c) : matrix_view(p, r, c, c) {}

    /// A view of mutable data converts to a view of const data.
    template <class U>
        requires(std::is_same_v<const U, T> && !std::is_const_v<U>)
    constexpr matrix_view(const matrix_view<U>& other) : data(other.data), rows(other.rows), cols(other.cols), ld(other.ld) {}

    [[nodiscard]] constexpr index_t size() const noexcept { return rows * cols; }
    [[nodiscard]] constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
    [[nodiscard]] constexpr bool contiguous() const noexcept { return ld == cols || rows <= 1; }
    [[nodiscard]] constexpr T* row(index_t r) const noexcept { return data + r * ld; }
    [[nodiscard]] constexpr T& operator()(index_t r, index_t c) const noexcept { return data[r * ld + c]; }

    /// Rows [first, first + count) as a view of the same memory.
    [[nodiscard]] constexpr matrix_view row_block(index_t first, index_t count) const noexcept {
        return {data + first * ld, count, cols, ld};
    }
    /// Columns [first, first + count) as a view of the same memory.
    [[nodiscard]] constexpr matrix_view col_block(index_t first, index_t count) const noexcept {
        return {data + first, rows, count, ld};
    }
};

template <class T>
using const_matrix_view = matrix_view<const T>;

template <class T>
constexpr matrix_view<T> make_view(T* data, index_t rows, index_t cols, index_t ld = -1) noexcept {
    return {data, rows, cols, ld < 0 ? cols : ld};
}

/// Elements spanned by a non-empty view, (rows − 1)·ld + cols, or -1 when that does not fit
/// in the address space (as bytes of T).
template <class T>
[[nodiscard]] constexpr index_t span_elements(const matrix_view<T>& v) noexcept {
    constexpr index_t limit = std::numeric_limits<index_t>::max() / static_cast<index_t>(sizeof(std::remove_cv_t<T>));
    if (v.rows <= 0 || v.cols <= 0) return 0;
    if (v.ld > 0 && v.rows - 1 > (limit - v.cols) / v.ld) return -1;
    return (v.rows - 1) * v.ld + v.cols;
}

/// Whether two non-empty views share any memory address (conservatively: their address
/// ranges from the first to the last element intersect). Used to reject unsupported aliasing
/// of an output with an input.
template <class T, class U>
[[nodiscard]] bool overlaps(const matrix_view<T>& a, const matrix_view<U>& b) noexcept {
    if (a.empty() || b.empty() || a.data == nullptr || b.data == nullptr) return false;
    const auto begin_a = reinterpret_cast<std::uintptr_t>(a.data);
    const auto begin_b = reinterpret_cast<std::uintptr_t>(b.data);
    const auto end_a = begin_a + static_cast<std::uintptr_t>(span_elements(a)) * sizeof(std::remove_cv_t<T>);
    const auto end_b = begin_b + static_cast<std::uintptr_t>(span_elements(b)) * sizeof(std::remove_cv_t<U>);
    return begin_a < end_b && begin_b < end_a;
}

/// Checks the invariants every view handed to the library must satisfy and names the
/// offending argument otherwise. Empty views are rejected: no algorithm here has a
/// meaningful result for T = 0 tokens or D = 0 features. A view whose extent, (rows − 1)·ld +
/// cols elements, does not fit in the address space is rejected, so that no product of its
/// sizes can wrap later.
template <class T>
void check_view(const matrix_view<T>& v, std::string_view function, std::string_view name) {
    detail::require(v.rows > 0 && v.cols > 0, function, "argument '", name, "' is empty (", v.rows, "x", v.cols, ")");
    detail::require(v.data != nullptr, function, "argument '", name, "' has a null data pointer (", v.rows, "x", v.cols, ")");
    detail::require(v.ld >= v.cols, function, "argument '", name, "' has leading dimension ", v.ld, " < cols ", v.cols);
    detail::require(span_elements(v) > 0, function, "argument '", name, "' (", v.rows, "x", v.cols, ", ld ", v.ld,
                    ") spans more memory than the address space holds");
}

/// Throws when `out` shares memory with `in` (an output that may not alias that input).
template <class T, class U>
void check_no_alias(const matrix_view<T>& out, std::string_view out_name, const matrix_view<U>& in, std::string_view in_name,
                    std::string_view function) {
    detail::require(!overlaps(out, in), function, "argument '", out_name, "' (", out.rows, "x", out.cols, ") overlaps argument '",
                    in_name, "' (", in.rows, "x", in.cols, "); this output may not alias that input");
}

template <class T>
void check_shape(const matrix_view<T>& v, index_t rows, index_t cols, std::string_view function, std::string_view name) {
    check_view(v, function, name);
    detail::require(v.rows == rows && v.cols == cols, function, "argument '", name, "' is ", v.rows, "x", v.cols,
                    " but must be ", rows, "x", cols);
}

} // namespace velora
