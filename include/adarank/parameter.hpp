#pragma once
/// \file
/// One registered parameter of `low_rank_adamw`: how it is optimised (`param_kind`), what the
/// optimizer reports about it (`layer_info`), and the state its steps change
/// (`parameter_state`: the basis and moments in backend memory, the counters, and the bounds
/// behind the overflow certificate), with the views every phase of a step reads it through.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <velora/core/checked.hpp>
#include <velora/core/error.hpp>
#include <velora/core/rng.hpp>

#include "backend.hpp"
#include "basis_format.hpp"
#include "blockwise_moments.hpp"
#include "gradient.hpp"
#include "policies.hpp"
#include "rsvd.hpp"

namespace adarank {

/// How a registered parameter is optimised.
enum class param_kind : std::uint8_t {
    automatic = 0,   ///< low-rank when 2-D and the low-rank state at the maximum rank is smaller than dense AdamW's
    low_rank = 1,
    dense = 2,
};

/// What the optimizer reports about one parameter.
struct layer_info {
    index_t rows = 0, cols = 0;
    bool low_rank = false;
    projection_side side = projection_side::left;   ///< low-rank only
    index_t rank = 0;                                ///< current rank (0 before the first step)
    std::uint64_t steps = 0;                         ///< Adam steps taken (t)
    std::uint64_t refreshes = 0;                     ///< subspaces found
    std::uint64_t steps_in_subspace = 0;
    std::size_t state_bytes = 0;                     ///< basis + moments held for this parameter
    double projected_norm2 = 0;                      ///< ‖Ĝ‖_F² of the last step
    subspace_report last_refresh{};                  ///< what the last subspace search did
    /// Bytes this rank put into all-reduces for this parameter's last step (elements × sizeof(T),
    /// including an all_reduce_mean before it); 0 for a step without a communicator (a
    /// communicator of size 1 still counts its no-op all-reduces). Not saved with the state.
    std::uint64_t communicated_bytes = 0;
};

/// What a parameter's steps change, besides its buffers; saved and restored as one piece.
struct parameter_progress {
    index_t rank = 0;
    std::uint64_t t = 0, since = 0, refreshes = 0;
    std::uint64_t counter = 0;    ///< position in this parameter's Gaussian stream
    double anchor2 = 0;           ///< ‖Ĝ‖² at the first step in this subspace (-1 until known)
    double projected_norm2 = 0;
    subspace_report last{};
};

/// Upper bounds that certify a step finite without reading the state (overflow_certificate.hpp).
/// Not saved: exact values are recomputed from the arrays by load_state and set_basis.
struct certificate_bounds {
    double m_bound = 0;      ///< >= max |m|
    double v_bound = 0;      ///< >= max v
    double basis_norm = 0;   ///< >= ‖B‖_F >= the norm of every column of B
};

/// A registered parameter: its shape and kind, its progress and bounds, and its state buffers.
template <optimizer_backend B>
struct parameter_state : parameter_progress, certificate_bounds {
    using T = typename B::value_type;
    using buffer = typename B::template buffer<T>;

    index_t rows = 0, cols = 0;
    bool low_rank = false;
    projection_side side = projection_side::left;
    index_t len = 0, other = 0, r_cap = 0;   ///< low-rank: basis rows are len long, moments other wide, rank <= r_cap
    std::uint64_t seed = 0;                  ///< of this parameter's Gaussian stream
    buffer basis, m, v;
    /// The moments in the 8-bit format instead of m and v (state_format::int8_blockwise; m and v
    /// then stay empty), in backend memory as m and v are.
    bool quantized = false;
    blockwise_moments<B> q8;
    /// The basis in a quantised format instead of `basis` (basis_format::int8 / int4; `basis` then
    /// stays empty and the steps decode it into the workspace: current_basis, low_rank_step.hpp).
    quantized_basis qbasis;
    /// The budget rank rule only (rank_budget.hpp): σ of the sketch of the latest refresh, r_cap
    /// values (capacity reserved at registration), empty before one or after set_basis. Host memory.
    std::vector<double> spectrum;
    /// Data-parallel bookkeeping (not state): bytes reduced by all_reduce_mean since the last
    /// step, and bytes of the last step (see layer_info::communicated_bytes).
    std::uint64_t pending_bytes = 0, communicated = 0;

    /// A parameter's shape, kind, side and stream as registration decides them (no buffer yet):
    /// `automatic` becomes low-rank when the parameter is 2-D and its low-rank state at the largest
    /// rank is smaller than dense AdamW's. Throws std::invalid_argument naming `fn` for a
    /// non-positive shape, an invalid kind, or sizes whose products (rows·cols, the state at the
    /// largest rank, in bytes of T) do not fit in the address space: every buffer of the parameter
    /// and its steps is a product of rows, cols and r_cap <= min(rows, cols) with at most rows·cols
    /// elements, except the states, checked here, so no size formed later can wrap.
    static parameter_state plan(index_t rows, index_t cols, param_kind kind, side_policy sides, index_t max_rank, std::uint64_t config_seed,
                                std::size_t index, const char* fn) {
        using velora::detail::checked_add;
        using velora::detail::checked_elements;
        using velora::detail::checked_mul;
        velora::detail::require(rows > 0 && cols > 0, fn, "the shape must be positive, got ", rows, "x", cols);
        velora::detail::require(static_cast<unsigned>(kind) <= 2, fn, "argument 'kind' has the invalid value ", static_cast<int>(kind));
        const index_t elements = checked_elements(checked_mul(rows, cols, fn, "argument 'rows' x 'cols'"), sizeof(T), fn, "argument 'rows' x 'cols'");
        const index_t r_cap = std::min<index_t>(max_rank, std::min(rows, cols));
        if (kind == param_kind::automatic) {
            const bool left = choose_side(sides, rows, cols) == projection_side::left;
            const double low = static_cast<double>(r_cap) * (left ? static_cast<double>(rows) + 2.0 * static_cast<double>(cols)
                                                                  : static_cast<double>(cols) + 2.0 * static_cast<double>(rows));
            kind = rows >= 2 && cols >= 2 && low < 2.0 * static_cast<double>(rows) * static_cast<double>(cols) ? param_kind::low_rank
                                                                                                                : param_kind::dense;
        }
        parameter_state l;
        l.rows = rows;
        l.cols = cols;
        l.seed = velora::mix64(config_seed ^ velora::mix64(static_cast<std::uint64_t>(index)));
        l.low_rank = kind == param_kind::low_rank;
        if (l.low_rank) {
            l.side = choose_side(sides, rows, cols);
            l.len = l.side == projection_side::left ? rows : cols;
            l.other = l.side == projection_side::left ? cols : rows;
            l.r_cap = r_cap;
            // basis + two moments at the largest rank: what state_bytes() may have to report
            (void)checked_elements(checked_mul(r_cap, checked_add(l.len, checked_mul(index_t{2}, l.other, fn, "2 x other"), fn, "len + 2 x other"), fn,
                                               "the low-rank state r_cap x (len + 2 x other)"),
                                   sizeof(T), fn, "the low-rank state r_cap x (len + 2 x other)");
        } else {
            (void)checked_elements(checked_mul(index_t{2}, elements, fn, "dense AdamW's two moments 2 x rows x cols"), sizeof(T), fn,
                                   "dense AdamW's two moments 2 x rows x cols");
        }
        return l;
    }

    [[nodiscard]] const_matrix_view<T> basis_view() const { return {basis.data(), rank, len, len}; }
    [[nodiscard]] matrix_view<T> moment_view(buffer& b) { return {b.data(), rank, other, other}; }
    [[nodiscard]] const_matrix_view<T> moment_view(const buffer& b) const { return {b.data(), rank, other, other}; }
    [[nodiscard]] matrix_view<T> dense_view(buffer& b) const { return {b.data(), rows, cols, cols}; }

    /// Basis + moments held: (r·len + 2·r·other)·sizeof(T) low-rank, 2·rows·cols·sizeof(T) dense;
    /// 8-bit moments count their bytes and absmax (blockwise_moments::bytes) instead, a quantised
    /// basis its codes and scales (quantized_basis::bytes_at).
    [[nodiscard]] std::size_t state_bytes() const noexcept {
        const std::size_t basis_bytes = !low_rank ? 0 : qbasis.quantized() ? qbasis.bytes_at(rank) : static_cast<std::size_t>(rank * len) * sizeof(T);
        if (quantized) return basis_bytes + q8.bytes();
        const index_t moments = low_rank ? 2 * rank * other : 2 * rows * cols;
        return basis_bytes + static_cast<std::size_t>(moments) * sizeof(T);
    }

    /// Dense AdamW's two moments, 2·rows·cols·sizeof(T) (what a dense parameter holds).
    [[nodiscard]] std::size_t state_bytes_dense() const noexcept { return static_cast<std::size_t>(2 * rows * cols) * sizeof(T); }

    /// The refresh rules take the steps in the subspace as an index; a count beyond its range
    /// (only a loaded state can have one) saturates rather than turning negative.
    [[nodiscard]] index_t steps_in_subspace() const noexcept {
        constexpr auto most = static_cast<std::uint64_t>(std::numeric_limits<index_t>::max());
        return static_cast<index_t>(std::min(since, most));
    }

    /// State buffers sized exactly for rank r (so state_bytes is what is held); reallocated only
    /// when the rank changes, everything allocated before anything is replaced (a failed
    /// allocation leaves the parameter as it was).
    void resize_state(index_t r) {
        const std::size_t basis_size = qbasis.quantized() ? 0 : static_cast<std::size_t>(r * len);   // a quantised basis: install_subspace
        if (r == rank && basis.size() == basis_size) return;
        buffer b, mm, vv;
        b.resize(basis_size);
        if (quantized) {   // contents written by the caller (quantize), as m and v are below
            blockwise_moments<B> q;
            q.resize(r * other, q8.block());
            basis = std::move(b);
            q8 = std::move(q);
            return;
        }
        mm.resize(static_cast<std::size_t>(r * other));
        vv.resize(static_cast<std::size_t>(r * other));
        basis = std::move(b);
        m = std::move(mm);
        v = std::move(vv);
    }

    [[nodiscard]] layer_info info() const {
        layer_info i;
        i.rows = rows;
        i.cols = cols;
        i.low_rank = low_rank;
        i.side = side;
        i.rank = rank;
        i.steps = t;
        i.refreshes = refreshes;
        i.steps_in_subspace = since;
        i.state_bytes = state_bytes();
        i.projected_norm2 = projected_norm2;
        i.last_refresh = last;
        i.communicated_bytes = communicated;
        return i;
    }
};

/// A parameter's progress, bounds and arrays as read from a state blob, before they are
/// committed (host memory).
template <class T>
struct loaded_parameter : parameter_progress, certificate_bounds {
    std::vector<T> basis, m, v;
    blockwise_host_arrays q8;   ///< 8-bit moments: bytes and block absmax
    std::vector<std::uint8_t> basis_codes;   ///< a quantised basis: codes and block scales
    std::vector<float> basis_scales;
    std::vector<double> spectrum;   ///< the budget rank rule only
};

} // namespace adarank
