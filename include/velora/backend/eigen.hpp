#pragma once
/// \file
/// `eigen_backend<T>`: the CPU backend on Eigen 3.4, for T = float or double.
///
/// GEMM drives Eigen's own GEBP kernel (the one behind `A.noalias() = B * C`) with packing
/// buffers that this object owns, one set per OpenMP thread, and splits the output across
/// threads itself. Eigen's expression-level product would take fresh packing buffers from
/// the heap on every call; here they are sized on first use of a shape and then reused, so a
/// steady-state call allocates nothing. The sub-token kernels are row-parallel loops over
/// Eigen maps (vectorised dot products and axpys). Reductions accumulate in T per row and
/// across rows in per-thread accumulators (double for sub-token means). With AVX-512 (built
/// with -march=native or -mavx512f) the float sub-token projection takes a hand-written kernel
/// that reads X once, in address order.
///
/// The members under "optimizer kernels" serve AdaRankGrad (include/adarank/): row
/// orthonormalisation (CholeskyQR2 in double, Householder fallback), the SVD of a wide sketch
/// through its Gram matrix (in double), the element-wise Adam(W) updates and a few small
/// helpers. The first two use Eigen's decompositions, which allocate their own temporaries and
/// run on the calling thread only (so their bits do not depend on the thread count); they run
/// only when a subspace is refreshed.
///
/// Determinism: every result is the same bits at any thread count. Reductions cut their work
/// into parts by the shape alone and add the parts' partials in order; the GEMM splits rows
/// with the blocking of the whole product (see gemm_impl).
///
/// An object is not thread-safe; use one per host thread. It may itself use OpenMP threads
/// when the translation unit is compiled with OpenMP (`-fopenmp`); `threads` caps them.
#include <Eigen/Core>
#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>
#include <Eigen/QR>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../concepts.hpp"
#include "../core/buffer.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"

static_assert(EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4,
              "velora's eigen_backend drives Eigen 3.4's GEBP kernel directly; it needs Eigen 3.4");

namespace velora {

template <class T>
class eigen_backend {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "eigen_backend supports float and double");

public:
    using value_type = T;
    template <class U>
    using buffer = host_buffer<U>;

    /// `threads` = 0 uses all OpenMP threads (1 without OpenMP).
    explicit eigen_backend(int threads = 0) : threads_(resolve_threads(threads)), gemm_scratch_(threads_), reduce_scratch_(kMaxParts) {}

    [[nodiscard]] int threads() const noexcept { return threads_; }

    // ---------------------------------------------------------------- memory
    void copy_to_host(const T* src, T* dst, index_t n) const { copy(src, dst, n); }
    void copy_from_host(const T* src, T* dst, index_t n) const { copy(src, dst, n); }
    /// Copy within backend memory.
    template <class U>
    static void copy(const U* src, U* dst, index_t n) {
        if (n > 0) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(U));
    }

    // ---------------------------------------------------------------- GEMM
    /// C = alpha · op(A) · op(B) + beta · C, all row-major views. beta = 0 ignores C's contents
    /// (NaN included), as in BLAS.
    void gemm(op op_a, op op_b, T alpha, const_matrix_view<T> a, const_matrix_view<T> b, T beta, matrix_view<T> c) {
        gemm_impl<T>("velora::eigen_backend::gemm", op_a, op_b, alpha, a, b, beta, c, gemm_scratch_);
    }

    // ---------------------------------------------------------------- sub-token kernels
    /// Z[t, g] = Σ_j X[t, g·s + j] · v[j] for g < Z.cols, reading X as zero past its last
    /// column (so a group made only of padding gives 0), converted to U.
    /// Returns false when any value as stored in U is not finite (NaN/Inf in X, or a dot product
    /// that overflows T or the narrower U); Z is then written but meaningless.
    template <class U>
    bool project_subtokens(const_matrix_view<T> x, const T* v, index_t s, matrix_view<U> z) {
#if defined(__AVX512F__)
        // float, stored as float, whole 16-lane packets per group: the AVX-512 kernel.
        if constexpr (std::is_same_v<T, float> && std::is_same_v<U, float>) {
            if (s % 16 == 0 && s >= 16 && s <= 16 * kMaxPackets) return project_subtokens_avx512(x, v, s, z);
        }
#endif
        const index_t d = x.cols;
        const index_t full = d / s;
        const index_t tail = d - full * s;
        if constexpr (std::is_same_v<U, T>) {
            // Common case (G divides D, dense rows): X is a (T·G)×s row-major matrix and Z its
            // product with v, one GEMV per thread; the finiteness test runs once over Z.
            if (tail == 0 && full == z.cols && x.contiguous() && z.contiguous() && s > 1) {
                int bad = 0;
                const int parts = fixed_parts(x.rows, x.size());
                parallel_for_parts(parts, [&](int part) {
                    const auto [first, last] = part_range(x.rows, parts, part);
                    const index_t rows = last - first;
                    if (rows <= 0) return;
                    const Eigen::Map<const RowMat> subtokens(x.row(first), rows * full, s);
                    VecOut out(z.row(first), rows * full);
                    out.noalias() = subtokens * VecMap(v, s);
                    if (!out.allFinite()) {
#if defined(_OPENMP)
#pragma omp atomic write
#endif
                        bad = 1;
                    }
                });
                return bad == 0;
            }
        }
        int bad = 0;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(threads_) if (x.size() > parallel_threshold)
#endif
        for (index_t t = 0; t < x.rows; ++t) {
            const T* row = x.row(t);
            U* out = z.row(t);
            // Finiteness is tested on the value as stored: a finite dot product can still
            // overflow a narrow storage type (|z| > 65504 in f16).
            for (index_t g = 0; g < full; ++g) {
                const U stored = storage_cast<U>::from(dot_in_lanes(row + g * s, v, s));
                bad |= !std::isfinite(to_arithmetic<T>(stored));
                out[g] = stored;
            }
            if (tail) {
                const U stored = storage_cast<U>::from(dot_in_lanes(row + full * s, v, tail));
                bad |= !std::isfinite(to_arithmetic<T>(stored));
                out[full] = stored;
            }
            for (index_t g = full + (tail ? 1 : 0); g < z.cols; ++g) out[g] = storage_cast<U>::from(T(0));   // all-padding groups
        }
        return bad == 0;
    }

    /// out[r, g·s + j] = scale · A[r, g] · v[j] for every column g·s + j < out.cols (columns of A
    /// that cover only padding are not read).
    template <class U>
    void expand_subtokens(const_matrix_view<U> a, const T* v, index_t s, T scale, matrix_view<T> out) {
        const index_t d = out.cols;
        const index_t full = d / s;
        const index_t tail = d - full * s;
        const VecMap vfull(v, s);
        const VecMap vtail(v, tail);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads_) if (out.size() > parallel_threshold)
#endif
        for (index_t r = 0; r < out.rows; ++r) {
            const U* coef = a.row(r);
            T* row = out.row(r);
            for (index_t g = 0; g < full; ++g) VecOut(row + g * s, s) = (scale * to_arithmetic<T>(coef[g])) * vfull;
            if (tail) VecOut(row + full * s, tail) = (scale * to_arithmetic<T>(coef[full])) * vtail;
        }
    }

    /// out[j] = Σ_t Σ_g X[t, g·s + j] (zero padding included): the direction of the sub-token
    /// mean. Accumulates each row in T and across rows in double.
    void sum_subtokens(const_matrix_view<T> x, index_t s, T* out) {
        const index_t d = x.cols;
        const index_t full = d / s;
        const index_t tail = d - full * s;
        reduce_rows(x.rows, s, x.size(), out, [&](index_t t, T* row_acc) {
            const T* row = x.row(t);
            VecOut acc(row_acc, s);
            for (index_t g = 0; g < full; ++g) acc += VecMap(row + g * s, s);
            if (tail) acc.head(tail) += VecMap(row + full * s, tail);
        });
    }

    /// out[g·s + j] = scale · v[j] · Σ_t dY[t, g·s + j] · Z[t, g]: the VeLoRA weight gradient of a
    /// scale-and-shift (SSF) layer y = x ⊙ w + b.
    template <class U>
    void weighted_subtoken_column_sums(const_matrix_view<T> dy, const_matrix_view<U> z, const T* v, index_t s, T scale, T* out) {
        const index_t d = dy.cols;
        const index_t full = d / s;
        const index_t tail = d - full * s;
        reduce_rows(dy.rows, d, dy.size(), out, [&](index_t t, T* row_acc) {
            const T* row = dy.row(t);
            const U* coef = z.row(t);
            for (index_t g = 0; g < full; ++g) VecOut(row_acc + g * s, s) += to_arithmetic<T>(coef[g]) * VecMap(row + g * s, s);
            if (tail) VecOut(row_acc + full * s, tail) += to_arithmetic<T>(coef[full]) * VecMap(row + full * s, tail);
        });
        const VecMap vfull(v, s);
        for (index_t g = 0; g < full; ++g) VecOut(out + g * s, s).array() *= scale * vfull.array();
        if (tail) VecOut(out + full * s, tail).array() *= scale * vfull.head(tail).array();
    }

    /// out[j] = Σ_t X[t, j] (the bias gradient of a linear or SSF layer).
    void column_sums(const_matrix_view<T> x, T* out) {
        reduce_rows(x.rows, x.cols, x.size(), out, [&](index_t t, T* row_acc) { VecOut(row_acc, x.cols) += VecMap(x.row(t), x.cols); });
    }

    /// out[t, j] = in[t, j] · w[j] + b[j]; a null `w` means 1, a null `b` means 0. `out` may
    /// alias `in`. (SSF forward and input gradient, bias add of a linear layer.)
    void scale_shift_columns(const_matrix_view<T> in, const T* w, const T* b, matrix_view<T> out) {
        const index_t d = out.cols;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads_) if (out.size() > parallel_threshold)
#endif
        for (index_t r = 0; r < out.rows; ++r) {
            auto dst = VecOut(out.row(r), d).array();
            const auto src = VecMap(in.row(r), d).array();
            if (w && b) {   // spelled out as fused multiply-adds: see adam_row for why not an Eigen expression
                const T* x = in.row(r);
                T* y = out.row(r);
                for (index_t j = 0; j < d; ++j) y[j] = fused(x[j], w[j], b[j]);
            } else if (w) dst = src * VecMap(w, d).array();
            else if (b) dst = src + VecMap(b, d).array();
            else if (out.data != in.data) dst = src;
        }
    }

    /// out = in, element-wise conversion from a storage type.
    template <class U>
    void convert(const_matrix_view<U> in, matrix_view<T> out) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads_) if (out.size() > parallel_threshold)
#endif
        for (index_t r = 0; r < out.rows; ++r) {
            const U* src = in.row(r);
            T* dst = out.row(r);
            for (index_t c = 0; c < out.cols; ++c) dst[c] = to_arithmetic<T>(src[c]);
        }
    }

    /// out[i] = gaussian_at(seed, offset + i): reproducible on every backend.
    void fill_gaussian(std::uint64_t seed, std::uint64_t offset, T* out, index_t n) {
        const int parts = n > parallel_threshold / 8 ? threads_ : 1;   // ~25 ns per value: worth threads early
        parallel_for_parts(parts, [&](int part) {
            const auto [first, last] = part_range(n, parts, part);
            index_t i = first;
            auto counter = [&](index_t at) { return offset + static_cast<std::uint64_t>(at); };
            if (i < last && counter(i) % 2 == 1) {   // an odd first counter: the second half of a pair
                out[i] = static_cast<T>(gaussian_at(seed, counter(i)));
                ++i;
            }
            for (; i + 1 < last; i += 2) {   // whole pairs: one transform for two values
                const gaussian_pair g = gaussian_pair_at(seed, counter(i) / 2);
                out[i] = static_cast<T>(g.even);
                out[i + 1] = static_cast<T>(g.odd);
            }
            if (i < last) out[i] = static_cast<T>(gaussian_at(seed, counter(i)));
        });
    }

    // ---------------------------------------------------------------- optimizer kernels
    /// Makes the rows of a (k×c, k <= c) orthonormal in place, spanning the same row space.
    /// CholeskyQR2 in double (two passes of Q = L⁻¹·A with L Lᵀ = A Aᵀ: GEMM speed, and
    /// orthonormal to double rounding for cond(A) up to ~1e7; the row space is kept to
    /// ~1e-16·cond(A), far below float rounding); when the Cholesky factorisation
    /// breaks down (rank-deficient or nearly so, e.g. a zero matrix) it falls back to Householder
    /// QR of aᵀ, which returns orthonormal rows for any input.
    void orthonormalize_rows(matrix_view<T> a) {
        constexpr const char* fn = "velora::eigen_backend::orthonormalize_rows";
        check_view(a, fn, "a");
        detail::require(a.rows <= a.cols, fn, "argument 'a' is ", a.rows, "x", a.cols, "; it needs rows <= cols");
        const ConstRowMap in(a.data, a.rows, a.cols, Eigen::OuterStride<>(a.ld));
        qr_rows_ = in.template cast<double>();
        [[maybe_unused]] const serial_eigen_scope serial;
        bool ok = true;
        for (int pass = 0; pass < 2 && ok; ++pass) {
            gram_of_rows();
            llt_.compute(gram_);
            ok = llt_.info() == Eigen::Success;
            if (ok) {
                // Pass 1 accepts cond(L) up to ~1e7 (a lower bound from the diagonal); pass 2 must
                // see an almost orthonormal block, or pass 1 has lost too much and Householder takes over.
                const auto diag = llt_.matrixLLT().diagonal();
                ok = diag.minCoeff() > (pass == 0 ? 1e-7 : 0.5) * diag.maxCoeff();
            }
            if (ok) {
                l_inverse_.setIdentity(a.rows, a.rows);
                llt_.matrixL().solveInPlace(l_inverse_);
                qr_next_.resize(qr_rows_.rows(), qr_rows_.cols());
                gemm_impl<double>("velora::eigen_backend::orthonormalize_rows", op::none, op::none, 1.0, dview(l_inverse_), dview(qr_rows_), 0.0,
                                  dview(qr_next_), gemm_scratch_d_);
                qr_rows_.swap(qr_next_);
            }
        }
        RowMap out(a.data, a.rows, a.cols, Eigen::OuterStride<>(a.ld));
        if (ok) {
            out = qr_rows_.template cast<T>();
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
    /// (far below float rounding), in exchange for one GEMM instead of a QR of c.
    void gram_svd(const_matrix_view<T> c, matrix_view<T> u, double* sigma) {
        constexpr const char* fn = "velora::eigen_backend::gram_svd";
        check_view(c, fn, "c");
        detail::require(c.rows <= c.cols, fn, "argument 'c' is ", c.rows, "x", c.cols, "; it needs rows <= cols");
        check_shape(u, c.rows, c.rows, fn, "u");
        detail::require(sigma != nullptr, fn, "argument 'sigma' is null");
        qr_rows_ = ConstRowMap(c.data, c.rows, c.cols, Eigen::OuterStride<>(c.ld)).template cast<double>();
        gram_of_rows();
        [[maybe_unused]] const serial_eigen_scope serial;
        eig_.compute(gram_);   // ascending eigenvalues
        const index_t k = c.rows;
        for (index_t i = 0; i < k; ++i) {
            const index_t from = k - 1 - i;
            sigma[i] = std::sqrt(std::max(0.0, eig_.eigenvalues()(from)));
            for (index_t j = 0; j < k; ++j) u(j, i) = static_cast<T>(eig_.eigenvectors()(j, from));
        }
    }

    /// Σ a[i, j]², accumulated in double (rows cut into parts by the shape alone, partial sums
    /// added in part order: the same bits at any thread count).
    /// Inf or NaN in a gives a non-finite result.
    double sum_of_squares(const_matrix_view<T> a) {
        const int parts = fixed_parts(a.rows, a.size());
        parallel_for_parts(parts, [&](int part) {
            const auto [first, last] = part_range(a.rows, parts, part);
            double sum = 0;
            for (index_t r = first; r < last; ++r) sum += sum_of_squares_in_lanes(a.row(r), a.cols);
            partials_[static_cast<std::size_t>(part)] = sum;
        });
        double total = 0;
        for (int p = 0; p < parts; ++p) total += partials_[static_cast<std::size_t>(p)];
        return total;
    }

    /// Adam's moment update and normalised step, element-wise:
    /// m = β₁m + (1−β₁)g,  v = β₂v + (1−β₂)g²,  n = m / (√v + ε).  `n` may alias `g`.
    /// Computed as m += (1−β₁)(g − m), v += (1−β₂)(g² − v) with fused multiply-adds (see adam_row).
    void adam_moments(const_matrix_view<T> g, matrix_view<T> m, matrix_view<T> v, T beta1, T beta2, T eps, matrix_view<T> n) {
        const adam_coefficients c{T(1) - beta1, T(1) - beta2, eps, T(0), T(1)};
        for_each_row(n.size(), n.rows, [&](index_t r) { adam_row<false>(g.row(r), m.row(r), v.row(r), n.row(r), n.cols, c); });
    }

    /// Dense AdamW in one pass: moments as in adam_moments, then
    /// w = decay · (w − step · m / (√v + ε)), where step = lr·√(1−β₂ᵗ)/(1−β₁ᵗ) and decay = 1 − lr·wd.
    void adamw_update(matrix_view<T> w, const_matrix_view<T> g, matrix_view<T> m, matrix_view<T> v, T beta1, T beta2, T eps,
                      T step, T decay) {
        const adam_coefficients c{T(1) - beta1, T(1) - beta2, eps, step, decay};
        for_each_row(w.size(), w.rows, [&](index_t r) { adam_row<true>(g.row(r), m.row(r), v.row(r), w.row(r), w.cols, c); });
    }

    /// out = in ∘ in.
    void square(const_matrix_view<T> in, matrix_view<T> out) {
        for (index_t r = 0; r < out.rows; ++r) VecOut(out.row(r), out.cols).array() = VecMap(in.row(r), in.cols).array().square();
    }

    /// a = max(a, 0) element-wise.
    void clamp_nonnegative(matrix_view<T> a) {
        for_each_row(a.size(), a.rows, [&](index_t r) { VecOut(a.row(r), a.cols) = VecOut(a.row(r), a.cols).cwiseMax(T(0)); });
    }

    /// a *= factor.
    void scale(matrix_view<T> a, T factor) {
        for_each_row(a.size(), a.rows, [&](index_t r) { VecOut(a.row(r), a.cols) *= factor; });
    }

    /// a[i, j] = value.
    void fill(matrix_view<T> a, T value) {
        for (index_t r = 0; r < a.rows; ++r) std::fill_n(a.row(r), a.cols, value);
    }

    /// a = the (possibly rectangular) identity.
    void set_identity(matrix_view<T> a) {
        for (index_t r = 0; r < a.rows; ++r) {
            std::fill_n(a.row(r), a.cols, T(0));
            if (r < a.cols) a(r, r) = T(1);
        }
    }

    /// Flips the sign of every row whose entry of largest magnitude (the first one, on ties) is
    /// negative: a canonical sign for singular vectors, whatever QR or SVD produced them.
    void canonicalize_row_signs(matrix_view<T> a) {
        for (index_t r = 0; r < a.rows; ++r) {
            const T* row = a.row(r);
            index_t at = 0;
            for (index_t c = 1; c < a.cols; ++c)
                if (std::abs(row[c]) > std::abs(row[at])) at = c;
            if (row[at] < T(0)) VecOut(a.row(r), a.cols) *= T(-1);
        }
    }

private:
    // Eigen's blocked decompositions (Householder QR and the eigensolver's back-transformation)
    // run their inner products on omp_get_max_threads() threads, and Eigen then blocks them by
    // that count, which changes their bits with the number of threads. They run only at a
    // refresh, on blocks of k <= r + p rows, so they run on the calling thread alone:
    // omp_set_num_threads changes only the calling thread's setting, restored on exit. (A host
    // that fixed Eigen's count with Eigen::setNbThreads(n > 1) overrides this; see docs.)
    struct serial_eigen_scope {
#if defined(_OPENMP)
        int saved = omp_get_max_threads();
        serial_eigen_scope() noexcept { omp_set_num_threads(1); }
        ~serial_eigen_scope() { omp_set_num_threads(saved); }
#else
        serial_eigen_scope() noexcept = default;
#endif
        serial_eigen_scope(const serial_eigen_scope&) = delete;
        serial_eigen_scope& operator=(const serial_eigen_scope&) = delete;
    };

    // ---- element-wise kernels whose bits do not depend on where the data lies ----
    //
    // Eigen computes the elements before a row's first 64-byte boundary one at a time and the
    // rest in packets, and GCC (-ffp-contract=fast, its default) fuses products into adds
    // differently in the two, so an Eigen expression like β₁m + (1−β₁)g gives bits that depend
    // on the caller's pointer. These kernels spell out every fused multiply-add: the AVX-512
    // body and the scalar tail compute the same correctly rounded operations.
#if defined(__FP_FAST_FMAF) || defined(__FP_FAST_FMA) || defined(__FMA__)
    static T fused(T a, T b, T c) noexcept { return std::fma(a, b, c); }
#else
    static T fused(T a, T b, T c) noexcept { return a * b + c; }   // no FMA instruction: nothing to contract
#endif

    struct adam_coefficients {
        T c1, c2, eps, step, decay;   // 1−β₁, 1−β₂, ε, step size, 1 − lr·wd
    };

    // m += c1·(g − m); v += c2·(g² − v); then either out = m/(√v+ε) (kWeight = false; out may
    // alias g) or out = decay·(out − step·m/(√v+ε)) (kWeight = true, out is the weight).
    template <bool kWeight>
    static void adam_row(const T* g, T* m, T* v, T* out, index_t n, const adam_coefficients& c) noexcept {
        index_t j = 0;
#if defined(__AVX512F__)
        j = adam_row_avx512<kWeight>(g, m, v, out, n, c);
#endif
        for (; j < n; ++j) {
            const T gj = g[j];
            const T mj = fused(c.c1, gj - m[j], m[j]);
            const T vj = fused(c.c2, fused(gj, gj, -v[j]), v[j]);
            m[j] = mj;
            v[j] = vj;
            const T nj = mj / (std::sqrt(vj) + c.eps);
            if constexpr (kWeight) out[j] = c.decay == T(1) ? fused(-c.step, nj, out[j]) : c.decay * fused(-c.step, nj, out[j]);
            else out[j] = nj;
        }
    }

#if defined(__AVX512F__)
    // The packets of adam_row: whole 64-byte packets from the row's first element (unaligned
    // loads), returns how many elements it did.
    template <bool kWeight>
    static index_t adam_row_avx512(const T* g, T* m, T* v, T* out, index_t n, const adam_coefficients& c) noexcept {
        if constexpr (std::is_same_v<T, float>) {
            const __m512 c1 = _mm512_set1_ps(c.c1), c2 = _mm512_set1_ps(c.c2), eps = _mm512_set1_ps(c.eps);
            const __m512 minus_step = _mm512_set1_ps(-c.step), decay = _mm512_set1_ps(c.decay);
            index_t j = 0;
            for (; j + 16 <= n; j += 16) {
                const __m512 gj = _mm512_loadu_ps(g + j), mj0 = _mm512_loadu_ps(m + j), vj0 = _mm512_loadu_ps(v + j);
                const __m512 mj = _mm512_fmadd_ps(c1, _mm512_sub_ps(gj, mj0), mj0);
                const __m512 vj = _mm512_fmadd_ps(c2, _mm512_fmsub_ps(gj, gj, vj0), vj0);
                _mm512_storeu_ps(m + j, mj);
                _mm512_storeu_ps(v + j, vj);
                const __m512 nj = _mm512_div_ps(mj, _mm512_add_ps(_mm512_sqrt_ps(vj), eps));
                if constexpr (kWeight) {
                    const __m512 wj = _mm512_fmadd_ps(minus_step, nj, _mm512_loadu_ps(out + j));
                    _mm512_storeu_ps(out + j, c.decay == 1.0f ? wj : _mm512_mul_ps(decay, wj));
                } else {
                    _mm512_storeu_ps(out + j, nj);
                }
            }
            return j;
        } else {
            const __m512d c1 = _mm512_set1_pd(c.c1), c2 = _mm512_set1_pd(c.c2), eps = _mm512_set1_pd(c.eps);
            const __m512d minus_step = _mm512_set1_pd(-c.step), decay = _mm512_set1_pd(c.decay);
            index_t j = 0;
            for (; j + 8 <= n; j += 8) {
                const __m512d gj = _mm512_loadu_pd(g + j), mj0 = _mm512_loadu_pd(m + j), vj0 = _mm512_loadu_pd(v + j);
                const __m512d mj = _mm512_fmadd_pd(c1, _mm512_sub_pd(gj, mj0), mj0);
                const __m512d vj = _mm512_fmadd_pd(c2, _mm512_fmsub_pd(gj, gj, vj0), vj0);
                _mm512_storeu_pd(m + j, mj);
                _mm512_storeu_pd(v + j, vj);
                const __m512d nj = _mm512_div_pd(mj, _mm512_add_pd(_mm512_sqrt_pd(vj), eps));
                if constexpr (kWeight) {
                    const __m512d wj = _mm512_fmadd_pd(minus_step, nj, _mm512_loadu_pd(out + j));
                    _mm512_storeu_pd(out + j, c.decay == 1.0 ? wj : _mm512_mul_pd(decay, wj));
                } else {
                    _mm512_storeu_pd(out + j, nj);
                }
            }
            return j;
        }
    }
#endif

    // Reductions written with a fixed number of lanes indexed from the start of the data (lane
    // i % kLanes), combined in a fixed tree: Eigen's own reductions start their packets at the
    // first aligned address, so their bits would depend on where the caller's data lies.
    static constexpr index_t kLanes = 16;

    static double sum_of_squares_in_lanes(const T* p, index_t n) noexcept {
        double lane[kLanes] = {};
        index_t i = 0;
        for (; i + kLanes <= n; i += kLanes)
            for (index_t l = 0; l < kLanes; ++l) {
                const double x = static_cast<double>(p[i + l]);
                lane[l] += x * x;
            }
        for (index_t l = 0; i + l < n; ++l) {
            const double x = static_cast<double>(p[i + l]);
            lane[l] += x * x;
        }
        return fold_lanes(lane);
    }

    static T dot_in_lanes(const T* x, const T* y, index_t n) noexcept {
        T lane[kLanes] = {};
        index_t i = 0;
        for (; i + kLanes <= n; i += kLanes)
            for (index_t l = 0; l < kLanes; ++l) lane[l] += x[i + l] * y[i + l];
        for (index_t l = 0; i + l < n; ++l) lane[l] += x[i + l] * y[i + l];
        return fold_lanes(lane);
    }

    template <class S>
    static S fold_lanes(S (&lane)[kLanes]) noexcept {
        for (index_t width = kLanes / 2; width > 0; width /= 2)
            for (index_t l = 0; l < width; ++l) lane[l] += lane[l + width];
        return lane[0];
    }

    // gram_ = qr_rows_ · qr_rowsᵀ, in double, through the backend's own threaded GEMM.
    void gram_of_rows() {
        gram_.resize(qr_rows_.rows(), qr_rows_.rows());
        gemm_impl<double>("velora::eigen_backend::gram", op::none, op::transpose, 1.0, dview(qr_rows_), dview(qr_rows_), 0.0, dview(gram_),
                          gemm_scratch_d_);
    }
    template <class M>
    static matrix_view<double> dview(M& m) { return {m.data(), m.rows(), m.cols(), m.cols()}; }

    using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
    using VecMap = Eigen::Map<const Vec>;
    using VecOut = Eigen::Map<Vec>;
    using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using ColMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    using ColMap = Eigen::Map<ColMat, 0, Eigen::OuterStride<>>;
    using RowMap = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;
    using ConstRowMap = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;
    using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    static constexpr index_t parallel_threshold = 1 << 15;   // elements below which threads cost more than they save

#if defined(__AVX512F__)
    // ---- AVX-512 sub-token projection (T = U = float, s a multiple of 16) ----
    //
    // Sixteen groups of a row are done at once: accumulator k gathers the products of one
    // group with v, and a shuffle tree then folds the sixteen accumulators into one vector
    // holding the sixteen dot products. The tree leaves the result of accumulator 4i + m in
    // lane 4m + i, so group g is accumulated in kSlot[g] (that 4x4 transpose is its own
    // inverse) and the lanes come out in group order. X is read strictly in address order
    // (group by group, packet by packet): that keeps the hardware prefetchers streaming,
    // which matters as much as the arithmetic once X is out of L1/L2.
    static constexpr int kSlot[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
    // Software prefetch distance in floats (512 bytes, eight lines ahead; one prefetch per
    // line read). With X in L3 the hardware prefetchers alone leave this kernel ~20% slower
    // than a plain streaming read on the AVX-512 machine it was tuned on (Zen 4, 2 cores).
    // Prefetches past the end of X are harmless (they never fault); the address is formed as
    // an integer so that no out-of-range pointer is ever computed.
    static constexpr index_t kPrefetchAhead = 128;
    // Longest sub-token (in 16-float packets) for the kernel: v then needs P of the 32 vector
    // registers besides the 16 accumulators. Longer sub-tokens (G < 8 for D = 1024) are few
    // long dot products, which the Eigen paths below handle well.
    static constexpr index_t kMaxPackets = 8;

    // Accumulates N (16, 8 or 4) consecutive groups of P = s/16 packets each, v held in
    // registers. With fewer than 16 groups, each group spreads its packets over K = 16/N
    // accumulators (the slots no group uses), which keeps more FMA chains in flight; they are
    // folded together before the shuffle tree.
    template <int P, std::size_t... G>
    static void fma_groups(__m512 (&acc)[16], const float* x, const __m512 (&vp)[P], std::index_sequence<G...>) {
        constexpr int N = sizeof...(G);
        constexpr int K = 16 / N;
        auto group = [&](int g) {
            for (int p = 0; p < P; ++p) {
                const float* xp = x + (g * P + p) * 16;
                _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(xp) + kPrefetchAhead * sizeof(float)),
                             _MM_HINT_T0);
                __m512& a = acc[kSlot[g + N * (p % K)]];
                a = _mm512_fmadd_ps(_mm512_loadu_ps(xp), vp[p], a);
            }
        };
        (group(static_cast<int>(G)), ...);
        if constexpr (K > 1) {
            auto fold = [&](int g) {
                for (int k = 1; k < K; ++k) {
                    acc[kSlot[g]] = _mm512_add_ps(acc[kSlot[g]], acc[kSlot[g + N * k]]);
                    acc[kSlot[g + N * k]] = _mm512_setzero_ps();
                }
            };
            (fold(static_cast<int>(G)), ...);
        }
    }

    // GCC 12 raises a false -Wmaybe-uninitialized at each inlined use of an intrinsic whose
    // pass-through operand is _mm512_undefined_*() (unpack, shuffle, max, reduce, ...). Their
    // zero-masking forms with a full mask compile to the same unmasked instructions and stay
    // quiet, so those are used below.
    static constexpr __mmask16 kAll16 = 0xFFFF;
    static constexpr __mmask8 kAll8 = 0xFF;

    // Lane k of the result = horizontal sum of acc[kSlot[k]] (see above).
    static __m512 transpose_sum_16(const __m512 (&a)[16]) {
        __m512 b[8], c[4];
        for (int i = 0; i < 8; ++i)   // 256-bit halves: b[i] = [a(2i) x2 | a(2i+1) x2]
            b[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll16, a[2 * i], a[2 * i + 1], 0x44),
                                 _mm512_maskz_shuffle_f32x4(kAll16, a[2 * i], a[2 * i + 1], 0xEE));
        for (int i = 0; i < 4; ++i)   // c[i], 128-bit lane m: 4 partial sums of a(4i + m)
            c[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll16, b[2 * i], b[2 * i + 1], 0x88),
                                 _mm512_maskz_shuffle_f32x4(kAll16, b[2 * i], b[2 * i + 1], 0xDD));
        const __m512 d0 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(kAll16, c[0], c[1]), _mm512_maskz_unpackhi_ps(kAll16, c[0], c[1]));
        const __m512 d1 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(kAll16, c[2], c[3]), _mm512_maskz_unpackhi_ps(kAll16, c[2], c[3]));
        const __m512d e0 = _mm512_castps_pd(d0), e1 = _mm512_castps_pd(d1);
        return _mm512_add_ps(_mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, e0, e1)),
                             _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, e0, e1)));
    }

    // Σ_j x[j] · v[j] for j < n (any n >= 0; the last partial packet is a masked load).
    static float dot_avx512(const float* x, const float* v, index_t n) {
        __m512 acc = _mm512_setzero_ps();
        index_t j = 0;
        for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(v + j), acc);
        if (j < n) {
            const auto m = static_cast<__mmask16>((1u << (n - j)) - 1u);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + j), _mm512_maskz_loadu_ps(m, v + j), acc);
        }
        acc = _mm512_add_ps(acc, _mm512_maskz_shuffle_f32x4(kAll16, acc, acc, 0x4E));   // swap 256-bit halves
        acc = _mm512_add_ps(acc, _mm512_maskz_shuffle_f32x4(kAll16, acc, acc, 0xB1));   // swap 128-bit lanes
        acc = _mm512_add_ps(acc, _mm512_maskz_permute_ps(kAll16, acc, 0x4E));            // swap 64-bit pairs
        acc = _mm512_add_ps(acc, _mm512_maskz_permute_ps(kAll16, acc, 0xB1));            // swap neighbours
        return _mm512_cvtss_f32(acc);
    }

    // Finiteness is tracked as the running maximum of |value|'s bit pattern: some value was
    // Inf or NaN iff that maximum reaches the all-ones exponent 0x7F800000. Integer
    // operations, so -ffast-math cannot fold the test away.
    static constexpr std::int32_t kAbsMask = 0x7FFFFFFF;
    static constexpr std::int32_t kInfBits = 0x7F800000;

    // N (16, 8 or 4) consecutive groups from x: their dot products with v go to out[0, N);
    // returns max_bits updated with them.
    template <int P, int N>
    static __m512i block_avx512(const float* x, const __m512 (&vp)[P], float* out, __m512i max_bits) {
        __m512 acc[16];
        for (auto& a : acc) a = _mm512_setzero_ps();
        fma_groups<P>(acc, x, vp, std::make_index_sequence<N>{});
        const __m512 r = transpose_sum_16(acc);
        if constexpr (N == 16) _mm512_storeu_ps(out, r);
        else _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << N) - 1u), r);
        return _mm512_maskz_max_epi32(kAll16, max_bits, _mm512_and_si512(_mm512_castps_si512(r), _mm512_set1_epi32(kAbsMask)));   // idle lanes are 0
    }

    template <int P>
    static bool project_rows_avx512(const_matrix_view<float> x, const float* v, index_t s, matrix_view<float> z, index_t first,
                                    index_t last) {
        const index_t d = x.cols;
        const index_t full = std::min<index_t>(d / s, z.cols);        // groups made only of data
        const index_t tail = full < z.cols ? std::min<index_t>(d - full * s, s) : 0;   // data in the partial group
        __m512i max_bits = _mm512_setzero_si512();
        std::int32_t max_bits_rest = 0;
        __m512 vp[P];
        for (int p = 0; p < P; ++p) vp[p] = _mm512_loadu_ps(v + 16 * p);
        for (index_t t = first; t < last; ++t) {
            const float* row = x.row(t);
            float* out = z.row(t);
            auto put = [&](index_t col, float value) {
                out[col] = value;
                std::int32_t bits;
                std::memcpy(&bits, &value, sizeof bits);
                max_bits_rest = std::max(max_bits_rest, bits & kAbsMask);
            };
            // Blocks of 16 groups; the last < 16 whole groups as a block of 8 and one of 4 (with
            // idle zero accumulators and a masked store), then single dot products.
            index_t g0 = 0;
            for (; g0 + 16 <= full; g0 += 16) max_bits = block_avx512<P, 16>(row + g0 * s, vp, out + g0, max_bits);
            if (g0 + 8 <= full) {
                max_bits = block_avx512<P, 8>(row + g0 * s, vp, out + g0, max_bits);
                g0 += 8;
            }
            if (g0 + 4 <= full) {
                max_bits = block_avx512<P, 4>(row + g0 * s, vp, out + g0, max_bits);
                g0 += 4;
            }
            for (; g0 < full; ++g0) put(g0, dot_avx512(row + g0 * s, v, s));
            index_t g = full;
            if (tail > 0) {   // the group that runs past the data: a dot product with a masked last packet
                put(g, dot_avx512(row + g * s, v, tail));
                ++g;
            }
            for (; g < z.cols; ++g) out[g] = 0.0f;   // all-padding groups
        }
        alignas(64) std::int32_t lanes[16];
        _mm512_store_si512(lanes, max_bits);
        for (std::int32_t bits : lanes) max_bits_rest = std::max(max_bits_rest, bits);
        return max_bits_rest < kInfBits;
    }

    static bool project_rows_avx512(const_matrix_view<float> x, const float* v, index_t s, matrix_view<float> z, index_t first,
                                    index_t last) {
        switch (s / 16) {
        case 1: return project_rows_avx512<1>(x, v, s, z, first, last);
        case 2: return project_rows_avx512<2>(x, v, s, z, first, last);
        case 3: return project_rows_avx512<3>(x, v, s, z, first, last);
        case 4: return project_rows_avx512<4>(x, v, s, z, first, last);
        case 5: return project_rows_avx512<5>(x, v, s, z, first, last);
        case 6: return project_rows_avx512<6>(x, v, s, z, first, last);
        case 7: return project_rows_avx512<7>(x, v, s, z, first, last);
        case 8: return project_rows_avx512<8>(x, v, s, z, first, last);
        default: return false;   // not reached: project_subtokens checks s
        }
    }

    bool project_subtokens_avx512(const_matrix_view<float> x, const float* v, index_t s, matrix_view<float> z) {
        const int parts = fixed_parts(x.rows, x.size());
        if (parts <= 1) return project_rows_avx512(x, v, s, z, 0, x.rows);
        int bad = 0;
        parallel_for_parts(parts, [&](int part) {
            const auto [first, last] = part_range(x.rows, parts, part);
            if (first < last && !project_rows_avx512(x, v, s, z, first, last)) {
#if defined(_OPENMP)
#pragma omp atomic write
#endif
                bad = 1;
            }
        });
        return bad == 0;
    }
#endif

    static int resolve_threads(int requested) {
#if defined(_OPENMP)
        const int available = omp_get_max_threads();
#else
        const int available = 1;
#endif
        return std::max(1, requested > 0 ? std::min(requested, available) : available);
    }

    // Rows [first, last) of part `part` when `rows` are cut into `parts` contiguous chunks.
    static std::pair<index_t, index_t> part_range(index_t rows, int parts, int part) {
        const index_t chunk = (rows + parts - 1) / parts;
        const index_t first = std::min<index_t>(rows, part * chunk);
        return {first, std::min<index_t>(rows, first + chunk)};
    }

    // f(r) for every row r, rows split across threads when the work is large enough.
    template <class F>
    void for_each_row(index_t work, index_t rows, F&& f) {
        const int parts = fixed_parts(rows, work);
        parallel_for_parts(parts, [&](int part) {
            const auto [first, last] = part_range(rows, parts, part);
            for (index_t r = first; r < last; ++r) f(r);
        });
    }

    // Work is cut into parts by its shape alone, never by the thread count: each part's
    // partial result and the order in which partials are combined are then the same whatever
    // the number of threads, so reductions give the same bits with 1 thread or 64. Sixteen
    // parts keep up to 16 threads busy and balance 2, 4 or 8 evenly.
    static constexpr int kMaxParts = 16;
    static int fixed_parts(index_t rows, index_t work) {
        return work > parallel_threshold ? static_cast<int>(std::min<index_t>(kMaxParts, rows)) : 1;
    }

    // f(part) for part < parts, on up to threads_ OpenMP threads (parts in a static schedule).
    template <class F>
    void parallel_for_parts(int parts, F&& f) {
        const int team = std::min(threads_, parts);
        if (team <= 1) {
            for (int part = 0; part < parts; ++part) f(part);
            return;
        }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(team)
#endif
        for (int part = 0; part < parts; ++part) f(part);
    }

    // Index of the calling thread within the current parallel_for_parts team (0 outside one).
    static int thread_index() noexcept {
#if defined(_OPENMP)
        return omp_get_thread_num();
#else
        return 0;
#endif
    }

    // Eigen's blocking sizes: depth block kc, row block mc, column block nc.
    struct gemm_blocking {
        Eigen::Index kc, mc, nc;
    };
    // Eigen's blocking for a rows×cols×depth product (its column-major view: rows = our n).
    template <class S>
    static gemm_blocking blocking_of(index_t rows, index_t cols, index_t depth) {
        Eigen::Index kc = depth, mc = rows, nc = cols;
        Eigen::internal::computeProductBlockingSizes<S, S, 1, Eigen::Index>(kc, mc, nc, 1);
        return {kc, mc, nc};
    }

    // Per-thread packing buffers for Eigen's GEBP kernel, grown to the largest blocking seen.
    template <class S>
    struct gemm_scratch : Eigen::internal::level3_blocking<S, S> {
        host_buffer<S> a, b;
        void prepare(const gemm_blocking& blocking) {
            const Eigen::Index kc = blocking.kc, mc = blocking.mc, nc = blocking.nc;
            a.reserve(static_cast<std::size_t>(kc * mc));
            b.reserve(static_cast<std::size_t>(kc * nc));
            this->m_kc = kc;
            this->m_mc = mc;
            this->m_nc = nc;
            this->m_blockA = a.data();
            this->m_blockB = b.data();
        }
    };

    template <class S, int LhsOrder, int RhsOrder>
    static void gebp(index_t m, index_t n, index_t k, const gemm_blocking& blocking, S alpha, const S* a, index_t lda, const S* b,
                     index_t ldb, S* c, index_t ldc, gemm_scratch<S>& scratch) {
        // A row-major result is computed as its column-major transpose: rows and cols swap roles.
        // The blocking is that of the whole product, not of this part (see gemm_impl).
        scratch.prepare(blocking);
        Eigen::internal::general_matrix_matrix_product<Eigen::Index, S, LhsOrder, false, S, RhsOrder, false, Eigen::RowMajor, 1>::run(
            m, n, k, a, lda, b, ldb, c, 1, ldc, alpha, scratch, nullptr);
    }

    template <class S>
    static void serial_gemm(op op_a, op op_b, index_t m, index_t n, index_t k, const gemm_blocking& blocking, S alpha, const S* a,
                            index_t lda, const S* b, index_t ldb, S* c, index_t ldc, gemm_scratch<S>& scratch) {
        constexpr int R = Eigen::RowMajor, C = Eigen::ColMajor;
        if (op_a == op::none && op_b == op::none) gebp<S, R, R>(m, n, k, blocking, alpha, a, lda, b, ldb, c, ldc, scratch);
        else if (op_a == op::none) gebp<S, R, C>(m, n, k, blocking, alpha, a, lda, b, ldb, c, ldc, scratch);
        else if (op_b == op::none) gebp<S, C, R>(m, n, k, blocking, alpha, a, lda, b, ldb, c, ldc, scratch);
        else gebp<S, C, C>(m, n, k, blocking, alpha, a, lda, b, ldb, c, ldc, scratch);
    }

    template <class S>
    static void scale_output(S beta, matrix_view<S> c) {
        if (beta == S(1)) return;
        for (index_t r = 0; r < c.rows; ++r) {
            if (beta == S(0)) std::fill_n(c.row(r), c.cols, S(0));
            else Eigen::Map<Eigen::Matrix<S, Eigen::Dynamic, 1>>(c.row(r), c.cols) *= beta;
        }
    }

    // The GEMM behind gemm(), for any scalar S (the optimizer kernels run double GEMMs too).
    template <class S>
    void gemm_impl(const char* fn, op op_a, op op_b, S alpha, const_matrix_view<S> a, const_matrix_view<S> b, S beta, matrix_view<S> c,
                   std::vector<gemm_scratch<S>>& scratch) {
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

        // C is split across threads (tiny products stay serial) along its larger side, each part
        // run with the blocking of the whole product, at cuts that keep every element of C on the
        // same micro-kernel path with the same summation order as without a split: rows of C
        // (Eigen's columns) at multiples of kRowQuantum, a multiple of every kernel's column
        // panel; columns of C (Eigen's rows) at multiples of the whole product's mc, so that the
        // parts' row blocks are the whole product's. The result is the same bits whatever the
        // thread count (tests/test_determinism.cpp), and the operand the split does not cut is
        // the smaller one, packed once per thread.
        const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
        const gemm_blocking blocking = blocking_of<S>(n, m, k);
        const bool split_columns = n > m && n >= 2 * blocking.mc;
        const index_t quantum = split_columns ? static_cast<index_t>(blocking.mc) : kRowQuantum;
        const index_t extent = split_columns ? n : m;
        const index_t quanta = (extent + quantum - 1) / quantum;
        const index_t most_parts = split_columns ? quanta : quanta / 2;
        const int parts = flops < 4.0e6 ? 1 : static_cast<int>(std::min<index_t>(threads_, std::max<index_t>(1, most_parts)));
        auto run_part = [&](int part) {
            const auto [first_q, last_q] = part_range(quanta, parts, part);
            const index_t first = first_q * quantum;
            const index_t count = std::min(extent, last_q * quantum) - first;
            if (count <= 0) return;
            const S* pa = a.data;
            const S* pb = b.data;
            S* pc = c.data;
            index_t mm = m, nn = n;
            if (split_columns) {
                pb += op_b == op::none ? first : first * b.ld;
                pc += first;
                nn = count;
            } else {
                pa += op_a == op::none ? first * a.ld : first;
                pc += first * c.ld;
                mm = count;
            }
            scale_output<S>(beta, matrix_view<S>{pc, mm, nn, c.ld});
            if (alpha != S(0) && k > 0)
                serial_gemm<S>(op_a, op_b, mm, nn, k, blocking, alpha, pa, a.ld, pb, b.ld, pc, c.ld, scratch[static_cast<std::size_t>(thread_index())]);
        };
        parallel_for_parts(parts, run_part);
    }

    // Column reduction over rows: each part (cut by the shape alone, fixed_parts) accumulates
    // `width` values in its own scratch (rows are folded in T, a block of rows at a time, into
    // a double accumulator), then the parts' results are added in part order, so the result
    // depends neither on timing nor on the thread count.
    template <class RowFn>
    void reduce_rows(index_t rows, index_t width, index_t work, T* out, RowFn&& add_row) {
        const int parts = fixed_parts(rows, work);
        for (int p = 0; p < parts; ++p) {
            reduce_scratch_[p].block.resize(static_cast<std::size_t>(width));
            reduce_scratch_[p].total.resize(static_cast<std::size_t>(width));
        }
        parallel_for_parts(parts, [&](int part) {
            const auto [first, last] = part_range(rows, parts, part);
            auto& scratch = reduce_scratch_[part];
            Eigen::Map<Eigen::VectorXd> total(scratch.total.data(), width);
            VecOut block(scratch.block.data(), width);
            total.setZero();
            constexpr index_t rows_per_block = 64;
            for (index_t t0 = first; t0 < last; t0 += rows_per_block) {
                block.setZero();
                for (index_t t = t0; t < std::min(last, t0 + rows_per_block); ++t) add_row(t, scratch.block.data());
                total += block.template cast<double>();
            }
        });
        Eigen::Map<Eigen::VectorXd> sum(reduce_scratch_[0].total.data(), width);
        for (int p = 1; p < parts; ++p) sum += Eigen::Map<Eigen::VectorXd>(reduce_scratch_[p].total.data(), width);
        VecOut(out, width) = sum.template cast<T>();
    }

    struct reduce_scratch {
        host_buffer<T> block;
        host_buffer<double> total;
    };

    // Column-panel quantum of the GEMM's row split: a multiple of every GEBP nr (4 or 8).
    static constexpr index_t kRowQuantum = 16;

    int threads_;
    std::vector<gemm_scratch<T>> gemm_scratch_;
    std::vector<gemm_scratch<double>> gemm_scratch_d_ = std::vector<gemm_scratch<double>>(static_cast<std::size_t>(threads_));
    std::vector<reduce_scratch> reduce_scratch_;
    std::vector<double> partials_ = std::vector<double>(static_cast<std::size_t>(kMaxParts));
    // Refresh-time linear algebra (AdaRankGrad); Eigen may allocate temporaries here.
    RowMatD qr_rows_, qr_next_, gram_, l_inverse_;
    Eigen::LLT<Eigen::MatrixXd> llt_;
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig_;
    Eigen::HouseholderQR<ColMat> qr_;
    ColMat thin_q_;
};

} // namespace velora
