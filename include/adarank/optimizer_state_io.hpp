#pragma once
/// \file
/// The state format of `low_rank_adamw` (kind "adarank.low_rank_adamw", version 4): what
/// save_state writes and load_state reads and checks, field by field (a struct's padding bytes
/// are never part of it), and the fingerprint data-parallel registration compares across ranks.
/// Version 2 added the Adam convention (version 1 states load as galore); version 3 the moment
/// state format and block size (older states load as float moments) and, for 8-bit moments, the
/// packed arrays in place of m and v: the bytes of m and of v (one per element) and the absmax
/// of m's and of v's blocks (one float per block each). Version 4 the basis format and block size
/// (older states load as float bases) and, for a quantised basis, its codes (rank × row bytes)
/// and block scales (rank × blocks per row, floats) in place of the float basis.
///
/// A valid state (what load_state accepts; every state the optimizer writes is valid):
/// - the envelope is intact (kind, version, checksum, length);
/// - the value width, the configuration and the registered shapes, kinds and sides match;
///   the saved learning rate is one set_learning_rate accepts (finite and >= 0, and lr·wd < 1
///   under the torch convention); flag bytes are 0 or 1;
/// - per parameter: the step count t <= 2^64 − 2 (a step can increment it; a step refuses to
///   go further); the steps in the current subspace <= t, and 0 without a subspace (rank 0);
///   0 <= rank <= min(r_max, rows, cols), and 0 for a dense parameter;
/// - the anchor ‖Ĝ_t0‖² is -1 (not yet known) or finite and >= 0; the last ‖Ĝ‖² is finite
///   and >= 0; the last refresh report has the parameter's rank, 0 <= sketch <= min(rows,
///   cols), 0 <= power iterations <= 64, and finite energies >= 0;
/// - the basis (rank×len) is finite with orthonormal rows: max |B·Bᵀ − I| <=
///   orthonormality_tolerance<T>; both moments are finite and the second one is >= 0 (their
///   size is not bounded: a step whose result would overflow returns status::overflow);
///   8-bit moments: every absmax finite and either 0 or at least the smallest normal float (what
///   the encoder stores); the bytes may hold any value (every byte decodes to a finite value).
///   A quantised basis: every code one the encoder writes (quantized_basis::valid_code_byte),
///   every scale finite, >= 0 and <= (1 + τ)/qmax (a row accepted as orthonormal has no entry
///   beyond 1 + τ; τ = orthonormality_tolerance<T>), and the decoded Q within the quantisation's
///   bound of orthonormal: max |Q·Qᵀ − I| <= 2δ·sqrt(1 + τ) + δ² + τ, δ the largest row's
///   ½·sqrt(Σ_b n_b·s_b²) (quantized_basis::deviation_bound).
/// - under the budget rank rule (rank_policy::budget), each parameter's latest sketched spectrum
///   follows its moments: 0 values, or r_cap values finite, >= 0 and non-increasing (0 without a
///   subspace); and the ranks fit the budget (rank_budget.hpp's count). Fixed and adaptive rank
///   rules save no spectrum.
/// The refresh count and the random-stream position may hold any value.
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <velora/core/serialize.hpp>

#include "config_fields.hpp"
#include "overflow_certificate.hpp"
#include "parameter.hpp"
#include "policies.hpp"
#include "rank_budget.hpp"

namespace adarank {

/// A basis handed to set_basis or found in a loaded state must have orthonormal rows within this
/// tolerance: max |B·Bᵀ − I| (entry-wise, computed in double). The library's own bases are U_Cᵀ·S,
/// one GEMM in T of factors orthonormal to double precision (CholeskyQR2, the Gram eigenvectors)
/// or to T's (the Householder fall-back), so they deviate by a few hundred units of T's rounding at
/// most (~1e-5 in float, ~1e-13 in double for sketches and lengths in the thousands); the
/// tolerance leaves a margin of 100× (float) and 1e5× (double) over that and still rejects what is
/// not a basis (a zero row deviates by 1, a doubled one by 3).
template <class T>
inline constexpr double orthonormality_tolerance = std::numeric_limits<T>::digits <= 24 ? 1e-3 : 1e-8;

template <optimizer_backend B, class Rank, class Refresh>
struct optimizer_state_io {
    using T = typename B::value_type;
    using buffer = typename B::template buffer<T>;
    using config_type = basic_optimizer_config<Rank, Refresh>;
    using cert = overflow_certificate<T>;

    static constexpr std::string_view kind = "adarank.low_rank_adamw";
    // 2: adds the Adam convention; 3: the moment state format (8-bit moments packed); 4: the basis format (quantised bases packed)
    static constexpr std::uint32_t version = 4;

    /// save_state's work: the envelope, the value width, the configuration, the learning rate,
    /// then per parameter its shape, kind, side, progress, basis and moments.
    static std::vector<std::byte> save(B& b, const config_type& config, double lr, const std::vector<parameter_state<B>>& layers) {
        velora::state_writer w(kind, version);
        w.put(static_cast<std::uint8_t>(sizeof(T)));
        // The configuration's learning rate is written as the live one: a state's bytes then do
        // not depend on the rate the optimizer was constructed with (a run resumed from a state
        // saves the same bytes as the run that saved it; load ignores this field).
        config_type written = config;
        written.adam.lr = lr;
        put_config(w, written);
        w.put(lr);
        w.put(static_cast<std::uint64_t>(layers.size()));
        std::vector<T> host;
        for (const parameter_state<B>& l : layers) {
            w.put(static_cast<std::int64_t>(l.rows));
            w.put(static_cast<std::int64_t>(l.cols));
            w.put(static_cast<std::uint8_t>(l.low_rank));
            w.put(static_cast<std::uint8_t>(l.side));
            put_progress(w, l);
            const index_t moment_size = l.low_rank ? l.rank * l.other : l.rows * l.cols;
            if (l.qbasis.quantized()) {
                w.put_array(std::span<const std::uint8_t>(l.qbasis.codes()));
                w.put_array(std::span<const float>(l.qbasis.scales()));
            } else {
                put_buffer(b, w, l.basis, l.low_rank ? l.rank * l.len : 0, host);
            }
            if (l.quantized) {   // backend memory read on the host, as put_buffer reads m and v
                const blockwise_host_arrays q = l.q8.to_host(b);
                w.put_array(std::span<const std::uint8_t>(q.qm));
                w.put_array(std::span<const std::uint8_t>(q.qv));
                w.put_array(std::span<const float>(q.am));
                w.put_array(std::span<const float>(q.av));
                continue;
            }
            put_buffer(b, w, l.m, moment_size, host);
            put_buffer(b, w, l.v, moment_size, host);
            if (uses_rank_budget(config.rank)) w.put_array(std::span<const double>(l.spectrum));
        }
        return std::move(w).finish();
    }

    /// load_state's work (its documentation lists what a valid state is): every check before
    /// anything changes, then the commit; the saved learning rate goes to `live_lr`.
    static void load(B& b, const config_type& config, double& live_lr, std::vector<parameter_state<B>>& layers, std::span<const std::byte> blob,
                     rank_budget_scratch& budget) {
        constexpr const char* fn = "adarank::low_rank_adamw::load_state";
        velora::state_reader r(blob, kind, version, fn);
        const auto width = r.get<std::uint8_t>();
        if (width != sizeof(T)) r.bad("state was saved with ", int(width), "-byte values but this optimizer uses ", sizeof(T));
        config_type saved = get_config<Rank, Refresh>(r, r.version());
        saved.adam.lr = config.adam.lr;
        if (const std::string difference = describe_difference(saved, config); !difference.empty())
            r.bad("state was saved with a different optimizer configuration (", difference, ")");
        const auto lr = r.get<double>();
        const auto count = r.get<std::uint64_t>();
        if (count != layers.size()) r.bad("state holds ", count, " parameters but ", layers.size(), " are registered");
        std::vector<loaded_parameter<T>> loaded(layers.size());
        for (std::size_t i = 0; i < layers.size(); ++i) {
            const parameter_state<B>& l = layers[i];
            loaded_parameter<T>& s = loaded[i];
            const auto rows = r.get<std::int64_t>(), cols = r.get<std::int64_t>();
            const auto low_rank_flag = r.get<std::uint8_t>();
            const auto side = r.get<std::uint8_t>();
            if (low_rank_flag > 1) r.bad("parameter ", i, " has the kind flag ", int(low_rank_flag), " (0 or 1 expected)");
            const bool low_rank = low_rank_flag != 0;
            if (rows != l.rows || cols != l.cols || low_rank != l.low_rank || side != static_cast<std::uint8_t>(l.side))
                r.bad("parameter ", i, " was saved as ", rows, "x", cols, low_rank ? " low-rank" : " dense", " but is registered as ", l.rows,
                      "x", l.cols, l.low_rank ? " low-rank" : " dense");
            static_cast<parameter_progress&>(s) = get_progress(r, i);
            check_progress(r, i, l, s);
            const index_t moment_size = l.low_rank ? s.rank * l.other : l.rows * l.cols;
            if (l.qbasis.quantized()) get_quantized_basis(r, i, l, s);
            else s.basis = r.get_array<T>(l.low_rank ? s.rank * l.len : 0);
            if (l.quantized) {
                get_quantized(r, i, l, moment_size, s);
            } else {
                s.m = r.get_array<T>(moment_size);
                s.v = r.get_array<T>(moment_size);
            }
            if (s.rank > 0 && l.qbasis.quantized()) {
                s.basis_norm = checked_quantized_basis(r, i, l, s);
            } else if (s.rank > 0) {
                const auto check = cert::check_basis(s.basis, s.rank, l.len);
                if (check.bad_row >= 0) r.bad("parameter ", i, " has a basis entry that is not finite at (", check.bad_row, ", ", check.bad_col, ")");
                if (!(check.deviation <= orthonormality_tolerance<T>))
                    r.bad("parameter ", i, ": the basis rows are not orthonormal: max |B·Bᵀ − I| = ", check.deviation, " exceeds the tolerance ",
                          orthonormality_tolerance<T>);
                s.basis_norm = check.norm;
            }
            if (l.quantized) continue;   // bounds set by get_quantized
            const auto m = cert::summarize(s.m), v = cert::summarize(s.v);
            if (!m.finite) r.bad("parameter ", i, ": the first moment has a non-finite entry");
            if (!v.finite || v.negative) r.bad("parameter ", i, ": the second moment has a non-finite or negative entry");
            s.m_bound = m.max_abs;
            s.v_bound = v.max_abs;
            if (uses_rank_budget(config.rank)) get_spectrum(r, i, l, s);
        }
        r.expect_end();
        if (uses_rank_budget(config.rank)) check_budget(r, config, layers, loaded, budget);
        // The rule of the constructor and set_learning_rate: a learning rate neither accepts cannot be loaded either.
        check_learning_rate<velora::state_format_error>(lr, config.adam, fn, "the saved learning rate");
        // Allocate every buffer whose size changes before changing anything (buffers of the right
        // size are reused: loading does not double the memory of dense moments), then commit.
        std::vector<buffer> fresh(3 * layers.size());
        auto live = [&](std::size_t i, int which) -> buffer& {
            return which == 0 ? layers[i].basis : which == 1 ? layers[i].m : layers[i].v;
        };
        auto loaded_part = [&](std::size_t i, int which) -> const std::vector<T>& {
            return which == 0 ? loaded[i].basis : which == 1 ? loaded[i].m : loaded[i].v;
        };
        for (std::size_t i = 0; i < layers.size(); ++i)
            for (int which = 0; which < 3; ++which)
                if (live(i, which).size() != loaded_part(i, which).size()) fresh[3 * i + static_cast<std::size_t>(which)].resize(loaded_part(i, which).size());
        // 8-bit moments: uploaded into new backend memory now, committed by a move below.
        std::vector<blockwise_moments<B>> fresh8(layers.size());
        for (std::size_t i = 0; i < layers.size(); ++i)
            if (layers[i].quantized)
                fresh8[i] = blockwise_moments<B>::upload(b, static_cast<index_t>(loaded[i].q8.qm.size()), config.state_block, loaded[i].q8);
        for (std::size_t i = 0; i < layers.size(); ++i) {
            if (layers[i].qbasis.quantized()) layers[i].qbasis.adopt(loaded[i].rank, std::move(loaded[i].basis_codes), std::move(loaded[i].basis_scales));
            if (layers[i].quantized) layers[i].q8 = std::move(fresh8[i]);
            for (int which = 0; which < 3; ++which) {
                if (which > 0 && layers[i].quantized) continue;
                buffer& target = live(i, which);
                const std::vector<T>& source = loaded_part(i, which);
                if (target.size() != source.size()) target = std::move(fresh[3 * i + static_cast<std::size_t>(which)]);
                b.copy_from_host(source.data(), target.data(), static_cast<index_t>(source.size()));
            }
            static_cast<parameter_progress&>(layers[i]) = loaded[i];
            // The certificate's bounds are not saved: they are recomputed exactly from the arrays.
            layers[i].m_bound = loaded[i].m_bound;
            layers[i].v_bound = loaded[i].v_bound;
            layers[i].basis_norm = loaded[i].basis_norm;
            if (uses_rank_budget(config.rank)) layers[i].spectrum.assign(loaded[i].spectrum.begin(), loaded[i].spectrum.end());
        }
        live_lr = lr;
    }

    /// What every rank must agree on about a parameter just registered as `id`: its index, shape,
    /// kind and side, and the configuration; never 0 (the value of a failed registration).
    static std::uint64_t registration_fingerprint(const config_type& config, index_t id, const parameter_state<B>& l) {
        velora::state_writer w("adarank.registration", 1);
        put_config(w, config);
        w.put(static_cast<std::int64_t>(id));
        w.put(static_cast<std::int64_t>(l.rows));
        w.put(static_cast<std::int64_t>(l.cols));
        w.put(static_cast<std::uint8_t>(l.low_rank));
        w.put(static_cast<std::uint8_t>(l.side));
        const std::vector<std::byte> blob = std::move(w).finish();
        return velora::fnv1a64(blob) | 1;
    }

    // 8-bit moments: n bytes of m and of v, then the absmax of their blocks (see load_state for the rules).
    static void get_quantized(velora::state_reader& r, std::size_t i, const parameter_state<B>& l, index_t n, loaded_parameter<T>& s) {
        const index_t block = l.q8.block(), blocks = (n + block - 1) / block;
        s.q8.qm = r.get_array<std::uint8_t>(n);
        s.q8.qv = r.get_array<std::uint8_t>(n);
        s.q8.am = r.get_array<float>(blocks);
        s.q8.av = r.get_array<float>(blocks);
        double m_bound = 0, v_bound = 0;
        for (int which = 0; which < 2; ++which)
            for (const float a : which == 0 ? s.q8.am : s.q8.av) {
                if (!(std::isfinite(a) && (a == 0.0f || a >= std::numeric_limits<float>::min())))
                    r.bad("parameter ", i, ": an 8-bit block of the ", which == 0 ? "first" : "second", " moment has the absmax ", a,
                          " (finite and 0 or at least ", std::numeric_limits<float>::min(), " expected)");
                (which == 0 ? m_bound : v_bound) = std::max(which == 0 ? m_bound : v_bound, static_cast<double>(a));
            }
        s.m_bound = m_bound;
        s.v_bound = v_bound;
    }

    // A quantised basis: rank × row bytes of codes, then rank × blocks per row scales (see load_state for the rules).
    static void get_quantized_basis(velora::state_reader& r, std::size_t i, const parameter_state<B>& l, loaded_parameter<T>& s) {
        const quantized_basis& shape = l.qbasis;
        const basis_format f = shape.format();
        s.basis_codes = r.get_array<std::uint8_t>(s.rank * shape.row_bytes());
        s.basis_scales = r.get_array<float>(s.rank * shape.blocks_per_row());
        const bool odd = f == basis_format::int4 && shape.len() % 2 != 0;
        for (std::size_t k = 0; k < s.basis_codes.size(); ++k) {
            const bool half = odd && (k + 1) % static_cast<std::size_t>(shape.row_bytes()) == 0;   // an odd row's last byte
            if (!quantized_basis::valid_code_byte(f, s.basis_codes[k], half))
                r.bad("parameter ", i, ": the quantised basis has the code byte ", int(s.basis_codes[k]), " at ", k, ", which the encoder never writes");
        }
        // Entries of a row accepted as orthonormal (|P·Pᵀ − I| <= the tolerance) are at most
        // sqrt(1 + tolerance) <= 1 + tolerance in magnitude, and the scale is absmax/qmax.
        const double most = (1.0 + orthonormality_tolerance<T>) / basis_qmax(f);
        for (const float x : s.basis_scales)
            if (!(std::isfinite(x) && x >= 0 && x <= most))
                r.bad("parameter ", i, ": the quantised basis has the block scale ", x, " (finite, >= 0 and <= (1 + ", orthonormality_tolerance<T>,
                      ")/", basis_qmax(f), " expected)");
    }

    // Q decoded and checked against the quantisation's bound of orthonormal; returns ‖Q‖_F's bound.
    static double checked_quantized_basis(const velora::state_reader& r, std::size_t i, const parameter_state<B>& l, const loaded_parameter<T>& s) {
        if constexpr (std::is_same_v<T, float>) {
            quantized_basis q;
            q.configure(l.qbasis.format(), l.len, l.qbasis.block());
            q.adopt(s.rank, s.basis_codes, s.basis_scales);
            std::vector<float> values(static_cast<std::size_t>(s.rank * l.len));
            q.decode(values.data(), l.len);
            const auto check = cert::check_basis(values, s.rank, l.len);
            const double tolerance = q.deviation_bound(orthonormality_tolerance<T>);
            if (!(check.deviation <= tolerance))
                r.bad("parameter ", i, ": the quantised basis is not within its quantisation of orthonormal rows: max |Q·Qᵀ − I| = ", check.deviation,
                      " exceeds ", tolerance);
            return check.norm;
        } else {
            r.bad("parameter ", i, ": a quantised basis needs float values");   // the constructor refuses the configuration
        }
    }

    static void put_buffer(B& b, velora::state_writer& w, const buffer& buf, index_t n, std::vector<T>& host) {
        host.resize(static_cast<std::size_t>(n));
        b.copy_to_host(buf.data(), host.data(), n);
        w.put_array(std::span<const T>(host));
    }

    // Field by field: a struct's padding bytes are not part of the format.
    static void put_progress(velora::state_writer& w, const parameter_progress& p) {
        w.put(static_cast<std::int64_t>(p.rank));
        w.put(p.t);
        w.put(p.since);
        w.put(p.refreshes);
        w.put(p.counter);
        w.put(p.anchor2);
        w.put(p.projected_norm2);
        put_report(w, p.last);
    }
    static parameter_progress get_progress(velora::state_reader& r, std::size_t i) {
        parameter_progress p;
        p.rank = static_cast<index_t>(r.get<std::int64_t>());
        p.t = r.get<std::uint64_t>();
        p.since = r.get<std::uint64_t>();
        p.refreshes = r.get<std::uint64_t>();
        p.counter = r.get<std::uint64_t>();
        p.anchor2 = r.get<double>();
        p.projected_norm2 = r.get<double>();
        p.last = get_report(r, i);
        return p;
    }

    // The counters, rank, norms and report of a loaded parameter (see load_state for the rules).
    static void check_progress(const velora::state_reader& r, std::size_t i, const parameter_state<B>& l, const parameter_progress& p) {
        if (p.t > cert::max_steps) r.bad("parameter ", i, " has the step count t = ", p.t, ", which cannot be incremented (at most ", cert::max_steps, ")");
        const index_t cap = l.low_rank ? l.r_cap : 0;
        if (p.rank < 0 || p.rank > cap) r.bad("parameter ", i, " has the invalid rank ", p.rank, " (at most ", cap, ")");
        if (p.since > p.t) r.bad("parameter ", i, " has ", p.since, " steps in the subspace but only ", p.t, " steps");
        if (p.rank == 0 && p.since != 0) r.bad("parameter ", i, " has ", p.since, " steps in the subspace but no subspace");
        if (!(p.anchor2 == -1.0 || (std::isfinite(p.anchor2) && p.anchor2 >= 0)))
            r.bad("parameter ", i, " has the anchor ‖Ĝ_t0‖² = ", p.anchor2, ", neither -1 (not yet known) nor finite and >= 0");
        if (!(std::isfinite(p.projected_norm2) && p.projected_norm2 >= 0))
            r.bad("parameter ", i, " has the projected gradient energy ‖Ĝ‖² = ", p.projected_norm2, ", not finite and >= 0");
        const subspace_report& rep = p.last;
        if (rep.rank != p.rank) r.bad("parameter ", i, " has rank ", p.rank, " but its last refresh report has rank ", rep.rank);
        if (rep.sketch < 0 || rep.sketch > std::min(l.rows, l.cols))
            r.bad("parameter ", i, " has the report sketch size ", rep.sketch, " outside [0, ", std::min(l.rows, l.cols), "]");
        if (rep.power_iterations < 0 || rep.power_iterations > 64)
            r.bad("parameter ", i, " has the report power iterations ", rep.power_iterations, " outside [0, 64]");
        if (!(std::isfinite(rep.energy) && rep.energy >= 0)) r.bad("parameter ", i, " has the report energy ", rep.energy, ", not finite and >= 0");
        if (!(std::isfinite(rep.captured) && rep.captured >= 0))
            r.bad("parameter ", i, " has the report captured energy ", rep.captured, ", not finite and >= 0");
    }

    // The budget rule's spectrum of a parameter (saved only under that rule): none, or r_cap
    // values, finite, >= 0 and non-increasing (as the sketch's SVD gives them), none without a
    // subspace.
    static void get_spectrum(velora::state_reader& r, std::size_t i, const parameter_state<B>& l, loaded_parameter<T>& s) {
        s.spectrum = r.get_array<double>();
        const std::size_t count = s.spectrum.size();
        if (count != 0 && count != static_cast<std::size_t>(l.r_cap))
            r.bad("parameter ", i, " has a spectrum of ", count, " values (0 or ", l.r_cap, " expected)");
        if (count != 0 && s.rank == 0) r.bad("parameter ", i, " has a spectrum but no subspace");
        for (std::size_t k = 0; k < s.spectrum.size(); ++k) {
            const double x = s.spectrum[k];
            if (!(std::isfinite(x) && x >= 0)) r.bad("parameter ", i, " has the spectrum value ", x, " at ", k, ", not finite and >= 0");
            if (k > 0 && x > s.spectrum[k - 1]) r.bad("parameter ", i, "'s spectrum increases at ", k, ": ", s.spectrum[k - 1], " then ", x);
        }
    }

    // Under the budget rule the loaded ranks must fit the budget (a state the optimizer can be in).
    static void check_budget(const velora::state_reader& r, const config_type& config, const std::vector<parameter_state<B>>& layers,
                             const std::vector<loaded_parameter<T>>& loaded, rank_budget_scratch& budget) {
        if constexpr (std::is_same_v<Rank, rank_policy>) {
            std::vector<parameter_state<B>> shapes;   // the loaded ranks on the registered shapes (no buffers)
            shapes.reserve(layers.size());
            for (std::size_t i = 0; i < layers.size(); ++i) {
                parameter_state<B> c;
                c.rows = layers[i].rows;
                c.cols = layers[i].cols;
                c.low_rank = layers[i].low_rank;
                c.len = layers[i].len;
                c.other = layers[i].other;
                c.r_cap = layers[i].r_cap;
                c.rank = loaded[i].rank;
                shapes.push_back(std::move(c));
            }
            const std::uint64_t held = budget_held_bytes(config.rank, std::span<const parameter_state<B>>(shapes), budget);
            if (held > config.rank.budget_bytes)
                r.bad("the state's ranks hold ", held, " bytes of optimizer state, over config.rank.budget_bytes = ", config.rank.budget_bytes);
        }
    }

    static void put_report(velora::state_writer& w, const subspace_report& rep) {
        w.put(static_cast<std::int64_t>(rep.rank));
        w.put(static_cast<std::int64_t>(rep.sketch));
        w.put(static_cast<std::int32_t>(rep.power_iterations));
        w.put(static_cast<std::uint8_t>(rep.exact));
        w.put(static_cast<std::uint8_t>(rep.warm));
        w.put(rep.energy);
        w.put(rep.captured);
    }
    static subspace_report get_report(velora::state_reader& r, std::size_t i) {
        subspace_report rep;
        rep.rank = static_cast<index_t>(r.get<std::int64_t>());
        rep.sketch = static_cast<index_t>(r.get<std::int64_t>());
        rep.power_iterations = r.get<std::int32_t>();
        const auto exact = r.get<std::uint8_t>(), warm = r.get<std::uint8_t>();
        // Only 0 and 1 are written; any other byte would not re-save to the same blob.
        if (exact > 1 || warm > 1) r.bad("parameter ", i, " has a report flag byte ", int(exact > 1 ? exact : warm), " (0 or 1 expected)");
        rep.exact = exact != 0;
        rep.warm = warm != 0;
        rep.energy = r.get<double>();
        rep.captured = r.get<double>();
        return rep;
    }
};

} // namespace adarank
