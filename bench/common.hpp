#pragma once
// Shared by the benchmark programs: deterministic inputs, the guard that turns an exception
// into a benchmark error, a console reporter that also remembers each benchmark's real time
// per iteration and counters (the "median" aggregate when repetitions produced one, otherwise
// the average of its runs), and the rows of the "Ratios (same run)" table that every program
// prints after its benchmarks. Nothing in a table is hard-coded: every value is computed from
// the benchmarks of the same run, and a row whose inputs did not run (filtered out, or
// failed) is left out.
#include <benchmark/benchmark.h>

#include <velora/core/rng.hpp>
#include <velora/core/view.hpp>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace bench {

/// Deterministic host inputs: out[i] = scale · velora::gaussian_at(seed, i).
template <class T>
void fill_gaussian(T* out, velora::index_t n, std::uint64_t seed, double scale) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (velora::index_t i = 0; i < n; ++i) out[i] = static_cast<T>(scale * velora::gaussian_at(seed, static_cast<std::uint64_t>(i)));
}

/// Runs `body` (which contains the timed loop); a thrown exception becomes a benchmark error.
template <class F>
void guarded(benchmark::State& state, F&& body) {
    try {
        body();
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
    }
}

class ratio_reporter : public benchmark::ConsoleReporter {
public:
    using benchmark::ConsoleReporter::ConsoleReporter;

    void ReportRuns(const std::vector<Run>& reports) override {
        for (const Run& run : reports) {
            if (run.error_occurred) continue;
            const std::string& name = run.run_name.function_name;
            const double seconds = run.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run.time_unit);
            auto& e = entries_[name];
            if (run.run_type == Run::RT_Aggregate) {
                if (run.aggregate_name == "median") {
                    e.median = seconds;
                    for (const auto& [key, counter] : run.counters) e.median_counters[key] = counter.value;
                }
            } else {
                e.sum += seconds;
                for (const auto& [key, counter] : run.counters) e.counter_sums[key] += counter.value;
                ++e.count;
            }
        }
        benchmark::ConsoleReporter::ReportRuns(reports);
    }

    /// Real seconds per iteration of benchmark `name` (its function name), if it ran.
    [[nodiscard]] std::optional<double> seconds(const std::string& name) const {
        const auto it = entries_.find(name);
        if (it == entries_.end()) return std::nullopt;
        if (it->second.median) return it->second.median;
        if (it->second.count > 0) return it->second.sum / it->second.count;
        return std::nullopt;
    }

    /// Counter `key` of benchmark `name`, if it ran and set it.
    [[nodiscard]] std::optional<double> counter(const std::string& name, const std::string& key) const {
        const auto it = entries_.find(name);
        if (it == entries_.end()) return std::nullopt;
        const entry& e = it->second;
        if (e.median) {
            const auto c = e.median_counters.find(key);
            if (c != e.median_counters.end()) return c->second;
            return std::nullopt;
        }
        const auto c = e.counter_sums.find(key);
        if (c == e.counter_sums.end() || e.count == 0) return std::nullopt;
        return c->second / e.count;
    }

private:
    struct entry {
        std::optional<double> median;
        std::map<std::string, double> median_counters;
        double sum = 0;
        std::map<std::string, double> counter_sums;
        int count = 0;
    };
    std::map<std::string, entry> entries_;
};

enum class goal { at_most, at_least, above, equal, info };

/// The table's title, an optional line about the run, then the column names.
inline void print_header(const char* title, const std::string& about = {}) {
    std::printf("\n%s\n", title);
    if (!about.empty()) std::printf("%s\n", about.c_str());
    std::printf("%-46s %12s %12s  %s\n", "quantity", "value", "target", "result");
}

/// One table row: the value against its target (PASS/MISS), or "info"; nothing when the value is missing.
inline void print_row(const char* label, std::optional<double> value, goal g, double target, const char* format, const char* note) {
    if (!value) return;
    char shown[48];
    std::snprintf(shown, sizeof shown, format, *value);
    char wanted[48];
    const char* result = "info";
    switch (g) {
    case goal::at_most: std::snprintf(wanted, sizeof wanted, "<= %g", target); break;
    case goal::at_least: std::snprintf(wanted, sizeof wanted, ">= %g", target); break;
    case goal::above: std::snprintf(wanted, sizeof wanted, "> %g", target); break;
    case goal::equal: std::snprintf(wanted, sizeof wanted, "== %.0f", target); break;
    case goal::info: std::snprintf(wanted, sizeof wanted, "-"); break;
    }
    if (g != goal::info) {
        const double v = *value;
        const bool pass = g == goal::at_most ? v <= target : g == goal::at_least ? v >= target : g == goal::above ? v > target : v == target;
        result = pass ? "PASS" : "MISS";
    }
    if (*note) std::printf("%-46s %12s %12s  %s  (%s)\n", label, shown, wanted, result, note);
    else std::printf("%-46s %12s %12s  %s\n", label, shown, wanted, result);
}

inline std::optional<double> ratio(std::optional<double> num, std::optional<double> den) {
    if (!num || !den || *den <= 0) return std::nullopt;
    return *num / *den;
}

/// The "omp_threads" line of the benchmark context: how many threads the library's parts use.
inline void add_thread_context() {
#if defined(_OPENMP)
    benchmark::AddCustomContext("omp_threads", std::to_string(omp_get_max_threads()));
#else
    benchmark::AddCustomContext("omp_threads", "none (built without OpenMP)");
#endif
}

/// Every program's epilogue: runs the selected benchmarks through a ratio_reporter (coloured on a
/// terminal), then prints the program's "Ratios (same run)" table from it; returns main's status.
template <class PrintRatios>
int run_and_print_ratios(PrintRatios&& print_ratios) {
    const bool color = ::isatty(STDOUT_FILENO) != 0;
    ratio_reporter reporter(color ? benchmark::ConsoleReporter::OO_Color : benchmark::ConsoleReporter::OO_None);
    benchmark::RunSpecifiedBenchmarks(&reporter);
    std::cout.flush();
    print_ratios(reporter);
    benchmark::Shutdown();
    return 0;
}

} // namespace bench
