// Trains a two-layer network y = W2 · relu(W1 x) on a teacher-student regression task twice,
// with identical seeds and schedule: once keeping the exact activations for backward, once
// keeping only VeLoRA's compressed records (G = 32 sub-tokens per token, first-batch v).
// It prints the loss curves side by side, the activation bytes each run kept for backward
// (counted, not estimated) and the time per step. The host owns every tensor; the library
// sees views, exactly as when it is embedded in a larger C++ trainer.
//
//   velora_linear [--steps N] [--tokens T] [--features D] [--groups G]
#include <velora/velora.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using B = velora::eigen_backend<float>;
using velora::index_t;

struct options {
    int steps = 300;
    index_t tokens = 1024, features = 512, hidden = 512, outputs = 64, groups = 32;
    float lr = 0.05f;
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
        else throw std::invalid_argument("unknown flag '" + flag + "' (known: --steps --tokens --features --groups)");
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
    double ms_per_step = 0;
};

run_result train(const options& o, bool use_velora) {
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
            c1.compress(cview(x, t, d), r1);
            c2.compress(cview(act, t, h), r2);
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
            c2.weight_grad(r2, cview(dy, t, out), view(a2, out, o.groups));
            c2.expand_weight_grad(r2, cview(a2, out, o.groups), view(dw2, out, h));
            c1.weight_grad(r1, cview(dact, t, h), view(a1, h, o.groups));
            c1.expand_weight_grad(r1, cview(a1, h, o.groups), view(dw1, h, d));
        } else {
            velora::dense_weight_grad(backend, cview(dy, t, out), cview(act, t, h), view(dw2, out, h));
            velora::dense_weight_grad(backend, cview(dact, t, h), cview(x, t, d), view(dw1, h, d));
        }
        for (std::size_t i = 0; i < w1.size(); ++i) w1[i] -= o.lr * dw1[i];
        for (std::size_t i = 0; i < w2.size(); ++i) w2[i] -= o.lr * dw2[i];
    }
    result.ms_per_step = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / o.steps;
    return result;
}

} // namespace

int main(int argc, char** argv) {
    try {
        const options o = parse(argc, argv);
        std::printf("Teacher-student regression, 2-layer ReLU network: T=%ld tokens, D=%ld, hidden=%ld, out=%ld, G=%ld, %d SGD steps\n",
                    static_cast<long>(o.tokens), static_cast<long>(o.features), static_cast<long>(o.hidden),
                    static_cast<long>(o.outputs), static_cast<long>(o.groups), o.steps);
        const auto exact = train(o, false);
        const auto compressed = train(o, true);
        std::printf("\n%8s %14s %14s\n", "step", "loss exact", "loss VeLoRA");
        for (int s = 0; s < o.steps; s += std::max(1, o.steps / 10))
            std::printf("%8d %14.6f %14.6f\n", s, exact.loss[static_cast<std::size_t>(s)], compressed.loss[static_cast<std::size_t>(s)]);
        std::printf("%8d %14.6f %14.6f\n", o.steps - 1, exact.loss.back(), compressed.loss.back());
        std::printf("\nactivations kept for backward: exact %.2f MiB, VeLoRA %.3f MiB (%.1fx less)\n", exact.kept_bytes / 1048576.0,
                    compressed.kept_bytes / 1048576.0, double(exact.kept_bytes) / double(compressed.kept_bytes));
        std::printf("time per step: exact %.1f ms, VeLoRA %.1f ms\n", exact.ms_per_step, compressed.ms_per_step);
        std::printf("final loss ratio VeLoRA / exact: %.3f (first-step loss %.4f)\n", compressed.loss.back() / exact.loss.back(), exact.loss.front());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "velora_linear: %s\n", e.what());
        return 2;
    }
}
