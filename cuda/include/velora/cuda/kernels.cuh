#pragma once
/// \file
/// The CUDA kernels behind `cuda_backend` (backend.cuh). Needs nvcc with --extended-lambda
/// and --expt-relaxed-constexpr (the velora::cuda target adds both).
///
/// Three launch shapes cover everything:
///   - `for_each_2d`: an element-wise body f(r, c) over a rows×cols view with any leading
///     dimension; blocks of 32×8 threads, a warp along a row, so reads and writes coalesce.
///   - `column_partials`: deterministic column sums in two stages: a fixed split of the rows
///     into chunks, each block summing 32 columns of one chunk in double, then a fixed-order
///     sum over the chunks. No atomics, so the result does not depend on scheduling.
///   - `project_subtokens`: segmented dot products, a team of L lanes per sub-token (L a power
///     of two), 16-byte vector loads where alignment allows; one warp reads 32/L consecutive
///     sub-tokens, which are contiguous in memory, so every load instruction is coalesced.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include <velora/backend/rules/adam_element.hpp>
#include <velora/backend/rules/row_signs.hpp>
#include <velora/core/rng.hpp>
#include <velora/core/storage.hpp>

namespace velora::cuda::kernels {

using index = long long;

constexpr int kBlockX = 32;   // one warp along a row
constexpr int kBlockY = 8;
constexpr int kThreads = kBlockX * kBlockY;
/// Partial sums of the whole-matrix reduction (sum_of_squares): a fixed number, so the
/// summation order never depends on the device.
constexpr int kReducePartials = 256;
/// Row chunks of the column reductions (at most; fewer when there are few rows).
constexpr int kColumnChunks = 64;

/// Any block shape: the launcher picks 32×8 (a warp along a row) or 256×1 for views of few rows.
template <class F>
__global__ void for_each_2d(index rows, index cols, F f) {
    for (index r = blockIdx.y * static_cast<index>(blockDim.y) + threadIdx.y; r < rows; r += static_cast<index>(gridDim.y) * blockDim.y)
        for (index c = blockIdx.x * static_cast<index>(blockDim.x) + threadIdx.x; c < cols; c += static_cast<index>(gridDim.x) * blockDim.x)
            f(r, c);
}

template <class F>
__global__ void for_each_1d(index n, F f) {
    for (index i = blockIdx.x * static_cast<index>(blockDim.x) + threadIdx.x; i < n; i += static_cast<index>(gridDim.x) * blockDim.x) f(i);
}

/// The device's fused multiply-add and square root for backend/rules/adam_element.hpp.
struct device_ops {
    template <class T>
    __device__ static T fma(T a, T b, T c) { return ::fma(a, b, c); }
    template <class T>
    __device__ static T sqrt(T a) { return ::sqrt(a); }
    // __fmul_rn / __dmul_rn: a product nvcc never contracts into a later add.
    __device__ static float product(float a, float b) { return __fmul_rn(a, b); }
    __device__ static double product(double a, double b) { return __dmul_rn(a, b); }
};

/// partial[chunk · width + c] = Σ_{t in chunk} value(t, c), in double; chunk = blockIdx.y
/// covers rows [chunk · chunk_rows, (chunk + 1) · chunk_rows).
template <class F>
__global__ void column_partials(index rows, index width, index chunk_rows, F value, double* partial) {
    __shared__ double sums[kBlockY][kBlockX + 1];
    const index c = blockIdx.x * static_cast<index>(kBlockX) + threadIdx.x;
    const index first = blockIdx.y * chunk_rows;
    const index last = first + chunk_rows < rows ? first + chunk_rows : rows;
    double acc = 0;
    if (c < width)
        for (index t = first + threadIdx.y; t < last; t += kBlockY) acc += static_cast<double>(value(t, c));
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < width) {
        double total = 0;
        for (int y = 0; y < kBlockY; ++y) total += sums[y][threadIdx.x];
        partial[blockIdx.y * width + c] = total;
    }
}

// Fixed-shape tree sum of kThreads values in shared memory; thread 0 gets the total.
__device__ inline double block_sum(double value, double* scratch) {
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;   // any block shape of kThreads threads
    scratch[tid] = value;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
        if (tid < half) scratch[tid] += scratch[tid + half];
        __syncthreads();
    }
    return scratch[0];
}

/// partial[block] = Σ x[r, c]² over the elements this block's threads own. Launched with
/// kReducePartials blocks of kThreads threads (1-D): the view is read as its rows·cols elements in
/// row-major order, element e belonging to thread e mod (kReducePartials · kThreads). Every
/// shape, an r×n basis or a 1×N row alike, spreads over all blocks, consecutive threads read
/// consecutive columns, and the summation order depends on the shape only, never on the device.
template <class T>
__global__ void sum_of_squares_partials(const T* x, index rows, index cols, index ld, double* partial) {
    __shared__ double scratch[kThreads];
    const index total = rows * cols;
    const index stride = static_cast<index>(gridDim.x) * blockDim.x;
    const index first = blockIdx.x * static_cast<index>(blockDim.x) + threadIdx.x;
    const index step_rows = stride / cols, step_cols = stride - step_rows * cols;
    index r = first / cols, c = first - (first / cols) * cols;
    double acc = 0;
    for (index e = first; e < total; e += stride) {
        const double v = static_cast<double>(x[r * ld + c]);
        acc += v * v;
        r += step_rows;   // (r, c) of e + stride without a division per element
        c += step_cols;
        if (c >= cols) {
            c -= cols;
            ++r;
        }
    }
    const double sum = block_sum(acc, scratch);
    if (threadIdx.x == 0 && threadIdx.y == 0) partial[blockIdx.x] = sum;
}

/// *result = Σ partial[0, n) (one block, fixed order). (A template only so that the header
/// can define it in every translation unit.)
template <class = void>
__global__ void sum_partials(const double* partial, int n, double* result) {
    __shared__ double scratch[kThreads];
    double acc = 0;
    for (int i = threadIdx.y * kBlockX + threadIdx.x; i < n; i += kThreads) acc += partial[i];
    const double total = block_sum(acc, scratch);
    if (threadIdx.x == 0 && threadIdx.y == 0) *result = total;
}

template <class T>
struct vector16;
template <>
struct vector16<float> {
    using type = float4;
    static constexpr int width = 4;
    __device__ static float dot(const float4& a, const float4& b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
};
template <>
struct vector16<double> {
    using type = double2;
    static constexpr int width = 2;
    __device__ static double dot(const double2& a, const double2& b) { return a.x * b.x + a.y * b.y; }
};

/// Z[t, g] = Σ_j X[t, g·s + j] · v[j] (X read as zero at and past column d), converted to U.
/// Each output is computed by a team of `lanes` (a power of two <= 32) consecutive lanes of a
/// warp, each reading V elements at a time (V = 1, or a 16-byte vector when X, v, ld, s and
/// d allow it), then a shuffle reduction inside the team. *bad is set when a result is not
/// finite as stored in U (unless `bad` is null: no report).
template <class T, class U, bool Vectorised>
__global__ void project_subtokens(const T* __restrict__ x, index rows, index d, index ld, const T* __restrict__ v, index s,
                                  U* __restrict__ z, index groups, index ldz, int lanes, int* bad) {
    constexpr int V = Vectorised ? vector16<T>::width : 1;
    const int lane = threadIdx.x % 32;
    const int team = lane / lanes, member = lane % lanes;
    const index teams_per_warp = 32 / lanes;
    const index warp = (blockIdx.x * static_cast<index>(blockDim.x) + threadIdx.x) / 32;
    const index warps = static_cast<index>(gridDim.x) * blockDim.x / 32;
    const index outputs = rows * groups;
    for (index base = warp * teams_per_warp; base < outputs; base += warps * teams_per_warp) {   // uniform per warp
        const index o = base + team;
        T acc = 0;
        index t = 0, g = 0;
        if (o < outputs) {
            t = o / groups;
            g = o - t * groups;
            const T* row = x + t * ld;
            for (index j = static_cast<index>(member) * V; j < s; j += static_cast<index>(lanes) * V) {
                const index col = g * s + j;
                if (col >= d) break;
                if constexpr (Vectorised) {
                    using vec = typename vector16<T>::type;
                    acc += vector16<T>::dot(*reinterpret_cast<const vec*>(row + col), *reinterpret_cast<const vec*>(v + j));
                } else {
                    acc += row[col] * v[j];
                }
            }
        }
        for (int offset = lanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (o < outputs && member == 0) {
            // Tested as stored: a finite dot product can overflow a narrow storage type.
            const U stored = storage_cast<U>::from(acc);
            z[t * ldz + g] = stored;
            if (bad != nullptr && !isfinite(to_arithmetic<T>(stored))) *bad = 1;
        }
    }
}

/// out[i] = gaussian_at(seed, offset + i) for i < n: one thread per Box–Muller pair.
template <class T>
__global__ void fill_gaussian(std::uint64_t seed, std::uint64_t offset, T* out, index n) {
    const std::uint64_t first_pair = offset / 2;
    const std::uint64_t pairs = (offset + static_cast<std::uint64_t>(n) + 1) / 2 - first_pair;
    for (std::uint64_t p = blockIdx.x * static_cast<std::uint64_t>(blockDim.x) + threadIdx.x; p < pairs;
         p += static_cast<std::uint64_t>(gridDim.x) * blockDim.x) {
        const std::uint64_t pair = first_pair + p;
        const gaussian_pair g = gaussian_pair_at(seed, pair);
        const long long even = static_cast<long long>(2 * pair) - static_cast<long long>(offset);   // output index of counter 2·pair
        if (even >= 0 && even < n) out[even] = static_cast<T>(g.even);
        if (even + 1 >= 0 && even + 1 < n) out[even + 1] = static_cast<T>(g.odd);
    }
}

/// Flips each row whose largest-magnitude entry (the first one on ties) is negative: an
/// arg-max per row (a per-thread scan, then a tree over the block), both comparing with the
/// rule every backend uses (velora/backend/rules/row_signs.hpp).
template <class T>
__global__ void canonicalize_row_signs(T* a, index rows, index cols, index ld) {
    __shared__ double best_abs[kThreads];
    __shared__ index best_at[kThreads];
    const int tid = threadIdx.y * kBlockX + threadIdx.x;
    for (index r = blockIdx.x; r < rows; r += gridDim.x) {
        T* row = a + r * ld;
        double mine = -1;
        index at = cols;
        for (index c = tid; c < cols; c += kThreads) {
            const double e = fabs(static_cast<double>(row[c]));
            if (rules::row_sign_pivot_beats(e, c, mine, at)) {   // (c increases, so ties keep the first)
                mine = e;
                at = c;
            }
        }
        best_abs[tid] = mine;
        best_at[tid] = at;
        __syncthreads();
        for (int half = kThreads / 2; half > 0; half /= 2) {
            if (tid < half) {
                const double other = best_abs[tid + half];
                const index other_at = best_at[tid + half];
                if (rules::row_sign_pivot_beats(other, other_at, best_abs[tid], best_at[tid])) {
                    best_abs[tid] = other;
                    best_at[tid] = other_at;
                }
            }
            __syncthreads();
        }
        const bool flip = best_at[0] < cols && rules::row_sign_flips(row[best_at[0]]);
        __syncthreads();   // everyone has read best_at[0] before the next row overwrites it
        if (flip)
            for (index c = tid; c < cols; c += kThreads) row[c] = -row[c];
        __syncthreads();
    }
}

} // namespace velora::cuda::kernels
