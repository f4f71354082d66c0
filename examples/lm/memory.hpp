#pragma once
/// \file
/// The demo's memory accounting, in one place. model.hpp sizes its buffers and counts the
/// activations it keeps for backward from these functions; the trainer uses them to refuse runs
/// that would not fit (size_check.hpp), to cross-check the optimizer's state (training.hpp), and
/// to print the memory table of a model it does not train (`lm_train --estimate`, estimate.hpp).
/// Because the model, the size check and the estimator read the same formulas, an estimate for a
/// shape equals what a run of that shape counts (tests/demo_memory.cmake checks it for the presets).
///
/// Everything is counted for one training process of lm::transformer<T> (value size
/// sizeof(T), 4 for the demo's float) at `batch` sequences of `context` tokens, N = batch·context:
///   parameters   the model's weights (token embedding, which is also the tied output head;
///                position embedding; per layer two RMSNorm gains and seven projections; final gain),
///                with LoRA (adapter_config) the adapters too and the projections possibly NF4
///   gradients    one dense gradient buffer per trainable parameter (the model allocates them all, even
///                though the trainer's fused step reads one at a time; VeLoRA projections leave theirs unused;
///                with LoRA only the adapters are trainable)
///   optimizer    adarank::low_rank_adamw::state_bytes(): 2·rows·cols per densely optimised parameter,
///                r·(min(rows, cols) + 2·max(rows, cols)) per low-rank one at rank r, in values of
///                sizeof(T); 8-bit moments and quantised bases as state_storage says
///   activations  what one forward pass keeps for backward (below, by kind)
///   buffers      what the model allocates beyond that: backward scratch, VeLoRA's A buffers and
///                transient inputs, the compressors' spare Z
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <velora/core/storage.hpp>
#include <velora/core/view.hpp>
#include <velora/quant/nf4.hpp>

namespace lm {

using velora::index_t;

struct model_config {
    index_t vocab = 256, d_model = 128, heads = 4, layers = 2, ffn = 344, context = 64;
};

/// Which linear inputs keep a VeLoRA record instead of the activation.
struct velora_config {
    bool value = false;       ///< input of the value projection (h1 = RMSNorm output)
    bool down = false;        ///< input of the MLP down projection (s = silu(a)·b)
    bool share_qkv = false;   ///< q, k and v all use the one record of h1 (then h1 is not kept at all)
    /// Sub-tokens per token. Each compressor uses G = min(groups, its input width), so one
    /// value serves h1 (width d) and s (width ffn); groups >= max(d, ffn) gives s = 1 everywhere,
    /// where VeLoRA's gradient is exact.
    index_t groups = 32;
    /// Element type of the records' Z (f64 only with T = double).
    velora::storage z_storage = velora::storage::f32;
};

/// LoRA fine-tuning (the trainer's lora, velora+lora, qlora and velora+qlora configurations):
/// every projection of every layer (q, k, v, o, gate, up, down) is frozen and carries trainable
/// LoRA adapters A (r×D) and B (O×r), y = x·Wᵀ + (α/r)·(x_a·Aᵀ)·Bᵀ with x_a = dropout(x) (PEFT's
/// lora_dropout on the adapter path); the embeddings and the RMSNorm gains are frozen too, so A
/// and B are all that is trained. With it, velora_config.value and .down mean: the adapter
/// input x_a of v and of down is kept as a VeLoRA record (the official VeLoRA fine-tuning code's
/// choice) instead of exactly. `on` false: every weight is trainable (pretraining, full
/// fine-tuning, GaLore, AdaRankGrad).
struct adapter_config {
    bool on = false;
    bool nf4 = false;            ///< QLoRA: the frozen projections stored as NF4 with double quantisation; embeddings and gains stay float
    index_t rank = 8;            ///< r
    double alpha = 16;           ///< scaling α/r
    double dropout = 0.05;       ///< on x_a; 0: the adapters read the layer's input itself (which is then kept)
    double velora_scale = 0.1;   ///< VeLoRA's scale on A's compressed gradient (the official fine-tuning code's)
};

namespace memory {

/// A non-negative count of elements or bytes that saturates at UINT64_MAX instead of wrapping
/// around: the trainer evaluates these formulas for flags of up to 10^9 each (--context 10^9
/// asks for batch·heads·context² attention probabilities) before it allocates anything.
struct count {
    std::uint64_t v = 0;
    constexpr count() = default;
    template <class I>
    constexpr count(I x) : v(static_cast<std::uint64_t>(x)) {}   // from non-negative integers
    friend constexpr count operator+(count a, count b) {
        std::uint64_t r;
        return __builtin_add_overflow(a.v, b.v, &r) ? UINT64_MAX : r;
    }
    friend constexpr count operator*(count a, count b) {
        std::uint64_t r;
        return __builtin_mul_overflow(a.v, b.v, &r) ? UINT64_MAX : r;
    }
    constexpr count& operator+=(count b) { return *this = *this + b; }
    friend constexpr bool operator==(count a, count b) { return a.v == b.v; }
};

// ------------------------------------------------------------------------------- parameters

/// One parameter's shape. `projection`: a layer's q, k, v, o or MLP matrix, the matrices the
/// low-rank configurations project (GaLore's "attn" and "mlp" modules); embeddings and RMSNorm
/// gains are always optimised densely.
struct parameter_shape {
    const char* name;
    index_t rows, cols;
    bool matrix;       ///< false for the RMSNorm gains (1×d vectors)
    bool projection;
};

/// One layer's parameters, in the model's order (model.hpp's `slot`): norm1, wq, wk, wv, wo,
/// norm2, w1 (gate), w3 (up), w2 (down). Weights are stored rows = out, cols = in (y = x Wᵀ).
inline std::array<parameter_shape, 9> layer_parameters(const model_config& c) {
    const index_t d = c.d_model, f = c.ffn;
    return {{{"norm1", 1, d, false, false},
             {"wq", d, d, true, true},
             {"wk", d, d, true, true},
             {"wv", d, d, true, true},
             {"wo", d, d, true, true},
             {"norm2", 1, d, false, false},
             {"w1", f, d, true, true},
             {"w3", f, d, true, true},
             {"w2", d, f, true, true}}};
}
/// Before the layers: the token embedding (vocab×d, also the tied output head) and the learned
/// positions (context×d). After them: the final RMSNorm gain.
inline std::array<parameter_shape, 2> embedding_parameters(const model_config& c) {
    return {{{"embed.token", c.vocab, c.d_model, true, false}, {"embed.position", c.context, c.d_model, true, false}}};
}
inline parameter_shape final_norm_parameter(const model_config& c) { return {"norm.final", 1, c.d_model, false, false}; }

/// The slots of layer_parameters() that are projections, in that order (q, k, v, o, gate, up,
/// down), and their index there.
inline constexpr std::array<std::size_t, 7> projection_slots = {1, 2, 3, 4, 6, 7, 8};

/// One layer's LoRA adapters (adapter_config::on), in the model's order: per projection of
/// projection_slots A (r×D) then B (O×r), named "<projection>.lora_a" / ".lora_b".
inline std::array<parameter_shape, 14> layer_adapters(const model_config& c, const adapter_config& a) {
    static constexpr const char* names[14] = {"wq.lora_a", "wq.lora_b", "wk.lora_a", "wk.lora_b", "wv.lora_a", "wv.lora_b", "wo.lora_a",
                                              "wo.lora_b", "w1.lora_a", "w1.lora_b", "w3.lora_a", "w3.lora_b", "w2.lora_a", "w2.lora_b"};
    const auto layer = layer_parameters(c);
    std::array<parameter_shape, 14> out{};
    for (std::size_t k = 0; k < projection_slots.size(); ++k) {
        const parameter_shape& w = layer[projection_slots[k]];
        out[2 * k] = {names[2 * k], a.rank, w.cols, true, false};
        out[2 * k + 1] = {names[2 * k + 1], w.rows, a.rank, true, false};
    }
    return out;
}

/// Elements of all adapters (0 unless adapter_config::on): what LoRA trains.
inline count adapter_count(const model_config& c, const adapter_config& a) {
    if (!a.on) return {};
    count layer;
    for (const auto& p : layer_adapters(c, a)) layer += count(p.rows) * p.cols;
    return count(c.layers) * layer;
}

/// The NF4 block size of a frozen projection with rows of `cols` weights: QLoRA's 64 where it
/// divides the row, else the even divisor of `cols` nearest 64 (the larger on a tie; blocks may
/// not straddle rows): 86 for the default model's SwiGLU width 344. 0 when `cols` is odd.
inline index_t nf4_block_for(index_t cols) {
    if (cols % 64 == 0) return 64;
    index_t best = 0;
    for (index_t b = 2; b <= cols; b += 2)
        if (cols % b == 0 && (best == 0 || (b > 64 ? b - 64 : 64 - b) <= (best > 64 ? best - 64 : 64 - best))) best = b;
    return best;
}
inline velora::nf4_options nf4_options_for(index_t cols) { return {.block_size = nf4_block_for(cols), .double_quant = true}; }
/// Rows per dequantised tile of an NF4 projection: tiles of at most 4096 values (16 KiB in float),
/// so that the workspace each adapted layer owns (lora_linear's copy of the base's workspace)
/// stays small next to the packed weight (the library's default, 2^22 values, would be a float
/// copy of every small matrix).
inline index_t nf4_tile_rows(index_t rows, index_t cols) { return std::clamp<index_t>(4096 / std::max<index_t>(cols, 1), 1, rows); }

/// Bytes the weights occupy as stored: every parameter in `value_size` bytes, except with
/// adapter_config::nf4 the projections, which are NF4 packed (nf4_weight::stored_bytes: codes,
/// block codes, group scales and mean), plus the adapters.
inline count weight_bytes(const model_config& c, const adapter_config& a, std::size_t value_size) {
    count outer = count(c.d_model), layer;
    for (const auto& p : embedding_parameters(c)) outer += count(p.rows) * p.cols;
    const auto params = layer_parameters(c);
    for (const auto& p : params)
        if (!(a.on && a.nf4 && p.projection)) layer += count(p.rows) * p.cols * value_size;
        else layer += count(velora::nf4_weight::stored_bytes_for(p.rows, p.cols, nf4_options_for(p.cols)));
    return outer * value_size + count(c.layers) * layer + adapter_count(c, a) * value_size;
}

/// Number of weights (closed form: it is evaluated for any flags, before a model exists).
inline count parameter_count(const model_config& c) {
    count layer, outer = count(c.d_model);
    for (const auto& p : layer_parameters(c)) layer += count(p.rows) * p.cols;
    for (const auto& p : embedding_parameters(c)) outer += count(p.rows) * p.cols;
    return outer + count(c.layers) * layer;
}

// -------------------------------------------------------------------------------- optimizer

/// Optimizer-state elements of one parameter: dense AdamW keeps two moments (2·rows·cols); a
/// low-rank parameter at rank r keeps its basis (r × the shorter side) and two projected moments
/// (r × the longer side each), as adarank::low_rank_adamw does with its default side policy
/// (project onto the shorter side). `rank` <= 0 means dense; a rank above min(rows, cols) is
/// capped there, as the optimizer caps it.
inline count state_elements(const parameter_shape& p, index_t rank) {
    if (rank <= 0 || !p.projection) return count(2) * p.rows * p.cols;
    const index_t shorter = std::min(p.rows, p.cols), longer = std::max(p.rows, p.cols);
    return count(std::min(rank, shorter)) * (count(shorter) + count(2) * longer);
}

/// How the optimizer stores its state (the configuration keys state=8bit and basis=int8|int4):
/// `state_block` > 0: 8-bit moments, one byte per element plus one float absmax per block of
/// state_block, per moment; `basis_bits` 8 or 4: a low-rank parameter's basis quantised to that
/// many bits per element (int4: two per byte, a row of len values in ceil(len/2) bytes) plus one
/// float scale per block of basis_block within each row (adarank/basis_format.hpp). Zeros: float.
struct state_storage {
    index_t state_block = 0;
    index_t basis_bits = 0;
    index_t basis_block = 256;
};

/// Optimizer-state bytes of one parameter: state_elements in value_size bytes, with the moments
/// and the basis as `s` stores them.
inline count state_bytes(const parameter_shape& p, index_t rank, std::size_t value_size, const state_storage& s = {}) {
    if (s.state_block <= 0 && s.basis_bits <= 0) return state_elements(p, rank) * value_size;
    const bool low = rank > 0 && p.projection;
    const index_t shorter = std::min(p.rows, p.cols), longer = std::max(p.rows, p.cols), r = std::min(rank, shorter);
    const count moment = low ? count(r) * longer : count(p.rows) * p.cols;
    const auto blocks = [](count n, index_t block) { return count((n.v + static_cast<std::uint64_t>(block) - 1) / static_cast<std::uint64_t>(block)); };
    const count moments = s.state_block > 0 ? count(2) * moment + count(2 * sizeof(float)) * blocks(moment, s.state_block) : count(2) * moment * value_size;
    if (!low) return moments;
    if (s.basis_bits <= 0) return moments + count(r) * shorter * value_size;
    const count row_codes = s.basis_bits == 4 ? count((shorter + 1) / 2) : count(shorter);
    return moments + count(r) * (row_codes + count(sizeof(float)) * blocks(count(shorter), s.basis_block));
}

/// Optimizer-state bytes of the whole model: dense AdamW everywhere (`rank` <= 0), or every
/// projection low-rank at `rank` (GaLore's fixed rank; AdaRankGrad's cap, which bounds its
/// data-dependent ranks from above); `s` as for state_bytes.
/// With adapter_config::on: AdamW's two moments of every adapter (nothing else is trained).
inline count optimizer_state_bytes(const model_config& c, index_t rank, std::size_t value_size, const adapter_config& a = {}, const state_storage& s = {}) {
    if (a.on) return count(2) * adapter_count(c, a) * value_size;
    count layer, outer = state_bytes(final_norm_parameter(c), 0, value_size, s);
    for (const auto& p : layer_parameters(c)) layer += state_bytes(p, rank, value_size, s);
    for (const auto& p : embedding_parameters(c)) outer += state_bytes(p, 0, value_size, s);
    return outer + count(c.layers) * layer;
}

// ------------------------------------------------------------------------------ activations

/// What the activations kept for backward are, for the breakdown. VeLoRA can replace only a
/// linear layer's input (its weight gradient dYᵀX is the one product that reads it); everything
/// else backward reads is an input of something other than a product with a weight.
enum class kind : std::size_t {
    norm_inputs,       ///< residual stream entering each RMSNorm (x, x after attention) + 1/rms per token
    linear_inputs,     ///< exact inputs of projections: h1 (q, k, v), o (Wo), h2 (W1, W3), s (W2), final hf (head); LoRA: the adapters' inputs x_a
    velora_records,    ///< VeLoRA records that replace some of those (Z of T×G + v)
    attention_qkv,     ///< q, k, v: inputs of QKᵀ and PV, products of two activations
    attention_probs,   ///< softmax(QKᵀ/√dh): batch·heads·context² per layer
    swiglu,            ///< a = h2 W1ᵀ and b = h2 W3ᵀ, read by the SiLU-gate backward
    output_probs,      ///< output softmax, N·vocab (turned into dlogits in place)
    adapter_h,         ///< LoRA: H = x_a·Aᵀ (N·r) of every adapter, B's input
};
inline constexpr std::size_t kinds = 8;
/// Keys of the JSON breakdown and column heads of the tables, in `kind` order.
inline constexpr std::array<const char*, kinds> kind_keys = {"norm_inputs",  "linear_inputs",   "velora_records", "attention_qkv",
                                                             "attention_probs", "swiglu", "output_probs", "adapter_h"};
inline constexpr std::array<const char*, kinds> kind_heads = {"norm in", "linear in", "records", "q,k,v", "attn probs", "SwiGLU a,b",
                                                              "out softmax", "LoRA H"};

/// Elements one layer keeps for backward at `batch` sequences (0 where a buffer is not kept).
/// model.hpp allocates each of these buffers at max_batch and backward reads them.
///
/// With LoRA (adapter_config::on) the projections are frozen, so nothing keeps their inputs for
/// a weight gradient: h1, o, h2 and s are kept only as the adapters' own input x_a, i.e. when
/// there is no dropout (x_a = the input, one buffer for q, k and v); with dropout every adapter
/// has its own x_a = dropout(input) (`xa`), except v and down when their x_a is a VeLoRA record.
struct layer_activations {
    count x, rstd1;        ///< layer input (RMSNorm1's input) and its 1/rms, per token
    count h1;              ///< RMSNorm1's output, input of q, k, v; not kept with share_qkv (the record stands for it)
    count q, k, v, probs;  ///< attention: q, k, v and the probabilities (the full square incl. the masked zeros)
    count o;               ///< attention output, Wo's input
    count xmid, rstd2;     ///< x after attention (RMSNorm2's input) and its 1/rms
    count h2;              ///< RMSNorm2's output, input of W1 and W3
    count a, b;            ///< gate and up branches
    count s;               ///< silu(a)·b, W2's input; not kept when its record is
    count xa;              ///< LoRA with dropout: the adapters' dropped-out inputs (one per adapter not recorded)
    count h;               ///< LoRA: H = x_a·Aᵀ of the seven adapters (kept in their records, not in the model's buffers)
};
inline layer_activations layer_kept(const model_config& c, const velora_config& v, index_t batch, const adapter_config& ad = {}) {
    const count N = count(batch) * c.context, d = c.d_model, f = c.ffn;
    layer_activations k;
    k.x = N * d;
    k.rstd1 = N;
    k.q = k.k = k.v = N * d;
    k.probs = count(batch) * c.heads * c.context * c.context;
    k.xmid = N * d;
    k.rstd2 = N;
    k.a = k.b = N * f;
    if (!ad.on) {
        k.h1 = v.share_qkv ? count() : N * d;
        k.o = N * d;
        k.h2 = N * d;
        k.s = v.down ? count() : N * f;
        return k;
    }
    const bool exact_input = !(ad.dropout > 0);
    if (exact_input) {
        k.h1 = k.o = k.h2 = N * d;
        k.s = v.down ? count() : N * f;
    } else {
        k.xa = N * d * (v.value ? 5 : 6) + (v.down ? count() : N * f);   // q, k, (v), o, gate, up; (down)
    }
    k.h = count(7) * N * ad.rank;
    return k;
}

/// Elements kept after the last layer: its output (the final RMSNorm's input) and 1/rms, the
/// normalised hf (input of the tied head; with LoRA the embedding is frozen and nothing reads
/// it in backward), the softmax probabilities.
struct final_activations {
    count x, rstd, hf, probs;
};
inline final_activations final_kept(const model_config& c, index_t batch, const adapter_config& ad = {}) {
    const count N = count(batch) * c.context;
    return {N * c.d_model, N, ad.on ? count() : N * c.d_model, N * c.vocab};
}

/// Whether layer inputs are recorded by VeLoRA: h1 (value projection, or q, k, v with share_qkv), s (MLP down).
/// With LoRA: the adapter input x_a of v (width d) and of down (width ffn).
inline bool records_h1(const velora_config& v) { return v.value || v.share_qkv; }
inline bool records_s(const velora_config& v) { return v.down; }
/// Sub-tokens per token of the compressor of a `width`-wide input: G = min(groups, width).
inline index_t groups_for(const velora_config& v, index_t width) { return std::min(v.groups, width); }
inline index_t subtoken_size(index_t width, index_t groups) { return (width + groups - 1) / groups; }

/// velora::activation_record::bytes() of a record of `tokens` rows of a `width`-wide input:
/// T·G·sizeof(storage) + s·value_size (the copy of v it was projected with).
inline count record_bytes(count tokens, index_t width, index_t groups, velora::storage z, std::size_t value_size) {
    return tokens * groups * velora::storage_bytes(z) + count(subtoken_size(width, groups)) * value_size;
}

/// Bytes of one layer's records at `batch` sequences (0 where none).
struct layer_records {
    count h1, s;
};
inline layer_records records(const model_config& c, const velora_config& v, index_t batch, std::size_t value_size) {
    const count N = count(batch) * c.context;
    layer_records r;
    if (records_h1(v)) r.h1 = record_bytes(N, c.d_model, groups_for(v, c.d_model), v.z_storage, value_size);
    if (records_s(v)) r.s = record_bytes(N, c.ffn, groups_for(v, c.ffn), v.z_storage, value_size);
    return r;
}

/// Bytes kept for backward by one forward pass, by kind.
struct activation_bytes {
    std::array<count, kinds> by_kind{};
    count& operator[](kind k) { return by_kind[static_cast<std::size_t>(k)]; }
    count operator[](kind k) const { return by_kind[static_cast<std::size_t>(k)]; }
    [[nodiscard]] count total() const {
        count t;
        for (count x : by_kind) t += x;
        return t;
    }
};
inline activation_bytes activations(const model_config& c, const velora_config& v, index_t batch, std::size_t value_size, const adapter_config& ad = {}) {
    const layer_activations a = layer_kept(c, v, batch, ad);
    const layer_records r = records(c, v, batch, value_size);
    const final_activations f = final_kept(c, batch, ad);
    const count L = c.layers;
    activation_bytes out;
    out[kind::norm_inputs] = (L * (a.x + a.rstd1 + a.xmid + a.rstd2) + f.x + f.rstd) * value_size;
    out[kind::linear_inputs] = (L * (a.h1 + a.o + a.h2 + a.s + a.xa) + f.hf) * value_size;
    out[kind::velora_records] = L * (r.h1 + r.s);
    out[kind::attention_qkv] = L * (a.q + a.k + a.v) * value_size;
    out[kind::attention_probs] = L * a.probs * value_size;
    out[kind::swiglu] = L * (a.a + a.b) * value_size;
    out[kind::output_probs] = f.probs * value_size;
    out[kind::adapter_h] = L * a.h * value_size;
    return out;
}

// ------------------------------------------------------------------- what a process allocates

/// Elements of model.hpp's own buffers for `max_batch` sequences, by purpose. lm::transformer
/// allocates exactly these (tests/test_lm_model.cpp compares them with its vectors' sizes).
struct model_buffers {
    count parameters;  ///< float values: every weight, or with LoRA the embeddings, gains, adapters and (unless NF4) the frozen projections
    count gradients;   ///< one buffer per trainable weight
    count kept;        ///< the activation buffers of layer_kept and final_kept, at max_batch (LoRA's H lives in its records: not here)
    count transient;   ///< inputs computed but not kept: h1 / s for a record (share_qkv / down); with LoRA h1, o, h2, s, hf, the recorded x_a, the outputs of o and down
    count a_buffers;   ///< VeLoRA factored gradients' A (out × G) per recorded projection; with LoRA A's factor (r × G)
    count scratch;     ///< backward: dx, dh, dq, dk, dv, do (N·d each), ds (N·ffn), one head's dP (context²); LoRA: dX_a and a sum
    [[nodiscard]] count total() const { return parameters + gradients + kept + transient + a_buffers + scratch; }
};
inline model_buffers buffers(const model_config& c, const velora_config& v, index_t max_batch, const adapter_config& ad = {}) {
    const layer_activations a = layer_kept(c, v, max_batch, ad);
    const final_activations f = final_kept(c, max_batch, ad);
    const count N = count(max_batch) * c.context, d = c.d_model, ff = c.ffn, L = c.layers;
    const count g1 = groups_for(v, c.d_model), g2 = groups_for(v, c.ffn);
    model_buffers m;
    m.kept = L * (a.x + a.rstd1 + a.h1 + a.q + a.k + a.v + a.probs + a.o + a.xmid + a.rstd2 + a.h2 + a.a + a.b + a.s + a.xa) + f.x + f.rstd +
             f.hf + f.probs;
    m.scratch = count(6) * N * d + N * ff + count(c.context) * c.context;
    if (!ad.on) {
        m.parameters = m.gradients = parameter_count(c);
        if (v.share_qkv) m.transient += N * d;
        if (records_s(v)) m.transient += N * ff;
        if (records_h1(v)) m.a_buffers += L * d * g1 * (v.share_qkv ? 3 : 1);   // A of v (and of q, k)
        if (records_s(v)) m.a_buffers += L * d * g2;                            // A of W2
        return m;
    }
    count projections;
    for (std::size_t slot : projection_slots) projections += count(layer_parameters(c)[slot].rows) * layer_parameters(c)[slot].cols;
    m.gradients = adapter_count(c, ad);
    // Every weight in float and the adapters; with NF4 the projections are the library's packed
    // weights instead (parameter_count includes them; weight_bytes counts their bytes).
    m.parameters = count((parameter_count(c) + m.gradients).v - (ad.nf4 ? (count(c.layers) * projections).v : 0));
    const count widest = std::max(d.v, ff.v);
    const bool exact_input = !(ad.dropout > 0);
    m.transient = N * d;                                          // o's and down's output before the residual add
    m.transient += N * d;                                         // hf (nothing reads it in backward)
    if (!exact_input) m.transient += N * widest;                  // h1, o, h2, s in turn
    else if (records_s(v)) m.transient += N * ff;                 // s, when its x_a (s itself) is recorded
    if (!exact_input && (records_h1(v) || records_s(v))) m.transient += N * (records_s(v) ? widest : d);   // the recorded x_a
    if (records_h1(v)) m.a_buffers += L * ad.rank * g1;
    if (records_s(v)) m.a_buffers += L * ad.rank * g2;
    m.scratch += N * d;                                           // a second input gradient, summed into dh (and H in evaluation)
    if (!exact_input) m.scratch += N * widest;                    // dX_a, sent back through the dropout mask
    if (ad.nf4) {                                                 // an NF4 tile for evaluation's products (training's are the layers')
        count tile;
        for (std::size_t slot : projection_slots) {
            const parameter_shape p = layer_parameters(c)[slot];
            tile = std::max(tile.v, (count(nf4_tile_rows(p.rows, p.cols)) * p.cols).v);
        }
        m.scratch += tile;
    }
    return m;
}

/// The memory of one training process as the estimator prints it (bytes).
struct footprint {
    count weights, gradients, optimizer, activations, other;
    activation_bytes by_kind;
    /// Everything counted: weights, gradient buffers, optimizer state, activations kept and the
    /// rest of the model's buffers. Not counted: the library's scratch (GEMM packing, the
    /// optimizer's refresh workspace, the SVD), the corpus, the loss curve, code and libraries.
    [[nodiscard]] count total() const { return weights + gradients + optimizer + activations + other; }
};
/// `rank`, `s` as for optimizer_state_bytes (<= 0: dense AdamW; default: float state).
inline footprint estimate(const model_config& c, const velora_config& v, index_t batch, index_t rank, std::size_t value_size,
                          const adapter_config& ad = {}, const state_storage& s = {}) {
    const model_buffers m = buffers(c, v, batch, ad);
    const count N = count(batch) * c.context, L = c.layers;
    footprint fp;
    fp.weights = ad.on ? weight_bytes(c, ad, value_size) : m.parameters * value_size;
    fp.gradients = m.gradients * value_size;
    fp.optimizer = optimizer_state_bytes(c, rank, value_size, ad, s);
    fp.by_kind = activations(c, v, batch, value_size, ad);
    fp.activations = fp.by_kind.total();
    // The model's other buffers, and each compressor's spare Z (velora::compressor projects into it
    // and swaps it with the record's on success: T·G·sizeof(storage) beyond the record).
    fp.other = (m.transient + m.a_buffers + m.scratch) * value_size;
    if (records_h1(v)) fp.other += L * N * groups_for(v, c.d_model) * velora::storage_bytes(v.z_storage);
    if (records_s(v)) fp.other += L * N * groups_for(v, c.ffn) * velora::storage_bytes(v.z_storage);
    if (ad.on) {
        // Each adapted layer's spare H (swapped with its record's on success, as Z) and P (T·r
        // each), and with NF4 its dequantised tile (nf4_tile_rows · D values).
        fp.other += L * count(7) * count(2) * N * ad.rank * value_size;
        if (ad.nf4)
            for (std::size_t slot : projection_slots) {
                const parameter_shape p = layer_parameters(c)[slot];
                fp.other += L * count(nf4_tile_rows(p.rows, p.cols)) * p.cols * value_size;
            }
    }
    return fp;
}

/// The two kinds of layer the VeLoRA paper's fine-tuning wraps, v and down, on their own: their
/// weights as stored (with LoRA the frozen W, float or NF4, and the two adapters) and what they
/// keep for backward (their inputs, exactly or as VeLoRA records, and LoRA's H), over all layers.
/// The paper's memory estimates for LLaMA-7B and 13B (LoRA bf16, QLoRA, +VeLoRA) are of this
/// scope as far as their figures show (docs/memory.md).
struct scope_bytes {
    count weights, kept;
    [[nodiscard]] count total() const { return weights + kept; }
};
inline scope_bytes velora_scope(const model_config& c, const velora_config& v, index_t batch, std::size_t value_size, const adapter_config& ad = {}) {
    const count N = count(batch) * c.context, d = c.d_model, f = c.ffn, L = c.layers;
    const layer_records r = records(c, v, batch, value_size);
    scope_bytes s;
    if (ad.on && ad.nf4) {
        s.weights = count(velora::nf4_weight::stored_bytes_for(c.d_model, c.d_model, nf4_options_for(c.d_model))) +
                    count(velora::nf4_weight::stored_bytes_for(c.d_model, c.ffn, nf4_options_for(c.ffn)));
    } else {
        s.weights = (d * d + d * f) * value_size;
    }
    if (ad.on) s.weights += count(ad.rank) * (d + d + f + d) * value_size;   // A and B of v (d×d) and of down (d×ffn)
    s.kept = (records_h1(v) ? r.h1 : N * d * value_size) + (records_s(v) ? r.s : N * f * value_size);
    if (ad.on) s.kept += count(2) * N * ad.rank * value_size;
    return {L * s.weights, L * s.kept};
}

} // namespace memory
} // namespace lm
