#pragma once
// How the optimizer consumes the gradients the model hands over during backward (the model's
// lm::gradient_sink), as a trainer embedding the library would: each parameter steps as soon as
// its gradient exists (fused into backward); data-parallel, the densely optimised ones wait and
// are reduced together at the end of backward (fewer, larger all-reduces; see below).
#include <adarank/adarank.hpp>
#include <velora/distributed/communicator.hpp>
#include <velora/velora.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "data_parallel.hpp"
#include "gradient_rank.hpp"
#include "model.hpp"
#include "options.hpp"

namespace lm::trainer {

// Steps each parameter with the gradient the model hands over. In one process every step is
// taken at once (fused into backward). Data-parallel:
// - a low-rank parameter steps at once with the communicator: its reduction is of projected
//   gradients (rank × other values, plus sketches at a refresh), which only the optimizer can
//   form, and it is part of the step;
// - the gradient of a densely optimised parameter is kept (the model's own gradient buffer holds
//   it until the next train_step; a factored VeLoRA gradient is expanded into that buffer, the
//   expansion the optimizer would make) and flush() at the end of backward reduces all of them
//   with all_reduce_mean, in buckets, then steps them without the communicator. Deferring is
//   exact: the model reads no parameter's value after handing over its gradient, and the dense
//   steps are independent of each other. It is chosen over reducing each gradient on arrival
//   because the collectives here are blocking (nothing overlaps with backward anyway), so fewer,
//   larger all-reduces cost less latency: one or a few per step instead of one per parameter
//   (20 for the default model with AdamW). It costs no memory beyond the bucket: the gradients
//   are in the model's buffers already.
template <velora::communicator C>
class optimizer_sink final : public lm::gradient_sink<T> {
public:
    using param_id = adarank::low_rank_adamw<B>::param_id;
    // `bf16`: the configuration's weights=bf16 key (nullopt: float weights).
    optimizer_sink(B& backend, adarank::low_rank_adamw<B>& opt, std::vector<lm::param_ref<T>>& params, std::vector<param_id>& ids, C& comm,
                   std::optional<velora::bf16_rounding> bf16 = std::nullopt)
        : backend_(backend), opt_(opt), params_(params), ids_(ids), comm_(comm), bf16_(bf16) {
        for (const param_id id : ids_) low_rank_.push_back(id >= 0 && opt_.layer_state(id).low_rank);   // -1: frozen (LoRA), never delivered
    }
    // With a recorder, the projection matrices' gradients of the steps it says are due are
    // measured before they are stepped (gradient_rank.hpp; one process).
    void observe_ranks(lm::gradient_rank::recorder* recorder, int step) {
        recorder_ = recorder;
        step_ = step;
    }
    void dense(std::size_t i, velora::const_matrix_view<T> grad) override {
        if (recorder_ && params_[i].projection && recorder_->due(step_)) recorder_->observe(params_[i].name, step_, grad);
        if constexpr (one_process<C>) {
            if (measure_ && !low_rank_[i]) energy_ += backend_.sum_of_squares(grad);
            stepped(i, step(i, grad));
        } else if (low_rank_[i]) {
            stepped(i, step(i, grad, comm_));
        } else {
            if (grad.data != params_[i].grad) throw std::logic_error("the gradient of " + params_[i].name + " is not in its gradient buffer");
            defer(i);
        }
    }
    void factored(std::size_t i, const velora::factored_gradient<T>& grad) override {
        if (recorder_ && params_[i].projection && recorder_->due(step_)) {
            // The model never writes a VeLoRA projection's gradient buffer: free to hold the expansion.
            adarank::factored_gradient_operator<B>(backend_, grad, scratch_).row_block(0, gradient(i));
            recorder_->observe(params_[i].name, step_, velora::const_matrix_view<T>(gradient(i)));
        }
        if constexpr (one_process<C>) {
            if (measure_ && !low_rank_[i]) energy_ += adarank::factored_gradient_operator<B>(backend_, grad, scratch_).norm2();
            stepped(i, step(i, grad));
        } else if (low_rank_[i]) {
            stepped(i, step(i, grad, comm_));
        } else {
            // The model never writes a VeLoRA projection's gradient buffer: free to hold the expansion.
            adarank::factored_gradient_operator<B>(backend_, grad, scratch_).row_block(0, gradient(i));
            defer(i);
        }
    }
    // After train_step (data-parallel): reduces and steps the deferred dense gradients.
    void flush() {
        if constexpr (!one_process<C>) {
            if (deferred_.empty()) return;
            try {
                opt_.all_reduce_mean(std::span<const param_id>(deferred_ids_), std::span<const velora::matrix_view<T>>(deferred_grads_), comm_);
                for (std::size_t k = 0; k < deferred_.size(); ++k) {
                    // What all_reduce_mean put into its all-reduces for this gradient (counted from the
                    // size: in this tree info().communicated_bytes of a parameter stepped without the
                    // communicator after all_reduce_mean is 0).
                    bytes_ += static_cast<std::uint64_t>(deferred_grads_[k].size()) * sizeof(T);
                    if (measure_) energy_ += backend_.sum_of_squares(deferred_grads_[k]);
                    check(step(deferred_[k], velora::const_matrix_view<T>(deferred_grads_[k])), deferred_[k]);
                }
            } catch (...) {
                clear();
                throw;
            }
            clear();
        }
    }
    // Gradient bytes this rank has put into all-reduces (0 in one process).
    [[nodiscard]] std::uint64_t communicated_bytes() const noexcept { return bytes_; }
    // With `on`, the next step sums the energy of the gradients the optimizer steps with: ‖G‖²
    // of a densely optimised parameter (data-parallel: of the ranks' mean), ‖Ĝ‖² of a low-rank
    // one's projected gradient. It shows a gradient of the wrong scale at once (a factor c on
    // G is c² here), where the losses respond only through Adam's ε (Adam normalises its step).
    void measure(bool on) {
        measure_ = on;
        energy_ = 0;
    }
    [[nodiscard]] double energy() const noexcept { return energy_; }

private:
    velora::matrix_view<T> weight(std::size_t i) { return {params_[i].data, params_[i].rows, params_[i].cols, params_[i].cols}; }
    // One step of parameter i (with `comm...`: data-parallel). weights=bf16: the library's step of a
    // weight stored only in bf16 (adarank/bf16_weight_steps.hpp: widened, stepped as float,
    // rounded back with the library's rounding and keys), the call a bf16 host makes. The model
    // computes in float, so its buffer holds the bf16 values as floats: they are narrowed to bf16
    // exactly before the step and widened back after it, and the run is the bf16 host's bit for bit.
    template <class Grad, class... Comm>
    velora::status step(std::size_t i, const Grad& grad, Comm&... comm) {
        if (!bf16_) return opt_.step(ids_[i], weight(i), grad, comm...);
        T* w = params_[i].data;
        const index_t rows = params_[i].rows, cols = params_[i].cols;
        const auto count = static_cast<std::size_t>(rows * cols);
        bf16_weight_.resize(count);
        for (std::size_t k = 0; k < count; ++k) {
            bf16_weight_[k] = velora::storage_cast<velora::bfloat16>::from(w[k]);
            if (velora::to_arithmetic<T>(bf16_weight_[k]) != w[k])   // every step and the start (training.hpp) leave bf16 values
                throw std::logic_error("weights=bf16: " + params_[i].name + " holds a weight that is not a bf16 value");
        }
        const velora::status s = opt_.step(ids_[i], adarank::bf16_weight_view({bf16_weight_.data(), rows, cols, cols}, *bf16_), grad, comm...);
        if (s == velora::status::ok || s == velora::status::degenerate_input)
            for (std::size_t k = 0; k < count; ++k) w[k] = velora::to_arithmetic<T>(bf16_weight_[k]);
        return s;
    }
    velora::matrix_view<T> gradient(std::size_t i) { return {params_[i].grad, params_[i].rows, params_[i].cols, params_[i].cols}; }
    void defer(std::size_t i) {
        deferred_.push_back(i);
        deferred_ids_.push_back(ids_[i]);
        deferred_grads_.push_back(gradient(i));
    }
    void clear() {
        deferred_.clear();
        deferred_ids_.clear();
        deferred_grads_.clear();
    }
    void stepped(std::size_t i, velora::status s) {
        check(s, i);
        if (!low_rank_[i]) return;   // (the dense steps of a data-parallel run are counted in flush)
        if (measure_) energy_ += opt_.layer_state(ids_[i]).projected_norm2;
        bytes_ += opt_.layer_state(ids_[i]).communicated_bytes;
    }
    // ok and degenerate_input (an all-zero gradient where a new subspace was due: the old one
    // is kept, the step was taken) go on; any other status means the step changed nothing
    // because the gradient was NaN/Inf or overflowed: the run has diverged. The status is the
    // same on every rank (the optimizer's promise), so is the error.
    void check(velora::status s, std::size_t i) {
        if (s != velora::status::ok && s != velora::status::degenerate_input)
            throw agreed_error("optimizer step for " + params_[i].name + " returned status " + std::string(velora::to_string(s)) +
                               ": training diverged");
    }
    B& backend_;
    adarank::low_rank_adamw<B>& opt_;
    std::vector<lm::param_ref<T>>& params_;
    std::vector<param_id>& ids_;
    C& comm_;
    std::optional<velora::bf16_rounding> bf16_;
    std::vector<velora::bfloat16> bf16_weight_;   // weights=bf16: the stepped parameter's weight in bf16 (the largest's size)
    std::vector<bool> low_rank_;
    std::vector<std::size_t> deferred_;   // parameter indices whose gradients wait for flush()
    std::vector<param_id> deferred_ids_;
    std::vector<velora::matrix_view<T>> deferred_grads_;
    B::template buffer<T> scratch_;   // factored_gradient_operator's (its row_block and norm2 do not use it)
    std::uint64_t bytes_ = 0;
    bool measure_ = false;
    double energy_ = 0;
    lm::gradient_rank::recorder* recorder_ = nullptr;
    int step_ = 0;
};

} // namespace lm::trainer
