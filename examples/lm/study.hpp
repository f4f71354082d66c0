#pragma once
// `lm_train --study NAME`: a planned set of configurations, each trained at its own best learning
// rate over several seeds, summarised as validation loss against optimizer-state bytes.
//
// For every point of the plan:
//  1. its learning rate is swept on the tuning split (training on the first 90% of the training
//     text, validating on the rest of it; never on the validation split reported below), over the
//     point's grid; when the best lr lies on an edge of what was tried, the grid is extended by
//     one factor of 2 past that edge, at most twice;
//  2. it is trained at the chosen lr once per seed (the seed draws the initial weights and the
//     order of the batches; every configuration sees the same ones for the same seed) and
//     validated on the held-out 10%.
// Every configuration is then compared with GaLore at the same optimizer-state bytes: for each
// seed, GaLore's losses over its ranks are interpolated (linearly in log bytes) at the point's
// peak state, and the paired differences are tested (two-sided t-test at 95% over the seeds).
// The bytes are the optimizer state's peak over training: what a user must have, as AdaRankGrad's
// ranks (and with them its state) change during training.
//
// A plan may also list pairs of its configurations to compare directly, paired by seed (the
// fine-tuning study: velora+lora against lora, qlora against lora, ...), with the same test.
//
// The trainer supplies how to train one configuration (a callable, below): this file knows the
// plans and the statistics, not the model.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "report.hpp"

namespace lm::study {

struct point {
    std::string config;        ///< configs.hpp spelling, without lr
    std::string series;        ///< "full rank", "GaLore", "AdaRankGrad", "budget" (the budget rank rule), "LoRA" or "ablation"
    std::string label;         ///< how the plot and the table call it
    std::vector<double> lrs;   ///< the learning-rate grid of the sweep
};

// Two configurations of a plan compared seed by seed: loss of `a` minus loss of `b`.
struct pair_spec {
    std::string a, b;
};

struct plan {
    std::string name, description;
    std::vector<point> points;
    std::vector<pair_spec> pairs;   ///< direct comparisons, printed after the table
    int extensions = 2;             ///< how often the lr grid may grow past an edge
    bool fine_tuning = false;       ///< the points fine-tune the model of --init on another text
};

inline const std::vector<plan>& plans() {
    static const std::vector<plan> all = [] {
        const std::vector<double> full = {1e-3, 2e-3, 4e-3}, low = {5e-3, 1e-2, 2e-2};
        plan iso{"iso-memory",
                 "GaLore at ranks 8-64 and AdaRankGrad over its rank threshold xi (cap 64) against their optimizer state; "
                 "ablations that add one AdaRankGrad ingredient to GaLore at rank 32 (exact SVD; xi 0.2), all three, and "
                 "AdaRankGrad with xi 0.2, cap 32 and its randomized SVD; full-rank AdamW",
                 {}, {}, 2, false};
        iso.points.push_back({"adamw", "full rank", "AdamW", full});
        for (int r : {8, 16, 32, 64}) iso.points.push_back({"galore:r=" + std::to_string(r), "GaLore", "r=" + std::to_string(r), low});
        for (const char* xi : {"0.35", "0.2", "0.1", "0.05"})
            iso.points.push_back({std::string("adarank:r=64,xi=") + xi, "AdaRankGrad", std::string("\u03be=") + xi, low});
        // ξ = 0.2 spelt out: the study was recorded when it was the default (docs/results.md).
        iso.points.push_back({"galore:r=32,rank=adaptive,xi=0.2", "ablation", "GaLore r=32 + adaptive rank", low});
        iso.points.push_back({"galore:r=32,refresh=converged", "ablation", "GaLore r=32 + convergence refresh", low});
        iso.points.push_back({"galore:r=32,transport=rotation", "ablation", "GaLore r=32 + rotated moments", low});
        iso.points.push_back({"galore:r=32,transport=reset", "ablation", "GaLore r=32 + moments reset", low});
        iso.points.push_back({"galore:r=32,rank=adaptive,xi=0.2,refresh=converged,transport=rotation", "ablation", "GaLore r=32 + all three (exact SVD)", low});
        iso.points.push_back({"adarank:r=32,xi=0.2", "ablation", "AdaRankGrad \u03be=0.2, cap 32 (rSVD)", low});
        // Does the ordering survive a learning-rate warm-up (which both papers use and the
        // iso-memory plan does not)? GaLore's three ranks around AdaRankGrad's bytes, AdaRankGrad
        // at the threshold closest to them, and AdamW, each warmed up over 100 steps.
        plan warm{"warmup", "AdamW, GaLore at ranks 16-64 and AdaRankGrad (xi 0.05, cap 64), each with a 100-step linear warm-up", {}, {}, 2, false};
        warm.points.push_back({"adamw:warmup=100", "full rank", "AdamW", full});
        for (int r : {16, 32, 64})
            warm.points.push_back({"galore:r=" + std::to_string(r) + ",warmup=100", "GaLore", "r=" + std::to_string(r), low});
        warm.points.push_back({"adarank:r=64,xi=0.05,warmup=100", "AdaRankGrad", "\u03be=0.05", low});
        // The library's global budget rank rule (rank_policy::budget) at GaLore r = 32's state
        // (budget=r32, each matrix's rank capped at 64) between GaLore r = 16 and r = 32: is the
        // energy-per-byte allocation across matrices better than one rank for all?
        // AdaRankGrad's per-layer xi rule beside them (the default adarank: xi 0.05, cap 32, whose ranks
        // stay near the cap, so its peak state is near GaLore r = 32's): the three rank rules at about
        // the same bytes, compared seed by seed.
        plan budget{"budget",
                    "GaLore at ranks 16 and 32, the budget rank rule with GaLore r=32's bytes (cap 64), and AdaRankGrad's per-layer xi "
                    "(xi 0.05, cap 32)",
                    {},
                    {{"adarank:r=64,rank=budget,budget=r32", "galore:r=32"}, {"adarank:r=64,rank=budget,budget=r32", "adarank"}, {"adarank", "galore:r=32"}}};
        for (int r : {16, 32}) budget.points.push_back({"galore:r=" + std::to_string(r), "GaLore", "r=" + std::to_string(r), low});
        budget.points.push_back({"adarank:r=64,rank=budget,budget=r32", "budget", "budget = GaLore r=32 bytes", low});
        budget.points.push_back({"adarank", "AdaRankGrad", "AdaRankGrad \u03be=0.05, cap 32", low});
        // Fine-tuning (needs --init and a target --corpus): every configuration of the issue
        // at its own lr, LoRA's family at r = 8, α = 16, dropout 0.05 (VeLoRA scale 0.1); GaLore
        // at two ranks to put AdaRankGrad (cap 32, ξ = 0.05) beside it at equal bytes.
        plan ft{"finetune",
                "fine-tuning the model of --init on the text of --corpus: full AdamW, LoRA, VeLoRA+LoRA, QLoRA, VeLoRA+QLoRA (r 8), "
                "GaLore at ranks 8 and 32, AdaRankGrad and VeLoRA+AdaRankGrad (cap 32), the budget rank rule at GaLore r=32's bytes (cap 64)",
                {},
                {{"velora+lora", "lora"}, {"velora+qlora", "qlora"}, {"qlora", "lora"}, {"adarank", "lora"}, {"adarank", "full"}, {"lora", "full"},
                 {"velora+adarank", "adarank"}, {"adarank:r=64,rank=budget,budget=r32", "galore:r=32"},
                 {"adarank:r=64,rank=budget,budget=r32", "adarank"}},
                1,
                true};
        // The grids are centred on a first sweep's bests at 200 steps (full 5e-4, LoRA 4e-3; GaLore and AdaRankGrad at
        // 2.5e-3, the lowest of {2.5e-3, 5e-3, 1e-2, 2e-2}: fine-tuning wants an eighth of pretraining's 2e-2).
        const std::vector<double> ft_full = {2.5e-4, 5e-4, 1e-3}, ft_lora = {2e-3, 4e-3, 8e-3}, ft_low = {1.25e-3, 2.5e-3, 5e-3};
        ft.points.push_back({"full", "full rank", "full", ft_full});
        ft.points.push_back({"lora", "LoRA", "LoRA", ft_lora});
        ft.points.push_back({"velora+lora", "LoRA", "VeLoRA+LoRA", ft_lora});
        ft.points.push_back({"qlora", "LoRA", "QLoRA", ft_lora});
        ft.points.push_back({"velora+qlora", "LoRA", "VeLoRA+QLoRA", ft_lora});
        ft.points.push_back({"galore:r=8", "GaLore", "GaLore r=8", ft_low});
        ft.points.push_back({"galore:r=32", "GaLore", "GaLore r=32", ft_low});
        ft.points.push_back({"adarank", "AdaRankGrad", "AdaRankGrad", ft_low});
        ft.points.push_back({"velora+adarank", "AdaRankGrad", "VeLoRA+AdaRankGrad", ft_low});
        // The budget rank rule (issue 23, item 7) at GaLore r = 32's bytes, each matrix capped at 64 (as the
        // budget plan): the same grid and seeds as GaLore and AdaRankGrad.
        ft.points.push_back({"adarank:r=64,rank=budget,budget=r32", "budget", "budget = GaLore r=32 bytes", ft_low});
        return std::vector<plan>{iso, warm, budget, ft};
    }();
    return all;
}

inline const plan* find_plan(const std::string& name) {
    for (const auto& p : plans())
        if (p.name == name) return &p;
    return nullptr;
}

inline std::string plan_names() {
    std::string s;
    for (const auto& p : plans()) s += (s.empty() ? "" : ", ") + p.name;
    return s;
}

// Text for SVG: the XML special characters escaped.
inline std::string xml_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        if (c == '&') out += "&amp;";
        else if (c == '<') out += "&lt;";
        else if (c == '>') out += "&gt;";
        else if (c == '"') out += "&quot;";
        else out += c;
    }
    return out;
}

inline std::string with_lr(const std::string& config, double lr) {
    char text[32];
    std::snprintf(text, sizeof text, "lr=%g", lr);
    return config + (config.find(':') == std::string::npos ? ":" : ",") + text;
}

struct tuning_run {
    double lr = 0, loss = 0;   ///< loss: final validation loss on the tuning split (inf: failed, e.g. diverged)
    std::string error;
};

struct point_result {
    point p;
    std::vector<tuning_run> tuning;
    double lr = std::numeric_limits<double>::quiet_NaN();   ///< chosen
    bool lr_at_edge = false;                                 ///< still on an edge after the extensions
    std::vector<std::uint64_t> seeds;
    std::vector<report::run> runs;   ///< one per seed
};

// The statistics of one point's seeds.
struct summary {
    double mean = NAN, sd = NAN, min = NAN, max = NAN;
    double peak_bytes = NAN, mean_bytes = NAN;   ///< optimizer state, means over the seeds
};

// The mean and the sample standard deviation (NaN for fewer than 2 values) of `v`, not empty.
inline std::pair<double, double> mean_sd(const std::vector<double>& v) {
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
    double ss = 0;
    for (double x : v) ss += (x - mean) * (x - mean);
    return {mean, v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : NAN};
}

inline bool usable(const report::run& r) { return r.error.empty() && !r.interrupted && std::isfinite(report::final_valid(r)); }

inline summary summarise(const point_result& pr) {
    summary s;
    std::vector<double> loss, peak, mean;
    for (const auto& r : pr.runs)
        if (usable(r)) {
            loss.push_back(report::final_valid(r));
            peak.push_back(static_cast<double>(r.peak_optimizer_bytes));
            mean.push_back(r.mean_optimizer_bytes);
        }
    if (loss.empty()) return s;
    std::tie(s.mean, s.sd) = mean_sd(loss);
    s.min = *std::min_element(loss.begin(), loss.end());
    s.max = *std::max_element(loss.begin(), loss.end());
    s.peak_bytes = mean_sd(peak).first;
    s.mean_bytes = mean_sd(mean).first;
    return s;
}

// Two-sided 95% critical values of Student's t for 1..30 degrees of freedom; beyond, 1.96 +
// 2.5/dof (within 0.003 of the exact value from 31 on).
inline double t_critical(std::size_t dof) {
    static const double t[] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
                               2.120,  2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042};
    return dof == 0 ? NAN : dof <= 30 ? t[dof - 1] : 1.96 + 2.5 / static_cast<double>(dof);
}

// A point against GaLore at its own peak optimizer state, paired by seed.
struct comparison {
    std::size_t seeds = 0;            ///< paired seeds inside GaLore's range of bytes
    double mean = NAN, sd = NAN;      ///< of the point's loss minus GaLore's interpolated loss
    std::string verdict;              ///< "lower", "higher", "tie" or why there is none
};

// GaLore's loss at `bytes` for `seed`: linear in log(bytes) between its two nearest ranks; NaN
// outside its range (no extrapolation).
inline double galore_at(const std::vector<point_result>& results, std::uint64_t seed, double bytes) {
    std::vector<std::pair<double, double>> curve;   // (log bytes, loss)
    for (const auto& pr : results) {
        if (pr.p.series != "GaLore") continue;
        for (std::size_t i = 0; i < pr.runs.size() && i < pr.seeds.size(); ++i)
            if (pr.seeds[i] == seed && usable(pr.runs[i]))
                curve.emplace_back(std::log(static_cast<double>(pr.runs[i].peak_optimizer_bytes)), report::final_valid(pr.runs[i]));
    }
    std::sort(curve.begin(), curve.end());
    const double x = std::log(bytes);
    for (std::size_t i = 0; i + 1 < curve.size(); ++i)
        if (curve[i].first <= x && x <= curve[i + 1].first) {
            const double span = curve[i + 1].first - curve[i].first;
            const double t = span > 0 ? (x - curve[i].first) / span : 0;
            return curve[i].second + t * (curve[i + 1].second - curve[i].second);
        }
    return NAN;
}

inline comparison compare_with_galore(const std::vector<point_result>& results, const point_result& pr) {
    comparison c;
    if (pr.p.series != "AdaRankGrad" && pr.p.series != "budget" && pr.p.series != "ablation") return c;
    std::vector<double> d;
    for (std::size_t i = 0; i < pr.runs.size() && i < pr.seeds.size(); ++i) {
        if (!usable(pr.runs[i])) continue;
        const double g = galore_at(results, pr.seeds[i], static_cast<double>(pr.runs[i].peak_optimizer_bytes));
        if (std::isfinite(g)) d.push_back(report::final_valid(pr.runs[i]) - g);
    }
    c.seeds = d.size();
    if (d.size() < 2) {
        c.verdict = d.empty() ? "outside GaLore's range" : "one seed: no test";
        return c;
    }
    std::tie(c.mean, c.sd) = mean_sd(d);
    const double half_width = t_critical(d.size() - 1) * c.sd / std::sqrt(static_cast<double>(d.size()));
    c.verdict = c.mean + half_width < 0 ? "lower" : c.mean - half_width > 0 ? "higher" : "tie";
    return c;
}

// The points of `results` by configuration (null when absent).
inline const point_result* find_point(const std::vector<point_result>& results, const std::string& config) {
    for (const auto& pr : results)
        if (pr.p.config == config) return &pr;
    return nullptr;
}

// `a` against `b`, paired by seed: the differences of their final validation losses.
struct pair_result {
    pair_spec spec;
    comparison c;
};
inline pair_result compare_pair(const std::vector<point_result>& results, const pair_spec& spec) {
    pair_result out{spec, {}};
    const point_result *a = find_point(results, spec.a), *b = find_point(results, spec.b);
    if (!a || !b) {
        out.c.verdict = "not run";
        return out;
    }
    std::vector<double> d;
    for (std::size_t i = 0; i < a->runs.size() && i < a->seeds.size(); ++i)
        for (std::size_t j = 0; j < b->runs.size() && j < b->seeds.size(); ++j)
            if (a->seeds[i] == b->seeds[j] && usable(a->runs[i]) && usable(b->runs[j]))
                d.push_back(report::final_valid(a->runs[i]) - report::final_valid(b->runs[j]));
    out.c.seeds = d.size();
    if (d.size() < 2) {
        out.c.verdict = d.empty() ? "no common seed" : "one seed: no test";
        return out;
    }
    std::tie(out.c.mean, out.c.sd) = mean_sd(d);
    const double half_width = t_critical(d.size() - 1) * out.c.sd / std::sqrt(static_cast<double>(d.size()));
    out.c.verdict = out.c.mean + half_width < 0 ? "lower" : out.c.mean - half_width > 0 ? "higher" : "tie";
    return out;
}

// Runs the plan. `train(config, seed, tuning)` trains one configuration (configs.hpp spelling,
// lr included) and returns its result; `stopped()` says that a signal asked to stop; `progress`
// is called after every point with what is done so far (the trainer writes its files there, so
// that a study that dies keeps its finished points).
inline std::vector<point_result> run(const plan& pl, const std::vector<std::uint64_t>& seeds,
                                     const std::function<report::run(const std::string&, std::uint64_t, bool)>& train,
                                     const std::function<bool()>& stopped, const std::function<void(const std::vector<point_result>&)>& progress) {
    std::vector<point_result> results;
    const std::uint64_t tuning_seed = seeds.front();
    for (const auto& p : pl.points) {
        if (stopped()) break;
        point_result pr;
        pr.p = p;
        auto tune = [&](double lr) {
            const report::run r = train(with_lr(p.config, lr), tuning_seed, true);
            tuning_run t{lr, usable(r) ? report::final_valid(r) : std::numeric_limits<double>::infinity(), r.error};
            pr.tuning.push_back(t);
            std::printf("study %s: tuning lr %g -> %.4f%s\n", p.config.c_str(), lr, t.loss, r.error.empty() ? "" : (" (" + r.error + ")").c_str());
            std::fflush(stdout);
        };
        for (double lr : p.lrs) {
            if (stopped()) break;
            tune(lr);
        }
        auto best = [&] {
            return std::min_element(pr.tuning.begin(), pr.tuning.end(), [](const tuning_run& a, const tuning_run& b) { return a.loss < b.loss; });
        };
        for (int extension = 0; extension <= pl.extensions && !stopped() && !pr.tuning.empty(); ++extension) {
            const auto [lo, hi] = std::minmax_element(pr.tuning.begin(), pr.tuning.end(), [](const tuning_run& a, const tuning_run& b) { return a.lr < b.lr; });
            const double chosen = best()->lr;
            const bool edge = std::isfinite(best()->loss) && (chosen == hi->lr || chosen == lo->lr);
            pr.lr_at_edge = edge;
            if (!edge || extension == pl.extensions) break;
            tune(chosen == hi->lr ? 2 * chosen : chosen / 2);
        }
        if (pr.tuning.empty() || stopped()) break;
        if (!std::isfinite(best()->loss)) {
            std::printf("study %s: every learning rate failed on the tuning split; skipped\n", p.config.c_str());
            results.push_back(pr);
            progress(results);
            continue;
        }
        pr.lr = best()->lr;
        for (std::uint64_t seed : seeds) {
            if (stopped()) break;
            pr.seeds.push_back(seed);
            pr.runs.push_back(train(with_lr(p.config, pr.lr), seed, false));
            std::printf("study %s: lr %g, seed %llu -> %.4f\n", p.config.c_str(), pr.lr, static_cast<unsigned long long>(seed),
                        report::final_valid(pr.runs.back()));
            std::fflush(stdout);
        }
        results.push_back(pr);
        progress(results);
    }
    return results;
}

inline void print(const std::vector<point_result>& results) {
    int width = 16;
    for (const auto& pr : results) width = std::max(width, static_cast<int>(pr.p.config.size()));
    std::printf("\n%-*s %-11s %8s %24s %12s %12s   %s\n", width, "configuration", "series", "lr", "val loss: mean +- sd", "state MiB", "(mean)",
                "vs GaLore at equal state (paired over seeds)");
    for (const auto& pr : results) {
        const summary s = summarise(pr);
        const comparison c = compare_with_galore(results, pr);
        char loss[64], versus[96] = "";
        std::snprintf(loss, sizeof loss, "%.4f +- %.4f", s.mean, s.sd);
        if (std::isfinite(c.mean)) std::snprintf(versus, sizeof versus, "%+.4f +- %.4f: %s", c.mean, c.sd, c.verdict.c_str());
        else if (!c.verdict.empty()) std::snprintf(versus, sizeof versus, "%s", c.verdict.c_str());
        std::printf("%-*s %-11s %8.3g%s %24s %12.3f %12.3f   %s\n", width, pr.p.config.c_str(), pr.p.series.c_str(), pr.lr, pr.lr_at_edge ? "*" : " ", loss,
                    s.peak_bytes / 1048576.0, s.mean_bytes / 1048576.0, versus);
    }
    std::printf("(lr: the best of the sweep on the tuning split; * the best is still on an edge of the grid after its extensions.\n"
                " val loss: final validation loss on the held-out 10%%, over the seeds. state: optimizer state, its peak during\n"
                " training and its mean over the steps, mean over the seeds. vs GaLore: loss minus GaLore's at the same peak state\n"
                " (interpolated between its ranks in log bytes, same seed), mean +- sd of the differences; lower/higher: the 95%%\n"
                " t-interval excludes 0, tie: it does not)\n");
}

inline void print_pairs(const std::vector<point_result>& results, const plan& pl);

// The fine-tuning view of a plan's results: the loss on the target before fine-tuning and after
// it, what each configuration trains and holds (means over the seeds), then the plan's pairs.
inline void print_fine_tuning(const std::vector<point_result>& results, const plan& pl) {
    int width = 16;
    for (const auto& pr : results) width = std::max(width, static_cast<int>(pr.p.config.size()));
    std::printf("\n%-*s %8s %8s %20s %10s %9s %9s %9s %9s %8s\n", width, "configuration", "lr", "before", "after: mean +- sd", "trainable",
                "weights", "activ.", "optim.", "peak RSS", "ms/step");
    auto mean_of = [](const point_result& pr, auto field) {
        double sum = 0;
        int n = 0;
        for (const auto& r : pr.runs)
            if (usable(r)) sum += static_cast<double>(field(r)), ++n;
        return n ? sum / n : NAN;
    };
    for (const auto& pr : results) {
        const summary s = summarise(pr);
        char after[48];
        std::snprintf(after, sizeof after, "%.4f +- %.4f", s.mean, s.sd);
        std::printf("%-*s %8.3g %8.4f %20s %10.0f %9.3f %9.3f %9.3f %9.1f %8.1f\n", width, pr.p.config.c_str(), pr.lr,
                    mean_of(pr, [](const report::run& r) { return r.valid_before; }), after,
                    mean_of(pr, [](const report::run& r) { return r.trainable_params; }),
                    mean_of(pr, [](const report::run& r) { return r.weights_bytes; }) / 1048576.0,
                    mean_of(pr, [](const report::run& r) { return r.activation_bytes; }) / 1048576.0,
                    mean_of(pr, [](const report::run& r) { return r.peak_optimizer_bytes; }) / 1048576.0,
                    mean_of(pr, [](const report::run& r) { return r.peak_rss_bytes; }) / 1048576.0,
                    mean_of(pr, [](const report::run& r) { return r.mean_step_ms; }));
    }
    std::printf("(before: the starting model's validation loss on the target (QLoRA's: its NF4 base's); after: at the end, over\n"
                " the seeds; trainable: weights stepped; weights: all of them as stored (NF4 packed), activations kept for backward,\n"
                " optimizer state at its peak, peak RSS of the training process (MiB) and time per step: means over the seeds)\n");
    print_pairs(results, pl);
}

// A plan's pairs (none: nothing printed).
inline void print_pairs(const std::vector<point_result>& results, const plan& pl) {
    if (pl.pairs.empty()) return;
    std::printf("\nPaired comparisons (loss of the first minus loss of the second, seed by seed):\n");
    int width = 28;
    for (const auto& spec : pl.pairs) width = std::max(width, static_cast<int>(spec.a.size() + spec.b.size() + 3));
    for (const auto& spec : pl.pairs) {
        const pair_result pr = compare_pair(results, spec);
        std::string name = spec.a + " - " + spec.b;
        if (std::isfinite(pr.c.mean))
            std::printf("  %-*s %+.4f +- %.4f over %zu seeds: %s\n", width, name.c_str(), pr.c.mean, pr.c.sd, pr.c.seeds, pr.c.verdict.c_str());
        else std::printf("  %-*s %s\n", width, name.c_str(), pr.c.verdict.c_str());
    }
    std::printf("(lower: the first is better, the 95%% t-interval of the mean difference excludes 0; higher: worse; tie: it does not)\n");
}

inline void write_json(std::ostream& out, const std::vector<point_result>& results, const std::string& plan_name, const std::string& settings) {
    out.precision(10);
    auto number = [&](double x) -> std::ostream& { return report::json_number(out, x); };
    out << "{\"settings\":" << settings << ",\"study\":\"" << report::json_escape(plan_name) << "\",\"points\":[";
    for (std::size_t k = 0; k < results.size(); ++k) {
        const auto& pr = results[k];
        const summary s = summarise(pr);
        const comparison c = compare_with_galore(results, pr);
        out << (k ? "," : "") << "{\"config\":\"" << report::json_escape(pr.p.config) << "\",\"series\":\"" << report::json_escape(pr.p.series) << "\",\"label\":\""
            << report::json_escape(pr.p.label) << "\",\"tuning\":[";
        for (std::size_t i = 0; i < pr.tuning.size(); ++i) {
            out << (i ? "," : "") << "{\"lr\":" << pr.tuning[i].lr << ",\"loss\":";
            number(pr.tuning[i].loss) << ",\"error\":\"" << report::json_escape(pr.tuning[i].error) << "\"}";
        }
        out << "],\"lr\":";
        number(pr.lr) << ",\"lr_at_edge\":" << (pr.lr_at_edge ? "true" : "false") << ",\"runs\":[";
        for (std::size_t i = 0; i < pr.runs.size(); ++i) {
            const auto& r = pr.runs[i];
            out << (i ? "," : "") << "{\"seed\":" << pr.seeds[i] << ",\"error\":\"" << report::json_escape(r.error) << "\",\"interrupted\":" << (r.interrupted ? "true" : "false")
                << ",\"steps\":" << r.steps
                << ",\"valid_loss\":";
            number(report::final_valid(r)) << ",\"valid_loss_before\":";
            number(r.valid_before) << ",\"trainable_params\":" << r.trainable_params << ",\"weights_bytes\":" << r.weights_bytes
                                   << ",\"activation_bytes\":" << r.activation_bytes << ",\"peak_rss_bytes\":" << r.peak_rss_bytes
                                   << ",\"mean_step_ms\":" << r.mean_step_ms << ",\"optimizer_bytes\":" << r.optimizer_bytes << ",\"peak_optimizer_bytes\":" << r.peak_optimizer_bytes
                                           << ",\"mean_optimizer_bytes\":" << r.mean_optimizer_bytes
                                           << ",\"optimizer_workspace_bytes\":" << r.optimizer_workspace_bytes << ",\"valid_curve\":{\"steps\":[";
            for (std::size_t j = 0; j < r.valid_steps.size(); ++j) out << (j ? "," : "") << r.valid_steps[j];
            out << "],\"loss\":[";
            for (std::size_t j = 0; j < r.valid_loss.size(); ++j) {
                out << (j ? "," : "");
                number(r.valid_loss[j]);
            }
            out << "]}}";
        }
        out << "],\"summary\":{\"mean\":";
        number(s.mean) << ",\"sd\":";
        number(s.sd) << ",\"min\":";
        number(s.min) << ",\"max\":";
        number(s.max) << ",\"peak_optimizer_bytes\":";
        number(s.peak_bytes) << ",\"mean_optimizer_bytes\":";
        number(s.mean_bytes) << "},\"vs_galore\":{\"seeds\":" << c.seeds << ",\"mean\":";
        number(c.mean) << ",\"sd\":";
        number(c.sd) << ",\"verdict\":\"" << report::json_escape(c.verdict) << "\"}}";
    }
    out << "],\"pairs\":[";
    if (const plan* pl = find_plan(plan_name))
        for (std::size_t k = 0; k < pl->pairs.size(); ++k) {
            const pair_result pr = compare_pair(results, pl->pairs[k]);
            out << (k ? "," : "") << "{\"a\":\"" << report::json_escape(pr.spec.a) << "\",\"b\":\"" << report::json_escape(pr.spec.b)
                << "\",\"seeds\":" << pr.c.seeds << ",\"mean\":";
            number(pr.c.mean) << ",\"sd\":";
            number(pr.c.sd) << ",\"verdict\":\"" << report::json_escape(pr.c.verdict) << "\"}";
        }
    out << "]}\n";
}

// The Pareto view: final validation loss against peak optimizer state (log scale). Every seed is
// a small dot, every point's mean a marker with a bar from its best to its worst seed; GaLore's
// ranks and AdaRankGrad's thresholds are joined in order of bytes. Structure for the tests
// (tests/demo_study.cmake): <g class="study-point" data-config=...> per point, <circle class="seed">
// per seed.
inline void write_svg(std::ostream& out, const std::vector<point_result>& results) {
    const double w = 960, h = 560, left = 70, right = 300, top = 40, bottom = 50;
    const double pw = w - left - right, ph = h - top - bottom;
    double xlo = 1e300, xhi = 0, ylo = 1e300, yhi = -1e300;
    for (const auto& pr : results)
        for (const auto& r : pr.runs)
            if (usable(r)) {
                xlo = std::min(xlo, static_cast<double>(r.peak_optimizer_bytes)), xhi = std::max(xhi, static_cast<double>(r.peak_optimizer_bytes));
                ylo = std::min(ylo, report::final_valid(r)), yhi = std::max(yhi, report::final_valid(r));
            }
    if (!(xlo <= xhi)) xlo = 1, xhi = 2, ylo = 0, yhi = 1;
    xlo /= 1.15, xhi *= 1.15;
    const double ypad = std::max(0.01, (yhi - ylo) * 0.06);
    ylo -= ypad, yhi += ypad;
    auto px = [&](double bytes) { return left + pw * (std::log(bytes) - std::log(xlo)) / (std::log(xhi) - std::log(xlo)); };
    auto py = [&](double loss) { return top + ph * (1 - (loss - ylo) / (yhi - ylo)); };
    const char* ablation_colours[] = {"#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
    std::map<std::string, std::string> colour_of = {{"full rank", "#1f77b4"}, {"GaLore", "#ff7f0e"}, {"AdaRankGrad", "#d62728"}, {"LoRA", "#2ca02c"}, {"budget", "#9467bd"}};
    std::size_t ablations = 0;
    auto colour = [&](const point_result& pr) {
        if (pr.p.series != "ablation") return colour_of[pr.p.series];
        auto& c = colour_of["ablation:" + pr.p.config];
        if (c.empty()) c = ablation_colours[ablations++ % 6];
        return c;
    };
    out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w << "\" height=\"" << h << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
        << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        << "<text x=\"" << left << "\" y=\"22\" font-size=\"14\">Final validation loss against peak optimizer state (each dot a seed; "
        << "bars: best to worst seed)</text>\n"
        << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph << "\" fill=\"none\" stroke=\"#888\"/>\n";
    for (double mib = 0.125; mib <= 1024; mib *= 2) {
        const double bytes = mib * 1048576.0;
        if (bytes < xlo || bytes > xhi) continue;
        out << "<line x1=\"" << px(bytes) << "\" x2=\"" << px(bytes) << "\" y1=\"" << top << "\" y2=\"" << top + ph << "\" stroke=\"#eee\"/>\n"
            << "<text x=\"" << px(bytes) << "\" y=\"" << top + ph + 16 << "\" text-anchor=\"middle\">" << mib << "</text>\n";
    }
    for (int i = 0; i <= 5; ++i) {
        const double v = ylo + (yhi - ylo) * i / 5;
        out << "<text x=\"" << left - 6 << "\" y=\"" << py(v) + 4 << "\" text-anchor=\"end\">" << std::round(v * 1000) / 1000 << "</text>\n";
    }
    out << "<text x=\"" << left + pw / 2 << "\" y=\"" << h - 12 << "\" text-anchor=\"middle\">optimizer state, peak during training (MiB, log scale)</text>\n"
        << "<text x=\"16\" y=\"" << top + ph / 2 << "\" transform=\"rotate(-90 16 " << top + ph / 2 << ")\" text-anchor=\"middle\">validation loss</text>\n";
    // Series lines through the means, in order of bytes.
    for (const char* series : {"GaLore", "AdaRankGrad"}) {
        std::vector<std::pair<double, double>> line;
        for (const auto& pr : results) {
            const summary s = summarise(pr);
            if (pr.p.series == series && std::isfinite(s.mean)) line.emplace_back(s.peak_bytes, s.mean);
        }
        std::sort(line.begin(), line.end());
        out << "<polyline class=\"series\" fill=\"none\" stroke-width=\"1.5\" stroke=\"" << colour_of[series] << "\" points=\"";
        for (const auto& [x, y] : line) out << px(x) << ',' << py(y) << ' ';
        out << "\"/>\n";
    }
    double legend_y = top + 10;
    for (const auto& pr : results) {
        const summary s = summarise(pr);
        const std::string c = colour(pr);
        out << "<g class=\"study-point\" data-config=\"" << xml_escape(pr.p.config) << "\">\n";
        for (const auto& r : pr.runs)
            if (usable(r))
                out << "<circle class=\"seed\" cx=\"" << px(static_cast<double>(r.peak_optimizer_bytes)) << "\" cy=\"" << py(report::final_valid(r))
                    << "\" r=\"2.5\" fill=\"" << c << "\" fill-opacity=\"0.5\"/>\n";
        if (std::isfinite(s.mean)) {
            const double x = px(s.peak_bytes);
            out << "<line x1=\"" << x << "\" x2=\"" << x << "\" y1=\"" << py(s.min) << "\" y2=\"" << py(s.max) << "\" stroke=\"" << c << "\"/>\n";
            if (pr.p.series == "ablation")
                out << "<rect x=\"" << x - 4.5 << "\" y=\"" << py(s.mean) - 4.5 << "\" width=\"9\" height=\"9\" fill=\"" << c << "\"/>\n";
            else
                out << "<circle cx=\"" << x << "\" cy=\"" << py(s.mean) << "\" r=\"5\" fill=\"" << c << "\"/>\n";
            if (pr.p.series != "ablation")
                out << "<text x=\"" << x + 7 << "\" y=\"" << py(s.mean) - 6 << "\" font-size=\"10\" fill=\"" << c << "\">" << xml_escape(pr.p.label)
                    << "</text>\n";
        }
        out << "<title>" << xml_escape(pr.p.config) << "</title>\n</g>\n";
        // Legend: a series once, every ablation by its label.
        const bool first_of_series = pr.p.series == "ablation" || std::find_if(results.begin(), results.end(), [&](const point_result& o) {
                                                                      return o.p.series == pr.p.series;
                                                                  }) == results.begin() + (&pr - results.data());
        if (first_of_series) {
            const std::string text = pr.p.series == "ablation" ? pr.p.label : pr.p.series;
            out << (pr.p.series == "ablation" ? "<rect x=\"" + std::to_string(w - right + 16) + "\" y=\"" + std::to_string(legend_y - 9) +
                                                    "\" width=\"9\" height=\"9\" fill=\"" + c + "\"/>\n"
                                              : "<circle cx=\"" + std::to_string(w - right + 20) + "\" cy=\"" + std::to_string(legend_y - 4) +
                                                    "\" r=\"5\" fill=\"" + c + "\"/>\n")
                << "<text x=\"" << w - right + 32 << "\" y=\"" << legend_y << "\" font-size=\"11\">" << xml_escape(text) << "</text>\n";
            legend_y += 18;
        }
    }
    out << "</svg>\n";
}

} // namespace lm::study
