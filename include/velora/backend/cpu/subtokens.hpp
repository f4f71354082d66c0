#pragma once
/// \file
/// VeLoRA's sub-token kernels on the CPU: a row of X (length D) is cut into groups of s values
/// (the last one zero-padded); each group is projected onto v, reconstructed from its
/// coefficient, or reduced. Row-parallel loops over Eigen maps, with the AVX-512 projection
/// (subtokens_avx512.hpp) where the build targets it.
#include <Eigen/Core>

#include <cmath>
#include <type_traits>

#include "../../core/storage.hpp"
#include "../../core/view.hpp"
#include "lanes.hpp"
#include "reductions.hpp"
#include "subtokens_avx512.hpp"
#include "threading.hpp"

namespace velora::cpu::subtokens {

template <class T>
using vec_map = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>;
template <class T>
using vec_out = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>;

/// Z[t, g] = Σ_j X[t, g·s + j] · v[j] for g < Z.cols, reading X as zero past its last column
/// (a group made only of padding gives 0), converted to U. Returns false when any value as
/// stored in U is not finite (NaN/Inf in X, or a dot product that overflows T or the narrower
/// U); Z is then written but meaningless.
template <class T, class U>
bool project(int threads, const_matrix_view<T> x, const T* v, index_t s, matrix_view<U> z) {
#if defined(__AVX512F__)
    // float, stored as float, whole 16-lane packets per group: the AVX-512 kernel.
    if constexpr (std::is_same_v<T, float> && std::is_same_v<U, float>) {
        if (s % 16 == 0 && s >= 16 && s <= 16 * avx512::max_packets) return avx512::project_subtokens(threads, x, v, s, z);
    }
#endif
    const index_t d = x.cols;
    const index_t full = d / s;
    const index_t tail = d - full * s;
    if constexpr (std::is_same_v<U, T>) {
        // Common case (G divides D, dense rows): X is a (T·G)×s row-major matrix and Z its
        // product with v, one GEMV per part; the finiteness test runs once over Z.
        if (tail == 0 && full == z.cols && x.contiguous() && z.contiguous() && s > 1) {
            int bad = 0;
            const int parts = fixed_parts(x.rows, x.size());
            parallel_for_parts(threads, parts, [&](int part) {
                const auto [first, last] = part_range(x.rows, parts, part);
                const index_t rows = last - first;
                if (rows <= 0) return;
                using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
                const Eigen::Map<const RowMat> groups(x.row(first), rows * full, s);
                vec_out<T> out(z.row(first), rows * full);
                out.noalias() = groups * vec_map<T>(v, s);
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
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(threads) if (x.size() > parallel_threshold)
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
template <class T, class U>
void expand([[maybe_unused]] int threads, const_matrix_view<U> a, const T* v, index_t s, T scale, matrix_view<T> out) {
    const index_t d = out.cols;
    const index_t full = d / s;
    const index_t tail = d - full * s;
    const vec_map<T> vfull(v, s);
    const vec_map<T> vtail(v, tail);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) if (out.size() > parallel_threshold)
#endif
    for (index_t r = 0; r < out.rows; ++r) {
        const U* coef = a.row(r);
        T* row = out.row(r);
        for (index_t g = 0; g < full; ++g) vec_out<T>(row + g * s, s) = (scale * to_arithmetic<T>(coef[g])) * vfull;
        if (tail) vec_out<T>(row + full * s, tail) = (scale * to_arithmetic<T>(coef[full])) * vtail;
    }
}

/// out[j] = Σ_t Σ_g X[t, g·s + j] (zero padding included): the direction of the sub-token mean.
template <class T>
void sum(int threads, reducer<T>& reduce, const_matrix_view<T> x, index_t s, T* out) {
    const index_t d = x.cols;
    const index_t full = d / s;
    const index_t tail = d - full * s;
    reduce.column_sums(threads, x.rows, s, x.size(), out, [&](index_t t, T* row_acc) {
        const T* row = x.row(t);
        vec_out<T> acc(row_acc, s);
        for (index_t g = 0; g < full; ++g) acc += vec_map<T>(row + g * s, s);
        if (tail) acc.head(tail) += vec_map<T>(row + full * s, tail);
    });
}

/// out[g·s + j] = scale · v[j] · Σ_t dY[t, g·s + j] · Z[t, g]: the VeLoRA weight gradient of a
/// scale-and-shift (SSF) layer y = x ⊙ w + b.
template <class T, class U>
void weighted_column_sums(int threads, reducer<T>& reduce, const_matrix_view<T> dy, const_matrix_view<U> z, const T* v, index_t s, T scale,
                          T* out) {
    const index_t d = dy.cols;
    const index_t full = d / s;
    const index_t tail = d - full * s;
    reduce.column_sums(threads, dy.rows, d, dy.size(), out, [&](index_t t, T* row_acc) {
        const T* row = dy.row(t);
        const U* coef = z.row(t);
        for (index_t g = 0; g < full; ++g) vec_out<T>(row_acc + g * s, s) += to_arithmetic<T>(coef[g]) * vec_map<T>(row + g * s, s);
        if (tail) vec_out<T>(row_acc + full * s, tail) += to_arithmetic<T>(coef[full]) * vec_map<T>(row + full * s, tail);
    });
    const vec_map<T> vfull(v, s);
    for (index_t g = 0; g < full; ++g) vec_out<T>(out + g * s, s).array() *= scale * vfull.array();
    if (tail) vec_out<T>(out + full * s, tail).array() *= scale * vfull.head(tail).array();
}

} // namespace velora::cpu::subtokens
