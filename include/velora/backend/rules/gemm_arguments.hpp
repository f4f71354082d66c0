#pragma once
/// \file
/// The argument checks of a backend GEMM, C = alpha·op(A)·op(B) + beta·C on row-major views,
/// written once for every backend (eigen_backend through cpu::gemm_driver, cuda_backend).
///
/// A backend calls check_gemm_arguments first and uses the m, n, k it returns; what it checks
/// beyond this (cuBLAS's int range, say) is its own.
#include "../../concepts.hpp"
#include "../../core/error.hpp"
#include "../../core/view.hpp"

namespace velora::rules {

/// The extents of a GEMM: op(A) is m×k, op(B) is k×n, C is m×n.
struct gemm_shape {
    index_t m = 0;
    index_t n = 0;
    index_t k = 0;
};

/// Checks the operands of C = alpha·op(A)·op(B) + beta·C and returns the product's extents.
/// Throws std::invalid_argument (naming `fn`) when a view is malformed (check_view), when the
/// inner dimensions of op(A) and op(B) differ, when C is not m×n, or when C overlaps A or B
/// (a GEMM reads its operands while it writes C).
template <class S>
gemm_shape check_gemm_arguments(const char* fn, op op_a, op op_b, const_matrix_view<S> a, const_matrix_view<S> b, matrix_view<S> c) {
    check_view(a, fn, "a");
    check_view(b, fn, "b");
    check_view(c, fn, "c");
    const index_t m = op_a == op::none ? a.rows : a.cols;
    const index_t k = op_a == op::none ? a.cols : a.rows;
    const index_t kb = op_b == op::none ? b.rows : b.cols;
    const index_t n = op_b == op::none ? b.cols : b.rows;
    detail::require(k == kb, fn, "inner dimensions differ: op(a) is ", m, "x", k, ", op(b) is ", kb, "x", n);
    detail::require(c.rows == m && c.cols == n, fn, "argument 'c' is ", c.rows, "x", c.cols, " but op(a)·op(b) is ", m, "x", n);
    check_no_alias(c, "c", a, "a", fn);
    check_no_alias(c, "c", b, "b", fn);
    return {m, n, k};
}

} // namespace velora::rules
