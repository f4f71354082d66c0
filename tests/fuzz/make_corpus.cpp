// Writes the fuzzers' seed corpus: valid state blobs of the exact optimizer and compressor
// targets the harnesses load into (fuzz_common.hpp), saved after various numbers of steps
// (before the first step, across refreshes and rank changes, after a learning-rate change, after
// a degenerate all-zero batch), plus "fuzz.reader" programs for the state_reader harness.
//
//   make_corpus OUT_DIR    → OUT_DIR/optimizer/*.bin, OUT_DIR/compressor/*.bin, OUT_DIR/reader/*.bin, OUT_DIR/nf4/*.bin
#include "compressor_targets.hpp"
#include "nf4_targets.hpp"
#include "optimizer_targets.hpp"

#include <filesystem>
#include <iostream>

namespace {

constexpr const char* tool = "make_corpus";
namespace fs = std::filesystem;

int written = 0;

void write(const fs::path& dir, const std::string& name, const std::vector<std::byte>& blob) {
    velora::write_state_file((dir / (name + ".bin")).string(), blob);
    ++written;
}

void optimizer_seeds(const fs::path& out, const fs::path& reader) {
    fuzz::B backend(1);
    const auto specs = fuzz::optimizer_targets();
    for (std::size_t i = 0; i < specs.size(); ++i) {
        const auto& t = specs[i];
        auto o = fuzz::make_optimizer(backend, t);
        std::vector<std::vector<float>> w;
        for (std::size_t p = 0; p < t.params.size(); ++p) w.push_back(fuzz::initial_weight(i, p, t.params[p]));
        const std::string base = std::string("opt_") + t.name + "_";
        write(out, base + "0", o.save_state());
        write(reader, base + "0", o.save_state());
        for (std::uint64_t s = 0; s < 12; ++s) {
            if (s == 7) o.set_learning_rate(o.learning_rate() * 0.3);
            fuzz::step_all(tool, o, i, t, w, s);
            const auto steps = s + 1;
            if (steps == 1 || steps == 2 || steps == 3 || steps == 4 || steps == 6 || steps == 9 || steps == 12) {
                write(out, base + std::to_string(steps), o.save_state());
                if (steps == 4) write(reader, base + std::to_string(steps), o.save_state());
            }
        }
        // A step with an all-zero gradient (degenerate where a refresh is due, decay only otherwise).
        for (std::size_t p = 0; p < t.params.size(); ++p) {
            const auto& sh = t.params[p];
            std::vector<float> zero(static_cast<std::size_t>(sh.rows * sh.cols), 0.0f);
            (void)o.step(static_cast<fuzz::index_t>(p), velora::make_view(w[p].data(), sh.rows, sh.cols),
                         velora::make_view(zero.data(), sh.rows, sh.cols));
        }
        write(out, base + "12_zero", o.save_state());
        // Extreme but valid states the public API can produce: huge moments (a step with gradients
        // of magnitude 1e18: v ~ 1e36 is still finite in float), then an extreme and a zero learning rate.
        for (std::size_t p = 0; p < t.params.size(); ++p) {
            const auto& sh = t.params[p];
            auto g = fuzz::gradient(i, p, sh, 99);
            for (auto& e : g) e *= 1e18f;
            (void)o.step(static_cast<fuzz::index_t>(p), velora::make_view(w[p].data(), sh.rows, sh.cols),
                         velora::make_view(g.data(), sh.rows, sh.cols));
        }
        write(out, base + "13_huge_gradient", o.save_state());
        o.set_learning_rate(1e30);
        write(out, base + "13_lr_1e30", o.save_state());
        o.set_learning_rate(0.0);
        write(out, base + "13_lr_0", o.save_state());
    }
}

void compressor_seeds(const fs::path& out, const fs::path& reader) {
    fuzz::B backend(1);
    const auto specs = fuzz::compressor_targets();
    for (std::size_t i = 0; i < specs.size(); ++i) {
        const auto& t = specs[i];
        const std::string base = std::string("comp_") + t.name + "_";
        {
            fuzz::compressor fresh(backend, t.features, t.config);   // no v yet (except random mode)
            write(out, base + "fresh", fresh.save_state());
        }
        auto c = fuzz::make_compressor(backend, t);
        write(out, base + "0", c.save_state());
        for (std::uint64_t b = 0; b < 4; ++b) {
            fuzz::compress_batches(tool, c, i, t, b, 1);
            write(out, base + std::to_string(b + 1), c.save_state());
        }
        write(reader, base + "4", c.save_state());
        // An all-zero batch: the fallback v where the mode recomputes v from the batch mean.
        std::vector<float> zero(static_cast<std::size_t>(fuzz::compress_tokens * t.features), 0.0f);
        fuzz::compressor::record_type r;
        (void)c.compress(velora::make_view(zero.data(), fuzz::compress_tokens, t.features), r);
        write(out, base + "zero", c.save_state());
    }
}

// NF4 weights: every target's weight, plus each shape quantised the other way (plain <-> double).
void nf4_seeds(const fs::path& out) {
    const auto specs = fuzz::nf4_targets();
    for (std::size_t i = 0; i < specs.size(); ++i) {
        auto t = specs[i];
        write(out, std::string("nf4_") + t.name, fuzz::make_nf4(i, t).save_state());
        t.options.double_quant = !t.options.double_quant;
        write(out, std::string("nf4_") + t.name + "_other", fuzz::make_nf4(i, t).save_state());
    }
}

// "fuzz.reader" programs (opcodes as fuzz_state_reader.cpp's read_program reads them).
struct program {
    velora::state_writer w;
    explicit program(std::uint32_t version) : w("fuzz.reader", version) {}
    template <class T>
    void op(std::uint8_t code, const T& value) {
        w.put(code);
        w.put(value);
    }
};

void reader_programs(const fs::path& reader) {
    {
        program p(1);
        p.op<std::uint8_t>(0, 7);
        p.op<std::uint16_t>(1, 0x1234);
        p.op<std::uint32_t>(2, 0xdeadbeef);
        p.op<std::uint64_t>(3, 1ull << 40);
        p.op<std::int32_t>(4, -5);
        p.op<double>(5, 3.25);
        p.op<float>(6, -1.5f);
        const std::vector<float> f{1.0f, 2.0f, 3.0f};
        p.w.put(std::uint8_t{7});
        p.w.put_array(std::span<const float>(f));
        const std::vector<double> d{0.5, -0.25};
        p.w.put(std::uint8_t{8});
        p.w.put(std::uint8_t{2});
        p.w.put_array(std::span<const double>(d));
        const std::vector<std::byte> bytes(5, std::byte{0xab});
        p.w.put(std::uint8_t{9});
        p.w.put_array(std::span<const std::byte>(bytes));
        const std::vector<std::uint16_t> h{1, 2, 3, 4};
        p.w.put(std::uint8_t{10});
        p.w.put(std::int64_t{4});
        p.w.put_array(std::span<const std::uint16_t>(h));
        const std::vector<std::int64_t> l{-1, 1};
        p.w.put(std::uint8_t{12});
        p.w.put_array(std::span<const std::int64_t>(l));
        p.w.put(std::uint8_t{13});   // expect_end
        write(reader, "program_all_ops", std::move(p.w).finish());
    }
    // Nested blobs, three levels deep, versions 1..3.
    std::vector<std::byte> inner;
    for (std::uint32_t level = 1; level <= 3; ++level) {
        program p(level);
        p.op<std::uint32_t>(2, level);
        if (!inner.empty()) {
            p.w.put(std::uint8_t{11});
            p.w.put_blob(inner);
        }
        p.w.put(std::uint8_t{13});
        inner = std::move(p.w).finish();
        write(reader, "program_nested_" + std::to_string(level), inner);
    }
    {   // A truncated program (runs out of payload mid-read) and an empty one.
        program p(1);
        p.w.put(std::uint8_t{3});
        p.w.put(std::uint32_t{1});
        write(reader, "program_truncated", std::move(p.w).finish());
        program e(2);
        write(reader, "program_empty", std::move(e.w).finish());
    }
}

} // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "usage: make_corpus OUT_DIR\n";
        return 2;
    }
    const fs::path root(argv[1]);
    const fs::path opt = root / "optimizer", comp = root / "compressor", reader = root / "reader", nf4 = root / "nf4";
    for (const auto& d : {opt, comp, reader, nf4}) fs::create_directories(d);
    optimizer_seeds(opt, reader);
    compressor_seeds(comp, reader);
    reader_programs(reader);
    nf4_seeds(nf4);
    std::cout << "make_corpus: wrote " << written << " seed blobs under " << root.string() << "\n";
    return 0;
}
