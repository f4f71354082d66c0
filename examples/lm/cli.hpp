#pragma once
// The command line: `parse` turns argv into `options` (options.hpp) and rejects what cannot run
// (a malformed value, an unknown flag or configuration, flags that do not go together), and
// `print_help` describes every flag with its default. tests/demo_help.cmake and demo_smoke.cmake
// read the flags this parser accepts from this file (the flag names its `flag ==` tests compare
// with), to check that --help and the --json settings cover every one.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "configs.hpp"
#include "options.hpp"
#include "size_check.hpp"
#include "study.hpp"

namespace lm::trainer {

// `items` with `separator` between them (the help lists the configurations with it, the settings
// JSON its strings).
inline std::string join(const std::vector<std::string>& items, const char* separator) {
    std::string out;
    for (const auto& item : items) out += (out.empty() ? "" : separator) + item;
    return out;
}

// Every flag with its meaning and default (the defaults read from `options`, so that the text
// cannot drift from them; tests/demo_help.cmake checks that every flag the parser accepts is here).
inline void print_help() {
    const options d;
    const auto l = [](index_t v) { return static_cast<long>(v); };
    std::printf("usage: lm_train [--preset NAME] [--corpus DIR] [--steps N] [--batch B] [--context L] [--d-model D] [--layers N]\n"
                "                [--heads H] [--ffn F] [--rank R] [--groups G] [--lr LR] [--lr-low-rank LR] [--lr-lora LR]\n"
                "                [--eval-every N] [--configs a,b,...] [--share-qkv] [--seed S] [--split valid|tune] [--valid-batches N]\n"
                "                [--init PATH] [--save-model PATH] [--json PATH] [--plot PATH]\n"
                "       lm_train --study NAME [--seeds S,S,...] [size, step and validation flags] [--json PATH] [--plot PATH]\n"
                "       lm_train --estimate [--preset NAME] [--vocab V] [--value-bytes 2|4] [size flags] [--configs ...] [--json PATH]\n"
                "Trains a byte-level transformer LM once per configuration (same seed, data and schedule; each in its own\n"
                "process) and prints a table of validation loss, memory and speed. With --init, fine-tunes a saved model\n"
                "instead (e.g. --init base.model --corpus %s --configs full,lora,qlora). With\n"
                "--estimate, prints the memory each configuration would take instead (docs/memory.md).\n\n",
                target_corpus);
    std::printf("  --preset NAME      the LLaMA shape of a paper: %s (GaLore's d_model, heads,\n"
                "                     layers and SwiGLU width; context 256; --rank of GaLore's runs for that size); size flags\n"
                "                     given as well win over it (default: none, the sizes below)\n", preset_names().c_str());
    std::printf("  --estimate         print each configuration's weights, gradients, optimizer state (AdaRankGrad at its --rank\n"
                "                     cap) and activations by kind for these sizes and --batch, from the accounting the trainer\n"
                "                     counts with, and exit without training (default: off)\n");
    std::printf("  --value-bytes B    bytes per value, --estimate only: 4 (float32, what the trainer computes in) or 2 (bf16,\n"
                "                     the papers' precision; NF4 weights stay packed) (default %ld)\n", l(d.value_bytes));
    std::printf("  --vocab V          vocabulary size, --estimate only (the trainer reads bytes: 256); 32000 is the papers'\n"
                "                     tokenizer (default %ld)\n", l(d.model.vocab));
    std::printf("  --corpus DIR       text to train on: every plain file of DIR (not *.dat, *.u8) in name order, the last 10%%\n"
                "                     held out for validation; at least 100000 bytes (default %s)\n", d.corpus.c_str());
    std::printf("  --steps N          training steps per configuration (default %d)\n", d.steps);
    std::printf("  --batch B          sequences per step (default %ld)\n", l(d.batch));
    std::printf("  --context L        bytes per sequence (default %ld)\n", l(d.model.context));
    std::printf("  --d-model D        width of the model (default %ld)\n", l(d.model.d_model));
    std::printf("  --layers N         transformer layers (default %ld)\n", l(d.model.layers));
    std::printf("  --heads H          attention heads; must divide --d-model (default %ld)\n", l(d.model.heads));
    std::printf("  --ffn F            hidden width of the MLP (default %ld)\n", l(d.model.ffn));
    std::printf("  --rank R           GaLore's rank and AdaRankGrad's largest rank (default %ld)\n", l(d.rank));
    std::printf("  --groups G         VeLoRA sub-tokens per token (each input uses min(G, its width)) (default %ld)\n", l(d.groups));
    std::printf("  --lr LR            learning rate of the full-rank runs: adamw, velora, full (default %g)\n", d.lr);
    std::printf("  --lr-low-rank LR   learning rate of the low-rank runs, with scale 0.25: galore, adarank, velora+adarank\n"
                "                     (default %g)\n", d.lr_low_rank);
    std::printf("  --lr-lora LR       learning rate of the LoRA runs (AdamW on the adapters): lora, velora+lora, qlora,\n"
                "                     velora+qlora (default %g)\n", d.lr_lora);
    std::printf("  --eval-every N     validation loss every N steps and after the last one (default %d)\n", d.eval_every);
    std::printf("  --configs a,b,...  configurations to run, in this order: %s, each optionally\n"
                "                     with changes NAME:key=value,... (keys: lr, warmup, r, rank=fixed|adaptive|budget, xi, budget=BYTES|rN,\n"
                "                     refresh=every|converged, interval, eps, transport=rotation|clamped|none|reset, svd=exact|randomized,\n"
                "                     scale, state=8bit|float, basis=int8|int4|float, weights=bf16|bf16-nearest|float; see examples/lm/configs.hpp), e.g. galore:r=16,adamw\n"
                "                     (default: the five; also spelt --config).\n"
                "                     For fine-tuning a model of --init: full (AdamW on every weight), lora, velora+lora, qlora,\n"
                "                     velora+qlora (the LoRA ones, which need --init; keys r, alpha, dropout, velora_scale,\n"
                "                     e.g. lora:r=16,dropout=0.1), and galore, adarank, velora+adarank as full fine-tuning\n",
                join(lm::configs::names, ", ").c_str());
    std::printf("  --share-qkv        q, k and v read one VeLoRA record of their common input (default off: only v's input is\n"
                "                     recorded, q and k keep it)\n");
    std::printf("  --seed S           seed of the initial weights (with --init: of the adapters and dropout) and of the\n"
                "                     batches (default %llu)\n", static_cast<unsigned long long>(d.seed));
    std::printf("  --init PATH        start from the model in PATH (written by --save-model; the size flags must give its\n"
                "                     shape): fine-tuning. Its loss on the validation text is measured before the first step\n"
                "                     (default: none, the seeded initialisation)\n");
    std::printf("  --save-model PATH  after training, write the model to PATH (one configuration; with LoRA the merged\n"
                "                     weights W + (alpha/r) B A), a versioned and checksummed file replaced only by a\n"
                "                     complete one (default: none)\n");
    std::printf("  --split S          valid: validate on the held-out 10%%; tune: train on the first 90%% of the rest and validate\n"
                "                     on its last 10%% (the tuning split, for choosing hyper-parameters) (default %s)\n", d.split.c_str());
    std::printf("  --valid-batches N  batches of %ld sequences the validation loss is the mean over (always the same ones)\n"
                "                     (default %d)\n", l(d.batch), d.valid_batches);
    std::printf("  --study NAME       run a study instead of --configs: %s (examples/lm/study.hpp, docs/results.md):\n"
                "                     every configuration's lr swept on the tuning split, then trained once per seed; prints\n"
                "                     loss against optimizer state and the comparison with GaLore at equal state; finetune\n"
                "                     fine-tunes the model of --init on --corpus (another text than its own) and compares the\n"
                "                     configurations in pairs (default: none)\n",
                lm::study::plan_names().c_str());
    std::string seeds;
    for (auto s : d.seeds) seeds += (seeds.empty() ? "" : ",") + std::to_string(s);
    std::printf("  --seeds S,S,...    the study's seeds (default %s)\n", seeds.c_str());
    std::printf("  --json PATH        write the results and the run's settings (flags, model, version, GEMM engine) as JSON;\n"
                "                     with --estimate, the estimates (default: none)\n");
    std::printf("  --plot PATH        write an SVG plot of the validation loss and, per low-rank configuration, the ranks of\n"
                "                     each kind of matrix in every layer (default: none)\n");
    std::printf("  --grad-rank-every N  every N steps (and at step 1) record each projection matrix's xi-energy rank (xi = 0.05,\n"
                "                     0.1, 0.2) of its full gradient by an exact SVD; one configuration, one process (default: off)\n"
                "  --grad-rank-out PATH  the ranks as JSON, needed with --grad-rank-every (default: none)\n"
                "  --grad-rank-plot PATH  the ranks as SVG small multiples per matrix kind (default: none)\n");
    std::printf("  -h, --help         print this help and exit\n\n");
    std::printf("Sizes: the model, optimizer and activations of one training process must fit in physical memory (%s here).\n"
                "Output: --json and --plot are written when the run ends, into PATH.tmp-<pid> renamed onto PATH; an existing file\n"
                "is replaced only by a complete one.\n"
                "Signals: SIGINT, SIGTERM and SIGHUP stop the configuration in training after its current step; the table, --json\n"
                "and --plot show what was trained. A training process dies with lm_train, also on SIGKILL.\n"
                "Exit status: 0; 1 if a configuration failed; 2 for bad flags or input; 128 + N when stopped by signal N.\n",
                physical_memory_bytes() ? human_bytes(physical_memory_bytes()).c_str() : "unknown");
#if defined(VELORA_DEMO_MPI)
    std::printf("Data-parallel (this build has MPI): `mpirun -np P lm_train ...` trains every configuration on P ranks; --batch is\n"
                "the global batch (divisible by P), each rank trains on --batch / P of its sequences, the losses are means over\n"
                "all of them. The configurations run one after another in each rank's process (no fork); only rank 0 prints and\n"
                "writes files. A signal that reaches any rank stops all of them after the same step (Ctrl-C or kill -TERM of\n"
                "Open MPI's mpirun reaches every rank as SIGTERM). Use one OpenMP thread per rank where the ranks share the\n"
                "cores (OMP_NUM_THREADS=1).\n");
#else
    std::printf("Data-parallel: not in this build (CMake found no MPI; the target velora::mpi enables it).\n");
#endif
}

[[noreturn]] inline void usage_error(const std::string& what) { throw std::invalid_argument(what); }

inline long positive(const std::string& flag, const char* text) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(text, &end, 10);
    if (*end != '\0' || v <= 0 || errno == ERANGE || v > 1000000000L)
        usage_error("flag " + flag + " needs a positive integer up to 1000000000, got '" + text + "'");
    return v;
}

inline options parse(int argc, char** argv) {
    options o;
    std::string preset_name;
    std::vector<std::string> given;   // flags given, for the preset
    for (int i = 1; i < argc; ++i) {
        // `--config NAME` (one configuration) is another spelling of --configs.
        const std::string flag = std::string_view(argv[i]) == "--config" ? std::string("--configs") : std::string(argv[i]);
        auto next = [&]() -> const char* {
            if (i + 1 >= argc) usage_error("flag " + flag + " needs a value");
            return argv[++i];
        };
        given.push_back(flag);
        if (flag == "--corpus") o.corpus = next();
        else if (flag == "--preset") preset_name = next();
        else if (flag == "--estimate") o.estimate = true;
        else if (flag == "--value-bytes") {
            const std::string text = next();
            if (text != "2" && text != "4") usage_error("flag --value-bytes needs 2 (bf16) or 4 (float32), got '" + text + "'");
            o.value_bytes = text == "2" ? 2 : 4;
        }
        else if (flag == "--vocab") {
            o.model.vocab = positive(flag, next());
            o.vocab_given = true;
        }
        else if (flag == "--steps") o.steps = static_cast<int>(positive(flag, next()));
        else if (flag == "--batch") o.batch = positive(flag, next());
        else if (flag == "--context") o.model.context = positive(flag, next());
        else if (flag == "--d-model") o.model.d_model = positive(flag, next());
        else if (flag == "--layers") o.model.layers = positive(flag, next());
        else if (flag == "--heads") o.model.heads = positive(flag, next());
        else if (flag == "--ffn") o.model.ffn = positive(flag, next());
        else if (flag == "--rank") o.rank = positive(flag, next());
        else if (flag == "--groups") o.groups = positive(flag, next());
        else if (flag == "--eval-every") o.eval_every = static_cast<int>(positive(flag, next()));
        else if (flag == "--seed") o.seed = static_cast<std::uint64_t>(positive(flag, next()));
        else if (flag == "--json") o.json = next();
        else if (flag == "--share-qkv") o.share_qkv = true;
        else if (flag == "--plot") o.plot = next();
        else if (flag == "--grad-rank-every") o.grad_rank_every = static_cast<int>(positive(flag, next()));
        else if (flag == "--grad-rank-out") o.grad_rank_out = next();
        else if (flag == "--grad-rank-plot") o.grad_rank_plot = next();
        else if (flag == "--init") o.init = next();
        else if (flag == "--save-model") o.save_model = next();
        else if (flag == "--lr" || flag == "--lr-low-rank" || flag == "--lr-lora") {
            const char* text = next();
            char* end = nullptr;
            const double lr = std::strtod(text, &end);
            if (*end != '\0' || !(lr > 0) || !std::isfinite(lr)) usage_error("flag " + flag + " needs a positive number, got '" + text + "'");
            (flag == "--lr" ? o.lr : flag == "--lr-low-rank" ? o.lr_low_rank : o.lr_lora) = lr;
        } else if (flag == "--configs") {
            // Split at commas; an item key=value continues the configuration before it
            // (`galore:r=16,svd=randomized,adamw` is two configurations). Checked below, when
            // the flags they start from are known.
            o.configs.clear();
            std::stringstream list(next());
            for (std::string item; std::getline(list, item, ',');) {
                const bool continues = item.find('=') != std::string::npos && item.find(':') == std::string::npos;
                if (item.empty()) usage_error("flag --configs: an empty configuration in '" + std::string(argv[i]) + "'");
                if (continues && !o.configs.empty() && o.configs.back().find(':') != std::string::npos) o.configs.back() += "," + item;
                else if (continues && !o.configs.empty())
                    usage_error("flag --configs: '" + item + "' follows '" + o.configs.back() + "', which has no ':' (did you mean " +
                                o.configs.back() + ":" + item + "?)");
                else o.configs.push_back(item);
            }
            if (o.configs.empty()) usage_error("flag --configs needs at least one configuration");
        } else if (flag == "--split") {
            o.split = next();
            if (o.split != "valid" && o.split != "tune") usage_error("flag --split needs valid or tune, got '" + o.split + "'");
        } else if (flag == "--valid-batches") o.valid_batches = static_cast<int>(positive(flag, next()));
        else if (flag == "--study") {
            o.study = next();
            if (!lm::study::find_plan(o.study)) usage_error("unknown study '" + o.study + "' (known: " + lm::study::plan_names() + ")");
        } else if (flag == "--seeds") {
            o.seeds.clear();
            std::stringstream list(next());
            for (std::string item; std::getline(list, item, ',');) {
                const auto seed = static_cast<std::uint64_t>(positive(flag, item.c_str()));
                if (std::find(o.seeds.begin(), o.seeds.end(), seed) != o.seeds.end())
                    usage_error("flag --seeds: seed " + item + " given twice (the seeds pair the configurations' runs)");
                o.seeds.push_back(seed);
            }
            if (o.seeds.empty()) usage_error("flag --seeds needs at least one seed");
        } else if (flag == "--help" || flag == "-h") {
            o.help = true;
            return o;
        } else {
            usage_error("unknown flag '" + flag + "' (see --help)");
        }
    }
    if (!preset_name.empty()) {
        try {
            apply_preset(o, preset_name, given);
        } catch (const std::invalid_argument& e) {
            usage_error("flag --preset: " + std::string(e.what()));
        }
    }
    for (const auto& name : o.configs) try {
            (void)config_of(name, o);
        } catch (const std::invalid_argument& e) {
            usage_error("flag --configs: " + std::string(e.what()));
        }
    if (!o.study.empty()) {
        if (lm::study::find_plan(o.study)->fine_tuning && o.init.empty())
            usage_error("--study " + o.study + " fine-tunes a pretrained model: give --init PATH (a model written by --save-model) and --corpus DIR, "
                        "the target text (e.g. " + std::string(target_corpus) + ")");
        o.configs.clear();
        for (const auto& p : lm::study::find_plan(o.study)->points) o.configs.push_back(p.config);
        for (const char* flag : {"--configs", "--seed", "--split", "--estimate", "--lr", "--lr-low-rank", "--lr-lora", "--rank", "--save-model"})
            if (std::find(given.begin(), given.end(), flag) != given.end())
                usage_error(std::string("flag ") + flag +
                            " does not go with --study (the study chooses its configurations, ranks, learning rates, seeds and splits)");
    } else if (std::find(given.begin(), given.end(), "--seeds") != given.end()) {
        usage_error("flag --seeds is for --study (a single run takes --seed)");
    }
    if (o.model.d_model % o.model.heads != 0)
        usage_error("--d-model " + std::to_string(o.model.d_model) + " is not divisible by --heads " + std::to_string(o.model.heads) +
                    (o.preset.empty() ? "" : " (sizes of --preset " + o.preset + " and the flags given)"));
    if (o.vocab_given && !o.estimate)
        usage_error("flag --vocab is for --estimate only: the trainer reads bytes (vocabulary 256)");
    if (o.estimate && !o.plot.empty()) usage_error("flag --plot has nothing to draw with --estimate (nothing is trained)");
    if ((o.grad_rank_every > 0) != !o.grad_rank_out.empty())
        usage_error("flags --grad-rank-every and --grad-rank-out go together");
    if (!o.grad_rank_plot.empty() && o.grad_rank_every == 0) usage_error("flag --grad-rank-plot needs --grad-rank-every and --grad-rank-out");
    if (o.grad_rank_every > 0 && (o.configs.size() != 1 || !o.study.empty() || o.estimate))
        usage_error("flag --grad-rank-every measures one configuration (--configs NAME), not a study or an estimate");
    if (o.estimate && !o.init.empty()) usage_error("flag --init is not for --estimate (it counts the shapes of the flags)");
    if (!o.estimate && std::find(given.begin(), given.end(), "--value-bytes") != given.end())
        usage_error("flag --value-bytes is for --estimate only: the trainer computes in float32");
    if (o.estimate && !o.save_model.empty()) usage_error("flag --save-model is not for --estimate (nothing is trained)");
    if (!o.save_model.empty() && o.configs.size() != 1)
        usage_error("flag --save-model saves one model: give one configuration (--configs has " + std::to_string(o.configs.size()) + ")");
    if (!o.estimate)
        for (const auto& name : o.configs) {
            const auto c = config_of(name, o);
            if (c.lora && o.init.empty())
                usage_error("configuration '" + name + "' fine-tunes a pretrained model: give --init PATH (a model written by --save-model)");
            if (c.lora && o.share_qkv)
                usage_error("flag --share-qkv is not for configuration '" + name + "' (its VeLoRA records are the adapter inputs of v and down)");
        }
    return o;
}

} // namespace lm::trainer
