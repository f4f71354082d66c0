#pragma once
// How a signal stops a run: SIGINT, SIGTERM and SIGHUP are recorded in `interrupted`, which the
// training loop, the list of configurations and the study read after each step, and forwarded to
// the training process in progress. A file of its own because every layer reads `interrupted`:
// the data-parallel agreement (data_parallel.hpp), the training process (training_process.hpp)
// and main.
#include <signal.h>
#include <sys/types.h>

#include <csignal>
#include <initializer_list>

namespace lm::trainer {

// The signal that stopped the run (SIGINT, SIGTERM or SIGHUP), 0 while none has. It is forwarded
// to the training process, so that `kill <trainer>` also stops the configuration in progress
// instead of leaving its process to train on alone (SIGKILL cannot be forwarded: the child
// asks the kernel for a SIGKILL of its own when the parent dies, see run_isolated).
inline volatile std::sig_atomic_t interrupted = 0;
inline volatile pid_t training_child = 0;
inline void on_stop_signal(int sig) {
    interrupted = sig;
    if (training_child > 0) kill(training_child, sig);
}

inline void install_stop_handlers() {
    struct sigaction sa{};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;   // the parent's read() of the pipe and waitpid() go on until the child has reported
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
}

} // namespace lm::trainer
