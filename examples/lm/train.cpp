// The demo trainer: pretrains a small byte-level decoder-only transformer (model.hpp) on a real
// text corpus from a Debian package (fortunes) five times, with identical seed, data and
// schedule, and compares what the papers compare:
//   adamw            dense AdamW, exact activations (the baseline)
//   galore           GaLore: fixed rank, refresh every 200 steps by exact SVD, moments reused
//   velora           VeLoRA records for the value and MLP-down inputs, dense AdamW
//   adarank          AdaRankGrad: adaptive rank, refresh on convergence, moments transported
//   velora+adarank   both; the optimizer consumes VeLoRA's factored gradients (no dense dW)
// The library is embedded as a user's trainer would: the host owns the tensors, the optimizer
// steps each parameter as soon as its gradient exists (gradient_sink), VeLoRA gradients reach
// it in factored form. Each configuration runs in its own process so that its peak RSS is its own.
//
// Data-parallel (a build with MPI, started by mpirun with more than one rank): --batch is the
// global batch and must be divisible by the number of ranks P; rank k trains on the k-th P-th of
// every batch's sequences and evaluates the k-th P-th of every validation batch. Each rank's loss
// is the mean over its own sequences, so its gradients are those of its own mean loss; with equal
// shares their mean over the ranks, which is what the optimizer steps with, is the gradient of
// the global batch's mean loss, i.e. what one process computes (no rescaling needed). Low-rank
// parameters step with the communicator (the ranks all-reduce only projected gradients and, at
// a refresh, sketches); the gradients of densely optimised parameters are kept until the end of
// backward and reduced together by low_rank_adamw::all_reduce_mean (bucketed), then stepped
// without it. VeLoRA's compressors get the v of the global first batch (share_first_batch_v).
// Reported losses are means over all ranks; only rank 0 prints and writes --json and --plot. MPI
// and fork do not mix: the configurations run one after another in each rank's own process, and
// their peak RSS is measured from a reset of the process's high-water mark (see print_dp_notes).
// A plain `lm_train` of an MPI build is an MPI singleton and behaves as without MPI.
//
//   lm_train [--preset NAME] [--corpus DIR] [--steps N] [--batch B] [--context L] [--d-model D] [--layers N]
//            [--heads H] [--ffn F] [--rank R] [--groups G] [--lr LR] [--lr-low-rank LR] [--eval-every N]
//            [--configs a,b,...] [--share-qkv] [--seed S] [--json PATH] [--plot PATH]
//   lm_train --estimate [--preset NAME] [--vocab V] [size flags] [--json PATH]
// (--config NAME is accepted as another spelling of --configs.)
// --preset sets the sizes of a paper's LLaMA model (presets below); --estimate prints the memory
// of each configuration from memory.hpp, the accounting the model counts with, without training
// (docs/memory.md).
// (`lm_train --help` says what each flag means and its default; print_help below.)
// --share-qkv: q, k and v read one VeLoRA record of their common input (otherwise only v's
// input is recorded, and q, k still keep it).
// Before anything is trained: the sizes the flags imply must fit in physical memory (check_sizes),
// the folders of --json and --plot must be writable, the corpus must load. SIGINT, SIGTERM and
// SIGHUP stop the configuration in training after its current step (forwarded to its process);
// the table, --json and --plot then show what was trained and the exit status is 128 + the signal.
// A training process dies with lm_train, even on SIGKILL (PR_SET_PDEATHSIG). Data-parallel, a
// signal that reaches any rank stops every rank after the same step (agreed through the
// communicator's any()). --json and --plot
// are written at the end, into PATH.tmp-<pid> renamed onto PATH: an older file at PATH is
// replaced only by a complete one.
#include <adarank/adarank.hpp>
#include <velora/distributed/communicator.hpp>
#include <velora/distributed/shared_v.hpp>
#include <velora/velora.hpp>
#if defined(VELORA_DEMO_MPI)
#include <velora/distributed/mpi.hpp>
#endif

#include "configs.hpp"
#include "model.hpp"
#include "report.hpp"
#include "study.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <map>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <sys/wait.h>
#include <type_traits>
#include <unistd.h>
#include <vector>
#if defined(__linux__)
#include <sys/prctl.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif

// The library's version (the CMake project version, set by examples/CMakeLists.txt; no header
// defines one), recorded in the --json settings.
#ifndef VELORA_VERSION_STRING
#define VELORA_VERSION_STRING "unknown"
#endif

namespace {

using T = float;
using B = velora::eigen_backend<T>;
using velora::index_t;

// The signal that stopped the run (SIGINT, SIGTERM or SIGHUP), 0 while none has. It is forwarded
// to the training process, so that `kill <trainer>` also stops the configuration in progress
// instead of leaving its process to train on alone (SIGKILL cannot be forwarded: the child
// asks the kernel for a SIGKILL of its own when the parent dies, see run_isolated).
volatile std::sig_atomic_t interrupted = 0;
volatile pid_t training_child = 0;
void on_stop_signal(int sig) {
    interrupted = sig;
    if (training_child > 0) kill(training_child, sig);
}

void install_stop_handlers() {
    struct sigaction sa{};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;   // the parent's read() of the pipe and waitpid() go on until the child has reported
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
}

struct options {
    std::string preset;          // --preset NAME: a paper model shape (presets below); empty: none
    bool estimate = false;       // --estimate: print the memory table instead of training
    bool vocab_given = false;    // --vocab V (estimate only: the trainer reads bytes)
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
    int eval_every = 50;
    bool share_qkv = false;
    std::vector<std::string> configs = lm::configs::names;   // configs.hpp: a name, optionally with changes
    std::string split = "valid";   // --split: validate on the held-out 10% (valid) or on the tuning split (tune)
    int valid_batches = 8;         // --valid-batches: batches of the validation loss
    std::string study;             // --study NAME: run a study (study.hpp) instead of --configs
    std::vector<std::uint64_t> seeds = {1, 2, 3};   // --seeds: the study's seeds
    std::uint64_t seed = 1;
    std::string json, plot;
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
const preset presets[] = {
    {"llama60m", {.vocab = 256, .d_model = 512, .heads = 8, .layers = 8, .ffn = 1376, .context = 256}, 128},
    {"llama130m", {.vocab = 256, .d_model = 768, .heads = 12, .layers = 12, .ffn = 2048, .context = 256}, 256},
    {"llama1b", {.vocab = 256, .d_model = 2048, .heads = 32, .layers = 24, .ffn = 5461, .context = 256}, 1024},
    {"llama7b", {.vocab = 256, .d_model = 4096, .heads = 32, .layers = 32, .ffn = 11008, .context = 256}, 1024},
};

std::string preset_names() {
    std::string out;
    for (const auto& p : presets) out += (out.empty() ? "" : ", ") + std::string(p.name);
    return out;
}

const preset* find_preset(const std::string& name) {
    for (const auto& p : presets)
        if (name == p.name) return &p;
    return nullptr;
}

// What configuration `name` (configs.hpp) means with these flags.
lm::configs::config config_of(const std::string& name, const options& o) { return lm::configs::parse(name, {o.rank, o.lr, o.lr_low_rank}); }
bool uses_low_rank(const std::string& name, const options& o) { return config_of(name, o).low_rank; }
lm::velora_config velora_for(const std::string& name, const options& o) { return lm::configs::velora_of(config_of(name, o), o.groups, o.share_qkv); }

// The optimizer's rank for memory.hpp: GaLore's fixed rank, AdaRankGrad's cap (its ranks are
// data-dependent and at most this), 0 for dense AdamW.
index_t rank_for(const std::string& name, const options& o) { return config_of(name, o).rank; }

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
std::uint64_t process_bytes(const options& o, index_t ranks = 1) {
    const index_t share = std::max<index_t>(o.batch / ranks, 1);
    lm::memory::count most;
    for (const auto& name : o.configs) {
        const lm::memory::count bytes =
            lm::memory::estimate(o.model, velora_for(name, o), share, rank_for(name, o), sizeof(T)).total() + lm::memory::count(o.steps) * 32;
        most = std::max(most.v, bytes.v);
    }
    return most.v;
}

// 0 when the system does not say.
std::uint64_t physical_memory_bytes() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? (lm::memory::count(pages) * page).v : 0;
}

std::string human_bytes(std::uint64_t bytes) {
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
// The sizes of the preset (if any) with every other flag at its default: what "changed" means.
options baseline(const options& o);

void check_sizes(const options& o, index_t ranks = 1) {
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

std::string join(const std::vector<std::string>& items, const char* separator) {
    std::string out;
    for (const auto& item : items) out += (out.empty() ? "" : separator) + item;
    return out;
}

// Every flag with its meaning and default (the defaults read from `options`, so that the text
// cannot drift from them; tests/demo_help.cmake checks that every flag the parser accepts is here).
void print_help() {
    const options d;
    const auto l = [](index_t v) { return static_cast<long>(v); };
    std::printf("usage: lm_train [--preset NAME] [--corpus DIR] [--steps N] [--batch B] [--context L] [--d-model D] [--layers N]\n"
                "                [--heads H] [--ffn F] [--rank R] [--groups G] [--lr LR] [--lr-low-rank LR] [--eval-every N]\n"
                "                [--configs a,b,...] [--share-qkv] [--seed S] [--split valid|tune] [--valid-batches N]\n"
                "                [--json PATH] [--plot PATH]\n"
                "       lm_train --study NAME [--seeds S,S,...] [size, step and validation flags] [--json PATH] [--plot PATH]\n"
                "       lm_train --estimate [--preset NAME] [--vocab V] [size flags] [--json PATH]\n"
                "Trains a byte-level transformer LM once per configuration (same seed, data and schedule; each in its own\n"
                "process) and prints a table of validation loss, memory and speed. With --estimate, prints the memory each\n"
                "configuration would take instead (docs/memory.md).\n\n");
    std::printf("  --preset NAME      the LLaMA shape of a paper: %s (GaLore's d_model, heads,\n"
                "                     layers and SwiGLU width; context 256; --rank of GaLore's runs for that size); size flags\n"
                "                     given as well win over it (default: none, the sizes below)\n", preset_names().c_str());
    std::printf("  --estimate         print each configuration's weights, gradients, optimizer state (AdaRankGrad at its --rank\n"
                "                     cap) and activations by kind for these sizes and --batch, from the accounting the trainer\n"
                "                     counts with, and exit without training (default: off)\n");
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
    std::printf("  --lr LR            learning rate of the full-rank runs: adamw, velora (default %g)\n", d.lr);
    std::printf("  --lr-low-rank LR   learning rate of the low-rank runs, with scale 0.25: galore, adarank, velora+adarank\n"
                "                     (default %g)\n", d.lr_low_rank);
    std::printf("  --eval-every N     validation loss every N steps and after the last one (default %d)\n", d.eval_every);
    std::printf("  --configs a,b,...  configurations to run, in this order: %s, each optionally\n"
                "                     with changes NAME:key=value,... (keys: lr, warmup, r, rank=fixed|adaptive, xi, refresh=every|converged,\n"
                "                     interval, eps, transport=rotation|clamped|none|reset, svd=exact|randomized, scale; see\n"
                "                     examples/lm/configs.hpp), e.g. galore:r=16,adamw (default: the five; also spelt --config)\n",
                join(lm::configs::names, ", ").c_str());
    std::printf("  --share-qkv        q, k and v read one VeLoRA record of their common input (default off: only v's input is\n"
                "                     recorded, q and k keep it)\n");
    std::printf("  --seed S           seed of the initial weights and of the batches (default %llu)\n", static_cast<unsigned long long>(d.seed));
    std::printf("  --split S          valid: validate on the held-out 10%%; tune: train on the first 90%% of the rest and validate\n"
                "                     on its last 10%% (the tuning split, for choosing hyper-parameters) (default %s)\n", d.split.c_str());
    std::printf("  --valid-batches N  batches of %ld sequences the validation loss is the mean over (always the same ones)\n"
                "                     (default %d)\n", l(d.batch), d.valid_batches);
    std::printf("  --study NAME       run a study instead of --configs: %s (examples/lm/study.hpp, docs/results.md):\n"
                "                     every configuration's lr swept on the tuning split, then trained once per seed; prints\n"
                "                     loss against optimizer state and the comparison with GaLore at equal state (default: none)\n",
                lm::study::plan_names().c_str());
    std::string seeds;
    for (auto s : d.seeds) seeds += (seeds.empty() ? "" : ",") + std::to_string(s);
    std::printf("  --seeds S,S,...    the study's seeds (default %s)\n", seeds.c_str());
    std::printf("  --json PATH        write the results and the run's settings (flags, model, version, GEMM engine) as JSON;\n"
                "                     with --estimate, the estimates (default: none)\n");
    std::printf("  --plot PATH        write an SVG plot of the validation loss and, per low-rank configuration, the ranks of\n"
                "                     each kind of matrix in every layer (default: none)\n");
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

[[noreturn]] void usage_error(const std::string& what) { throw std::invalid_argument(what); }

long positive(const std::string& flag, const char* text) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(text, &end, 10);
    if (*end != '\0' || v <= 0 || errno == ERANGE || v > 1000000000L)
        usage_error("flag " + flag + " needs a positive integer up to 1000000000, got '" + text + "'");
    return v;
}

// Applies preset `name` to the sizes and the rank. With `given`, only to the flags not in it:
// a flag given on the command line wins over the preset wherever it stands.
void apply_preset(options& o, const std::string& name, const std::vector<std::string>& given = {}) {
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

options baseline(const options& o) {
    options b;
    if (!o.preset.empty()) apply_preset(b, o.preset);
    b.configs = o.configs;
    b.share_qkv = o.share_qkv;
    return b;
}

options parse(int argc, char** argv) {
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
        else if (flag == "--lr" || flag == "--lr-low-rank") {
            const char* text = next();
            char* end = nullptr;
            const double lr = std::strtod(text, &end);
            if (*end != '\0' || !(lr > 0) || !std::isfinite(lr)) usage_error("flag " + flag + " needs a positive number, got '" + text + "'");
            (flag == "--lr" ? o.lr : o.lr_low_rank) = lr;
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
        o.configs.clear();
        for (const auto& p : lm::study::find_plan(o.study)->points) o.configs.push_back(p.config);
        for (const char* flag : {"--configs", "--seed", "--split", "--estimate", "--lr", "--lr-low-rank", "--rank"})
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
    return o;
}

// The corpus: every plain fortune file of the directory (not the .dat indexes or the .u8 links),
// in name order, as bytes. The last 10% is the validation split. `--split tune` trains on the
// first 90% of the rest and validates on its last 10% (tuning_split): learning rates are chosen
// there, never on the validation split that results are reported on.
struct corpus {
    std::vector<unsigned char> train, valid;
    std::size_t files = 0;
    std::string split = "valid";
};

corpus tuning_split(const corpus& c) {
    corpus t;
    const std::size_t cut = c.train.size() - c.train.size() / 10;
    t.train.assign(c.train.begin(), c.train.begin() + static_cast<std::ptrdiff_t>(cut));
    t.valid.assign(c.train.begin() + static_cast<std::ptrdiff_t>(cut), c.train.end());
    t.files = c.files;
    t.split = "tune";
    return t;
}

// The validation batches are the same whatever --seed: runs of different seeds are measured on
// the same text (8 = the default seed 1 + 7, the seed these batches have always had).
constexpr std::uint64_t validation_seed = 8;

corpus load_corpus(const std::string& dir) {
    namespace fs = std::filesystem;
    // Says what is wrong with DIR: missing (the fortunes package is not installed), a file (the
    // flag takes the folder that holds the text files), unreadable.
    std::error_code ec;
    const fs::file_status st = fs::status(dir, ec);
    if (st.type() == fs::file_type::not_found)
        throw std::runtime_error("corpus directory '" + dir + "' does not exist (install it with: apt-get install fortunes, or pass --corpus DIR)");
    if (ec) throw std::runtime_error("cannot access corpus directory '" + dir + "': " + ec.message());
    if (st.type() == fs::file_type::regular)
        throw std::runtime_error("corpus directory '" + dir + "' is a file, not a directory (--corpus takes the folder that holds the text files)");
    if (st.type() != fs::file_type::directory) throw std::runtime_error("corpus directory '" + dir + "' is not a directory");
    std::vector<fs::path> paths;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
        const auto ext = entry.path().extension().string();
        if (entry.is_regular_file() && ext != ".dat" && ext != ".u8") paths.push_back(entry.path());
    }
    if (ec) throw std::runtime_error("cannot list corpus directory '" + dir + "': " + ec.message());
    std::sort(paths.begin(), paths.end());
    std::vector<unsigned char> all;
    corpus c;
    for (const auto& p : paths) {
        std::ifstream in(p, std::ios::binary);
        if (!in) throw std::runtime_error("cannot read corpus file '" + p.string() + "'");
        all.insert(all.end(), std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
        if (in.bad()) throw std::runtime_error("error while reading corpus file '" + p.string() + "'");
        ++c.files;
    }
    if (all.size() < 100000) throw std::runtime_error("corpus in '" + dir + "' has only " + std::to_string(all.size()) + " bytes (need >= 100000)");
    const std::size_t cut = all.size() - all.size() / 10;
    c.train.assign(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(cut));
    c.valid.assign(all.begin() + static_cast<std::ptrdiff_t>(cut), all.end());
    return c;
}

// Batch `index` of a split: `batch` windows of context+1 bytes at counter-based random offsets.
void make_batch(const std::vector<unsigned char>& data, index_t batch, index_t context, std::uint64_t seed, std::uint64_t index,
                std::vector<int>& out) {
    out.resize(static_cast<std::size_t>(batch * (context + 1)));
    const std::uint64_t span = data.size() - static_cast<std::size_t>(context) - 1;
    for (index_t b = 0; b < batch; ++b) {
        const auto start = static_cast<std::size_t>(velora::mix64(seed ^ velora::mix64(index * 1315423911ull + static_cast<std::uint64_t>(b))) % span);
        for (index_t j = 0; j <= context; ++j) out[static_cast<std::size_t>(b * (context + 1) + j)] = data[start + static_cast<std::size_t>(j)];
    }
}


// An error that every rank of a data-parallel run raises at the same point of the same step: it
// comes from a reduced quantity (the loss, VeLoRA's shared v) or from an optimizer status, which
// the library makes the same on every rank. The run goes on with the next configuration. Any
// other error during data-parallel training may be one rank's alone while the others wait in a
// collective, so it aborts every rank (abort_all_ranks). In one process every error is "agreed".
struct agreed_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

template <class C>
constexpr bool one_process = std::is_same_v<C, velora::single_process>;

template <velora::communicator C>
[[noreturn]] void abort_all_ranks(C& comm, const std::string& what) {
    std::fprintf(stderr, "lm_train (rank %d of %d): %s; aborting all ranks\n", comm.rank(), comm.size(), what.c_str());
    std::fflush(stderr);
#if defined(VELORA_DEMO_MPI)
    if constexpr (std::is_same_v<C, velora::mpi_communicator>) MPI_Abort(comm.native(), 1);
#endif
    std::abort();
}

// The mean over the ranks of one number per rank (the identity in one process: x / 1 is x).
template <velora::communicator C>
double mean_over_ranks(C& comm, double x) {
    comm.all_reduce_sum(std::span<double>(&x, 1));
    return x / comm.size();
}

// The largest of one number per rank (every rank's value in its own slot of a sum, which adds zeros only).
template <velora::communicator C>
double max_over_ranks(C& comm, double x) {
    std::vector<double> all(static_cast<std::size_t>(comm.size()), 0.0);
    all[static_cast<std::size_t>(comm.rank())] = x;
    comm.all_reduce_sum(std::span<double>(all));
    return *std::max_element(all.begin(), all.end());
}

// Whether to stop (a stop signal has reached some rank), the same answer on every rank; the
// signal that `interrupted` then holds is the same on every rank too (SIGINT before SIGTERM
// before SIGHUP when ranks received different ones). A collective: every rank calls it at the
// same points. In one process it reads `interrupted`.
template <velora::communicator C>
bool stop_agreed(C& comm) {
    if (!comm.any(interrupted != 0)) return false;
    if constexpr (!one_process<C>) {
        const int seen = interrupted;   // nonzero on some rank; never reset
        double got[3] = {seen == SIGINT ? 1.0 : 0.0, seen == SIGTERM ? 1.0 : 0.0, seen == SIGHUP ? 1.0 : 0.0};
        comm.all_reduce_sum(std::span<double>(got));
        interrupted = got[0] > 0 ? SIGINT : got[1] > 0 ? SIGTERM : SIGHUP;
    }
    return true;
}

// Steps each parameter with the gradient the model hands over. In one process every step is
// taken at once (fused into backward). Data-parallel:
// - a low-rank parameter steps at once with the communicator: its reduction is of projected
//   gradients (rank × other values, plus sketches at a refresh), which only the optimizer can
//   form, and it is part of the step;
// - the gradient of a densely optimised parameter is kept (the model's own gradient buffer holds
//   it until the next train_step; a factored VeLoRA gradient is expanded into that buffer, the
//   expansion the optimizer would make) and flush() at the end of backward reduces all of them
//   with all_reduce_mean, in buckets, then steps them without the communicator. Deferring is
//   exact: the model reads no parameter's value after handing over its gradient, and the dense
//   steps are independent of each other. It is chosen over reducing each gradient on arrival
//   because the collectives here are blocking (nothing overlaps with backward anyway), so fewer,
//   larger all-reduces cost less latency: one or a few per step instead of one per parameter
//   (20 for the default model with AdamW). It costs no memory beyond the bucket: the gradients
//   are in the model's buffers already.
template <velora::communicator C>
class optimizer_sink final : public lm::gradient_sink<T> {
public:
    using param_id = adarank::low_rank_adamw<B>::param_id;
    optimizer_sink(B& backend, adarank::low_rank_adamw<B>& opt, std::vector<lm::param_ref<T>>& params, std::vector<param_id>& ids, C& comm)
        : backend_(backend), opt_(opt), params_(params), ids_(ids), comm_(comm) {
        for (const param_id id : ids_) low_rank_.push_back(opt_.info(id).low_rank);
    }
    void dense(std::size_t i, velora::const_matrix_view<T> grad) override {
        if constexpr (one_process<C>) {
            if (measure_ && !low_rank_[i]) energy_ += backend_.sum_of_squares(grad);
            stepped(i, opt_.step(ids_[i], weight(i), grad));
        } else if (low_rank_[i]) {
            stepped(i, opt_.step(ids_[i], weight(i), grad, comm_));
        } else {
            if (grad.data != params_[i].grad) throw std::logic_error("the gradient of " + params_[i].name + " is not in its gradient buffer");
            defer(i);
        }
    }
    void factored(std::size_t i, const velora::factored_gradient<T>& grad) override {
        if constexpr (one_process<C>) {
            if (measure_ && !low_rank_[i]) energy_ += adarank::factored_gradient_op<B>(backend_, grad, scratch_).norm2();
            stepped(i, opt_.step(ids_[i], weight(i), grad));
        } else if (low_rank_[i]) {
            stepped(i, opt_.step(ids_[i], weight(i), grad, comm_));
        } else {
            // The model never writes a VeLoRA projection's gradient buffer: free to hold the expansion.
            adarank::factored_gradient_op<B>(backend_, grad, scratch_).row_block(0, gradient(i));
            defer(i);
        }
    }
    // After train_step (data-parallel): reduces and steps the deferred dense gradients.
    void flush() {
        if constexpr (!one_process<C>) {
            if (deferred_.empty()) return;
            try {
                opt_.all_reduce_mean(std::span<const param_id>(deferred_ids_), std::span<const velora::matrix_view<T>>(deferred_grads_), comm_);
                for (std::size_t k = 0; k < deferred_.size(); ++k) {
                    // What all_reduce_mean put into its all-reduces for this gradient (counted from the
                    // size: in this tree info().communicated_bytes of a parameter stepped without the
                    // communicator after all_reduce_mean is 0).
                    bytes_ += static_cast<std::uint64_t>(deferred_grads_[k].size()) * sizeof(T);
                    if (measure_) energy_ += backend_.sum_of_squares(deferred_grads_[k]);
                    check(opt_.step(deferred_ids_[k], weight(deferred_[k]), velora::const_matrix_view<T>(deferred_grads_[k])), deferred_[k]);
                }
            } catch (...) {
                clear();
                throw;
            }
            clear();
        }
    }
    // Gradient bytes this rank has put into all-reduces (0 in one process).
    [[nodiscard]] std::uint64_t communicated_bytes() const noexcept { return bytes_; }
    // With `on`, the next step sums the energy of the gradients the optimizer steps with: ‖G‖²
    // of a densely optimised parameter (data-parallel: of the ranks' mean), ‖Ĝ‖² of a low-rank
    // one's projected gradient. It shows a gradient of the wrong scale at once (a factor c on
    // G is c² here), where the losses respond only through Adam's ε (Adam normalises its step).
    void measure(bool on) {
        measure_ = on;
        energy_ = 0;
    }
    [[nodiscard]] double energy() const noexcept { return energy_; }

private:
    velora::matrix_view<T> weight(std::size_t i) { return {params_[i].data, params_[i].rows, params_[i].cols, params_[i].cols}; }
    velora::matrix_view<T> gradient(std::size_t i) { return {params_[i].grad, params_[i].rows, params_[i].cols, params_[i].cols}; }
    void defer(std::size_t i) {
        deferred_.push_back(i);
        deferred_ids_.push_back(ids_[i]);
        deferred_grads_.push_back(gradient(i));
    }
    void clear() {
        deferred_.clear();
        deferred_ids_.clear();
        deferred_grads_.clear();
    }
    void stepped(std::size_t i, velora::status s) {
        check(s, i);
        if (!low_rank_[i]) return;   // (the dense steps of a data-parallel run are counted in flush)
        if (measure_) energy_ += opt_.info(ids_[i]).projected_norm2;
        bytes_ += opt_.info(ids_[i]).communicated_bytes;
    }
    // ok and degenerate_input (an all-zero gradient where a new subspace was due: the old one
    // is kept, the step was taken) go on; any other status means the step changed nothing
    // because the gradient was NaN/Inf or overflowed: the run has diverged. The status is the
    // same on every rank (the optimizer's promise), so is the error.
    void check(velora::status s, std::size_t i) {
        if (s != velora::status::ok && s != velora::status::degenerate_input)
            throw agreed_error("optimizer step for " + params_[i].name + " returned status " + std::string(velora::to_string(s)) +
                               ": training diverged");
    }
    B& backend_;
    adarank::low_rank_adamw<B>& opt_;
    std::vector<lm::param_ref<T>>& params_;
    std::vector<param_id>& ids_;
    C& comm_;
    std::vector<bool> low_rank_;
    std::vector<std::size_t> deferred_;   // parameter indices whose gradients wait for flush()
    std::vector<param_id> deferred_ids_;
    std::vector<velora::matrix_view<T>> deferred_grads_;
    B::template buffer<T> scratch_;   // factored_gradient_op's (its row_block and norm2 do not use it)
    std::uint64_t bytes_ = 0;
    bool measure_ = false;
    double energy_ = 0;
};

// Trains one configuration; fills `r`. In one process (C = single_process) it runs in a child
// process (run_isolated); data-parallel in each rank's own process (run_in_process), where every
// collective below is called by all ranks in the same order.
template <velora::communicator C>
void train_one(const std::string& name, const options& o, const corpus& data, report::run& r, C& comm) {
    const index_t share = o.batch / comm.size();   // this rank's sequences of every batch
    const std::size_t first = static_cast<std::size_t>(comm.rank() * share * (o.model.context + 1));   // its first token
    const bool root = comm.rank() == 0;
    B backend;
    lm::transformer<T> model(backend, o.model, velora_for(name, o), o.seed, share);
    if constexpr (!one_process<C>) {
        // Every rank projects onto the v of the global first batch (what one process computes).
        model.set_first_compress_hook([&](lm::transformer<T>::compressor_type& comp, velora::const_matrix_view<T> x) {
            const velora::status s = velora::share_first_batch_v(backend, comp, x, comm);
            if (s == velora::status::degenerate_input) {   // all first batches are zero: the fallback v one process would use
                const std::vector<T> ones(static_cast<std::size_t>(comp.subtoken_size()), T(1));
                comp.set_v(ones);
            } else if (s != velora::status::ok) {
                throw agreed_error("the first batch's VeLoRA input is not finite (status " + std::string(velora::to_string(s)) + "): training diverged");
            }
        });
    }
    auto& params = model.parameters();
    const lm::configs::config config = config_of(name, o);
    adarank::low_rank_adamw<B> opt(backend, config.optimizer);
    std::vector<adarank::low_rank_adamw<B>::param_id> ids;
    for (const auto& p : params) {
        const auto kind = uses_low_rank(name, o) && p.projection ? adarank::param_kind::low_rank : adarank::param_kind::dense;
        if constexpr (one_process<C>) ids.push_back(opt.add_parameter(p.rows, p.cols, kind));
        else ids.push_back(opt.add_parameter(p.rows, p.cols, kind, comm));   // checks that every rank registers the same
        if (kind == adarank::param_kind::low_rank) r.rank_names.push_back(p.name);
    }
    optimizer_sink<C> sink(backend, opt, params, ids, comm);
    std::vector<int> tokens, valid_tokens;
    auto validation_loss = [&] {
        double sum = 0;
        for (int v = 0; v < o.valid_batches; ++v) {
            make_batch(data.valid, o.batch, o.model.context, validation_seed, static_cast<std::uint64_t>(v), valid_tokens);
            sum += model.evaluate(valid_tokens.data() + first, share);
        }
        return mean_over_ranks(comm, sum / o.valid_batches);
    };
    // The low-rank parameters' ranks after `step`, recorded after the first step, after every
    // step that changed one of them (a refresh that chose another rank) and after the last one:
    // each rank holds from its step to the next, which is how the plot draws them.
    auto record_ranks = [&](int step, bool always) {
        std::vector<double> ranks;
        for (std::size_t i = 0; i < params.size(); ++i)
            if (opt.info(ids[i]).low_rank) ranks.push_back(static_cast<double>(opt.info(ids[i]).rank));
        if (ranks.empty() || (!always && !r.ranks.empty() && ranks == r.ranks.back())) return;
        if (!r.rank_steps.empty() && r.rank_steps.back() == step) return;   // the last step was also a change
        r.rank_steps.push_back(step);
        r.ranks.push_back(ranks);
    };
    // What the table reports beside the activations: the weights (from the model's parameters)
    // and, for the --json breakdown, the activations by kind (counted by the model).
    for (const auto& p : params) r.weights_bytes += static_cast<std::size_t>(p.rows * p.cols) * sizeof(T);
    // memory.hpp's optimizer state at the ranks the optimizer holds: it must be what the optimizer
    // reports, or the estimator (--estimate) would print state no run holds.
    auto check_state_formula = [&] {
        lm::memory::count counted;
        for (std::size_t i = 0; i < params.size(); ++i) {
            const auto& info = opt.info(ids[i]);
            const lm::memory::parameter_shape shape{params[i].name.c_str(), params[i].rows, params[i].cols, params[i].matrix, params[i].projection};
            counted += lm::memory::state_elements(shape, info.low_rank ? info.rank : 0) * sizeof(T);
        }
        if (counted.v != opt.state_bytes())
            throw agreed_error("internal error: examples/lm/memory.hpp counts " + std::to_string(counted.v) +
                               " bytes of optimizer state, low_rank_adamw::state_bytes() reports " + std::to_string(opt.state_bytes()));
    };
    r.name = name;
    double seconds = 0;
    const double tokens_per_step = static_cast<double>(o.batch * o.model.context);   // all ranks' tokens
    // Whatever ends the loop (the last step, Ctrl-C, divergence), the row gets its measurements.
    // Data-parallel, a collective (the peak RSS is the largest rank's, the stop is agreed).
    auto finish = [&] {
        if (root && isatty(2)) std::fprintf(stderr, "\n");
        r.optimizer_bytes = opt.state_bytes();
        r.optimizer_workspace_bytes = opt.workspace_bytes();
        if (r.steps > 0) record_ranks(r.steps, true);   // the ranks at the end (once, if the last step changed them)
        r.mean_step_ms = r.steps ? 1e3 * seconds / r.steps : 0;
        r.tokens_per_second = seconds > 0 ? tokens_per_step * r.steps / seconds : 0;
        r.peak_rss_bytes = static_cast<std::size_t>(max_over_ranks(comm, static_cast<double>(report::peak_rss_bytes())));
        r.communicated_bytes = sink.communicated_bytes();
        r.interrupted = stop_agreed(comm);
    };
    try {
        for (int step = 0; step < o.steps && !stop_agreed(comm); ++step) {
            make_batch(data.train, o.batch, o.model.context, o.seed, static_cast<std::uint64_t>(step), tokens);   // the global batch
            const bool evaluate = step % o.eval_every == 0 || step + 1 == o.steps;
            sink.measure(evaluate);
            if (config.warmup > 0) opt.set_learning_rate(lm::configs::lr_at(config, step));
            const auto t0 = std::chrono::steady_clock::now();
            const double own = model.train_step(tokens.data() + first, share, sink);   // this rank's share
            sink.flush();
            seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            const double loss = mean_over_ranks(comm, own);
            if (!std::isfinite(loss)) throw agreed_error("the training loss is not finite: training diverged (try a lower --lr)");
            r.train_loss.push_back(loss);
            r.steps = step + 1;
            if (model.activation_bytes() > r.activation_bytes) {   // the same at every step (fixed batch)
                r.activation_bytes = model.activation_bytes();
                for (std::size_t k = 0; k < lm::memory::kinds; ++k)
                    r.activation_kinds[k] = static_cast<std::size_t>(model.activation_breakdown().by_kind[k].v);
            }
            if (!r.rank_names.empty()) record_ranks(step + 1, step == 0);
            r.peak_optimizer_bytes = std::max(r.peak_optimizer_bytes, opt.state_bytes());
            r.mean_optimizer_bytes += (static_cast<double>(opt.state_bytes()) - r.mean_optimizer_bytes) / (step + 1);
            if (evaluate) {
                const double valid = validation_loss();
                if (!std::isfinite(valid)) throw agreed_error("the validation loss is not finite: training diverged (try a lower --lr)");
                r.valid_steps.push_back(step + 1);
                r.valid_loss.push_back(valid);
                r.gradient_energy.push_back(sink.energy());
            }
            if (root) report::progress(name, step + 1, o.steps, loss, tokens_per_step * (step + 1) / seconds);
        }
        if (r.steps > 0) check_state_formula();
    } catch (const agreed_error&) {
        finish();
        throw;
    } catch (const std::exception& e) {
        if constexpr (!one_process<C>) abort_all_ranks(comm, name + ": " + e.what());
        finish();
        throw;
    } catch (...) {
        if constexpr (!one_process<C>) abort_all_ranks(comm, name + ": unknown error");
        finish();
        throw;
    }
    finish();
}

// Runs `train_one` in a child process and reads its result back through a pipe. The child stops
// with the parent: forwarded SIGINT/SIGTERM/SIGHUP end its loop after the current step (it
// reports what it trained), and it is killed outright when the parent dies any other way.
report::run run_isolated(const std::string& name, const options& o, const corpus& data) {
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe() failed");
    std::fflush(nullptr);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) throw std::runtime_error("fork() failed");
    if (pid == 0) {
        // Dies with lm_train, however lm_train ends (SIGKILL cannot be caught and forwarded), so
        // that no orphan trains on at full CPU: the kernel sends SIGKILL when the thread that
        // forked ends, and that is lm_train's main thread, which lives until exit. A parent that
        // died before prctl took effect shows as a different getppid() (this process was
        // reparented). Elsewhere than Linux only the forwarded signals stop it.
#if defined(__linux__)
        prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
        if (getppid() != parent) _exit(1);
        close(fds[0]);
        int code = 0;
        report::run r;
        try {
            velora::single_process one;
            train_one(name, o, data, r, one);
        } catch (const std::exception& e) {
            r.error = e.what();
            code = 1;
        }
        const std::string text = report::serialize(r);
        std::size_t done = 0;
        while (done < text.size()) {
            const ssize_t n = write(fds[1], text.data() + done, text.size() - done);
            if (n <= 0) break;
            done += static_cast<std::size_t>(n);
        }
        close(fds[1]);
        _exit(code);
    }
    close(fds[1]);
    training_child = pid;
    if (interrupted) kill(pid, interrupted);   // a signal between main's check and here was not forwarded
    std::string text;
    char buf[65536];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    training_child = 0;
    report::run r = report::deserialize(text);
    if (r.name.empty()) r.name = name;
    if (r.error.empty() && WIFSIGNALED(status)) r.error = "training process killed by signal " + std::to_string(WTERMSIG(status));
    else if (r.error.empty() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) r.error = "training process failed";
    return r;
}

// Fails before training, not after it, when an output file could not be written, without
// touching what is at `path` now (an older result must survive a run that dies or fails): creates
// and removes the temporary file that report::write_replacing writes and renames onto `path`.
void check_output(const std::string& path) {
    if (path.empty()) return;
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) throw std::runtime_error("cannot write output file '" + path + "': it is a directory");
    const std::string temp = report::temporary_path(path);
    const int fd = open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) throw std::runtime_error("cannot write output file '" + path + "' (cannot create '" + temp + "': " + std::strerror(errno) + ")");
    close(fd);
    std::remove(temp.c_str());
}

// Data-parallel: trains one configuration in this process (every rank calls it for the same
// configurations in the same order). Its peak RSS is measured from a reset of the process's
// high-water mark after the allocator has returned what it can of earlier configurations.
template <velora::communicator C>
report::run run_in_process(const std::string& name, const options& o, const corpus& data, C& comm, bool& rss_reset) {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
    rss_reset = report::reset_peak_rss() && rss_reset;
    report::run r;
    r.name = name;
    try {
        train_one(name, o, data, r, comm);
    } catch (const agreed_error& e) {
        r.error = e.what();
    } catch (const std::exception& e) {   // setting up (model, optimizer, registration) failed, maybe on this rank only
        abort_all_ranks(comm, name + ": " + e.what());
    }
    return r;
}

// What the columns mean in a data-parallel run (printed under the table by rank 0).
[[maybe_unused]] void print_dp_notes(const std::vector<report::run>& runs, const options& o, int ranks, bool rss_reset) {
    std::printf("(data-parallel over %d MPI ranks, %ld of the %ld sequences of every batch each: the losses are means over all of them;\n"
                " activ. MiB is one rank's; peak RSS is the largest rank's VmHWM during the configuration, %s;\n"
                " ms/step and tok/s: rank 0's time, all ranks' tokens)\n",
                ranks, static_cast<long>(o.batch / ranks), static_cast<long>(o.batch),
                rss_reset ? "measured from a reset before it (the configurations run one after another in each rank's process: it "
                            "includes the corpus, the MPI runtime and what the allocator kept of earlier ones)"
                          : "which could not be reset between configurations here: since the rank started");
    std::string line;
    for (const auto& r : runs) {
        if (r.steps == 0) continue;
        char item[96];
        std::snprintf(item, sizeof item, "%s%s %.1f KiB", line.empty() ? "" : ", ", r.name.c_str(),
                      static_cast<double>(r.communicated_bytes) / r.steps / 1024.0);
        line += item;
    }
    if (!line.empty()) std::printf("gradient bytes each rank all-reduced per step: %s\n", line.c_str());
}

// The run's settings for --json: every flag's value (defaults included), the model's shape, the
// corpus, the library version and the GEMM engine, so that a result file says how it was made.
// "threads" (OpenMP threads of a training process) changes only the timings, which
// demo_determinism strips from its comparison along with it and the --json path. "ranks": the
// processes of a data-parallel run (1 otherwise).
// `data` is null for --estimate (no corpus is read).
std::string settings_json(const options& o, const corpus* data, int ranks) {
    std::ostringstream os;
    os.precision(17);   // the learning rates as given
    auto text = [](const std::string& s) { return "\"" + report::json_escape(s) + "\""; };
    auto path = [&](const std::string& s) { return s.empty() ? std::string("null") : text(s); };
    std::vector<std::string> configs;
    for (const auto& c : o.configs) configs.push_back(text(c));
    const auto& m = o.model;
    os << "{\"flags\":{\"preset\":" << path(o.preset) << ",\"estimate\":" << (o.estimate ? "true" : "false") << ",\"vocab\":" << o.model.vocab
       << ",\"corpus\":" << text(o.corpus) << ",\"steps\":" << o.steps << ",\"batch\":" << o.batch << ",\"context\":" << m.context
       << ",\"d-model\":" << m.d_model << ",\"layers\":" << m.layers << ",\"heads\":" << m.heads << ",\"ffn\":" << m.ffn << ",\"rank\":" << o.rank
       << ",\"groups\":" << o.groups << ",\"lr\":" << o.lr << ",\"lr-low-rank\":" << o.lr_low_rank << ",\"eval-every\":" << o.eval_every
       << ",\"configs\":[" << join(configs, ",") << "],\"share-qkv\":" << (o.share_qkv ? "true" : "false") << ",\"seed\":" << o.seed
       << ",\"split\":" << text(o.split) << ",\"valid-batches\":" << o.valid_batches << ",\"study\":" << path(o.study) << ",\"seeds\":[";
    for (std::size_t i = 0; i < o.seeds.size(); ++i) os << (i ? "," : "") << o.seeds[i];
    os << "],\"json\":" << path(o.json) << ",\"plot\":" << path(o.plot) << "}";
    os << ",\"model\":{\"vocab\":" << m.vocab << ",\"d_model\":" << m.d_model << ",\"heads\":" << m.heads << ",\"d_head\":" << m.d_model / m.heads
       << ",\"layers\":" << m.layers << ",\"ffn\":" << m.ffn << ",\"context\":" << m.context << ",\"parameters\":" << lm::memory::parameter_count(m).v << "}";
    if (data)
        os << ",\"corpus\":{\"files\":" << data->files << ",\"train_bytes\":" << data->train.size() << ",\"valid_bytes\":" << data->valid.size() << ",\"split\":" << text(data->split) << "}";
    os << ",\"velora_version\":" << text(VELORA_VERSION_STRING) << ",\"gemm\":{\"blas\":" << (velora::cpu::has_blas ? "true" : "false")
       << ",\"name\":" << text(velora::cpu::blas_name()) << "},\"threads\":" << velora::cpu::resolve_threads(0) << ",\"ranks\":" << ranks << "}";
    return os.str();
}

// What the validation loss is measured on, for the table.
std::string validation_note(const options& o) {
    return std::to_string(o.valid_batches) + " fixed batches of the " + (o.split == "tune" ? "tuning split" : "held-out 10%");
}

void print_header(const options& o, const corpus& data, int ranks) {
    std::printf("Byte-level LM on %zu fortune files from %s: %zu train / %zu validation bytes\n", data.files, o.corpus.c_str(), data.train.size(),
                data.valid.size());
    std::printf("model%s%s: d_model %ld, %ld layers, %ld heads, ffn %ld, context %ld (%llu parameters); batch %ld, %d steps; lr %g (full-rank "
                "runs), %g with scale 0.25 (low-rank runs); rank <= %ld, VeLoRA G = %ld%s\n",
                o.preset.empty() ? "" : " ", o.preset.c_str(), static_cast<long>(o.model.d_model), static_cast<long>(o.model.layers),
                static_cast<long>(o.model.heads), static_cast<long>(o.model.ffn), static_cast<long>(o.model.context),
                static_cast<unsigned long long>(lm::memory::parameter_count(o.model).v), static_cast<long>(o.batch), o.steps, o.lr, o.lr_low_rank,
                static_cast<long>(o.rank), static_cast<long>(o.groups), o.share_qkv ? " (q, k, v share one record)" : "");
    if (ranks > 1)
        std::printf("data-parallel: %d MPI ranks, %ld sequences of each batch per rank\n", ranks, static_cast<long>(o.batch / ranks));
}

// --estimate: the memory of every configuration of --configs for the model of the flags at
// --batch sequences, from memory.hpp: the accounting lm::transformer counts with and check_sizes
// uses. Nothing is allocated or trained, so it works for shapes that would not fit (LLaMA-7B).
void print_estimate(const options& o) {
    namespace mem = lm::memory;
    std::vector<mem::footprint> fps;
    std::uint64_t biggest = 0;
    for (const auto& name : o.configs) {
        fps.push_back(mem::estimate(o.model, velora_for(name, o), o.batch, rank_for(name, o), sizeof(T)));
        biggest = std::max(biggest, fps.back().total().v);
    }
    const bool gib = biggest >= (std::uint64_t{10} << 30);
    const double unit = gib ? 1073741824.0 : 1048576.0;
    const char* unit_name = gib ? "GiB" : "MiB";
    const auto& m = o.model;
    std::printf("Memory estimate, nothing trained%s%s: d_model %ld, %ld layers, %ld heads, ffn %ld, context %ld, vocabulary %ld\n"
                "(%llu parameters); batch %ld (%ld tokens); float32 values; rank %ld (GaLore's, AdaRankGrad's cap); VeLoRA G = %ld%s\n",
                o.preset.empty() ? "" : " for --preset ", o.preset.c_str(), static_cast<long>(m.d_model), static_cast<long>(m.layers),
                static_cast<long>(m.heads), static_cast<long>(m.ffn), static_cast<long>(m.context), static_cast<long>(m.vocab),
                static_cast<unsigned long long>(mem::parameter_count(m).v), static_cast<long>(o.batch), static_cast<long>(o.batch * m.context),
                static_cast<long>(o.rank), static_cast<long>(o.groups), o.share_qkv ? " (q, k, v share one record)" : "");
    std::printf("\n%-16s %11s %11s %11s %11s %11s %11s   (%s)\n", "configuration", "weights", "gradients", "optimizer", "activations", "other",
                "total", unit_name);
    auto saturated = [](mem::count c) { return c.v == UINT64_MAX; };
    std::vector<report::run> kinds;
    for (std::size_t i = 0; i < fps.size(); ++i) {
        const auto& fp = fps[i];
        const auto c = config_of(o.configs[i], o);
        const bool cap = c.low_rank && !c.fixed_rank;
        std::printf("%-16s", (o.configs[i] + (cap ? "*" : "")).c_str());
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
        return c.low_rank && !c.fixed_rank;
    });
    if (any_cap)
        std::printf("(* AdaRankGrad's ranks are data-dependent: its optimizer state is given at the cap --rank %ld, an upper bound)\n",
                    static_cast<long>(o.rank));
    std::printf("(optimizer: AdamW moments of every weight, or bases + moments of the projections and moments of the rest;\n"
                " gradients: one dense buffer per weight, as lm::transformer allocates them; other: backward scratch, VeLoRA's A\n"
                " buffers and transient inputs, the compressors' spare Z. Not counted: the library's scratch (GEMM, the optimizer's\n"
                " refresh workspace, SVD), code and libraries, the corpus)\n");
    report::print_activation_kinds(kinds, (std::string("\nActivations kept for backward by kind (") + unit_name + ")").c_str(), unit);
}

// The --json of --estimate: the settings and, per configuration, the bytes print_estimate shows.
void write_estimate_json(const options& o) {
    namespace mem = lm::memory;
    report::write_replacing(o.json, "--json", [&](std::ostream& out) {
        out << "{\"settings\":" << settings_json(o, nullptr, 1) << ",\"estimates\":[";
        for (std::size_t i = 0; i < o.configs.size(); ++i) {
            const std::string& name = o.configs[i];
            const mem::footprint fp = mem::estimate(o.model, velora_for(name, o), o.batch, rank_for(name, o), sizeof(T));
            out << (i ? "," : "") << "{\"name\":\"" << report::json_escape(name) << "\",\"rank\":" << rank_for(name, o) << ",\"rank_is\":\""
                << (!uses_low_rank(name, o) ? "dense" : config_of(name, o).fixed_rank ? "fixed" : "cap") << "\",\"weights_bytes\":" << fp.weights.v
                << ",\"gradient_bytes\":" << fp.gradients.v << ",\"optimizer_bytes\":" << fp.optimizer.v << ",\"activation_bytes\":" << fp.activations.v
                << ",\"activation_bytes_by_kind\":{";
            for (std::size_t k = 0; k < mem::kinds; ++k) out << (k ? "," : "") << '"' << mem::kind_keys[k] << "\":" << fp.by_kind.by_kind[k].v;
            out << "},\"other_bytes\":" << fp.other.v << ",\"total_bytes\":" << fp.total().v << "}";
        }
        out << "]}\n";
    });
}

// The corpus, checked against the context length.
corpus load_checked_corpus(const options& o) {
    corpus data = load_corpus(o.corpus);
    const std::size_t shortest = o.split == "tune" || !o.study.empty() ? tuning_split(data).valid.size() : data.valid.size();
    if (shortest <= static_cast<std::size_t>(o.model.context) + 1)
        throw std::runtime_error("--context " + std::to_string(o.model.context) + " is too long for the " +
                                 (o.split == "tune" || !o.study.empty() ? "tuning" : "validation") + " split of " + std::to_string(shortest) + " bytes");
    return o.split == "tune" ? tuning_split(data) : data;
}

// --study: every run of the plan in a forked process of its own (run_isolated), the tuning runs
// on the tuning split. The files are rewritten after every finished point.
int run_study(const options& o, const corpus& data) {
    const corpus tuning = tuning_split(data);
    const lm::study::plan& plan = *lm::study::find_plan(o.study);
    std::printf("study %s: %s\n%zu points, learning rates swept on the tuning split (%zu train / %zu validation bytes), then seeds",
                plan.name.c_str(), plan.description.c_str(), plan.points.size(), tuning.train.size(), tuning.valid.size());
    for (auto seed : o.seeds) std::printf(" %llu", static_cast<unsigned long long>(seed));
    std::printf(" on the validation split\n");
    std::fflush(stdout);
    auto train = [&](const std::string& config, std::uint64_t seed, bool tune) {
        options one = o;
        one.configs = {config};
        one.seed = seed;
        one.split = tune ? "tune" : "valid";
        return run_isolated(config, one, tune ? tuning : data);
    };
    auto write = [&](const std::vector<lm::study::point_result>& results) {
        if (!o.json.empty())
            report::write_replacing(o.json, "--json", [&](std::ostream& out) { lm::study::write_json(out, results, plan.name, settings_json(o, &data, 1)); });
        if (!o.plot.empty()) report::write_replacing(o.plot, "--plot", [&](std::ostream& out) { lm::study::write_svg(out, results); });
    };
    const auto results = lm::study::run(plan, o.seeds, train, [] { return interrupted != 0; }, write);
    lm::study::print(results);
    if (!results.empty()) write(results);
    if (interrupted) {
        std::fprintf(stderr, "lm_train: interrupted by signal %d (%s); the table shows the finished points\n", static_cast<int>(interrupted),
                     strsignal(interrupted));
        return 128 + interrupted;
    }
    return 0;
}

// One process (also an MPI build started without mpirun, or with one rank): every configuration
// in a forked process of its own.
int main_one_process(int argc, char** argv) {
    try {
        const options o = parse(argc, argv);
        if (o.help) {
            print_help();
            return 0;
        }
        if (o.estimate) {
            check_output(o.json);
            print_estimate(o);
            if (!o.json.empty()) write_estimate_json(o);
            return 0;
        }
        check_sizes(o);
        install_stop_handlers();
        for (const std::string* path : {&o.json, &o.plot}) check_output(*path);
        const corpus data = load_checked_corpus(o);
        print_header(o, data, 1);
        if (!o.study.empty()) return run_study(o, data);
        std::vector<report::run> runs;
        for (const auto& name : o.configs) {
            if (interrupted) break;
            runs.push_back(run_isolated(name, o, data));
            if (!runs.back().error.empty()) std::fprintf(stderr, "%s: %s\n", name.c_str(), runs.back().error.c_str());
        }
        report::print_table(runs, o.batch * o.model.context, validation_note(o));
        if (!runs.empty()) {   // stopped before the first configuration: nothing to replace an older result with
            if (!o.json.empty()) report::write_json(o.json, runs, settings_json(o, &data, 1));
            if (!o.plot.empty()) report::write_svg(o.plot, runs);
        }
        if (interrupted) {
            std::fprintf(stderr, "lm_train: interrupted by signal %d (%s); the table shows what had been trained\n", static_cast<int>(interrupted),
                         strsignal(interrupted));
            return 128 + interrupted;   // the shell's convention for a command ended by a signal
        }
        for (const auto& r : runs)
            if (!r.error.empty()) return 1;
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "lm_train: %s\n", e.what());
        return 2;
    }
}

// Data-parallel over the ranks of `comm` (more than one). Every rank parses and checks the same
// flags and loads the corpus; they then agree whether to go on (a rank whose checks failed says
// why, rank 0 for all when they fail alike), and train the configurations one after another.
template <velora::communicator C>
int main_data_parallel(int argc, char** argv, C& comm) {
    const bool root = comm.rank() == 0;
    options o;
    corpus data;
    std::string error;
    try {
        o = parse(argc, argv);
        if (!o.study.empty()) throw std::invalid_argument("--study runs in one process (start it without mpirun)");
        if (!o.help && !o.estimate) {
            if (o.batch % comm.size() != 0)
                throw std::invalid_argument("--batch " + std::to_string(o.batch) + " is not divisible by the " + std::to_string(comm.size()) +
                                            " ranks of this data-parallel run (--batch is the global batch; each rank trains on --batch / ranks of "
                                            "its sequences)");
            check_sizes(o, comm.size());
            if (root)   // only rank 0 writes them
                for (const std::string* path : {&o.json, &o.plot}) check_output(*path);
            data = load_checked_corpus(o);
        }
    } catch (const std::exception& e) {
        error = e.what();
    }
    if (comm.any(!error.empty())) {
        std::vector<std::byte> first(reinterpret_cast<const std::byte*>(error.data()), reinterpret_cast<const std::byte*>(error.data()) + error.size());
        velora::broadcast_blob(comm, first, 0);
        const std::string root_error(reinterpret_cast<const char*>(first.data()), first.size());
        if (root && !error.empty()) std::fprintf(stderr, "lm_train: %s\n", error.c_str());
        else if (!error.empty() && error != root_error) std::fprintf(stderr, "lm_train (rank %d of %d): %s\n", comm.rank(), comm.size(), error.c_str());
        return 2;
    }
    if (o.help) {
        if (root) print_help();
        return 0;
    }
    if (o.estimate) {   // one process's memory at --batch; rank 0 prints it
        if (!root) return 0;
        try {
            check_output(o.json);
            print_estimate(o);
            if (!o.json.empty()) write_estimate_json(o);
            return 0;
        } catch (const std::exception& e) {
            std::fprintf(stderr, "lm_train: %s\n", e.what());
            return 2;
        }
    }
    try {
        install_stop_handlers();
        if (root) print_header(o, data, comm.size());
        std::fflush(stdout);
        std::vector<report::run> runs;
        bool rss_reset = true;
        for (const auto& name : o.configs) {
            if (stop_agreed(comm)) break;
            runs.push_back(run_in_process(name, o, data, comm, rss_reset));
            if (root && !runs.back().error.empty()) std::fprintf(stderr, "%s: %s\n", name.c_str(), runs.back().error.c_str());
        }
        const int stopped_by = stop_agreed(comm) ? static_cast<int>(interrupted) : 0;   // the same on every rank
        if (root) {
            report::print_table(runs, o.batch * o.model.context, validation_note(o));
            print_dp_notes(runs, o, comm.size(), rss_reset);
            if (!runs.empty()) {
                if (!o.json.empty()) report::write_json(o.json, runs, settings_json(o, &data, comm.size()));
                if (!o.plot.empty()) report::write_svg(o.plot, runs);
            }
        }
        if (stopped_by) {
            if (root)
                std::fprintf(stderr, "lm_train: interrupted by signal %d (%s); the table shows what had been trained\n", stopped_by, strsignal(stopped_by));
            return 128 + stopped_by;
        }
        for (const auto& r : runs)
            if (!r.error.empty()) return 1;
        return 0;
    } catch (const std::exception& e) {   // after training (writing the files): rank 0's own
        std::fprintf(stderr, "lm_train: %s\n", e.what());
        return 2;
    }
}

} // namespace

int main(int argc, char** argv) {
#if defined(VELORA_DEMO_MPI)
    // Always initialised (a plain `lm_train` is an MPI singleton of one rank); only the main
    // thread calls MPI, the backend's OpenMP threads do not.
    int provided = 0;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        std::fprintf(stderr, "lm_train: MPI_Init_thread failed\n");
        return 2;
    }
    int code = 0;
    {
        velora::mpi_communicator world(MPI_COMM_WORLD);
        code = world.size() > 1 ? main_data_parallel(argc, argv, world) : main_one_process(argc, argv);
    }
    MPI_Finalize();
    return code;
#else
    return main_one_process(argc, argv);
#endif
}
