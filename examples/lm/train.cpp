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
// --share-qkv: q, k and v read one VeLoRA record of their common input (otherwise only v's
// input is recorded, and q, k still keep it).
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
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace {

using T = float;
using B = velora::eigen_backend<T>;
using velora::index_t;

volatile std::sig_atomic_t interrupted = 0;
volatile pid_t training_child = 0;   // forwarded SIGINT, so that `kill -INT <trainer>` also stops the run in progress
void on_sigint(int) {
    interrupted = 1;
    if (training_child > 0) kill(training_child, SIGINT);
}

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
    std::vector<std::string> configs = {"adamw", "galore", "velora", "adarank", "velora+adarank"};
    std::uint64_t seed = 1;
    std::string json, plot;
};

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
                static const std::vector<std::string> known = {"adamw", "galore", "velora", "adarank", "velora+adarank"};
                if (std::find(known.begin(), known.end(), item) == known.end())
                    usage_error("unknown configuration '" + item + "' (known: adamw, galore, velora, adarank, velora+adarank)");
                o.configs.push_back(item);
            }
            if (o.configs.empty()) usage_error("flag --configs needs at least one configuration");
        } else if (flag == "--help" || flag == "-h") {
            std::printf("usage: lm_train [--corpus DIR] [--steps N] [--batch B] [--context L] [--d-model D] [--layers N] [--heads H]\n"
                        "                [--ffn F] [--rank R] [--groups G] [--lr LR] [--lr-low-rank LR] [--eval-every N] [--configs a,b,...]\n"
                        "                [--share-qkv] [--seed S] [--json PATH] [--plot PATH]\n");
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
    std::error_code ec;
    if (!fs::is_directory(dir, ec))
        throw std::runtime_error("corpus directory '" + dir + "' does not exist (install it with: apt-get install fortunes, or pass --corpus DIR)");
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

// Runs `train_one` in a child process and reads its result back through a pipe.
report::run run_isolated(const std::string& name, const options& o, const corpus& data) {
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe() failed");
    std::fflush(nullptr);
    const pid_t pid = fork();
    if (pid < 0) throw std::runtime_error("fork() failed");
    if (pid == 0) {
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

} // namespace

int main(int argc, char** argv) {
    try {
        const options o = parse(argc, argv);
        std::signal(SIGINT, on_sigint);
        for (const std::string* path : {&o.json, &o.plot})   // fail before training, not after it
            if (!path->empty() && !std::ofstream(*path)) throw std::runtime_error("cannot write output file '" + *path + "'");
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
        if (!o.json.empty()) report::write_json(o.json, runs);
        if (!o.plot.empty()) report::write_svg(o.plot, runs);
        if (interrupted) {
            std::fprintf(stderr, "lm_train: interrupted; the table shows what had been trained\n");
            return 130;
        }
        for (const auto& r : runs)
            if (!r.error.empty()) return 1;
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "lm_train: %s\n", e.what());
        return 2;
    }
}
