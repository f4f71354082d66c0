// The demo trainer: pretrains a small byte-level decoder-only transformer (model.hpp) on a real
// text corpus from a Debian package (fortunes) five times, with identical seed, data and
// schedule, and compares what the papers compare:
//   adamw            dense AdamW, exact activations (the baseline)
//   galore           GaLore: fixed rank, refresh every 200 steps by exact SVD, moments reused
//   velora           VeLoRA records for the value and MLP-down inputs, dense AdamW
//   adarank          AdaRankGrad: adaptive rank, refresh on convergence, moments transported
//   velora+adarank   both; the optimizer consumes VeLoRA's factored gradients (no dense dW)
// The library is embedded as a user's trainer would: the host owns the tensors, the optimizer
// steps each parameter as soon as its gradient exists (gradient_sink), VeLoRA gradients reach
// it in factored form. Each configuration runs in its own process so that its peak RSS is its own.
//
// Data-parallel (a build with MPI, started by mpirun with more than one rank): --batch is the
// global batch and must be divisible by the number of ranks P; rank k trains on the k-th P-th of
// every batch's sequences and evaluates the k-th P-th of every validation batch. Each rank's loss
// is the mean over its own sequences, so its gradients are those of its own mean loss; with equal
// shares their mean over the ranks, which is what the optimizer steps with, is the gradient of
// the global batch's mean loss, i.e. what one process computes (no rescaling needed). Low-rank
// parameters step with the communicator (the ranks all-reduce only projected gradients and, at
// a refresh, sketches); the gradients of densely optimised parameters are kept until the end of
// backward and reduced together by low_rank_adamw::all_reduce_mean (bucketed), then stepped
// without it. VeLoRA's compressors get the v of the global first batch (share_first_batch_v).
// Reported losses are means over all ranks; only rank 0 prints and writes --json and --plot. MPI
// and fork do not mix: the configurations run one after another in each rank's own process, and
// their peak RSS is measured from a reset of the process's high-water mark (see print_dp_notes).
// A plain `lm_train` of an MPI build is an MPI singleton and behaves as without MPI.
//
//   lm_train [--preset NAME] [--corpus DIR] [--steps N] [--batch B] [--context L] [--d-model D] [--layers N]
//            [--heads H] [--ffn F] [--rank R] [--groups G] [--lr LR] [--lr-low-rank LR] [--eval-every N]
//            [--configs a,b,...] [--share-qkv] [--seed S] [--json PATH] [--plot PATH]
//   lm_train --estimate [--preset NAME] [--vocab V] [size flags] [--json PATH]
// (--config NAME is accepted as another spelling of --configs.)
// --preset sets the sizes of a paper's LLaMA model (presets in options.hpp); --estimate prints the
// memory of each configuration from memory.hpp, the accounting the model counts with, without
// training (docs/memory.md).
// (`lm_train --help` says what each flag means and its default; print_help in cli.hpp.)
// --share-qkv: q, k and v read one VeLoRA record of their common input (otherwise only v's
// input is recorded, and q, k still keep it).
// Before anything is trained: the sizes the flags imply must fit in physical memory (check_sizes),
// the folders of --json and --plot must be writable, the corpus must load. SIGINT, SIGTERM and
// SIGHUP stop the configuration in training after its current step (forwarded to its process);
// the table, --json and --plot then show what was trained and the exit status is 128 + the signal.
// A training process dies with lm_train, even on SIGKILL (PR_SET_PDEATHSIG). Data-parallel, a
// signal that reaches any rank stops every rank after the same step (agreed through the
// communicator's any()). --json and --plot
// are written at the end, into PATH.tmp-<pid> renamed onto PATH: an older file at PATH is
// replaced only by a complete one.
//
// This file is the program: main, the one-process and the data-parallel mains, and --study. What
// they call lives in a header of its own per concern, all in namespace lm::trainer:
//   options.hpp           the flags' values, the presets, what a configuration means with the flags
//   cli.hpp               parse and --help
//   size_check.hpp        whether a training process fits in physical memory
//   corpus.hpp            the corpus, its splits and batches
//   stop_signals.hpp      how SIGINT, SIGTERM and SIGHUP stop a run
//   data_parallel.hpp     what the ranks agree on (errors, means, the stop)
//   optimizer_sink.hpp    the optimizer stepping each parameter as its gradient arrives
//   training.hpp          the training of one configuration
//   training_process.hpp  the process it trains in (a forked child, or the rank's own)
//   output.hpp            the header, the settings JSON, the data-parallel notes, the output check
//   estimate.hpp          --estimate
#include <velora/distributed/communicator.hpp>
#include <velora/velora.hpp>
#if defined(VELORA_DEMO_MPI)
#include <velora/distributed/mpi.hpp>
#endif

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli.hpp"
#include "corpus.hpp"
#include "estimate.hpp"
#include "model_file.hpp"
#include "options.hpp"
#include "output.hpp"
#include "report.hpp"
#include "size_check.hpp"
#include "stop_signals.hpp"
#include "study.hpp"
#include "training_process.hpp"

namespace {

using namespace lm::trainer;

// --init: the model file, read and checked (envelope, shapes, values) against the flags' model
// before anything trains; every training process starts from it (initial_model).
void load_initial_model(const options& o, const corpus& data) {
    if (o.init.empty()) return;
    initial_model = read_model_file(o.init);
    check_model_shape(initial_model, o.model);
    if (!o.study.empty() && initial_model.corpus_fingerprint == corpus_fingerprint(data.train, data.valid) &&
        initial_model.corpus_bytes == data.train.size() + data.valid.size())
        throw std::runtime_error("--study " + o.study + " fine-tunes on another text than the model was trained on, but " + o.corpus +
                                 " is the text of model file '" + o.init + "' (give --corpus the target, e.g. " + target_corpus + ")");
}

// Under the header: the model fine-tuning starts from.
void print_initial_model(const options& o, const corpus& data) {
    if (o.init.empty()) return;
    const bool same = initial_model.corpus_fingerprint == corpus_fingerprint(data.train, data.valid);
    std::printf("fine-tuning from %s: %s%s\n", o.init.c_str(), initial_model.made_by.c_str(),
                same ? "\n(note: --corpus is the text this model was trained on: this continues its training, it is no fine-tuning task)" : "");
}

// The table: the fine-tuning one (loss before and after, what is trained) with --init.
void print_results(const std::vector<report::run>& runs, const options& o) {
    if (o.init.empty()) report::print_table(runs, o.batch * o.model.context, validation_note(o));
    else report::print_finetune_table(runs, o.batch * o.model.context, validation_note(o));
}

// --study: every run of the plan in a forked process of its own (run_isolated), the tuning runs
// on the tuning split. The files are rewritten after every finished point.
int run_study(const options& o, const corpus& data) {
    const corpus tuning = tuning_split(data);
    const lm::study::plan& plan = *lm::study::find_plan(o.study);
    std::printf("study %s: %s\n%zu points, learning rates swept on the tuning split (%zu train / %zu validation bytes), then seeds",
                plan.name.c_str(), plan.description.c_str(), plan.points.size(), tuning.train.size(), tuning.valid.size());
    for (auto seed : o.seeds) std::printf(" %llu", static_cast<unsigned long long>(seed));
    std::printf(" on the validation split\n");
    std::fflush(stdout);
    auto train = [&](const std::string& config, std::uint64_t seed, bool tune) {
        options one = o;
        one.configs = {config};
        one.seed = seed;
        one.split = tune ? "tune" : "valid";
        return run_isolated(config, one, tune ? tuning : data);
    };
    auto write = [&](const std::vector<lm::study::point_result>& results) {
        if (!o.json.empty())
            report::write_replacing(o.json, "--json", [&](std::ostream& out) { lm::study::write_json(out, results, plan.name, settings_json(o, &data, 1)); });
        if (!o.plot.empty()) report::write_replacing(o.plot, "--plot", [&](std::ostream& out) { lm::study::write_svg(out, results); });
    };
    const auto results = lm::study::run(plan, o.seeds, train, [] { return interrupted != 0; }, write);
    lm::study::print(results);
    if (plan.fine_tuning) lm::study::print_fine_tuning(results, plan);
    else lm::study::print_pairs(results, plan);
    if (!results.empty()) write(results);
    if (interrupted) {
        std::fprintf(stderr, "lm_train: interrupted by signal %d (%s); the table shows the finished points\n", static_cast<int>(interrupted),
                     strsignal(interrupted));
        return 128 + interrupted;
    }
    return 0;
}

// One process (also an MPI build started without mpirun, or with one rank): every configuration
// in a forked process of its own.
int main_one_process(int argc, char** argv) {
    try {
        const options o = parse(argc, argv);
        if (o.help) {
            print_help();
            return 0;
        }
        if (o.estimate) {
            check_output(o.json);
            print_estimate(o);
            if (!o.json.empty()) write_estimate_json(o);
            return 0;
        }
        check_sizes(o);
        install_stop_handlers();
        for (const std::string* path : {&o.json, &o.plot, &o.grad_rank_out, &o.grad_rank_plot, &o.save_model}) check_output(*path);
        const corpus data = load_checked_corpus(o);
        load_initial_model(o, data);
        print_header(o, data, 1);
        print_initial_model(o, data);
        if (!o.study.empty()) return run_study(o, data);
        std::vector<report::run> runs;
        for (const auto& name : o.configs) {
            if (interrupted) break;
            runs.push_back(run_isolated(name, o, data));
            if (!runs.back().error.empty()) std::fprintf(stderr, "%s: %s\n", name.c_str(), runs.back().error.c_str());
        }
        print_results(runs, o);
        if (!runs.empty()) {   // stopped before the first configuration: nothing to replace an older result with
            if (!o.json.empty()) report::write_json(o.json, runs, settings_json(o, &data, 1));
            if (!o.plot.empty()) report::write_svg(o.plot, runs);
        }
        if (interrupted) {
            std::fprintf(stderr, "lm_train: interrupted by signal %d (%s); the table shows what had been trained\n", static_cast<int>(interrupted),
                         strsignal(interrupted));
            return 128 + interrupted;   // the shell's convention for a command ended by a signal
        }
        for (const auto& r : runs)
            if (!r.error.empty()) return 1;
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "lm_train: %s\n", e.what());
        return 2;
    }
}

// Data-parallel over the ranks of `comm` (more than one). Every rank parses and checks the same
// flags and loads the corpus; they then agree whether to go on (a rank whose checks failed says
// why, rank 0 for all when they fail alike), and train the configurations one after another.
template <velora::communicator C>
int main_data_parallel(int argc, char** argv, C& comm) {
    const bool root = comm.rank() == 0;
    options o;
    corpus data;
    std::string error;
    try {
        o = parse(argc, argv);
        if (!o.study.empty()) throw std::invalid_argument("--study runs in one process (start it without mpirun)");
        if (o.grad_rank_every > 0) throw std::invalid_argument("--grad-rank-every runs in one process (start it without mpirun)");
        if (!o.help && !o.estimate) {
            if (o.batch % comm.size() != 0)
                throw std::invalid_argument("--batch " + std::to_string(o.batch) + " is not divisible by the " + std::to_string(comm.size()) +
                                            " ranks of this data-parallel run (--batch is the global batch; each rank trains on --batch / ranks of "
                                            "its sequences)");
            check_sizes(o, comm.size());
            if (root)   // only rank 0 writes them
                for (const std::string* path : {&o.json, &o.plot, &o.save_model}) check_output(*path);
            data = load_checked_corpus(o);
            load_initial_model(o, data);
        }
    } catch (const std::exception& e) {
        error = e.what();
    }
    if (comm.any(!error.empty())) {
        std::vector<std::byte> first(reinterpret_cast<const std::byte*>(error.data()), reinterpret_cast<const std::byte*>(error.data()) + error.size());
        velora::broadcast_blob(comm, first, 0);
        const std::string root_error(reinterpret_cast<const char*>(first.data()), first.size());
        if (root && !error.empty()) std::fprintf(stderr, "lm_train: %s\n", error.c_str());
        else if (!error.empty() && error != root_error) std::fprintf(stderr, "lm_train (rank %d of %d): %s\n", comm.rank(), comm.size(), error.c_str());
        return 2;
    }
    if (o.help) {
        if (root) print_help();
        return 0;
    }
    if (o.estimate) {   // one process's memory at --batch; rank 0 prints it
        if (!root) return 0;
        try {
            check_output(o.json);
            print_estimate(o);
            if (!o.json.empty()) write_estimate_json(o);
            return 0;
        } catch (const std::exception& e) {
            std::fprintf(stderr, "lm_train: %s\n", e.what());
            return 2;
        }
    }
    try {
        install_stop_handlers();
        if (root) {
            print_header(o, data, comm.size());
            print_initial_model(o, data);
        }
        std::fflush(stdout);
        std::vector<report::run> runs;
        bool rss_reset = true;
        for (const auto& name : o.configs) {
            if (stop_agreed(comm)) break;
            runs.push_back(run_in_process(name, o, data, comm, rss_reset));
            if (root && !runs.back().error.empty()) std::fprintf(stderr, "%s: %s\n", name.c_str(), runs.back().error.c_str());
        }
        const int stopped_by = stop_agreed(comm) ? static_cast<int>(interrupted) : 0;   // the same on every rank
        if (root) {
            print_results(runs, o);
            print_dp_notes(runs, o, comm.size(), rss_reset);
            if (!runs.empty()) {
                if (!o.json.empty()) report::write_json(o.json, runs, settings_json(o, &data, comm.size()));
                if (!o.plot.empty()) report::write_svg(o.plot, runs);
            }
        }
        if (stopped_by) {
            if (root)
                std::fprintf(stderr, "lm_train: interrupted by signal %d (%s); the table shows what had been trained\n", stopped_by, strsignal(stopped_by));
            return 128 + stopped_by;
        }
        for (const auto& r : runs)
            if (!r.error.empty()) return 1;
        return 0;
    } catch (const std::exception& e) {   // after training (writing the files): rank 0's own
        std::fprintf(stderr, "lm_train: %s\n", e.what());
        return 2;
    }
}

} // namespace

int main(int argc, char** argv) {
#if defined(VELORA_DEMO_MPI)
    // Always initialised (a plain `lm_train` is an MPI singleton of one rank); only the main
    // thread calls MPI, the backend's OpenMP threads do not.
    int provided = 0;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        std::fprintf(stderr, "lm_train: MPI_Init_thread failed\n");
        return 2;
    }
    int code = 0;
    {
        velora::mpi_communicator world(MPI_COMM_WORLD);
        code = world.size() > 1 ? main_data_parallel(argc, argv, world) : main_one_process(argc, argv);
    }
    MPI_Finalize();
    return code;
#else
    return main_one_process(argc, argv);
#endif
}
