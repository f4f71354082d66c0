#pragma once
/// \file
/// `eigen_backend<T>`: the CPU backend, for T = float or double.
///
/// What lives where (include/velora/backend/cpu/):
/// - gemm.hpp: the GEMM driver: an optimised BLAS when the build links one (CMake option
///   VELORA_BLAS), otherwise Eigen's public product; the library splits C across its threads.
/// - threading.hpp: how work is cut into parts and handed to OpenMP threads.
/// - subtokens.hpp, subtokens_avx512.hpp: VeLoRA's sub-token kernels (generic and AVX-512).
/// - reductions.hpp, lanes.hpp: reductions and fixed-lane sums with thread-count-independent bits.
/// - adam.hpp: the element-wise Adam(W) kernels.
/// - nf4_dequantize.hpp: an NF4 weight's rows as values (AVX-512 table look-ups where available).
/// - linalg.hpp: refresh-time linear algebra (CholeskyQR2, Gram-matrix SVD, in double).
/// This class composes them behind the backend interface (concepts.hpp) and owns their scratch.
/// The rules shared with the CUDA backend (GEMM argument checks, CholeskyQR2's acceptance,
/// the Gram-SVD assembly, the sign rule) are in include/velora/backend/rules/.
///
/// Determinism: every result is the same bits at any thread count (docs/architecture.md,
/// tests/test_determinism.cpp).
///
/// An object is not thread-safe; use one per host thread. It may itself use OpenMP threads
/// when the translation unit is compiled with OpenMP (`-fopenmp`); `threads` caps them.
#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <concepts>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../concepts.hpp"
#include "../core/buffer.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "../quant/nf4_layout.hpp"
#include "cpu/adam.hpp"
#include "cpu/adam8.hpp"
#include "cpu/gemm.hpp"
#include "cpu/nf4_dequantize.hpp"
#include "cpu/lanes.hpp"
#include "cpu/linalg.hpp"
#include "cpu/reductions.hpp"
#include "cpu/subtokens.hpp"
#include "cpu/threading.hpp"
#include "rules/row_signs.hpp"

namespace velora {

template <class T>
class eigen_backend {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "eigen_backend supports float and double");

public:
    using value_type = T;
    template <class U>
    using buffer = host_buffer<U>;

    /// `threads` = 0 uses all OpenMP threads (1 without OpenMP).
    explicit eigen_backend(int threads = 0) : threads_(cpu::resolve_threads(threads)), gemm_(threads_) {}

    [[nodiscard]] int threads() const noexcept { return threads_; }

    // ---------------------------------------------------------------- memory
    void copy_to_host(const T* src, T* dst, index_t n) const { copy(src, dst, n); }
    void copy_from_host(const T* src, T* dst, index_t n) const { copy(src, dst, n); }
    /// Copy within backend memory.
    template <class U>
    static void copy(const U* src, U* dst, index_t n) {
        if (n > 0) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(U));
    }

    /// Raw bytes from host memory (a frozen weight's packed storage: quant/kernels.hpp).
    static void copy_bytes_from_host(const void* src, void* dst, std::size_t bytes) {
        if (bytes > 0) std::memcpy(dst, src, bytes);
    }
    /// Raw bytes to host memory (8-bit moments saved: adarank/blockwise_moments.hpp).
    static void copy_bytes_to_host(const void* src, void* dst, std::size_t bytes) {
        if (bytes > 0) std::memcpy(dst, src, bytes);
    }

    // ---------------------------------------------------------------- frozen weights
    /// out = rows first_row .. first_row + out.rows of the NF4 weight `w` (host memory), with
    /// the arithmetic of quant/nf4_layout.hpp (exact values: same bits at any thread count; an
    /// AVX-512 look-up where the build has it, cpu/nf4_dequantize.hpp).
    void dequantize_nf4(const nf4_blocks& w, index_t first_row, matrix_view<T> out) {
        detail::require(out.cols == w.cols && first_row >= 0 && out.rows >= 0 && first_row <= w.rows && out.rows <= w.rows - first_row,
                        "velora::eigen_backend::dequantize_nf4", "rows [", first_row, ", ", first_row, " + ", out.rows, ") x ", out.cols,
                        " columns are not within the ", w.rows, "x", w.cols, " weight");
        cpu::for_each_row(threads_, out.size(), out.rows,
                          [&](index_t r) { cpu::nf4_dequantize_row(w, first_row + r, out.row(r)); });
    }

    // ---------------------------------------------------------------- GEMM
    /// C = alpha · op(A) · op(B) + beta · C, all row-major views. beta = 0 ignores C's contents
    /// (NaN included), as in BLAS.
    void gemm(op op_a, op op_b, T alpha, const_matrix_view<T> a, const_matrix_view<T> b, T beta, matrix_view<T> c) {
        gemm_.run<T>("velora::eigen_backend::gemm", op_a, op_b, alpha, a, b, beta, c);
    }
    /// The GEMM engine (cpu::gemm_engine::automatic by default: the BLAS when the build has one).
    [[nodiscard]] cpu::gemm_engine gemm_engine() const noexcept { return gemm_.engine(); }
    void set_gemm_engine(cpu::gemm_engine engine) { gemm_.set_engine(engine); }

    // ---------------------------------------------------------------- sub-token kernels
    /// Z[t, g] = Σ_j X[t, g·s + j] · v[j] for g < Z.cols, reading X as zero past its last
    /// column (so a group made only of padding gives 0), converted to U.
    /// Returns false when any value as stored in U is not finite (NaN/Inf in X, or a dot product
    /// that overflows T or the narrower U); Z is then written but meaningless.
    template <class U>
    bool project_subtokens(const_matrix_view<T> x, const T* v, index_t s, matrix_view<U> z) {
        return cpu::subtokens::project(threads_, x, v, s, z);
    }

    /// out[r, g·s + j] = scale · A[r, g] · v[j] for every column g·s + j < out.cols (columns of A
    /// that cover only padding are not read).
    template <class U>
    void expand_subtokens(const_matrix_view<U> a, const T* v, index_t s, T scale, matrix_view<T> out) {
        cpu::subtokens::expand(threads_, a, v, s, scale, out);
    }

    /// out[j] = Σ_t Σ_g X[t, g·s + j] (zero padding included): the direction of the sub-token
    /// mean. Accumulates each row in T and across rows in double.
    void sum_subtokens(const_matrix_view<T> x, index_t s, T* out) { cpu::subtokens::sum(threads_, reduce_, x, s, out); }

    /// out[g·s + j] = scale · v[j] · Σ_t dY[t, g·s + j] · Z[t, g]: the VeLoRA weight gradient of a
    /// scale-and-shift (SSF) layer y = x ⊙ w + b.
    template <class U>
    void weighted_subtoken_column_sums(const_matrix_view<T> dy, const_matrix_view<U> z, const T* v, index_t s, T scale, T* out) {
        cpu::subtokens::weighted_column_sums(threads_, reduce_, dy, z, v, s, scale, out);
    }

    /// Sizes the scratch of the column sums above (sum_subtokens, weighted_subtoken_column_sums,
    /// column_sums) for widths up to `width`: afterwards none of them allocates, from its first
    /// call on (reductions.hpp). Optional for a backend (concept reduction_reserving); the
    /// compressor's and the layers' reserve call it when the backend has it.
    void reserve_reductions(index_t width) { reduce_.reserve(width); }
    [[nodiscard]] static std::size_t reduction_workspace_bytes(index_t width) { return cpu::reducer<T>::workspace_bytes(width); }

    /// out[j] = Σ_t X[t, j] (the bias gradient of a linear or SSF layer).
    void column_sums(const_matrix_view<T> x, T* out) {
        reduce_.column_sums(threads_, x.rows, x.cols, x.size(), out,
                            [&](index_t t, T* row_acc) { VecOut(row_acc, x.cols) += VecMap(x.row(t), x.cols); });
    }

    /// out[t, j] = in[t, j] · w[j] + b[j]; a null `w` means 1, a null `b` means 0. `out` may
    /// alias `in`. (SSF forward and input gradient, bias add of a linear layer.)
    void scale_shift_columns(const_matrix_view<T> in, const T* w, const T* b, matrix_view<T> out) {
        const index_t d = out.cols;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads_) if (out.size() > cpu::parallel_threshold)
#endif
        for (index_t r = 0; r < out.rows; ++r) {
            auto dst = VecOut(out.row(r), d).array();
            const auto src = VecMap(in.row(r), d).array();
            if (w && b) {   // spelled out as fused multiply-adds: see cpu/lanes.hpp for why not an Eigen expression
                const T* x = in.row(r);
                T* y = out.row(r);
                for (index_t j = 0; j < d; ++j) y[j] = cpu::fused(x[j], w[j], b[j]);
            } else if (w) dst = src * VecMap(w, d).array();
            else if (b) dst = src + VecMap(b, d).array();
            else if (out.data != in.data) dst = src;
        }
    }

    /// out = in, element-wise conversion from a storage type.
    template <class U>
    void convert(const_matrix_view<U> in, matrix_view<T> out) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads_) if (out.size() > cpu::parallel_threshold)
#endif
        for (index_t r = 0; r < out.rows; ++r) {
            const U* src = in.row(r);
            T* dst = out.row(r);
            for (index_t c = 0; c < out.cols; ++c) dst[c] = to_arithmetic<T>(src[c]);
        }
    }

    /// out[i] = gaussian_at(seed, offset + i): reproducible on every backend.
    void fill_gaussian(std::uint64_t seed, std::uint64_t offset, T* out, index_t n) {
        const int parts = n > cpu::parallel_threshold / 8 ? threads_ : 1;   // ~25 ns per value: worth threads early
        cpu::parallel_for_parts(threads_, parts, [&](int part) {
            const auto [first, last] = cpu::part_range(n, parts, part);
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
    /// Makes the rows of a (k×c, k <= c) orthonormal in place, spanning the same row space
    /// (CholeskyQR2 in double, Householder QR fallback: cpu/linalg.hpp).
    void orthonormalize_rows(matrix_view<T> a) { linalg_.orthonormalize_rows(gemm_, a); }

    /// Singular values (descending, into host memory, as double) and left singular vectors
    /// (the columns of u, k×k) of a wide matrix c (k×n, k <= n), from the eigen-decomposition
    /// of the Gram matrix c·cᵀ formed in double (cpu/linalg.hpp).
    void gram_svd(const_matrix_view<T> c, matrix_view<T> u, double* sigma) { linalg_.gram_svd(gemm_, c, u, sigma); }

    /// Σ a[i, j]², accumulated in double (rows cut into parts by the shape alone, partial sums
    /// added in part order: the same bits at any thread count).
    /// Inf or NaN in a gives a non-finite result.
    double sum_of_squares(const_matrix_view<T> a) { return reduce_.sum_of_squares(threads_, a); }

    /// Adam's moment update and normalised step, element-wise:
    /// m = β₁m + (1−β₁)g,  v = β₂v + (1−β₂)g²,  n = m / (√v + ε).  `n` may alias `g`.
    /// Computed as m += (1−β₁)(g − m), v += (1−β₂)(g² − v) with fused multiply-adds
    /// (backend/rules/adam_element.hpp, on AVX-512 packets and scalars: cpu/adam.hpp).
    void adam_moments(const_matrix_view<T> g, matrix_view<T> m, matrix_view<T> v, T beta1, T beta2, T eps, matrix_view<T> n) {
        rules::adamw_terms<T> c;
        c.c1 = T(1) - beta1;
        c.c2 = T(1) - beta2;
        c.eps = eps;
        cpu::for_each_row(threads_, n.size(), n.rows, [&](index_t r) {
            cpu::adam_row<cpu::adam_row_kind::moments>(g.row(r), m.row(r), v.row(r), n.row(r), n.cols, c);
        });
    }

    /// Dense AdamW in one pass over w, g, m and v, in the order of operations `terms.order`
    /// names (galore: the moments as adam_moments, then w = decay·(w − step·n); torch:
    /// torch::optim::AdamW's sequence; backend/rules/adam_element.hpp has both).
    void adamw_update(matrix_view<T> w, const_matrix_view<T> g, matrix_view<T> m, matrix_view<T> v, const rules::adamw_terms<T>& terms) {
        if (terms.order == rules::adamw_order::torch)
            cpu::for_each_row(threads_, w.size(), w.rows, [&](index_t r) {
                cpu::adam_row<cpu::adam_row_kind::torch_weight>(g.row(r), m.row(r), v.row(r), w.row(r), w.cols, terms);
            });
        else
            cpu::for_each_row(threads_, w.size(), w.rows, [&](index_t r) {
                cpu::adam_row<cpu::adam_row_kind::galore_weight>(g.row(r), m.row(r), v.row(r), w.row(r), w.cols, terms);
            });
    }

    /// Adam(W) on 8-bit blockwise moments (float only), contiguous g and out (w, or n for
    /// adam_row_kind::moments), every block in one pass: cpu/adam8.hpp. False when some result was
    /// not finite (what was written must then be discarded). Throws std::invalid_argument for a
    /// block outside [1, rules::adam8_max_block] (the CPU bodies' stack buffers hold two blocks),
    /// writing nothing, as the CUDA backend does.
    bool adam8_update(cpu::adam_row_kind kind, const T* g, T* out, const cpu::adam8_tensor_state& s, const rules::adamw_terms<T>& terms)
        requires std::same_as<T, float>
    {
        require_state_block("velora::eigen_backend::adam8_update", s.block);
        if (s.count <= 0) return true;
        switch (kind) {
        case cpu::adam_row_kind::moments: return cpu::adam8_tensor<cpu::adam_row_kind::moments>(threads_, g, out, s, terms);
        case cpu::adam_row_kind::galore_weight: return cpu::adam8_tensor<cpu::adam_row_kind::galore_weight>(threads_, g, out, s, terms);
        case cpu::adam_row_kind::torch_weight: return cpu::adam8_tensor<cpu::adam_row_kind::torch_weight>(threads_, g, out, s, terms);
        }
        return false;
    }

    /// out[i] = the value of byte q[i] in its block (i / block) of absmax `absmax`, in the signed
    /// (m) or unsigned (v) code, for i < count (dynamic_code::decode: the bits adam8_update
    /// decodes). Throws std::invalid_argument for a block outside [1, rules::adam8_max_block].
    void adam8_decode(rules::code_sign sign, const std::uint8_t* q, const float* absmax, index_t count, index_t block, T* out) const
        requires std::same_as<T, float>
    {
        require_state_block("velora::eigen_backend::adam8_decode", block);
        const rules::dynamic_code& code = sign == rules::code_sign::signed_code ? rules::signed_dynamic_code() : rules::unsigned_dynamic_code();
        for (index_t i = 0; i < count; ++i) out[i] = code.decode(q[i], absmax[i / block]);
    }

    /// x (count finite floats) encoded in blocks of `block`: absmax[b] = the block's largest |x|
    /// (0 below the smallest normal float), q the bytes (cpu::adam8_encode_block: the bits
    /// adam8_update encodes). Throws std::invalid_argument for a block outside [1, rules::adam8_max_block].
    void adam8_encode(rules::code_sign sign, const T* x, index_t count, index_t block, std::uint8_t* q, float* absmax) const
        requires std::same_as<T, float>
    {
        require_state_block("velora::eigen_backend::adam8_encode", block);
        const rules::dynamic_code& code = sign == rules::code_sign::signed_code ? rules::signed_dynamic_code() : rules::unsigned_dynamic_code();
        for (index_t first = 0; first < count; first += block)
            cpu::adam8_encode_block(code, x + first, q + first, std::min(block, count - first), absmax[first / block]);
    }

    /// out = in ∘ in.
    void square(const_matrix_view<T> in, matrix_view<T> out) {
        for (index_t r = 0; r < out.rows; ++r) VecOut(out.row(r), out.cols).array() = VecMap(in.row(r), in.cols).array().square();
    }

    /// a = max(a, 0) element-wise.
    void clamp_nonnegative(matrix_view<T> a) {
        cpu::for_each_row(threads_, a.size(), a.rows, [&](index_t r) { VecOut(a.row(r), a.cols) = VecOut(a.row(r), a.cols).cwiseMax(T(0)); });
    }

    /// a *= factor.
    void scale(matrix_view<T> a, T factor) {
        cpu::for_each_row(threads_, a.size(), a.rows, [&](index_t r) { VecOut(a.row(r), a.cols) *= factor; });
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
        for (index_t r = 0; r < a.rows; ++r)   // the rule: rules/row_signs.hpp
            if (rules::row_sign_flips(a(r, rules::row_sign_pivot(a.row(r), a.cols)))) VecOut(a.row(r), a.cols) *= T(-1);
    }

private:
    static void require_state_block(const char* fn, index_t block) {
        detail::require(block >= 1 && block <= rules::adam8_max_block, fn, "block = ", block, " must lie in [1, ", rules::adam8_max_block, "]");
    }

    using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
    using VecMap = Eigen::Map<const Vec>;
    using VecOut = Eigen::Map<Vec>;

    int threads_;
    cpu::gemm_driver gemm_;
    cpu::reducer<T> reduce_;
    cpu::refresh_linalg<T> linalg_;
};

} // namespace velora
