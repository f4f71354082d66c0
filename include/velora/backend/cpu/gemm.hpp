#pragma once
/// \file
/// The CPU backend's GEMM: C = alpha·op(A)·op(B) + beta·C on row-major views, through an
/// optimised BLAS when the build has one (CMake option VELORA_BLAS, which defines
/// VELORA_WITH_BLAS and links the BLAS found by FindBLAS), otherwise through Eigen's public
/// product (`C.noalias() = A * B` on maps).
///
/// Threads. The library cuts C itself and calls the engine single-threaded on each part from
/// its own OpenMP team, so the BLAS's threads and the library's never oversubscribe the cores:
/// an OpenMP BLAS (Debian's libopenblas-openmp, libblis-openmp, MKL's GNU/Intel OpenMP layer)
/// runs on one thread inside an active parallel region, and a product left whole runs with
/// omp_set_num_threads(1) on the calling thread. (OpenBLAS built with pthreads ignores both:
/// give it OPENBLAS_NUM_THREADS=1; BLIS_NUM_THREADS must be unset or 1.) Packing buffers are
/// the engine's: OpenBLAS and BLIS keep theirs across calls (no heap allocation per call,
/// measured), Eigen's product takes two blocks from the heap per part on every product larger
/// than its small-product path (so the allocation-free steady state holds with a BLAS;
/// docs/performance.md).
///
/// Determinism. C is cut into parts along its larger side, at multiples of row_quantum rows or
/// col_quantum columns, never into parts under split_flops. With Eigen's product and OpenBLAS
/// there are up to `threads` parts: every element of C then lies in the same position relative
/// to the engine's micro-tiles as in the whole product (the quanta are multiples of their
/// register-block sizes on x86-64, see row_quantum), each part's depth k is the whole
/// product's (k is never cut, so the depth blocking is the same), and no part is small enough
/// for a small-matrix kernel (OpenBLAS's takes M·N·K ≤ 10⁶), so a part's elements get the same
/// bits as in the whole product, at any thread count. Any other BLAS gets a number of parts fixed by the shape alone
/// (at most fixed_parts_cap), so its bits cannot depend on the thread count whatever its kernels
/// do (BLIS's do: it picks other kernels for skinny parts). tests/test_determinism.cpp checks
/// every engine the build has; CI runs it with OpenBLAS, BLIS and Eigen's product.
#include <Eigen/Core>

#include <algorithm>
#include <climits>
#include <type_traits>

#if defined(VELORA_WITH_BLAS)
#include <cblas.h>
#endif

#include "../../concepts.hpp"
#include "../../core/error.hpp"
#include "../../core/view.hpp"
#include "../rules/gemm_arguments.hpp"
#include "threading.hpp"

namespace velora::cpu {

/// What performs a GEMM.
enum class gemm_engine {
    automatic,   ///< the build's choice for the shape (gemm_driver::engine_for)
    blas,        ///< the BLAS linked at configure time (VELORA_WITH_BLAS)
    eigen,       ///< Eigen's public product
};

/// Whether this build links a BLAS.
inline constexpr bool has_blas =
#if defined(VELORA_WITH_BLAS)
    true;
#else
    false;
#endif

/// Whether the linked BLAS computes every element of C the same way whatever sub-product it lies
/// in, given the driver's cuts: set by CMake for OpenBLAS (tests/test_determinism.cpp checks it;
/// BLIS, for one, picks different kernels for a skinny part than for the whole product).
inline constexpr bool blas_split_safe =
#if defined(VELORA_BLAS_SPLIT_SAFE)
    true;
#else
    false;
#endif

/// The BLAS this build links (the library file CMake found), or "none".
inline const char* blas_name() noexcept {
#if defined(VELORA_WITH_BLAS) && defined(VELORA_BLAS_NAME)
    return VELORA_BLAS_NAME;
#elif defined(VELORA_WITH_BLAS)
    return "cblas";
#else
    return "none";
#endif
}

inline const char* engine_name(gemm_engine e) noexcept {
    switch (e) {
    case gemm_engine::blas: return "blas";
    case gemm_engine::eigen: return "eigen";
    default: return "automatic";
    }
}

/// Splits C across threads and runs each part on one engine (see the file comment).
class gemm_driver {
public:
    /// Rows of C per quantum of a row split, and columns per quantum of a column split.
    /// Rows of C are OpenBLAS's and Eigen's column panels (C is computed as its column-major
    /// transpose; panel widths 2, 4 or 8); columns of C are their row panels (mr: 8, 16, 24 or
    /// 48 on x86-64). Small quanta keep two parts of a 138-row sketch balanced.
    static constexpr index_t row_quantum = 16;
    static constexpr index_t col_quantum = 48;
    /// No part is ever smaller than this many flops (2·m·n·k).
    static constexpr double split_flops = 16777216.0;   // 2^24
    /// Parts of a product on a BLAS whose bits may depend on the part's shape (see run).
    static constexpr int fixed_parts_cap = 4;

    explicit gemm_driver(int threads = 1, gemm_engine engine = gemm_engine::automatic) : threads_(std::max(1, threads)), engine_(engine) {}

    [[nodiscard]] int threads() const noexcept { return threads_; }
    [[nodiscard]] gemm_engine engine() const noexcept { return engine_; }
    /// Forces an engine (gemm_engine::blas in a build without one throws) or restores automatic.
    void set_engine(gemm_engine engine) {
        detail::require(engine != gemm_engine::blas || has_blas, "velora::cpu::gemm_driver::set_engine",
                        "argument 'engine' is blas but this build has no BLAS (configure with -DVELORA_BLAS=ON)");
        engine_ = engine;
    }

    /// The engine chosen for an m×n×k product: the forced one, else the BLAS when the build has
    /// one, else Eigen. (Measured per hot shape in bench_gemm: the BLAS was never slower than
    /// Eigen's product on any of them, so no shape class is sent to Eigen; docs/performance.md.)
    /// run() still gives Eigen any product whose extents or leading dimensions do not fit
    /// CBLAS's int.
    [[nodiscard]] gemm_engine engine_for([[maybe_unused]] index_t m, [[maybe_unused]] index_t n, [[maybe_unused]] index_t k) const noexcept {
        if (engine_ != gemm_engine::automatic) return engine_;
        return has_blas ? gemm_engine::blas : gemm_engine::eigen;
    }

    template <class S>
    void run(const char* fn, op op_a, op op_b, S alpha, const_matrix_view<S> a, const_matrix_view<S> b, S beta, matrix_view<S> c) const {
        static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>, "the CPU GEMM supports float and double");
        // Named copies, not a structured binding: the parallel region below captures them, which
        // clang before 16 refuses for structured bindings.
        const rules::gemm_shape shape = rules::check_gemm_arguments<S>(fn, op_a, op_b, a, b, c);   // shapes, inner dimensions, aliasing
        const index_t m = shape.m, n = shape.n, k = shape.k;
        if (m == 0 || n == 0) return;

        gemm_engine engine = engine_for(m, n, k);
        if (engine == gemm_engine::blas && !(fits_blas_int(m, n, k) && fits_blas_int(a.ld, b.ld, c.ld))) engine = gemm_engine::eigen;
        const bool split_columns = n > m;
        const index_t quantum = split_columns ? col_quantum : row_quantum;
        const index_t extent = split_columns ? n : m;
        const index_t quanta = (extent + quantum - 1) / quantum;
        const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
        // Cuts that follow the thread count are used only with engines whose per-element
        // arithmetic is known not to depend on the part's shape (above); any other BLAS gets a
        // number of parts fixed by the shape alone (up to fixed_parts_cap), which keeps its
        // bits independent of the thread count whatever its kernels do.
        const double team = engine == gemm_engine::blas && !blas_split_safe ? static_cast<double>(fixed_parts_cap) : threads_;
        const auto most_parts = static_cast<index_t>(std::min(team, flops / split_flops));
        const int parts = static_cast<int>(std::max<index_t>(1, std::min(quanta, most_parts)));
        // A product left whole (and each part) runs on one thread: see the file comment.
        [[maybe_unused]] const serial_eigen_scope serial;
        parallel_for_parts(threads_, parts, [&](int part) {
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
            serial_gemm(engine, op_a, op_b, mm, nn, k, alpha, pa, a.ld, pb, b.ld, beta, pc, c.ld);
        });
    }

    /// One product on the calling thread with `engine` (blas or eigen): BLAS semantics, beta = 0
    /// ignores C's contents (NaN included).
    template <class S>
    static void serial_gemm(gemm_engine engine, op op_a, op op_b, index_t m, index_t n, index_t k, S alpha, const S* a, index_t lda,
                            const S* b, index_t ldb, S beta, S* c, index_t ldc) {
        if (alpha == S(0) || k == 0) {   // C = beta·C (and a BLAS would reject ld = 0 when k = 0)
            scale(m, n, beta, c, ldc);
            return;
        }
#if defined(VELORA_WITH_BLAS)
        if (engine == gemm_engine::blas) {
            const auto ta = op_a == op::none ? CblasNoTrans : CblasTrans;
            const auto tb = op_b == op::none ? CblasNoTrans : CblasTrans;
            const auto i = [](index_t x) { return static_cast<int>(x); };   // run checked the range
            if constexpr (std::is_same_v<S, float>)
                cblas_sgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c, i(ldc));
            else
                cblas_dgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c, i(ldc));
            return;
        }
#endif
        (void)engine;
        eigen_gemm(op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }

private:
    // C = beta·C; beta = 0 writes zeros whatever C held.
    template <class S>
    static void scale(index_t m, index_t n, S beta, S* c, index_t ldc) {
        if (beta == S(1)) return;
        for (index_t r = 0; r < m; ++r) {
            S* row = c + r * ldc;
            if (beta == S(0)) std::fill_n(row, n, S(0));
            else
                for (index_t j = 0; j < n; ++j) row[j] *= beta;
        }
    }

    // CBLAS takes int extents.
    static bool fits_blas_int(index_t m, index_t n, index_t k) noexcept {
        constexpr index_t most = INT_MAX;
        return m <= most && n <= most && k <= most;
    }

    template <class S>
    static void eigen_gemm(op op_a, op op_b, index_t m, index_t n, index_t k, S alpha, const S* a, index_t lda, const S* b, index_t ldb,
                           S beta, S* c, index_t ldc) {
        using RowMat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        using ColMat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
        using Stride = Eigen::OuterStride<>;
        scale(m, n, beta, c, ldc);
        Eigen::Map<RowMat, 0, Stride> cm(c, m, n, Stride(ldc));
        // op(A) and op(B) as maps: a transposed row-major operand is the column-major map of the
        // same memory, so Eigen sees plain operands and picks its kernel by storage order.
        auto run = [&](const auto& am, const auto& bm) { cm.noalias() += alpha * am * bm; };
        auto with_b = [&](const auto& am) {
            if (op_b == op::none) run(am, Eigen::Map<const RowMat, 0, Stride>(b, k, n, Stride(ldb)));
            else run(am, Eigen::Map<const ColMat, 0, Stride>(b, k, n, Stride(ldb)));
        };
        if (op_a == op::none) with_b(Eigen::Map<const RowMat, 0, Stride>(a, m, k, Stride(lda)));
        else with_b(Eigen::Map<const ColMat, 0, Stride>(a, m, k, Stride(lda)));
    }

    int threads_;
    gemm_engine engine_;
};

} // namespace velora::cpu
