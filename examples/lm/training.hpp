#pragma once
// The training of one configuration: the model, the optimizer and the loop over the steps, with
// what the results record (losses, ranks, memory, time). The same code trains in one process and
// on every rank of a data-parallel run; the process it runs in is training_process.hpp's.
#include <adarank/adarank.hpp>
#include <velora/distributed/communicator.hpp>
#include <velora/distributed/shared_v.hpp>
#include <velora/velora.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "configs.hpp"
#include "corpus.hpp"
#include "data_parallel.hpp"
#include "gradient_rank.hpp"
#include "memory.hpp"
#include "model.hpp"
#include "model_file.hpp"
#include "optimizer_sink.hpp"
#include "options.hpp"
#include "report.hpp"

namespace lm::trainer {

// The model of --init, read and checked by main before any training process starts (each
// process starts from it); empty weights without --init.
inline model_file initial_model;

// How a saved model was made, for its file: the configuration, the run, the corpus and the loss.
inline std::string made_by(const std::string& name, const options& o, const corpus& data, const report::run& r) {
    char loss[64];
    std::snprintf(loss, sizeof loss, "%.4f", r.valid_loss.empty() ? NAN : r.valid_loss.back());
    std::string text = "lm_train --configs " + name + " --steps " + std::to_string(r.steps) + " --seed " + std::to_string(o.seed) + " --batch " +
                       std::to_string(o.batch) + " on " + o.corpus + " (" + std::to_string(data.train.size()) + " training bytes): validation loss " + loss;
    if (!o.init.empty()) text += "; started from " + o.init + " (" + initial_model.made_by + ")";
    return text;
}

// Trains one configuration; fills `r`. In one process (C = single_process) it runs in a child
// process (run_isolated); data-parallel in each rank's own process (run_in_process), where every
// collective below is called by all ranks in the same order.
template <velora::communicator C>
void train_one(const std::string& name, const options& o, const corpus& data, report::run& r, C& comm) {
    const index_t share = o.batch / comm.size();   // this rank's sequences of every batch
    const std::size_t first = static_cast<std::size_t>(comm.rank() * share * (o.model.context + 1));   // its first token
    const bool root = comm.rank() == 0;
    B backend;
    const lm::initial_weights* init = o.init.empty() ? nullptr : &initial_model.weights;
    lm::transformer<T> model(backend, o.model, velora_for(name, o), o.seed, share, adapters_for(name, o), init);
    if constexpr (!one_process<C>) {
        // Every rank projects onto the v of the global first batch (what one process computes).
        model.set_first_compress_hook([&](lm::transformer<T>::compressor_type& comp, velora::const_matrix_view<T> x) {
            const velora::status s = velora::share_first_batch_v(backend, comp, x, comm);
            if (s == velora::status::degenerate_input) {   // all first batches are zero: the fallback v one process would use
                const std::vector<T> ones(static_cast<std::size_t>(comp.subtoken_size()), T(1));
                comp.set_v(ones);
            } else if (s != velora::status::ok) {
                throw agreed_error("the first batch's VeLoRA input is not finite (status " + std::string(velora::to_string(s)) + "): training diverged");
            }
        });
    }
    auto& params = model.parameters();
    const lm::configs::config config = config_of(name, o);
    adarank::optimizer_config optimizer_config = config.optimizer;
    if (config.budget_rank > 0) {   // budget=rN: GaLore's state at rank N on these shapes
        std::vector<std::tuple<velora::index_t, velora::index_t, bool>> shapes;
        for (const auto& p : params) shapes.emplace_back(p.rows, p.cols, uses_low_rank(name, o) && p.projection);
        optimizer_config.rank.budget_bytes = lm::configs::budget_bytes_at_rank(config, config.budget_rank, shapes, sizeof(T));
    }
    adarank::low_rank_adamw<B> opt(backend, optimizer_config);
    std::vector<adarank::low_rank_adamw<B>::param_id> ids;
    for (const auto& p : params) {
        if (!p.trainable) {   // frozen (LoRA): never registered, never stepped
            ids.push_back(-1);
            continue;
        }
        const auto kind = uses_low_rank(name, o) && p.projection ? adarank::param_kind::low_rank : adarank::param_kind::dense;
        if constexpr (one_process<C>) ids.push_back(opt.add_parameter(p.rows, p.cols, kind));
        else ids.push_back(opt.add_parameter(p.rows, p.cols, kind, comm));   // checks that every rank registers the same
        if (kind == adarank::param_kind::low_rank) r.rank_names.push_back(p.name);
    }
    if (config.bf16_weights)   // weights=bf16: the initial weights as a bf16 host would hold them (rounded to nearest)
        for (auto& p : params)
            for (index_t k = 0; k < p.rows * p.cols; ++k) p.data[k] = velora::to_arithmetic<T>(velora::storage_cast<velora::bfloat16>::from(p.data[k]));
    optimizer_sink<C> sink(backend, opt, params, ids, comm, config.bf16_weights);
    lm::gradient_rank::recorder grad_ranks(o.grad_rank_every);
    std::vector<int> tokens, valid_tokens;
    auto validation_loss = [&] {
        double sum = 0;
        for (int v = 0; v < o.valid_batches; ++v) {
            make_batch(data.valid, o.batch, o.model.context, validation_seed, static_cast<std::uint64_t>(v), valid_tokens);
            sum += model.evaluate(valid_tokens.data() + first, share);
        }
        return mean_across_ranks_of(comm, sum / o.valid_batches);
    };
    // The low-rank parameters' ranks after `step`, recorded after the first step, after every
    // step that changed one of them (a refresh that chose another rank) and after the last one:
    // each rank holds from its step to the next, which is how the plot draws them.
    auto record_ranks = [&](int step, bool always) {
        std::vector<double> ranks;
        for (std::size_t i = 0; i < params.size(); ++i)
            if (ids[i] >= 0 && opt.layer_state(ids[i]).low_rank) ranks.push_back(static_cast<double>(opt.layer_state(ids[i]).rank));
        if (ranks.empty() || (!always && !r.ranks.empty() && ranks == r.ranks.back())) return;
        if (!r.rank_steps.empty() && r.rank_steps.back() == step) return;   // the last step was also a change
        r.rank_steps.push_back(step);
        r.ranks.push_back(ranks);
    };
    // What the table reports beside the activations: the weights (from the model's parameters)
    // and, for the --json breakdown, the activations by kind (counted by the model).
    r.weights_bytes = model.weight_bytes();
    r.trainable_params = model.trainable_elements();
    // memory.hpp's optimizer state at the ranks the optimizer holds: it must be what the optimizer
    // reports, or the estimator (--estimate) would print state no run holds.
    auto check_state_formula = [&] {
        lm::memory::count counted;
        for (std::size_t i = 0; i < params.size(); ++i) {
            if (!params[i].trainable) continue;
            const auto& info = opt.layer_state(ids[i]);
            const lm::memory::parameter_shape shape{params[i].name.c_str(), params[i].rows, params[i].cols, params[i].matrix, params[i].projection};
            const auto& oc = opt.config();
            counted += lm::memory::state_bytes(shape, info.low_rank ? info.rank : 0, sizeof(T), lm::configs::storage_of(oc));
        }
        if (counted.v != opt.state_bytes())
            throw agreed_error("internal error: examples/lm/memory.hpp counts " + std::to_string(counted.v) +
                               " bytes of optimizer state, low_rank_adamw::state_bytes() reports " + std::to_string(opt.state_bytes()));
    };
    r.name = name;
    double seconds = 0;
    const double tokens_per_step = static_cast<double>(o.batch * o.model.context);   // all ranks' tokens
    // Whatever ends the loop (the last step, Ctrl-C, divergence), the row gets its measurements.
    // Data-parallel, a collective (the peak RSS is the largest rank's, the stop is agreed).
    auto finish = [&] {
        if (root && isatty(2)) std::fprintf(stderr, "\n");
        r.optimizer_bytes = opt.state_bytes();
        r.optimizer_workspace_bytes = opt.workspace_bytes();
        if (r.steps > 0) record_ranks(r.steps, true);   // the ranks at the end (once, if the last step changed them)
        r.mean_step_ms = r.steps ? 1e3 * seconds / r.steps : 0;
        r.tokens_per_second = seconds > 0 ? tokens_per_step * r.steps / seconds : 0;
        r.peak_rss_bytes = static_cast<std::size_t>(max_over_ranks(comm, static_cast<double>(report::peak_rss_bytes())));
        r.communicated_bytes = sink.communicated_bytes();
        r.interrupted = stop_agreed(comm);
        if (o.grad_rank_every > 0 && root) {
            report::write_replacing(o.grad_rank_out, "--grad-rank-out", [&](std::ostream& out) { grad_ranks.write_json(out, name); });
            if (!o.grad_rank_plot.empty())
                report::write_replacing(o.grad_rank_plot, "--grad-rank-plot", [&](std::ostream& out) { grad_ranks.write_svg(out, name); });
        }
    };
    try {
        if (!o.init.empty()) {   // the starting model's loss (with QLoRA: its NF4 base's)
            r.valid_before = validation_loss();
            if (root) std::fprintf(stderr, "%-15s before training: validation loss %.4f\n", name.c_str(), r.valid_before);
        }
        for (int step = 0; step < o.steps && !stop_agreed(comm); ++step) {
            make_batch(data.train, o.batch, o.model.context, o.seed, static_cast<std::uint64_t>(step), tokens);   // the global batch
            const bool evaluate = step % o.eval_every == 0 || step + 1 == o.steps;
            sink.measure(evaluate);
            if (o.grad_rank_every > 0) sink.observe_ranks(&grad_ranks, step);   // one process only (train.cpp refuses mpirun)
            if (config.warmup > 0) opt.set_learning_rate(lm::configs::lr_at(config, step));
            const auto t0 = std::chrono::steady_clock::now();
            const double own = model.train_step(tokens.data() + first, share, sink);   // this rank's share
            sink.flush();
            seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            const double loss = mean_across_ranks_of(comm, own);
            if (!std::isfinite(loss)) throw agreed_error("the training loss is not finite: training diverged (try a lower --lr)");
            r.train_loss.push_back(loss);
            r.steps = step + 1;
            if (model.activation_bytes() > r.activation_bytes) {   // the same at every step (fixed batch)
                r.activation_bytes = model.activation_bytes();
                for (std::size_t k = 0; k < lm::memory::kinds; ++k)
                    r.activation_kinds[k] = static_cast<std::size_t>(model.activation_breakdown().by_kind[k].v);
            }
            if (!r.rank_names.empty()) record_ranks(step + 1, step == 0);
            r.peak_optimizer_bytes = std::max(r.peak_optimizer_bytes, opt.state_bytes());
            r.mean_optimizer_bytes += (static_cast<double>(opt.state_bytes()) - r.mean_optimizer_bytes) / (step + 1);
            if (evaluate) {
                const double valid = validation_loss();
                if (!std::isfinite(valid)) throw agreed_error("the validation loss is not finite: training diverged (try a lower --lr)");
                r.valid_steps.push_back(step + 1);
                r.valid_loss.push_back(valid);
                r.gradient_energy.push_back(sink.energy());
            }
            if (root) report::progress(name, step + 1, o.steps, loss, tokens_per_step * (step + 1) / seconds);
        }
        if (r.steps > 0) check_state_formula();
        if (!o.save_model.empty() && !stop_agreed(comm) && r.steps == o.steps && root) {
            const lm::initial_weights weights = model.export_weights();
            write_model_file(o.save_model, o.model, weights, corpus_fingerprint(data.train, data.valid), data.train.size() + data.valid.size(),
                             made_by(name, o, data, r));
        }
    } catch (const agreed_error&) {
        finish();
        throw;
    } catch (const std::exception& e) {
        if constexpr (!one_process<C>) abort_all_ranks(comm, name + ": " + e.what());
        finish();
        throw;
    } catch (...) {
        if constexpr (!one_process<C>) abort_all_ranks(comm, name + ": unknown error");
        finish();
        throw;
    }
    finish();
}

} // namespace lm::trainer
