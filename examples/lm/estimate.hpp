#pragma once
// --estimate: the memory each configuration would take for the sizes of the flags, printed and
// written as JSON from memory.hpp's accounting, without training (docs/memory.md).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "memory.hpp"
#include "options.hpp"
#include "output.hpp"
#include "report.hpp"

namespace lm::trainer {

// The budget of a budget-rule configuration (rank=budget) on the model of the flags: budget=BYTES
// as given, budget=rN GaLore's state at rank N on these shapes (as the trainer resolves it,
// training.hpp); 0 for any other rule.
inline std::uint64_t estimated_budget(const std::string& name, const options& o) {
    namespace mem = lm::memory;
    const auto c = config_of(name, o);
    if (!c.optimizer.rank.is_budget()) return 0;
    if (c.budget_rank <= 0) return c.optimizer.rank.budget_bytes;
    std::vector<std::tuple<index_t, index_t, bool>> shapes;
    for (const auto& p : mem::embedding_parameters(o.model)) shapes.emplace_back(p.rows, p.cols, false);
    for (index_t l = 0; l < o.model.layers; ++l)
        for (const auto& p : mem::layer_parameters(o.model)) shapes.emplace_back(p.rows, p.cols, c.low_rank && p.projection);
    shapes.emplace_back(mem::final_norm_parameter(o.model).rows, mem::final_norm_parameter(o.model).cols, false);
    return lm::configs::budget_bytes_at_rank(c, c.budget_rank, shapes, static_cast<std::size_t>(o.value_bytes));
}

// memory.hpp's footprint of configuration `name`: the optimizer state at the rank (GaLore's) or
// the cap (AdaRankGrad's, an upper bound), and for the budget rule at most its budget, which its
// state never exceeds (rank_policy::budget bounds state_bytes()).
inline lm::memory::footprint estimate_for(const std::string& name, const options& o) {
    namespace mem = lm::memory;
    mem::footprint fp = mem::estimate(o.model, velora_for(name, o), o.batch, rank_for(name, o), static_cast<std::size_t>(o.value_bytes), adapters_for(name, o),
                                      storage_for(name, o));
    if (const std::uint64_t budget = estimated_budget(name, o); budget > 0) fp.optimizer = mem::count(std::min(fp.optimizer.v, budget));
    return fp;
}

// --estimate: the memory of every configuration of --configs for the model of the flags at
// --batch sequences, from memory.hpp: the accounting lm::transformer counts with and check_sizes
// uses. Nothing is allocated or trained, so it works for shapes that would not fit (LLaMA-7B).
inline void print_estimate(const options& o) {
    namespace mem = lm::memory;
    std::vector<mem::footprint> fps;
    std::uint64_t biggest = 0;
    for (const auto& name : o.configs) {
        fps.push_back(estimate_for(name, o));
        biggest = std::max(biggest, fps.back().total().v);
    }
    const bool gib = biggest >= (std::uint64_t{10} << 30);
    const double unit = gib ? 1073741824.0 : 1048576.0;
    const char* unit_name = gib ? "GiB" : "MiB";
    const auto& m = o.model;
    std::printf("Memory estimate, nothing trained%s%s: d_model %ld, %ld layers, %ld heads, ffn %ld, context %ld, vocabulary %ld\n"
                "(%llu parameters); batch %ld (%ld tokens); %s values; rank %ld (GaLore's, AdaRankGrad's cap); VeLoRA G = %ld%s\n",
                o.preset.empty() ? "" : " for --preset ", o.preset.c_str(), static_cast<long>(m.d_model), static_cast<long>(m.layers),
                static_cast<long>(m.heads), static_cast<long>(m.ffn), static_cast<long>(m.context), static_cast<long>(m.vocab),
                static_cast<unsigned long long>(mem::parameter_count(m).v), static_cast<long>(o.batch), static_cast<long>(o.batch * m.context),
                o.value_bytes == 2 ? "bf16" : "float32", static_cast<long>(o.rank), static_cast<long>(o.groups), o.share_qkv ? " (q, k, v share one record)" : "");
    std::printf("\n%-16s %11s %11s %11s %11s %11s %11s   (%s)\n", "configuration", "weights", "gradients", "optimizer", "activations", "other",
                "total", unit_name);
    auto saturated = [](mem::count c) { return c.v == UINT64_MAX; };
    std::vector<report::run> kinds;
    for (std::size_t i = 0; i < fps.size(); ++i) {
        const auto& fp = fps[i];
        const auto c = config_of(o.configs[i], o);
        const bool cap = c.low_rank && !c.fixed_rank;
        std::printf("%-16s", (o.configs[i] + (c.optimizer.rank.is_budget() ? "**" : cap ? "*" : "")).c_str());
        for (mem::count c : {fp.weights, fp.gradients, fp.optimizer, fp.activations, fp.other, fp.total()})
            if (saturated(c)) std::printf(" %11s", ">16 EiB");
            else std::printf(" %11.3f", static_cast<double>(c.v) / unit);
        std::printf("\n");
        report::run r;
        r.name = o.configs[i];
        r.steps = 1;   // (print_activation_kinds skips runs without steps)
        r.activation_bytes = static_cast<std::size_t>(fp.activations.v);
        for (std::size_t k = 0; k < mem::kinds; ++k) r.activation_kinds[k] = static_cast<std::size_t>(fp.by_kind.by_kind[k].v);
        kinds.push_back(r);
    }
    const bool any_cap = std::any_of(o.configs.begin(), o.configs.end(), [&](const std::string& name) {
        const auto c = config_of(name, o);
        return c.low_rank && !c.fixed_rank && !c.optimizer.rank.is_budget();
    });
    const bool any_budget = std::any_of(o.configs.begin(), o.configs.end(), [&](const std::string& name) { return estimated_budget(name, o) > 0; });
    if (any_cap)
        std::printf("(* AdaRankGrad's ranks are data-dependent: its optimizer state is given at the cap --rank %ld, an upper bound)\n",
                    static_cast<long>(o.rank));
    if (any_budget)
        std::printf("(** the budget rank rule: its optimizer state is given at its budget, which it never exceeds (or at its rank cap\n"
                    " where that holds less), an upper bound)\n");
    std::printf("(optimizer: AdamW moments of every weight, or bases + moments of the projections and moments of the rest,\n"
                " or with LoRA the adapters' moments (gradients: the adapters' too; weights: the frozen base as stored and the adapters);\n"
                " gradients: one dense buffer per weight, as lm::transformer allocates them; other: backward scratch, VeLoRA's A\n"
                " buffers and transient inputs, the compressors' spare Z. Not counted: the library's scratch (GEMM, the optimizer's\n"
                " refresh workspace, SVD), code and libraries, the corpus)\n");
    report::print_activation_kinds(kinds, (std::string("\nActivations kept for backward by kind (") + unit_name + ")").c_str(), unit);
    const bool lora = std::any_of(o.configs.begin(), o.configs.end(), [&](const std::string& name) { return config_of(name, o).lora; });
    if (!lora) return;
    std::printf("\nFine-tuning: what each configuration trains, and the layers VeLoRA wraps (v and down of every layer) on their own\n"
                "(the scope of the VeLoRA paper's estimates, docs/memory.md), in GB (10^9 bytes):\n");
    std::printf("%-16s %14s %12s %12s %12s\n", "configuration", "trainable", "v+down W", "v+down kept", "v+down total");
    for (const auto& name : o.configs) {
        const auto c = config_of(name, o);
        const mem::scope_bytes s = mem::velora_scope(o.model, velora_for(name, o), o.batch, static_cast<std::size_t>(o.value_bytes), c.adapters);
        const std::uint64_t trainable = c.lora ? mem::adapter_count(o.model, c.adapters).v : mem::parameter_count(o.model).v;
        std::printf("%-16s %14llu %12.3f %12.3f %12.3f\n", name.c_str(), static_cast<unsigned long long>(trainable), static_cast<double>(s.weights.v) / 1e9,
                    static_cast<double>(s.kept.v) / 1e9, static_cast<double>(s.total().v) / 1e9);
    }
    std::printf("(LoRA: the projections frozen, adapters r = 8 on q, k, v, o, gate, up, down, AdamW on them only; embeddings and\n"
                " gains frozen; QLoRA's projections NF4 with double quantisation. v+down W: their weights as stored and their\n"
                " adapters; kept: their inputs (or VeLoRA records) and LoRA's H at --batch x --context tokens)\n");
}

// The --json of --estimate: the settings and, per configuration, the bytes print_estimate shows.
inline void write_estimate_json(const options& o) {
    namespace mem = lm::memory;
    report::write_replacing(o.json, "--json", [&](std::ostream& out) {
        out << "{\"settings\":" << settings_json(o, nullptr, 1) << ",\"estimates\":[";
        for (std::size_t i = 0; i < o.configs.size(); ++i) {
            const std::string& name = o.configs[i];
            const auto ad = adapters_for(name, o);
            const mem::footprint fp = estimate_for(name, o);
            const mem::scope_bytes scope = mem::velora_scope(o.model, velora_for(name, o), o.batch, static_cast<std::size_t>(o.value_bytes), ad);
            out << (i ? "," : "") << "{\"name\":\"" << report::json_escape(name) << "\",\"rank\":" << rank_for(name, o) << ",\"rank_is\":\""
                << (!uses_low_rank(name, o)                       ? "dense"
                    : config_of(name, o).fixed_rank                   ? "fixed"
                    : config_of(name, o).optimizer.rank.is_budget() ? "budget"
                                                                      : "cap")
                << "\",\"budget_bytes\":" << estimated_budget(name, o) << ",\"weights_bytes\":" << fp.weights.v
                << ",\"gradient_bytes\":" << fp.gradients.v << ",\"optimizer_bytes\":" << fp.optimizer.v << ",\"activation_bytes\":" << fp.activations.v
                << ",\"activation_bytes_by_kind\":{";
            for (std::size_t k = 0; k < mem::kinds; ++k) out << (k ? "," : "") << '"' << mem::kind_keys[k] << "\":" << fp.by_kind.by_kind[k].v;
            out << "},\"other_bytes\":" << fp.other.v << ",\"total_bytes\":" << fp.total().v << ",\"trainable_params\":"
                << (ad.on ? mem::adapter_count(o.model, ad).v : mem::parameter_count(o.model).v) << ",\"velora_scope\":{\"weights_bytes\":" << scope.weights.v
                << ",\"kept_bytes\":" << scope.kept.v << ",\"total_bytes\":" << scope.total().v << "}}";
        }
        out << "]}\n";
    });
}

} // namespace lm::trainer
