#pragma once
/// \file
/// `cuda_backend<T>`: the GPU backend, for T = float or double. It satisfies the same
/// concepts as `eigen_backend<T>` (velora::backend and adarank::optimizer_backend), so
/// `velora::compressor`, the layer helpers and `adarank::low_rank_adamw` run unchanged on
/// device memory: every view and pointer handed to it is device memory, except the host
/// sides of copy_to_host/copy_from_host and gram_svd's singular values.
///
/// The host owns the stream, the cuBLAS and cuSOLVER handles (cuda_context) and a block of
/// device scratch (device_workspace; size from workspace_bytes()). All work is queued on that
/// stream. Calls whose result the host needs at once (project_subtokens' finiteness flag,
/// sum_of_squares, gram_svd's singular values, copy_to_host, orthonormalize_rows' Cholesky
/// checks) wait for the stream; everything else returns as soon as it is queued.
///
/// GEMMs are cuBLAS (row-major views are column-major transposes, so no copies); the
/// refresh-time linear algebra is cuSOLVER: CholeskyQR2 in double (DGEMM, potrf, trsm) with
/// a Householder fallback (geqrf + orgqr), and the sketch's SVD from the eigen-decomposition of
/// its k×k Gram matrix in double (syevd on the device, or Eigen on the host: see
/// small_eigensolver). Everything else is the kernels in kernels.cuh.
///
/// Errors: caller mistakes throw std::invalid_argument (as on the CPU), failures of CUDA,
/// cuBLAS or cuSOLVER throw cuda_error carrying a cuda_status with the library's error string;
/// synchronize() returns the status of asynchronous work without throwing.
///
/// Uses the device that is current when it is constructed; not thread-safe (one per host
/// thread, or per stream).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#pragma nv_diag_suppress 20012   // Eigen's defaulted __host__ __device__ members
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#pragma nv_diag_default 20012

#include <velora/backend/rules/adam8_block.hpp>
#include <velora/backend/rules/cholesky_qr2.hpp>
#include <velora/backend/rules/gemm_arguments.hpp>
#include <velora/backend/rules/gram_svd.hpp>
#include <velora/concepts.hpp>
#include <velora/core/error.hpp>
#include <velora/core/storage.hpp>
#include <velora/core/view.hpp>

#include "adam8.cuh"
#include "buffer.hpp"
#include "context.hpp"
#include "determinism.hpp"
#include "error.hpp"
#include "kernels.cuh"
#include "nf4.cuh"

namespace velora::cuda {

/// Where gram_svd solves the k×k symmetric eigenproblem (k = sketch size, ~r + 10).
enum class small_eigensolver : std::uint8_t {
    device = 0,   ///< cuSOLVER syevd on the stream (default: no transfer of the k×k matrix)
    host = 1,     ///< Eigen's SelfAdjointEigenSolver on the host, after copying the Gram matrix
};

template <class T>
class cuda_backend {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "cuda_backend supports float and double");

public:
    using value_type = T;
    template <class U>
    using buffer = device_buffer<U>;

    /// The workspace may be given later (set_workspace), e.g. after sizing it with
    /// workspace_bytes(); calls that need it throw std::invalid_argument until then. Throws
    /// std::invalid_argument for a null handle, a handle set up for non-reproducible or
    /// reduced-precision results (TF32 or another reduced math mode, cuBLAS atomics, cuSOLVER's
    /// non-deterministic mode: see determinism.hpp) or a workspace below min_workspace_bytes;
    /// cuda_error when the device cannot be queried.
    explicit cuda_backend(cuda_context context, device_workspace workspace = {}) : ctx_(context) {
        constexpr const char* fn = "velora::cuda::cuda_backend::cuda_backend";
        detail_require(ctx_.blas != nullptr, fn, "context.blas is null; create a cuBLAS handle (or use owned_context)");
        detail_require(ctx_.solver != nullptr, fn, "context.solver is null; create a cuSOLVER handle (or use owned_context)");
        require_deterministic_handles(ctx_, fn);   // same bits on every run and rank (determinism.hpp)
        int device = 0;
        detail::check(cudaGetDevice(&device), fn, "cudaGetDevice");
        detail::check(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device), fn, "cudaDeviceGetAttribute");
        if (workspace.data != nullptr || workspace.bytes != 0) set_workspace(workspace);
    }

    [[nodiscard]] const cuda_context& context() const noexcept { return ctx_; }

    /// Scratch the backend may use from now on (the host keeps it alive). Throws
    /// std::invalid_argument when it is null or smaller than min_workspace_bytes.
    void set_workspace(device_workspace workspace) {
        constexpr const char* fn = "velora::cuda::cuda_backend::set_workspace";
        detail_require(workspace.data != nullptr && workspace.bytes >= min_workspace_bytes, fn, "the workspace holds ", workspace.bytes,
                       " bytes at ", workspace.data, " but needs at least min_workspace_bytes = ", min_workspace_bytes,
                       " (see workspace_bytes())");
        detail_require(reinterpret_cast<std::uintptr_t>(workspace.data) % 256 == 0, fn, "the workspace must be 256-byte aligned (cudaMalloc memory is)");
        ws_ = workspace;
    }
    [[nodiscard]] device_workspace workspace() const noexcept { return ws_; }

    /// The fixed part of the workspace (flags and reduction partials).
    static constexpr std::size_t min_workspace_bytes = 4096;

    /// Workspace bytes that suffice for every call on matrices of at most `max_cols` columns
    /// (column sums, sub-token sums) and for orthonormalize_rows/gram_svd on k×n blocks with
    /// k <= max_rows and n <= max_cols. For AdaRankGrad: max_rows = the largest sketch (r_max +
    /// oversampling, or min(m, n) on the exact path), max_cols = the largest dimension. Views are
    /// assumed to have leading dimensions <= max_cols (orthonormalize_rows' Householder part
    /// is sized for that; a wider stride may need more and is then reported by the call).
    [[nodiscard]] std::size_t workspace_bytes(index_t max_rows, index_t max_cols) const {
        constexpr const char* fn = "velora::cuda::cuda_backend::workspace_bytes";
        detail_require(max_rows > 0 && max_cols > 0 && max_rows <= max_cols, fn, "needs 0 < max_rows <= max_cols, got ", max_rows, " and ",
                       max_cols);
        return min_workspace_bytes + std::max({column_reduction_bytes(max_cols), cholesky_qr_bytes(max_rows, max_cols, potrf_lwork(max_rows)),
                                               householder_bytes(max_rows, householder_lwork(max_rows, max_cols, max_cols)),
                                               gram_svd_bytes(max_rows, max_cols, syevd_lwork(max_rows))});
    }

    /// Waits for all queued work and returns its status (ok, or the first asynchronous error);
    /// throws nothing of its own (only std::bad_alloc could escape, from the message).
    [[nodiscard]] cuda_status synchronize() {
        const cudaError_t e = cudaStreamSynchronize(ctx_.stream);
        if (e != cudaSuccess) return detail::make_status("velora::cuda::cuda_backend::synchronize", "cudaStreamSynchronize", e);
        return {};
    }

    void set_small_eigensolver(small_eigensolver which) noexcept { eigensolver_ = which; }
    [[nodiscard]] small_eigensolver eigensolver() const noexcept { return eigensolver_; }

    // ---------------------------------------------------------------- memory
    /// Device to host; returns when the data is on the host.
    void copy_to_host(const T* src, T* dst, index_t n) {
        if (n <= 0) return;
        constexpr const char* fn = "velora::cuda::cuda_backend::copy_to_host";
        detail::check(cudaMemcpyAsync(dst, src, bytes_of<T>(n), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
    }
    /// Host to device, ordered on the stream; returns when the copy is complete, so `src` may be
    /// freed or reused at once (the library's callers free or overwrite it right after: a
    /// loaded state's blob, the compressor's host copy of v). CUDA promises no more than
    /// staging for an asynchronous copy from pageable memory, and nothing for pinned memory, so
    /// the stream is synchronised. Used at initialisation, refresh and load time only.
    void copy_from_host(const T* src, T* dst, index_t n) {
        if (n <= 0) return;
        constexpr const char* fn = "velora::cuda::cuda_backend::copy_from_host";
        detail::check(cudaMemcpyAsync(dst, src, bytes_of<T>(n), cudaMemcpyHostToDevice, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
    }
    /// Within device memory.
    template <class U>
    void copy(const U* src, U* dst, index_t n) {
        if (n <= 0) return;
        detail::check(cudaMemcpyAsync(dst, src, bytes_of<U>(n), cudaMemcpyDeviceToDevice, ctx_.stream), "velora::cuda::cuda_backend::copy",
                      "cudaMemcpyAsync");
    }

    /// Raw bytes host to device (a frozen weight's packed storage: velora/quant/kernels.hpp);
    /// complete when it returns, as copy_from_host.
    void copy_bytes_from_host(const void* src, void* dst, std::size_t bytes) {
        if (bytes == 0) return;
        constexpr const char* fn = "velora::cuda::cuda_backend::copy_bytes_from_host";
        detail::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
    }

    /// Raw bytes device to host (8-bit moments saved: adarank/blockwise_moments.hpp); returns
    /// when the data is on the host, as copy_to_host.
    void copy_bytes_to_host(const void* src, void* dst, std::size_t bytes) {
        if (bytes == 0) return;
        constexpr const char* fn = "velora::cuda::cuda_backend::copy_bytes_to_host";
        detail::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
    }

    // ---------------------------------------------------------------- frozen weights
    /// out = rows first_row .. first_row + out.rows of the NF4 weight `w` (its pointers device
    /// memory), the same bits as the CPU backend (nf4.cuh). Queued only.
    void dequantize_nf4(const nf4_blocks& w, index_t first_row, matrix_view<T> out) {
        constexpr const char* fn = "velora::cuda::cuda_backend::dequantize_nf4";
        detail_require(out.cols == w.cols && first_row >= 0 && out.rows >= 0 && first_row <= w.rows && out.rows <= w.rows - first_row, fn,
                       "rows [", first_row, ", ", first_row, " + ", out.rows, ") x ", out.cols, " columns are not within the ", w.rows, "x",
                       w.cols, " weight");
        const index_t bytes = out.rows * (w.cols / 2);
        if (bytes == 0) return;
        kernels::dequantize_nf4<T><<<grid_for((bytes + kernels::kThreads - 1) / kernels::kThreads), kernels::kThreads, 0, ctx_.stream>>>(
            w, first_row, out.rows, out.data, out.ld);
        check_launch(fn);
    }

    // ---------------------------------------------------------------- GEMM
    /// C = alpha · op(A) · op(B) + beta · C (row-major views), by cuBLAS. beta = 0 ignores C.
    void gemm(op op_a, op op_b, T alpha, const_matrix_view<T> a, const_matrix_view<T> b, T beta, matrix_view<T> c) {
        constexpr const char* fn = "velora::cuda::cuda_backend::gemm";
        const auto [m, n, k] = rules::check_gemm_arguments<T>(fn, op_a, op_b, a, b, c);   // shapes, inner dimensions, aliasing
        require_int(fn, m, n, k, a.ld, b.ld, c.ld);
        gemm_unchecked(fn, op_a, op_b, alpha, a, b, beta, c, m, n, k);
    }

    // ---------------------------------------------------------------- sub-token kernels
    /// Z[t, g] = Σ_j X[t, g·s + j] · v[j], X read as zero past its last column, converted to U.
    /// Returns false when a value as stored in U is not finite. Waits for the result (a round
    /// trip to the host: use the skip_finite_check overload where nobody reads it).
    template <class U>
    bool project_subtokens(const_matrix_view<T> x, const T* v, index_t s, matrix_view<U> z) {
        constexpr const char* fn = "velora::cuda::cuda_backend::project_subtokens";
        require_workspace(fn, 0);
        int* bad = flag();
        detail::check(cudaMemsetAsync(bad, 0, sizeof(int), ctx_.stream), fn, "cudaMemsetAsync");
        launch_project_subtokens(fn, x, v, s, z, bad);
        int host_bad = 0;
        detail::check(cudaMemcpyAsync(&host_bad, bad, sizeof(int), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
        return host_bad == 0;
    }
    /// The same Z without the finiteness report: only queued, no flag, no synchronisation (a
    /// factored gradient's products, whose finiteness the optimizer checks on its own).
    template <class U>
    void project_subtokens(const_matrix_view<T> x, const T* v, index_t s, matrix_view<U> z, skip_finite_check_t) {
        launch_project_subtokens("velora::cuda::cuda_backend::project_subtokens", x, v, s, z, nullptr);
    }

    /// out[r, g·s + j] = scale · A[r, g] · v[j] for every column g·s + j < out.cols.
    template <class U>
    void expand_subtokens(const_matrix_view<U> a, const T* v, index_t s, T scale, matrix_view<T> out) {
        const U* ad = a.data;
        const index_t lda = a.ld;
        T* od = out.data;
        const index_t ldo = out.ld;
        for_each_2d("velora::cuda::cuda_backend::expand_subtokens", out.rows, out.cols, [=] __device__(kernels::index r, kernels::index c) {
            const kernels::index g = c / s;
            od[r * ldo + c] = scale * to_arithmetic<T>(ad[r * lda + g]) * v[c - g * s];
        });
    }

    /// out[j] = Σ_t Σ_g X[t, g·s + j] (zero padding included).
    void sum_subtokens(const_matrix_view<T> x, index_t s, T* out) {
        constexpr const char* fn = "velora::cuda::cuda_backend::sum_subtokens";
        const T* xd = x.data;
        const index_t ld = x.ld;
        const index_t d = x.cols;
        const double* partial = column_reduce(fn, x.rows, d, [=] __device__(kernels::index t, kernels::index c) { return xd[t * ld + c]; });
        const index_t chunks = chunk_count(x.rows);
        for_each_1d(fn, s, [=] __device__(kernels::index j) {
            double sum = 0;
            for (kernels::index k = 0; k < chunks; ++k)
                for (kernels::index c = j; c < d; c += s) sum += partial[k * d + c];
            out[j] = static_cast<T>(sum);
        });
    }

    /// out[g·s + j] = scale · v[j] · Σ_t dY[t, g·s + j] · Z[t, g] (the SSF weight gradient).
    template <class U>
    void weighted_subtoken_column_sums(const_matrix_view<T> dy, const_matrix_view<U> z, const T* v, index_t s, T scale, T* out) {
        constexpr const char* fn = "velora::cuda::cuda_backend::weighted_subtoken_column_sums";
        const T* yd = dy.data;
        const index_t ldy = dy.ld;
        const U* zd = z.data;
        const index_t ldz = z.ld;
        const index_t d = dy.cols;
        const double* partial = column_reduce(fn, dy.rows, d, [=] __device__(kernels::index t, kernels::index c) {
            return static_cast<double>(yd[t * ldy + c]) * static_cast<double>(to_arithmetic<T>(zd[t * ldz + c / s]));
        });
        finish_column_sums(fn, dy.rows, d, partial, [=] __device__(kernels::index c, double sum) {
            out[c] = static_cast<T>(sum * static_cast<double>(scale) * static_cast<double>(v[c % s]));
        });
    }

    /// out[j] = Σ_t X[t, j].
    void column_sums(const_matrix_view<T> x, T* out) {
        constexpr const char* fn = "velora::cuda::cuda_backend::column_sums";
        const T* xd = x.data;
        const index_t ld = x.ld;
        const index_t d = x.cols;
        const double* partial = column_reduce(fn, x.rows, d, [=] __device__(kernels::index t, kernels::index c) { return xd[t * ld + c]; });
        finish_column_sums(fn, x.rows, d, partial, [=] __device__(kernels::index c, double sum) { out[c] = static_cast<T>(sum); });
    }

    /// out[t, j] = in[t, j] · w[j] + b[j]; null w means 1, null b means 0; out may alias in.
    void scale_shift_columns(const_matrix_view<T> in, const T* w, const T* b, matrix_view<T> out) {
        const T* id = in.data;
        const index_t ldi = in.ld;
        T* od = out.data;
        const index_t ldo = out.ld;
        for_each_2d("velora::cuda::cuda_backend::scale_shift_columns", out.rows, out.cols, [=] __device__(kernels::index r, kernels::index c) {
            T value = id[r * ldi + c];
            if (w) value *= w[c];
            if (b) value += b[c];
            od[r * ldo + c] = value;
        });
    }

    /// out = in, element-wise conversion from a storage type.
    template <class U>
    void convert(const_matrix_view<U> in, matrix_view<T> out) {
        const U* id = in.data;
        const index_t ldi = in.ld;
        T* od = out.data;
        const index_t ldo = out.ld;
        for_each_2d("velora::cuda::cuda_backend::convert", out.rows, out.cols,
                    [=] __device__(kernels::index r, kernels::index c) { od[r * ldo + c] = to_arithmetic<T>(id[r * ldi + c]); });
    }

    /// out[i] = gaussian_at(seed, offset + i): the same stream as every other backend.
    void fill_gaussian(std::uint64_t seed, std::uint64_t offset, T* out, index_t n) {
        if (n <= 0) return;
        const auto pairs = static_cast<index_t>((offset + static_cast<std::uint64_t>(n) + 1) / 2 - offset / 2);
        kernels::fill_gaussian<T><<<grid_for((pairs + kernels::kThreads - 1) / kernels::kThreads), kernels::kThreads, 0, ctx_.stream>>>(
            seed, offset, out, n);
        check_launch("velora::cuda::cuda_backend::fill_gaussian");
    }

    // ---------------------------------------------------------------- optimizer kernels
    /// Rows of a (k×c, k <= c) made orthonormal in place, same row space: CholeskyQR2 in
    /// double (DGEMM Gram, potrf, trsm), its passes and acceptance tests those of every backend
    /// (velora/backend/rules/cholesky_qr2.hpp), with Householder QR of aᵀ (geqrf + orgqr, in T)
    /// when a pass refuses or the Cholesky factorisation breaks down.
    void orthonormalize_rows(matrix_view<T> a) {
        constexpr const char* fn = "velora::cuda::cuda_backend::orthonormalize_rows";
        check_view(a, fn, "a");
        detail_require(a.rows <= a.cols, fn, "argument 'a' is ", a.rows, "x", a.cols, "; it needs rows <= cols");
        const index_t k = a.rows, c = a.cols;
        require_int(fn, k, c, a.ld);
        const int lwork = potrf_lwork(k), householder_work = householder_lwork(k, c, a.ld);
        require_workspace(fn, std::max(cholesky_qr_bytes(k, c, lwork), householder_bytes(k, householder_work)));
        double* xd = big<double>(0);                                       // k×c row-major = c×k column-major
        double* gram = big<double>(align256(bytes_of<double>(k * c)));      // k×k
        double* work = big<double>(align256(bytes_of<double>(k * c)) + align256(bytes_of<double>(k * k)));
        int* info = info_flag();
        {
            const T* src = a.data;
            const index_t ld = a.ld;
            for_each_2d(fn, k, c, [=] __device__(kernels::index r, kernels::index j) { xd[r * c + j] = static_cast<double>(src[r * ld + j]); });
        }
        std::vector<double>& diag = host_scratch_;
        const double one = 1, zero = 0;
        const bool ok = rules::cholesky_qr2(
            [&] {   // Gram matrix of the current rows, potrf, and L's diagonal on the host
                bind_blas(fn);
                detail::check(cublasDgemm(ctx_.blas, CUBLAS_OP_T, CUBLAS_OP_N, int(k), int(k), int(c), &one, xd, int(c), xd, int(c), &zero, gram, int(k)),
                              fn, "cublasDgemm (Gram matrix)");
                bind_solver(fn);
                detail::check(cusolverDnDpotrf(ctx_.solver, CUBLAS_FILL_MODE_LOWER, int(k), gram, int(k), work, lwork, info), fn, "cusolverDnDpotrf");
                int host_info = 0;
                diag.resize(static_cast<std::size_t>(k));
                detail::check(cudaMemcpy2DAsync(diag.data(), sizeof(double), gram, (k + 1) * sizeof(double), sizeof(double), k,
                                                cudaMemcpyDeviceToHost, ctx_.stream),
                              fn, "cudaMemcpy2DAsync (Cholesky diagonal)");
                detail::check(cudaMemcpyAsync(&host_info, info, sizeof(int), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync (potrf info)");
                detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
                // info > 0: the leading minor of that order is not positive definite (a breakdown:
                // Householder takes over); info < 0: potrf refused its argument -info, a bug to
                // report, never a reason to fall back.
                if (host_info < 0)
                    throw cuda_error({cuda_library::cusolver, static_cast<int>(CUSOLVER_STATUS_INVALID_VALUE),
                                      std::string(fn) + ": cusolverDnDpotrf refused argument " + std::to_string(-host_info) + " (info = " +
                                          std::to_string(host_info) + ")"});
                if (host_info != 0) return rules::cholesky_diagonal{};
                return rules::cholesky_diagonal{diag.data(), k, 1};
            },
            [&] {   // X ← X·L⁻ᵀ, i.e. the rows of a ← L⁻¹·a
                bind_blas(fn);
                detail::check(cublasDtrsm(ctx_.blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T, CUBLAS_DIAG_NON_UNIT, int(c), int(k), &one,
                                          gram, int(k), xd, int(c)),
                              fn, "cublasDtrsm");
            });
        if (ok) {
            T* dst = a.data;
            const index_t ld = a.ld;
            for_each_2d(fn, k, c, [=] __device__(kernels::index r, kernels::index j) { dst[r * ld + j] = static_cast<T>(xd[r * c + j]); });
            return;
        }
        ++householder_fallbacks_;
        householder_rows(fn, a, householder_work);
    }

    /// How many orthonormalize_rows calls have fallen back from CholeskyQR2 to Householder QR
    /// (rank-deficient or very ill-conditioned blocks) since construction.
    [[nodiscard]] std::size_t householder_fallbacks() const noexcept { return householder_fallbacks_; }

    /// Singular values (descending, host memory, double) and left singular vectors (the columns
    /// of u, k×k) of a wide c (k×n, k <= n), from the eigen-decomposition of c·cᵀ in double,
    /// assembled as on every backend (velora/backend/rules/gram_svd.hpp). Waits for the result.
    void gram_svd(const_matrix_view<T> c, matrix_view<T> u, double* sigma) {
        constexpr const char* fn = "velora::cuda::cuda_backend::gram_svd";
        check_view(c, fn, "c");
        detail_require(c.rows <= c.cols, fn, "argument 'c' is ", c.rows, "x", c.cols, "; it needs rows <= cols");
        check_shape(u, c.rows, c.rows, fn, "u");
        detail_require(sigma != nullptr, fn, "argument 'sigma' is null");
        const index_t k = c.rows, n = c.cols;
        require_int(fn, k, n, c.ld, u.ld);
        const int lwork = syevd_lwork(k);
        require_workspace(fn, gram_svd_bytes(k, n, lwork));
        const std::size_t gram_at = align256(bytes_of<double>(k * n)), w_at = gram_at + align256(bytes_of<double>(k * k));
        double* cd = big<double>(0);           // k×n row-major = n×k column-major
        double* gram = big<double>(gram_at);   // k×k
        double* w = big<double>(w_at);         // eigenvalues, ascending
        double* work = big<double>(w_at + align256(bytes_of<double>(k)));
        {
            const T* src = c.data;
            const index_t ld = c.ld;
            for_each_2d(fn, k, n, [=] __device__(kernels::index r, kernels::index j) { cd[r * n + j] = static_cast<double>(src[r * ld + j]); });
        }
        const double one = 1, zero = 0;
        bind_blas(fn);
        detail::check(cublasDgemm(ctx_.blas, CUBLAS_OP_T, CUBLAS_OP_N, int(k), int(k), int(n), &one, cd, int(n), cd, int(n), &zero, gram, int(k)), fn,
                      "cublasDgemm (Gram matrix)");
        std::vector<double>& values = host_scratch_;
        values.resize(static_cast<std::size_t>(k));
        T* ud = u.data;
        const index_t ldu = u.ld;
        if (eigensolver_ == small_eigensolver::device) {
            bind_solver(fn);
            detail::check(cusolverDnDsyevd(ctx_.solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, int(k), gram, int(k), w, work, lwork,
                                           info_flag()),
                          fn, "cusolverDnDsyevd");
            // u(j, i) = entry j of eigenvector rules::gram_svd_source(k, i) (a column of the
            // column-major result).
            for_each_2d(fn, k, k, [=] __device__(kernels::index j, kernels::index i) {
                ud[j * ldu + i] = static_cast<T>(gram[rules::gram_svd_source(k, i) * k + j]);
            });
            detail::check(cudaMemcpyAsync(values.data(), w, bytes_of<double>(k), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
            int host_info = 0;
            detail::check(cudaMemcpyAsync(&host_info, info_flag(), sizeof(int), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
            detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
            if (host_info != 0)
                throw cuda_error({cuda_library::cusolver, static_cast<int>(CUSOLVER_STATUS_EXECUTION_FAILED),
                                  std::string(fn) + ": cusolverDnDsyevd failed: info = " + std::to_string(host_info) +
                                      (host_info > 0 ? " (the eigensolver did not converge)" : " (invalid argument)")});
        } else {
            host_gram_.resize(k, k);
            detail::check(cudaMemcpyAsync(host_gram_.data(), gram, bytes_of<double>(k * k), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
            detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
            host_eig_.compute(host_gram_);   // symmetric: row- or column-major is the same matrix
            host_u_.resize(static_cast<std::size_t>(k * k));
            std::copy_n(host_eig_.eigenvalues().data(), k, values.begin());
            rules::gram_svd_left_vectors(([&](index_t j, index_t e) { return host_eig_.eigenvectors()(j, e); }),
                                         matrix_view<T>(host_u_.data(), k, k, k));
            detail::check(cudaMemcpy2DAsync(ud, ldu * sizeof(T), host_u_.data(), k * sizeof(T), k * sizeof(T), k, cudaMemcpyHostToDevice, ctx_.stream),
                          fn, "cudaMemcpy2DAsync");
        }
        rules::gram_svd_singular_values(k, values.data(), sigma);   // σ descending from λ ascending
    }

    /// Σ a[i, j]² in double, in a fixed summation order. Waits for the result.
    double sum_of_squares(const_matrix_view<T> a) {
        constexpr const char* fn = "velora::cuda::cuda_backend::sum_of_squares";
        if (a.empty()) return 0;
        require_workspace(fn, 0);
        double* partial = small<double>(kPartialsOffset);
        double* result = partial + kernels::kReducePartials;
        kernels::sum_of_squares_partials<T><<<kernels::kReducePartials, kernels::kThreads, 0, ctx_.stream>>>(a.data, a.rows, a.cols, a.ld, partial);
        check_launch(fn);
        kernels::sum_partials<<<1, dim3(kernels::kBlockX, kernels::kBlockY), 0, ctx_.stream>>>(partial, kernels::kReducePartials, result);
        check_launch(fn);
        double host = 0;
        detail::check(cudaMemcpyAsync(&host, result, sizeof(double), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
        return host;
    }

    /// m = β₁m + (1−β₁)g, v = β₂v + (1−β₂)g², n = m / (√v + ε); n may alias g. The arithmetic
    /// is backend/rules/adam_element.hpp's, as on the CPU.
    void adam_moments(const_matrix_view<T> g, matrix_view<T> m, matrix_view<T> v, T beta1, T beta2, T eps, matrix_view<T> n) {
        const T* gd = g.data;
        T *md = m.data, *vd = v.data, *nd = n.data;
        const index_t ldg = g.ld, ldm = m.ld, ldv = v.ld, ldn = n.ld;
        const T c1 = T(1) - beta1, c2 = T(1) - beta2;
        for_each_2d("velora::cuda::cuda_backend::adam_moments", n.rows, n.cols, [=] __device__(kernels::index r, kernels::index c) {
            T mm = md[r * ldm + c], vv = vd[r * ldv + c];
            const T step = rules::adam_moments_element<kernels::device_ops>(gd[r * ldg + c], mm, vv, c1, c2, eps);
            md[r * ldm + c] = mm;
            vd[r * ldv + c] = vv;
            nd[r * ldn + c] = step;
        });
    }

    /// Dense AdamW in one pass over w, g, m and v, in the order of operations `t.order` names
    /// (backend/rules/adam_element.hpp, as on the CPU).
    void adamw_update(matrix_view<T> w, const_matrix_view<T> g, matrix_view<T> m, matrix_view<T> v, const rules::adamw_terms<T>& t) {
        const T* gd = g.data;
        T *wd = w.data, *md = m.data, *vd = v.data;
        const index_t ldw = w.ld, ldg = g.ld, ldm = m.ld, ldv = v.ld;
        const rules::adamw_terms<T> terms = t;
        const T minus_step = -t.step;
        const bool decays = t.decay != T(1);
        if (t.order == rules::adamw_order::torch) {
            for_each_2d("velora::cuda::cuda_backend::adamw_update", w.rows, w.cols, [=] __device__(kernels::index r, kernels::index c) {
                T mm = md[r * ldm + c], vv = vd[r * ldv + c];
                wd[r * ldw + c] = rules::torch_adamw_element<kernels::device_ops>(gd[r * ldg + c], mm, vv, wd[r * ldw + c], terms.beta1, terms.c1,
                                                                                  terms.beta2, terms.c2, terms.bias2_sqrt, terms.eps, minus_step,
                                                                                  terms.decay, decays);
                md[r * ldm + c] = mm;
                vd[r * ldv + c] = vv;
            });
            return;
        }
        for_each_2d("velora::cuda::cuda_backend::adamw_update", w.rows, w.cols, [=] __device__(kernels::index r, kernels::index c) {
            T mm = md[r * ldm + c], vv = vd[r * ldv + c];
            const T normalised = rules::adam_moments_element<kernels::device_ops>(gd[r * ldg + c], mm, vv, terms.c1, terms.c2, terms.eps);
            md[r * ldm + c] = mm;
            vd[r * ldv + c] = vv;
            wd[r * ldw + c] = rules::galore_weight_element<kernels::device_ops>(wd[r * ldw + c], normalised, minus_step, terms.decay, decays);
        });
    }

    /// Adam(W) on 8-bit blockwise moments in device memory (float only; layout and arithmetic:
    /// backend/rules/adam8_block.hpp, kernels: adam8.cuh), contiguous g and out (w, or n for
    /// adam_row_kind::moments; they may be the same array), every block decoded, updated and
    /// encoded in one pass: the CPU backend's bits. False when some result was not finite (what
    /// was written must then be discarded; that block's bytes and absmax are unchanged). Waits for
    /// the stream. Throws std::invalid_argument for a block outside [1, rules::adam8_max_block].
    bool adam8_update(rules::adam_row_kind kind, const T* g, T* out, const rules::adam8_tensor_state& s, const rules::adamw_terms<T>& terms)
        requires std::same_as<T, float>
    {
        constexpr const char* fn = "velora::cuda::cuda_backend::adam8_update";
        require_state_block(fn, s.block);
        if (s.count <= 0) return true;
        require_workspace(fn, 0);
        const rules::dynamic_code* codes = adam8_codes(fn);
        int* bad = flag();
        detail::check(cudaMemsetAsync(bad, 0, sizeof(int), ctx_.stream), fn, "cudaMemsetAsync");
        const auto blocks = static_cast<unsigned>(s.blocks());
        const std::size_t shared = 2 * static_cast<std::size_t>(s.block) * sizeof(float);
        switch (kind) {
        case rules::adam_row_kind::moments:
            kernels::adam8_update<rules::adam_row_kind::moments><<<blocks, kernels::kAdam8Threads, shared, ctx_.stream>>>(codes, g, out, s, terms, bad);
            break;
        case rules::adam_row_kind::galore_weight:
            kernels::adam8_update<rules::adam_row_kind::galore_weight><<<blocks, kernels::kAdam8Threads, shared, ctx_.stream>>>(codes, g, out, s, terms, bad);
            break;
        case rules::adam_row_kind::torch_weight:
            kernels::adam8_update<rules::adam_row_kind::torch_weight><<<blocks, kernels::kAdam8Threads, shared, ctx_.stream>>>(codes, g, out, s, terms, bad);
            break;
        }
        check_launch(fn);
        int host_bad = 0;
        detail::check(cudaMemcpyAsync(&host_bad, bad, sizeof(int), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
        return host_bad == 0;
    }

    /// out[i] = the value of byte q[i] in its block (i / block) of absmax `absmax`, in the signed
    /// (m) or unsigned (v) code, for i < count; device memory. What moment transport at a refresh
    /// works on (dynamic_code::decode, the CPU's bits).
    void adam8_decode(rules::code_sign sign, const std::uint8_t* q, const float* absmax, index_t count, index_t block, T* out)
        requires std::same_as<T, float>
    {
        constexpr const char* fn = "velora::cuda::cuda_backend::adam8_decode";
        require_state_block(fn, block);
        const rules::dynamic_code* code = adam8_codes(fn) + (sign == rules::code_sign::signed_code ? 0 : 1);
        for_each_1d(fn, count, [=] __device__(kernels::index i) { out[i] = code->decode(q[i], absmax[i / block]); });
    }

    /// x (count finite floats, device memory) encoded in blocks of `block`: absmax[b] = the
    /// block's largest |x| (0 below the smallest normal float), q the bytes; the CPU's bits
    /// (rules::adam8::encode_block).
    void adam8_encode(rules::code_sign sign, const T* x, index_t count, index_t block, std::uint8_t* q, float* absmax)
        requires std::same_as<T, float>
    {
        constexpr const char* fn = "velora::cuda::cuda_backend::adam8_encode";
        require_state_block(fn, block);
        if (count <= 0) return;
        const rules::dynamic_code* code = adam8_codes(fn) + (sign == rules::code_sign::signed_code ? 0 : 1);
        kernels::adam8_encode<<<static_cast<unsigned>((count + block - 1) / block), kernels::kAdam8Threads, 0, ctx_.stream>>>(code, x, count, block, q,
                                                                                                                          absmax);
        check_launch(fn);
    }

    /// out = in ∘ in.
    void square(const_matrix_view<T> in, matrix_view<T> out) {
        const T* id = in.data;
        T* od = out.data;
        const index_t ldi = in.ld, ldo = out.ld;
        for_each_2d("velora::cuda::cuda_backend::square", out.rows, out.cols, [=] __device__(kernels::index r, kernels::index c) {
            const T e = id[r * ldi + c];
            od[r * ldo + c] = e * e;
        });
    }

    /// a = max(a, 0).
    void clamp_nonnegative(matrix_view<T> a) {
        T* d = a.data;
        const index_t ld = a.ld;
        for_each_2d("velora::cuda::cuda_backend::clamp_nonnegative", a.rows, a.cols, [=] __device__(kernels::index r, kernels::index c) {
            if (d[r * ld + c] < T(0)) d[r * ld + c] = T(0);
        });
    }

    /// a *= factor.
    void scale(matrix_view<T> a, T factor) {
        T* d = a.data;
        const index_t ld = a.ld;
        for_each_2d("velora::cuda::cuda_backend::scale", a.rows, a.cols, [=] __device__(kernels::index r, kernels::index c) { d[r * ld + c] *= factor; });
    }

    /// a[i, j] = value.
    void fill(matrix_view<T> a, T value) {
        T* d = a.data;
        const index_t ld = a.ld;
        for_each_2d("velora::cuda::cuda_backend::fill", a.rows, a.cols, [=] __device__(kernels::index r, kernels::index c) { d[r * ld + c] = value; });
    }

    /// a = the (possibly rectangular) identity.
    void set_identity(matrix_view<T> a) {
        T* d = a.data;
        const index_t ld = a.ld;
        for_each_2d("velora::cuda::cuda_backend::set_identity", a.rows, a.cols,
                    [=] __device__(kernels::index r, kernels::index c) { d[r * ld + c] = r == c ? T(1) : T(0); });
    }

    /// Flips the sign of every row whose largest-magnitude entry (the first on ties) is negative
    /// (the rule: velora/backend/rules/row_signs.hpp).
    void canonicalize_row_signs(matrix_view<T> a) {
        if (a.empty()) return;
        kernels::canonicalize_row_signs<T><<<static_cast<unsigned>(std::min<index_t>(a.rows, 65535)), dim3(kernels::kBlockX, kernels::kBlockY), 0,
                                              ctx_.stream>>>(a.data, a.rows, a.cols, a.ld);
        check_launch("velora::cuda::cuda_backend::canonicalize_row_signs");
    }

    // ---------------------------------------------------------------- internals
    // (Public only because nvcc's extended device lambdas may not be defined in private
    // members; not part of the interface.)

    /// f(r, c) for every element of a rows×cols block, on the stream. Blocks of 32×8 threads
    /// (a warp along a row); a block of fewer than 8 rows gets blocks of 256×1 instead, so that
    /// a 1×N view keeps every thread busy.
    template <class F>
    void for_each_2d(const char* fn, index_t rows, index_t cols, F f) {
        if (rows <= 0 || cols <= 0) return;
        const index_t bx = rows < kernels::kBlockY ? kernels::kThreads : kernels::kBlockX;
        const index_t by = kernels::kThreads / bx;
        const auto gx = static_cast<unsigned>(std::min<index_t>((cols + bx - 1) / bx, 1024));
        const auto gy = static_cast<unsigned>(std::min<index_t>((rows + by - 1) / by, 65535));
        kernels::for_each_2d<<<dim3(gx, gy), dim3(unsigned(bx), unsigned(by)), 0, ctx_.stream>>>(rows, cols, f);
        check_launch(fn);
    }
    template <class F>
    void for_each_1d(const char* fn, index_t n, F f) {
        if (n <= 0) return;
        kernels::for_each_1d<<<grid_for((n + kernels::kThreads - 1) / kernels::kThreads), kernels::kThreads, 0, ctx_.stream>>>(n, f);
        check_launch(fn);
    }

    /// Column partial sums of value(t, c) over rows×width into the workspace (chunk_count(rows)
    /// chunks of width doubles each); returns them.
    template <class F>
    const double* column_reduce(const char* fn, index_t rows, index_t width, F value) {
        require_workspace(fn, column_reduction_bytes(width));
        double* partial = big<double>(0);
        if (width <= 0) return partial;   // nothing to sum; the finishing loops read nothing
        const index_t chunks = chunk_count(rows);
        const index_t chunk_rows = (rows + chunks - 1) / chunks;
        const dim3 grid(static_cast<unsigned>((width + kernels::kBlockX - 1) / kernels::kBlockX), static_cast<unsigned>(chunks));
        kernels::column_partials<<<grid, dim3(kernels::kBlockX, kernels::kBlockY), 0, ctx_.stream>>>(rows, width, chunk_rows, value, partial);
        check_launch(fn);
        return partial;
    }

    /// The tail of a column reduction: for each column c, the sum of its chunk partials (from
    /// column_reduce, in chunk order: the same bits at any launch) handed to write(c, sum).
    template <class Write>
    void finish_column_sums(const char* fn, index_t rows, index_t width, const double* partial, Write write) {
        const index_t chunks = chunk_count(rows);
        for_each_1d(fn, width, [=] __device__(kernels::index c) {
            double sum = 0;
            for (kernels::index k = 0; k < chunks; ++k) sum += partial[k * width + c];
            write(c, sum);
        });
    }

    /// Queues the projection kernel; `bad` (device memory or null) is set when a stored value is
    /// not finite.
    template <class U>
    void launch_project_subtokens(const char* fn, const_matrix_view<T> x, const T* v, index_t s, matrix_view<U> z, int* bad) {
        constexpr int V = kernels::vector16<T>::width;
        const bool vectorised = aligned16(x.data) && aligned16(v) && x.ld % V == 0 && s % V == 0 && x.cols % V == 0;
        const index_t per_team = vectorised ? s / V : s;   // loads per sub-token
        int lanes = 1;
        while (lanes < 32 && lanes < per_team) lanes *= 2;
        const index_t warps_needed = (x.rows * z.cols + (32 / lanes) - 1) / (32 / lanes);
        const unsigned blocks = grid_for((warps_needed * 32 + kernels::kThreads - 1) / kernels::kThreads);
        if (vectorised)
            kernels::project_subtokens<T, U, true><<<blocks, kernels::kThreads, 0, ctx_.stream>>>(x.data, x.rows, x.cols, x.ld, v, s, z.data,
                                                                                                 z.cols, z.ld, lanes, bad);
        else
            kernels::project_subtokens<T, U, false><<<blocks, kernels::kThreads, 0, ctx_.stream>>>(x.data, x.rows, x.cols, x.ld, v, s, z.data,
                                                                                                  z.cols, z.ld, lanes, bad);
        check_launch(fn);
    }

private:
    template <class... Parts>
    static void detail_require(bool ok, const char* fn, const Parts&... parts) {
        velora::detail::require(ok, fn, parts...);
    }

    template <class U>
    static std::size_t bytes_of(index_t n) noexcept { return static_cast<std::size_t>(n) * sizeof(U); }
    static constexpr std::size_t align256(std::size_t b) noexcept { return (b + 255) / 256 * 256; }
    static bool aligned16(const void* p) noexcept { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

    template <class... I>
    static void require_int(const char* fn, I... values) {
        (detail_require(values <= std::numeric_limits<int>::max(), fn, "a dimension or leading dimension of ", values,
                        " exceeds cuBLAS/cuSOLVER's int range"),
         ...);
    }

    static index_t chunk_count(index_t rows) noexcept { return std::clamp<index_t>((rows + 63) / 64, 1, kernels::kColumnChunks); }

    // Workspace layout: [0, min_workspace_bytes) holds the flags and the sum_of_squares
    // partials; the rest ("big") is reused by one operation at a time, in stream order.
    static constexpr std::size_t kFlagOffset = 0;       // int: project_subtokens' finiteness
    static constexpr std::size_t kInfoOffset = 64;      // int: cuSOLVER's info
    static constexpr std::size_t kSecondInfoOffset = 128;   // int: a second call's info (orgqr after geqrf)
    static constexpr std::size_t kPartialsOffset = 256; // kReducePartials + 1 doubles
    static_assert(kPartialsOffset + (kernels::kReducePartials + 1) * sizeof(double) <= min_workspace_bytes);

    static std::size_t column_reduction_bytes(index_t width) noexcept {
        return align256(bytes_of<double>(kernels::kColumnChunks * width));
    }
    // Workspace of each refresh operation, given cuSOLVER's work size (queried once per call).
    static std::size_t cholesky_qr_bytes(index_t k, index_t c, int lwork) noexcept {
        return align256(bytes_of<double>(k * c)) + align256(bytes_of<double>(k * k)) + align256(bytes_of<double>(lwork));
    }
    static std::size_t householder_bytes(index_t k, int lwork) noexcept { return align256(bytes_of<T>(k)) + align256(bytes_of<T>(lwork)); }
    static std::size_t gram_svd_bytes(index_t k, index_t n, int lwork) noexcept {
        return align256(bytes_of<double>(k * n)) + align256(bytes_of<double>(k * k)) + align256(bytes_of<double>(k)) +
               align256(bytes_of<double>(lwork));
    }

    // cuSOLVER's work sizes; the queries read only the shapes (any non-null pointer serves).
    int potrf_lwork(index_t k) const {
        int lwork = 0;
        detail::check(cusolverDnDpotrf_bufferSize(ctx_.solver, CUBLAS_FILL_MODE_LOWER, int(k), dummy<double>(), int(k), &lwork),
                      "velora::cuda::cuda_backend", "cusolverDnDpotrf_bufferSize");
        return lwork;
    }
    int syevd_lwork(index_t k) const {
        int lwork = 0;
        detail::check(cusolverDnDsyevd_bufferSize(ctx_.solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, int(k), dummy<double>(), int(k),
                                                  dummy<double>(), &lwork),
                      "velora::cuda::cuda_backend", "cusolverDnDsyevd_bufferSize");
        return lwork;
    }
    int householder_lwork(index_t k, index_t c, index_t ld) const {
        int geqrf = 0, orgqr = 0;
        if constexpr (std::is_same_v<T, float>) {
            detail::check(cusolverDnSgeqrf_bufferSize(ctx_.solver, int(c), int(k), dummy<float>(), int(ld), &geqrf), "velora::cuda::cuda_backend",
                          "cusolverDnSgeqrf_bufferSize");
            detail::check(cusolverDnSorgqr_bufferSize(ctx_.solver, int(c), int(k), int(k), dummy<float>(), int(ld), dummy<float>(), &orgqr),
                          "velora::cuda::cuda_backend", "cusolverDnSorgqr_bufferSize");
        } else {
            detail::check(cusolverDnDgeqrf_bufferSize(ctx_.solver, int(c), int(k), dummy<double>(), int(ld), &geqrf), "velora::cuda::cuda_backend",
                          "cusolverDnDgeqrf_bufferSize");
            detail::check(cusolverDnDorgqr_bufferSize(ctx_.solver, int(c), int(k), int(k), dummy<double>(), int(ld), dummy<double>(), &orgqr),
                          "velora::cuda::cuda_backend", "cusolverDnDorgqr_bufferSize");
        }
        return std::max(geqrf, orgqr);
    }
    template <class U>
    static U* dummy() noexcept { return reinterpret_cast<U*>(std::uintptr_t{256}); }

    void require_workspace(const char* fn, std::size_t big_bytes) const {
        const std::size_t need = min_workspace_bytes + big_bytes;
        detail_require(need <= ws_.bytes, fn, "this call needs a workspace of ", need, " bytes but the backend has ", ws_.bytes,
                       "; size it with workspace_bytes(max_rows, max_cols) and pass it to set_workspace");
    }

    template <class U>
    U* small(std::size_t offset) const noexcept { return reinterpret_cast<U*>(static_cast<std::byte*>(ws_.data) + offset); }
    template <class U>
    U* big(std::size_t offset) const noexcept { return reinterpret_cast<U*>(static_cast<std::byte*>(ws_.data) + min_workspace_bytes + offset); }
    int* flag() const noexcept { return small<int>(kFlagOffset); }
    int* info_flag() const noexcept { return small<int>(kInfoOffset); }

    static void require_state_block(const char* fn, index_t block) {
        detail_require(block >= 1 && block <= rules::adam8_max_block, fn, "block = ", block, " must lie in [1, ", rules::adam8_max_block, "]");
    }

    // The signed and unsigned dynamic codes in device memory ([0] signed, [1] unsigned), copied
    // on first use (the stream waits for the copy once: the host tables are read in place).
    const rules::dynamic_code* adam8_codes(const char* fn) {
        if (codes8_.size() == 0) {
            device_buffer<rules::dynamic_code> codes(2);
            const rules::dynamic_code* host[2] = {&rules::signed_dynamic_code(), &rules::unsigned_dynamic_code()};
            for (int i = 0; i < 2; ++i)
                detail::check(cudaMemcpyAsync(codes.data() + i, host[i], sizeof(rules::dynamic_code), cudaMemcpyHostToDevice, ctx_.stream), fn,
                              "cudaMemcpyAsync");
            detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
            codes8_ = std::move(codes);
        }
        return codes8_.data();
    }

    unsigned grid_for(index_t blocks) const noexcept { return static_cast<unsigned>(std::clamp<index_t>(blocks, 1, index_t{sms_} * 32)); }

    // A failed launch check reports the launch's own error, or says that the error is an
    // earlier asynchronous fault (sticky) that this launch only reports (error.hpp).
    void check_launch(const char* fn) {
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) throw cuda_error(detail::launch_status(fn, e));
    }
    // The handles are bound to the stream only when they are on another one: cublasSetStream
    // also resets cuBLAS's workspace to its default pool, so calling it before every GEMM would
    // throw away what the host set with cublasSetWorkspace and re-pick workspace each time.
    void bind_blas(const char* fn) {
        cudaStream_t current = nullptr;
        detail::check(cublasGetStream(ctx_.blas, &current), fn, "cublasGetStream");
        if (current != ctx_.stream) detail::check(cublasSetStream(ctx_.blas, ctx_.stream), fn, "cublasSetStream");
        cublasPointerMode_t mode = CUBLAS_POINTER_MODE_HOST;
        detail::check(cublasGetPointerMode(ctx_.blas, &mode), fn, "cublasGetPointerMode");
        if (mode != CUBLAS_POINTER_MODE_HOST) detail::check(cublasSetPointerMode(ctx_.blas, CUBLAS_POINTER_MODE_HOST), fn, "cublasSetPointerMode");
    }
    void bind_solver(const char* fn) {
        cudaStream_t current = nullptr;
        detail::check(cusolverDnGetStream(ctx_.solver, &current), fn, "cusolverDnGetStream");
        if (current != ctx_.stream) detail::check(cusolverDnSetStream(ctx_.solver, ctx_.stream), fn, "cusolverDnSetStream");
    }

    void gemm_unchecked(const char* fn, op op_a, op op_b, T alpha, const_matrix_view<T> a, const_matrix_view<T> b, T beta, matrix_view<T> c,
                        index_t m, index_t n, index_t k) {
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major matrix is
        // its own transpose read column-major: swap the operands, keep the flags.
        const cublasOperation_t tb = op_b == op::none ? CUBLAS_OP_N : CUBLAS_OP_T;
        const cublasOperation_t ta = op_a == op::none ? CUBLAS_OP_N : CUBLAS_OP_T;
        bind_blas(fn);
        if constexpr (std::is_same_v<T, float>)
            detail::check(cublasSgemm(ctx_.blas, tb, ta, int(n), int(m), int(k), &alpha, b.data, int(b.ld), a.data, int(a.ld), &beta, c.data, int(c.ld)),
                          fn, "cublasSgemm");
        else
            detail::check(cublasDgemm(ctx_.blas, tb, ta, int(n), int(m), int(k), &alpha, b.data, int(b.ld), a.data, int(a.ld), &beta, c.data, int(c.ld)),
                          fn, "cublasDgemm");
    }

    // Householder QR of aᵀ (column-major c×k, lda = a.ld: the same memory), Q's k columns in place.
    void householder_rows(const char* fn, matrix_view<T> a, int lwork) {
        const int k = int(a.rows), c = int(a.cols), ld = int(a.ld);
        T* tau = big<T>(0);
        T* work = big<T>(align256(bytes_of<T>(k)));
        int* geqrf_info = info_flag();          // each call its own info: neither overwrites the other's
        int* orgqr_info = small<int>(kSecondInfoOffset);
        bind_solver(fn);
        if constexpr (std::is_same_v<T, float>) {
            detail::check(cusolverDnSgeqrf(ctx_.solver, c, k, a.data, ld, tau, work, lwork, geqrf_info), fn, "cusolverDnSgeqrf");
            detail::check(cusolverDnSorgqr(ctx_.solver, c, k, k, a.data, ld, tau, work, lwork, orgqr_info), fn, "cusolverDnSorgqr");
        } else {
            detail::check(cusolverDnDgeqrf(ctx_.solver, c, k, a.data, ld, tau, work, lwork, geqrf_info), fn, "cusolverDnDgeqrf");
            detail::check(cusolverDnDorgqr(ctx_.solver, c, k, k, a.data, ld, tau, work, lwork, orgqr_info), fn, "cusolverDnDorgqr");
        }
        int host_info[2] = {0, 0};
        detail::check(cudaMemcpyAsync(&host_info[0], geqrf_info, sizeof(int), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaMemcpyAsync(&host_info[1], orgqr_info, sizeof(int), cudaMemcpyDeviceToHost, ctx_.stream), fn, "cudaMemcpyAsync");
        detail::check(cudaStreamSynchronize(ctx_.stream), fn, "cudaStreamSynchronize");
        for (int i = 0; i < 2; ++i)   // both report only a refused argument (info < 0): a bug, never data
            if (host_info[i] != 0)
                throw cuda_error({cuda_library::cusolver, static_cast<int>(CUSOLVER_STATUS_INVALID_VALUE),
                                  std::string(fn) + ": Householder QR: " + (i == 0 ? "geqrf" : "orgqr") + " failed: info = " +
                                      std::to_string(host_info[i])});
    }

    cuda_context ctx_;
    device_workspace ws_;
    int sms_ = 1;
    small_eigensolver eigensolver_ = small_eigensolver::device;
    std::size_t householder_fallbacks_ = 0;
    std::vector<double> host_scratch_;
    // Host path of gram_svd (refresh time only; allocates on first use).
    Eigen::MatrixXd host_gram_;
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> host_eig_;
    std::vector<T> host_u_;
    device_buffer<rules::dynamic_code> codes8_;   // adam8_codes (float only; empty until first used)
};

} // namespace velora::cuda
