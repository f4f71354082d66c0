#pragma once
// What the demo trainer reports: per-configuration results, the progress bar, the final table,
// JSON and an SVG plot (validation-loss curves and the low-rank configurations' ranks over time).
// The files are written whole or not at all (write_replacing): a run that dies keeps what was there.
#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#include "memory.hpp"

namespace report {

struct run {
    std::string name, error;
    int steps = 0;
    bool interrupted = false;
    std::vector<double> train_loss;
    std::vector<int> valid_steps;
    std::vector<double> valid_loss;
    std::vector<double> gradient_energy;      // at the valid_steps: Σ ‖G‖² (dense) + Σ ‖Ĝ‖² (low-rank) the optimizer stepped with
    std::vector<std::string> rank_names;      // low-rank parameters, in registration order
    std::vector<int> rank_steps;              // steps after which the ranks were recorded: the first, each that changed one, the last
    std::vector<std::vector<double>> ranks;   // [record][low-rank parameter]; each holds until the next record
    std::size_t activation_bytes = 0;         // kept for backward by one step's forward pass (counted by the model)
    std::array<std::size_t, lm::memory::kinds> activation_kinds{};   // the same by kind (lm::memory::kind)
    std::size_t weights_bytes = 0;            // the model's parameters as stored (NF4 packed)
    std::size_t trainable_params = 0;         // elements of the trainable ones (LoRA: the adapters)
    double valid_before = NAN;                // with --init: the validation loss before the first step
    std::size_t optimizer_bytes = 0;          // optimizer state (low_rank_adamw::state_bytes) at the end
    std::size_t peak_optimizer_bytes = 0;     // its largest value after any step (AdaRankGrad's ranks change)
    double mean_optimizer_bytes = 0;          // its mean over the steps
    std::size_t optimizer_workspace_bytes = 0;   // the optimizer's scratch shared by all parameters (workspace_bytes)
    std::size_t peak_rss_bytes = 0;           // VmHWM of the training process (data-parallel: see reset_peak_rss)
    double mean_step_ms = 0, tokens_per_second = 0;
    std::uint64_t communicated_bytes = 0;     // gradient bytes one rank put into all-reduces over the run (0 in one process)
};

// Resets the process's VmHWM to its current RSS (Linux >= 4.0: "5" to /proc/self/clear_refs), so
// that peak_rss_bytes() then measures from here; false where that is not possible. Data-parallel
// runs use it before each configuration, as they train them one after another in one process.
inline bool reset_peak_rss() {
    std::ofstream out("/proc/self/clear_refs");
    out << "5";
    out.flush();
    return static_cast<bool>(out);
}

inline std::size_t peak_rss_bytes() {
    std::ifstream in("/proc/self/status");
    for (std::string line; std::getline(in, line);)
        if (line.rfind("VmHWM:", 0) == 0) return static_cast<std::size_t>(std::stoull(line.substr(6))) * 1024;
    return 0;
}

// A progress bar redrawn in place on a terminal; on a pipe or file, one line per 10%.
inline void progress(const std::string& name, int step, int steps, double loss, double tokens_per_second) {
    static const bool terminal = isatty(2) != 0;
    if (!terminal && step != steps && step % std::max(1, steps / 10) != 0) return;
    const int width = 30, filled = steps > 0 ? width * step / steps : width;
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(width, '.');
    std::fprintf(stderr, "%s%-15s [%s] %5d/%d  loss %.3f  %.0f tok/s %s", terminal ? "\r" : "", name.c_str(), bar.c_str(), step, steps, loss,
                 tokens_per_second, terminal ? "" : "\n");
    std::fflush(stderr);
}

// A line-based text form, to hand a result from the training process to the parent.
inline std::string serialize(const run& r) {
    std::ostringstream os;
    os.precision(17);
    auto list = [&](const char* key, const auto& v) {
        os << key;
        for (const auto& x : v) os << ' ' << x;
        os << '\n';
    };
    os << "name " << r.name << '\n' << "error " << r.error << '\n' << "steps " << r.steps << '\n' << "interrupted " << r.interrupted << '\n';
    os << "bytes " << r.activation_bytes << ' ' << r.optimizer_bytes << ' ' << r.peak_rss_bytes << ' ' << r.communicated_bytes << ' '
       << r.weights_bytes << ' ' << r.optimizer_workspace_bytes << ' ' << r.peak_optimizer_bytes << ' ' << r.mean_optimizer_bytes << '\n';
    list("activation_kinds", r.activation_kinds);
    os << "speed " << r.mean_step_ms << ' ' << r.tokens_per_second << '\n';
    os << "finetune " << r.trainable_params << ' ' << r.valid_before << '\n';
    list("train_loss", r.train_loss);
    list("valid_steps", r.valid_steps);
    list("valid_loss", r.valid_loss);
    list("gradient_energy", r.gradient_energy);
    list("rank_names", r.rank_names);
    list("rank_steps", r.rank_steps);
    for (const auto& ranks : r.ranks) list("ranks", ranks);
    return os.str();
}

// Numbers as written by operator<< (also "nan" and "inf", which operator>> does not read).
inline void read_numbers(std::istream& in, std::vector<double>& out) {
    for (std::string token; in >> token;) out.push_back(std::strtod(token.c_str(), nullptr));
}

inline run deserialize(const std::string& text) {
    run r;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
        std::istringstream ls(line);
        std::string key;
        ls >> key;
        auto rest = [&] {
            std::string s;
            std::getline(ls, s);
            return s.empty() ? s : s.substr(1);
        };
        if (key == "name") r.name = rest();
        else if (key == "error") r.error = rest();
        else if (key == "steps") ls >> r.steps;
        else if (key == "interrupted") ls >> r.interrupted;
        else if (key == "bytes")
            ls >> r.activation_bytes >> r.optimizer_bytes >> r.peak_rss_bytes >> r.communicated_bytes >> r.weights_bytes >> r.optimizer_workspace_bytes >> r.peak_optimizer_bytes >>
                r.mean_optimizer_bytes;
        else if (key == "activation_kinds") for (auto& x : r.activation_kinds) ls >> x;
        else if (key == "speed") ls >> r.mean_step_ms >> r.tokens_per_second;
        else if (key == "finetune") {
            std::vector<double> x;
            read_numbers(ls, x);
            if (x.size() == 2) {
                r.trainable_params = static_cast<std::size_t>(x[0]);
                r.valid_before = x[1];
            }
        }
        else if (key == "train_loss") read_numbers(ls, r.train_loss);
        else if (key == "valid_steps") for (int x; ls >> x;) r.valid_steps.push_back(x);
        else if (key == "valid_loss") read_numbers(ls, r.valid_loss);
        else if (key == "gradient_energy") read_numbers(ls, r.gradient_energy);
        else if (key == "rank_names") for (std::string x; ls >> x;) r.rank_names.push_back(x);
        else if (key == "rank_steps") for (int x; ls >> x;) r.rank_steps.push_back(x);
        else if (key == "ranks") {
            r.ranks.emplace_back();
            read_numbers(ls, r.ranks.back());
        }
    }
    return r;
}

inline double final_valid(const run& r) { return r.valid_loss.empty() ? NAN : r.valid_loss.back(); }
inline double mib(std::size_t bytes) { return static_cast<double>(bytes) / 1048576.0; }

// The activations of each run by kind (lm::memory::kind), in `unit` bytes; VeLoRA moves bytes
// from "linear in" to "records" and leaves the other kinds as they are.
inline void print_activation_kinds(const std::vector<run>& runs, const char* title, double unit) {
    int width = 16;
    for (const auto& r : runs) width = std::max(width, static_cast<int>(r.name.size()));
    // LoRA's H only where a run has adapters (the pretraining tables keep their seven columns).
    const std::size_t h = static_cast<std::size_t>(lm::memory::kind::adapter_h);
    const bool lora = std::any_of(runs.begin(), runs.end(), [&](const run& r) { return r.activation_kinds[h] > 0; });
    std::printf("%s:\n%-*s", title, width, "configuration");
    for (std::size_t k = 0; k < lm::memory::kinds; ++k)
        if (k != h || lora) std::printf(" %11s", lm::memory::kind_heads[k]);
    std::printf(" %11s\n", "total");
    for (const auto& r : runs) {
        if (r.steps == 0) continue;
        std::printf("%-*s", width, r.name.c_str());
        for (std::size_t k = 0; k < lm::memory::kinds; ++k)
            if (k != h || lora) std::printf(" %11.3f", static_cast<double>(r.activation_kinds[k]) / unit);
        std::printf(" %11.3f\n", static_cast<double>(r.activation_bytes) / unit);
    }
    std::printf("(norm in: the residual stream kept for each RMSNorm's backward; linear in: exact inputs of the projections (q/k/v,\n"
                " o, MLP up/gate/down, head), what VeLoRA can replace; records: VeLoRA's; q,k,v and attn probs: what attention's\n"
                " backward reads; SwiGLU a,b: the two MLP branches; out softmax: tokens x vocabulary%s)\n",
                lora ? ";\n LoRA: linear in are the adapters' inputs x_a (with dropout one per adapter; the frozen W needs none), records\n"
                       " replace those of v and down, LoRA H = x_a A^T of each adapter" : "");
}

// The fine-tuning table (runs from --init): the target's validation loss before and after,
// what is trained, and the memory beside it.
inline void print_finetune_table(const std::vector<run>& runs, long tokens_per_step, const std::string& validation) {
    int width = 16;
    for (const auto& r : runs) width = std::max(width, static_cast<int>(r.name.size()));
    std::printf("\n%-*s %6s %8s %8s %11s %11s %11s %11s %10s %9s\n", width, "configuration", "steps", "before", "after", "trainable",
                "weights MiB", "activ. MiB", "optim. MiB", "peak RSS", "ms/step");
    for (const auto& r : runs) {
        if (r.steps == 0) {
            std::printf("%-*s %s\n", width, r.name.c_str(), r.error.empty() ? "no step taken" : ("failed: " + r.error).c_str());
            continue;
        }
        std::printf("%-*s %6d %8.4f %8.4f %11zu %11.3f %11.3f %11.3f %8.1f M %9.1f%s\n", width, r.name.c_str(), r.steps, r.valid_before, final_valid(r),
                    r.trainable_params, mib(r.weights_bytes), mib(r.activation_bytes), mib(r.optimizer_bytes), mib(r.peak_rss_bytes), r.mean_step_ms,
                    !r.error.empty() ? "  (failed)" : r.interrupted ? "  (interrupted)" : "");
    }
    std::printf("(before / after: validation loss on %s, nats per byte, before the first step and after the\n"
                " last (qlora's \"before\" is its NF4 base's); trainable: weights the optimizer steps (LoRA: the adapters; the\n"
                " embeddings, the tied head and the RMSNorm gains are frozen); weights: all of them as stored, NF4 packed; activations:\n"
                " what one forward pass keeps for backward, counted by the model; optimizer: its state at the end; %ld tokens per step)\n",
                validation.c_str(), tokens_per_step);
    print_activation_kinds(runs, "\nActivations kept for backward by kind (MiB)", 1048576.0);
}

// `validation`: what the validation loss was measured on, for the note under the table.
inline void print_table(const std::vector<run>& runs, long tokens_per_step, const std::string& validation) {
    int width = 16;
    for (const auto& r : runs) width = std::max(width, static_cast<int>(r.name.size()));
    std::printf("\n%-*s %7s %10s %8s %11s %11s %11s %10s %9s %9s\n", width, "configuration", "steps", "val loss", "val ppl", "activ. MiB",
                "optim. MiB", "weights MiB", "peak RSS", "ms/step", "tok/s");
    for (const auto& r : runs) {
        if (r.steps == 0) {
            std::printf("%-*s %s\n", width, r.name.c_str(), r.error.empty() ? "no step taken" : ("failed: " + r.error).c_str());
            continue;
        }
        std::printf("%-*s %7d %10.4f %8.2f %11.3f %11.3f %11.3f %8.1f M %9.1f %9.0f%s\n", width, r.name.c_str(), r.steps, final_valid(r),
                    std::exp(final_valid(r)), mib(r.activation_bytes), mib(r.optimizer_bytes), mib(r.weights_bytes), mib(r.peak_rss_bytes),
                    r.mean_step_ms, r.tokens_per_second, !r.error.empty() ? "  (failed)" : r.interrupted ? "  (interrupted)" : "");
    }
    std::printf("(validation: cross-entropy in nats per byte on %s; %ld tokens per step; activations:\n"
                " bytes one forward pass keeps for backward, counted by the model; optimizer: AdamW moments or low-rank bases + moments,\n"
                " at the end)\n",
                validation.c_str(), tokens_per_step);
    print_activation_kinds(runs, "\nActivations kept for backward by kind (MiB)", 1048576.0);
}

inline std::string json_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '"' || c == '\\') out += '\\';
        if (static_cast<unsigned char>(c) < 0x20) continue;
        out += c;
    }
    return out;
}

// Where an output file is written before it is renamed onto `path`: next to it (rename() is
// atomic only within one file system) and named by the writing process, so that two runs writing
// the same path do not share one.
inline std::string temporary_path(const std::string& path) { return path + ".tmp-" + std::to_string(getpid()); }

// Writes `path` through `write(out)` into temporary_path(path) and renames that onto `path` once it
// is complete: `path` holds either its old content or the new one, never an empty or partial file
// (a run killed while writing leaves at most the temporary file). `what` names the flag in errors.
template <class F>
void write_replacing(const std::string& path, const char* what, F&& write) {
    const std::string temp = temporary_path(path);
    {
        std::ofstream out(temp, std::ios::binary);
        if (!out) throw std::runtime_error(std::string("cannot write ") + what + " file '" + temp + "': " + std::strerror(errno));
        write(out);
        out.close();
        if (!out) {
            std::remove(temp.c_str());
            throw std::runtime_error(std::string("error while writing ") + what + " file '" + temp + "'");
        }
    }
    if (std::rename(temp.c_str(), path.c_str()) != 0) {
        const int e = errno;
        std::remove(temp.c_str());
        throw std::runtime_error(std::string("cannot replace ") + what + " file '" + path + "': " + std::strerror(e));
    }
}

// A number for JSON: null where it is not finite (JSON has no NaN or infinity).
inline std::ostream& json_number(std::ostream& out, double x) {
    if (std::isfinite(x)) out << x;
    else out << "null";
    return out;
}

// `settings`: a JSON object (the run's flags, model and build), written first; empty: none.
inline void write_json(std::ostream& out, const std::vector<run>& runs, const std::string& settings) {
    out.precision(10);
    auto number = [&](double x) -> std::ostream& { return json_number(out, x); };
    auto list = [&](const auto& v) {
        out << '[';
        for (std::size_t i = 0; i < v.size(); ++i) {
            out << (i ? "," : "");
            number(static_cast<double>(v[i]));
        }
        out << ']';
    };
    out << '{';
    if (!settings.empty()) out << "\"settings\":" << settings << ',';
    out << "\"runs\":[";
    for (std::size_t k = 0; k < runs.size(); ++k) {
        const run& r = runs[k];
        out << (k ? "," : "") << "{\"name\":\"" << json_escape(r.name) << "\",\"error\":\"" << json_escape(r.error) << "\",\"steps\":" << r.steps
            << ",\"interrupted\":" << (r.interrupted ? "true" : "false") << ",\"valid_loss\":";
        number(final_valid(r)) << ",\"valid_perplexity\":";
        number(std::exp(final_valid(r))) << ",\"activation_bytes\":" << r.activation_bytes << ",\"activation_bytes_by_kind\":{";
        for (std::size_t k = 0; k < lm::memory::kinds; ++k) out << (k ? "," : "") << '"' << lm::memory::kind_keys[k] << "\":" << r.activation_kinds[k];
        out << "},\"weights_bytes\":" << r.weights_bytes << ",\"trainable_params\":" << r.trainable_params << ",\"valid_loss_before\":";
        number(r.valid_before) << ",\"optimizer_bytes\":" << r.optimizer_bytes
            << ",\"peak_optimizer_bytes\":" << r.peak_optimizer_bytes
            << ",\"mean_optimizer_bytes\":" << r.mean_optimizer_bytes << ",\"optimizer_workspace_bytes\":" << r.optimizer_workspace_bytes << ",\"peak_rss_bytes\":" << r.peak_rss_bytes << ",\"mean_step_ms\":" << r.mean_step_ms
            << ",\"tokens_per_second\":" << r.tokens_per_second << ",\"communicated_bytes\":" << r.communicated_bytes << ",\"valid_curve\":{\"steps\":";
        list(r.valid_steps);
        out << ",\"loss\":";
        list(r.valid_loss);
        out << ",\"gradient_energy\":";
        list(r.gradient_energy);
        out << "},\"train_loss\":";
        list(r.train_loss);
        out << ",\"ranks\":{\"parameters\":[";
        for (std::size_t i = 0; i < r.rank_names.size(); ++i) out << (i ? "," : "") << '"' << json_escape(r.rank_names[i]) << '"';
        out << "],\"steps\":";
        list(r.rank_steps);
        out << ",\"values\":[";
        for (std::size_t i = 0; i < r.ranks.size(); ++i) {
            out << (i ? "," : "");
            list(r.ranks[i]);
        }
        out << "]}}";
    }
    out << "]}\n";
}

// The plot: the validation loss of every configuration, then the ranks of the low-rank
// configurations as small multiples, one row per configuration and one column per kind of
// matrix (q, k, v, o, gate, up, down), one line per layer in that kind's colour, lighter for the
// first layer and darker for the last. A rank holds from the step after which it was recorded to
// the next record (the trainer records after every change), so its line is drawn step-wise:
// horizontal while it holds, vertical where a refresh changed it. GaLore's fixed rank gets its
// own row (it used to be hidden under AdaRankGrad's lines at the cap), and the y range leaves
// room above the cap so that lines there stay clear of the frame. Structure for the tests
// (tests/demo_plot.cmake): <g class="rank-panel" data-config=NAME> per row, <g class="rank-cell"
// data-kind=KIND> per cell, <polyline class="rank"> per line.
namespace svg_detail {

// "layer3.wq" -> {3, "wq"}; a name without a layer prefix is layer 0.
inline std::pair<int, std::string> split_parameter(const std::string& name) {
    const auto dot = name.rfind('.');
    if (dot == std::string::npos) return {0, name};
    const std::string prefix = name.substr(0, dot);
    const auto digits = prefix.find_first_of("0123456789");
    const int layer = digits == std::string::npos ? 0 : std::atoi(prefix.c_str() + digits);
    return {layer, name.substr(dot + 1)};
}

inline std::string kind_label(const std::string& kind) {
    if (kind == "wq") return "q (wq)";
    if (kind == "wk") return "k (wk)";
    if (kind == "wv") return "v (wv)";
    if (kind == "wo") return "o (wo)";
    if (kind == "w1") return "gate (w1)";
    if (kind == "w3") return "up (w3)";
    if (kind == "w2") return "down (w2)";
    return kind;
}

// A colour of hue `hue` whose lightness goes from 72% (layer 0) to 28% (the last layer).
inline std::string shade(int hue, int layer, int layers) {
    const double t = layers > 1 ? static_cast<double>(layer) / (layers - 1) : 0.6;
    char text[48];
    std::snprintf(text, sizeof text, "hsl(%d,70%%,%d%%)", hue, static_cast<int>(std::lround(72 - 44 * t)));
    return text;
}

// Tick values for [0, top]: 0, a round middle and top.
inline std::vector<double> rank_ticks(double top) {
    if (top <= 2) return {0, top};
    return {0, std::round(top / 2), top};
}

} // namespace svg_detail

inline void write_svg(std::ostream& out, const std::vector<run>& runs) {
    using namespace svg_detail;
    const double w = 900, loss_h = 360, left = 60, right = 180, top = 30, bottom = 40;
    // A configuration keeps its colour whichever others run with it (the trainer's five in their
    // usual order; any other name by its position).
    const char* colours[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"};
    const char* named[] = {"adamw", "galore", "velora", "adarank", "velora+adarank"};
    auto colour = [&](std::size_t k) {
        for (std::size_t i = 0; i < 5; ++i)
            if (runs[k].name == named[i]) return colours[i];
        return colours[k % 6];
    };
    const int hues[] = {210, 30, 120, 0, 275, 180, 320, 60};
    int max_step = 1;
    double lo = 1e300, hi = -1e300, max_rank = 1;
    std::vector<const run*> low_rank;
    std::vector<std::string> kinds;   // columns, in the order of the first low-rank run's parameters
    int layers = 1;
    for (const auto& r : runs) {
        for (int s : r.valid_steps) max_step = std::max(max_step, s);
        for (int s : r.rank_steps) max_step = std::max(max_step, s);
        for (double l : r.valid_loss) lo = std::min(lo, l), hi = std::max(hi, l);
        for (const auto& ranks : r.ranks)
            for (double x : ranks) max_rank = std::max(max_rank, x);
        if (r.ranks.empty() || r.rank_names.empty()) continue;
        low_rank.push_back(&r);
        for (const auto& name : r.rank_names) {
            const auto [layer, kind] = split_parameter(name);
            layers = std::max(layers, layer + 1);
            if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end()) kinds.push_back(kind);
        }
    }
    if (!(lo <= hi)) lo = 0, hi = 1;   // nothing to draw
    if (lo == hi) lo -= 0.5, hi += 0.5;

    // Rank grid geometry.
    const double grid_left = 130, grid_right = 20, gap = 16, cell_h = 90, row_gap = 22, grid_title = 44, grid_bottom = 64;
    const std::size_t columns = std::max<std::size_t>(kinds.size(), 1);
    const double cell_w = (w - grid_left - grid_right - gap * static_cast<double>(columns - 1)) / static_cast<double>(columns);
    const double grid_top = loss_h + grid_title;
    const double grid_h = low_rank.empty() ? 0 : grid_title + static_cast<double>(low_rank.size()) * (cell_h + row_gap) + grid_bottom;
    const double total_h = loss_h + grid_h;

    out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w << "\" height=\"" << total_h << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
        << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";

    // Validation loss.
    {
        const double pw = w - left - right, ph = loss_h - top - bottom;
        out << "<text x=\"" << left << "\" y=\"18\" font-size=\"14\">Validation loss (nats/byte)</text>\n";
        out << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph << "\" fill=\"none\" stroke=\"#888\"/>\n";
        for (int i = 0; i <= 4; ++i) {
            const double v = lo + (hi - lo) * i / 4, y = top + ph * (1 - double(i) / 4);
            out << "<text x=\"" << left - 6 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">" << std::round(v * 100) / 100 << "</text>\n";
            const double x = left + pw * i / 4;
            out << "<text x=\"" << x << "\" y=\"" << loss_h - bottom + 16 << "\" text-anchor=\"middle\">" << std::lround(double(max_step) * i / 4)
                << "</text>\n";
        }
        out << "<text x=\"" << left + pw / 2 << "\" y=\"" << loss_h - 4 << "\" text-anchor=\"middle\">step</text>\n";
        out << "<text x=\"14\" y=\"" << top + ph / 2 << "\" transform=\"rotate(-90 14 " << top + ph / 2 << ")\" text-anchor=\"middle\">loss</text>\n";
        for (std::size_t k = 0; k < runs.size(); ++k) {
            const auto& r = runs[k];
            out << "<polyline class=\"loss\" fill=\"none\" stroke-width=\"2\" stroke=\"" << colour(k) << "\" points=\"";
            for (std::size_t i = 0; i < r.valid_steps.size() && i < r.valid_loss.size(); ++i)
                out << left + pw * r.valid_steps[i] / max_step << ',' << top + ph * (1 - (r.valid_loss[i] - lo) / (hi - lo)) << ' ';
            out << "\"/>\n<text x=\"" << w - right + 10 << "\" y=\"" << top + 20 + 18 * double(k) << "\" fill=\"" << colour(k) << "\">" << r.name
                << "</text>\n";
        }
    }

    // Ranks: small multiples.
    if (!low_rank.empty()) {
        const double ymax = max_rank * 1.08;   // room above the cap
        out << "<text x=\"" << left << "\" y=\"" << loss_h + 18 << "\" font-size=\"14\">Rank of each matrix of the low-rank configurations "
            << "(one line per layer; a rank holds until a refresh changes it)</text>\n";
        for (std::size_t c = 0; c < kinds.size(); ++c)
            out << "<text x=\"" << grid_left + (cell_w + gap) * static_cast<double>(c) + cell_w / 2 << "\" y=\"" << grid_top - 8
                << "\" text-anchor=\"middle\" fill=\"" << shade(hues[c % 8], layers - 1, layers) << "\">" << kind_label(kinds[c]) << "</text>\n";
        for (std::size_t row = 0; row < low_rank.size(); ++row) {
            const run& r = *low_rank[row];
            const double y0 = grid_top + static_cast<double>(row) * (cell_h + row_gap);
            out << "<g class=\"rank-panel\" data-config=\"" << json_escape(r.name) << "\">\n";
            out << "<text x=\"" << grid_left - 26 << "\" y=\"" << y0 + cell_h / 2 + 4 << "\" text-anchor=\"end\">" << r.name << "</text>\n";
            for (std::size_t c = 0; c < kinds.size(); ++c) {
                const double x0 = grid_left + (cell_w + gap) * static_cast<double>(c);
                auto px = [&](double step) { return x0 + cell_w * step / max_step; };
                auto py = [&](double rank) { return y0 + cell_h * (1 - rank / ymax); };
                out << "<g class=\"rank-cell\" data-kind=\"" << kinds[c] << "\">\n";
                out << "<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << cell_w << "\" height=\"" << cell_h << "\" fill=\"none\" stroke=\"#888\"/>\n";
                for (double t : rank_ticks(max_rank)) {   // gridlines; their labels left of the first column only
                    out << "<line x1=\"" << x0 << "\" x2=\"" << x0 + cell_w << "\" y1=\"" << py(t) << "\" y2=\"" << py(t)
                        << "\" stroke=\"#ddd\" stroke-width=\"1\"/>\n";
                    if (c == 0)
                        out << "<text x=\"" << x0 - 4 << "\" y=\"" << py(t) + 4 << "\" text-anchor=\"end\" font-size=\"10\">" << t << "</text>\n";
                }
                if (row + 1 == low_rank.size())   // step ticks under the last row, the end ones inside the cell's width
                    for (int i = 0; i <= 2; ++i)
                        out << "<text x=\"" << x0 + cell_w * i / 2 << "\" y=\"" << y0 + cell_h + 14 << "\" text-anchor=\""
                            << (i == 0 ? "start" : i == 2 ? "end" : "middle") << "\" font-size=\"10\">" << std::lround(double(max_step) * i / 2)
                            << "</text>\n";
                // Lines from the first layer to the last, so that the darker ones are on top.
                for (int layer = 0; layer < layers; ++layer)
                    for (std::size_t p = 0; p < r.rank_names.size(); ++p) {
                        const auto [l, kind] = split_parameter(r.rank_names[p]);
                        if (l != layer || kind != kinds[c]) continue;
                        out << "<polyline class=\"rank\" fill=\"none\" stroke-width=\"1.5\" stroke=\"" << shade(hues[c % 8], layer, layers)
                            << "\" points=\"";
                        double previous = -1;
                        for (std::size_t i = 0; i < r.rank_steps.size() && i < r.ranks.size(); ++i) {
                            if (p >= r.ranks[i].size()) continue;
                            const double rank = r.ranks[i][p], x = px(r.rank_steps[i]);
                            if (previous >= 0 && rank != previous) out << x << ',' << py(previous) << ' ';   // held until here
                            if (previous < 0 || rank != previous || i + 1 == r.rank_steps.size()) out << x << ',' << py(rank) << ' ';
                            previous = rank;
                        }
                        out << "\"><title>" << r.rank_names[p] << "</title></polyline>\n";
                    }
                out << "</g>\n";
            }
            out << "</g>\n";
        }
        const double below = grid_top + static_cast<double>(low_rank.size()) * (cell_h + row_gap) + 14;
        out << "<text x=\"" << grid_left + (w - grid_left - grid_right) / 2 << "\" y=\"" << below << "\" text-anchor=\"middle\">step</text>\n";
        // Shade legend: layer 0 .. last, in the first kind's hue.
        const double lx = grid_left, ly = below + 18;
        out << "<text x=\"" << lx << "\" y=\"" << ly + 9 << "\" font-size=\"11\">layer</text>\n";
        const int shown = std::min(layers, 12);
        for (int i = 0; i < shown; ++i) {
            const int layer = shown > 1 ? static_cast<int>(std::lround(double(i) * (layers - 1) / (shown - 1))) : 0;
            const double x = lx + 40 + 30 * i;
            out << "<line x1=\"" << x << "\" x2=\"" << x + 22 << "\" y1=\"" << ly + 5 << "\" y2=\"" << ly + 5 << "\" stroke-width=\"3\" stroke=\""
                << shade(hues[0], layer, layers) << "\"/>\n";
            out << "<text x=\"" << x + 11 << "\" y=\"" << ly + 20 << "\" text-anchor=\"middle\" font-size=\"10\">" << layer << "</text>\n";
        }
        out << "<text x=\"" << lx + 40 + 30 * shown + 10 << "\" y=\"" << ly + 9 << "\" font-size=\"11\">(lighter: first layer; darker: last; "
            << "every kind in its own colour)</text>\n";
    }
    out << "</svg>\n";
}

// The --json and --plot files, each replaced only by a complete one.
inline void write_json(const std::string& path, const std::vector<run>& runs, const std::string& settings = "") {
    write_replacing(path, "--json", [&](std::ostream& out) { write_json(out, runs, settings); });
}

inline void write_svg(const std::string& path, const std::vector<run>& runs) {
    write_replacing(path, "--plot", [&](std::ostream& out) { write_svg(out, runs); });
}

} // namespace report
