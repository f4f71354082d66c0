#pragma once
// Test matrices with known spectra (double, Eigen), shared by the AdaRankGrad tests: Gaussian
// matrices from the counter-based stream, random orthonormal bases, and U·diag(σ)·Vᵀ.
#include <Eigen/Dense>

#include <velora/core/rng.hpp>
#include <velora/core/view.hpp>

#include <cstdint>
#include <vector>

namespace test {

inline Eigen::MatrixXd gaussian_matrix(velora::index_t rows, velora::index_t cols, std::uint64_t seed) {
    Eigen::MatrixXd a(rows, cols);
    for (velora::index_t i = 0; i < rows; ++i)
        for (velora::index_t j = 0; j < cols; ++j) a(i, j) = velora::gaussian_at(seed, static_cast<std::uint64_t>(i * cols + j));
    return a;
}

inline Eigen::MatrixXd random_orthonormal(velora::index_t rows, velora::index_t cols, std::uint64_t seed) {
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(gaussian_matrix(rows, cols, seed));
    return qr.householderQ() * Eigen::MatrixXd::Identity(rows, cols);
}

// U·diag(σ)·Vᵀ with random orthonormal U (rows×k) and V (cols×k), k = σ.size().
inline Eigen::MatrixXd with_spectrum(velora::index_t rows, velora::index_t cols, const std::vector<double>& sigma, std::uint64_t seed) {
    const auto k = static_cast<velora::index_t>(sigma.size());
    const Eigen::MatrixXd u = random_orthonormal(rows, k, seed), v = random_orthonormal(cols, k, seed + 1);
    return u * Eigen::Map<const Eigen::VectorXd>(sigma.data(), k).asDiagonal() * v.transpose();
}

} // namespace test
