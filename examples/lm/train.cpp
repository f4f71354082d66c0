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
//   lm_train [--corpus DIR] [--steps N] [--batch B] [--context L] [--d-model D] [--layers N]
//            [--heads H] [--ffn F] [--rank R] [--groups G] [--lr LR] [--lr-low-rank LR] [--eval-every N]
//            [--configs a,b,...] [--share-qkv] [--seed S] [--json PATH] [--plot PATH]
// (`lm_train --help` says what each flag means and its default; print_help below.)
// --share-qkv: q, k and v read one VeLoRA record of their common input (otherwise only v's
// input is recorded, and q, k still keep it).
// Before anything is trained: the sizes the flags imply must fit in physical memory (check_sizes),
// the folders of --json and --plot must be writable, the corpus must load. SIGINT, SIGTERM and
// SIGHUP stop the configuration in training after its current step (forwarded to its process);
// the table, --json and --plot then show what was trained and the exit status is 128 + the signal.
// A training process dies with lm_train, even on SIGKILL (PR_SET_PDEATHSIG). --json and --plot
// are written at the end, into PATH.tmp-<pid> renamed onto PATH: an older file at PATH is
// replaced only by a complete one.
#include <adarank/adarank.hpp>
#include <velora/velora.hpp>

#include "model.hpp"
#include "report.hpp"

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
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>
#if defined(__linux__)
#include <sys/prctl.h>
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

const std::vector<std::string> known_configs = {"adamw", "galore", "velora", "adarank", "velora+adarank"};

struct options {
    std::string corpus = "/usr/share/games/fortunes";
    int steps = 1000;
    index_t batch = 16;
    lm::model_config model{};
    index_t rank = 32;
    index_t groups = 32;
    double lr = 1e-3;            // full-rank runs (adamw, velora)
    double lr_low_rank = 1e-2;   // low-rank runs (galore, adarank, velora+adarank), with α = 0.25: GaLore's protocol
    int eval_every = 50;
    bool share_qkv = false;
    std::vector<std::string> configs = known_configs;
    std::uint64_t seed = 1;
    std::string json, plot;
};

// Sizes. Every flag is at most 10^9 but their products are not bounded: --context 100000 asks
// for batch·heads·context² attention probabilities per layer (TiB), which used to fail with
// std::bad_alloc in every configuration, after the corpus had loaded. check_sizes refuses such a
// run up front, computing with a count that saturates instead of wrapping around.
struct saturating {
    std::uint64_t v;
    template <class I>
    saturating(I x) : v(static_cast<std::uint64_t>(x)) {}   // from positive integers
    friend saturating operator+(saturating a, saturating b) {
        std::uint64_t r;
        return __builtin_add_overflow(a.v, b.v, &r) ? UINT64_MAX : r;
    }
    friend saturating operator*(saturating a, saturating b) {
        std::uint64_t r;
        return __builtin_mul_overflow(a.v, b.v, &r) ? UINT64_MAX : r;
    }
};

struct footprint {
    std::uint64_t parameters;   // weights of the model
    std::uint64_t bytes;        // what one training process allocates
};

// The buffers lm::transformer's constructor allocates (model.hpp), for the configuration that
// allocates the most: every activation some configuration keeps (x, h1, q, k, v, attention
// probabilities, o, x after attention, h2, a, b, s, the RMSNorm factors), VeLoRA's records and A
// buffers, the logits and backward scratch; weights, gradients and two AdamW moments per weight;
// the loss curve (a double per step and its text form on the way to the parent, ~32 bytes).
// The library's own scratch (GEMM, SVD) is not counted; at --batch 8 --context 1024 this comes
// within 3% of the measured peak RSS of adamw and of velora+adarank.
footprint estimate(const options& o) {
    const saturating d = o.model.d_model, f = o.model.ffn, V = o.model.vocab, C = o.model.context, L = o.model.layers,
                     N = saturating(o.batch) * C, g1 = std::min(o.groups, o.model.d_model), g2 = std::min(o.groups, o.model.ffn);
    const saturating parameters = (V + C) * d + L * (saturating(2) * d + saturating(4) * d * d + saturating(3) * f * d) + d;
    const saturating per_layer = N * (saturating(8) * d + saturating(3) * f + g1 + g2 + 2) + saturating(o.batch) * o.model.heads * C * C +
                                 d * (saturating(3) * g1 + g2);
    const saturating last = N * (saturating(9) * d + saturating(2) * f + V + 1) + C * C;
    const saturating floats = saturating(4) * parameters + L * per_layer + last;
    return {parameters.v, (floats * sizeof(T) + saturating(o.steps) * 32).v};
}

// 0 when the system does not say.
std::uint64_t physical_memory_bytes() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? (saturating(pages) * page).v : 0;
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
void check_sizes(const options& o) {
    const std::uint64_t limit = physical_memory_bytes(), need = estimate(o).bytes;
    if (limit == 0 || need <= limit) return;   // unknown limit: the allocation will tell
    struct size_flag {
        const char* name;
        long value, fallback;
        void (*set)(options&, long);
    };
    const options defaults;
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
        if (culprit.empty() && estimate(defaults).bytes <= limit && estimate(alone).bytes > limit) culprit = named;
    }
    const std::string who = !culprit.empty() ? culprit + " needs" : !changed.empty() ? changed + " together need" : "the default sizes need";
    throw std::invalid_argument(who + (need == UINT64_MAX ? " " : " about ") + human_bytes(need) + " of memory per training process (model, optimizer, activations); the " +
                                "limit is this machine's " + human_bytes(limit) + " of physical memory");
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
    std::printf("usage: lm_train [--corpus DIR] [--steps N] [--batch B] [--context L] [--d-model D] [--layers N] [--heads H]\n"
                "                [--ffn F] [--rank R] [--groups G] [--lr LR] [--lr-low-rank LR] [--eval-every N] [--configs a,b,...]\n"
                "                [--share-qkv] [--seed S] [--json PATH] [--plot PATH]\n"
                "Trains a byte-level transformer LM once per configuration (same seed, data and schedule; each in its own\n"
                "process) and prints a table of validation loss, memory and speed.\n\n");
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
    std::printf("  --configs a,b,...  configurations to run, in this order, from: %s\n"
                "                     (default: all five)\n", join(known_configs, ", ").c_str());
    std::printf("  --share-qkv        q, k and v read one VeLoRA record of their common input (default off: only v's input is\n"
                "                     recorded, q and k keep it)\n");
    std::printf("  --seed S           seed of the initial weights and of the batches (default %llu)\n", static_cast<unsigned long long>(d.seed));
    std::printf("  --json PATH        write the results and the run's settings (flags, model, version, GEMM engine) as JSON\n"
                "                     (default: none)\n");
    std::printf("  --plot PATH        write an SVG plot of the validation loss and the low-rank runs' ranks (default: none)\n");
    std::printf("  -h, --help         print this help and exit\n\n");
    std::printf("Sizes: the model, optimizer and activations of one training process must fit in physical memory (%s here).\n"
                "Output: --json and --plot are written when the run ends, into PATH.tmp-<pid> renamed onto PATH; an existing file\n"
                "is replaced only by a complete one.\n"
                "Signals: SIGINT, SIGTERM and SIGHUP stop the configuration in training after its current step; the table, --json\n"
                "and --plot show what was trained. A training process dies with lm_train, also on SIGKILL.\n"
                "Exit status: 0; 1 if a configuration failed; 2 for bad flags or input; 128 + N when stopped by signal N.\n",
                physical_memory_bytes() ? human_bytes(physical_memory_bytes()).c_str() : "unknown");
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

options parse(int argc, char** argv) {
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        auto next = [&]() -> const char* {
            if (i + 1 >= argc) usage_error("flag " + flag + " needs a value");
            return argv[++i];
        };
        if (flag == "--corpus") o.corpus = next();
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
            o.configs.clear();
            std::stringstream list(next());
            for (std::string item; std::getline(list, item, ',');) {
                if (std::find(known_configs.begin(), known_configs.end(), item) == known_configs.end())
                    usage_error("unknown configuration '" + item + "' (known: " + join(known_configs, ", ") + ")");
                o.configs.push_back(item);
            }
            if (o.configs.empty()) usage_error("flag --configs needs at least one configuration");
        } else if (flag == "--help" || flag == "-h") {
            print_help();
            std::exit(0);
        } else {
            usage_error("unknown flag '" + flag + "' (see --help)");
        }
    }
    if (o.model.d_model % o.model.heads != 0)
        usage_error("--d-model " + std::to_string(o.model.d_model) + " is not divisible by --heads " + std::to_string(o.model.heads));
    return o;
}

// The corpus: every plain fortune file of the directory (not the .dat indexes or the .u8 links),
// in name order, as bytes. The last 10% is the validation split.
struct corpus {
    std::vector<unsigned char> train, valid;
    std::size_t files = 0;
};

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

bool uses_velora(const std::string& c) { return c == "velora" || c == "velora+adarank"; }
bool uses_low_rank(const std::string& c) { return c == "galore" || c == "adarank" || c == "velora+adarank"; }

adarank::optimizer_config optimizer_for(const std::string& name, const options& o) {
    adarank::optimizer_config c;
    if (name == "galore") c = adarank::optimizer_config::galore(o.rank, 200, 0.25);
    else if (uses_low_rank(name)) c.rank = adarank::rank_policy::adaptive(0.2, 1, o.rank);
    c.adam.lr = uses_low_rank(name) ? o.lr_low_rank : o.lr;
    c.adam.weight_decay = 0.0;
    return c;
}

// Steps each parameter as soon as the model hands over its gradient.
class optimizer_sink final : public lm::gradient_sink<T> {
public:
    optimizer_sink(adarank::low_rank_adamw<B>& opt, std::vector<lm::param_ref<T>>& params, std::vector<adarank::low_rank_adamw<B>::param_id>& ids)
        : opt_(opt), params_(params), ids_(ids) {}
    void dense(std::size_t i, velora::const_matrix_view<T> grad) override { check(opt_.step(ids_[i], weight(i), grad), i); }
    void factored(std::size_t i, const velora::factored_gradient<T>& grad) override { check(opt_.step(ids_[i], weight(i), grad), i); }

private:
    velora::matrix_view<T> weight(std::size_t i) { return {params_[i].data, params_[i].rows, params_[i].cols, params_[i].cols}; }
    // ok and degenerate_input (an all-zero gradient where a new subspace was due: the old one
    // is kept, the step was taken) go on; any other status means the step changed nothing
    // because the gradient was NaN/Inf or overflowed: the run has diverged.
    void check(velora::status s, std::size_t i) {
        if (s != velora::status::ok && s != velora::status::degenerate_input)
            throw std::runtime_error("optimizer step for " + params_[i].name + " returned status " + std::string(velora::to_string(s)) +
                                     ": training diverged");
    }
    adarank::low_rank_adamw<B>& opt_;
    std::vector<lm::param_ref<T>>& params_;
    std::vector<adarank::low_rank_adamw<B>::param_id>& ids_;
};

// Trains one configuration; fills `r`. Runs in a child process.
void train_one(const std::string& name, const options& o, const corpus& data, report::run& r) {
    B backend;
    lm::velora_config vc;
    vc.value = vc.down = uses_velora(name);
    vc.share_qkv = uses_velora(name) && o.share_qkv;
    vc.groups = o.groups;
    lm::transformer<T> model(backend, o.model, vc, o.seed, o.batch);
    auto& params = model.parameters();
    adarank::low_rank_adamw<B> opt(backend, optimizer_for(name, o));
    std::vector<adarank::low_rank_adamw<B>::param_id> ids;
    for (const auto& p : params) {
        const auto kind = p.matrix && uses_low_rank(name) && p.name.find("embed") == std::string::npos ? adarank::param_kind::low_rank
                                                                                                      : adarank::param_kind::dense;
        ids.push_back(opt.add_parameter(p.rows, p.cols, kind));
        if (kind == adarank::param_kind::low_rank) r.rank_names.push_back(p.name);
    }
    optimizer_sink sink(opt, params, ids);
    std::vector<int> tokens, valid_tokens;
    const int valid_batches = 8;
    auto validation_loss = [&] {
        double sum = 0;
        for (int v = 0; v < valid_batches; ++v) {
            make_batch(data.valid, o.batch, o.model.context, o.seed + 7, static_cast<std::uint64_t>(v), valid_tokens);
            sum += model.evaluate(valid_tokens.data(), o.batch);
        }
        return sum / valid_batches;
    };
    auto record_ranks = [&](int step) {
        std::vector<double> ranks;
        for (std::size_t i = 0; i < params.size(); ++i)
            if (opt.info(ids[i]).low_rank) ranks.push_back(static_cast<double>(opt.info(ids[i]).rank));
        r.rank_steps.push_back(step);
        r.ranks.push_back(ranks);
    };
    r.name = name;
    double seconds = 0;
    const double tokens_per_step = static_cast<double>(o.batch * o.model.context);
    // Whatever ends the loop (the last step, Ctrl-C, divergence), the row gets its measurements.
    auto finish = [&] {
        if (isatty(2)) std::fprintf(stderr, "\n");
        r.optimizer_bytes = opt.state_bytes();
        r.mean_step_ms = r.steps ? 1e3 * seconds / r.steps : 0;
        r.tokens_per_second = seconds > 0 ? tokens_per_step * r.steps / seconds : 0;
        r.peak_rss_bytes = report::peak_rss_bytes();
        r.interrupted = interrupted != 0;
    };
    try {
        for (int step = 0; step < o.steps && !interrupted; ++step) {
            make_batch(data.train, o.batch, o.model.context, o.seed, static_cast<std::uint64_t>(step), tokens);
            const auto t0 = std::chrono::steady_clock::now();
            const double loss = model.train_step(tokens.data(), o.batch, sink);
            seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (!std::isfinite(loss)) throw std::runtime_error("the training loss is not finite: training diverged (try a lower --lr)");
            r.train_loss.push_back(loss);
            r.steps = step + 1;
            r.activation_bytes = std::max(r.activation_bytes, model.activation_bytes());
            if (step % o.eval_every == 0 || step + 1 == o.steps) {
                const double valid = validation_loss();
                if (!std::isfinite(valid)) throw std::runtime_error("the validation loss is not finite: training diverged (try a lower --lr)");
                r.valid_steps.push_back(step + 1);
                r.valid_loss.push_back(valid);
                if (!r.rank_names.empty()) record_ranks(step + 1);
            }
            report::progress(name, step + 1, o.steps, loss, tokens_per_step * (step + 1) / seconds);
        }
    } catch (...) {
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
            train_one(name, o, data, r);
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

// The run's settings for --json: every flag's value (defaults included), the model's shape, the
// corpus, the library version and the GEMM engine, so that a result file says how it was made.
// "threads" (OpenMP threads of a training process) changes only the timings, which
// demo_determinism strips from its comparison along with it and the --json path.
std::string settings_json(const options& o, const corpus& data) {
    std::ostringstream os;
    os.precision(17);   // the learning rates as given
    auto text = [](const std::string& s) { return "\"" + report::json_escape(s) + "\""; };
    auto path = [&](const std::string& s) { return s.empty() ? std::string("null") : text(s); };
    std::vector<std::string> configs;
    for (const auto& c : o.configs) configs.push_back(text(c));
    const auto& m = o.model;
    os << "{\"flags\":{\"corpus\":" << text(o.corpus) << ",\"steps\":" << o.steps << ",\"batch\":" << o.batch << ",\"context\":" << m.context
       << ",\"d-model\":" << m.d_model << ",\"layers\":" << m.layers << ",\"heads\":" << m.heads << ",\"ffn\":" << m.ffn << ",\"rank\":" << o.rank
       << ",\"groups\":" << o.groups << ",\"lr\":" << o.lr << ",\"lr-low-rank\":" << o.lr_low_rank << ",\"eval-every\":" << o.eval_every
       << ",\"configs\":[" << join(configs, ",") << "],\"share-qkv\":" << (o.share_qkv ? "true" : "false") << ",\"seed\":" << o.seed
       << ",\"json\":" << path(o.json) << ",\"plot\":" << path(o.plot) << "}";
    os << ",\"model\":{\"vocab\":" << m.vocab << ",\"d_model\":" << m.d_model << ",\"heads\":" << m.heads << ",\"d_head\":" << m.d_model / m.heads
       << ",\"layers\":" << m.layers << ",\"ffn\":" << m.ffn << ",\"context\":" << m.context << ",\"parameters\":" << estimate(o).parameters << "}";
    os << ",\"corpus\":{\"files\":" << data.files << ",\"train_bytes\":" << data.train.size() << ",\"valid_bytes\":" << data.valid.size() << "}";
    os << ",\"velora_version\":" << text(VELORA_VERSION_STRING) << ",\"gemm\":{\"blas\":" << (velora::cpu::has_blas ? "true" : "false")
       << ",\"name\":" << text(velora::cpu::blas_name()) << "},\"threads\":" << velora::cpu::resolve_threads(0) << "}";
    return os.str();
}

} // namespace

int main(int argc, char** argv) {
    try {
        const options o = parse(argc, argv);
        check_sizes(o);
        install_stop_handlers();
        for (const std::string* path : {&o.json, &o.plot}) check_output(*path);
        const corpus data = load_corpus(o.corpus);
        if (data.valid.size() <= static_cast<std::size_t>(o.model.context) + 1)
            throw std::runtime_error("--context " + std::to_string(o.model.context) + " is too long for the validation split of " +
                                     std::to_string(data.valid.size()) + " bytes");
        std::printf("Byte-level LM on %zu fortune files from %s: %zu train / %zu validation bytes\n", data.files, o.corpus.c_str(), data.train.size(),
                    data.valid.size());
        std::printf("model: d_model %ld, %ld layers, %ld heads, ffn %ld, context %ld; batch %ld, %d steps; lr %g (full-rank runs), %g with "
                    "scale 0.25 (low-rank runs); rank <= %ld, VeLoRA G = %ld%s\n",
                    static_cast<long>(o.model.d_model), static_cast<long>(o.model.layers), static_cast<long>(o.model.heads),
                    static_cast<long>(o.model.ffn), static_cast<long>(o.model.context), static_cast<long>(o.batch), o.steps, o.lr, o.lr_low_rank,
                    static_cast<long>(o.rank), static_cast<long>(o.groups), o.share_qkv ? " (q, k, v share one record)" : "");
        std::vector<report::run> runs;
        for (const auto& name : o.configs) {
            if (interrupted) break;
            runs.push_back(run_isolated(name, o, data));
            if (!runs.back().error.empty()) std::fprintf(stderr, "%s: %s\n", name.c_str(), runs.back().error.c_str());
        }
        report::print_table(runs, o.batch * o.model.context);
        if (!runs.empty()) {   // stopped before the first configuration: nothing to replace an older result with
            if (!o.json.empty()) report::write_json(o.json, runs, settings_json(o, data));
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
