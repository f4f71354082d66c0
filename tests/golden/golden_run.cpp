// Golden outputs for behaviour-preserving redesigns: fixed 60-step low_rank_adamw runs whose
// saved states and weights must not change by a bit when code is only moved. One line per run:
// its name, FNV-1a-64 of save_state() and of the final weights, the final rank, the refreshes
// and how often the rank changed.
//
// Runs: adam conventions galore and torch × parameters dense (24×40), low-rank left (32×80),
// low-rank right (80×32) and factored (a VeLoRA gradient of a 32×80 weight, G = 10), under an
// adaptive rank (ranks change) refreshed every 6 steps with weight decay; float and double.
// Built with MPI (golden_run_mpi) and started on 2 ranks it runs the data-parallel path, each
// rank with its own gradients, and rank 0 prints; without MPI, the single-process path.
//
// tests/golden/compare.sh builds this file against a base commit and against the working tree
// and compares the lines (and the demo's --json without timings).
#include <adarank/adarank.hpp>
#include <velora/backend/eigen.hpp>
#include <velora/core/serialize.hpp>

#ifdef VELORA_GOLDEN_MPI
#include <velora/distributed/mpi.hpp>
#endif

#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

namespace {

using velora::index_t;

// A deterministic stream of values in [-1, 1) (splitmix64), independent of the library's RNG.
struct stream {
    std::uint64_t state;
    double next() {
        std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        return static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0;
    }
};

// A gradient with a decaying spectrum along its rows whose decay changes from step to step (so
// the adaptive rank changes at refreshes).
template <class T>
std::vector<T> gradient(index_t rows, index_t cols, std::uint64_t seed, int step, int rank) {
    stream s{seed * 1000003u + static_cast<std::uint64_t>(step) * 7919u + static_cast<std::uint64_t>(rank) * 104729u};
    std::vector<T> g(static_cast<std::size_t>(rows * cols));
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j)
            g[static_cast<std::size_t>(i * cols + j)] = static_cast<T>(s.next() * std::exp(-(0.06 + 0.03 * (step % 10)) * double(i)) * (1.0 + 0.02 * step));
    return g;
}

// Parameter `id`'s layer_info: layer_state() where the optimizer has it, info() at a base commit
// that predates the rename (compare.sh builds this file against both), so that neither side
// calls a deprecated name.
template <class Opt>
adarank::layer_info layer_state_of(const Opt& opt, index_t id) {
    if constexpr (requires { opt.layer_state(id); }) return opt.layer_state(id);
    else return opt.info(id);
}

template <class T>
std::uint64_t hash_of(const std::vector<T>& v) {
    return velora::fnv1a64(std::as_bytes(std::span<const T>(v)));
}

enum class which { dense, left, right, factored };
constexpr const char* name_of(which w) {
    switch (w) {
    case which::dense: return "dense";
    case which::left: return "low_rank_left";
    case which::right: return "low_rank_right";
    case which::factored: return "factored";
    }
    return "?";
}

template <class T, class Comm>
void run(adarank::adam_convention convention, which w, Comm* comm, int rank, bool print) {
    velora::eigen_backend<T> cpu{1};
    adarank::optimizer_config cfg;
    cfg.adam.lr = 1e-2;
    cfg.adam.weight_decay = 0.05;
    cfg.adam.convention = convention;
    cfg.rank = adarank::rank_policy::adaptive(0.3, 1, 12);
    cfg.refresh = adarank::refresh_policy::every(6);
    adarank::low_rank_adamw<velora::eigen_backend<T>> opt(cpu, cfg);
    const index_t rows = w == which::dense ? 24 : w == which::right ? 80 : 32;
    const index_t cols = w == which::dense ? 40 : w == which::right ? 32 : 80;
    const auto kind = w == which::dense ? adarank::param_kind::dense : adarank::param_kind::low_rank;
    index_t id = 0;
    if constexpr (std::is_same_v<Comm, void>) id = opt.add_parameter(rows, cols, kind);
    else id = opt.add_parameter(rows, cols, kind, *comm);
    stream init{42};
    std::vector<T> weight(static_cast<std::size_t>(rows * cols));
    for (T& e : weight) e = static_cast<T>(init.next() * 0.1);
    const index_t groups = 10, s = cols / groups;
    std::vector<T> v(static_cast<std::size_t>(s));
    stream vs{7};
    double norm = 0;
    for (T& e : v) {
        e = static_cast<T>(vs.next());
        norm += double(e) * double(e);
    }
    for (T& e : v) e = static_cast<T>(double(e) / std::sqrt(norm));
    index_t last_rank = -1;
    int rank_changes = 0;   // the runs must exercise rank changes, not only refreshes
    for (int step = 0; step < 60; ++step) {
        velora::status st{};
        const velora::matrix_view<T> wv{weight.data(), rows, cols};
        if (w == which::factored) {
            const auto a = gradient<T>(rows, groups, 11, step, rank);
            const velora::factored_gradient<T> fg{velora::const_matrix_view<T>{a.data(), rows, groups}, v.data(), s, cols, T(0.5)};
            if constexpr (std::is_same_v<Comm, void>) st = opt.step(id, wv, fg);
            else st = opt.step(id, wv, fg, *comm);
        } else {
            const auto g = gradient<T>(rows, cols, 13, step, rank);
            const velora::const_matrix_view<T> gv{g.data(), rows, cols};
            if constexpr (std::is_same_v<Comm, void>) st = opt.step(id, wv, gv);
            else st = opt.step(id, wv, gv, *comm);
        }
        if (st != velora::status::ok) {
            std::fprintf(stderr, "golden_run: step %d of %s returned %d\n", step, name_of(w), static_cast<int>(st));
            std::exit(1);
        }
        if (layer_state_of(opt, id).rank != last_rank && last_rank >= 0) ++rank_changes;
        last_rank = layer_state_of(opt, id).rank;
    }
    const auto state = opt.save_state();
    if (print)
        std::printf("%s %s %s state=%016" PRIx64 " weights=%016" PRIx64 " rank=%ld refreshes=%ld rank_changes=%d\n", std::is_same_v<T, float> ? "float" : "double",
                    convention == adarank::adam_convention::torch ? "torch" : "galore", name_of(w), velora::fnv1a64(std::span<const std::byte>(state)),
                    hash_of(weight), static_cast<long>(layer_state_of(opt, id).rank), static_cast<long>(layer_state_of(opt, id).refreshes), rank_changes);
}

template <class T, class Comm>
void run_all(Comm* comm, int rank) {
    for (const auto convention : {adarank::adam_convention::galore, adarank::adam_convention::torch})
        for (const which w : {which::dense, which::left, which::right, which::factored}) run<T, Comm>(convention, w, comm, rank, rank == 0);
}

} // namespace

int main(int argc, char** argv) {
#ifdef VELORA_GOLDEN_MPI
    MPI_Init(&argc, &argv);
    {
        velora::mpi_communicator comm;
        if (comm.rank() == 0) std::printf("ranks=%d\n", comm.size());
        run_all<float>(&comm, comm.rank());
        run_all<double>(&comm, comm.rank());
    }
    MPI_Finalize();
#else
    (void)argc;
    (void)argv;
    std::printf("ranks=1 (no communicator)\n");
    run_all<float, void>(nullptr, 0);
    run_all<double, void>(nullptr, 0);
#endif
    return 0;
}
