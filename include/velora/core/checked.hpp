#pragma once
/// \file
/// Size arithmetic that cannot wrap: every product of caller-supplied sizes is formed here at
/// the public boundary, so an impossible size is a std::invalid_argument naming the function,
/// the argument and the values, never a wrapped size, a std::length_error or a heap overflow.
#include <cstddef>
#include <limits>
#include <string_view>

#include "error.hpp"

namespace velora::detail {

/// a·b for non-negative a, b; throws std::invalid_argument("<function>: <what> = a x b overflows").
template <class I>
[[nodiscard]] I checked_mul(I a, I b, std::string_view function, std::string_view what) {
    I product{};
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &product))
        fail(function, what, " = ", a, " x ", b, " overflows (or is negative)");
    return product;
}

/// a + b for non-negative a, b; throws like checked_mul.
template <class I>
[[nodiscard]] I checked_add(I a, I b, std::string_view function, std::string_view what) {
    I sum{};
    if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &sum)) fail(function, what, " = ", a, " + ", b, " overflows (or is negative)");
    return sum;
}

/// Elements of `count` values of `element_bytes` bytes each that an allocation can hold: throws
/// when count · element_bytes does not fit in half the address space (what operator new and
/// every ptrdiff_t difference within the allocation can represent).
template <class I>
[[nodiscard]] I checked_elements(I count, std::size_t element_bytes, std::string_view function, std::string_view what) {
    constexpr auto limit = static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max());
    if (count < 0 || static_cast<std::size_t>(count) > limit / element_bytes)
        fail(function, what, " = ", count, " elements of ", element_bytes, " bytes exceeds the address space");
    return count;
}

} // namespace velora::detail
