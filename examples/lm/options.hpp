#pragma once
// What lm_train is asked to do: every flag's value (`options`, with its default), the LLaMA
// presets that set several sizes at once, and what a configuration name means with these flags
// (config_of and the helpers after it). The parser (cli.hpp), the size check, the training and
// the output all read `options`; this file depends on none of them. config_of and its helpers
// live here rather than in configs.hpp because they read the flags, which configs.hpp does not
// know (configs.hpp is what `options` takes its default list of configurations from).
#include <velora/velora.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "configs.hpp"
#include "memory.hpp"

namespace lm::trainer {

// The numbers the trainer computes with (not a flag): float32 values on the CPU backend.
using T = float;
using B = velora::eigen_backend<T>;
using velora::index_t;

// The fine-tuning target: Debian's fortunes-es (Spanish fortune cookies, 25 files, 936,470 bytes
// in fortunes-es 1.36), another language's text for a model pretrained on the English `fortunes`
// (examples/run_demo.sh installs it). Its files live in their own folder, so the pretraining
// corpus does not change when it is installed (fortunes-it, by contrast, links its files into
// /usr/share/games/fortunes itself).
inline constexpr const char* target_corpus = "/usr/share/games/fortunes/es";

struct options {
    std::string preset;          // --preset NAME: a paper model shape (presets below); empty: none
    bool estimate = false;       // --estimate: print the memory table instead of training
    bool vocab_given = false;    // --vocab V (estimate only: the trainer reads bytes)
    index_t value_bytes = 4;     // --value-bytes 2|4 (estimate only): bytes per value counted; the trainer computes in float32
    std::string corpus = "/usr/share/games/fortunes";
    int steps = 1000;
    index_t batch = 16;
    lm::model_config model{};
    index_t rank = 32;
    index_t groups = 32;
    // The learning rates the iso-memory study chose on the tuning split for AdamW and for GaLore at
    // rank 32 and AdaRankGrad at ξ = 0.05 (docs/results.md); until 2026-12-02 they were 1e-3 and 1e-2.
    double lr = 5e-4;            // full-rank runs (adamw, velora)
    double lr_low_rank = 2e-2;   // low-rank runs (galore, adarank, velora+adarank), with α = 0.25: GaLore's protocol
    double lr_lora = 4e-3;       // LoRA runs (lora, velora+lora, qlora, velora+qlora): AdamW on the adapters (the fine-tuning study's choice)
    std::string init;            // --init PATH: start from this model file (fine-tuning)
    std::string save_model;      // --save-model PATH: write the trained model (one configuration)
    int eval_every = 50;
    bool share_qkv = false;
    std::vector<std::string> configs = lm::configs::names;   // configs.hpp: a name, optionally with changes
    std::string split = "valid";   // --split: validate on the held-out 10% (valid) or on the tuning split (tune)
    int valid_batches = 8;         // --valid-batches: batches of the validation loss
    std::string study;             // --study NAME: run a study (study.hpp) instead of --configs
    std::vector<std::uint64_t> seeds = {1, 2, 3};   // --seeds: the study's seeds
    std::uint64_t seed = 1;
    std::string json, plot;
    int grad_rank_every = 0;                   // --grad-rank-every N: measure the gradients' ξ-energy ranks (gradient_rank.hpp)
    std::string grad_rank_out, grad_rank_plot; // --grad-rank-out FILE.json, --grad-rank-plot FILE.svg
    bool help = false;   // --help or -h: print the help and exit 0 (nothing after it is parsed)
};

// The LLaMA shapes of the GaLore paper's pretraining experiments, which the AdaRankGrad and
// VeLoRA papers reuse: hidden size, heads, layers and SwiGLU width from configs/llama_{60m,130m,
// 1b,7b}.json of github.com/jiaweizzhao/GaLore, context 256 (the --max_length default of its
// torchrun_main.py), and GaLore's rank for each size from its scripts/benchmark_c4/*.sh. The
// vocabulary stays bytes (256): this trainer reads bytes; `--estimate --vocab 32000` gives the
// papers' tokenizer. The model differs from LLaMA in its tied output head and learned positions
// (LLaMA: separate head, rotary positions).
struct preset {
    const char* name;
    lm::model_config model;
    index_t rank;
};
inline const preset presets[] = {
    {"llama60m", {.vocab = 256, .d_model = 512, .heads = 8, .layers = 8, .ffn = 1376, .context = 256}, 128},
    {"llama130m", {.vocab = 256, .d_model = 768, .heads = 12, .layers = 12, .ffn = 2048, .context = 256}, 256},
    {"llama1b", {.vocab = 256, .d_model = 2048, .heads = 32, .layers = 24, .ffn = 5461, .context = 256}, 1024},
    {"llama7b", {.vocab = 256, .d_model = 4096, .heads = 32, .layers = 32, .ffn = 11008, .context = 256}, 1024},
    // LLaMA-13B (the VeLoRA paper's other fine-tuning size; GaLore has no 13B config): the shape of
    // Touvron et al. 2023 (d 5120, 40 heads, 40 layers; SwiGLU width 13824 as in its released
    // config), GaLore's 7B rank.
    {"llama13b", {.vocab = 256, .d_model = 5120, .heads = 40, .layers = 40, .ffn = 13824, .context = 256}, 1024},
};

inline std::string preset_names() {
    std::string out;
    for (const auto& p : presets) out += (out.empty() ? "" : ", ") + std::string(p.name);
    return out;
}

inline const preset* find_preset(const std::string& name) {
    for (const auto& p : presets)
        if (name == p.name) return &p;
    return nullptr;
}

// What configuration `name` (configs.hpp) means with these flags.
inline lm::configs::config config_of(const std::string& name, const options& o) {
    return lm::configs::parse(name, {o.rank, o.lr, o.lr_low_rank, o.lr_lora});
}
inline lm::adapter_config adapters_for(const std::string& name, const options& o) { return config_of(name, o).adapters; }
inline bool uses_low_rank(const std::string& name, const options& o) { return config_of(name, o).low_rank; }
inline lm::velora_config velora_for(const std::string& name, const options& o) { return lm::configs::velora_of(config_of(name, o), o.groups, o.share_qkv); }

// The optimizer's rank for memory.hpp: GaLore's fixed rank, AdaRankGrad's cap (its ranks are
// data-dependent and at most this), 0 for dense AdamW.
inline index_t rank_for(const std::string& name, const options& o) { return config_of(name, o).rank; }
/// How a configuration stores its optimizer state (state=8bit, basis=int8|int4), for memory.hpp.
inline lm::memory::state_storage storage_for(const std::string& name, const options& o) {
    return lm::configs::storage_of(config_of(name, o).optimizer);
}

// Applies preset `name` to the sizes and the rank. With `given`, only to the flags not in it:
// a flag given on the command line wins over the preset wherever it stands.
inline void apply_preset(options& o, const std::string& name, const std::vector<std::string>& given = {}) {
    const preset* p = find_preset(name);
    if (!p) throw std::invalid_argument("unknown preset '" + name + "' (known: " + preset_names() + ")");
    o.preset = name;
    const auto unset = [&](const char* flag) { return std::find(given.begin(), given.end(), flag) == given.end(); };
    if (unset("--d-model")) o.model.d_model = p->model.d_model;
    if (unset("--heads")) o.model.heads = p->model.heads;
    if (unset("--layers")) o.model.layers = p->model.layers;
    if (unset("--ffn")) o.model.ffn = p->model.ffn;
    if (unset("--context")) o.model.context = p->model.context;
    if (unset("--vocab")) o.model.vocab = p->model.vocab;
    if (unset("--rank")) o.rank = p->rank;
}

// The sizes of the preset (if any) with every other flag at its default: what "changed" means
// to check_sizes (size_check.hpp).
inline options baseline(const options& o) {
    options b;
    if (!o.preset.empty()) apply_preset(b, o.preset);
    b.configs = o.configs;
    b.share_qkv = o.share_qkv;
    return b;
}

} // namespace lm::trainer
