#pragma once
// The process a configuration trains in. In one process each configuration trains in a forked
// child of its own (run_isolated), so that its peak RSS is its own and a crash is its row's error;
// MPI and fork do not mix, so data-parallel each rank trains them one after another in its own
// process (run_in_process).
#include <velora/distributed/communicator.hpp>

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <csignal>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

#include "corpus.hpp"
#include "data_parallel.hpp"
#include "options.hpp"
#include "report.hpp"
#include "stop_signals.hpp"
#include "training.hpp"

namespace lm::trainer {

// Runs `train_one` in a child process and reads its result back through a pipe. The child stops
// with the parent: forwarded SIGINT/SIGTERM/SIGHUP end its loop after the current step (it
// reports what it trained), and it is killed outright when the parent dies any other way.
inline report::run run_isolated(const std::string& name, const options& o, const corpus& data) {
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe() failed");
    std::fflush(nullptr);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) throw std::runtime_error("fork() failed");
    if (pid == 0) {
        // Dies with lm_train, however lm_train ends (SIGKILL cannot be caught and forwarded), so
        // that no orphan trains on at full CPU: the kernel sends SIGKILL when the thread that
        // forked ends, and that is lm_train's main thread, which lives until exit. A parent that
        // died before prctl took effect shows as a different getppid() (this process was
        // reparented). Elsewhere than Linux only the forwarded signals stop it.
#if defined(__linux__)
        prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
        if (getppid() != parent) _exit(1);
        close(fds[0]);
        int code = 0;
        report::run r;
        try {
            velora::single_process one;
            train_one(name, o, data, r, one);
        } catch (const std::exception& e) {
            r.error = e.what();
            code = 1;
        }
        const std::string text = report::serialize(r);
        std::size_t done = 0;
        while (done < text.size()) {
            const ssize_t n = write(fds[1], text.data() + done, text.size() - done);
            if (n <= 0) break;
            done += static_cast<std::size_t>(n);
        }
        close(fds[1]);
        _exit(code);
    }
    close(fds[1]);
    training_child = pid;
    if (interrupted) kill(pid, interrupted);   // a signal between main's check and here was not forwarded
    std::string text;
    char buf[65536];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    training_child = 0;
    report::run r = report::deserialize(text);
    if (r.name.empty()) r.name = name;
    if (r.error.empty() && WIFSIGNALED(status)) r.error = "training process killed by signal " + std::to_string(WTERMSIG(status));
    else if (r.error.empty() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) r.error = "training process failed";
    return r;
}

// Data-parallel: trains one configuration in this process (every rank calls it for the same
// configurations in the same order). Its peak RSS is measured from a reset of the process's
// high-water mark after the allocator has returned what it can of earlier configurations.
template <velora::communicator C>
report::run run_in_process(const std::string& name, const options& o, const corpus& data, C& comm, bool& rss_reset) {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
    rss_reset = report::reset_peak_rss() && rss_reset;
    report::run r;
    r.name = name;
    try {
        train_one(name, o, data, r, comm);
    } catch (const agreed_error& e) {
        r.error = e.what();
    } catch (const std::exception& e) {   // setting up (model, optimizer, registration) failed, maybe on this rank only
        abort_all_ranks(comm, name + ": " + e.what());
    }
    return r;
}

} // namespace lm::trainer
