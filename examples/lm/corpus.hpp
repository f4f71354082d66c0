#pragma once
// The text the trainer learns from: the corpus folder read as bytes, its training, validation and
// tuning splits, and the batches drawn from a split (the same for every configuration of a run,
// so that they differ in their optimizer and activations only).
#include <velora/velora.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "options.hpp"

namespace lm::trainer {

// The corpus: every plain fortune file of the directory (not the .dat indexes or the .u8 links),
// in name order, as bytes. The last 10% is the validation split. `--split tune` trains on the
// first 90% of the rest and validates on its last 10% (tuning_split): learning rates are chosen
// there, never on the validation split that results are reported on.
struct corpus {
    std::vector<unsigned char> train, valid;
    std::size_t files = 0;
    std::string split = "valid";
};

inline corpus tuning_split(const corpus& c) {
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
inline constexpr std::uint64_t validation_seed = 8;

inline corpus load_corpus(const std::string& dir) {
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
inline void make_batch(const std::vector<unsigned char>& data, index_t batch, index_t context, std::uint64_t seed, std::uint64_t index,
                       std::vector<int>& out) {
    out.resize(static_cast<std::size_t>(batch * (context + 1)));
    const std::uint64_t span = data.size() - static_cast<std::size_t>(context) - 1;
    for (index_t b = 0; b < batch; ++b) {
        const auto start = static_cast<std::size_t>(velora::mix64(seed ^ velora::mix64(index * 1315423911ull + static_cast<std::uint64_t>(b))) % span);
        for (index_t j = 0; j <= context; ++j) out[static_cast<std::size_t>(b * (context + 1) + j)] = data[start + static_cast<std::size_t>(j)];
    }
}

// The corpus, checked against the context length.
inline corpus load_checked_corpus(const options& o) {
    corpus data = load_corpus(o.corpus);
    const std::size_t shortest = o.split == "tune" || !o.study.empty() ? tuning_split(data).valid.size() : data.valid.size();
    if (shortest <= static_cast<std::size_t>(o.model.context) + 1)
        throw std::runtime_error("--context " + std::to_string(o.model.context) + " is too long for the " +
                                 (o.split == "tune" || !o.study.empty() ? "tuning" : "validation") + " split of " + std::to_string(shortest) + " bytes");
    return o.split == "tune" ? tuning_split(data) : data;
}

} // namespace lm::trainer
