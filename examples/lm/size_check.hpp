#pragma once
// Whether a run fits: what one training process would allocate for the sizes the flags ask for
// (from memory.hpp's accounting) against this machine's physical memory, checked before the
// corpus loads or anything is forked, so that a run too large fails at once with a message that
// names the flag to blame instead of with std::bad_alloc in every configuration.
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "memory.hpp"
#include "options.hpp"

namespace lm::trainer {

// Sizes. Every flag is at most 10^9 but their products are not bounded: --context 100000 asks
// for batch·heads·context² attention probabilities per layer (TiB), which used to fail with
// std::bad_alloc in every configuration, after the corpus had loaded. check_sizes refuses such a
// run up front; memory.hpp's counts saturate instead of wrapping around.
//
// What one training process allocates, for the configuration of `o.configs` that allocates the
// most: memory.hpp's footprint (weights, gradient buffers, optimizer state at the rank cap,
// activations, the model's other buffers) and the loss curve (a double per step and its text
// form on the way to the parent, ~32 bytes). The library's scratch is not counted (see
// docs/memory.md for how far below the measured peak RSS this is).
// `ranks`: a data-parallel process holds the activations of its --batch / ranks sequences.
inline std::uint64_t process_bytes(const options& o, index_t ranks = 1) {
    const index_t share = std::max<index_t>(o.batch / ranks, 1);
    lm::memory::count most;
    for (const auto& name : o.configs) {
        const lm::memory::count bytes =
            lm::memory::estimate(o.model, velora_for(name, o), share, rank_for(name, o), sizeof(T), adapters_for(name, o), storage_for(name, o)).total() +
            lm::memory::count(o.steps) * 32;
        most = std::max(most.v, bytes.v);
    }
    return most.v;
}

// 0 when the system does not say.
inline std::uint64_t physical_memory_bytes() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? (lm::memory::count(pages) * page).v : 0;
}

inline std::string human_bytes(std::uint64_t bytes) {
    if (bytes == UINT64_MAX) return "more than 16 EiB";
    const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double x = static_cast<double>(bytes);
    int u = 0;
    for (; x >= 1024 && u < 6; ++u) x /= 1024;
    char text[32];
    std::snprintf(text, sizeof text, u ? "%.1f %s" : "%.0f %s", x, units[u]);
    return text;
}

// The limit is physical memory: a training process that does not fit would swap or be killed.
// The error names the flag that is too large on its own (every other flag at its default; most
// often a typo), else every size flag that differs from its default.
inline void check_sizes(const options& o, index_t ranks = 1) {
    const std::uint64_t limit = physical_memory_bytes(), need = process_bytes(o, ranks);
    if (limit == 0 || need <= limit) return;   // unknown limit: the allocation will tell
    struct size_flag {
        const char* name;
        long value, fallback;
        void (*set)(options&, long);
    };
    const options defaults = baseline(o);
    const size_flag flags[] = {
        {"--steps", o.steps, defaults.steps, [](options& x, long v) { x.steps = static_cast<int>(v); }},
        {"--batch", o.batch, defaults.batch, [](options& x, long v) { x.batch = v; }},
        {"--context", o.model.context, defaults.model.context, [](options& x, long v) { x.model.context = v; }},
        {"--d-model", o.model.d_model, defaults.model.d_model, [](options& x, long v) { x.model.d_model = v; }},
        {"--layers", o.model.layers, defaults.model.layers, [](options& x, long v) { x.model.layers = v; }},
        {"--heads", o.model.heads, defaults.model.heads, [](options& x, long v) { x.model.heads = v; }},
        {"--ffn", o.model.ffn, defaults.model.ffn, [](options& x, long v) { x.model.ffn = v; }},
        {"--groups", o.groups, defaults.groups, [](options& x, long v) { x.groups = v; }},
    };
    std::string culprit, changed;
    for (const auto& flag : flags) {
        if (flag.value == flag.fallback) continue;
        const std::string named = std::string(flag.name) + " " + std::to_string(flag.value);
        changed += (changed.empty() ? "" : " ") + named;
        options alone = defaults;
        flag.set(alone, flag.value);
        if (culprit.empty() && process_bytes(defaults, ranks) <= limit && process_bytes(alone, ranks) > limit) culprit = named;
    }
    const std::string sizes = o.preset.empty() ? "the default sizes" : "--preset " + o.preset;
    const std::string who = !culprit.empty()  ? culprit + " needs"
                            : !changed.empty() ? (o.preset.empty() ? "" : "--preset " + o.preset + " with ") + changed + " together need"
                                               : sizes + " need" + (o.preset.empty() ? "" : "s");
    throw std::invalid_argument(who + (need == UINT64_MAX ? " " : " about ") + human_bytes(need) + " of memory per training process (model, optimizer, activations); the " +
                                "limit is this machine's " + human_bytes(limit) + " of physical memory (--estimate prints where it goes)");
}

} // namespace lm::trainer
