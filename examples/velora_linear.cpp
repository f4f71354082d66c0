// Trains a two-layer network y = W2 · relu(W1 x) on a teacher-student regression task four
// times, with identical seeds and schedule:
//   exact + AdamW        the baseline: exact activations kept for backward, dense AdamW
//   VeLoRA + AdamW       only VeLoRA's compressed records kept (G sub-tokens per token)
//   exact + AdaRankGrad  low-rank Adam moments (adaptive rank, refresh on convergence)
//   VeLoRA + AdaRankGrad the optimizer consumes VeLoRA's factored gradients: no dense dW at all
// It prints the loss curves, the activation bytes each run kept for backward and the optimizer
// state bytes (both counted, not estimated) and the time per step. The host owns every tensor;
// the library sees views, exactly as when it is embedded in a larger C++ trainer.
//
//   velora_linear [--steps N] [--tokens T] [--features D] [--groups G] [--lr LR]
#include <adarank/adarank.hpp>
#include <velora/velora.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using B = velora::eigen_backend<float>;
using velora::index_t;

struct options {
    int steps = 300;
    index_t tokens = 1024, features = 512, hidden = 512, outputs = 64, groups = 32;
    double lr = 2e-3;
};

options parse(int argc, char** argv) {
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        auto value = [&]() -> long {
            if (i + 1 >= argc) throw std::invalid_argument("flag " + flag + " needs a value");
            char* end = nullptr;
            const long v = std::strtol(argv[++i], &end, 10);
            if (*end != '\0' || v <= 0) throw std::invalid_argument("flag " + flag + " needs a positive integer, got '" + argv[i] + "'");
            return v;
        };
        if (flag == "--steps") o.steps = static_cast<int>(value());
        else if (flag == "--tokens") o.tokens = value();
        else if (flag == "--features") o.features = value();
        else if (flag == "--groups") o.groups = value();
        else if (flag == "--lr") {
            if (i + 1 >= argc) throw std::invalid_argument("flag --lr needs a value");
            char* end = nullptr;
            o.lr = std::strtod(argv[++i], &end);
            if (*end != '\0' || !(o.lr > 0)) throw std::invalid_argument(std::string("flag --lr needs a positive number, got '") + argv[i] + "'");
        }
        else throw std::invalid_argument("unknown flag '" + flag + "' (known: --steps --tokens --features --groups --lr)");
    }
    return o;
}

std::vector<float> gaussian(std::size_t n, std::uint64_t seed, float scale, float mean = 0) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = mean + scale * static_cast<float>(velora::gaussian_at(seed, i));
    return v;
}

struct run_result {
    std::vector<double> loss;
    std::size_t kept_bytes = 0;
    std::size_t optimizer_bytes = 0;
    double ms_per_step = 0;
    adarank::index_t rank = 0;   // of W1 at the end (low-rank runs)
};

run_result train(const options& o, bool use_velora, bool low_rank) {
    B backend;
    const index_t t = o.tokens, d = o.features, h = o.hidden, out = o.outputs;
    // Teacher network and the student's initial weights: identical in both runs.
    const auto teacher1 = gaussian(static_cast<std::size_t>(h * d), 1, 1.0f / std::sqrt(float(d)));
    const auto teacher2 = gaussian(static_cast<std::size_t>(out * h), 2, 1.0f / std::sqrt(float(h)));
    auto w1 = gaussian(static_cast<std::size_t>(h * d), 3, 1.0f / std::sqrt(float(d)));
    auto w2 = gaussian(static_cast<std::size_t>(out * h), 4, 1.0f / std::sqrt(float(h)));

    std::vector<float> x(static_cast<std::size_t>(t * d)), hid(static_cast<std::size_t>(t * h)), act(hid.size()),
        y(static_cast<std::size_t>(t * out)), target(y.size()), dy(y.size()), dact(hid.size()), dw1(w1.size()), dw2(w2.size());
    std::vector<float> a1(static_cast<std::size_t>(h * o.groups)), a2(static_cast<std::size_t>(out * o.groups));
    velora::compressor<B> c1(backend, d, {.groups = o.groups});
    velora::compressor<B> c2(backend, h, {.groups = o.groups});
    velora::compressor<B>::record_type r1, r2;
    // AdamW hyper-parameters are shared; AdaRankGrad adds its defaults (adaptive rank up to 128,
    // refresh when the projected gradient has converged, moments carried over) with α = 1 so
    // that both optimizers take steps of the same size.
    adarank::optimizer_config config;
    config.adam.lr = o.lr;
    config.scale = 1.0;
    adarank::low_rank_adamw<B> opt(backend, config);
    const auto kind = low_rank ? adarank::param_kind::automatic : adarank::param_kind::dense;
    const auto id1 = opt.add_parameter(h, d, kind);     // 512×512: low-rank under `automatic`
    const auto id2 = opt.add_parameter(out, h, kind);   // 64×512: too small to gain, dense AdamW
    // ok and degenerate_input (an all-zero input where a direction was due: the documented
    // fallback was used, the step was taken) go on; every other status (NaN/Inf, an overflow)
    // says that nothing was changed: the run has diverged.
    auto diverged = [](velora::status st) { return st != velora::status::ok && st != velora::status::degenerate_input; };
    auto step_with = [&](adarank::low_rank_adamw<B>::param_id id, std::vector<float>& w, index_t rows, index_t cols, auto&& grad) {
        const velora::status st = opt.step(id, velora::make_view(w.data(), rows, cols), grad);
        if (diverged(st)) throw std::runtime_error("optimizer step returned status " + std::string(velora::to_string(st)) + ": training diverged");
    };
    // The records are what backward reads: a compress that kept nothing new must stop the run
    // before backward would use the previous step's record. degenerate_input (an all-zero
    // batch: the documented fallback v was used) still wrote the record.
    auto compress = [&](velora::compressor<B>& c, velora::const_matrix_view<float> input, velora::compressor<B>::record_type& record) {
        const velora::status st = c.compress(input, record);
        if (diverged(st)) throw std::runtime_error("compress returned status " + std::string(velora::to_string(st)) + ": training diverged");
    };
    auto view = [](std::vector<float>& v, index_t r, index_t c) { return velora::make_view(v.data(), r, c); };
    auto cview = [](const std::vector<float>& v, index_t r, index_t c) { return velora::make_view<const float>(v.data(), r, c); };

    run_result result;
    const auto start = std::chrono::steady_clock::now();
    for (int step = 0; step < o.steps; ++step) {
        // A fresh batch from the input distribution (non-zero mean, as real activations have).
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.5f + static_cast<float>(velora::gaussian_at(100 + static_cast<std::uint64_t>(step), i));
        velora::linear_forward(backend, cview(x, t, d), cview(teacher1, h, d), nullptr, view(hid, t, h));
        for (std::size_t i = 0; i < hid.size(); ++i) act[i] = std::max(hid[i], 0.0f);
        velora::linear_forward(backend, cview(act, t, h), cview(teacher2, out, h), nullptr, view(target, t, out));

        // Student forward; what is kept for backward is either X and relu(H) or two records.
        velora::linear_forward(backend, cview(x, t, d), cview(w1, h, d), nullptr, view(hid, t, h));
        for (std::size_t i = 0; i < hid.size(); ++i) act[i] = std::max(hid[i], 0.0f);
        velora::linear_forward(backend, cview(act, t, h), cview(w2, out, h), nullptr, view(y, t, out));
        if (use_velora) {
            compress(c1, cview(x, t, d), r1);
            compress(c2, cview(act, t, h), r2);
            result.kept_bytes = r1.bytes() + r2.bytes();
        } else {
            result.kept_bytes = (x.size() + act.size()) * sizeof(float);
        }
        double loss = 0;
        for (std::size_t i = 0; i < y.size(); ++i) {
            const float e = y[i] - target[i];
            loss += 0.5 * double(e) * e;
            dy[i] = e / static_cast<float>(t);
        }
        result.loss.push_back(loss / static_cast<double>(t));

        // Backward. The ReLU mask comes from act > 0 (kept in both runs as a bit per element
        // by a real trainer; here the host still has `act`).
        velora::linear_input_grad(backend, cview(dy, t, out), cview(w2, out, h), view(dact, t, h));
        for (std::size_t i = 0; i < dact.size(); ++i) dact[i] = act[i] > 0 ? dact[i] : 0.0f;
        if (use_velora) {
            c2.gradient_factor(r2, cview(dy, t, out), view(a2, out, o.groups));
            c1.gradient_factor(r1, cview(dact, t, h), view(a1, h, o.groups));
            // The factored gradients go to the optimizer as they are: a low-rank parameter never
            // forms the dense dW, a dense one expands it in the optimizer's workspace.
            step_with(id2, w2, out, h, c2.factored(r2, cview(a2, out, o.groups)));
            step_with(id1, w1, h, d, c1.factored(r1, cview(a1, h, o.groups)));
        } else {
            velora::dense_weight_grad(backend, cview(dy, t, out), cview(act, t, h), view(dw2, out, h));
            step_with(id2, w2, out, h, cview(dw2, out, h));   // each layer steps as soon as its gradient exists
            velora::dense_weight_grad(backend, cview(dact, t, h), cview(x, t, d), view(dw1, h, d));
            step_with(id1, w1, h, d, cview(dw1, h, d));
        }
    }
    result.optimizer_bytes = opt.state_bytes();
    result.rank = opt.layer_state(id1).rank;
    result.ms_per_step = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / o.steps;
    return result;
}

} // namespace

int main(int argc, char** argv) {
    try {
        const options o = parse(argc, argv);
        std::printf("Teacher-student regression, 2-layer ReLU network: T=%ld tokens, D=%ld, hidden=%ld, out=%ld, G=%ld, %d steps, lr %g\n",
                    static_cast<long>(o.tokens), static_cast<long>(o.features), static_cast<long>(o.hidden),
                    static_cast<long>(o.outputs), static_cast<long>(o.groups), o.steps, o.lr);
        const char* names[4] = {"exact + AdamW", "VeLoRA + AdamW", "exact + AdaRankGrad", "VeLoRA + AdaRankGrad"};
        std::vector<run_result> runs;
        for (int r = 0; r < 4; ++r) {
            std::printf("training %-22s ...", names[r]);
            std::fflush(stdout);
            runs.push_back(train(o, r % 2 == 1, r >= 2));
            std::printf(" %.1f ms/step\n", runs.back().ms_per_step);
        }
        std::printf("\n%8s", "step");
        for (const char* n : names) std::printf(" %22s", n);
        std::printf("\n");
        auto row = [&](int s) {
            std::printf("%8d", s);
            for (const auto& r : runs) std::printf(" %22.6f", r.loss[static_cast<std::size_t>(s)]);
            std::printf("\n");
        };
        for (int s = 0; s < o.steps; s += std::max(1, o.steps / 10)) row(s);
        row(o.steps - 1);
        std::printf("\n%-22s %12s %14s %16s %12s %10s\n", "run", "final loss", "vs baseline", "activations MiB", "optim. MiB", "ms/step");
        for (int r = 0; r < 4; ++r)
            std::printf("%-22s %12.6f %13.3fx %16.3f %12.3f %10.1f\n", names[r], runs[static_cast<std::size_t>(r)].loss.back(),
                        runs[static_cast<std::size_t>(r)].loss.back() / runs[0].loss.back(), runs[static_cast<std::size_t>(r)].kept_bytes / 1048576.0,
                        runs[static_cast<std::size_t>(r)].optimizer_bytes / 1048576.0, runs[static_cast<std::size_t>(r)].ms_per_step);
        std::printf("\nAdaRankGrad's adaptive rank of W1 (%ldx%ld) at the end: %ld (exact gradients), %ld (VeLoRA gradients)\n",
                    static_cast<long>(o.hidden), static_cast<long>(o.features), static_cast<long>(runs[2].rank), static_cast<long>(runs[3].rank));
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "velora_linear: %s\n", e.what());
        return 2;
    }
}
