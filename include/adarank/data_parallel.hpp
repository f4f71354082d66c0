#pragma once
/// \file
/// The data-parallel pieces of `low_rank_adamw` that are not a step: the bucketed mean of dense
/// gradients over the ranks (all_reduce_mean, as DDP buckets), and the rule that refuses a
/// refresh policy data-parallel training cannot serve. The steps' own reductions are
/// mean_over_ranks.hpp; registration across ranks compares optimizer_state_io's fingerprint.
#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <span>
#include <stdexcept>
#include <string_view>
#include <vector>

#include <velora/core/error.hpp>
#include <velora/core/rng.hpp>
#include <velora/distributed/communicator.hpp>

#include "mean_over_ranks.hpp"
#include "optimizer_workspace.hpp"
#include "parameter.hpp"

namespace adarank {

/// Data-parallel training reads only reduced quantities; the captured_energy rule would need
/// ‖Ḡ‖² at every step, i.e. the full gradient reduced. Refused before anything happens (the same
/// on every rank: the configuration is checked equal at registration).
template <optimizer_backend B, class Refresh, class C>
void check_distributable(const parameter_state<B>& l, const Refresh& refresh, const C& comm, const char* fn) {
    velora::detail::require(comm.size() == 1 || !l.low_rank || !refresh.needs_gradient_norm(), fn,
                            "the refresh policy captured_energy needs the full gradient's norm at every step, which data-parallel training "
                            "could only get by all-reducing the full gradient; use converged or every with ",
                            comm.size(), " ranks");
}

/// low_rank_adamw::all_reduce_mean's work (its documentation is the contract): checks every id
/// and view collectively, then reduces the gradients in place in buckets of at most
/// `bucket_elements` values (one for a larger gradient), counting the bytes per parameter.
template <optimizer_backend B, velora::communicator C>
void all_reduce_mean_bucketed(B& b, optimizer_workspace<B>& ws, std::vector<parameter_state<B>>& layers, std::span<const index_t> ids,
                              std::span<const matrix_view<typename B::value_type>> grads, C& comm, index_t bucket_elements) {
    using T = typename B::value_type;
    constexpr const char* fn = "adarank::low_rank_adamw::all_reduce_mean";
    const auto count = static_cast<index_t>(layers.size());
    bool valid = ids.size() == grads.size() && bucket_elements > 0;
    std::exception_ptr bad_view;   // this rank's first gradient view that check_shape refuses, rethrown after the collective
    std::uint64_t fingerprint = 0x9e3779b97f4a7c15ULL ^ ids.size();
    for (std::size_t i = 0; valid && i < ids.size(); ++i) {
        const index_t id = ids[i];
        valid = id >= 0 && id < count;
        if (valid) {
            char name[32] = "grads[";   // "grads[i]", formed without allocating
            char* end = std::to_chars(name + 6, name + sizeof name - 1, i).ptr;
            *end++ = ']';
            try {
                const parameter_state<B>& l = layers[static_cast<std::size_t>(id)];
                velora::check_shape(grads[i], l.rows, l.cols, fn, std::string_view(name, static_cast<std::size_t>(end - name)));
            } catch (const std::invalid_argument&) {
                valid = false;
                bad_view = std::current_exception();
            }
        }
        fingerprint = velora::mix64(fingerprint ^ static_cast<std::uint64_t>(id));
    }
    const bool consistent = velora::same_on_all_ranks(comm, valid ? fingerprint : 0);
    if (bad_view) std::rethrow_exception(bad_view);   // every other rank throws below
    velora::detail::require(valid && consistent, fn, valid ? "the parameters differ across ranks (ids or their order); this is rank "
                                                          : "invalid arguments (ids and grads must have the same length, each id registered, each "
                                                            "gradient of its parameter's shape, bucket_elements > 0); this is rank ",
                            comm.rank(), " of ", comm.size());
    index_t small = 0;   // the bucket is sized before anything is packed into it
    for (const matrix_view<T>& g : grads)
        if (g.size() < bucket_elements) small = std::min(bucket_elements, small + g.size());
    ws.grow(ws.bucket, small);
    index_t used = 0;
    std::size_t first = 0;   // grads[first..i) are packed in the bucket
    const auto flush = [&](std::size_t end) {
        if (used == 0) return;
        reduce_to_mean(b, comm, ws.view(ws.bucket, 1, used));
        index_t at = 0;
        for (std::size_t j = first; j < end; ++j) {
            const matrix_view<T>& g = grads[j];
            if (g.size() >= bucket_elements) continue;
            for (index_t r = 0; r < g.rows; ++r) b.copy(ws.bucket.data() + at + r * g.cols, g.row(r), g.cols);
            at += g.size();
        }
        used = 0;
    };
    for (std::size_t i = 0; i < grads.size(); ++i) {
        const matrix_view<T>& g = grads[i];
        layers[static_cast<std::size_t>(ids[i])].pending_bytes += static_cast<std::uint64_t>(g.size()) * sizeof(T);
        if (g.size() >= bucket_elements) {   // alone, in place
            reduce_to_mean(b, comm, g);
            continue;
        }
        if (used + g.size() > bucket_elements) {
            flush(i);
            first = i;
        }
        if (used == 0) first = i;
        for (index_t r = 0; r < g.rows; ++r) b.copy(g.row(r), ws.bucket.data() + used + r * g.cols, g.cols);
        used += g.size();
    }
    flush(grads.size());
}

} // namespace adarank
