#pragma once
/// \file
/// `VeloraLoRALinear`: LoRA (PEFT's conventions) on a frozen torch::nn::Linear, optionally with a
/// VeLoRA record of the adapter input and the base weight stored as bf16 or NF4
/// (docs/finetuning.md, "libtorch"). With s = lora_alpha / r and x_a = dropout(x) in training
/// mode (x otherwise):
///
///     H = x_a·Aᵀ,   y = x·Wᵀ + b + s·H·Bᵀ,
///     dB = s·dYᵀ·H,   P = s·dY·B,   dA = Pᵀ·x_a  (or VeLoRA's scale·(Pᵀ·Z)·(I_G ⊗ vᵀ)),
///     dX = dY·W  (+ P·A when x_a = x; otherwise P·A goes back through dropout's mask).
///
/// Why not velora::lora_linear itself: it holds views of A, B and W fixed at construction and
/// one record in library memory, while torch may replace a parameter's storage at any time
/// (torch::load, Module::to) and autograd needs each forward's record owned by that forward
/// (several forwards before one backward, gradient accumulation). So the autograd function
/// below performs lora_linear's products in its order on the same backend (eigen_backend<float>,
/// the same GEMM engine and the same bits at any thread count), on views of the tensors of the
/// call, and the record (H, and x_a or VeLoRA's Z and v) is made of torch tensors saved with
/// save_for_backward. The frozen base's products are the library's: dense_frozen_weight's GEMMs
/// for float, and for bf16 and NF4 the tiled products of quant/tiled_products.hpp, which widen
/// one tile of rows at a time into a small workspace, reading the packed torch buffers in place
/// (never a dense copy of W).
///
/// - Trainable parameters are `lora_A` (r×D) and `lora_B` (O×r) only: parameters() lists just
///   them, so an optimizer built on parameters() steps nothing else. The base is buffers (torch
///   saves and loads buffers, no optimizer sees them): `weight` (float32 or bfloat16) and
///   `bias`, or for NF4 the packed `nf4_codes` (uint8, O·D/2) and `nf4_absmax` (float32, one per
///   block) or, double-quantised, `nf4_absmax_codes` (int8), `nf4_absmax_scales` (float32) and
///   `nf4_absmax_mean` (float32, one value). `merged` (uint8, one value) says whether `weight`
///   holds W + s·B·A. VeLoRA adds `v` and `velora_state` as VeloraLinear does (linear.hpp).
/// - A float32 base shares the wrapped Linear's weight and bias storage (PEFT keeps the same
///   module): merge() writes it in place.
/// - Parameters are float32 on the CPU. x may be float32, float16 or bfloat16 (cast to float32
///   for the products; y and dX come back in x's dtype). float64 is refused: computing it in
///   float32 would silently lose its precision.
/// - Numerical events: an x_a with NaN/Inf cannot be recorded by VeLoRA; y is still computed,
///   last_status() says why and dA is NaN (VeloraLinear's rule), so a GradScaler or a
///   whole-step check skips the step.
/// - Double backward is not supported (the backward is not built from torch operations).
#include <ATen/ATen.h>
#include <torch/arg.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/init.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include <velora/compressor.hpp>
#include <velora/core/error.hpp>
#include <velora/core/storage.hpp>
#include <velora/finetune/frozen_weight.hpp>
#include <velora/quant/nf4.hpp>
#include <velora/quant/tiled_products.hpp>

#include "backend.hpp"
#include "compressor_buffers.hpp"
#include "linear.hpp"
#include "view.hpp"

namespace velora::torch {

/// How the frozen base weight is stored.
enum class base_storage : std::uint8_t {
    f32 = 0,    ///< float32, shared with the wrapped Linear (merge()/unmerge() allowed)
    bf16 = 1,   ///< bfloat16, round to nearest even (16 bits per weight)
    nf4 = 2,    ///< QLoRA's NF4, blocks of nf4_block_size (4.5 bits per weight at 64; ≈ 4.127 double-quantised)
};

/// PEFT's LoraConfig as far as one layer goes (defaults are PEFT's: r = 8, lora_alpha = 8, no
/// dropout), plus VeLoRA's and the base storage's settings.
struct LoRAOptions {
    TORCH_ARG(std::int64_t, r) = 8;             ///< 1 <= r <= min(O, D)
    TORCH_ARG(double, lora_alpha) = 8;          ///< scaling s = lora_alpha / r (finite, non-zero)
    TORCH_ARG(double, lora_dropout) = 0.0;      ///< on the adapter path's input, training mode only; 0 <= p < 1
    TORCH_ARG(bool, use_velora) = false;        ///< keep a VeLoRA record of x_a (not x_a) for A's gradient
    TORCH_ARG(std::int64_t, groups) = 32;       ///< VeLoRA's G, 1 <= G <= D
    TORCH_ARG(double, velora_scale) = 0.1;      ///< multiplies A's compressed gradient (the official code's 0.1)
    TORCH_ARG(velora::v_mode, v) = velora::v_mode::first_batch_mean();
    TORCH_ARG(velora::storage, z_storage) = velora::storage::f32;   ///< f32, f16 or bf16
    TORCH_ARG(base_storage, base) = base_storage::f32;
    TORCH_ARG(std::int64_t, nf4_block_size) = 64;   ///< even, divides D
    TORCH_ARG(bool, nf4_double_quant) = false;
};

namespace detail {

/// What a VeloraLoRALinear shares with its autograd nodes (kept alive by the graph).
struct lora_state : ::torch::CustomClassHolder {
    using backend_type = eigen_backend<float>;
    using compressor_type = compressor<backend_type>;

    std::mutex mutex;
    threads_following<float> backend;
    std::optional<compressor_type> comp;   // use_velora only
    compressor_type::record_type staging;
    published_compressor_state published;  // what the buffers velora_state and v hold (use_velora only)
    std::vector<float> workspace;          // one tile of a narrow base (bf16, NF4)
    float scaling = 1;
    base_storage base = base_storage::f32;
    std::int64_t block_size = 64, tile_rows = 1, out = 0, in = 0;
    // reports (under the lock)
    std::size_t record_bytes = 0, input_bytes = 0;
    status last_status = status::ok;
};

/// The base weight as the products read it: `w` is the float32/bfloat16 weight or the NF4
/// codes, `s1` the NF4 absmaxes (or their int8 codes), `s2` the double quantisation's scales,
/// `s3` its mean (one float). Unused tensors are empty.
inline nf4_blocks nf4_blocks_of(const lora_state& st, const at::Tensor& w, const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& s3) {
    nf4_blocks b;
    b.codes = w.data_ptr<std::uint8_t>();
    if (s1.scalar_type() == at::kFloat) {
        b.absmax = s1.data_ptr<float>();
    } else {
        b.absmax_codes = s1.data_ptr<std::int8_t>();
        b.absmax_scales = s2.data_ptr<float>();
        b.absmax_mean = s3.data_ptr<float>()[0];
    }
    b.rows = st.out;
    b.cols = st.in;
    b.block_size = st.block_size;
    return b;
}

/// y = x·Wᵀ (overwritten) or, with `input_grad`, dx = dy·W, for any base storage.
inline void base_product(lora_state& st, eigen_backend<float>& b, bool input_grad, const at::Tensor& w, const at::Tensor& s1,
                         const at::Tensor& s2, const at::Tensor& s3, const_matrix_view<float> in, matrix_view<float> out) {
    if (st.base == base_storage::f32) {
        const dense_frozen_weight<eigen_backend<float>> dense(view_of<float>(w, "weight", flatten::outputs_first));
        if (input_grad) dense.input_grad(b, in, out, {});
        else dense.forward(b, in, out, {});
        return;
    }
    st.workspace.resize(static_cast<std::size_t>(st.tile_rows * st.in));
    float* ws = st.workspace.data();
    auto run = [&](auto&& dequantize) {
        if (input_grad) velora::detail::tiled_input_grad(b, st.out, st.in, st.tile_rows, in, out, ws, dequantize);
        else velora::detail::tiled_forward(b, st.out, st.in, st.tile_rows, in, out, ws, dequantize);
    };
    if (st.base == base_storage::bf16) {
        // at::BFloat16 and velora::bfloat16 are both the upper 16 bits of a float in a 16-bit struct.
        const auto* p = reinterpret_cast<const velora::bfloat16*>(w.data_ptr());
        run([&](index_t r0, matrix_view<float> tile) { b.convert(const_matrix_view<velora::bfloat16>(p + r0 * st.in, tile.rows, st.in, st.in), tile); });
    } else {
        const nf4_blocks blocks = nf4_blocks_of(st, w, s1, s2, s3);
        run([&](index_t r0, matrix_view<float> tile) { b.dequantize_nf4(blocks, r0, tile); });
    }
}

struct lora_function : public ::torch::autograd::Function<lora_function> {
    // x: [..., D]; xa: dropout(x), or undefined when the adapter path reads x itself; w, s1..s3:
    // the base (see base_product); adapters = false computes the base alone (merged layer);
    // record: keep what A's gradient needs.
    // An absent optional (xa, bias) is no input edge: needs_input_grad counts the present ones
    // only, so backward computes the indices of A and B (a_edge).
    static at::Tensor forward(::torch::autograd::AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& xa_arg,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, const c10::optional<at::Tensor>& bias_arg, const at::Tensor& w,
                              const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& s3, const c10::intrusive_ptr<lora_state>& state,
                              bool adapters, bool record) {
        constexpr const char* fn = "velora::torch::VeloraLoRALinear::forward";
        lora_state& st = *state;   // the caller (VeloraLoRALinearImpl::forward) holds st.mutex
        auto& b = st.backend.get();
        const at::Tensor xa = xa_arg ? *xa_arg : at::Tensor(), bias = bias_arg ? *bias_arg : at::Tensor();
        const bool separate = xa.defined();
        const matrix_input<float> xin(x, "x", flatten::features_last, fn);
        const auto xv = xin.view();
        std::optional<matrix_input<float>> xain;
        if (separate) xain.emplace(xa, "x_adapter", flatten::features_last, fn);
        const auto xav = separate ? xain->view() : xv;
        const index_t t = xv.rows, o = st.out;
        const index_t r = adapters ? lora_a.size(0) : 0;

        at::Tensor y = at::empty(with_last(x.sizes(), o), at::TensorOptions().dtype(at::kFloat));
        at::Tensor h = at::empty({t, r}, at::TensorOptions().dtype(at::kFloat));
        const auto yv = mutable_view_of<float>(y, "y");
        const float* bias_ptr = bias.defined() ? view_of<float>(bias, "bias").data : nullptr;
        if (t > 0) {
            // lora_linear::forward's order: H = x_a·Aᵀ; y = x·Wᵀ + b + s·H·Bᵀ.
            if (adapters) b.gemm(op::none, op::transpose, 1.0f, xav, view_of<float>(lora_a, "lora_A"), 0.0f, mutable_view_of<float>(h, "h"));
            base_product(st, b, false, w, s1, s2, s3, xv, yv);
            if (bias_ptr) b.scale_shift_columns(yv, nullptr, bias_ptr, yv);
            if (adapters)
                b.gemm(op::none, op::transpose, st.scaling, view_of<float>(h, "h"), view_of<float>(lora_b, "lora_B"), 1.0f, yv);
        }

        at::Tensor kept, z, v;   // kept: x_a for an exact dA; z, v: VeLoRA's record
        status outcome = status::ok;
        if (adapters && record) {
            if (!st.comp) {
                kept = separate ? xa : x;   // the caller's tensor: torch saves a reference, not a copy
            } else if (t > 0) {
                outcome = st.comp->compress(xav, st.staging);
                if (outcome == status::ok || outcome == status::degenerate_input) {
                    const auto& rec = st.staging;
                    z = at::empty({rec.tokens(), rec.groups()}, at::TensorOptions().dtype(dtype_of_storage(rec.z_storage())));
                    std::memcpy(z.data_ptr(),
                                visit_storage(rec.z_storage(), [&](auto tag) { return static_cast<const void*>(rec.template z<decltype(tag)>().data); }),
                                static_cast<std::size_t>(z.numel()) * z.element_size());
                    v = at::empty({rec.subtoken_size()}, at::TensorOptions().dtype(at::kFloat));
                    std::memcpy(v.data_ptr(), rec.v(), static_cast<std::size_t>(rec.subtoken_size()) * sizeof(float));
                    st.staging.clear();
                }
            }
            st.last_status = outcome;
            const auto bytes = [](const at::Tensor& e) { return e.defined() ? static_cast<std::size_t>(e.numel() * e.element_size()) : 0; };
            st.record_bytes = bytes(h) + bytes(kept) + bytes(z) + bytes(v);
            st.input_bytes = bytes(separate ? xa : x);
        }
        ctx->save_for_backward({h, kept, z, v, lora_a, lora_b, w, s1, s2, s3});
        ctx->saved_data["state"] = c10::IValue::make_capsule(state);
        ctx->saved_data["status"] = static_cast<std::int64_t>(outcome);
        ctx->saved_data["x_dtype"] = static_cast<std::int64_t>(x.scalar_type());
        ctx->saved_data["separate"] = separate;
        ctx->saved_data["adapters"] = adapters;
        return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
    }

    static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx, ::torch::autograd::variable_list grads) {
        constexpr const char* fn = "velora::torch::VeloraLoRALinear::backward";
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &h = saved[0], &kept = saved[1], &z = saved[2], &v = saved[3], &lora_a = saved[4], &lora_b = saved[5];
        const at::Tensor &w = saved[6], &s1 = saved[7], &s2 = saved[8], &s3 = saved[9];
        const auto state = c10::static_intrusive_pointer_cast<lora_state>(ctx->saved_data["state"].toCapsule());
        const auto outcome = static_cast<status>(ctx->saved_data["status"].toInt());
        const auto x_dtype = static_cast<c10::ScalarType>(ctx->saved_data["x_dtype"].toInt());
        const bool separate = ctx->saved_data["separate"].toBool();
        const bool adapters = ctx->saved_data["adapters"].toBool();

        std::lock_guard<std::mutex> lock(state->mutex);
        lora_state& st = *state;
        auto& b = st.backend.get();
        const matrix_input<float> dyin(grads[0], "grad_output", flatten::features_last, fn);
        const auto dy = dyin.view();
        const index_t t = dy.rows, o = st.out, d = st.in;
        velora::detail::require(dy.cols == o, fn, "argument 'grad_output' (", velora::torch::detail::describe(grads[0]), ") does not end in O = ", o);

        // Input edges: x, then x_a when separate, then A and B.
        const std::size_t a_edge = separate ? 2 : 1;
        at::Tensor dx, dxa, da, db, p;
        if (adapters) {
            const index_t r = lora_a.size(0);
            p = at::empty({t, r}, at::kFloat);
            if (t > 0) b.gemm(op::none, op::none, st.scaling, dy, view_of<float>(lora_b, "lora_B"), 0.0f, mutable_view_of<float>(p, "p"));
            if (ctx->needs_input_grad(a_edge + 1)) {   // dB = s·dYᵀ·H
                db = at::zeros({o, r}, at::kFloat);
                if (t > 0) b.gemm(op::transpose, op::none, st.scaling, dy, view_of<float>(h, "h"), 0.0f, mutable_view_of<float>(db, "db"));
            }
            if (ctx->needs_input_grad(a_edge)) {   // dA = Pᵀ·x_a, or VeLoRA's factored estimate expanded
                da = at::zeros({r, d}, at::kFloat);
                if (t > 0 && !st.comp) {
                    velora::detail::require(kept.defined(), fn, "A's gradient is needed but the forward kept no input (lora_A did not require grad then)");
                    const matrix_input<float> xa(kept, "x_adapter", flatten::features_last, fn);
                    b.gemm(op::transpose, op::none, 1.0f, view_of<float>(p, "p"), xa.view(), 0.0f, mutable_view_of<float>(da, "da"));
                } else if (t > 0 && (outcome == status::non_finite_input || outcome == status::overflow)) {
                    da.fill_(std::numeric_limits<float>::quiet_NaN());   // no record exists (file comment)
                } else if (t > 0) {
                    velora::detail::require(z.defined() && v.defined(), fn, "A's gradient is needed but the forward made no record "
                                                                            "(lora_A did not require grad when the forward ran)");
                    at::Tensor af = at::empty({r, z.size(1)}, at::kFloat);
                    const auto afv = mutable_view_of<float>(af, "a_factor");
                    record_gradient_factor(b, view_of<float>(p, "p"), z, afv);
                    b.expand_subtokens(const_matrix_view<float>(afv), v.data_ptr<float>(), st.comp->subtoken_size(),
                                       static_cast<float>(st.comp->config().scale), mutable_view_of<float>(da, "da"));
                }
            }
        }
        if (ctx->needs_input_grad(0)) {   // dX = dY·W (+ P·A when the adapter path read x itself)
            dx = at::empty(with_last(grads[0].sizes(), d), at::kFloat);
            if (t > 0) {
                const auto dxv = mutable_view_of<float>(dx, "dx");
                base_product(st, b, true, w, s1, s2, s3, dy, dxv);
                if (adapters && !separate) b.gemm(op::none, op::none, 1.0f, view_of<float>(p, "p"), view_of<float>(lora_a, "lora_A"), 1.0f, dxv);
            }
            if (x_dtype != at::kFloat) dx = dx.to(x_dtype);
        }
        if (adapters && separate && ctx->needs_input_grad(1)) {   // dX_a = P·A, sent back through dropout's mask by autograd
            dxa = at::empty(with_last(grads[0].sizes(), d), at::kFloat);
            if (t > 0) b.gemm(op::none, op::none, 1.0f, view_of<float>(p, "p"), view_of<float>(lora_a, "lora_A"), 0.0f, mutable_view_of<float>(dxa, "dxa"));
            if (x_dtype != at::kFloat) dxa = dxa.to(x_dtype);
        }
        return {dx, dxa, da, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

} // namespace detail

class VeloraLoRALinearImpl : public ::torch::nn::Cloneable<VeloraLoRALinearImpl> {
public:
    /// An adapter over a new, zero base of in×out (for torch::load into it).
    VeloraLoRALinearImpl(std::int64_t in_features, std::int64_t out_features, bool bias, const LoRAOptions& options_)
        : options(options_), in_features_(in_features), out_features_(out_features), has_bias_(bias) {
        reset();
    }

    /// Wraps `base` (float32, CPU): its weight and bias become frozen buffers (shared storage
    /// for base_storage::f32; rounded to bf16 or quantised to NF4 otherwise), A is PEFT's
    /// Kaiming-uniform (U(±1/√D), from torch's generator) and B = 0, so the output equals
    /// base's at first. Throws std::invalid_argument naming the option and its value for an r,
    /// alpha, dropout, G or NF4 block size the layer cannot have, and a non-float32 or non-CPU
    /// weight.
    VeloraLoRALinearImpl(const ::torch::nn::Linear& base, const LoRAOptions& options_)
        : VeloraLoRALinearImpl(base->options.in_features(), base->options.out_features(), base->options.bias(), options_) {
        constexpr const char* fn = "velora::torch::VeloraLoRALinear";
        const at::Tensor& w = base->weight;
        velora::detail::require(w.scalar_type() == at::kFloat && w.device().is_cpu(), fn, "the wrapped Linear's weight (", detail::describe(w),
                                ") must be a float32 CPU tensor");
        ::torch::NoGradGuard no_grad;
        const at::Tensor wd = w.detach();
        switch (options.base()) {
        case base_storage::f32:
            weight.set_(wd.is_contiguous() ? wd : wd.contiguous());   // the same storage: PEFT keeps the base module
            break;
        case base_storage::bf16: weight.copy_(wd.to(at::kBFloat16)); break;
        case base_storage::nf4: {
            const at::Tensor wc = wd.contiguous();
            nf4_options q;
            q.block_size = options.nf4_block_size();
            q.double_quant = options.nf4_double_quant();
            const nf4_weight n = nf4_weight::quantize(view_of<float>(wc, "weight", flatten::outputs_first), q);
            std::memcpy(nf4_codes.data_ptr(), n.codes().data(), n.codes().size_bytes());
            if (n.double_quantized()) {
                std::memcpy(nf4_absmax.data_ptr(), n.absmax_codes().data(), n.absmax_codes().size_bytes());
                std::memcpy(nf4_absmax_scales.data_ptr(), n.absmax_scales().data(), n.absmax_scales().size_bytes());
                nf4_absmax_mean.fill_(n.absmax_mean());
            } else {
                std::memcpy(nf4_absmax.data_ptr(), n.absmax().data(), n.absmax().size_bytes());
            }
            break;
        }
        }
        if (has_bias_) bias.set_(base->bias.detach());
    }

    /// (Re)creates the buffers (a zero base), A (Kaiming-uniform) and B (zero), and VeLoRA's
    /// compressor (v forgotten).
    void reset() override {
        constexpr const char* fn = "velora::torch::VeloraLoRALinear";
        const std::int64_t d = in_features_, o = out_features_, r = options.r();
        velora::detail::require(d > 0 && o > 0, fn, "in_features and out_features must be positive, got ", d, " and ", o);
        velora::detail::require(r >= 1 && r <= std::min(o, d), fn, "option r must satisfy 1 <= r <= min(O, D) = ", std::min(o, d), ", got r = ", r,
                                " with O = ", o, ", D = ", d);
        velora::detail::require(std::isfinite(options.lora_alpha()) && options.lora_alpha() != 0, fn,
                                "option lora_alpha must be finite and non-zero, got ", options.lora_alpha());
        velora::detail::require(options.lora_dropout() >= 0 && options.lora_dropout() < 1, fn, "option lora_dropout must satisfy 0 <= p < 1, got ",
                                options.lora_dropout());
        velora::detail::require(static_cast<unsigned>(options.base()) <= 2, fn, "option base has the invalid value ", static_cast<int>(options.base()));
        state_ = c10::make_intrusive<detail::lora_state>();
        auto& st = *state_;
        st.scaling = static_cast<float>(options.lora_alpha() / static_cast<double>(r));
        st.base = options.base();
        st.out = o;
        st.in = d;
        st.block_size = options.nf4_block_size();
        if (options.use_velora()) {
            st.comp.emplace(st.backend.current(), d,
                            detail::module_compressor_config(fn, d, options.groups(), options.v(), options.z_storage(), options.velora_scale()));
        }

        lora_A = register_parameter("lora_A", at::empty({r, d}));
        lora_B = register_parameter("lora_B", at::zeros({o, r}));
        switch (options.base()) {
        case base_storage::f32: weight = register_buffer("weight", at::zeros({o, d})); break;
        case base_storage::bf16: weight = register_buffer("weight", at::zeros({o, d}, at::kBFloat16)); break;
        case base_storage::nf4: {
            const std::int64_t bs = options.nf4_block_size();
            velora::detail::require(bs >= 2 && bs % 2 == 0 && d % bs == 0, fn, "option nf4_block_size must be even and divide in_features, got ",
                                    bs, " with in_features = ", d);
            const std::int64_t blocks = o * (d / bs);
            nf4_codes = register_buffer("nf4_codes", at::full({o * d / 2}, 0x77, at::kByte));   // code 7 is the exact 0
            if (options.nf4_double_quant()) {
                nf4_absmax = register_buffer("nf4_absmax_codes", at::zeros({blocks}, at::kChar));
                nf4_absmax_scales = register_buffer("nf4_absmax_scales", at::zeros({(blocks + nf4_absmax_group - 1) / nf4_absmax_group}));
                nf4_absmax_mean = register_buffer("nf4_absmax_mean", at::zeros({1}));
            } else {
                nf4_absmax = register_buffer("nf4_absmax", at::zeros({blocks}));
            }
            st.tile_rows = velora::detail::resolve_tile_rows(fn, 0, o, d);
            break;
        }
        }
        if (options.base() == base_storage::bf16) st.tile_rows = velora::detail::resolve_tile_rows(fn, 0, o, d);
        if (has_bias_) bias = register_buffer("bias", at::zeros({o}));
        merged_flag = register_buffer("merged", at::zeros({1}, at::kByte));
        if (st.comp) {
            v = register_buffer("v", at::zeros({st.comp->subtoken_size()}));
            velora_state = register_buffer("velora_state", st.published.initial_buffer(*st.comp));
            if (st.comp->initialised()) write_v();   // random mode draws v at construction
        }
        reset_lora_parameters();
    }

    /// PEFT's initialisation: A Kaiming-uniform with a = √5 (U(±1/√D)), B = 0.
    void reset_lora_parameters() {
        ::torch::NoGradGuard no_grad;
        ::torch::nn::init::kaiming_uniform_(lora_A, std::sqrt(5.0));
        lora_B.zero_();
    }

    /// y = base(x) + s·dropout(x)·Aᵀ·Bᵀ for x of [..., in_features] (base(x) alone once merged).
    at::Tensor forward(const at::Tensor& x) {
        constexpr const char* fn = "velora::torch::VeloraLoRALinear::forward";
        velora::detail::require(x.defined() && x.dim() >= 1 && x.size(-1) == in_features_, fn, "argument 'x' (", detail::describe(x),
                                ") must be [..., ", in_features_, "]");
        velora::detail::require(x.scalar_type() != at::kDouble, fn, "argument 'x' (", detail::describe(x),
                                ") is float64, but the layer computes in float32 and would silently drop its precision; pass float32, "
                                "float16 or bfloat16");
        check_tensors(fn);
        const bool adapters = !merged();
        const bool record = adapters && ::torch::GradMode::is_enabled() && lora_A.requires_grad();
        c10::optional<at::Tensor> xa, b;   // absent: the adapter path reads x; no bias
        if (adapters && is_training() && options.lora_dropout() > 0)
            xa = ::torch::nn::functional::dropout(x, ::torch::nn::functional::DropoutFuncOptions().p(options.lora_dropout()).training(true));
        if (bias.defined()) b = bias;
        const at::Tensor none = at::empty({0});
        const bool nf4 = options.base() == base_storage::nf4, dq = nf4 && options.nf4_double_quant();
        std::lock_guard<std::mutex> lock(state_->mutex);
        if (record && state_->comp) read_state();
        at::Tensor y = detail::lora_function::apply(x, xa, lora_A, lora_B, b, nf4 ? nf4_codes : weight, nf4 ? nf4_absmax : none,
                                                    dq ? nf4_absmax_scales : none, dq ? nf4_absmax_mean : none, state_, adapters, record);
        if (record && state_->comp && state_->published.stale(*state_->comp)) write_state();
        return y;
    }

    /// W ← W + s·B·A (float32 base only), so forward is the base alone; A and B get no gradient
    /// until unmerge(). The flag is the buffer `merged`, saved with the module. Throws
    /// std::invalid_argument for a bf16 or NF4 base (W + s·B·A cannot be stored exactly: the
    /// merge would requantise) or when already merged.
    void merge() { merge_impl(true, "velora::torch::VeloraLoRALinear::merge"); }
    /// W ← W − s·B·A: undoes merge() to rounding.
    void unmerge() { merge_impl(false, "velora::torch::VeloraLoRALinear::unmerge"); }
    [[nodiscard]] bool merged() const { return merged_flag.defined() && merged_flag.numel() == 1 && merged_flag.item<double>() != 0; }

    /// s = lora_alpha / r, rounded to float.
    [[nodiscard]] float scaling() const noexcept { return state_->scaling; }
    [[nodiscard]] std::int64_t in_features() const noexcept { return in_features_; }
    [[nodiscard]] std::int64_t out_features() const noexcept { return out_features_; }
    /// Bytes of the base weight as stored (buffers `weight` or the NF4 buffers; the bias apart).
    [[nodiscard]] std::size_t base_weight_bytes() const {
        std::size_t n = 0;
        for (const at::Tensor* t : {&weight, &nf4_codes, &nf4_absmax, &nf4_absmax_scales, &nf4_absmax_mean})
            if (t->defined()) n += static_cast<std::size_t>(t->numel() * t->element_size());
        return n;
    }
    /// Bytes the last recorded forward saved for the backward pass on the adapter path (H, and
    /// x_a or VeLoRA's Z and v; an x_a that is the caller's x is counted, as torch keeps it), and
    /// the bytes of x_a itself.
    [[nodiscard]] std::size_t last_record_bytes() const { return locked([](const detail::lora_state& s) { return s.record_bytes; }); }
    [[nodiscard]] std::size_t last_input_bytes() const { return locked([](const detail::lora_state& s) { return s.input_bytes; }); }
    /// What the last recorded VeLoRA compress returned (non_finite_input / overflow: no record).
    [[nodiscard]] status last_status() const { return locked([](const detail::lora_state& s) { return s.last_status; }); }

    void pretty_print(std::ostream& os) const override {
        static constexpr const char* bases[] = {"f32", "bf16", "nf4"};
        os << "velora::torch::VeloraLoRALinear(in_features=" << in_features_ << ", out_features=" << out_features_
           << ", bias=" << (has_bias_ ? "true" : "false") << ", r=" << options.r() << ", lora_alpha=" << options.lora_alpha()
           << ", lora_dropout=" << options.lora_dropout() << ", base=" << bases[static_cast<int>(options.base())];
        if (options.use_velora()) os << ", velora(groups=" << options.groups() << ", scale=" << options.velora_scale() << ")";
        os << ")";
    }

    LoRAOptions options;
    at::Tensor lora_A, lora_B;   ///< parameters: r×D, O×r
    at::Tensor weight, bias;     ///< buffers: the frozen base (weight undefined for NF4)
    at::Tensor nf4_codes, nf4_absmax, nf4_absmax_scales, nf4_absmax_mean;   ///< buffers (NF4; nf4_absmax holds int8 codes when double-quantised)
    at::Tensor merged_flag;      ///< buffer "merged"
    at::Tensor v, velora_state;  ///< buffers (VeLoRA): v and the compressor's state blob

private:
    template <class F>
    auto locked(F&& f) const -> decltype(f(std::declval<const detail::lora_state&>())) {
        std::lock_guard<std::mutex> lock(state_->mutex);
        return f(*state_);
    }

    // What torch::load or Module::to may have changed since construction: every buffer must still
    // be what the products read (dtype, size, CPU, contiguous) and an NF4 scale finite.
    void check_tensors(const char* fn) const {
        const auto need = [&](const at::Tensor& t, const char* name, c10::ScalarType dtype, std::int64_t numel) {
            velora::detail::require(t.defined() && t.scalar_type() == dtype && t.numel() == numel && t.device().is_cpu() && t.is_contiguous(), fn,
                                    "tensor '", name, "' (", detail::describe(t), ") must be a contiguous CPU tensor of ", numel, " ", dtype,
                                    " values (was it loaded from another layer's archive or converted with Module::to?)");
        };
        const std::int64_t d = in_features_, o = out_features_, r = options.r();
        need(lora_A, "lora_A", at::kFloat, r * d);
        need(lora_B, "lora_B", at::kFloat, o * r);
        if (has_bias_) need(bias, "bias", at::kFloat, o);
        need(merged_flag, "merged", at::kByte, 1);
        switch (options.base()) {
        case base_storage::f32: need(weight, "weight", at::kFloat, o * d); break;
        case base_storage::bf16: need(weight, "weight", at::kBFloat16, o * d); break;
        case base_storage::nf4: {
            const std::int64_t blocks = o * (d / options.nf4_block_size());
            need(nf4_codes, "nf4_codes", at::kByte, o * d / 2);
            at::Tensor scales;
            if (options.nf4_double_quant()) {
                need(nf4_absmax, "nf4_absmax_codes", at::kChar, blocks);
                need(nf4_absmax_scales, "nf4_absmax_scales", at::kFloat, (blocks + nf4_absmax_group - 1) / nf4_absmax_group);
                need(nf4_absmax_mean, "nf4_absmax_mean", at::kFloat, 1);
                scales = at::cat({nf4_absmax_scales, nf4_absmax_mean});
            } else {
                need(nf4_absmax, "nf4_absmax", at::kFloat, blocks);
                scales = nf4_absmax;
            }
            // A corrupt archive is refused like any other state: the products would spread NaN.
            velora::detail::require(at::isfinite(scales).all().item<bool>() && (options.nf4_double_quant() || scales.min().item<float>() >= 0), fn,
                                    "the NF4 block scales hold a non-finite or negative value (a corrupt archive?)");
            break;
        }
        }
    }

    void merge_impl(bool merging, const char* fn) {
        velora::detail::require(options.base() == base_storage::f32, fn, "the base weight is stored as ",
                                options.base() == base_storage::nf4 ? "NF4" : "bf16",
                                ", which cannot hold W + s*B*A exactly; merging would requantise it (dequantise into a float32 Linear first)");
        velora::detail::require(merged() != merging, fn, merging ? "the layer is already merged" : "the layer is not merged");
        check_tensors(fn);
        ::torch::NoGradGuard no_grad;
        std::lock_guard<std::mutex> lock(state_->mutex);
        auto& b = state_->backend.get();
        // lora_linear::merge's product: W ← W ± s·B·A, one GEMM into W.
        b.gemm(op::none, op::none, merging ? state_->scaling : -state_->scaling, view_of<float>(lora_B, "lora_B"), view_of<float>(lora_A, "lora_A"),
               1.0f, mutable_view_of<float>(weight, "weight", flatten::outputs_first));
        bump_version(weight);
        merged_flag.fill_(merging ? 1 : 0);
    }

    // Before a recorded forward: a state blob that differs from the one last seen was loaded
    // (torch::load, clone) and is restored into the compressor (its checks refuse a blob that is
    // not this layer's). `v` is a mirror of the compressor's v, rewritten from it.
    void read_state() {
        constexpr const char* fn = "velora::torch::VeloraLoRALinear::forward";
        velora::detail::require(velora_state.defined() && velora_state.dim() == 1 && velora_state.device().is_cpu() &&
                                    velora_state.scalar_type() == at::kByte,
                                fn, "buffer 'velora_state' (", detail::describe(velora_state), ") must be a 1-D uint8 CPU tensor");
        if (state_->published.restore_if_loaded(*state_->comp, velora_state.contiguous())) write_v();
    }

    void write_state() { state_->published.publish(*state_->comp, velora_state, v); }

    void write_v() { detail::published_compressor_state::write_v(*state_->comp, v); }

    std::int64_t in_features_, out_features_;
    bool has_bias_;
    c10::intrusive_ptr<detail::lora_state> state_;
};

/// The module holder.
class VeloraLoRALinear : public ::torch::nn::ModuleHolder<VeloraLoRALinearImpl> {
public:
    using ::torch::nn::ModuleHolder<VeloraLoRALinearImpl>::ModuleHolder;
    using Impl = VeloraLoRALinearImpl;
};

/// Whether the qualified module name `name` is chosen by `targets` as PEFT's list form of
/// target_modules does: equal to a target, or ending in "." + target ("v_proj" matches
/// "layers.0.attn.v_proj"; "attn.v_proj" matches it too; "proj" does not).
inline bool matches_target(const std::string& name, const std::vector<std::string>& targets) {
    for (const std::string& t : targets) {
        if (name == t) return true;
        if (name.size() > t.size() && name.compare(name.size() - t.size(), t.size(), t) == 0 && name[name.size() - t.size() - 1] == '.') return true;
    }
    return false;
}

namespace detail {

inline void replace_lora_in(::torch::nn::Module& parent, const std::string& prefix, const std::vector<std::string>& targets,
                            const LoRAOptions& options, std::vector<std::string>& replaced) {
    const auto children = parent.named_children();   // a copy: the loop replaces entries
    std::size_t index = 0;
    for (const auto& item : children) {
        const std::string name = prefix.empty() ? item.key() : prefix + "." + item.key();
        const std::shared_ptr<::torch::nn::Module> child = item.value();
        const auto linear = std::dynamic_pointer_cast<::torch::nn::LinearImpl>(child);
        if (linear && matches_target(name, targets)) {
            VeloraLoRALinear lora(::torch::nn::Linear(linear), options);
            parent.replace_module(item.key(), lora.ptr());
            // Containers call their children from their own lists, not the registry.
            if (auto* seq = dynamic_cast<::torch::nn::SequentialImpl*>(&parent)) *(seq->begin() + static_cast<std::ptrdiff_t>(index)) = ::torch::nn::AnyModule(lora);
            else if (auto* list = dynamic_cast<::torch::nn::ModuleListImpl*>(&parent)) *(list->begin() + static_cast<std::ptrdiff_t>(index)) = lora.ptr();
            else if (auto* dict = dynamic_cast<::torch::nn::ModuleDictImpl*>(&parent)) dict->update({{item.key(), lora.ptr()}});
            replaced.push_back(name);
        } else if (!std::dynamic_pointer_cast<VeloraLoRALinearImpl>(child)) {
            replace_lora_in(*child, name, targets, options, replaced);
        }
        ++index;
    }
}

} // namespace detail

/// PEFT's inject_adapter for a libtorch module tree: every torch::nn::Linear below `root` whose
/// qualified name (as named_modules() spells it) matches `target_modules` (matches_target) is
/// replaced by a VeloraLoRALinear wrapping it, made with `options` (each A drawn from torch's
/// generator in tree order). Returns the replaced names in that order. Throws
/// std::invalid_argument (nothing replaced) when no name matches: a typo would otherwise train
/// nothing.
///
/// C++ has no setattr: the registry entry is replaced (and the list a Sequential, ModuleList or
/// ModuleDict calls from), but a parent that keeps its own member holder (`torch::nn::Linear
/// q_proj;` called as `q_proj(x)`) still calls the old Linear. Such a parent must call its
/// children through the registry (see forward_child) or re-read them after the replacement.
inline std::vector<std::string> replace_lora(::torch::nn::Module& root, const std::vector<std::string>& target_modules,
                                             const LoRAOptions& options = {}) {
    constexpr const char* fn = "velora::torch::replace_lora";
    velora::detail::require(!target_modules.empty(), fn, "argument 'target_modules' is empty");
    std::vector<std::string> candidates;
    for (const auto& item : root.named_modules("", /*include_self=*/false))
        if (item.value()->as<::torch::nn::LinearImpl>() && matches_target(item.key(), target_modules)) candidates.push_back(item.key());
    if (candidates.empty()) {
        std::string list;
        for (const std::string& t : target_modules) list += (list.empty() ? "'" : ", '") + t + "'";
        velora::detail::fail(fn, "no torch::nn::Linear below the module has a name matching target_modules [", list, "]");
    }
    std::vector<std::string> replaced;
    detail::replace_lora_in(root, "", target_modules, options, replaced);
    return replaced;
}

/// Calls the registered child `name` of `parent` on x, whether it is a torch::nn::Linear or a
/// VeloraLoRALinear that replace_lora put there: for modules that want to stay replaceable.
inline at::Tensor forward_child(::torch::nn::Module& parent, const std::string& name, const at::Tensor& x) {
    const auto children = parent.named_children();
    const auto* found = children.find(name);
    velora::detail::require(found != nullptr, "velora::torch::forward_child", "the module has no child named '", name, "'");
    if (auto* l = (*found)->as<::torch::nn::LinearImpl>()) return l->forward(x);
    if (auto* l = (*found)->as<VeloraLoRALinearImpl>()) return l->forward(x);
    velora::detail::fail("velora::torch::forward_child", "child '", name, "' is neither a torch::nn::Linear nor a VeloraLoRALinear");
}

} // namespace velora::torch
