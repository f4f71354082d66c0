#pragma once
// Helpers over Eigen matrices shared by the test programs that drive the library with host-owned
// row-major Eigen storage (test_adarank, test_lora, test_qlora): views of them, copies to double
// for comparisons against references, bit-exact equality, and deterministic filling.
#include <velora/core/view.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "test_util.hpp"

namespace test {

using Mat = Eigen::MatrixXd;
template <class T>
using RowMatT = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
velora::matrix_view<T> mv(RowMatT<T>& a) { return velora::make_view(a.data(), a.rows(), a.cols()); }
template <class T>
velora::const_matrix_view<T> cv(const RowMatT<T>& a) { return velora::make_view<const T>(a.data(), a.rows(), a.cols()); }

template <class T>
Mat to_mat(const RowMatT<T>& a) { return a.template cast<double>(); }
template <class T>
Mat to_mat(velora::const_matrix_view<T> v) {
    Mat m(v.rows, v.cols);
    for (velora::index_t i = 0; i < v.rows; ++i)
        for (velora::index_t j = 0; j < v.cols; ++j) m(i, j) = static_cast<double>(v(i, j));
    return m;
}

template <class T>
RowMatT<T> copy_of(velora::const_matrix_view<T> v) {
    RowMatT<T> m(v.rows, v.cols);
    for (velora::index_t i = 0; i < v.rows; ++i)
        for (velora::index_t j = 0; j < v.cols; ++j) m(i, j) = v(i, j);
    return m;
}

/// ‖a − b‖ / ‖b‖ in double, for any two Eigen expressions of one shape.
template <class A, class B>
double rel_diff(const A& a, const B& b) {
    const Mat x = a.template cast<double>(), y = b.template cast<double>();
    return (x - y).norm() / std::max(y.norm(), 1e-300);
}

template <class T>
bool same_bits(const RowMatT<T>& a, const RowMatT<T>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}
template <class T>
bool same_bits(velora::const_matrix_view<T> a, velora::const_matrix_view<T> b) {
    if (a.rows != b.rows || a.cols != b.cols) return false;
    for (velora::index_t i = 0; i < a.rows; ++i)
        if (std::memcmp(a.row(i), b.row(i), sizeof(T) * static_cast<std::size_t>(a.cols)) != 0) return false;
    return true;
}

/// rows×cols of `amplitude` times test::data (computed in double, rounded once to T).
template <class T>
RowMatT<T> filled(velora::index_t rows, velora::index_t cols, std::uint64_t seed, double amplitude = 1.0) {
    const auto v = data<double>(static_cast<std::size_t>(rows * cols), seed);
    RowMatT<T> m(rows, cols);
    for (velora::index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(amplitude * v[static_cast<std::size_t>(i)]);
    return m;
}

} // namespace test
