// Fine-tuning on the Eigen CPU backend (issue 22 item 5): one linear layer's forward + backward
// at LLaMA-7B shapes with T = 4096 tokens, float, r = 16, G = 32:
//   v_proj    D = O = 4096,
//   down_proj D = 11008, O = 4096,
// in these configurations (suffix _vproj / _down):
//   BM_DenseTrainable  a trainable dense layer: y = x·Wᵀ, dX = dY·W, dW = dYᵀ·x (the baseline of LoRA)
//   BM_LoRA            lora_linear over a frozen float W, x_a kept (viewed): no dW, four rank-r products
//   BM_VeLoRA_LoRA     the same with A's gradient from a VeLoRA record of x_a (G = 32, f32 Z)
//   BM_QLoRA           lora_linear over an NF4 W (blocks of 64, the default tile)
//   BM_VeLoRA_QLoRA    both
//   BM_LoRA_BF16       lora_linear over a bf16 W (information)
//   BM_QLoRA_tile2^k   BM_QLoRA with tiles of about 2^k dequantised values (information: the
//                      default, 2^22, against smaller and larger tiles; 2^18 was the first default)
//   BM_DequantizeNF4   the NF4 base's whole W dequantised tile by tile, no GEMM (information:
//                      the dequantisation's share of BM_QLoRA, which does it twice)
// Each reports `kept_bytes` (what backward needs kept from forward: x for the dense layer,
// layer.kept_bytes(T) for the LoRA layers), `weight_bytes` (W as stored) and `workspace_bytes`
// (the layer's own scratch) as counters, and its rate in FLOP/s.
//
// After the benchmarks, a "Ratios (same run)" table divides real times measured in this process
// (nothing is hard-coded). With VELORA_TORCH_REFERENCE=<file> (the output of
// bench/pytorch_reference/lora_reference.py, run on the same machine just before), it adds our
// time over PyTorch's for the same layer; see docs/performance.md.
//
// Usage: bench_lora [Google Benchmark flags], e.g. --benchmark_filter=vproj
//        --benchmark_repetitions=3 (ratios then use the median of the repetitions).
#include <benchmark/benchmark.h>

#include "common.hpp"

#include <velora/backend/eigen.hpp>
#include <velora/finetune/lora.hpp>
#include <velora/layers.hpp>
#include <velora/quant/half_weight.hpp>
#include <velora/quant/nf4.hpp>
#include <velora/quant/nf4_frozen_weight.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using bench::fill_gaussian;
using bench::guarded;
using T = float;
using backend_t = velora::eigen_backend<T>;
using velora::index_t;
using dense_base = velora::dense_frozen_weight<backend_t>;
using nf4_base = velora::nf4_frozen_weight<backend_t>;
using bf16_base = velora::bf16_frozen_weight<backend_t>;

constexpr index_t kTokens = 4096;   // T
constexpr index_t kRank = 16;       // r
constexpr index_t kGroups = 32;     // G
constexpr double kAlpha = 32;       // s = α/r = 2

struct shape {
    const char* name;
    index_t d, o;
};
constexpr shape kShapes[] = {{"vproj", 4096, 4096}, {"down", 11008, 4096}};

velora::lora_config lora_config(velora::lora_keep keep) {
    velora::lora_config c;
    c.rank = kRank;
    c.alpha = kAlpha;
    c.keep = keep;
    c.velora.groups = kGroups;
    return c;
}

// Flops of one forward + backward. Dense: three T·O·D GEMMs. LoRA: the base's two, plus
// H = x_a·Aᵀ and P·A (T·r·D each), s·H·Bᵀ, P = s·dY·B and dB (T·O·r each), and dA = Pᵀ·x_a
// (T·r·D) or A_f = Pᵀ·Z (T·r·G) with its expansion (r·D).
double dense_flops(const shape& s) { return 3 * 2.0 * kTokens * s.o * s.d; }
double lora_flops(const shape& s, bool velora) {
    const double base = 2 * 2.0 * kTokens * s.o * s.d;
    const double adapters = 2.0 * kTokens * kRank * (2.0 * s.d + 3.0 * s.o);
    const double da = velora ? 2.0 * kTokens * kRank * kGroups + 2.0 * kTokens * s.d /* compress */ : 2.0 * kTokens * kRank * s.d;
    return base + adapters + da;
}

// Everything one shape's benchmarks share, built on first use (outside every timed loop).
struct fixture {
    shape s;
    backend_t backend;
    std::vector<T> x, dy, w, y, dx, dw, a, b, da, db;
    velora::nf4_weight w_nf4;
    velora::bf16_weight w_bf16;

    explicit fixture(const shape& sh)
        : s(sh), x(n(kTokens, s.d)), dy(n(kTokens, s.o)), w(n(s.o, s.d)), y(n(kTokens, s.o)), dx(n(kTokens, s.d)), dw(n(s.o, s.d)),
          a(n(kRank, s.d)), b(n(s.o, kRank)), da(n(kRank, s.d)), db(n(s.o, kRank)) {
        fill_gaussian(x.data(), kTokens * s.d, 0x10a0001, 1.0);
        // A non-zero, feature-dependent mean, so VeLoRA's v (the normalised sub-token mean) is a
        // meaningful direction.
        for (index_t t = 0; t < kTokens; ++t)
            for (index_t j = 0; j < s.d; ++j)
                x[static_cast<std::size_t>(t * s.d + j)] += static_cast<T>(0.5 + velora::uniform_at(0x10a0004, static_cast<std::uint64_t>(j % 32)));
        fill_gaussian(dy.data(), kTokens * s.o, 0x10a0002, 1.0);
        fill_gaussian(w.data(), s.o * s.d, 0x10a0003, 1.0 / std::sqrt(static_cast<double>(s.d)));
        fill_gaussian(a.data(), kRank * s.d, 0x10a0005, 1.0 / std::sqrt(static_cast<double>(s.d)));
        fill_gaussian(b.data(), s.o * kRank, 0x10a0006, 0.01);   // trained B: small but non-zero
        w_nf4 = velora::nf4_weight::quantize(cw());
        w_bf16 = velora::bf16_weight::quantize(cw());
    }
    static std::size_t n(index_t rows, index_t cols) { return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols); }

    velora::const_matrix_view<T> cx() const { return {x.data(), kTokens, s.d}; }
    velora::const_matrix_view<T> cdy() const { return {dy.data(), kTokens, s.o}; }
    velora::const_matrix_view<T> cw() const { return {w.data(), s.o, s.d}; }
    velora::matrix_view<T> vy() { return {y.data(), kTokens, s.o}; }
    velora::matrix_view<T> vdx() { return {dx.data(), kTokens, s.d}; }
    velora::matrix_view<T> vdw() { return {dw.data(), s.o, s.d}; }
    velora::matrix_view<T> va() { return {a.data(), kRank, s.d}; }
    velora::matrix_view<T> vb() { return {b.data(), s.o, kRank}; }
    velora::matrix_view<T> vda() { return {da.data(), kRank, s.d}; }
    velora::matrix_view<T> vdb() { return {db.data(), s.o, kRank}; }
};

fixture& shared(const shape& s) {
    static std::map<std::string, std::unique_ptr<fixture>> fixtures;
    if (fixtures.find(s.name) == fixtures.end()) {
        fixtures.clear();   // one shape's buffers at a time (down_proj's alone are ~1 GB)
        fixtures.emplace(s.name, std::make_unique<fixture>(s));
    }
    return *fixtures.at(s.name);
}

void set_flops(benchmark::State& state, double flops_per_iteration) {
    state.counters["FLOP/s"] = benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}
void set_bytes(benchmark::State& state, std::size_t kept, std::size_t weight, std::size_t workspace) {
    state.counters["kept_bytes"] = static_cast<double>(kept);
    state.counters["weight_bytes"] = static_cast<double>(weight);
    state.counters["workspace_bytes"] = static_cast<double>(workspace);
}

// ---------------------------------------------------------------- benchmarks

void dense_trainable(benchmark::State& state, shape s) {
    guarded(state, [&] {
        fixture& f = shared(s);
        velora::linear_forward(f.backend, f.cx(), f.cw(), nullptr, f.vy());   // warm-up: the GEMM driver's buffers
        for (auto _ : state) {
            velora::linear_forward(f.backend, f.cx(), f.cw(), nullptr, f.vy());
            velora::linear_input_grad(f.backend, f.cdy(), f.cw(), f.vdx());
            velora::dense_weight_grad(f.backend, f.cdy(), f.cx(), f.vdw());
            benchmark::ClobberMemory();
        }
        set_flops(state, dense_flops(s));
        // A trainable layer keeps x (T×D) for dW; W is stored in float.
        set_bytes(state, fixture::n(kTokens, s.d) * sizeof(T), fixture::n(s.o, s.d) * sizeof(T), 0);
    });
}

// One lora_linear over `base`: forward + backward (dX, dA dense, dB) per iteration.
template <class Base, class MakeBase>
void lora(benchmark::State& state, shape s, velora::lora_keep keep, MakeBase&& make_base) {
    guarded(state, [&] {
        fixture& f = shared(s);
        const bool velora_path = keep == velora::lora_keep::velora;
        velora::lora_linear<backend_t, Base> layer(f.backend, make_base(f), nullptr, f.va(), f.vb(), lora_config(keep));
        velora::lora_record<backend_t> rec;
        layer.reserve(kTokens);
        layer.reserve(kTokens, rec);
        const velora::lora_gradients<T> g{.dx = f.vdx(), .da = f.vda(), .db = f.vdb()};
        // Warm-up: VeLoRA's first compress sets v; every buffer reaches its size.
        if (layer.forward(f.cx(), f.vy(), rec) != velora::status::ok || layer.backward(rec, f.cdy(), g) != velora::status::ok) {
            state.SkipWithError("warm-up forward/backward did not return status::ok");
            return;
        }
        bool all_ok = true;
        for (auto _ : state) {
            all_ok &= layer.forward(f.cx(), f.vy(), rec) == velora::status::ok;
            all_ok &= layer.backward(rec, f.cdy(), g) == velora::status::ok;
            benchmark::ClobberMemory();
        }
        if (!all_ok) {
            state.SkipWithError("forward/backward did not return status::ok");
            return;
        }
        if (rec.bytes() != layer.kept_bytes(kTokens)) {
            state.SkipWithError("record.bytes() differs from layer.kept_bytes(T)");
            return;
        }
        set_flops(state, lora_flops(s, velora_path));
        set_bytes(state, layer.kept_bytes(kTokens), layer.base().stored_bytes(), layer.workspace_bytes(kTokens));
    });
}

// The dequantisation alone: every default tile of W once (what forward and input_grad each do).
void dequantize_nf4(benchmark::State& state, shape s) {
    guarded(state, [&] {
        fixture& f = shared(s);
        const nf4_base base(f.backend, f.w_nf4);
        std::vector<T> ws(base.workspace_elements());
        for (auto _ : state) {
            for (index_t r0 = 0; r0 < s.o; r0 += base.tile_rows()) {
                const index_t h = std::min(base.tile_rows(), s.o - r0);
                f.backend.dequantize_nf4(base.blocks(), r0, velora::matrix_view<T>(ws.data(), h, s.d));
            }
            benchmark::ClobberMemory();
        }
        // Read the packed weight, write O·D floats.
        state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(base.stored_bytes() + fixture::n(s.o, s.d) * sizeof(T)));
        state.counters["tile_rows"] = static_cast<double>(base.tile_rows());
    });
}

void register_all() {
    using velora::lora_keep;
    for (const shape& s : kShapes) {
        const std::string suffix = std::string("_") + s.name;
        auto reg = [&](const std::string& name, auto fn) {
            benchmark::RegisterBenchmark((name + suffix).c_str(), fn)->UseRealTime()->Unit(benchmark::kMillisecond);
        };
        auto dense = [](fixture& f) { return dense_base(f.cw()); };
        auto nf4 = [](fixture& f) { return nf4_base(f.backend, f.w_nf4); };
        auto bf16 = [](fixture& f) { return bf16_base(f.backend, f.w_bf16); };
        reg("BM_DenseTrainable", [s](benchmark::State& st) { dense_trainable(st, s); });
        reg("BM_LoRA", [s, dense](benchmark::State& st) { lora<dense_base>(st, s, lora_keep::input_view, dense); });
        reg("BM_VeLoRA_LoRA", [s, dense](benchmark::State& st) { lora<dense_base>(st, s, lora_keep::velora, dense); });
        reg("BM_QLoRA", [s, nf4](benchmark::State& st) { lora<nf4_base>(st, s, lora_keep::input_view, nf4); });
        reg("BM_VeLoRA_QLoRA", [s, nf4](benchmark::State& st) { lora<nf4_base>(st, s, lora_keep::velora, nf4); });
        reg("BM_LoRA_BF16", [s, bf16](benchmark::State& st) { lora<bf16_base>(st, s, lora_keep::input_view, bf16); });
        reg("BM_DequantizeNF4", [s](benchmark::State& st) { dequantize_nf4(st, s); });
        for (int log2_values : {18, 20, 21, 23}) {
            auto tiled = [log2_values](fixture& f) {
                const index_t rows = std::clamp<index_t>((index_t{1} << log2_values) / f.s.d, 1, f.s.o);
                return nf4_base(f.backend, f.w_nf4, rows);
            };
            reg("BM_QLoRA_tile2^" + std::to_string(log2_values), [s, tiled](benchmark::State& st) { lora<nf4_base>(st, s, lora_keep::input_view, tiled); });
        }
    }
}

// ---------------------------------------------------------------- reporting

// The PyTorch reference's median milliseconds per name, from lora_reference.py's output.
std::map<std::string, double> torch_reference() {
    std::map<std::string, double> out;
    const char* path = std::getenv("VELORA_TORCH_REFERENCE");
    if (!path || !*path) return out;
    std::ifstream in(path);
    if (!in) {
        std::fprintf(stderr, "bench_lora: cannot read VELORA_TORCH_REFERENCE=%s\n", path);
        return out;
    }
    std::string line;
    while (std::getline(in, line)) {
        if (line.empty() || line[0] == '#') continue;
        std::istringstream fields(line);
        std::string name;
        double ms = 0;
        if (fields >> name >> ms) out[name] = ms;
    }
    return out;
}

void print_ratios(const bench::ratio_reporter& rep) {
    using bench::goal;
    using bench::ratio;
    const auto torch = torch_reference();
    bench::print_header("Ratios (same run; real time per iteration, the median when repetitions were given)",
                        std::string("GEMM engine: ") + (velora::cpu::has_blas ? std::string("BLAS ") + velora::cpu::blas_name() : "Eigen's product (no BLAS)"));
    for (const shape& s : kShapes) {
        const std::string x = std::string("_") + s.name;
        auto t = [&](const char* name) { return rep.seconds(name + x); };
        auto label = [&](const char* text) {
            static std::string buf;
            buf = std::string(s.name) + ": " + text;
            return buf.c_str();
        };
        bench::print_row(label("LoRA / DenseTrainable"), ratio(t("BM_LoRA"), t("BM_DenseTrainable")), goal::at_most, 0.70, "%.3f",
                         "expect ~2/3: no dW");
        bench::print_row(label("VeLoRA_LoRA / LoRA"), ratio(t("BM_VeLoRA_LoRA"), t("BM_LoRA")), goal::at_most, 1.02, "%.3f", "");
        bench::print_row(label("QLoRA (NF4) / LoRA (float)"), ratio(t("BM_QLoRA"), t("BM_LoRA")), goal::at_most, 1.25, "%.3f", "");
        bench::print_row(label("VeLoRA_QLoRA / QLoRA"), ratio(t("BM_VeLoRA_QLoRA"), t("BM_QLoRA")), goal::info, 0, "%.3f", "");
        bench::print_row(label("LoRA_BF16 / LoRA (float)"), ratio(t("BM_LoRA_BF16"), t("BM_LoRA")), goal::info, 0, "%.3f", "");
        bench::print_row(label("2 x DequantizeNF4 / LoRA (float)"), ratio(t("BM_DequantizeNF4"), t("BM_LoRA")) ? std::optional<double>(2 * *ratio(t("BM_DequantizeNF4"), t("BM_LoRA"))) : std::nullopt,
                         goal::info, 0, "%.3f", "the dequantisation's share");
        for (const char* tile : {"BM_QLoRA_tile2^18", "BM_QLoRA_tile2^20", "BM_QLoRA_tile2^21", "BM_QLoRA_tile2^23"}) {
            const std::string text = std::string(tile + 3) + " / LoRA (float)";
            bench::print_row(label(text.c_str()), ratio(t(tile), t("BM_LoRA")), goal::info, 0, "%.3f", "");
        }
        const auto it = torch.find(std::string("lora_fwd_bwd_") + s.name);
        if (it != torch.end()) {
            const std::optional<double> torch_s = it->second * 1e-3;
            bench::print_row(label("LoRA / PyTorch LoRA"), ratio(t("BM_LoRA"), torch_s), goal::at_most, 1.0, "%.3f",
                             "VELORA_TORCH_REFERENCE, same machine");
            bench::print_row(label("VeLoRA_LoRA / PyTorch LoRA"), ratio(t("BM_VeLoRA_LoRA"), torch_s), goal::info, 0, "%.3f", "");
            bench::print_row(label("QLoRA / PyTorch LoRA (float)"), ratio(t("BM_QLoRA"), torch_s), goal::info, 0, "%.3f", "");
        }
        for (const char* name : {"BM_DenseTrainable", "BM_LoRA", "BM_VeLoRA_LoRA", "BM_QLoRA", "BM_VeLoRA_QLoRA", "BM_LoRA_BF16"}) {
            const auto kept = rep.counter(name + x, "kept_bytes"), weight = rep.counter(name + x, "weight_bytes");
            if (!kept || !weight) continue;
            std::printf("%-46s %12.1f MiB kept for backward, %8.1f MiB weight\n", (std::string(s.name) + ": " + name).c_str(), *kept / 1048576.0,
                        *weight / 1048576.0);
        }
    }
}

} // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#if !defined(NDEBUG)
    std::fprintf(stderr, "note: bench_lora was compiled without NDEBUG (assertions on); timings may be pessimistic\n");
#endif
    register_all();
    benchmark::AddCustomContext("gemm_blas", velora::cpu::blas_name());
    benchmark::AddCustomContext("shape", "T=" + std::to_string(kTokens) + " r=" + std::to_string(kRank) + " G=" + std::to_string(kGroups) +
                                             " float; vproj D=O=4096, down D=11008 O=4096");
    bench::add_thread_context();
    return bench::run_and_print_ratios(print_ratios);
}
