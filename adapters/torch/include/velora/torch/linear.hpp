#pragma once
/// \file
/// `VeloraLinear`: torch::nn::Linear whose input is kept for the backward pass as a VeLoRA record
/// (Z = X·(I_G ⊗ v)ᵀ, T×G values, plus v) instead of X itself (T×D). y = x·Wᵀ + b exactly; dX and
/// db are exact; dW = scale · dYᵀZ · (I_G ⊗ vᵀ) is VeLoRA's estimate (exact when G = D), delivered
/// as a dense `weight.grad` or in factored form to AdaRankGradAdamW (docs/torch.md).
///
/// - The record is a pair of torch tensors saved with save_for_backward, so torch's memory
///   accounting sees it and each forward owns its own (several forwards before one backward,
///   gradient accumulation, work). The layer also keeps a staging record and the compressor's
///   spare Z in library memory, about 2·T_max·G storage elements, reused by every forward.
/// - v is the module buffer `v` (s = ceil(D/G) floats, zero until the first recorded forward) and
///   the compressor's whole state (v, its flags, the EMA count) is the uint8 buffer
///   `velora_state`: both are saved and loaded with the module (torch::save / torch::load).
///   Loading them restores the compressor bit for bit; writing `v` in place sets v (normalised,
///   as compressor::set_v).
/// - Parameters are float32, on the CPU. x may be float32, float16 or bfloat16: half-precision
///   inputs are cast to float32 for the products (a transient copy, never kept) and y and dX are
///   returned in x's dtype; float64 (any other dtype) throws, as torch::nn::Linear does. x is
///   [..., D]; an empty batch gives an empty y, an empty dX and a zero
///   dW and db, like torch::nn::Linear.
/// - A record is made only when a weight gradient can be asked for (grad mode on and the weight
///   requires grad); v is therefore fixed by the first *training* batch, and evaluation under
///   torch::NoGradGuard neither records nor moves v.
/// - An input with NaN/Inf (or beyond the record's storage type) cannot be recorded: y is still
///   computed, v is unchanged (compressor guarantee), last_status() says why, and that forward's
///   weight gradient is NaN, so AdaRankGradAdamW's whole-step check (or a GradScaler) skips the
///   step instead of training on a gradient that does not exist.
/// - Threads: every call uses at::get_num_threads() of the thread it runs on. libtorch runs a CPU
///   graph's backward on the thread that calls backward(), which may be another thread than the
///   forward's; the layer's forward and backward take its lock (one at a time per layer), and the
///   record travels in the autograd graph, so that is safe. Results are the same bits at any
///   thread count. Double backward (create_graph) is not supported: the backward pass is not
///   built from differentiable torch operations.
#include <ATen/ATen.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/init.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/arg.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <ostream>
#include <span>
#include <utility>
#include <vector>

#include <velora/compressor.hpp>
#include <velora/core/error.hpp>
#include <velora/core/storage.hpp>
#include <velora/layers.hpp>

#include "backend.hpp"
#include "compressor_buffers.hpp"
#include "deprecated.hpp"
#include "factored.hpp"
#include "view.hpp"

namespace velora::torch {

/// The torch dtype of a record stored as `s` (f64 is refused by the float compressor).
inline c10::ScalarType dtype_of_storage(storage s) {
    switch (s) {
    case storage::f32: return c10::ScalarType::Float;
    case storage::f64: return c10::ScalarType::Double;
    case storage::f16: return c10::ScalarType::Half;
    case storage::bf16: return c10::ScalarType::BFloat16;
    }
    velora::detail::fail("velora::torch::dtype_of_storage", "argument 's' has the invalid value ", static_cast<int>(s));
}

struct VeloraLinearOptions : deprecated_linear_options_spellings<VeloraLinearOptions> {
    VeloraLinearOptions(std::int64_t in_features, std::int64_t out_features) : in_features_(in_features), out_features_(out_features) {}
    TORCH_ARG(std::int64_t, in_features);    ///< D
    TORCH_ARG(std::int64_t, out_features);   ///< O
    TORCH_ARG(bool, bias) = true;
    TORCH_ARG(std::int64_t, groups) = 32;    ///< G, 1 <= G <= D (G = D keeps X exactly)
    TORCH_ARG(velora::v_mode, v) = velora::v_mode::first_batch_mean();
    TORCH_ARG(velora::storage, z_storage) = velora::storage::f32;   ///< f32, f16 or bf16
    TORCH_ARG(double, scale) = 1.0;          ///< multiplies dW only
    /// Deliver dW in factored form to an AdaRankGradAdamW that attached this layer (weight.grad
    /// then stays undefined for this layer's share); without an attached optimizer dW is dense.
    TORCH_ARG(bool, factored_gradient) = false;
};

namespace detail {

/// What a VeloraLinear shares with its autograd nodes: the backend, the compressor, the staging
/// record, the factored gradient and the reports. Held through an intrusive_ptr so that a graph
/// that outlives its module still has it (autograd keeps it in the node as a capsule).
struct linear_state : ::torch::CustomClassHolder {
    using backend_type = eigen_backend<float>;
    using compressor_type = compressor<backend_type>;

    linear_state(std::int64_t in, std::int64_t out, const compressor_config& config)
        : comp(backend.current(), in, config),
          slot(std::make_shared<factored_gradient_accumulator>(out, in, comp.groups(), comp.subtoken_size())) {}

    std::mutex mutex;
    threads_following<float> backend;
    compressor_type comp;
    compressor_type::record_type staging;
    published_compressor_state published;   // what the buffers velora_state and v hold
    std::shared_ptr<factored_gradient_accumulator> slot;
    bool factored = false;            // VeloraLinearOptions::factored_gradient
    // reports (under the lock)
    std::size_t record_bytes = 0, input_bytes = 0;
    int forward_threads = 0, backward_threads = 0;
    status last_status = status::ok;
};

/// The compressor configuration of a VeLoRA module (VeloraLinear, VeloraLoRALinear) over
/// `in_features` = D float32 features, from its options. Throws std::invalid_argument naming `fn`
/// and the option for G outside [1, D] or Z stored as f64 (wider than the parameters).
inline compressor_config module_compressor_config(const char* fn, std::int64_t in_features, std::int64_t groups, const velora::v_mode& v,
                                                  storage z_storage, double scale) {
    velora::detail::require(groups >= 1 && groups <= in_features, fn, "option groups must satisfy 1 <= G <= in_features, got G = ", groups,
                            " with in_features = ", in_features);
    velora::detail::require(z_storage != storage::f64, fn, "option z_storage = f64 is wider than the float32 parameters; use f32, f16 or bf16");
    compressor_config config;
    config.groups = groups;
    config.v = v;
    config.z_storage = z_storage;
    config.scale = scale;
    return config;
}

/// dW's A = dYᵀZ into `a` (O×G), converting a narrow Z in chunks (as the compressor does: a
/// half-precision record never costs a full float copy).
inline void record_gradient_factor(eigen_backend<float>& b, const_matrix_view<float> dy, const at::Tensor& z, matrix_view<float> a) {
    const index_t t = z.size(0), g = z.size(1);
    if (z.scalar_type() == c10::ScalarType::Float) {
        b.gemm(op::transpose, op::none, 1.0f, dy, const_matrix_view<float>(z.data_ptr<float>(), t, g, g), 0.0f, a);
        return;
    }
    constexpr index_t chunk_elements = index_t{1} << 15;
    const index_t chunk = std::max<index_t>(1, chunk_elements / g);
    std::vector<float> wide(static_cast<std::size_t>(std::min(chunk, t) * g));
    for (index_t first = 0; first < t; first += chunk) {
        const index_t rows = std::min(chunk, t - first);
        matrix_view<float> w{wide.data(), rows, g, g};
        if (z.scalar_type() == c10::ScalarType::Half) {
            // at::Half and velora::half are both the IEEE binary16 bits in a 16-bit struct.
            const auto* p = reinterpret_cast<const velora::half*>(z.data_ptr()) + first * g;
            b.convert(const_matrix_view<velora::half>(p, rows, g, g), w);
        } else {
            const auto* p = reinterpret_cast<const velora::bfloat16*>(z.data_ptr()) + first * g;
            b.convert(const_matrix_view<velora::bfloat16>(p, rows, g, g), w);
        }
        b.gemm(op::transpose, op::none, 1.0f, dy.row_block(first, rows), const_matrix_view<float>(w), first == 0 ? 0.0f : 1.0f, a);
    }
}

inline std::vector<std::int64_t> with_last(at::IntArrayRef sizes, std::int64_t last) {
    std::vector<std::int64_t> s(sizes.begin(), sizes.end());
    s.back() = last;
    return s;
}

struct linear_function : public ::torch::autograd::Function<linear_function> {
    static at::Tensor forward(::torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const c10::intrusive_ptr<linear_state>& state, bool record) {
        constexpr const char* fn = "velora::torch::VeloraLinear::forward";
        linear_state& st = *state;   // the caller (VeloraLinearImpl::forward) holds st.mutex
        auto& b = st.backend.get();
        st.forward_threads = st.backend.requested_threads();
        const matrix_input<float> xin(x, "x", flatten::features_last, fn);
        const auto xv = xin.view();
        const auto wv = view_of<float>(weight, "weight", flatten::outputs_first);
        const index_t o = wv.rows;
        at::Tensor y = at::empty(with_last(x.sizes(), o), at::TensorOptions().dtype(at::kFloat));
        const float* bias_ptr = bias && bias->defined() ? view_of<float>(*bias, "bias").data : nullptr;
        if (xv.rows > 0) linear_forward(b, xv, wv, bias_ptr, mutable_view_of<float>(y, "y"));

        at::Tensor z, v;
        status outcome = status::ok;
        if (record && xv.rows > 0) {
            outcome = st.comp.compress(xv, st.staging);
            if (outcome == status::ok || outcome == status::degenerate_input) {
                // The record leaves library memory for torch tensors owned by this forward.
                const auto& r = st.staging;
                z = at::empty({r.tokens(), r.groups()}, at::TensorOptions().dtype(dtype_of_storage(r.z_storage())));
                std::memcpy(z.data_ptr(), visit_storage(r.z_storage(), [&](auto tag) { return static_cast<const void*>(r.template z<decltype(tag)>().data); }),
                            static_cast<std::size_t>(z.numel()) * z.element_size());
                v = at::empty({r.subtoken_size()}, at::TensorOptions().dtype(at::kFloat));
                std::memcpy(v.data_ptr(), r.v(), static_cast<std::size_t>(r.subtoken_size()) * sizeof(float));
                st.staging.clear();
            }
            st.last_status = outcome;
            st.record_bytes = z.defined() ? static_cast<std::size_t>(z.numel() * z.element_size() + v.numel() * v.element_size()) : 0;
            st.input_bytes = static_cast<std::size_t>(x.numel() * x.element_size());
        }
        ctx->save_for_backward({z, v, weight});
        ctx->saved_data["state"] = c10::IValue::make_capsule(state);
        ctx->saved_data["status"] = static_cast<std::int64_t>(outcome);
        ctx->saved_data["x_dtype"] = static_cast<std::int64_t>(x.scalar_type());
        ctx->saved_data["bias"] = bias_ptr != nullptr;
        return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
    }

    static ::torch::autograd::variable_list backward(::torch::autograd::AutogradContext* ctx, ::torch::autograd::variable_list grads) {
        constexpr const char* fn = "velora::torch::VeloraLinear::backward";
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &z = saved[0], &v = saved[1], &weight = saved[2];
        const c10::intrusive_ptr<linear_state> state = c10::static_intrusive_pointer_cast<linear_state>(ctx->saved_data["state"].toCapsule());
        const auto outcome = static_cast<status>(ctx->saved_data["status"].toInt());
        const auto x_dtype = static_cast<c10::ScalarType>(ctx->saved_data["x_dtype"].toInt());
        const bool has_bias = ctx->saved_data["bias"].toBool();
        const matrix_input<float> dyin(grads[0], "grad_output", flatten::features_last, fn);
        const auto dy = dyin.view();
        const auto wv = view_of<float>(weight, "weight", flatten::outputs_first);
        const index_t o = wv.rows, d = wv.cols;
        velora::detail::require(dy.cols == o, fn, "argument 'grad_output' (", velora::torch::detail::describe(grads[0]), ") does not end in O = ", o);

        std::lock_guard<std::mutex> lock(state->mutex);
        linear_state& st = *state;
        auto& b = st.backend.get();
        st.backward_threads = st.backend.requested_threads();
        at::Tensor dx, dw, db;
        if (ctx->needs_input_grad(0)) {
            dx = at::empty(with_last(grads[0].sizes(), d), at::TensorOptions().dtype(at::kFloat));
            if (dy.rows > 0) linear_input_grad(b, dy, wv, mutable_view_of<float>(dx, "dx"));
            if (x_dtype != at::kFloat) dx = dx.to(x_dtype);
        }
        if (ctx->needs_input_grad(1)) {
            const bool factored = st.slot->consumers() > 0 && st.factored;
            if (dy.rows == 0 || outcome == status::non_finite_input || outcome == status::overflow) {
                // No record: an empty batch contributes zero, a failed one NaN (see the file comment).
                dw = dy.rows == 0 ? at::zeros({o, d}, at::kFloat) : at::full({o, d}, std::numeric_limits<float>::quiet_NaN(), at::kFloat);
                if (factored) {
                    st.slot->add_dense(dw);
                    dw = at::Tensor();
                }
            } else {
                velora::detail::require(z.defined() && v.defined(), fn, "the weight gradient is needed but the forward made no record "
                                                                        "(the weight did not require grad when the forward ran)");
                at::Tensor a = at::empty({o, z.size(1)}, at::kFloat);
                const auto av = mutable_view_of<float>(a, "a");
                record_gradient_factor(b, dy, z, av);
                const auto scale = static_cast<float>(st.comp.config().scale);
                if (factored) {
                    st.slot->add(std::move(a), v, scale);
                } else {
                    dw = at::empty({o, d}, at::kFloat);
                    b.expand_subtokens(const_matrix_view<float>(av), v.data_ptr<float>(), st.comp.subtoken_size(), scale,
                                       mutable_view_of<float>(dw, "dw"));
                }
            }
        }
        if (has_bias && ctx->needs_input_grad(2)) {
            db = at::zeros({o}, at::kFloat);
            if (dy.rows > 0) bias_grad(b, dy, db.data_ptr<float>());
        }
        return {dx, dw, db, at::Tensor(), at::Tensor()};
    }
};

} // namespace detail

class VeloraLinearImpl : public ::torch::nn::Cloneable<VeloraLinearImpl> {
public:
    VeloraLinearImpl(std::int64_t in_features, std::int64_t out_features) : VeloraLinearImpl(VeloraLinearOptions(in_features, out_features)) {}
    explicit VeloraLinearImpl(const VeloraLinearOptions& options_) : options(options_) { reset(); }

    /// (Re)creates the parameters, the buffers and the compressor (v forgotten). Throws
    /// std::invalid_argument naming the option for sizes or a configuration the layer cannot have.
    void reset() override {
        constexpr const char* fn = "velora::torch::VeloraLinear";
        velora::detail::require(options.in_features() > 0 && options.out_features() > 0, fn,
                                "in_features and out_features must be positive, got ", options.in_features(), " and ", options.out_features());
        const compressor_config config =
            detail::module_compressor_config(fn, options.in_features(), options.groups(), options.v(), options.z_storage(), options.scale());
        state_ = c10::make_intrusive<detail::linear_state>(options.in_features(), options.out_features(), config);
        state_->factored = options.factored_gradient();
        weight = register_parameter("weight", at::empty({options.out_features(), options.in_features()}));
        if (options.bias()) bias = register_parameter("bias", at::empty({options.out_features()}));
        else bias = register_parameter("bias", {}, /*requires_grad=*/false);
        v = register_buffer("v", at::zeros({state_->comp.subtoken_size()}));
        velora_state = register_buffer("velora_state", state_->published.initial_buffer(state_->comp));
        if (state_->comp.initialised()) write_v();   // random mode draws v at construction
        reset_parameters();
    }

    /// torch::nn::Linear's initialisation (Kaiming-uniform weight, uniform bias in ±1/√D).
    void reset_parameters() {
        ::torch::NoGradGuard no_grad;
        ::torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
        if (bias.defined()) {
            const double bound = 1.0 / std::sqrt(static_cast<double>(options.in_features()));
            ::torch::nn::init::uniform_(bias, -bound, bound);
        }
    }

    /// y = x·Wᵀ + b for x of [..., in_features]; see the file comment.
    at::Tensor forward(const at::Tensor& x) {
        constexpr const char* fn = "velora::torch::VeloraLinear::forward";
        velora::detail::require(x.defined() && x.dim() >= 1 && x.size(-1) == options.in_features(), fn, "argument 'x' (",
                                detail::describe(x), ") must be [..., ", options.in_features(), "]");
        velora::detail::require(weight.scalar_type() == at::kFloat, fn, "the weight (", detail::describe(weight),
                                ") must be float32; VeloraLinear keeps float32 parameters (half-precision inputs are cast)");
        // float64 is refused as torch::nn::Linear refuses an input of another dtype than its
        // weight: computing it in float32 would silently lose its precision (other dtypes are
        // refused by matrix_input below).
        velora::detail::require(x.scalar_type() != at::kDouble, fn, "argument 'x' (", detail::describe(x),
                                ") is float64, but the layer computes in float32 and would silently drop its precision; pass float32, "
                                "float16 or bfloat16");
        const bool record = ::torch::GradMode::is_enabled() && weight.requires_grad();
        std::lock_guard<std::mutex> lock(state_->mutex);
        if (record) read_buffers();
        c10::optional<at::Tensor> b;
        if (bias.defined()) b = bias;
        at::Tensor y = detail::linear_function::apply(x, weight, b, state_, record);
        if (record && state_->published.stale(state_->comp)) write_buffers();
        return y;
    }

    /// Clears weight.grad/bias.grad as Module::zero_grad does, and the factored gradient.
    void zero_grad(bool set_to_none = false) override {
        ::torch::nn::Module::zero_grad(set_to_none);
        state_->slot->clear();
    }

    void pretty_print(std::ostream& os) const override {
        os << "velora::torch::VeloraLinear(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", bias=" << (options.bias() ? "true" : "false") << ", groups=" << options.groups() << ", v=" << to_string(options.v().type)
           << ", z_storage=" << to_string(options.z_storage()) << ", factored_gradient=" << (options.factored_gradient() ? "true" : "false")
           << ")";
    }

    /// Where the layer delivers factored weight gradients (AdaRankGradAdamW::attach reads it).
    [[nodiscard]] std::shared_ptr<factored_gradient_accumulator> factored_grad() const { return state_->slot; }
    /// Bytes the last recorded forward saved for the backward pass (Z and v), and the bytes of its
    /// input x, which torch::nn::Linear would have saved instead.
    [[nodiscard]] std::size_t last_record_bytes() const { return locked([](const detail::linear_state& s) { return s.record_bytes; }); }
    [[nodiscard]] std::size_t last_input_bytes() const { return locked([](const detail::linear_state& s) { return s.input_bytes; }); }
    /// What the last recorded forward's compress returned (non_finite_input / overflow: no record).
    [[nodiscard]] status last_status() const { return locked([](const detail::linear_state& s) { return s.last_status; }); }
    /// at::get_num_threads() on the thread of the last forward / backward.
    [[nodiscard]] int last_forward_threads() const { return locked([](const detail::linear_state& s) { return s.forward_threads; }); }
    [[nodiscard]] int last_backward_threads() const { return locked([](const detail::linear_state& s) { return s.backward_threads; }); }
    /// Whether v exists yet (after the first recorded forward, or in random mode). The buffers are
    /// read at each recorded forward, so a state loaded with torch::load counts from the next one.
    [[nodiscard]] bool v_initialised() const { return locked([](const detail::linear_state& s) { return s.comp.initialised(); }); }
    [[nodiscard]] std::int64_t subtoken_size() const { return state_->comp.subtoken_size(); }

    VeloraLinearOptions options;
    at::Tensor weight, bias;
    at::Tensor v;              ///< buffer: the projection vector (s floats; zero until initialised)
    at::Tensor velora_state;   ///< buffer: the compressor's state blob (uint8)

private:
    template <class F>
    auto locked(F&& f) const -> decltype(f(std::declval<const detail::linear_state&>())) {
        std::lock_guard<std::mutex> lock(state_->mutex);
        return f(*state_);
    }

    // The buffers, read before a recorded forward: a state blob that differs from the one last
    // seen was loaded (torch::load, load_state_dict-like copies, clone) and is restored into the
    // compressor; otherwise a v that differs from the compressor's was written by the caller and
    // is set (normalised) as v. Errors name the buffer and come from the compressor's checks.
    void read_buffers() {
        constexpr const char* fn = "velora::torch::VeloraLinear::forward";
        velora::detail::require(velora_state.defined() && velora_state.dim() == 1 && velora_state.device().is_cpu(), fn,
                                "buffer 'velora_state' (", detail::describe(velora_state), ") must be a 1-D CPU tensor");
        at::Tensor blob = velora_state;
        if (blob.scalar_type() != at::kByte) {
            // Module::to(dtype) converts every buffer; the byte values survive a float conversion exactly.
            at::Tensor back = blob.to(at::kByte);
            velora::detail::require(back.to(blob.scalar_type()).equal(blob), fn, "buffer 'velora_state' (", detail::describe(velora_state),
                                    ") no longer holds the bytes of a state (a conversion changed them)");
            blob = back;
        }
        auto& st = *state_;
        if (st.published.restore_if_loaded(st.comp, blob.contiguous())) {   // state_format_error (an invalid_argument) when it is not this layer's
            write_v();
            return;
        }
        velora::detail::require(v.defined() && v.dim() == 1 && v.size(0) == st.comp.subtoken_size() && v.device().is_cpu(), fn, "buffer 'v' (",
                                detail::describe(v), ") must be a CPU vector of s = ", st.comp.subtoken_size(), " values");
        const at::Tensor vf = v.to(at::kFloat).contiguous();
        const std::span<const float> given(vf.data_ptr<float>(), static_cast<std::size_t>(vf.numel()));
        const std::span<const float> current = st.comp.v();
        const bool same = st.comp.initialised() ? std::equal(given.begin(), given.end(), current.begin(), current.end())
                                                : std::all_of(given.begin(), given.end(), [](float e) { return e == 0.0f; });
        if (!same) {
            st.comp.set_v(given);
            write_buffers();
        }
    }

    // After v changed: the blob and v buffers describe the compressor again.
    void write_buffers() { state_->published.publish(state_->comp, velora_state, v); }

    void write_v() { detail::published_compressor_state::write_v(state_->comp, v); }

    c10::intrusive_ptr<detail::linear_state> state_;
};

/// The module holder (what TORCH_MODULE(VeloraLinear) declares; the macro names torch:: unqualified,
/// which inside namespace velora::torch would find this namespace).
class VeloraLinear : public ::torch::nn::ModuleHolder<VeloraLinearImpl> {
public:
    using ::torch::nn::ModuleHolder<VeloraLinearImpl>::ModuleHolder;
    using Impl = VeloraLinearImpl;
};

} // namespace velora::torch
