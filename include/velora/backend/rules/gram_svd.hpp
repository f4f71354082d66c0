#pragma once
/// \file
/// How a backend's gram_svd turns the eigen-decomposition of a Gram matrix into singular
/// pairs, written once for every backend.
///
/// For a wide C (k×n, k <= n) the backend forms G = C·Cᵀ in double and solves the symmetric
/// eigenproblem G = V·diag(λ)·Vᵀ with λ ascending (Eigen's SelfAdjointEigenSolver and
/// cuSOLVER's syevd both return that order). Singular pair i (σ descending) is eigenpair
/// gram_svd_source(k, i) = k − 1 − i: σᵢ = √max(0, λ) (rounding can leave a zero singular
/// value's λ slightly negative) and U's column i is that eigenvector. Singular values below
/// ~1e-8·σ₁ are not resolved (far below float rounding), in exchange for one GEMM instead of a
/// QR of C.
#include <algorithm>
#include <cmath>

#include "../../core/host_device.hpp"
#include "../../core/view.hpp"

namespace velora::rules {

/// The eigenpair (index into the ascending order) that gives singular pair i of k. Also
/// compiled for the device (a CUDA kernel assembles U from a device eigen-decomposition).
[[nodiscard]] VELORA_HOST_DEVICE constexpr index_t gram_svd_source(index_t k, index_t i) noexcept { return k - 1 - i; }

/// σ from an eigenvalue λ of C·Cᵀ.
[[nodiscard]] inline double gram_svd_singular_value(double lambda) noexcept { return std::sqrt(std::max(0.0, lambda)); }

/// sigma[i] (i < k, descending) from the k eigenvalues of C·Cᵀ in ascending order.
inline void gram_svd_singular_values(index_t k, const double* ascending, double* sigma) noexcept {
    for (index_t i = 0; i < k; ++i) sigma[i] = gram_svd_singular_value(ascending[gram_svd_source(k, i)]);
}

/// u(j, i) = eigenvector gram_svd_source(k, i), entry j, converted to T, for a k×k u;
/// `vectors(j, e)` reads entry j of eigenvector e (ascending order), as double.
template <class T, class Vectors>
void gram_svd_left_vectors(Vectors&& vectors, matrix_view<T> u) {
    const index_t k = u.rows;
    for (index_t i = 0; i < k; ++i) {
        const index_t from = gram_svd_source(k, i);
        for (index_t j = 0; j < k; ++j) u(j, i) = static_cast<T>(vectors(j, from));
    }
}

} // namespace velora::rules
