#pragma once
/// \file
/// `share_first_batch_v`: the same VeLoRA projection vector v on every rank of a data-parallel
/// run. The records, the factored gradients c·A·(I ⊗ vᵀ) and their projections are linear in
/// each rank's data only when every rank projects onto the same v; with the default
/// v_mode::first_batch_mean each rank would otherwise take the mean of its own first batch.
/// This sets v to the normalised mean of the sub-tokens of the first batches of ALL ranks, i.e.
/// what one process would compute from the global first batch (summed in T, rank by rank).
///
/// Call it on every rank, with that rank's first-batch input of the layer, before the first
/// compress (or at any time, to replace v). Modes that change v at every batch (batch_mean,
/// ema) have no shared v without a collective per compress and are refused; random(seed) and
/// given are the same on every rank already. With a rule of the host's own (v_rule.hpp), it is
/// accepted when it takes v from a batch only before the first v (uses_batch is false once
/// initialised) and has no v of its own at construction, as first_batch_mean and given.
#include <span>
#include <vector>

#include "../compressor.hpp"
#include "communicator.hpp"

namespace velora {

/// Returns status::ok; when the reduced sum is not finite, status::non_finite_input if some rank's
/// x holds a NaN or an Inf, status::overflow if every x is finite (the sum overflows T), as
/// compress reports the same batch; status::degenerate_input when the sum is zero (nothing to
/// normalise); each on every rank, v unchanged. Throws std::invalid_argument for a wrong width or
/// a rule other than first_batch_mean or given (or one that behaves as they do, above).
template <backend B, class Rule, communicator C>
status share_first_batch_v(B& backend, compressor<B, Rule>& comp, const_matrix_view<typename B::value_type> x, C& comm) {
    using T = typename B::value_type;
    constexpr const char* fn = "velora::share_first_batch_v";
    check_view(x, fn, "x");
    detail::require(x.cols == comp.features(), fn, "argument 'x' has ", x.cols, " columns but the compressor was built for D = ", comp.features());
    const index_t s = comp.subtoken_size();
    {
        // Asked of the rule for a v that exists (any unit vector: the library's rules do not look).
        std::vector<T> unit(static_cast<std::size_t>(s), T(0));
        unit[0] = T(1);
        std::vector<double> probe(static_cast<std::size_t>(s));
        const auto& rule = comp.config().v;
        detail::require(!rule.uses_batch(v_current<T>{unit, true, 1}) && !rule.initial_v(probe), fn, "the compressor's v rule is ",
                        rule.name(), "; a v shared by all ranks needs first_batch_mean or given (a rule that keeps v once set)");
    }
    typename B::template buffer<T> sum;
    sum.resize(static_cast<std::size_t>(s));
    backend.sum_subtokens(x, s, sum.data());
    comm.all_reduce_sum(std::span<T>(sum.data(), static_cast<std::size_t>(s)));
    std::vector<T> host(static_cast<std::size_t>(s));
    backend.copy_to_host(sum.data(), host.data(), s);
    bool usable = false, finite = true;
    for (const T e : host) {
        finite = finite && std::isfinite(e);
        usable = usable || e != T(0);
    }
    if (!finite) {
        // The same bits on every rank, so every rank is here; each tells its own batch apart as
        // compress does, and one collective gives every rank the same answer.
        const bool local_non_finite = comp.classify_failure(x) == status::non_finite_input;
        return comm.any(local_non_finite) ? status::non_finite_input : status::overflow;
    }
    if (!usable) return status::degenerate_input;
    comp.set_v(std::span<const T>(host));   // normalises
    return status::ok;
}

} // namespace velora
