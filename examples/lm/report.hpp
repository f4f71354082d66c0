#pragma once
// What the demo trainer reports: per-configuration results, the progress bar, the final table,
// JSON and an SVG plot (validation-loss curves and AdaRankGrad's per-layer ranks over time).
// The files are written whole or not at all (write_replacing): a run that dies keeps what was there.
#include <algorithm>
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
#include <vector>

#include <unistd.h>

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
    std::vector<int> rank_steps;
    std::vector<std::vector<double>> ranks;   // [eval point][low-rank parameter]
    std::size_t activation_bytes = 0;         // kept for backward by one step's forward pass (counted by the model)
    std::size_t optimizer_bytes = 0;          // optimizer state (low_rank_adamw::state_bytes)
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
    os << "bytes " << r.activation_bytes << ' ' << r.optimizer_bytes << ' ' << r.peak_rss_bytes << ' ' << r.communicated_bytes << '\n';
    os << "speed " << r.mean_step_ms << ' ' << r.tokens_per_second << '\n';
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
        else if (key == "bytes") ls >> r.activation_bytes >> r.optimizer_bytes >> r.peak_rss_bytes >> r.communicated_bytes;
        else if (key == "speed") ls >> r.mean_step_ms >> r.tokens_per_second;
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

inline void print_table(const std::vector<run>& runs, long tokens_per_step) {
    std::printf("\n%-16s %7s %10s %8s %11s %11s %10s %9s %9s\n", "configuration", "steps", "val loss", "val ppl", "activ. MiB",
                "optim. MiB", "peak RSS", "ms/step", "tok/s");
    for (const auto& r : runs) {
        if (r.steps == 0) {
            std::printf("%-16s %s\n", r.name.c_str(), r.error.empty() ? "no step taken" : ("failed: " + r.error).c_str());
            continue;
        }
        std::printf("%-16s %7d %10.4f %8.2f %11.3f %11.3f %8.1f M %9.1f %9.0f%s\n", r.name.c_str(), r.steps, final_valid(r),
                    std::exp(final_valid(r)), mib(r.activation_bytes), mib(r.optimizer_bytes), mib(r.peak_rss_bytes), r.mean_step_ms,
                    r.tokens_per_second, !r.error.empty() ? "  (failed)" : r.interrupted ? "  (interrupted)" : "");
    }
    std::printf("(validation: cross-entropy in nats per byte on 8 fixed batches of the held-out 10%%; %ld tokens per step; activations:\n"
                " bytes one forward pass keeps for backward, counted by the model; optimizer: AdamW moments or low-rank bases + moments)\n",
                tokens_per_step);
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

// `settings`: a JSON object (the run's flags, model and build), written first; empty: none.
inline void write_json(std::ostream& out, const std::vector<run>& runs, const std::string& settings) {
    out.precision(10);
    auto number = [&](double x) -> std::ostream& {
        if (std::isfinite(x)) out << x;
        else out << "null";
        return out;
    };
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
        number(std::exp(final_valid(r))) << ",\"activation_bytes\":" << r.activation_bytes
            << ",\"optimizer_bytes\":" << r.optimizer_bytes << ",\"peak_rss_bytes\":" << r.peak_rss_bytes << ",\"mean_step_ms\":" << r.mean_step_ms
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

// Two panels: validation loss per configuration, and the per-parameter ranks of every low-rank
// configuration (one thin line per parameter, coloured by configuration).
inline void write_svg(std::ostream& out, const std::vector<run>& runs) {
    const double w = 900, h = 360, left = 60, right = 180, top = 30, bottom = 40;
    const char* colours[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"};
    int max_step = 1;
    double lo = 1e300, hi = -1e300, max_rank = 1;
    for (const auto& r : runs) {
        for (int s : r.valid_steps) max_step = std::max(max_step, s);
        for (double l : r.valid_loss) lo = std::min(lo, l), hi = std::max(hi, l);
        for (const auto& ranks : r.ranks)
            for (double x : ranks) max_rank = std::max(max_rank, x);
    }
    if (!(lo <= hi)) lo = 0, hi = 1;   // nothing to draw
    if (lo == hi) lo -= 0.5, hi += 0.5;
    out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w << "\" height=\"" << 2 * h << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
        << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    auto panel = [&](double y0, const std::string& title, const std::string& ylabel, double ymin, double ymax, auto&& draw) {
        const double pw = w - left - right, ph = h - top - bottom;
        out << "<text x=\"" << left << "\" y=\"" << y0 + 18 << "\" font-size=\"14\">" << title << "</text>\n";
        out << "<rect x=\"" << left << "\" y=\"" << y0 + top << "\" width=\"" << pw << "\" height=\"" << ph << "\" fill=\"none\" stroke=\"#888\"/>\n";
        for (int i = 0; i <= 4; ++i) {
            const double v = ymin + (ymax - ymin) * i / 4, y = y0 + top + ph * (1 - double(i) / 4);
            out << "<text x=\"" << left - 6 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">" << std::round(v * 100) / 100 << "</text>\n";
            const double x = left + pw * i / 4;
            out << "<text x=\"" << x << "\" y=\"" << y0 + h - bottom + 16 << "\" text-anchor=\"middle\">" << std::lround(double(max_step) * i / 4)
                << "</text>\n";
        }
        out << "<text x=\"" << left + pw / 2 << "\" y=\"" << y0 + h - 4 << "\" text-anchor=\"middle\">step</text>\n";
        out << "<text x=\"14\" y=\"" << y0 + top + ph / 2 << "\" transform=\"rotate(-90 14 " << y0 + top + ph / 2 << ")\" text-anchor=\"middle\">" << ylabel
            << "</text>\n";
        auto px = [&](double step) { return left + pw * step / max_step; };
        auto py = [&](double v) { return y0 + top + ph * (1 - (v - ymin) / (ymax - ymin)); };
        draw(px, py);
    };
    panel(0, "Validation loss (nats/byte)", "loss", lo, hi, [&](auto px, auto py) {
        for (std::size_t k = 0; k < runs.size(); ++k) {
            const auto& r = runs[k];
            out << "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"" << colours[k % 6] << "\" points=\"";
            for (std::size_t i = 0; i < r.valid_steps.size(); ++i) out << px(r.valid_steps[i]) << ',' << py(r.valid_loss[i]) << ' ';
            out << "\"/>\n<text x=\"" << w - right + 10 << "\" y=\"" << top + 20 + 18 * double(k) << "\" fill=\"" << colours[k % 6] << "\">" << r.name
                << "</text>\n";
        }
    });
    panel(h, "Per-parameter rank of the low-rank configurations", "rank", 0, max_rank, [&](auto px, auto py) {
        for (std::size_t k = 0; k < runs.size(); ++k) {
            const auto& r = runs[k];
            if (r.ranks.empty()) continue;
            for (std::size_t p = 0; p < r.rank_names.size(); ++p) {
                out << "<polyline fill=\"none\" stroke-width=\"1\" opacity=\"0.7\" stroke=\"" << colours[k % 6] << "\" points=\"";
                for (std::size_t i = 0; i < r.rank_steps.size() && i < r.ranks.size(); ++i)
                    if (p < r.ranks[i].size()) out << px(r.rank_steps[i]) << ',' << py(r.ranks[i][p]) << ' ';
                out << "\"/>\n";
                if (!r.ranks.empty() && p < r.ranks.back().size())   // the parameter's name at the end of its line
                    out << "<text x=\"" << px(r.rank_steps.back()) + 3 << "\" y=\"" << py(r.ranks.back()[p]) + 3 << "\" font-size=\"8\" fill=\""
                        << colours[k % 6] << "\">" << r.rank_names[p] << "</text>\n";
            }
            out << "<text x=\"" << w - right + 10 << "\" y=\"" << h + top + 20 + 18 * double(k) << "\" fill=\"" << colours[k % 6] << "\">" << r.name
                << "</text>\n";
        }
    });
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
