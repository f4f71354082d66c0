#pragma once
// The trainer's configurations: what a name on the command line means for the optimizer and for
// VeLoRA. A configuration is one of the five named ones, optionally followed by changes:
//
//   NAME[:key=value[,key=value...]]      e.g. galore:r=16   adarank:xi=0.1,r=64   galore:transport=rotation
//
//   adamw            dense AdamW, exact activations (the baseline)
//   galore           GaLore: fixed rank, refresh every 200 steps by exact SVD, moments reused
//   velora           VeLoRA records for the value and MLP-down inputs, dense AdamW
//   adarank          AdaRankGrad: the library's defaults (adaptive rank, ξ = 0.05), refresh on convergence (ε = 0.5, 50-200
//                    steps), moments transported (squared rotation), randomized SVD
//   velora+adarank   both; the optimizer consumes VeLoRA's factored gradients (no dense dW)
// and for fine-tuning a model given with --init (galore, adarank and velora+adarank are then
// full fine-tuning with projected moments):
//   full             dense AdamW on every weight (adamw under the name the fine-tuning papers use)
//   lora             LoRA (PEFT): every projection q, k, v, o, gate, up, down frozen with adapters
//                    r = 8, α = 16, dropout 0.05 on the adapter input (the official VeLoRA
//                    fine-tuning script's defaults; its 7B run uses r = 32, dropout 0.1); AdamW on
//                    the adapters only: the embeddings (and the tied head) and the RMSNorm gains stay frozen
//   velora+lora      lora with the adapter inputs of v and down kept as VeLoRA records (G = --groups,
//                    VeLoRA scale 0.1 on A's gradient: the paper's fine-tuning)
//   qlora            lora over NF4 projections (double quantisation; embeddings and gains in float)
//   velora+qlora     both
//
// Keys (every one but lr, warmup, state and weights only for the low-rank names galore, adarank, velora+adarank):
//   lr=X             learning rate (default: --lr for the full-rank names, --lr-low-rank for the low-rank ones,
//                    --lr-lora for the LoRA ones)
//   warmup=N         the learning rate rises linearly over the first N steps, then stays (default 0:
//                    constant from the first step)
//   r=N              GaLore's rank, AdaRankGrad's rank cap (default --rank)
//   rank=fixed|adaptive            the rank rule (fixed: r; adaptive: the smallest rank that keeps
//                                  all but ξ² of the gradient's energy, at most r)
//   xi=X             ξ of the adaptive rule (default: the library's, 0.05); implies rank=adaptive
//   rank=budget      the library's global memory budget (rank_policy::budget): the ranks of all
//                    matrices chosen together, at most r each, to keep the most gradient energy
//                    with the optimizer state never above `budget`
//   budget=BYTES|rN  the budget in bytes, or rN: the bytes GaLore's uniform rank N holds on this
//                    model (resolved when the model's shapes are known); implies rank=budget
//   refresh=every|converged        refresh every `interval` steps, or when ‖Ĝ‖ fell to eps·‖Ĝ at the
//                                  first step in the subspace‖ (after 50 steps, at the latest after `interval`)
//   interval=N       (default 200)   eps=X   the convergence threshold (default 0.5)
//   transport=rotation|clamped|none|reset   what the moments become on a refresh
//   svd=exact|randomized           the refresh's decomposition
//   scale=X          α, the update's scale (default 0.25)
//   state=8bit|float the Adam moments: 8-bit blockwise (blocks of 256; docs/adarankgrad.md) or float (default)
//   basis=int8|int4|float  the low-rank projection bases: quantised to 8 or 4 bits with a float scale per
//                    block of 256 of a row (Q-GaLore's INT4 projection; adarank/basis_format.hpp), or float
//                    (default); not with rank=budget (the library's rule: the budget counts float bases)
//   weights=bf16|bf16-nearest|float  the weights as a host keeping only bf16 would have them: every
//                    step is the library's bf16-weight step (docs/adarankgrad.md "bf16 weights": the
//                    weight rounded to bf16 after it, stochastically (bf16) or to nearest); the demo keeps
//                    its float buffers, holding bf16 values, so the run is the bf16 host's bit for bit
// and for the LoRA names (lora, velora+lora, qlora, velora+qlora), with lr and warmup:
//   r=N              the adapters' rank (default 8)      alpha=X   α, the scaling α/r (default 16)
//   dropout=X        on the adapter input, in [0, 1) (default 0.05)
//   velora_scale=X   VeLoRA's scale on A's compressed gradient (velora+ names only; default 0.1)
// (A later key rank=budget, a global byte budget for the low-rank ranks, would join `rank`.)
//
// One key changes one ingredient, so an ablation is spelt as the configuration it starts from and
// the ingredient it changes: `galore:rank=adaptive` is GaLore with AdaRankGrad's rank rule and
// nothing else of AdaRankGrad. The full spelling is the configuration's name in the table, the
// JSON and the plot.
#include <adarank/adarank.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "memory.hpp"
#include "model.hpp"

namespace lm::configs {

using velora::index_t;

inline const std::vector<std::string> names = {"adamw", "galore", "velora", "adarank", "velora+adarank"};
/// The fine-tuning configurations (a model given with --init), in the order of their table.
inline const std::vector<std::string> finetune_names = {"full", "lora", "velora+lora", "qlora", "velora+qlora", "galore", "adarank", "velora+adarank"};
/// Every name parse() knows.
inline const std::vector<std::string> known_names = {"adamw", "galore", "velora", "adarank", "velora+adarank", "full", "lora", "velora+lora",
                                                     "qlora", "velora+qlora"};

// What a configuration is; `parse` builds it from a name and the trainer's defaults.
struct config {
    std::string name;   ///< as written (the key of the results)
    std::string base;   ///< one of `names`
    bool velora = false, low_rank = false;
    bool lora = false;         ///< lora, velora+lora, qlora, velora+qlora: adapters on frozen projections (adapters below)
    lm::adapter_config adapters{};
    bool fixed_rank = false;   ///< GaLore-like: the optimizer state is known before training (memory.hpp)
    index_t rank = 0;          ///< GaLore's rank, AdaRankGrad's cap; 0 for the full-rank names
    index_t warmup = 0;        ///< steps of linear learning-rate warm-up (lr_at)
    std::optional<velora::bf16_rounding> bf16_weights;   ///< weights=bf16|bf16-nearest: how each step's weights are rounded to bf16
    index_t budget_rank = 0;   ///< rank=budget with budget=rN: the budget is GaLore's state at rank N (budget_bytes_at_rank)
    adarank::optimizer_config optimizer{};
};

// The flags a configuration starts from.
struct defaults {
    index_t rank = 32;
    double lr = 5e-4, lr_low_rank = 2e-2;   // the trainer's --lr and --lr-low-rank defaults
    double lr_lora = 4e-3;                   // its --lr-lora default
};

namespace detail {

[[noreturn]] inline void bad(const std::string& name, const std::string& why) {
    throw std::invalid_argument("configuration '" + name + "': " + why);
}

inline double number(const std::string& name, const std::string& key, const std::string& text, double lo, double hi, bool lo_open) {
    char* end = nullptr;
    const double x = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || !(lo_open ? x > lo : x >= lo) || !(x <= hi))
    {
        char range[64];
        std::snprintf(range, sizeof range, "%s%g, %g]", lo_open ? "(" : "[", lo, hi);
        bad(name, key + "=" + text + " is not a number in " + range);
    }
    return x;
}

inline index_t count(const std::string& name, const std::string& key, const std::string& text) {
    const double x = number(name, key, text, 1, 1e9, false);
    if (x != static_cast<double>(static_cast<index_t>(x))) bad(name, key + "=" + text + " is not a whole number");
    return static_cast<index_t>(x);
}

} // namespace detail

// Throws std::invalid_argument naming the configuration, the key and what is wrong.
inline config parse(const std::string& name, const defaults& d) {
    using namespace adarank;
    config c;
    c.name = name;
    const auto colon = name.find(':');
    c.base = name.substr(0, colon);
    if (std::find(known_names.begin(), known_names.end(), c.base) == known_names.end()) {
        std::string known;
        for (const auto& n : known_names) known += (known.empty() ? "" : ", ") + n;
        detail::bad(name, "unknown configuration '" + c.base + "' (known: " + known + ")");
    }
    c.velora = c.base == "velora" || c.base == "velora+adarank" || c.base == "velora+lora" || c.base == "velora+qlora";
    c.lora = c.base == "lora" || c.base == "velora+lora" || c.base == "qlora" || c.base == "velora+qlora";
    if (c.lora) {
        c.adapters.on = true;
        c.adapters.nf4 = c.base == "qlora" || c.base == "velora+qlora";
    }
    c.low_rank = c.base == "galore" || c.base == "adarank" || c.base == "velora+adarank";
    c.rank = c.low_rank ? d.rank : 0;
    c.fixed_rank = c.base == "galore";
    double xi = rank_policy{}.xi, eps = 0.5;
    index_t interval = 200;
    bool refresh_every = c.base == "galore";
    bool budget = false;
    std::uint64_t budget_bytes = 0;
    if (c.base == "galore") c.optimizer = optimizer_config::galore(d.rank, interval, 0.25);
    c.optimizer.adam.lr = c.low_rank ? d.lr_low_rank : c.lora ? d.lr_lora : d.lr;
    c.optimizer.adam.weight_decay = 0.0;
    if (colon != std::string::npos) {
        const std::string changes = name.substr(colon + 1);
        if (changes.empty()) detail::bad(name, "nothing after ':' (expected key=value[,key=value...])");
        std::vector<std::string> seen;
        for (std::size_t begin = 0; begin <= changes.size();) {
            const std::size_t end = std::min(changes.find(',', begin), changes.size());
            const std::string item = changes.substr(begin, end - begin);
            begin = end + 1;
            const auto eq = item.find('=');
            if (eq == std::string::npos || eq == 0) detail::bad(name, "'" + item + "' is not key=value");
            const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
            if (std::find(seen.begin(), seen.end(), key) != seen.end()) detail::bad(name, "key '" + key + "' given twice");
            seen.push_back(key);
            const bool lora_key = key == "r" || key == "alpha" || key == "dropout" || key == "velora_scale";
            if (c.lora && key != "lr" && key != "warmup" && !lora_key)
                detail::bad(name, "key '" + key + "' is not a LoRA key (lr, warmup, r, alpha, dropout" + std::string(c.velora ? ", velora_scale" : "") + ")");
            if (c.lora && key == "velora_scale" && !c.velora) detail::bad(name, "key 'velora_scale' is for velora+lora and velora+qlora");
            if (key != "lr" && key != "warmup" && key != "state" && key != "weights" && !c.low_rank && !c.lora)
                detail::bad(name, "key '" + key + "' is for the low-rank configurations (galore, adarank, velora+adarank)" +
                                      std::string(lora_key ? " and the LoRA ones (lora, velora+lora, qlora, velora+qlora)" : ""));
            auto choose = [&](std::initializer_list<const char*> options) {
                std::string list;
                for (const char* o : options) {
                    if (value == o) return value;
                    if (!list.empty()) list += '|';   // (not "|" + std::string: GCC 12 warns -Wrestrict on that, a false positive)
                    list += o;
                }
                detail::bad(name, key + "=" + value + ": expected " + list);
            };
            if (key == "lr") c.optimizer.adam.lr = detail::number(name, key, value, 0, 10, true);
            else if (key == "warmup") c.warmup = value == "0" ? 0 : detail::count(name, key, value);
            else if (key == "r" && c.lora) c.adapters.rank = detail::count(name, key, value);
            else if (key == "alpha") c.adapters.alpha = detail::number(name, key, value, 0, 1e6, true);
            else if (key == "dropout") c.adapters.dropout = detail::number(name, key, value, 0, 0.99, false);
            else if (key == "velora_scale") c.adapters.velora_scale = detail::number(name, key, value, 0, 100, true);
            else if (key == "r") c.rank = detail::count(name, key, value);
            else if (key == "rank") {
                const std::string rule = choose({"fixed", "adaptive", "budget"});
                c.fixed_rank = rule == "fixed";
                budget = rule == "budget";
            } else if (key == "budget") {
                if (!value.empty() && value[0] == 'r') {
                    c.budget_rank = detail::count(name, key, value.substr(1));
                } else {
                    const double bytes = detail::number(name, key, value, 1, 1e15, false);
                    if (bytes != std::floor(bytes)) detail::bad(name, key + "=" + value + " is not a whole number of bytes");
                    budget_bytes = static_cast<std::uint64_t>(bytes);
                }
            }
            else if (key == "xi") xi = detail::number(name, key, value, 0, 0.999999, false);
            else if (key == "refresh") refresh_every = choose({"every", "converged"}) == "every";
            else if (key == "interval") interval = detail::count(name, key, value);
            else if (key == "eps") eps = detail::number(name, key, value, 0, 1, false);
            else if (key == "transport") {
                const std::string t = choose({"rotation", "clamped", "none", "reset"});
                c.optimizer.transport = t == "rotation" ? transport_policy::squared_rotation
                                      : t == "clamped"  ? transport_policy::clamped_rotation
                                      : t == "none"     ? transport_policy::none
                                                        : transport_policy::reset;
            } else if (key == "svd") {
                const bool exact = choose({"exact", "randomized"}) == "exact";
                c.optimizer.rsvd = rsvd_config{};
                if (exact) {
                    c.optimizer.rsvd.warm_start = false;
                    c.optimizer.rsvd.exact_fraction = 0.0;
                }
            } else if (key == "scale") c.optimizer.scale = detail::number(name, key, value, 0, 100, true);
            else if (key == "state")
                c.optimizer.state = choose({"8bit", "float"}) == "8bit" ? adarank::state_format::int8_blockwise : adarank::state_format::float32;
            else if (key == "basis") {
                const std::string b = choose({"int8", "int4", "float"});
                c.optimizer.basis = b == "int8" ? adarank::basis_format::int8 : b == "int4" ? adarank::basis_format::int4 : adarank::basis_format::float32;
            } else if (key == "weights") {
                const std::string w = choose({"bf16", "bf16-nearest", "float"});
                if (w == "float") c.bf16_weights.reset();
                else c.bf16_weights = w == "bf16" ? velora::bf16_rounding::stochastic : velora::bf16_rounding::nearest;
            } else detail::bad(name, "unknown key '" + key + "' (known: lr, warmup, r, rank, xi, budget, refresh, interval, eps, transport, svd, scale, state, basis, weights; LoRA: alpha, dropout, velora_scale)");
        }
        const auto given = [&](const char* key) { return std::find(seen.begin(), seen.end(), key) != seen.end(); };
        if (given("xi")) {
            if (given("rank") && c.fixed_rank) detail::bad(name, "xi is for rank=adaptive");
            c.fixed_rank = false;
        }
        if (refresh_every && given("eps")) detail::bad(name, "eps is for refresh=converged");
        if (given("budget")) {
            if (given("rank") && !budget) detail::bad(name, "budget is for rank=budget");
            budget = true;
        } else if (budget) {
            detail::bad(name, "rank=budget needs budget=BYTES or budget=rN");
        }
        if (budget && given("xi")) detail::bad(name, "xi is for rank=adaptive, not rank=budget");
        if (budget) c.fixed_rank = false;
    }
    if (c.low_rank) {
        // budget=rN: a placeholder of 1 byte until the trainer knows the shapes (budget_bytes_at_rank).
        c.optimizer.rank = budget            ? rank_policy::budget(c.budget_rank > 0 ? 1 : budget_bytes, 1, c.rank)
                           : c.fixed_rank ? rank_policy::fixed(c.rank)
                                          : rank_policy::adaptive(xi, 1, c.rank);
        c.optimizer.refresh = refresh_every ? refresh_policy::every(interval) : refresh_policy::converged(eps, std::min<index_t>(50, interval), interval);
    }
    try {
        validate(c.optimizer, "lm_train");
    } catch (const std::invalid_argument& e) {
        detail::bad(name, e.what());
    }
    return c;
}

// The optimizer-state bytes of GaLore's uniform rank `rank` over `shapes` (rows, cols, low-rank?)
// under the configuration's side rule, in values of `value_bytes`: what budget=rN means.
inline std::uint64_t budget_bytes_at_rank(const config& c, index_t rank, const std::vector<std::tuple<index_t, index_t, bool>>& shapes,
                                          std::size_t value_bytes) {
    std::uint64_t sum = 0;
    for (const auto& [rows, cols, low_rank] : shapes) {
        if (!low_rank) {
            sum += 2 * static_cast<std::uint64_t>(rows * cols) * value_bytes;
            continue;
        }
        const bool left = adarank::choose_side(c.optimizer.side, rows, cols) == adarank::projection_side::left;
        const index_t len = left ? rows : cols, other = left ? cols : rows;
        const index_t r = std::min({rank, c.rank, rows, cols});
        sum += static_cast<std::uint64_t>(r * (len + 2 * other)) * value_bytes;
    }
    return sum;
}

// How `c` (a library configuration) stores the optimizer state, as memory.hpp counts it.
inline lm::memory::state_storage storage_of(const adarank::optimizer_config& c) {
    lm::memory::state_storage s;
    if (c.state == adarank::state_format::int8_blockwise) s.state_block = c.state_block;
    if (c.basis != adarank::basis_format::float32) {
        s.basis_bits = c.basis == adarank::basis_format::int8 ? 8 : 4;
        s.basis_block = c.basis_block;
    }
    return s;
}

// The learning rate of step `step` (0-based): the configuration's, ramped over its warm-up.
inline double lr_at(const config& c, long step) {
    const double lr = c.optimizer.adam.lr;
    return c.warmup > 0 && step < c.warmup ? lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup) : lr;
}

// What the model records with VeLoRA (the value and MLP-down inputs, the VeLoRA paper's choice
// for LLaMA; with share_qkv q, k and v share the value input's record; for the LoRA names the
// adapter inputs of v and down, share_qkv not applying).
inline lm::velora_config velora_of(const config& c, index_t groups, bool share_qkv) {
    lm::velora_config vc;
    vc.value = vc.down = c.velora;
    vc.share_qkv = c.velora && share_qkv && !c.lora;
    vc.groups = groups;
    return vc;
}

} // namespace lm::configs
