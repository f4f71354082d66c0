#pragma once
/// \file
/// Refresh-time linear algebra of the CPU backend (AdaRankGrad's subspace search): row
/// orthonormalisation and the SVD of a wide sketch through its Gram matrix, both in double.
///
/// They run only when a subspace is refreshed, on blocks of k ≤ r + p rows. Their GEMMs go
/// through the backend's threaded driver; Eigen's decompositions run on the calling thread
/// (serial_eigen_scope), so their bits do not depend on the thread count, and allocate their
/// own temporaries (kept here between calls, resized when a shape grows).
///
/// The rules above the primitives are shared with the CUDA backend (../rules/): CholeskyQR2's
/// passes and acceptance tests (cholesky_qr2.hpp), the assembly of singular pairs from the
/// Gram matrix's eigen-decomposition (gram_svd.hpp). This file supplies the primitives: the
/// Gram GEMM, Eigen's LLT and triangular solve, Householder QR, the symmetric eigensolver.
#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/QR>

#include <algorithm>
#include <cmath>

#include "../../core/error.hpp"
#include "../../core/view.hpp"
#include "../rules/cholesky_qr2.hpp"
#include "../rules/gram_svd.hpp"
#include "gemm.hpp"
#include "threading.hpp"

namespace velora::cpu {

template <class T>
class refresh_linalg {
public:
    /// Makes the rows of a (k×c, k <= c) orthonormal in place, spanning the same row space.
    /// CholeskyQR2 in double (two passes of Q = L⁻¹·A with L Lᵀ = A Aᵀ: GEMM speed, and
    /// orthonormal to double rounding for cond(A) up to ~1e7; the row space is kept to
    /// ~1e-16·cond(A), far below float rounding); when the Cholesky factorisation breaks down
    /// (rank-deficient or nearly so, e.g. a zero matrix) or a pass refuses its factor
    /// (rules::cholesky_qr2_accepts), it falls back to Householder QR of aᵀ, which returns
    /// orthonormal rows for any input.
    void orthonormalize_rows(const gemm_driver& gemm, matrix_view<T> a) {
        constexpr const char* fn = "velora::eigen_backend::orthonormalize_rows";
        check_view(a, fn, "a");
        detail::require(a.rows <= a.cols, fn, "argument 'a' is ", a.rows, "x", a.cols, "; it needs rows <= cols");
        const ConstRowMap in(a.data, a.rows, a.cols, Eigen::OuterStride<>(a.ld));
        rows_ = in.template cast<double>();
        [[maybe_unused]] const serial_eigen_scope serial;
        const bool ok = rules::cholesky_qr2(
            [&] {   // Gram matrix of the current rows and its Cholesky factor
                gram_of_rows(gemm);
                llt_.compute(gram_);
                if (llt_.info() != Eigen::Success) return rules::cholesky_diagonal{};
                return rules::cholesky_diagonal{llt_.matrixLLT().data(), a.rows, a.rows + 1};   // column-major k×k
            },
            [&] {   // rows ← L⁻¹·rows
                l_inverse_.setIdentity(a.rows, a.rows);
                llt_.matrixL().solveInPlace(l_inverse_);
                next_.resize(rows_.rows(), rows_.cols());
                gemm.run<double>(fn, op::none, op::none, 1.0, view(l_inverse_), view(rows_), 0.0, view(next_));
                rows_.swap(next_);
            });
        RowMap out(a.data, a.rows, a.cols, Eigen::OuterStride<>(a.ld));
        if (ok) {
            out = rows_.template cast<T>();
            return;
        }
        ColMap at(a.data, a.cols, a.rows, Eigen::OuterStride<>(a.ld));   // aᵀ, column-major, same memory
        qr_.compute(at);
        thin_q_.setIdentity(a.cols, a.rows);
        qr_.householderQ().applyThisOnTheLeft(thin_q_);
        at = thin_q_;
    }

    /// Singular values (descending, into host memory, as double) and left singular vectors
    /// (the columns of u, k×k) of a wide matrix c (k×n, k <= n), from the eigen-decomposition
    /// of the Gram matrix c·cᵀ formed in double: singular values below ~1e-8·σ₁ are not resolved
    /// (far below float rounding), in exchange for one GEMM instead of a QR of c. The pairs are
    /// assembled by rules/gram_svd.hpp.
    void gram_svd(const gemm_driver& gemm, const_matrix_view<T> c, matrix_view<T> u, double* sigma) {
        constexpr const char* fn = "velora::eigen_backend::gram_svd";
        check_view(c, fn, "c");
        detail::require(c.rows <= c.cols, fn, "argument 'c' is ", c.rows, "x", c.cols, "; it needs rows <= cols");
        check_shape(u, c.rows, c.rows, fn, "u");
        detail::require(sigma != nullptr, fn, "argument 'sigma' is null");
        rows_ = ConstRowMap(c.data, c.rows, c.cols, Eigen::OuterStride<>(c.ld)).template cast<double>();
        gram_of_rows(gemm);
        [[maybe_unused]] const serial_eigen_scope serial;
        eig_.compute(gram_);   // ascending eigenvalues
        rules::gram_svd_singular_values(c.rows, eig_.eigenvalues().data(), sigma);
        rules::gram_svd_left_vectors(([&](index_t j, index_t e) { return eig_.eigenvectors()(j, e); }), u);
    }

private:
    using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using ColMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    using ColMap = Eigen::Map<ColMat, 0, Eigen::OuterStride<>>;
    using RowMap = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;
    using ConstRowMap = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;
    using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

    // gram_ = rows_ · rows_ᵀ, in double.
    void gram_of_rows(const gemm_driver& gemm) {
        gram_.resize(rows_.rows(), rows_.rows());
        gemm.run<double>("velora::eigen_backend::gram", op::none, op::transpose, 1.0, view(rows_), view(rows_), 0.0, view(gram_));
    }
    static matrix_view<double> view(RowMatD& m) { return {m.data(), m.rows(), m.cols(), m.cols()}; }

    RowMatD rows_, next_, gram_, l_inverse_;
    Eigen::LLT<Eigen::MatrixXd> llt_;
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig_;
    Eigen::HouseholderQR<ColMat> qr_;
    ColMat thin_q_;
};

} // namespace velora::cpu
