#pragma once
/// \file
/// `gradient_products`: everything the backward pass computes from an `activation_record` —
/// the factored weight gradient A = dYᵀZ, its (A, v, scale) view for a low-rank optimizer, the
/// dense expansion, the reconstruction X̂, and the scale-and-shift gradient — with the one
/// scratch buffer they need (the chunk in which a narrow Z is widened to the value type). It
/// knows nothing of how v was chosen. `velora::compressor` owns one and forwards to it, so
/// messages name the compressor's member functions.
#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "../concepts.hpp"
#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/view.hpp"
#include "record.hpp"

namespace velora {

template <backend B>
class gradient_products {
public:
    using T = typename B::value_type;
    using record_type = activation_record<B>;

    explicit gradient_products(B& backend) noexcept : backend_(&backend) {}

    /// Rows of Z widened per conversion chunk: the chunk holds at most this many elements
    /// (at least one row of G).
    static constexpr index_t convert_chunk_elements = 1 << 15;

    /// Bytes of the conversion scratch for records of up to `max_tokens` tokens of G groups
    /// stored as `z_storage`: 0 when Z is stored as the value type itself.
    [[nodiscard]] static std::size_t workspace_bytes(index_t max_tokens, index_t groups, storage z_storage) {
        return static_cast<std::size_t>(chunk_elements(max_tokens, groups, z_storage)) * sizeof(T);
    }
    /// Sizes the conversion scratch so that no product allocates for such records.
    void reserve(index_t max_tokens, index_t groups, storage z_storage) {
        const index_t n = chunk_elements(max_tokens, groups, z_storage);
        if (static_cast<std::size_t>(n) > z_chunk_.capacity()) z_chunk_.resize(static_cast<std::size_t>(n));
    }

    /// A = dYᵀ Z (O×G): the factored weight gradient, without the scale (see factored()).
    /// `a` may not overlap `dy`.
    void gradient_factor(const record_type& record, const_matrix_view<T> dy, matrix_view<T> a) {
        constexpr const char* fn = "velora::compressor::gradient_factor";
        check_record(record, fn);
        check_view(dy, fn, "dy");
        detail::require(dy.rows == record.tokens(), fn, "argument 'dy' has ", dy.rows, " rows but the record holds T = ", record.tokens(), " tokens");
        check_shape(a, dy.cols, record.groups(), fn, "a");
        check_no_alias(a, "a", dy, "dy", fn);
        with_z_as_value_type(record, [&](const_matrix_view<T> z, index_t first_token, bool first_chunk) {
            backend_->gemm(op::transpose, op::none, T(1), dy.row_block(first_token, z.rows), z, first_chunk ? T(0) : T(1), a);
        });
    }

    /// The factored gradient (A, v, scale) for a low-rank optimizer; `a` from gradient_factor().
    [[nodiscard]] factored_gradient<T> factored(const record_type& record, const_matrix_view<T> a) const {
        constexpr const char* fn = "velora::compressor::factored";
        check_record(record, fn);
        check_view(a, fn, "a");
        detail::require(a.cols == record.groups(), fn, "argument 'a' has ", a.cols, " columns but G = ", record.groups());
        return {a, record.v(), record.subtoken_size(), record.features(), record.scale()};
    }

    /// dW = scale · A · (I_G ⊗ vᵀ), O×D, from the factored gradient. Only when a dense gradient
    /// is needed. `dw` may not overlap `a`.
    void expand_weight_grad(const record_type& record, const_matrix_view<T> a, matrix_view<T> dw) {
        constexpr const char* fn = "velora::compressor::expand_weight_grad";
        check_record(record, fn);
        check_view(a, fn, "a");
        detail::require(a.cols == record.groups(), fn, "argument 'a' has ", a.cols, " columns but G = ", record.groups());
        check_shape(dw, a.rows, record.features(), fn, "dw");
        check_no_alias(dw, "dw", a, "a", fn);
        backend_->expand_subtokens(a, record.v(), record.subtoken_size(), record.scale(), dw);
    }

    /// X̂ = Z · (I_G ⊗ vᵀ), T×D: the coarse reconstruction, only for callers that need it.
    void reconstruct(const record_type& record, matrix_view<T> xhat) {
        constexpr const char* fn = "velora::compressor::reconstruct";
        check_record(record, fn);
        check_shape(xhat, record.tokens(), record.features(), fn, "xhat");
        visit_storage(record.z_storage(), [&](auto tag) {
            backend_->expand_subtokens(record.template z<decltype(tag)>(), record.v(), record.subtoken_size(), T(1), xhat);
        });
    }

    /// VeLoRA weight gradient of a scale-and-shift layer y = x ⊙ w + b whose input was
    /// compressed into `record`: dw[g·s + j] = scale · v[j] · Σ_t dY[t, g·s + j] · Z[t, g].
    /// `dw` holds D elements of backend memory and may not overlap `dy`.
    void ssf_weight_grad(const record_type& record, const_matrix_view<T> dy, T* dw) {
        constexpr const char* fn = "velora::compressor::ssf_weight_grad";
        check_record(record, fn);
        check_shape(dy, record.tokens(), record.features(), fn, "dy");
        detail::require(dw != nullptr, fn, "argument 'dw' is null");
        check_no_alias(const_matrix_view<T>(dw, 1, record.features()), "dw", dy, "dy", fn);
        visit_storage(record.z_storage(), [&](auto tag) {
            backend_->weighted_subtoken_column_sums(dy, record.template z<decltype(tag)>(), record.v(), record.subtoken_size(),
                                                    record.scale(), dw);
        });
    }

private:
    static void check_record(const record_type& r, const char* fn) {
        detail::require(!r.empty(), fn, "argument 'record' is empty (no successful compress wrote it)");
    }

    // Rows per conversion chunk for G groups.
    static index_t chunk_rows(index_t groups) noexcept { return std::max<index_t>(1, convert_chunk_elements / groups); }

    // Elements of the conversion scratch for up to `tokens` tokens (0 for Z stored as T).
    static index_t chunk_elements(index_t tokens, index_t groups, storage z_storage) {
        return visit_storage(z_storage, [&](auto tag) -> index_t {
            if constexpr (std::is_same_v<decltype(tag), T>) return 0;
            else return std::min(chunk_rows(groups), tokens) * groups;
        });
    }

    // Calls f(Z as a T view, first token, first chunk?) over Z: the whole record when it is
    // stored as T, otherwise converted chunk by chunk through a fixed-size scratch, so a narrow
    // storage type never costs a full-size wide copy.
    template <class F>
    void with_z_as_value_type(const record_type& record, F&& f) {
        visit_storage(record.z_storage(), [&](auto tag) {
            using U = decltype(tag);
            const auto z = record.template z<U>();
            if constexpr (std::is_same_v<U, T>) {
                f(z, 0, true);
            } else {
                const index_t chunk = chunk_rows(record.groups());
                z_chunk_.resize(static_cast<std::size_t>(std::min(chunk, z.rows) * z.cols));
                for (index_t first = 0; first < z.rows; first += chunk) {
                    const index_t rows = std::min(chunk, z.rows - first);
                    matrix_view<T> wide{z_chunk_.data(), rows, z.cols, z.cols};
                    backend_->convert(z.row_block(first, rows), wide);
                    f(const_matrix_view<T>(wide), first, first == 0);
                }
            }
        });
    }

    B* backend_;
    typename B::template buffer<T> z_chunk_;   // storage -> T conversion scratch
};

} // namespace velora
