#pragma once
/// \file
/// `subspace_finder`: the leading left singular subspace of M (len×other) by a randomized SVD
/// (Halko, Martinsson & Tropp 2011), with a warm start from the previous basis.
///
/// Vectors are kept as rows (row-major k×len blocks), so every product is a GEMM with M or Mᵀ
/// on the right (see gradient.hpp) and works unchanged on a factored VeLoRA gradient.
///   cold:  S = Ωᵀ·Mᵀ (Ω Gaussian), then q times: S ← orth(S)·M·Mᵀ
///   warm:  S = [B_prev; fresh Gaussian rows], then q_warm power iterations as above
///   exact: S = I (or Mᵀ when len > other): the range of M exactly, no randomness
/// then S ← orth(S), C = S·M (k×other) = U_C Σ V_Cᵀ (its SVD, through the k×k Gram matrix in
/// double), and the new basis is the first r rows of U_Cᵀ·S, r chosen by the rank estimator from Σ and
/// ‖G‖_F². Each basis row is given a canonical sign (largest-magnitude entry positive), so
/// the result does not depend on the sign conventions of the QR and SVD routines.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include <velora/core/checked.hpp>

#include "backend.hpp"
#include "config_fields.hpp"
#include "gradient.hpp"
#include "policies.hpp"

namespace adarank {

/// What one subspace search did.
struct subspace_report {
    index_t rank = 0;            ///< rows of the new basis
    index_t sketch = 0;          ///< k, vectors in the sketch
    int power_iterations = 0;
    bool exact = false;          ///< exact SVD path (no randomness)
    bool warm = false;           ///< started from the previous basis
    double energy = 0;           ///< ‖G‖_F²
    double captured = 0;         ///< Σ_{i≤rank} σ_i² of the sketch (≤ the energy captured by the basis)
};

template <optimizer_backend B>
class subspace_finder {
public:
    using T = typename B::value_type;

    /// Throws std::invalid_argument for an invalid configuration.
    explicit subspace_finder(B& backend, rsvd_config config = {}) : b_(&backend), config_(config) {
        optimizer_config c;
        c.rsvd = config;
        validate(c, "adarank::subspace_finder::subspace_finder");
    }

    [[nodiscard]] const rsvd_config& config() const noexcept { return config_; }

    /// Sketch size for a len×other matrix and ranks up to r_max.
    [[nodiscard]] index_t sketch_size(index_t len, index_t other, index_t r_max) const noexcept {
        const index_t full = std::min(len, other);
        const index_t k = capped_sum(r_max, config_.oversampling, full);
        return is_exact(k, full) ? full : k;
    }

    /// Sizes the workspace for matrices up to len×other, so that find() allocates nothing of
    /// its own afterwards (the backend's QR and SVD may still use temporaries). Throws
    /// std::invalid_argument when a workspace size does not fit in the address space.
    void reserve(index_t len, index_t other, index_t r_max) {
        constexpr const char* fn = "adarank::subspace_finder::reserve";
        detail_require(len > 0 && other > 0 && r_max > 0, fn, "the sizes must be positive, got len = ", len, ", other = ", other,
                       ", r_max = ", r_max);
        const index_t k = sketch_size(len, other, r_max);
        // The sizes are formed with checked arithmetic (k <= min(len, other), so they fit whenever
        // len·other does; a caller of this public member may pass anything).
        const index_t s = velora::detail::checked_elements(velora::detail::checked_mul(k, len, fn, "sketch k x len"), sizeof(T), fn, "sketch k x len");
        const index_t x = velora::detail::checked_elements(velora::detail::checked_mul(k, std::max(other, len), fn, "sketch k x max(len, other)"),
                                                           sizeof(T), fn, "sketch k x max(len, other)");
        const index_t u = velora::detail::checked_mul(k, k, fn, "sketch k x k");
        grow(s_, s);
        grow(x_, x);
        grow(u_, u);
        if (sigma_.size() < static_cast<std::size_t>(k)) sigma_.resize(static_cast<std::size_t>(k));
    }

    /// Finds the basis of M's leading left singular subspace: writes `report.rank` rows into
    /// `basis` (at least min(estimator.max_rank(), sketch) rows × len). `energy` is ‖G‖_F² (the
    /// caller has it; pass m.norm2()). `warm` (r_prev×len, orthonormal rows) may be empty.
    /// Gaussian draws come from stream `seed` starting at `counter`, which is advanced.
    template <class Side, rank_estimator E>
    subspace_report find(const Side& m, const E& estimator, double energy, const_matrix_view<T> warm, std::uint64_t seed,
                         std::uint64_t& counter, matrix_view<T> basis) {
        constexpr const char* fn = "adarank::subspace_finder::find";
        const index_t len = m.len(), other = m.other();
        const index_t full = std::min(len, other);
        const index_t cap = std::min<index_t>(estimator.max_rank(), full);
        detail_require(cap >= 1, fn, "estimator.max_rank() must be >= 1");
        detail_require(basis.data && basis.cols == len && basis.rows >= cap, fn, "argument 'basis' is ", basis.rows, "x", basis.cols,
                       " but must have ", len, " columns and at least ", cap, " rows");
        detail_require(warm.empty() || warm.cols == len, fn, "argument 'warm' has ", warm.cols, " columns, expected ", len);
        reserve(len, other, cap);

        subspace_report rep;
        rep.energy = energy;
        index_t k = capped_sum(cap, config_.oversampling, full);
        rep.exact = is_exact(k, full);
        if (rep.exact) k = full;
        rep.sketch = k;
        last_k_ = k;
        auto s = view(s_, k, len);
        auto x = view(x_, k, other);

        if (rep.exact) {
            if (len <= other) {
                b_->set_identity(s);
            } else {   // the columns of M span its range: S = I·Mᵀ
                b_->set_identity(x);
                m.mul_t(x, s);
                b_->orthonormalize_rows(s);
            }
        } else if (!warm.empty() && config_.warm_start) {
            rep.warm = true;
            const index_t keep = std::min(warm.rows, k);
            for (index_t i = 0; i < keep; ++i) b_->copy(warm.row(i), s.row(i), len);
            fill_gaussian(seed, counter, s.row_block(keep, k - keep));
            b_->orthonormalize_rows(s);
            for (int i = 0; i < config_.warm_power_iterations; ++i) power_iteration(m, s, x, i > 0);
            rep.power_iterations = config_.warm_power_iterations;
        } else {
            fill_gaussian(seed, counter, x);
            m.mul_t(x, s);
            for (int i = 0; i < config_.power_iterations; ++i) power_iteration(m, s, x, true);
            rep.power_iterations = config_.power_iterations;
        }
        if (!rep.exact) b_->orthonormalize_rows(s);

        // C = S·M (k×other); its left singular vectors rotate S onto M's singular directions.
        m.mul(s, x);
        auto u = view(u_, k, k);
        b_->gram_svd(x, u, sigma_.data());

        rep.rank = std::clamp<index_t>(estimator.estimate(std::span<const double>(sigma_.data(), static_cast<std::size_t>(k)), energy, std::min(cap, k)),
                                       1, std::min(cap, k));
        for (index_t i = 0; i < rep.rank; ++i) rep.captured += sigma_[static_cast<std::size_t>(i)] * sigma_[static_cast<std::size_t>(i)];
        auto out = basis.row_block(0, rep.rank);
        b_->gemm(velora::op::transpose, velora::op::none, T(1), const_matrix_view<T>(u.col_block(0, rep.rank)), const_matrix_view<T>(s), T(0), out);
        b_->canonicalize_row_signs(out);
        return rep;
    }

    /// The singular values of the last sketch (k of them, descending).
    [[nodiscard]] std::span<const double> singular_values() const noexcept { return {sigma_.data(), static_cast<std::size_t>(last_k_)}; }

    /// Bytes of workspace held.
    [[nodiscard]] std::size_t workspace_bytes() const noexcept {
        return (s_.capacity() + x_.capacity() + u_.capacity()) * sizeof(T) + sigma_.capacity() * sizeof(double);
    }

private:
    using buffer = typename B::template buffer<T>;

    // min(r + p, full) for r, p, full >= 0 without forming r + p, which can overflow for a huge
    // oversampling setting (validate() only requires p >= 0).
    static constexpr index_t capped_sum(index_t r, index_t p, index_t full) noexcept { return r >= full || p >= full - r ? full : r + p; }

    [[nodiscard]] bool is_exact(index_t k, index_t full) const noexcept {
        return static_cast<double>(k) >= config_.exact_fraction * static_cast<double>(full);
    }

    template <class... Parts>
    static void detail_require(bool ok, const char* fn, const Parts&... parts) {
        velora::detail::require(ok, fn, parts...);
    }

    static void grow(buffer& buf, index_t n) {
        if (buf.size() < static_cast<std::size_t>(n)) buf.resize(static_cast<std::size_t>(n));
    }
    static matrix_view<T> view(buffer& buf, index_t rows, index_t cols) { return {buf.data(), rows, cols, cols}; }

    void fill_gaussian(std::uint64_t seed, std::uint64_t& counter, matrix_view<T> a) {
        // Rows are contiguous (ld == cols) in the finder's own buffers.
        b_->fill_gaussian(seed, counter, a.data, a.size());
        counter += static_cast<std::uint64_t>(a.size());
    }

    // S (k×len, orthonormal rows unless `orth_first`) ← orth(S)·M·Mᵀ. Only the len-side block
    // is re-orthonormalised, once per application of M·Mᵀ (Halko et al. re-orthonormalise after
    // M and after Mᵀ): the other side is the longer one under the std rule, and its QR would
    // cost as much as a product. The dynamic range of one M·Mᵀ step, (σ₁/σ_k)², stays
    // resolvable in T for the top r directions, and orthonormalize_rows works in double.
    template <class Side>
    void power_iteration(const Side& m, matrix_view<T> s, matrix_view<T> x, bool orth_first) {
        if (orth_first) b_->orthonormalize_rows(s);
        m.mul(s, x);
        m.mul_t(x, s);
    }

    B* b_;
    rsvd_config config_;
    buffer s_, x_, u_;
    std::vector<double> sigma_;
    index_t last_k_ = 0;
};

} // namespace adarank
