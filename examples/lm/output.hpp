#pragma once
// What lm_train prints and writes about a run around report.hpp's results: the header above the
// table, the notes under it (data-parallel), the run's settings recorded in --json, and the check
// that --json and --plot can be written, made before anything is trained.
#include <velora/velora.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "cli.hpp"
#include "corpus.hpp"
#include "memory.hpp"
#include "options.hpp"
#include "report.hpp"

// The library's version (the CMake project version, set by examples/CMakeLists.txt; no header
// defines one), recorded in the --json settings.
#ifndef VELORA_VERSION_STRING
#define VELORA_VERSION_STRING "unknown"
#endif

namespace lm::trainer {

// Fails before training, not after it, when an output file could not be written, without
// touching what is at `path` now (an older result must survive a run that dies or fails): creates
// and removes the temporary file that report::write_replacing writes and renames onto `path`.
inline void check_output(const std::string& path) {
    if (path.empty()) return;
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) throw std::runtime_error("cannot write output file '" + path + "': it is a directory");
    const std::string temp = report::temporary_path(path);
    const int fd = open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) throw std::runtime_error("cannot write output file '" + path + "' (cannot create '" + temp + "': " + std::strerror(errno) + ")");
    close(fd);
    std::remove(temp.c_str());
}

// What the columns mean in a data-parallel run (printed under the table by rank 0).
inline void print_dp_notes(const std::vector<report::run>& runs, const options& o, int ranks, bool rss_reset) {
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
inline std::string settings_json(const options& o, const corpus* data, int ranks) {
    std::ostringstream os;
    os.precision(17);   // the learning rates as given
    auto text = [](const std::string& s) { return "\"" + report::json_escape(s) + "\""; };
    auto path = [&](const std::string& s) { return s.empty() ? std::string("null") : text(s); };
    std::vector<std::string> configs;
    for (const auto& c : o.configs) configs.push_back(text(c));
    const auto& m = o.model;
    os << "{\"flags\":{\"preset\":" << path(o.preset) << ",\"estimate\":" << (o.estimate ? "true" : "false") << ",\"vocab\":" << o.model.vocab
       << ",\"value-bytes\":" << o.value_bytes
       << ",\"corpus\":" << text(o.corpus) << ",\"steps\":" << o.steps << ",\"batch\":" << o.batch << ",\"context\":" << m.context
       << ",\"d-model\":" << m.d_model << ",\"layers\":" << m.layers << ",\"heads\":" << m.heads << ",\"ffn\":" << m.ffn << ",\"rank\":" << o.rank
       << ",\"groups\":" << o.groups << ",\"lr\":" << o.lr << ",\"lr-low-rank\":" << o.lr_low_rank << ",\"lr-lora\":" << o.lr_lora
       << ",\"init\":" << path(o.init) << ",\"save-model\":" << path(o.save_model) << ",\"eval-every\":" << o.eval_every
       << ",\"configs\":[" << join(configs, ",") << "],\"share-qkv\":" << (o.share_qkv ? "true" : "false") << ",\"seed\":" << o.seed
       << ",\"split\":" << text(o.split) << ",\"valid-batches\":" << o.valid_batches << ",\"study\":" << path(o.study) << ",\"seeds\":[";
    for (std::size_t i = 0; i < o.seeds.size(); ++i) os << (i ? "," : "") << o.seeds[i];
    os << "],\"json\":" << path(o.json) << ",\"plot\":" << path(o.plot) << ",\"grad-rank-every\":" << o.grad_rank_every
       << ",\"grad-rank-out\":" << path(o.grad_rank_out) << ",\"grad-rank-plot\":" << path(o.grad_rank_plot) << "}";
    os << ",\"model\":{\"vocab\":" << m.vocab << ",\"d_model\":" << m.d_model << ",\"heads\":" << m.heads << ",\"d_head\":" << m.d_model / m.heads
       << ",\"layers\":" << m.layers << ",\"ffn\":" << m.ffn << ",\"context\":" << m.context << ",\"parameters\":" << lm::memory::parameter_count(m).v << "}";
    if (data)
        os << ",\"corpus\":{\"files\":" << data->files << ",\"train_bytes\":" << data->train.size() << ",\"valid_bytes\":" << data->valid.size() << ",\"split\":" << text(data->split) << "}";
    os << ",\"velora_version\":" << text(VELORA_VERSION_STRING) << ",\"gemm\":{\"blas\":" << (velora::cpu::has_blas ? "true" : "false")
       << ",\"name\":" << text(velora::cpu::blas_name()) << "},\"threads\":" << velora::cpu::resolve_threads(0) << ",\"ranks\":" << ranks << "}";
    return os.str();
}

// What the validation loss is measured on, for the table.
inline std::string validation_note(const options& o) {
    return std::to_string(o.valid_batches) + " fixed batches of the " + (o.split == "tune" ? "tuning split" : "held-out 10%");
}

inline void print_header(const options& o, const corpus& data, int ranks) {
    std::printf("Byte-level LM on %zu fortune files from %s: %zu train / %zu validation bytes\n", data.files, o.corpus.c_str(), data.train.size(),
                data.valid.size());
    const bool lora = std::any_of(o.configs.begin(), o.configs.end(), [&](const std::string& name) { return config_of(name, o).lora; });
    char lora_lr[48] = "";
    if (lora) std::snprintf(lora_lr, sizeof lora_lr, ", %g (LoRA runs)", o.lr_lora);
    std::printf("model%s%s: d_model %ld, %ld layers, %ld heads, ffn %ld, context %ld (%llu parameters); batch %ld, %d steps; lr %g (full-rank "
                "runs), %g with scale 0.25 (low-rank runs)%s; rank <= %ld, VeLoRA G = %ld%s\n",
                o.preset.empty() ? "" : " ", o.preset.c_str(), static_cast<long>(o.model.d_model), static_cast<long>(o.model.layers),
                static_cast<long>(o.model.heads), static_cast<long>(o.model.ffn), static_cast<long>(o.model.context),
                static_cast<unsigned long long>(lm::memory::parameter_count(o.model).v), static_cast<long>(o.batch), o.steps, o.lr, o.lr_low_rank,
                lora_lr, static_cast<long>(o.rank), static_cast<long>(o.groups), o.share_qkv ? " (q, k, v share one record)" : "");
    if (ranks > 1)
        std::printf("data-parallel: %d MPI ranks, %ld sequences of each batch per rank\n", ranks, static_cast<long>(o.batch / ranks));
}

} // namespace lm::trainer
