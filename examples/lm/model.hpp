#pragma once
/// \file
/// A small decoder-only transformer language model with a hand-written backward pass, on
/// `velora::eigen_backend<T>` (T = float or double). It embeds the library the way a user's
/// trainer would: the big products go through the backend's GEMM (`velora::linear_forward`,
/// `linear_input_grad`, `dense_weight_grad`), and the linear inputs chosen in `velora_config`
/// keep a VeLoRA record instead of the activation, their weight gradients handed over in
/// factored form (never formed densely).
///
/// Architecture (pre-norm, no biases):
///
///     x = E[token] + P[position]                                  E: vocab×d, P: context×d
///     per layer:  h1 = RMSNorm(x)·g1                               (eps 1e-5)
///                 q, k, v = h1 Wqᵀ, h1 Wkᵀ, h1 Wvᵀ                  d×d each
///                 o = causal multi-head softmax attention, scores scaled by 1/sqrt(d_head)
///                 x += o Woᵀ
///                 h2 = RMSNorm(x)·g2;  a = h2 W1ᵀ, b = h2 W3ᵀ       ffn×d (gate, up)
///                 s = silu(a) ⊙ b;     x += s W2ᵀ                    d×ffn (down)
///     hf = RMSNorm(x)·g;  logits = hf Eᵀ (tied head);  mean cross-entropy over all tokens.
///
/// Gradient delivery: each parameter's gradient goes to the sink exactly once, in backward
/// order (the reverse of `parameters()`: final norm first, embedding last), as soon as it is
/// final. Every use of a parameter's VALUE in the backward pass happens before its gradient is
/// delivered, so a sink may update the parameter in place inside the callback (fused
/// optimizer step). Dense gradients are views of the parameter's `grad` buffer; factored
/// ones view an A buffer and the record's v owned by the model. Both stay valid until the next
/// train_step. For VeLoRA projections `param_ref::grad` is never written (stays zero).
///
/// Memory: every buffer (activations, records, A buffers, backward scratch) is allocated in
/// the constructor for `max_batch` sequences (records on the first train_step) and reused; the
/// parameter shapes and the kept activations' sizes come from memory.hpp, which the trainer's
/// size check and memory estimator (lm_train --estimate) read too;
/// the products run on the backend's GEMM, element-wise work on Eigen maps without temporaries.
/// Not thread-safe; one model per backend and host thread.
///
/// LoRA fine-tuning (`adapter_config::on`, memory.hpp): every projection becomes a
/// `velora::lora_linear` over a frozen base — `velora::dense_frozen_weight` on the float W, or with
/// `adapter_config::nf4` a `velora::nf4_frozen_weight` (QLoRA: W packed as NF4 with double
/// quantisation, never kept in float) — with trainable adapters A (r×D) and B (O×r) appended to
/// parameters() after the base weights. Everything else (embeddings, gains, the projections)
/// is frozen: `param_ref::trainable` is false and no gradient of it reaches the sink. The
/// adapter input x_a is dropout(x) with PEFT's inverted dropout, its mask a counter-based hash
/// of (seed, step, layer, projection, element) drawn again in backward instead of stored; with
/// velora_config::value / down the x_a of v / down is kept as a VeLoRA record (A's gradient then
/// reaches the sink in factored form). Evaluation runs the same products without dropout and
/// writes no record.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <span>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <Eigen/Core>

#include <velora/finetune/lora.hpp>
#include <velora/quant/nf4.hpp>
#include <velora/quant/nf4_frozen_weight.hpp>
#include <velora/velora.hpp>

#include <variant>

#include "memory.hpp"

namespace lm {

/// 64-byte aligned storage for the model's activations, weights and gradients. The model's own
/// row reductions (RMSNorm, softmax, cross-entropy on Eigen maps) start their SIMD packets at
/// the first aligned address, so their bits depend on where a row lies; with every buffer
/// aligned, that is the same in every process, whatever the heap did before (the five
/// configurations run in forked processes with different allocation histories).
template <class U>
struct aligned_allocator {
    using value_type = U;
    static constexpr std::align_val_t alignment{64};
    aligned_allocator() = default;
    template <class V>
    aligned_allocator(const aligned_allocator<V>&) noexcept {}
    U* allocate(std::size_t n) { return static_cast<U*>(::operator new[](n * sizeof(U), alignment)); }
    void deallocate(U* p, std::size_t) noexcept { ::operator delete[](p, alignment); }
    template <class V>
    bool operator==(const aligned_allocator<V>&) const noexcept { return true; }
};
template <class U>
using aligned_vector = std::vector<U, aligned_allocator<U>>;

template <class T>
struct param_ref {
    std::string name;
    index_t rows, cols;
    T* data;       ///< null for a projection stored as NF4 (QLoRA): the library holds it packed
    T* grad;       ///< dense gradient buffer (rows×cols); not written for VeLoRA projections; null when frozen
    bool matrix;   ///< false for the RMSNorm gains
    /// A layer's q, k, v, o or MLP matrix: what the trainer's low-rank configurations project
    /// (memory::parameter_shape::projection); false for the embeddings and the gains.
    bool projection;
    /// False for what LoRA fine-tuning freezes (every base weight): its gradient never reaches the sink.
    bool trainable = true;
};

/// A model's base weights in parameters() order (the embeddings, every layer's nine, the final
/// gain; no adapters), in float: what a model file holds and what a model can start from.
struct initial_weights {
    std::vector<std::vector<float>> values;
};

/// Implemented by the trainer; called as soon as a gradient is final (backward order).
template <class T>
class gradient_sink {
public:
    virtual void dense(std::size_t param_index, velora::const_matrix_view<T> grad) = 0;
    /// VeLoRA projections only.
    virtual void factored(std::size_t param_index, const velora::factored_gradient<T>& grad) = 0;
    virtual ~gradient_sink() = default;
};

template <class T>
class transformer {
public:
    using backend_type = velora::eigen_backend<T>;
    using compressor_type = velora::compressor<backend_type>;
    using record_type = typename compressor_type::record_type;

    /// Parameter index of layer `l`'s entries: layer_base(l) + one of these.
    enum slot : std::size_t { norm1 = 0, wq, wk, wv, wo, norm2, w1, w3, w2, slots };
    static constexpr std::size_t token_embedding = 0, position_embedding = 1;

    /// Allocates parameters, gradients, activations, records and scratch for `max_batch`
    /// sequences. Throws std::invalid_argument for a bad configuration.
    /// `adapters`: LoRA fine-tuning (see the file comment); off by default. `init`: the base
    /// weights to start from (a pretrained model) instead of the seeded initialisation; checked
    /// against the shapes (std::invalid_argument). The adapters are initialised from `seed`.
    transformer(backend_type& b, model_config c, velora_config v, std::uint64_t seed, index_t max_batch = 16, adapter_config adapters = {},
                const initial_weights* init = nullptr)
        : b_(&b), c_(validated(c, max_batch)), v_(v), ad_(validated(adapters, v)), max_batch_(max_batch), seed_(seed) {
        const index_t d = c_.d_model, f = c_.ffn, n = max_batch_ * c_.context;
        dh_ = d / c_.heads;
        const bool rec_h1 = memory::records_h1(v_);
        g_h1_ = memory::groups_for(v_, d);
        g_s_ = memory::groups_for(v_, f);
        if (rec_h1 || v_.down) {
            if (v_.groups < 1) throw std::invalid_argument("lm::transformer: velora_config.groups must be >= 1");
        }

        // Parameters, in the documented order, with the shapes of memory.hpp (its counts are this list's).
        std::size_t total = 0;
        // With NF4 the projections take no float storage (offset only for the others); the
        // gradient buffers are the trainable parameters' only.
        std::size_t grad_total = 0;
        std::vector<std::size_t> grad_offsets;
        auto add_stored = [&](std::string name, const memory::parameter_shape& shape, bool trainable, bool stored) {
            params_.push_back({std::move(name), shape.rows, shape.cols, nullptr, nullptr, shape.matrix, shape.projection, trainable});
            offsets_.push_back(stored ? total : SIZE_MAX);
            if (stored) total += static_cast<std::size_t>(shape.rows * shape.cols);
            grad_offsets.push_back(trainable ? grad_total : SIZE_MAX);
            if (trainable) grad_total += static_cast<std::size_t>(shape.rows * shape.cols);
        };
        const bool frozen = ad_.on;
        for (const auto& p : memory::embedding_parameters(c_)) add_stored(p.name, p, !frozen, true);
        const auto layer_params = memory::layer_parameters(c_);
        static_assert(std::tuple_size_v<decltype(memory::layer_parameters(c_))> == slots, "memory.hpp lists one layer's parameters in slot order");
        for (index_t l = 0; l < c_.layers; ++l)
            for (const auto& p : layer_params) add_stored("layer" + std::to_string(l) + "." + p.name, p, !frozen, !(ad_.nf4 && p.projection));
        add_stored(memory::final_norm_parameter(c_).name, memory::final_norm_parameter(c_), !frozen, true);
        base_count_ = params_.size();
        if (ad_.on)
            for (index_t l = 0; l < c_.layers; ++l)
                for (const auto& p : memory::layer_adapters(c_, ad_)) add_stored("layer" + std::to_string(l) + "." + p.name, p, true, true);
        if (init && init->values.size() != base_count_)
            throw std::invalid_argument("lm::transformer: the initial weights hold " + std::to_string(init->values.size()) + " parameters, the model has " +
                                        std::to_string(base_count_));
        values_.assign(total, T(0));
        grads_.assign(grad_total, T(0));
        const T residual_scale = T(1) / std::sqrt(T(2) * static_cast<T>(c_.layers));
        std::vector<float> host;   // an NF4 projection's float values, quantised straight from here
        for (std::size_t i = 0; i < base_count_; ++i) {
            auto& p = params_[i];
            const index_t count = p.rows * p.cols;
            p.grad = grad_offsets[i] == SIZE_MAX ? nullptr : grads_.data() + grad_offsets[i];
            const bool stored = offsets_[i] != SIZE_MAX;
            host.resize(stored ? 0 : static_cast<std::size_t>(count));
            p.data = stored ? values_.data() + offsets_[i] : nullptr;
            auto put = [&](index_t k, double x) {
                if (stored) p.data[k] = static_cast<T>(x);
                else host[static_cast<std::size_t>(k)] = static_cast<float>(x);
            };
            if (init) {
                const std::vector<float>& from = init->values[i];
                if (from.size() != static_cast<std::size_t>(count))
                    throw std::invalid_argument("lm::transformer: the initial weights of " + p.name + " hold " + std::to_string(from.size()) +
                                                " values, the parameter has " + std::to_string(count));
                for (index_t k = 0; k < count; ++k) put(k, from[static_cast<std::size_t>(k)]);
            } else if (!p.matrix) {
                for (index_t k = 0; k < count; ++k) put(k, 1.0);
            } else {
                const std::uint64_t pseed = (seed + 1) * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(i) * 0xBF58476D1CE4E5B9ull;
                T scale = T(0.02);
                if (i >= 2 && i < final_norm_index()) {
                    const std::size_t s = (i - 2) % slots;
                    if (s == wo || s == w2) scale *= residual_scale;
                }
                for (index_t k = 0; k < count; ++k) put(k, static_cast<double>(scale * static_cast<T>(velora::gaussian_at(pseed, static_cast<std::uint64_t>(k)))));
            }
            if (!stored) nf4_host_.emplace(i, velora::nf4_weight::quantize(velora::make_view<const float>(host.data(), p.rows, p.cols),
                                                                            memory::nf4_options_for(p.cols)));
        }
        for (std::size_t i = base_count_; i < params_.size(); ++i) {
            params_[i].data = values_.data() + offsets_[i];
            params_[i].grad = grads_.data() + grad_offsets[i];
        }

        // Activations kept for backward (per layer), sized by memory.hpp (which counts them), and scratch.
        const memory::layer_activations kept = memory::layer_kept(c_, v_, max_batch_, ad_);
        const memory::final_activations kept_final = memory::final_kept(c_, max_batch_, ad_);
        const auto sized = [](aligned_vector<T>& buf, memory::count elements) { buf.resize(static_cast<std::size_t>(elements.v)); };
        xs_.resize(static_cast<std::size_t>(c_.layers + 1));
        for (index_t l = 0; l < c_.layers; ++l) sized(xs_[static_cast<std::size_t>(l)], kept.x);
        sized(xs_.back(), kept_final.x);
        layers_.resize(static_cast<std::size_t>(c_.layers));
        for (auto& L : layers_) {
            sized(L.rstd1, kept.rstd1);
            sized(L.h1, kept.h1);   // 0 with share_qkv: the record stands for h1
            sized(L.q, kept.q);
            sized(L.k, kept.k);
            sized(L.v, kept.v);
            sized(L.p, kept.probs);
            sized(L.o, kept.o);
            sized(L.xmid, kept.xmid);
            sized(L.rstd2, kept.rstd2);
            sized(L.h2, kept.h2);
            sized(L.a, kept.a);
            sized(L.bu, kept.b);
            sized(L.s, kept.s);     // 0 when the MLP-down input is recorded
            velora::compressor_config cc;
            cc.z_storage = v_.z_storage;
            if (ad_.on) continue;   // the adapters hold their own compressors (build_adapters)
            if (rec_h1) {
                cc.groups = g_h1_;
                L.comp_h1 = std::make_unique<compressor_type>(*b_, d, cc);
                L.a_v.resize(static_cast<std::size_t>(d * g_h1_));
                if (v_.share_qkv) {
                    L.a_q.resize(static_cast<std::size_t>(d * g_h1_));
                    L.a_k.resize(static_cast<std::size_t>(d * g_h1_));
                }
            }
            if (v_.down) {
                cc.groups = g_s_;
                L.comp_s = std::make_unique<compressor_type>(*b_, f, cc);
                L.a_2.resize(static_cast<std::size_t>(d * g_s_));
            }
        }
        sized(rstdf_, kept_final.rstd);
        sized(hf_, kept_final.hf);
        sized(probs_, kept_final.probs);
        if (ad_.on) build_adapters(kept);
        if (v_.share_qkv) tmp_h1_.resize(static_cast<std::size_t>(n * d));
        if (v_.down && !ad_.on) tmp_s_.resize(static_cast<std::size_t>(n * f));
        dx_.resize(static_cast<std::size_t>(n * d));
        dh_buf_.resize(static_cast<std::size_t>(n * d));
        dq_.resize(static_cast<std::size_t>(n * d));
        dk_.resize(static_cast<std::size_t>(n * d));
        dv_.resize(static_cast<std::size_t>(n * d));
        do_.resize(static_cast<std::size_t>(n * d));
        ds_.resize(static_cast<std::size_t>(n * f));
        dsc_.resize(static_cast<std::size_t>(c_.context * c_.context));
    }

    transformer(const transformer&) = delete;
    transformer& operator=(const transformer&) = delete;

    [[nodiscard]] const model_config& config() const noexcept { return c_; }
    [[nodiscard]] const velora_config& velora_settings() const noexcept { return v_; }
    [[nodiscard]] const adapter_config& adapter_settings() const noexcept { return ad_; }
    /// Number of base weights in parameters() (the adapters, with LoRA, follow them).
    [[nodiscard]] std::size_t base_parameter_count() const noexcept { return base_count_; }
    /// Elements of the trainable parameters.
    [[nodiscard]] std::size_t trainable_elements() const noexcept { return grads_.size(); }
    /// Bytes of the weights as stored: float values (sizeof(T) each) and, with NF4, the packed
    /// projections (nf4_frozen_weight::stored_bytes) — memory::weight_bytes of the shapes.
    [[nodiscard]] std::size_t weight_bytes() const noexcept {
        std::size_t bytes = values_.size() * sizeof(T);
        for (const auto& L : layers_)
            for (const auto& a : L.adapters)
                if (const auto* q = std::get_if<nf4_lora>(&a.layer)) bytes += (*q)->base().stored_bytes();
        return bytes;
    }
    /// The base weights as one would use them after training, in float, parameters() order: the
    /// trained weights, or with LoRA each projection's W + (α/r)·B·A (with NF4: the dequantised W
    /// plus the same), the frozen rest as it is. What --save-model writes.
    [[nodiscard]] initial_weights export_weights() {
        initial_weights out;
        out.values.resize(base_count_);
        for (std::size_t i = 0; i < base_count_; ++i) {
            const auto& p = params_[i];
            auto& v = out.values[i];
            v.resize(static_cast<std::size_t>(p.rows * p.cols));
            if (p.data)
                for (std::size_t k = 0; k < v.size(); ++k) v[k] = static_cast<float>(p.data[k]);
        }
        if (!ad_.on) return out;
        Mat w;
        for (index_t l = 0; l < c_.layers; ++l)
            for (std::size_t k = 0; k < 7; ++k) {
                const std::size_t i = layer_base(l) + memory::projection_slots[k];
                const auto& p = params_[i];
                w.resize(p.rows, p.cols);
                const view wv{w.data(), p.rows, p.cols, p.cols};
                const adapter& a = layers_[static_cast<std::size_t>(l)].adapters[k];
                if (const auto* q = std::get_if<nf4_lora>(&a.layer)) b_->dequantize_nf4((*q)->base().blocks(), 0, wv);
                else std::copy(p.data, p.data + p.rows * p.cols, w.data());
                const std::size_t ia = a.index_a, ib = a.index_a + 1;
                b_->gemm(velora::op::none, velora::op::none, static_cast<T>(ad_.alpha / static_cast<double>(ad_.rank)), cview(pview(ib)),
                         cview(pview(ia)), T(1), wv);
                for (index_t e = 0; e < p.rows * p.cols; ++e) out.values[i][static_cast<std::size_t>(e)] = static_cast<float>(w.data()[e]);
            }
        return out;
    }
    /// The dropout masks of the next train_step are those of step `step` (each train_step then
    /// counts on from it): a test replays a step's masks.
    void set_dropout_step(std::uint64_t step) noexcept { step_ = step; }
    [[nodiscard]] index_t max_batch() const noexcept { return max_batch_; }
    static constexpr std::size_t layer_base(index_t layer) noexcept { return 2 + static_cast<std::size_t>(layer) * slots; }
    [[nodiscard]] std::size_t final_norm_index() const noexcept { return layer_base(c_.layers); }

    /// Stable order: token embedding, position embedding, per layer norm1, wq, wk, wv, wo,
    /// norm2, w1 (gate), w3 (up), w2 (down), then the final norm.
    std::vector<param_ref<T>>& parameters() noexcept { return params_; }

    /// Called by train_step just before a compressor compresses for the first time (its v not
    /// yet set), with the compressor and the input it is about to compress (this batch's rows of
    /// the layer input): a data-parallel trainer sets there the v that every rank shares
    /// (velora::share_first_batch_v). The calls come in forward order, the same order on every
    /// rank, as the collectives of such a hook need. An exception from the hook propagates out of train_step before any
    /// gradient reaches the sink (parameters untouched). Without a hook (the default) the
    /// compressor takes v from this input itself (v_mode::first_batch_mean).
    using first_compress_hook = std::function<void(compressor_type&, velora::const_matrix_view<T>)>;
    void set_first_compress_hook(first_compress_hook hook) { first_compress_ = std::move(hook); }

    /// True when parameter `i` receives a factored (VeLoRA) gradient.
    [[nodiscard]] bool is_factored(std::size_t i) const noexcept {
        if (ad_.on) {   // A of an adapter whose input is recorded
            for (const auto& L : layers_)
                for (const auto& a : L.adapters)
                    if (a.index_a == i) return a.recorded;
            return false;
        }
        if (i < 2 || i >= final_norm_index()) return false;
        const std::size_t s = (i - 2) % slots;
        return (s == wv && (v_.value || v_.share_qkv)) || ((s == wq || s == wk) && v_.share_qkv) || (s == w2 && v_.down);
    }

    /// tokens: `batch` rows of context+1 ids (input = first context, target = last context).
    /// Forward + backward; each gradient goes to `sink` once, in backward order. Returns the
    /// mean cross-entropy (nats/token) of this batch under the parameters before the step.
    /// Throws std::runtime_error before any gradient reaches the sink (parameters untouched)
    /// when a VeLoRA record cannot be written: compress returned non_finite_input or overflow,
    /// i.e. the activations diverged.
    double train_step(const int* tokens, index_t batch, gradient_sink<T>& sink) {
        check_batch(tokens, batch, "lm::transformer::train_step");
        const double loss = forward(tokens, batch, true);
        backward(tokens, batch, sink);
        count_activations(batch);
        ++step_;
        return loss;
    }

    /// Forward only (no VeLoRA record is written, the compressors' v is untouched): mean cross-entropy.
    double evaluate(const int* tokens, index_t batch) {
        check_batch(tokens, batch, "lm::transformer::evaluate");
        return forward(tokens, batch, false);
    }

    /// Bytes that the last train_step's forward pass kept for its backward pass, at that step's
    /// N = batch·context tokens (the buffers themselves are allocated for max_batch), by kind;
    /// all zero before the first train_step. The buffers backward reads are the ones listed by
    /// memory::layer_kept and memory::final_kept, which also size them, so the count is
    /// memory::activations(); the records' share is what the records themselves report
    /// (activation_record::bytes(), checked against memory.hpp's formula at every step).
    /// Counted:
    ///   per layer: x (layer input, N·d, for RMSNorm1's backward) + rstd1 (N);
    ///              h1 (N·d) unless share_qkv;  the h1 record's bytes() if value or share_qkv;
    ///              q, k, v (3·N·d); attention probabilities (batch·heads·context², the full
    ///              square incl. the masked zeros); o (N·d, Wo's input); x after attention
    ///              (N·d, RMSNorm2's input) + rstd2 (N); h2 (N·d); a, b (2·N·ffn);
    ///              s (N·ffn) unless down;  the s record's bytes() if down;
    ///   final:     x (N·d) + rstd (N); hf (N·d, also the tied head's input); softmax
    ///              probabilities (N·vocab, turned into dlogits in place).
    /// Not counted: the token ids (the caller's memory, read again by backward), parameters,
    /// gradients, VeLoRA A buffers, backward scratch and the transient h1/s scratch used when
    /// those activations are not kept (see buffer_elements()).
    [[nodiscard]] std::size_t activation_bytes() const noexcept { return static_cast<std::size_t>(activations_.total().v); }
    [[nodiscard]] const memory::activation_bytes& activation_breakdown() const noexcept { return activations_; }

    /// Elements of the model's own buffers, from their sizes (tests/test_lm_model.cpp compares
    /// them with memory::buffers, which the trainer's size check and estimator use). VeLoRA
    /// records and compressors are the library's and are not included.
    [[nodiscard]] memory::model_buffers buffer_elements() const {
        const auto sum = [](std::initializer_list<const aligned_vector<T>*> bufs) {
            memory::count n;
            for (const auto* b : bufs) n += b->size();
            return n;
        };
        memory::model_buffers m;
        m.parameters = values_.size();
        m.gradients = grads_.size();
        for (const auto& x : xs_) m.kept += x.size();
        for (const auto& L : layers_) {
            m.kept += sum({&L.rstd1, &L.h1, &L.q, &L.k, &L.v, &L.p, &L.o, &L.xmid, &L.rstd2, &L.h2, &L.a, &L.bu, &L.s});
            m.a_buffers += sum({&L.a_q, &L.a_k, &L.a_v, &L.a_2});
        }
        m.kept += sum({&rstdf_, &probs_});
        if (ad_.on) m.transient += hf_.size();
        else m.kept += hf_.size();
        m.transient += sum({&tmp_h1_, &tmp_s_, &tin_, &txa_, &tout_});
        m.scratch = sum({&dx_, &dh_buf_, &dq_, &dk_, &dv_, &do_, &ds_, &dsc_, &dacc_, &dxa_, &eval_ws_});
        for (const auto& L : layers_) {
            m.kept += L.xa.size();
            m.a_buffers += sum({&L.af_v, &L.af_2});
        }
        return m;
    }

private:
    using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using Map = Eigen::Map<Mat>;
    using CMap = Eigen::Map<const Mat>;
    using Vec = Eigen::Matrix<T, 1, Eigen::Dynamic>;
    using VMap = Eigen::Map<Vec>;
    using CVMap = Eigen::Map<const Vec>;
    using view = velora::matrix_view<T>;
    using cview = velora::const_matrix_view<T>;

    using dense_lora = std::unique_ptr<velora::lora_linear<backend_type, velora::dense_frozen_weight<backend_type>>>;
    using nf4_lora = std::unique_ptr<velora::lora_linear<backend_type, velora::nf4_frozen_weight<backend_type>>>;
    using lora_record = velora::lora_record<backend_type>;
    // One adapted projection (LoRA): the library's layer over its frozen base, its record, where
    // its x_a lives, and the indices of A (B follows) in parameters().
    struct adapter {
        std::variant<std::monostate, dense_lora, nf4_lora> layer;
        lora_record rec;
        T* xa = nullptr;   // its dropout output (kept), or null: the input itself / the transient (recorded)
        bool recorded = false;
        std::size_t index_a = 0;
        std::uint64_t stream = 0;   // the dropout mask's counter base
    };

    struct layer_state {
        aligned_vector<T> rstd1, h1, q, k, v, p, o, xmid, rstd2, h2, a, bu, s;
        std::unique_ptr<compressor_type> comp_h1, comp_s;
        record_type rec_h1, rec_s;
        aligned_vector<T> a_q, a_k, a_v, a_2;   // factored gradients' A (out × G)
        std::array<adapter, 7> adapters;        // LoRA: q, k, v, o, gate, up, down
        aligned_vector<T> xa;                   // LoRA with dropout: the kept x_a of the adapters not recorded
        aligned_vector<T> af_v, af_2;           // LoRA: A's factor (r × G) of the recorded adapters
    };

    static adapter_config validated(const adapter_config& a, const velora_config& v) {
        auto bad = [](const std::string& m) { throw std::invalid_argument("lm::transformer: " + m); };
        if (!a.on) return a;
        if (v.share_qkv) bad("share_qkv is not for LoRA fine-tuning (the adapters of v and down are the recorded inputs)");
        if (a.rank < 1) bad("adapter rank must be >= 1, got " + std::to_string(a.rank));
        if (!(a.dropout >= 0 && a.dropout < 1)) bad("adapter dropout must lie in [0, 1), got " + std::to_string(a.dropout));
        if (!std::isfinite(a.alpha) || a.alpha == 0) bad("adapter alpha must be finite and non-zero");
        return a;
    }

    static model_config validated(const model_config& c, index_t max_batch) {
        auto bad = [](const std::string& m) { throw std::invalid_argument("lm::transformer: " + m); };
        if (c.vocab < 1 || c.d_model < 1 || c.heads < 1 || c.layers < 1 || c.ffn < 1 || c.context < 1)
            bad("every model_config field must be positive");
        if (c.d_model % c.heads != 0) bad("d_model = " + std::to_string(c.d_model) + " is not divisible by heads = " + std::to_string(c.heads));
        if (max_batch < 1) bad("max_batch must be positive, got " + std::to_string(max_batch));
        return c;
    }

    void check_batch(const int* tokens, index_t batch, const char* fn) const {
        if (batch < 1 || batch > max_batch_)
            throw std::invalid_argument(std::string(fn) + ": batch = " + std::to_string(batch) + " is outside [1, max_batch = " +
                                        std::to_string(max_batch_) + "]");
        if (!tokens) throw std::invalid_argument(std::string(fn) + ": tokens is null");
        const index_t count = batch * (c_.context + 1);
        for (index_t i = 0; i < count; ++i)
            if (tokens[i] < 0 || tokens[i] >= c_.vocab)
                throw std::invalid_argument(std::string(fn) + ": token id " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                                            " is outside [0, vocab = " + std::to_string(c_.vocab) + ")");
    }

    T* param(std::size_t i) noexcept { return params_[i].data; }
    view pview(std::size_t i) noexcept { return {params_[i].data, params_[i].rows, params_[i].cols, params_[i].cols}; }
    view gview(std::size_t i) noexcept { return {params_[i].grad, params_[i].rows, params_[i].cols, params_[i].cols}; }
    static view mv(aligned_vector<T>& buf, index_t rows, index_t cols) noexcept { return {buf.data(), rows, cols, cols}; }

    // y = rmsnorm(x)·g row by row; rstd[t] = 1/sqrt(mean(x_t²) + eps).
    void rmsnorm(const T* x, const T* g, T* y, T* rstd, index_t n) const {
        const index_t d = c_.d_model;
        const CVMap gm(g, d);
        for (index_t t = 0; t < n; ++t) {
            const CVMap xr(x + t * d, d);
            const T r = T(1) / std::sqrt(xr.squaredNorm() / static_cast<T>(d) + T(eps));
            rstd[t] = r;
            VMap(y + t * d, d) = (xr * r).cwiseProduct(gm);
        }
    }

    // dx += d rmsnorm; dg = Σ_t dy_t ⊙ x̂_t (overwritten).
    // dg null: a frozen gain (LoRA), dx only.
    void rmsnorm_backward(const T* x, const T* g, const T* rstd, const T* dy, T* dx, T* dg, index_t n) const {
        const index_t d = c_.d_model;
        const CVMap gm(g, d);
        VMap dgm(dg ? dg : const_cast<T*>(g), dg ? d : 0);
        if (dg) dgm.setZero();
        for (index_t t = 0; t < n; ++t) {   // x̂ = x·r:  dx = r·(g⊙dy − x̂·mean(g⊙dy⊙x̂)),  no temporaries
            const T r = rstd[t];
            const CVMap xr(x + t * d, d), dyr(dy + t * d, d);
            if (dg) dgm += r * dyr.cwiseProduct(xr);
            const T dot = dyr.cwiseProduct(gm).dot(xr) * r * r / static_cast<T>(d);
            VMap(dx + t * d, d) += r * (dyr.cwiseProduct(gm) - xr * dot);
        }
    }

    static T sigmoid(T a) noexcept { return T(1) / (T(1) + std::exp(-a)); }

    double forward(const int* tokens, index_t batch, bool train) {
        const index_t C = c_.context, d = c_.d_model, f = c_.ffn, V = c_.vocab, n = batch * C;
        // Embedding.
        T* x0 = xs_[0].data();
        for (index_t bi = 0; bi < batch; ++bi)
            for (index_t t = 0; t < C; ++t) {
                const int id = tokens[bi * (C + 1) + t];
                VMap(x0 + (bi * C + t) * d, d) = CVMap(param(token_embedding) + id * d, d) + CVMap(param(position_embedding) + t * d, d);
            }
        for (index_t l = 0; l < c_.layers; ++l) {
            auto& L = layers_[static_cast<std::size_t>(l)];
            const std::size_t base = layer_base(l);
            const T* x = xs_[static_cast<std::size_t>(l)].data();
            // With LoRA, h1, o, h2 and s that backward does not read take turns in tin_.
            auto kept_or_transient = [&](aligned_vector<T>& kept) { return kept.empty() ? tin_.data() : kept.data(); };
            T* h1 = ad_.on ? kept_or_transient(L.h1) : v_.share_qkv ? tmp_h1_.data() : L.h1.data();
            rmsnorm(x, param(base + norm1), h1, L.rstd1.data(), n);
            const cview h1v{h1, n, d, d};
            if (ad_.on) {
                adapted_forward(L, 0, h1v, mv(L.q, n, d), train);
                adapted_forward(L, 1, h1v, mv(L.k, n, d), train);
                adapted_forward(L, 2, h1v, mv(L.v, n, d), train);
            } else {
                if (train && L.comp_h1) keep_record(*L.comp_h1, h1v, L.rec_h1, l, "value-projection input");
                velora::linear_forward(*b_, h1v, cview(pview(base + wq)), nullptr, mv(L.q, n, d));
                velora::linear_forward(*b_, h1v, cview(pview(base + wk)), nullptr, mv(L.k, n, d));
                velora::linear_forward(*b_, h1v, cview(pview(base + wv)), nullptr, mv(L.v, n, d));
            }
            T* o = ad_.on ? kept_or_transient(L.o) : L.o.data();
            attention_forward(L, batch, o);
            // xmid = x + o Woᵀ
            if (ad_.on) {
                adapted_forward(L, 3, cview{o, n, d, d}, mv(tout_, n, d), train);
                for (index_t i = 0; i < n * d; ++i) L.xmid[static_cast<std::size_t>(i)] = x[i] + tout_[static_cast<std::size_t>(i)];
            } else {
                std::copy(x, x + n * d, L.xmid.data());
                b_->gemm(velora::op::none, velora::op::transpose, T(1), cview(mv(L.o, n, d)), cview(pview(base + wo)), T(1), mv(L.xmid, n, d));
            }
            T* h2 = ad_.on ? kept_or_transient(L.h2) : L.h2.data();
            rmsnorm(L.xmid.data(), param(base + norm2), h2, L.rstd2.data(), n);
            const cview h2v{h2, n, d, d};
            if (ad_.on) {
                adapted_forward(L, 4, h2v, mv(L.a, n, f), train);
                adapted_forward(L, 5, h2v, mv(L.bu, n, f), train);
            } else {
                velora::linear_forward(*b_, h2v, cview(pview(base + w1)), nullptr, mv(L.a, n, f));
                velora::linear_forward(*b_, h2v, cview(pview(base + w3)), nullptr, mv(L.bu, n, f));
            }
            T* s = ad_.on ? kept_or_transient(L.s) : v_.down ? tmp_s_.data() : L.s.data();
            for (index_t i = 0; i < n * f; ++i) {
                const T a = L.a[static_cast<std::size_t>(i)];
                s[i] = a * sigmoid(a) * L.bu[static_cast<std::size_t>(i)];
            }
            const cview sv{s, n, f, f};
            T* out = xs_[static_cast<std::size_t>(l + 1)].data();
            if (ad_.on) {
                adapted_forward(L, 6, sv, mv(tout_, n, d), train);
                for (index_t i = 0; i < n * d; ++i) out[i] = L.xmid[static_cast<std::size_t>(i)] + tout_[static_cast<std::size_t>(i)];
            } else {
                if (train && L.comp_s) keep_record(*L.comp_s, sv, L.rec_s, l, "MLP-down input");
                std::copy(L.xmid.data(), L.xmid.data() + n * d, out);
                b_->gemm(velora::op::none, velora::op::transpose, T(1), sv, cview(pview(base + w2)), T(1), view{out, n, d, d});
            }
        }
        rmsnorm(xs_.back().data(), param(final_norm_index()), hf_.data(), rstdf_.data(), n);
        const view logits = mv(probs_, n, V);
        velora::linear_forward(*b_, cview(mv(hf_, n, d)), cview(pview(token_embedding)), nullptr, logits);
        double loss = 0;
        for (index_t bi = 0; bi < batch; ++bi)
            for (index_t t = 0; t < C; ++t) {
                const index_t r = bi * C + t;
                VMap row(logits.row(r), V);
                const T mx = row.maxCoeff();
                row = (row.array() - mx).exp().matrix();
                const T sum = row.sum();
                row /= sum;
                const int target = tokens[bi * (C + 1) + t + 1];
                loss -= std::log(static_cast<double>(row[target]));
            }
        return loss / static_cast<double>(n);
    }

    // ---------------------------------------------------------------- LoRA (adapter_config::on)
    template <class F>
    static void with_layer(adapter& a, F&& f) {
        if (auto* dense = std::get_if<dense_lora>(&a.layer)) f(**dense);
        else f(*std::get<nf4_lora>(a.layer));
    }

    // The library's lora_linear per projection, over the float W or the NF4 one quantised in the
    // constructor; A and B are the parameters after the base weights; each adapter's dropout x_a
    // gets its place in the layer's xa buffer (sized by memory.hpp).
    void build_adapters(const memory::layer_activations& kept) {
        const index_t d = c_.d_model, f = c_.ffn, n = max_batch_ * c_.context, widest = std::max(d, f);
        const bool dropout = ad_.dropout > 0;
        hf_.resize(static_cast<std::size_t>(n * d));   // transient: nothing reads it in backward
        tout_.resize(static_cast<std::size_t>(n * d));
        if (dropout) tin_.resize(static_cast<std::size_t>(n * widest));
        else if (v_.down) tin_.resize(static_cast<std::size_t>(n * f));
        if (dropout && (v_.value || v_.down)) txa_.resize(static_cast<std::size_t>(n * (v_.down ? widest : d)));
        dacc_.resize(static_cast<std::size_t>(n * d));
        if (dropout) dxa_.resize(static_cast<std::size_t>(n * widest));
        std::size_t workspace = 0;
        const auto layer_params = memory::layer_parameters(c_);
        for (index_t l = 0; l < c_.layers; ++l) {
            auto& L = layers_[static_cast<std::size_t>(l)];
            L.xa.resize(static_cast<std::size_t>(kept.xa.v));
            T* next = L.xa.data();
            for (std::size_t k = 0; k < 7; ++k) {
                const std::size_t slot = memory::projection_slots[k], i = layer_base(l) + slot;
                const memory::parameter_shape& w = layer_params[slot];
                adapter& a = L.adapters[k];
                a.recorded = (k == 2 && v_.value) || (k == 6 && v_.down);
                a.index_a = base_count_ + static_cast<std::size_t>(l) * 14 + 2 * k;
                a.stream = velora::mix64((seed_ + 1) * 0xD1B54A32D192ED03ull ^ velora::mix64(static_cast<std::uint64_t>(l) * 7 + k + 1));
                if (dropout && !a.recorded) {
                    a.xa = next;
                    next += n * w.cols;
                }
                velora::lora_config cfg;
                cfg.rank = ad_.rank;
                cfg.alpha = ad_.alpha;
                cfg.keep = a.recorded ? velora::lora_keep::velora : velora::lora_keep::input_view;
                cfg.velora.groups = memory::groups_for(v_, w.cols);
                cfg.velora.z_storage = v_.z_storage;
                cfg.velora.scale = ad_.velora_scale;
                const view A = pview(a.index_a), Bm = pview(a.index_a + 1);
                auto finish = [&](auto& layer) {
                    layer.init(velora::mix64(a.stream ^ 0xA5A5A5A5A5A5A5A5ull));
                    layer.reserve(n);
                    layer.reserve(n, a.rec);
                    workspace = std::max(workspace, layer.base().workspace_elements());
                };
                if (ad_.nf4) {
                    auto layer = std::make_unique<typename nf4_lora::element_type>(
                        *b_, velora::nf4_frozen_weight<backend_type>(*b_, nf4_host_.at(i), memory::nf4_tile_rows(w.rows, w.cols)), nullptr, A, Bm, cfg);
                    finish(*layer);
                    a.layer = std::move(layer);
                } else {
                    auto layer = std::make_unique<typename dense_lora::element_type>(
                        *b_, velora::dense_frozen_weight<backend_type>(cview(pview(i))), nullptr, A, Bm, cfg);
                    finish(*layer);
                    a.layer = std::move(layer);
                }
            }
            if (next != L.xa.data() + L.xa.size()) throw std::logic_error("lm::transformer: the adapters' x_a do not fill memory.hpp's buffer");
            if (v_.value) L.af_v.resize(static_cast<std::size_t>(ad_.rank * memory::groups_for(v_, d)));
            if (v_.down) L.af_2.resize(static_cast<std::size_t>(ad_.rank * memory::groups_for(v_, f)));
        }
        eval_ws_.resize(workspace);
        nf4_host_.clear();
    }

    // The inverted dropout of `in` into `out` (x/(1−p) kept, 0 dropped), mask (a, step_); with
    // `backward`, out += mask ⊙ in /(1−p) instead (the adjoint, for dX_a).
    void apply_dropout(const adapter& a, const T* in, T* out, index_t count, bool backward) const {
        const double p = ad_.dropout;
        const T keep_scale = static_cast<T>(1.0 / (1.0 - p));
        const std::uint64_t seed = velora::mix64(a.stream + (step_ + 1) * 0x9E3779B97F4A7C15ull);
        for (index_t e = 0; e < count; ++e) {
            const bool keep = velora::uniform_at(seed, static_cast<std::uint64_t>(e)) >= p;
            if (backward) {
                if (keep) out[e] += in[e] * keep_scale;
            } else {
                out[e] = keep ? in[e] * keep_scale : T(0);
            }
        }
    }

    // y = in·Wᵀ + (α/r)·(x_a·Aᵀ)·Bᵀ through the library's layer (training: x_a = dropout(in),
    // the record written); evaluation: the same products with x_a = in and no record.
    void adapted_forward(layer_state& L, std::size_t k, cview in, view y, bool train) {
        adapter& a = L.adapters[k];
        if (!train) {
            with_layer(a, [&](auto& layer) {
                layer.base().forward(*b_, in, y, std::span<T>(eval_ws_.data(), eval_ws_.size()));
                const view h{dacc_.data(), in.rows, ad_.rank, ad_.rank};
                b_->gemm(velora::op::none, velora::op::transpose, T(1), in, cview(layer.a()), T(0), h);
                b_->gemm(velora::op::none, velora::op::transpose, layer.scaling(), cview(h), cview(layer.b()), T(1), y);
            });
            return;
        }
        cview xa = in;
        if (ad_.dropout > 0) {
            T* out = a.recorded ? txa_.data() : a.xa;
            apply_dropout(a, in.data, out, in.rows * in.cols, false);
            xa = {out, in.rows, in.cols, in.cols};
        }
        with_layer(a, [&](auto& layer) {
            if (a.recorded && first_compress_ && !layer.velora_compressor()->initialised()) first_compress_(*layer.velora_compressor(), xa);
            const velora::status st = layer.forward(in, xa, y, a.rec);
            if (st != velora::status::ok && st != velora::status::degenerate_input)
                throw std::runtime_error("lm::transformer::train_step: the LoRA adapter of " + params_[a.index_a].name.substr(0, params_[a.index_a].name.rfind('.')) +
                                         " returned status " + std::string(velora::to_string(st)) + " in forward: training diverged");
        });
    }

    // dX of adapted projection k for dY (into dx, or added to it with `accumulate`), through
    // the dropout mask when there is one; then dB and dA (factored when recorded) to the sink.
    void adapted_backward(gradient_sink<T>& sink, layer_state& L, std::size_t k, cview dy, view dx, bool accumulate) {
        adapter& a = L.adapters[k];
        const index_t n = dy.rows, width = dx.cols;
        velora::lora_gradients<T> g;
        g.dx = accumulate ? view{dacc_.data(), n, width, width} : dx;
        if (ad_.dropout > 0) g.dx_adapter = view{dxa_.data(), n, width, width};
        g.db = gview(a.index_a + 1);
        if (a.recorded) {
            aligned_vector<T>& af = k == 2 ? L.af_v : L.af_2;
            const index_t groups = static_cast<index_t>(af.size()) / ad_.rank;
            g.a_factor = view{af.data(), ad_.rank, groups, groups};
        } else {
            g.da = gview(a.index_a);
        }
        with_layer(a, [&](auto& layer) {
            const velora::status st = layer.backward(a.rec, dy, g);
            if (st != velora::status::ok)
                throw std::runtime_error("lm::transformer::train_step: the LoRA adapter of " + params_[a.index_a].name.substr(0, params_[a.index_a].name.rfind('.')) +
                                         " returned status " + std::string(velora::to_string(st)) + " in backward: training diverged");
            if (accumulate)
                for (index_t i = 0; i < n * width; ++i) dx.data[i] += dacc_[static_cast<std::size_t>(i)];
            if (ad_.dropout > 0) apply_dropout(a, dxa_.data(), dx.data, n * width, true);
            sink.dense(a.index_a + 1, cview(g.db));
            if (a.recorded) sink.factored(a.index_a, layer.factored_a(a.rec, cview(g.a_factor)));
            else sink.dense(a.index_a, cview(g.da));
        });
    }

    // LoRA's share of count_activations: every record's bytes() against memory.hpp (H, and the
    // VeLoRA record or the viewed x_a), the records' bytes into their kind.
    void count_adapter_records(index_t batch) {
        const index_t n = batch * c_.context;
        const memory::layer_records expected = memory::records(c_, v_, batch, sizeof(T));
        const auto layer_params = memory::layer_parameters(c_);
        memory::count records, h;
        for (const auto& L : layers_)
            for (std::size_t k = 0; k < 7; ++k) {
                const adapter& a = L.adapters[k];
                const std::size_t hb = static_cast<std::size_t>(n * ad_.rank) * sizeof(T);
                const std::size_t width = static_cast<std::size_t>(layer_params[memory::projection_slots[k]].cols);
                const std::size_t z = a.recorded ? a.rec.compressed().bytes() : 0;
                const std::size_t want_z = !a.recorded ? 0 : static_cast<std::size_t>((k == 2 ? expected.h1 : expected.s).v);
                const std::size_t want = hb + (a.recorded ? want_z : static_cast<std::size_t>(n) * width * sizeof(T));
                if (a.rec.bytes() != want || z != want_z)
                    throw std::logic_error("lm::transformer: the LoRA record of " + params_[a.index_a].name + " holds " + std::to_string(a.rec.bytes()) +
                                           " bytes, examples/lm/memory.hpp counts " + std::to_string(want));
                records += z;
                h += hb;
            }
        activations_[memory::kind::velora_records] = records;
        if (h.v != activations_[memory::kind::adapter_h].v) throw std::logic_error("lm::transformer: the adapters' H differ from memory.hpp's count");
    }

    // Compresses a linear input into the record backward reads. non_finite_input or overflow
    // means the activations diverged (NaN/Inf, or beyond the storage type's range) and the record
    // still holds the previous step's Z, so the step stops here, before backward could read it
    // and before any gradient reaches the sink. degenerate_input (an all-zero input: the
    // documented fallback v was used) wrote the record and goes on. The first compress of each
    // compressor goes through the hook first, when there is one (set_first_compress_hook).
    void keep_record(compressor_type& c, cview x, record_type& record, index_t layer, const char* input) {
        if (first_compress_ && !c.initialised()) first_compress_(c, x);
        const velora::status st = c.compress(x, record);
        if (st != velora::status::ok && st != velora::status::degenerate_input)
            throw std::runtime_error("lm::transformer::train_step: compressing layer " + std::to_string(layer) + "'s " + input +
                                     " returned status " + std::string(velora::to_string(st)) + ": training diverged");
    }

    // Per sequence and head: S = Q Kᵀ/√dh (causal), P = softmax(S), O = P V.
    void attention_forward(layer_state& L, index_t batch, T* o) {
        const index_t C = c_.context, d = c_.d_model, H = c_.heads, dh = dh_;
        const T scale = T(1) / std::sqrt(static_cast<T>(dh));
        for (index_t bi = 0; bi < batch; ++bi)
            for (index_t h = 0; h < H; ++h) {
                const index_t off = bi * C * d + h * dh;
                const cview q{L.q.data() + off, C, dh, d}, k{L.k.data() + off, C, dh, d}, v{L.v.data() + off, C, dh, d};
                T* p = L.p.data() + (bi * H + h) * C * C;
                const view pv{p, C, C, C};
                b_->gemm(velora::op::none, velora::op::transpose, scale, q, k, T(0), pv);
                for (index_t i = 0; i < C; ++i) {
                    T* row = p + i * C;
                    T mx = row[0];
                    for (index_t j = 1; j <= i; ++j) mx = std::max(mx, row[j]);
                    T sum = 0;
                    for (index_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - mx));
                    for (index_t j = 0; j <= i; ++j) row[j] /= sum;
                    for (index_t j = i + 1; j < C; ++j) row[j] = T(0);
                }
                b_->gemm(velora::op::none, velora::op::none, T(1), cview(pv), v, T(0), view{o + off, C, dh, d});
            }
    }

    // dq, dk, dv from do, given the kept q, k, v and probabilities.
    void attention_backward(layer_state& L, index_t batch) {
        const index_t C = c_.context, d = c_.d_model, H = c_.heads, dh = dh_;
        const T scale = T(1) / std::sqrt(static_cast<T>(dh));
        for (index_t bi = 0; bi < batch; ++bi)
            for (index_t h = 0; h < H; ++h) {
                const index_t off = bi * C * d + h * dh;
                const cview q{L.q.data() + off, C, dh, d}, k{L.k.data() + off, C, dh, d}, v{L.v.data() + off, C, dh, d};
                const cview dov{do_.data() + off, C, dh, d};
                const cview pv{L.p.data() + (bi * H + h) * C * C, C, C, C};
                const view dp{dsc_.data(), C, C, C};
                b_->gemm(velora::op::none, velora::op::transpose, T(1), dov, v, T(0), dp);                       // dP = dO Vᵀ
                b_->gemm(velora::op::transpose, velora::op::none, T(1), pv, dov, T(0), view{dv_.data() + off, C, dh, d});   // dV = Pᵀ dO
                for (index_t i = 0; i < C; ++i) {   // dS = P ⊙ (dP − rowsum(dP ⊙ P))
                    const T* prow = pv.row(i);
                    T* drow = dp.row(i);
                    T dot = 0;
                    for (index_t j = 0; j <= i; ++j) dot += drow[j] * prow[j];
                    for (index_t j = 0; j < C; ++j) drow[j] = j <= i ? prow[j] * (drow[j] - dot) : T(0);
                }
                b_->gemm(velora::op::none, velora::op::none, scale, cview(dp), k, T(0), view{dq_.data() + off, C, dh, d});        // dQ = dS K/√dh
                b_->gemm(velora::op::transpose, velora::op::none, scale, cview(dp), q, T(0), view{dk_.data() + off, C, dh, d});   // dK = dSᵀ Q/√dh
            }
    }

    // Weight gradient of a projection y = x Wᵀ: dense (dYᵀX into the grad buffer) or factored.
    void deliver_projection(gradient_sink<T>& sink, std::size_t index, cview dy, const T* x, index_t x_cols, compressor_type* comp,
                            const record_type* rec, aligned_vector<T>* a_buf) {
        if (comp) {
            const view a{a_buf->data(), dy.cols, rec->groups(), rec->groups()};
            comp->gradient_factor(*rec, dy, a);
            sink.factored(index, comp->factored(*rec, cview(a)));
        } else {
            velora::dense_weight_grad(*b_, dy, cview{x, dy.rows, x_cols, x_cols}, gview(index));
            sink.dense(index, cview(gview(index)));
        }
    }

    void backward(const int* tokens, index_t batch, gradient_sink<T>& sink) {
        const index_t C = c_.context, d = c_.d_model, f = c_.ffn, V = c_.vocab, n = batch * C;
        // Cross-entropy: dlogits = (p − onehot)/N, in place.
        const view dlogits = mv(probs_, n, V);
        const T inv_n = T(1) / static_cast<T>(n);
        for (index_t bi = 0; bi < batch; ++bi)
            for (index_t t = 0; t < C; ++t) {
                T* row = dlogits.row(bi * C + t);
                row[tokens[bi * (C + 1) + t + 1]] -= T(1);
                for (index_t j = 0; j < V; ++j) row[j] *= inv_n;
            }
        // Tied head: dhf = dlogits E; dE (head part) = dlogitsᵀ hf, completed by the input lookup below.
        const view dh = mv(dh_buf_, n, d);
        velora::linear_input_grad(*b_, cview(dlogits), cview(pview(token_embedding)), dh);
        if (!ad_.on) velora::dense_weight_grad(*b_, cview(dlogits), cview(mv(hf_, n, d)), gview(token_embedding));
        // Final norm.
        std::fill(dx_.begin(), dx_.begin() + n * d, T(0));
        const std::size_t fin = final_norm_index();
        rmsnorm_backward(xs_.back().data(), param(fin), rstdf_.data(), dh_buf_.data(), dx_.data(), params_[fin].grad, n);
        if (!ad_.on) sink.dense(fin, cview(gview(fin)));

        const view dxv = mv(dx_, n, d);
        for (index_t l = c_.layers - 1; l >= 0; --l) {
            auto& L = layers_[static_cast<std::size_t>(l)];
            const std::size_t base = layer_base(l);
            // MLP down: x_out = xmid + s W2ᵀ.
            const view dsv = mv(ds_, n, f);
            if (ad_.on) {
                adapted_backward(sink, L, 6, cview(dxv), dsv, false);
            } else {
                velora::linear_input_grad(*b_, cview(dxv), cview(pview(base + w2)), dsv);
                deliver_projection(sink, base + w2, cview(dxv), L.s.data(), f, L.comp_s.get(), &L.rec_s, &L.a_2);
            }
            // s = silu(a) ⊙ b: da overwrites ds_ in place, db overwrites L.a (a is not read again this step).
            for (index_t i = 0; i < n * f; ++i) {
                const std::size_t u = static_cast<std::size_t>(i);
                const T a = L.a[u], bu = L.bu[u], g = ds_[u];
                const T sg = sigmoid(a);
                ds_[u] = g * bu * sg * (T(1) + a * (T(1) - sg));   // da
                L.a[u] = g * a * sg;                               // db (a is no longer needed)
            }
            const cview dav(dsv), dbv{L.a.data(), n, f, f};
            // dh2 = da W1 + db W3, before W1, W3 are handed over.
            if (ad_.on) {
                adapted_backward(sink, L, 5, dbv, dh, false);
                adapted_backward(sink, L, 4, dav, dh, true);
            } else {
                velora::linear_input_grad(*b_, dbv, cview(pview(base + w3)), dh);
                b_->gemm(velora::op::none, velora::op::none, T(1), dav, cview(pview(base + w1)), T(1), dh);
                deliver_projection(sink, base + w3, dbv, L.h2.data(), d, nullptr, nullptr, nullptr);
                deliver_projection(sink, base + w1, dav, L.h2.data(), d, nullptr, nullptr, nullptr);
            }
            rmsnorm_backward(L.xmid.data(), param(base + norm2), L.rstd2.data(), dh_buf_.data(), dx_.data(), params_[base + norm2].grad, n);
            if (!ad_.on) sink.dense(base + norm2, cview(gview(base + norm2)));
            // Attention output: xmid = x + o Woᵀ.
            if (ad_.on) {
                adapted_backward(sink, L, 3, cview(dxv), mv(do_, n, d), false);
            } else {
                velora::linear_input_grad(*b_, cview(dxv), cview(pview(base + wo)), mv(do_, n, d));
                deliver_projection(sink, base + wo, cview(dxv), L.o.data(), d, nullptr, nullptr, nullptr);
            }
            attention_backward(L, batch);
            const cview dqv(mv(dq_, n, d)), dkv(mv(dk_, n, d)), dvv(mv(dv_, n, d));
            // dh1 = dv Wv + dk Wk + dq Wq, before the three are handed over.
            if (ad_.on) {
                adapted_backward(sink, L, 2, dvv, dh, false);
                adapted_backward(sink, L, 1, dkv, dh, true);
                adapted_backward(sink, L, 0, dqv, dh, true);
                if (l == 0) break;   // the embeddings are frozen: nothing reads the gradient below
            } else {
                velora::linear_input_grad(*b_, dvv, cview(pview(base + wv)), dh);
                b_->gemm(velora::op::none, velora::op::none, T(1), dkv, cview(pview(base + wk)), T(1), dh);
                b_->gemm(velora::op::none, velora::op::none, T(1), dqv, cview(pview(base + wq)), T(1), dh);
                compressor_type* c1 = L.comp_h1.get();
                deliver_projection(sink, base + wv, dvv, L.h1.data(), d, c1, &L.rec_h1, &L.a_v);
                deliver_projection(sink, base + wk, dkv, L.h1.data(), d, v_.share_qkv ? c1 : nullptr, &L.rec_h1, &L.a_k);
                deliver_projection(sink, base + wq, dqv, L.h1.data(), d, v_.share_qkv ? c1 : nullptr, &L.rec_h1, &L.a_q);
            }
            rmsnorm_backward(xs_[static_cast<std::size_t>(l)].data(), param(base + norm1), L.rstd1.data(), dh_buf_.data(), dx_.data(),
                             params_[base + norm1].grad, n);
            if (!ad_.on) sink.dense(base + norm1, cview(gview(base + norm1)));
        }
        if (ad_.on) return;   // embeddings frozen
        // Embeddings: dP[t] = Σ_b dx[b, t]; dE[id] += dx.
        T* gp = params_[position_embedding].grad;
        T* ge = params_[token_embedding].grad;
        std::fill(gp, gp + C * d, T(0));
        for (index_t bi = 0; bi < batch; ++bi)
            for (index_t t = 0; t < C; ++t) {
                const CVMap row(dx_.data() + (bi * C + t) * d, d);
                VMap(gp + t * d, d) += row;
                VMap(ge + tokens[bi * (C + 1) + t] * d, d) += row;
            }
        sink.dense(position_embedding, cview(gview(position_embedding)));
        sink.dense(token_embedding, cview(gview(token_embedding)));
    }

    // The count of activation_bytes(). A record whose bytes() differ from memory.hpp's formula
    // means the estimator (lm_train --estimate) would print something no run keeps: a bug here
    // or in the library's record layout, not a caller's mistake.
    void count_activations(index_t batch) {
        activations_ = memory::activations(c_, v_, batch, sizeof(T), ad_);
        if (ad_.on) {
            count_adapter_records(batch);
            return;
        }
        const memory::layer_records expected = memory::records(c_, v_, batch, sizeof(T));
        memory::count kept;
        for (const auto& L : layers_) {
            if (L.comp_h1) kept += L.rec_h1.bytes();
            if (L.comp_s) kept += L.rec_s.bytes();
            if ((L.comp_h1 && L.rec_h1.bytes() != expected.h1.v) || (L.comp_s && L.rec_s.bytes() != expected.s.v))
                throw std::logic_error("lm::transformer: a VeLoRA record holds " + std::to_string(L.comp_h1 ? L.rec_h1.bytes() : 0) + " + " +
                                       std::to_string(L.comp_s ? L.rec_s.bytes() : 0) + " bytes, examples/lm/memory.hpp counts " +
                                       std::to_string(expected.h1.v) + " + " + std::to_string(expected.s.v));
        }
        activations_[memory::kind::velora_records] = kept;
    }

    static constexpr double eps = 1e-5;

    backend_type* b_;
    model_config c_;
    velora_config v_;
    adapter_config ad_;
    index_t max_batch_;
    std::uint64_t seed_ = 0;
    std::uint64_t step_ = 0;          // train_steps taken (the dropout masks' step)
    std::size_t base_count_ = 0;      // base weights in params_ (the adapters follow)
    std::map<std::size_t, velora::nf4_weight> nf4_host_;   // NF4 projections between quantisation and build_adapters
    aligned_vector<T> tin_, txa_, tout_, dacc_, dxa_, eval_ws_;   // LoRA: transient inputs, recorded x_a, outputs of o and down; scratch
    index_t dh_ = 0, g_h1_ = 0, g_s_ = 0;
    std::vector<param_ref<T>> params_;
    std::vector<std::size_t> offsets_;
    aligned_vector<T> values_, grads_;
    std::vector<aligned_vector<T>> xs_;   // xs_[l]: input of layer l; xs_[layers]: input of the final norm
    std::vector<layer_state> layers_;
    aligned_vector<T> rstdf_, hf_, probs_;
    aligned_vector<T> tmp_h1_, tmp_s_;    // transient h1 / s when they are not kept
    aligned_vector<T> dx_, dh_buf_, dq_, dk_, dv_, do_, ds_, dsc_;
    memory::activation_bytes activations_;
    first_compress_hook first_compress_;
};

} // namespace lm
