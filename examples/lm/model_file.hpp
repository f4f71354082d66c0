#pragma once
// Model files: `lm_train --save-model PATH` writes the trained base weights, `--init PATH`
// starts from them (fine-tuning). The container is the library's versioned, checksummed state
// blob (velora::state_writer / state_reader, core/serialize.hpp), kind "lm_train.model":
//
//   version 1:  u8 value bytes (4: float32) | i64 vocab, d_model, heads, layers, ffn, context |
//               u64 corpus fingerprint (FNV-1a of the training and validation text) |
//               u64 corpus bytes | byte array: how the model was made (one line of text) |
//               u64 parameter count | per parameter: byte array name, i64 rows, i64 cols,
//               f32 array of rows·cols values (row-major)
//
// Reading checks, before anything is used: the envelope (magic, container and kind version,
// length, checksum: a truncated or corrupt file is refused), the value width, every
// parameter's name and shape against the model the file says it holds, every value finite, and
// nothing left over. check_model_shape then compares that model with the one the flags ask for
// and names both when they differ. The file is written through PATH.tmp-<pid> renamed onto PATH
// (report::write_replacing): PATH holds the old file or the complete new one, never a part.
// With LoRA the weights written are the merged ones, W + (α/r)·B·A (transformer::export_weights).
#include <velora/core/hash.hpp>
#include <velora/core/serialize.hpp>

#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "memory.hpp"
#include "model.hpp"
#include "report.hpp"

namespace lm::trainer {

inline constexpr std::string_view model_file_kind = "lm_train.model";
inline constexpr std::uint32_t model_file_version = 1;

// What a model file holds.
struct model_file {
    std::string path;
    lm::model_config model;
    std::uint64_t corpus_fingerprint = 0, corpus_bytes = 0;
    std::string made_by;   // how it was made: configuration, steps, seed, corpus, loss
    lm::initial_weights weights;
};

// The fingerprint of a corpus: FNV-1a of its training then validation bytes.
inline std::uint64_t corpus_fingerprint(const std::vector<unsigned char>& train, const std::vector<unsigned char>& valid) {
    const std::uint64_t h = velora::fnv1a64(std::as_bytes(std::span(train)));
    return velora::fnv1a64(std::as_bytes(std::span(valid)), h);
}

// "d_model 128, 2 layers, 4 heads, ffn 344, context 64, vocabulary 256".
inline std::string describe_shape(const lm::model_config& m) {
    return "d_model " + std::to_string(m.d_model) + ", " + std::to_string(m.layers) + " layers, " + std::to_string(m.heads) + " heads, ffn " +
           std::to_string(m.ffn) + ", context " + std::to_string(m.context) + ", vocabulary " + std::to_string(m.vocab);
}

// The parameter shapes of a model, in parameters() order (memory.hpp's list, as the model builds it).
inline std::vector<std::pair<std::string, lm::memory::parameter_shape>> base_shapes(const lm::model_config& c) {
    std::vector<std::pair<std::string, lm::memory::parameter_shape>> out;
    for (const auto& p : lm::memory::embedding_parameters(c)) out.emplace_back(p.name, p);
    for (index_t l = 0; l < c.layers; ++l)
        for (const auto& p : lm::memory::layer_parameters(c)) out.emplace_back("layer" + std::to_string(l) + "." + p.name, p);
    out.emplace_back(lm::memory::final_norm_parameter(c).name, lm::memory::final_norm_parameter(c));
    return out;
}

// The blob of a model file.
inline std::vector<std::byte> model_file_blob(const lm::model_config& c, const lm::initial_weights& w, std::uint64_t fingerprint,
                                              std::uint64_t corpus_bytes, const std::string& made_by) {
    const auto shapes = base_shapes(c);
    if (w.values.size() != shapes.size())
        throw std::logic_error("model file: " + std::to_string(w.values.size()) + " parameters to write, the model has " + std::to_string(shapes.size()));
    velora::state_writer out(model_file_kind, model_file_version);
    out.put(static_cast<std::uint8_t>(sizeof(float)));
    for (index_t v : {c.vocab, c.d_model, c.heads, c.layers, c.ffn, c.context}) out.put(static_cast<std::int64_t>(v));
    out.put(fingerprint);
    out.put(corpus_bytes);
    out.put_array(std::span<const char>(made_by.data(), made_by.size()));
    out.put(static_cast<std::uint64_t>(shapes.size()));
    for (std::size_t i = 0; i < shapes.size(); ++i) {
        const auto& [name, shape] = shapes[i];
        out.put_array(std::span<const char>(name.data(), name.size()));
        out.put(static_cast<std::int64_t>(shape.rows));
        out.put(static_cast<std::int64_t>(shape.cols));
        out.put_array(std::span<const float>(w.values[i]));
    }
    return std::move(out).finish();
}

// Writes a model file: into PATH.tmp-<pid>, renamed onto PATH once complete.
inline void write_model_file(const std::string& path, const lm::model_config& c, const lm::initial_weights& w, std::uint64_t fingerprint,
                             std::uint64_t corpus_bytes, const std::string& made_by) {
    const std::vector<std::byte> blob = model_file_blob(c, w, fingerprint, corpus_bytes, made_by);
    report::write_replacing(path, "--save-model", [&](std::ostream& out) { out.write(reinterpret_cast<const char*>(blob.data()), static_cast<std::streamsize>(blob.size())); });
}

// Reads and checks a model file (see the file comment). Throws std::runtime_error starting
// "model file 'PATH'" and saying what is wrong.
inline model_file read_model_file(const std::string& path) {
    const std::string what = "model file '" + path + "'";
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw std::runtime_error(what + " cannot be opened: " + std::strerror(errno));
    const std::streamoff size = in.tellg();
    if (size < 0) throw std::runtime_error(what + " cannot be read");
    std::vector<std::byte> blob(static_cast<std::size_t>(size));
    in.seekg(0);
    in.read(reinterpret_cast<char*>(blob.data()), size);
    if (!in) throw std::runtime_error(what + " cannot be read");
    model_file f;
    f.path = path;
    try {
        velora::state_reader r(blob, model_file_kind, model_file_version, what);
        const auto width = r.get<std::uint8_t>();
        if (width != sizeof(float)) r.bad("values of ", int(width), " bytes (this trainer writes 4-byte floats)");
        index_t* fields[] = {&f.model.vocab, &f.model.d_model, &f.model.heads, &f.model.layers, &f.model.ffn, &f.model.context};
        for (index_t* field : fields) {
            const auto v = r.get<std::int64_t>();
            if (v < 1 || v > 1000000000) r.bad("a model size of ", v, " (every size is 1..1000000000)");
            *field = static_cast<index_t>(v);
        }
        if (f.model.d_model % f.model.heads != 0) r.bad("d_model ", f.model.d_model, " not divisible by heads ", f.model.heads);
        f.corpus_fingerprint = r.get<std::uint64_t>();
        f.corpus_bytes = r.get<std::uint64_t>();
        const std::vector<char> made_by = r.get_array<char>();
        f.made_by.assign(made_by.begin(), made_by.end());
        const auto shapes = base_shapes(f.model);
        const auto count = r.get<std::uint64_t>();
        if (count != shapes.size()) r.bad("holds ", count, " parameters, a model of ", describe_shape(f.model), " has ", shapes.size());
        f.weights.values.resize(shapes.size());
        for (std::size_t i = 0; i < shapes.size(); ++i) {
            const auto& [name, shape] = shapes[i];
            const std::vector<char> stored = r.get_array<char>();
            const std::string got(stored.begin(), stored.end());
            const auto rows = r.get<std::int64_t>(), cols = r.get<std::int64_t>();
            if (got != name || rows != shape.rows || cols != shape.cols)
                r.bad("parameter ", i, " is '", got, "' ", rows, "x", cols, ", expected '", name, "' ", shape.rows, "x", shape.cols);
            f.weights.values[i] = r.get_array<float>(static_cast<std::ptrdiff_t>(rows * cols));
            for (std::size_t k = 0; k < f.weights.values[i].size(); ++k)
                if (!std::isfinite(f.weights.values[i][k])) r.bad("parameter '", name, "' holds a value that is not finite at ", k);
        }
        r.expect_end();
    } catch (const velora::state_format_error& e) {
        throw std::runtime_error(e.what());   // "model file 'PATH': what is wrong"
    }
    return f;
}

// The model the flags ask for must be the file's: both named when they differ.
inline void check_model_shape(const model_file& f, const lm::model_config& wanted) {
    const lm::model_config& m = f.model;
    if (m.vocab == wanted.vocab && m.d_model == wanted.d_model && m.heads == wanted.heads && m.layers == wanted.layers && m.ffn == wanted.ffn &&
        m.context == wanted.context)
        return;
    throw std::runtime_error("model file '" + f.path + "' holds a model of " + describe_shape(m) + ", but the flags ask for " + describe_shape(wanted) +
                             " (give the size flags of the run that saved it)");
}

} // namespace lm::trainer
