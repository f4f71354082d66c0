#pragma once
// What the ranks of a data-parallel run agree on, and how they fail together: the error every
// rank raises at the same step (agreed_error), the abort of all ranks for any other, and the
// reductions of one number per rank (mean, maximum, whether to stop). In one process
// (velora::single_process) each is the identity, so the training loop is written once for both.
#include <velora/distributed/communicator.hpp>
#if defined(VELORA_DEMO_MPI)
#include <velora/distributed/mpi.hpp>
#endif

#include <algorithm>
#include <csignal>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "stop_signals.hpp"

namespace lm::trainer {

// An error that every rank of a data-parallel run raises at the same point of the same step: it
// comes from a reduced quantity (the loss, VeLoRA's shared v) or from an optimizer status, which
// the library makes the same on every rank. The run goes on with the next configuration. Any
// other error during data-parallel training may be one rank's alone while the others wait in a
// collective, so it aborts every rank (abort_all_ranks). In one process every error is "agreed".
struct agreed_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

template <class C>
inline constexpr bool one_process = std::is_same_v<C, velora::single_process>;

template <velora::communicator C>
[[noreturn]] void abort_all_ranks(C& comm, const std::string& what) {
    std::fprintf(stderr, "lm_train (rank %d of %d): %s; aborting all ranks\n", comm.rank(), comm.size(), what.c_str());
    std::fflush(stderr);
#if defined(VELORA_DEMO_MPI)
    if constexpr (std::is_same_v<C, velora::mpi_communicator>) MPI_Abort(comm.native(), 1);
#endif
    std::abort();
}

// The mean over the ranks of one number per rank (the identity in one process: x / 1 is x).
// (Not to be confused with adarank::mean_over_ranks, the library's gradient operator.)
template <velora::communicator C>
double mean_across_ranks_of(C& comm, double x) {
    comm.all_reduce_sum(std::span<double>(&x, 1));
    return x / comm.size();
}

// The largest of one number per rank (every rank's value in its own slot of a sum, which adds zeros only).
template <velora::communicator C>
double max_over_ranks(C& comm, double x) {
    std::vector<double> all(static_cast<std::size_t>(comm.size()), 0.0);
    all[static_cast<std::size_t>(comm.rank())] = x;
    comm.all_reduce_sum(std::span<double>(all));
    return *std::max_element(all.begin(), all.end());
}

// Whether to stop (a stop signal has reached some rank), the same answer on every rank; the
// signal that `interrupted` then holds is the same on every rank too (SIGINT before SIGTERM
// before SIGHUP when ranks received different ones). A collective: every rank calls it at the
// same points. In one process it reads `interrupted`.
template <velora::communicator C>
bool stop_agreed(C& comm) {
    if (!comm.any(interrupted != 0)) return false;
    if constexpr (!one_process<C>) {
        const int seen = interrupted;   // nonzero on some rank; never reset
        double got[3] = {seen == SIGINT ? 1.0 : 0.0, seen == SIGTERM ? 1.0 : 0.0, seen == SIGHUP ? 1.0 : 0.0};
        comm.all_reduce_sum(std::span<double>(got));
        interrupted = got[0] > 0 ? SIGINT : got[1] > 0 ? SIGTERM : SIGHUP;
    }
    return true;
}

} // namespace lm::trainer
