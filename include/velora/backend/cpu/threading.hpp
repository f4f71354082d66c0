#pragma once
/// \file
/// How the CPU backend cuts work across OpenMP threads without letting the thread count reach
/// the bits of a result.
///
/// Work is cut into parts by its shape alone (fixed_parts) and a reduction adds its parts'
/// partials in part order, so the result is the same with 1 thread or 64; parts are handed to
/// at most `threads` OpenMP threads in a static schedule. Without OpenMP everything runs on
/// the calling thread.
#include <Eigen/Core>

#include <algorithm>
#include <utility>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../../core/view.hpp"

namespace velora::cpu {

/// Elements below which a loop is not worth waking threads for.
inline constexpr index_t parallel_threshold = index_t{1} << 15;

/// The most parts a shape is ever cut into: keeps up to 16 threads busy and balances 2, 4 or 8
/// evenly.
inline constexpr int max_parts = 16;

/// `requested` threads capped by what OpenMP offers; 0 = all of them (1 without OpenMP).
inline int resolve_threads(int requested) {
#if defined(_OPENMP)
    const int available = omp_get_max_threads();
#else
    const int available = 1;
#endif
    return std::max(1, requested > 0 ? std::min(requested, available) : available);
}

/// [first, last) of part `part` when `count` items are cut into `parts` contiguous chunks.
inline std::pair<index_t, index_t> part_range(index_t count, int parts, int part) {
    const index_t chunk = (count + parts - 1) / parts;
    const index_t first = std::min<index_t>(count, part * chunk);
    return {first, std::min<index_t>(count, first + chunk)};
}

/// Parts for `rows` rows carrying `work` elements: a function of the shape only.
inline int fixed_parts(index_t rows, index_t work) {
    return work > parallel_threshold ? static_cast<int>(std::min<index_t>(max_parts, rows)) : 1;
}

/// f(part) for part < parts, on up to `threads` OpenMP threads (static schedule).
template <class F>
void parallel_for_parts(int threads, int parts, F&& f) {
    const int team = std::min(threads, parts);
    if (team <= 1) {
        for (int part = 0; part < parts; ++part) f(part);
        return;
    }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(team)
#endif
    for (int part = 0; part < parts; ++part) f(part);
}

/// f(r) for every row r < rows, rows cut by fixed_parts.
template <class F>
void for_each_row(int threads, index_t work, index_t rows, F&& f) {
    const int parts = fixed_parts(rows, work);
    parallel_for_parts(threads, parts, [&](int part) {
        const auto [first, last] = part_range(rows, parts, part);
        for (index_t r = first; r < last; ++r) f(r);
    });
}

/// Index of the calling thread within the current team (0 outside one).
inline int thread_index() noexcept {
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/// Makes Eigen run on the calling thread for the scope's lifetime.
///
/// Eigen's blocked algorithms (its products, Householder QR, the eigensolver's
/// back-transformation) use omp_get_max_threads() threads and choose their blocking by that
/// count, which changes their bits with the number of threads. omp_set_num_threads changes only
/// the calling thread's setting (inherited by the teams it starts), restored on exit. A host
/// that fixed Eigen's count with Eigen::setNbThreads(n > 1) overrides this (docs/architecture.md).
struct serial_eigen_scope {
#if defined(_OPENMP)
    int saved = omp_get_max_threads();
    serial_eigen_scope() noexcept { omp_set_num_threads(1); }
    ~serial_eigen_scope() { omp_set_num_threads(saved); }
#else
    serial_eigen_scope() noexcept = default;
#endif
    serial_eigen_scope(const serial_eigen_scope&) = delete;
    serial_eigen_scope& operator=(const serial_eigen_scope&) = delete;
};

} // namespace velora::cpu
