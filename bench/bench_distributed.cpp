// Data-parallel low-rank AdamW over MPI: what a step communicates and what it costs, against a
// full-gradient all-reduce (what DDP does). A plain MPI program, not Google Benchmark:
//
//   OMP_NUM_THREADS=1 mpirun -np 2 bench_distributed [--reps N] [--steps N] [--refresh-reps N] [--reduce-reps N]
//   (as root: mpirun --allow-run-as-root --oversubscribe -np 2 ...; bench/run_bench.sh does this)
//
// For each weight shape m×n (1024×4096, 4096×1024, 2048×2048) and two configurations,
//   galore r=128   optimizer_config::galore(128, interval): fixed rank 128, exact-SVD refresh
//   adaptive       optimizer_config{} (AdaRankGrad's default: adaptive rank capped at r_max = 128,
//                  warm-started randomized SVD)
// it measures, in one run:
//  (a) bytes per steady-state step, info(id).communicated_bytes, against the full gradient's
//      payload m·n·sizeof(float); the ratio must be exactly min(m,n)/r (the side is chosen by
//      side_policy::standard, so the basis is r×min(m,n) and the projected gradient r×max(m,n)).
//      The bytes of a refresh step are reported separately and checked against the count of
//      the all-reduces the refresh performs (energy pass, sketch products, projection; see
//      refresh_elements). Any mismatch makes the program exit non-zero.
//  (b) time per optimizer step on P ranks (mpi_communicator over MPI_COMM_WORLD, communication
//      included) against one rank stepping without a communicator: rank 0 times the 1-rank
//      baseline alone while the other ranks sleep in a polled barrier, then all ranks time the
//      P-rank step. Also "P local": every rank steps its own gradient at the same time without
//      a communicator, the P-rank step's compute alone, so that P ranks / P local is the cost of
//      the communication even where the ranks compete for cores with each other or with other
//      work (on a machine with fewer free cores than ranks, P local is slower than 1 rank). A
//      P-rank sample is the slowest rank's time (MPI_MAX) of a repetition; the three kinds of
//      sample are interleaved repetition by repetition; every figure is the median of the
//      repetitions. Steady state and refresh separately.
//  (c) time of an all-reduce of the full gradient (m·n floats: what DDP would do) against the
//      all-reduce of the projected gradient (r·max(m,n) floats), both through the library's
//      mpi_communicator (MPI_Allreduce at 2 ranks, reduce-scatter + all-gather from 3), with MPI_Allreduce of the full gradient
//      for reference (also median, interleaved).
//
// Gradients: rank p holds G_p = L·diag(1/√(1+j))·(R + 0.3·N_p) + 0.05·E_p (L: m×64, R: 64×n, both
// shared; N_p, E_p per rank; all standard Gaussian from fixed seeds), i.e. nearly rank 64 with a
// decaying spectrum, different on every rank, the same in every run. The gradient is fixed
// across steps (only the optimizer's work is timed). AdamW hyper-parameters: the library's
// defaults (lr 1e-3, β 0.9/0.999, ε 1e-6, no weight decay, α = 0.25).
//
// The steady-state optimizers refresh only at their first step here: galore's interval is
// 2^30, and the adaptive default refreshes when ‖Ĝ‖ has halved (never with a fixed gradient)
// or after 200 steps (more than are taken). The refresh rows use the same configurations with
// a refresh at every step (refresh_policy::every(1)); every step after the first is then a
// refresh (galore: exact SVD; adaptive: warm start, one power iteration).
#include <mpi.h>

#include <adarank/adarank.hpp>
#include <velora/distributed/mpi.hpp>
#include <velora/velora.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using T = float;
using backend_t = velora::eigen_backend<T>;
using optimizer_t = adarank::low_rank_adamw<backend_t>;
using buffer_t = velora::host_buffer<T>;
using velora::index_t;

constexpr index_t kRank = 128;                      // galore's fixed rank and the adaptive default's cap
constexpr index_t kNeverRefresh = index_t{1} << 30;  // galore's interval in the steady-state rows
constexpr index_t kStructure = 64;                  // inner dimension of the gradients' low-rank part

struct shape {
    index_t m, n;
};
constexpr shape kShapes[] = {{1024, 4096}, {4096, 1024}, {2048, 2048}};

struct options {
    int reps = 7;           // repetitions of every timing (median reported)
    int steps = 3;          // steady-state steps per repetition
    int refresh_reps = 3;   // refresh steps timed
    int reduce_reps = 21;   // repetitions of each all-reduce
};

struct method {
    const char* name;
    adarank::optimizer_config steady, refresh;
};

std::vector<method> methods() {
    adarank::optimizer_config adaptive;   // AdaRankGrad's default: adaptive rank in [1, 128]
    adarank::optimizer_config adaptive_refresh = adaptive;
    adaptive_refresh.refresh = adarank::refresh_policy::every(1);
    return {{"galore r=128", adarank::optimizer_config::galore(kRank, kNeverRefresh), adarank::optimizer_config::galore(kRank, 1)},
            {"adaptive r<=128", adaptive, adaptive_refresh}};
}

// ------------------------------------------------------------------------- helpers

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const std::size_t h = v.size() / 2;
    return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

double max_over(MPI_Comm comm, double x) {
    double y = 0;
    MPI_Allreduce(&x, &y, 1, MPI_DOUBLE, MPI_MAX, comm);
    return y;
}

// A barrier whose waiting ranks sleep instead of spinning (Open MPI polls busily), so that a
// rank timing alone does not share its core with a waiting one.
void idle_barrier(MPI_Comm comm) {
    MPI_Request request;
    MPI_Ibarrier(comm, &request);
    int done = 0;
    while (!done) {
        MPI_Test(&request, &done, MPI_STATUS_IGNORE);
        if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

void fill_gaussian(T* out, index_t n, std::uint64_t seed, double scale) {
    for (index_t i = 0; i < n; ++i) out[i] = static_cast<T>(scale * velora::gaussian_at(seed, static_cast<std::uint64_t>(i)));
}

std::uint64_t seed_of(const shape& s, std::uint64_t what, int rank) {
    return velora::mix64((static_cast<std::uint64_t>(s.m) << 40) ^ (static_cast<std::uint64_t>(s.n) << 16) ^ (what << 8) ^
                         static_cast<std::uint64_t>(rank + 1));
}

// Rank `rank`'s gradient (see the file comment).
buffer_t make_gradient(backend_t& b, const shape& s, int rank) {
    const index_t q = kStructure;
    buffer_t left(static_cast<std::size_t>(s.m * q)), right(static_cast<std::size_t>(q * s.n)), noise(static_cast<std::size_t>(q * s.n));
    fill_gaussian(left.data(), s.m * q, seed_of(s, 1, -1), 1.0);
    for (index_t i = 0; i < s.m; ++i)
        for (index_t j = 0; j < q; ++j) left[static_cast<std::size_t>(i * q + j)] *= static_cast<T>(1.0 / std::sqrt(1.0 + static_cast<double>(j)));
    fill_gaussian(right.data(), q * s.n, seed_of(s, 2, -1), 1.0);
    fill_gaussian(noise.data(), q * s.n, seed_of(s, 3, rank), 0.3);
    for (std::size_t i = 0; i < right.size(); ++i) right[i] += noise[i];
    buffer_t g(static_cast<std::size_t>(s.m * s.n));
    fill_gaussian(g.data(), s.m * s.n, seed_of(s, 4, rank), 0.05);
    b.gemm(velora::op::none, velora::op::none, T(1), velora::const_matrix_view<T>(left.data(), s.m, q, q),
           velora::const_matrix_view<T>(right.data(), q, s.n, s.n), T(1), velora::matrix_view<T>(g.data(), s.m, s.n, s.n));
    return g;
}

buffer_t make_weight(const shape& s) {
    buffer_t w(static_cast<std::size_t>(s.m * s.n));
    fill_gaussian(w.data(), s.m * s.n, seed_of(s, 5, -1), 0.02);
    return w;
}

velora::matrix_view<T> view(buffer_t& b, const shape& s) { return {b.data(), s.m, s.n, s.n}; }
velora::const_matrix_view<T> cview(const buffer_t& b, const shape& s) { return {b.data(), s.m, s.n, s.n}; }

// Elements a refresh step of an m×n parameter all-reduces, counted from the optimizer's code
// path (optimizer.hpp step_low_rank, rsvd.hpp subspace_finder::find, mean_over_ranks.hpp):
//   ‖Ḡ‖² (Ḡ's rows, reduced in blocks)                          m·n
//   exact SVD, len <= other: C = I·M                           k·other
//   exact SVD, len >  other: S = I·Mᵀ, then C = S·M            k·len + k·other
//   randomized, cold: S = Ω·Mᵀ, q × (S·M, ·Mᵀ), C = S·M         k·len + q·(k·other + k·len) + k·other
//   randomized, warm: q_warm × (S·M, ·Mᵀ), C = S·M              q_warm·(k·other + k·len) + k·other
//   the projection onto the new basis                          r·other
// with k the sketch size, r the new rank, M = G (left side: len = m) or Gᵀ (right: len = n).
std::uint64_t refresh_elements(const adarank::layer_info& info) {
    const auto m = static_cast<std::uint64_t>(info.rows), n = static_cast<std::uint64_t>(info.cols);
    const bool left = info.side == adarank::projection_side::left;
    const std::uint64_t len = left ? m : n, other = left ? n : m;
    const auto& rep = info.last_refresh;
    const auto k = static_cast<std::uint64_t>(rep.sketch), q = static_cast<std::uint64_t>(rep.power_iterations);
    std::uint64_t sketch = 0;
    if (rep.exact) sketch = len <= other ? k * other : k * len + k * other;
    else if (rep.warm) sketch = q * (k * other + k * len) + k * other;
    else sketch = k * len + q * (k * other + k * len) + k * other;
    return m * n + sketch + static_cast<std::uint64_t>(info.rank) * other;
}

// ------------------------------------------------------------------------- one shape, one method

struct result {
    shape s{};
    const char* name = "";
    adarank::projection_side side = adarank::projection_side::left;
    index_t rank = 0, refresh_rank = 0;
    std::uint64_t steady_bytes = 0, refresh_bytes = 0, refresh_expected = 0, first_bytes = 0, first_expected = 0;
    bool steady_ok = true, refresh_ok = true, first_ok = true, identical = true;
    bool refresh_exact = false, refresh_warm = false;
    index_t refresh_sketch = 0;
    double one_steady = 0, local_steady = 0, many_steady = 0, one_refresh = 0, local_refresh = 0, many_refresh = 0;   // seconds per step
    double reduce_full = 0, reduce_projected = 0, mpi_allreduce_full = 0;   // seconds
};

std::uint64_t full_bytes(const shape& s) { return static_cast<std::uint64_t>(s.m * s.n) * sizeof(T); }

// One sample: `steps` calls of `body` on rank 0 of `world` alone while the other ranks wait
// asleep; seconds per call on rank 0 (0 elsewhere).
template <class F>
double sample_alone(MPI_Comm world, int steps, F&& body) {
    int rank = 0;
    MPI_Comm_rank(world, &rank);
    idle_barrier(world);
    double seconds = 0;
    if (rank == 0) {
        const double t0 = now();
        for (int i = 0; i < steps; ++i) body();
        seconds = (now() - t0) / steps;
    }
    idle_barrier(world);
    return seconds;
}

// One sample: `steps` calls of `body` on every rank, started together; the slowest rank's
// seconds per call.
template <class F>
double sample_together(MPI_Comm world, int steps, F&& body) {
    MPI_Barrier(world);
    const double t0 = now();
    for (int i = 0; i < steps; ++i) body();
    return max_over(world, (now() - t0) / steps);
}

void require_ok(velora::status s, const char* what) {
    if (s != velora::status::ok && s != velora::status::degenerate_input)
        throw std::runtime_error(std::string(what) + ": the step returned status " + std::to_string(static_cast<int>(s)));
}

std::uint64_t hash_of(const buffer_t& w) { return velora::hash_bytes(std::as_bytes(std::span<const T>(w.data(), w.size()))); }

// Everything for one shape and one method. The 1-rank, the P-rank-without-communicator and the
// P-rank samples are interleaved repetition by repetition, so that a change in the machine's
// background load during the run affects all three alike.
result run_one(backend_t& b, const shape& s, const method& meth, const options& opt, MPI_Comm world) {
    velora::mpi_communicator comm(world);
    const int rank = comm.rank();
    result res;
    res.s = s;
    res.name = meth.name;
    const buffer_t grad = make_gradient(b, s, rank);
    const auto g = cview(grad, s);
    constexpr auto low_rank = adarank::param_kind::low_rank;

    // one: rank 0 alone, no communicator. local: every rank, no communicator (each its own
    // gradient: the compute of the P-rank step without its communication). many: every rank,
    // mpi_communicator. *_refresh: refreshing at every step.
    std::optional<optimizer_t> one, one_refresh;
    optimizer_t local(b, meth.steady), local_refresh(b, meth.refresh), many(b, meth.steady), many_refresh(b, meth.refresh);
    buffer_t w_one = make_weight(s), w_one_refresh = make_weight(s), w_local = make_weight(s), w_local_refresh = make_weight(s),
             w_many = make_weight(s), w_many_refresh = make_weight(s);
    optimizer_t::param_id id_one = 0, id_one_refresh = 0;
    if (rank == 0) {
        one.emplace(b, meth.steady);
        one_refresh.emplace(b, meth.refresh);
        id_one = one->add_parameter(s.m, s.n, low_rank);
        id_one_refresh = one_refresh->add_parameter(s.m, s.n, low_rank);
        require_ok(one->step(id_one, view(w_one, s), g), "1-rank first step");
        require_ok(one->step(id_one, view(w_one, s), g), "1-rank warm-up");
        require_ok(one_refresh->step(id_one_refresh, view(w_one_refresh, s), g), "1-rank first step");
    }
    const optimizer_t::param_id id_local = local.add_parameter(s.m, s.n, low_rank);
    require_ok(local.step(id_local, view(w_local, s), g), "local first step");
    require_ok(local.step(id_local, view(w_local, s), g), "local warm-up");
    const optimizer_t::param_id id_local_refresh = local_refresh.add_parameter(s.m, s.n, low_rank);
    require_ok(local_refresh.step(id_local_refresh, view(w_local_refresh, s), g), "local first step");
    const optimizer_t::param_id id = many.add_parameter(s.m, s.n, low_rank, comm);
    const optimizer_t::param_id id_refresh = many_refresh.add_parameter(s.m, s.n, low_rank, comm);

    // (a) The first step finds the subspace (a cold refresh): its bytes are checked too.
    require_ok(many.step(id, view(w_many, s), g, comm), "first step");
    const adarank::layer_info first = many.layer_state(id);
    res.first_bytes = first.communicated_bytes;
    res.first_expected = refresh_elements(first) * sizeof(T);
    res.first_ok = res.first_bytes == res.first_expected;
    res.side = first.side;
    res.rank = first.rank;
    const auto other = static_cast<std::uint64_t>(first.side == adarank::projection_side::left ? s.n : s.m);
    const auto shorter = static_cast<std::uint64_t>(std::min(s.m, s.n));
    const std::uint64_t steady = static_cast<std::uint64_t>(first.rank) * other * sizeof(T);
    const auto check_steady = [&] {
        const adarank::layer_info i = many.layer_state(id);
        // Exactly min(m,n)/r: full·r == bytes·min(m,n), in integers; and no refresh happened.
        res.steady_ok = res.steady_ok && i.communicated_bytes == steady &&
                        full_bytes(s) * static_cast<std::uint64_t>(i.rank) == i.communicated_bytes * shorter && i.refreshes == first.refreshes;
        res.steady_bytes = i.communicated_bytes;
    };
    require_ok(many.step(id, view(w_many, s), g, comm), "warm-up");
    check_steady();
    require_ok(many_refresh.step(id_refresh, view(w_many_refresh, s), g, comm), "first refresh step");

    // (b) steady-state steps.
    std::vector<double> t_one, t_local, t_many;
    for (int r = 0; r < opt.reps; ++r) {
        t_one.push_back(sample_alone(world, opt.steps, [&] { require_ok(one->step(id_one, view(w_one, s), g), "1-rank step"); }));
        t_local.push_back(sample_together(world, opt.steps, [&] { require_ok(local.step(id_local, view(w_local, s), g), "local step"); }));
        t_many.push_back(sample_together(world, opt.steps, [&] {
            require_ok(many.step(id, view(w_many, s), g, comm), "step");
            check_steady();
        }));
    }
    res.one_steady = median(t_one);
    res.local_steady = median(t_local);
    res.many_steady = median(t_many);
    res.identical = velora::same_on_all_ranks(comm, hash_of(w_many));   // the communicator's promise: the same bits everywhere

    // (b) refresh steps.
    std::vector<double> r_one, r_local, r_many;
    for (int r = 0; r < opt.refresh_reps; ++r) {
        r_one.push_back(sample_alone(world, 1, [&] { require_ok(one_refresh->step(id_one_refresh, view(w_one_refresh, s), g), "1-rank refresh"); }));
        r_local.push_back(sample_together(
            world, 1, [&] { require_ok(local_refresh.step(id_local_refresh, view(w_local_refresh, s), g), "local refresh"); }));
        r_many.push_back(sample_together(world, 1, [&] {
            require_ok(many_refresh.step(id_refresh, view(w_many_refresh, s), g, comm), "refresh step");
            const adarank::layer_info i = many_refresh.layer_state(id_refresh);
            res.refresh_bytes = i.communicated_bytes;
            res.refresh_expected = refresh_elements(i) * sizeof(T);
            res.refresh_ok = res.refresh_ok && res.refresh_bytes == res.refresh_expected && i.steps_in_subspace == 1;
            res.refresh_rank = i.rank;
            res.refresh_sketch = i.last_refresh.sketch;
            res.refresh_exact = i.last_refresh.exact;
            res.refresh_warm = i.last_refresh.warm;
        }));
    }
    res.one_refresh = median(r_one);
    res.local_refresh = median(r_local);
    res.many_refresh = median(r_many);
    res.identical = velora::same_on_all_ranks(comm, hash_of(w_many_refresh)) && res.identical;

    // (c) all-reduces of zeros (the values do not change the time; zeros cannot overflow),
    // interleaved like the steps.
    const std::size_t projected = static_cast<std::size_t>(res.rank) * static_cast<std::size_t>(std::max(s.m, s.n));
    std::vector<T> full(static_cast<std::size_t>(s.m * s.n), T(0)), small(projected, T(0));
    comm.all_reduce_sum(std::span<T>(full));   // warm-up (connections, buffers)
    comm.all_reduce_sum(std::span<T>(small));
    std::vector<double> c_full, c_small, c_mpi;
    for (int r = 0; r < opt.reduce_reps; ++r) {
        c_full.push_back(sample_together(world, 1, [&] { comm.all_reduce_sum(std::span<T>(full)); }));
        c_small.push_back(sample_together(world, 1, [&] { comm.all_reduce_sum(std::span<T>(small)); }));
        c_mpi.push_back(sample_together(world, 1, [&] {
            MPI_Allreduce(MPI_IN_PLACE, full.data(), static_cast<int>(full.size()), MPI_FLOAT, MPI_SUM, world);
        }));
    }
    res.reduce_full = median(c_full);
    res.reduce_projected = median(c_small);
    res.mpi_allreduce_full = median(c_mpi);
    return res;
}

// ------------------------------------------------------------------------- output

std::string shape_name(const shape& s) { return std::to_string(s.m) + "x" + std::to_string(s.n); }
double ms(double seconds) { return 1e3 * seconds; }

void print(const std::vector<result>& results, int ranks, const options& opt) {
    std::printf("\n(a) Bytes all-reduced per step by this rank (layer_info::communicated_bytes) vs a full-gradient all-reduce (m*n*4)\n");
    std::printf("%-10s %-16s %-5s %4s %12s %12s %10s %10s  %s\n", "shape", "method", "side", "r", "bytes/step", "full grad", "full/step",
                "min(m,n)/r", "check");
    for (const result& r : results) {
        const double ratio = static_cast<double>(full_bytes(r.s)) / static_cast<double>(r.steady_bytes);
        const double expected = static_cast<double>(std::min(r.s.m, r.s.n)) / static_cast<double>(r.rank);
        std::printf("%-10s %-16s %-5s %4td %12llu %12llu %10.4f %10.4f  %s\n", shape_name(r.s).c_str(), r.name,
                    std::string(adarank::to_string(r.side)).c_str(), r.rank, static_cast<unsigned long long>(r.steady_bytes),
                    static_cast<unsigned long long>(full_bytes(r.s)), ratio, expected, r.steady_ok ? "PASS (exact)" : "FAIL");
    }

    std::printf("\n    Refresh steps: bytes vs the count of the refresh's all-reduces (energy pass m*n + sketch products + projection)\n");
    std::printf("%-10s %-16s %-22s %4s %12s %12s %10s  %s\n", "shape", "method", "refresh", "r", "bytes/step", "expected", "step/full",
                "check");
    for (const result& r : results) {
        char what[32];
        std::snprintf(what, sizeof what, "%s k=%td", r.refresh_exact ? "exact SVD" : r.refresh_warm ? "warm rSVD" : "cold rSVD", r.refresh_sketch);
        std::printf("%-10s %-16s %-22s %4td %12llu %12llu %10.3f  %s\n", shape_name(r.s).c_str(), r.name, what, r.refresh_rank,
                    static_cast<unsigned long long>(r.refresh_bytes), static_cast<unsigned long long>(r.refresh_expected),
                    static_cast<double>(r.refresh_bytes) / static_cast<double>(full_bytes(r.s)), r.refresh_ok ? "PASS" : "FAIL");
        std::printf("%-10s %-16s %-22s %4td %12llu %12llu %10.3f  %s\n", "", "", "first step (cold)", r.rank,
                    static_cast<unsigned long long>(r.first_bytes), static_cast<unsigned long long>(r.first_expected),
                    static_cast<double>(r.first_bytes) / static_cast<double>(full_bytes(r.s)), r.first_ok ? "PASS" : "FAIL");
    }

    std::printf("\n(b) Time per optimizer step, median of %d repetitions (steady: %d steps each; refresh: 1 step each, %d repetitions)\n",
                opt.reps, opt.steps, opt.refresh_reps);
    std::printf("    1 rank: rank 0 alone, no communicator (the others asleep); %d ranks: mpi_communicator, slowest rank, communication\n",
                ranks);
    std::printf("    included; %d local: every rank steps its own gradient at the same time without a communicator (the compute alone)\n",
                ranks);
    const std::string p = std::to_string(ranks);
    const std::string local = p + " local", many = p + " ranks", vs_one = p + "r/1r", vs_local = p + "r/loc";
    std::printf("%-10s %-16s %8s %8s %8s %7s %7s | %9s %9s %9s %7s %7s  %s\n", "shape", "method", "1 rank", local.c_str(), many.c_str(),
                vs_one.c_str(), vs_local.c_str(), "refr 1r", ("refr " + p + "loc").c_str(), ("refr " + p + "r").c_str(), vs_one.c_str(),
                vs_local.c_str(), "same bits");
    for (const result& r : results)
        std::printf("%-10s %-16s %8.2f %8.2f %8.2f %7.3f %7.3f | %9.1f %9.1f %9.1f %7.3f %7.3f  %s\n", shape_name(r.s).c_str(), r.name,
                    ms(r.one_steady), ms(r.local_steady), ms(r.many_steady), r.many_steady / r.one_steady, r.many_steady / r.local_steady,
                    ms(r.one_refresh), ms(r.local_refresh), ms(r.many_refresh), r.many_refresh / r.one_refresh, r.many_refresh / r.local_refresh,
                    r.identical ? "yes" : "NO");
    std::printf("    (milliseconds per step)\n");

    std::printf("\n(c) All-reduce time on %d ranks, median of %d (velora::mpi_communicator: MPI_Allreduce at 2 ranks, reduce-scatter + all-gather from 3; plain MPI_Allreduce for reference)\n",
                ranks, opt.reduce_reps);
    std::printf("%-10s %4s %16s %16s %10s %18s\n", "shape", "r", "full grad ms", "projected ms", "full/proj", "MPI_Allreduce ms");
    for (const result& r : results) {
        if (std::strcmp(r.name, results.front().name) != 0) continue;   // one row per shape (galore's r = 128)
        std::printf("%-10s %4td %16.3f %16.3f %10.2f %18.3f\n", shape_name(r.s).c_str(), r.rank, ms(r.reduce_full), ms(r.reduce_projected),
                    r.reduce_full / r.reduce_projected, ms(r.mpi_allreduce_full));
    }
}

bool parse(int argc, char** argv, options& o) {
    for (int i = 1; i < argc; ++i) {
        const auto value = [&](int& target) {
            if (i + 1 >= argc) return false;
            target = std::atoi(argv[++i]);
            return target > 0;
        };
        bool ok = false;
        if (!std::strcmp(argv[i], "--reps")) ok = value(o.reps);
        else if (!std::strcmp(argv[i], "--steps")) ok = value(o.steps);
        else if (!std::strcmp(argv[i], "--refresh-reps")) ok = value(o.refresh_reps);
        else if (!std::strcmp(argv[i], "--reduce-reps")) ok = value(o.reduce_reps);
        if (!ok) return false;
    }
    return true;
}

} // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, ranks = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    options opt;
    if (!parse(argc, argv, opt)) {
        if (rank == 0)
            std::fprintf(stderr, "usage: mpirun -np 2 bench_distributed [--reps N] [--steps N] [--refresh-reps N] [--reduce-reps N] (N >= 1)\n");
        MPI_Finalize();
        return 2;
    }
    if (ranks < 2) {
        if (rank == 0) std::fprintf(stderr, "bench_distributed: run it on 2 or more ranks (mpirun -np 2 bench_distributed)\n");
        MPI_Finalize();
        return 2;
    }
    int failed = 0;
    try {
        backend_t b;
        if (rank == 0) {
            std::printf("bench_distributed: data-parallel low-rank AdamW on %d MPI ranks, float\n", ranks);
            std::printf("GEMM engine: %s; OpenMP threads per rank: %d; AdamW: library defaults (lr 1e-3, beta 0.9/0.999, eps 1e-6, wd 0, alpha 0.25)\n",
                        velora::cpu::has_blas ? (std::string("BLAS ") + velora::cpu::blas_name()).c_str() : "Eigen's product (no BLAS)",
#if defined(_OPENMP)
                        omp_get_max_threads()
#else
                        1
#endif
            );
            std::printf("gradients: L*diag(1/sqrt(1+j))*(R + 0.3*N_p) + 0.05*E_p, inner dimension %td, different on every rank\n", kStructure);
            std::fflush(stdout);
        }
        std::vector<result> results;
        for (const shape& s : kShapes)
            for (const method& m : methods()) {
                results.push_back(run_one(b, s, m, opt, MPI_COMM_WORLD));
                const result& r = results.back();
                failed |= !(r.steady_ok && r.refresh_ok && r.first_ok && r.identical);
                if (rank == 0) {
                    std::printf("  done %s %s\n", shape_name(s).c_str(), m.name);
                    std::fflush(stdout);
                }
            }
        if (rank == 0) print(results, ranks, opt);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_distributed (rank %d): %s\n", rank, e.what());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int any_failed = 0;
    MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_LOR, MPI_COMM_WORLD);
    if (rank == 0) std::printf("\n%s\n", any_failed ? "FAILED: a byte count or a cross-rank check did not hold" : "all checks passed");
    MPI_Finalize();
    return any_failed ? 1 : 0;
}
