// velora._C: the library's CPU engines for the Python package (python/velora/torch). One
// translation unit (a libtorch one compiles for minutes). Bindings through the pybind11 that
// torch's extension headers use, so that torch.Tensor arguments arrive as at::Tensor sharing the
// caller's storage (no copy, no DLPack round trip) and the library's std::invalid_argument
// reaches Python as ValueError with its message (pybind11's standard translation).
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include <velora/distributed/shared_v.hpp>
#include <velora/torch/torch.hpp>

#include "build_info.hpp"
#include "process_group_communicator.hpp"

namespace py = pybind11;
namespace vt = velora::torch;
using velora_python::process_group_communicator;

namespace {

// ------------------------------------------------------------------ VeloraLinear's compressor
// The state a Python VeloraLinear keeps beside its parameters: the compressor (v, its flags) and
// the staging record. The products y = x·Wᵀ + b and dX = dY·W are torch's (F.linear and a
// matmul, as nn.Linear computes them); the library makes the record and dW from it.
class linear_core {
public:
    linear_core(std::int64_t in_features, std::int64_t out_features, std::int64_t groups, const std::string& v, double ema_decay,
                std::uint64_t seed, const std::string& z_storage, double scale)
        : out_(out_features), state_(in_features, out_features, config_of(in_features, out_features, groups, v, ema_decay, seed, z_storage, scale)) {}

    // Compresses x ([T, D] float32, any row stride the view accepts; half inputs are cast by the
    // caller) into a record (Z, v) of torch tensors owned by the caller's autograd context.
    // Returns the status name and the record (undefined tensors when no record could be made).
    std::tuple<std::string, at::Tensor, at::Tensor> compress(const at::Tensor& x) {
        constexpr const char* fn = "velora.torch.VeloraLinear.forward";
        std::lock_guard<std::mutex> lock(state_.mutex);
        const auto xv = vt::view_of<float>(x, "x", vt::flatten::features_last);
        velora::detail::require(xv.cols == state_.comp.features(), fn, "argument 'x' (", vt::detail::describe(x), ") must be [..., ",
                                state_.comp.features(), "]");
        if (xv.rows == 0) return {"ok", at::Tensor(), at::Tensor()};
        (void)state_.backend.get();
        const velora::status outcome = state_.comp.compress(xv, state_.staging);
        if (outcome != velora::status::ok && outcome != velora::status::degenerate_input) return {std::string(velora::to_string(outcome)), at::Tensor(), at::Tensor()};
        const auto& r = state_.staging;
        at::Tensor z = at::empty({r.tokens(), r.groups()}, at::TensorOptions().dtype(vt::dtype_of_storage(r.z_storage())));
        std::memcpy(z.data_ptr(), velora::visit_storage(r.z_storage(), [&](auto tag) { return static_cast<const void*>(r.template z<decltype(tag)>().data); }),
                    static_cast<std::size_t>(z.numel()) * z.element_size());
        at::Tensor v = at::empty({r.subtoken_size()}, at::kFloat);
        std::memcpy(v.data_ptr(), r.v(), static_cast<std::size_t>(r.subtoken_size()) * sizeof(float));
        state_.staging.clear();
        return {std::string(velora::to_string(outcome)), z, v};
    }

    // dW = scale · dYᵀZ · (I_G ⊗ vᵀ) for dY [T, O] float32 (read in place when its rows are evenly
    // spaced; a stride-0 gradient is copied once).
    at::Tensor gradient_factor(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& v) {
        constexpr const char* fn = "velora.torch.VeloraLinear.backward";
        std::lock_guard<std::mutex> lock(state_.mutex);
        const vt::matrix_input<float> dyin(dy, "grad_output", vt::flatten::features_last, fn);
        const auto dyv = dyin.view();
        velora::detail::require(dyv.cols == out_ && z.dim() == 2 && z.size(0) == dyv.rows && z.size(1) == state_.comp.groups() && v.dim() == 1 &&
                                    v.size(0) == state_.comp.subtoken_size() && v.scalar_type() == at::kFloat && z.is_contiguous() && v.is_contiguous(),
                                fn, "the record (Z ", vt::detail::describe(z), ", v ", vt::detail::describe(v), ") does not fit grad_output ",
                                vt::detail::describe(dy));
        auto& b = state_.backend.get();
        at::Tensor a = at::empty({out_, z.size(1)}, at::kFloat);
        const auto av = vt::mutable_view_of<float>(a, "a");
        vt::detail::record_gradient_factor(b, dyv, z, av);
        at::Tensor dw = at::empty({out_, state_.comp.features()}, at::kFloat);
        b.expand_subtokens(velora::const_matrix_view<float>(av), v.data_ptr<float>(), state_.comp.subtoken_size(),
                           static_cast<float>(state_.comp.config().scale), vt::mutable_view_of<float>(dw, "dw"));
        return dw;
    }

    // velora::share_first_batch_v over torch.distributed's `group`: v from the sum of the
    // sub-tokens of every rank's x (this rank's first recorded batch, [T, D] float32), the same
    // bits on every rank. Collective: every rank of the group calls it. Returns the status name;
    // on non_finite_input or overflow (every rank the same) v is left unset. Runs without the GIL
    // (the collectives take it), so the lock is taken as compress takes it: never while holding
    // the GIL.
    std::string share_first_batch_v(const at::Tensor& x, py::object group) {
        constexpr const char* fn = "velora.torch.VeloraLinear.forward";
        process_group_communicator comm(std::move(group), fn);
        const auto xv = vt::view_of<float>(x, "x", vt::flatten::features_last);
        const std::int64_t d = state_.comp.features();
        velora::detail::require(xv.cols == d, fn, "argument 'x' (", vt::detail::describe(x), ") must be [..., ", d, "]");
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lock(state_.mutex);
        auto& b = state_.backend.get();
        // A rank whose share is empty still takes part in the collectives; a zero token adds
        // nothing to the sum (the library refuses an empty view).
        const std::vector<float> zeros(static_cast<std::size_t>(d), 0.0f);
        const velora::const_matrix_view<float> zero_token{zeros.data(), 1, d, d};
        const velora::status s = velora::share_first_batch_v(b, state_.comp, xv.rows > 0 ? xv : zero_token, comm);
        if (s == velora::status::degenerate_input && comm.any(xv.rows > 0)) {
            // The ranks' batches together have a zero sub-token sum: one process compressing
            // that batch would take the fallback v (fallback_used() set), and so does a compress
            // of a zero token, the same on every rank. Without a token on any rank (an empty
            // batch everywhere) v stays unset, as one process's compress leaves it.
            (void)state_.comp.compress(zero_token, state_.staging);
            state_.staging.clear();
        }
        return std::string(velora::to_string(s));
    }

    at::Tensor save_state() {
        std::lock_guard<std::mutex> lock(state_.mutex);
        const std::vector<std::byte> blob = state_.comp.save_state();
        at::Tensor t = at::empty({static_cast<std::int64_t>(blob.size())}, at::kByte);
        std::memcpy(t.data_ptr(), blob.data(), blob.size());
        return t;
    }
    // Restores a state from save_state (a uint8 tensor); velora::state_format_error (ValueError)
    // naming the field when it is not this layer's, the compressor unchanged.
    void load_state(const at::Tensor& blob) {
        velora::detail::require(blob.defined() && blob.dim() == 1 && blob.scalar_type() == at::kByte && blob.device().is_cpu(),
                                "velora.torch.VeloraLinear.load_state", "buffer 'velora_state' (", vt::detail::describe(blob),
                                ") must be a 1-D uint8 CPU tensor");
        const at::Tensor c = blob.contiguous();
        std::lock_guard<std::mutex> lock(state_.mutex);
        state_.comp.load_state(std::span<const std::byte>(static_cast<const std::byte*>(c.data_ptr()), static_cast<std::size_t>(c.numel())));
    }
    at::Tensor v() {
        std::lock_guard<std::mutex> lock(state_.mutex);
        const auto s = state_.comp.v();
        at::Tensor t = at::zeros({state_.comp.subtoken_size()}, at::kFloat);
        if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size() * sizeof(float));
        return t;
    }
    void set_v(const at::Tensor& v) {
        const at::Tensor c = v.to(at::kFloat).contiguous();
        std::lock_guard<std::mutex> lock(state_.mutex);
        state_.comp.set_v(std::span<const float>(c.data_ptr<float>(), static_cast<std::size_t>(c.numel())));
    }
    std::uint64_t v_updates() { return state_.comp.v_updates(); }
    bool initialised() { return state_.comp.initialised(); }
    std::int64_t subtoken_size() const { return state_.comp.subtoken_size(); }
    std::int64_t groups() const { return state_.comp.groups(); }

private:
    static velora::compressor_config config_of(std::int64_t in, std::int64_t out, std::int64_t groups, const std::string& v, double ema_decay,
                                               std::uint64_t seed, const std::string& z_storage, double scale) {
        constexpr const char* fn = "velora.torch.VeloraLinear";
        velora::detail::require(in > 0 && out > 0, fn, "in_features and out_features must be positive, got ", in, " and ", out);
        velora::detail::require(groups >= 1 && groups <= in, fn, "argument 'groups' must satisfy 1 <= groups <= in_features, got groups = ", groups,
                                " with in_features = ", in);
        velora::compressor_config c;
        c.groups = groups;
        if (v == "first_batch_mean") c.v = velora::v_mode::first_batch_mean();
        else if (v == "batch_mean") c.v = velora::v_mode::batch_mean();
        else if (v == "ema") c.v = velora::v_mode::ema(ema_decay);
        else if (v == "random") c.v = velora::v_mode::random(seed);
        else if (v == "given") c.v = velora::v_mode::given();
        else velora::detail::fail(fn, "argument 'v' is '", v, "'; expected first_batch_mean, batch_mean, ema, random or given");
        if (z_storage == "float32") c.z_storage = velora::storage::f32;
        else if (z_storage == "float16") c.z_storage = velora::storage::f16;
        else if (z_storage == "bfloat16") c.z_storage = velora::storage::bf16;
        else velora::detail::fail(fn, "argument 'z_storage' is '", z_storage, "'; expected float32, float16 or bfloat16");
        c.scale = scale;
        return c;
    }

    std::int64_t out_;
    vt::detail::linear_state state_;
};

// ------------------------------------------------------------------ AdaRankGradAdamW's engine
template <class T>
T get_or(const py::dict& d, const char* key, T fallback) {
    return d.contains(key) && !d[key].is_none() ? d[key].cast<T>() : fallback;
}

// A param group's options from the dict python/velora/torch/optim.py resolves (every key present).
vt::AdaRankGradAdamWOptions options_of(const py::dict& d) {
    constexpr const char* fn = "velora.torch.AdaRankGradAdamW";
    const bool galore = get_or<bool>(d, "galore", false);
    adarank::optimizer_config c = galore ? adarank::optimizer_config::galore(get_or<std::int64_t>(d, "rank", 128), get_or<std::int64_t>(d, "update_proj_gap", 200),
                                                                            get_or<double>(d, "scale", 0.25))
                                         : adarank::optimizer_config{};
    c.adam.lr = get_or<double>(d, "lr", c.adam.lr);
    c.adam.beta1 = get_or<double>(d, "beta1", c.adam.beta1);
    c.adam.beta2 = get_or<double>(d, "beta2", c.adam.beta2);
    c.adam.eps = get_or<double>(d, "eps", c.adam.eps);
    c.adam.weight_decay = get_or<double>(d, "weight_decay", c.adam.weight_decay);
    const auto convention = get_or<std::string>(d, "convention", "galore");
    if (convention == "galore") c.adam.convention = adarank::adam_convention::galore;
    else if (convention == "torch") c.adam.convention = adarank::adam_convention::torch;
    else velora::detail::fail(fn, "option 'convention' is '", convention, "'; expected 'galore' or 'torch'");
    c.scale = get_or<double>(d, "scale", c.scale);
    const auto side = get_or<std::string>(d, "proj_type", "std");
    if (side == "std") c.side = adarank::side_policy::standard;
    else if (side == "reverse_std") c.side = adarank::side_policy::reverse_standard;
    else if (side == "left") c.side = adarank::side_policy::left;
    else if (side == "right") c.side = adarank::side_policy::right;
    else velora::detail::fail(fn, "option 'proj_type' is '", side, "'; expected 'std', 'reverse_std', 'left' or 'right' ('full' is not supported)");
    if (!galore) {
        if (d.contains("rank") && !d["rank"].is_none()) c.rank = adarank::rank_policy::fixed(d["rank"].cast<std::int64_t>());
        if (d.contains("adaptive_rank") && !d["adaptive_rank"].is_none()) {
            const auto t = d["adaptive_rank"].cast<std::tuple<double, std::int64_t, std::int64_t>>();
            c.rank = adarank::rank_policy::adaptive(std::get<0>(t), std::get<1>(t), std::get<2>(t));
        }
        if (d.contains("refresh") && !d["refresh"].is_none()) {
            const auto t = d["refresh"].cast<std::tuple<std::string, double, std::int64_t, std::int64_t>>();
            const std::string& k = std::get<0>(t);
            if (k == "converged") c.refresh = adarank::refresh_policy::converged(std::get<1>(t), std::get<2>(t), std::get<3>(t));
            else if (k == "captured_energy") c.refresh = adarank::refresh_policy::captured_energy(std::get<1>(t), std::get<2>(t), std::get<3>(t));
            else velora::detail::fail(fn, "option 'refresh' names '", k, "'; expected ('converged' | 'captured_energy', threshold, min_interval, max_interval)");
        } else if (d.contains("update_proj_gap") && !d["update_proj_gap"].is_none()) {
            c.refresh = adarank::refresh_policy::every(d["update_proj_gap"].cast<std::int64_t>());
        }
    }
    if (d.contains("transport") && !d["transport"].is_none()) {
        const auto t = d["transport"].cast<std::string>();
        if (t == "squared_rotation") c.transport = adarank::transport_policy::squared_rotation;
        else if (t == "clamped_rotation") c.transport = adarank::transport_policy::clamped_rotation;
        else if (t == "reset") c.transport = adarank::transport_policy::reset;
        else if (t == "none") c.transport = adarank::transport_policy::none;
        else velora::detail::fail(fn, "option 'transport' is '", t, "'; expected squared_rotation, clamped_rotation, reset or none");
    }
    c.seed = get_or<std::uint64_t>(d, "seed", c.seed);
    const auto state = get_or<std::string>(d, "state", "float32");
    if (state == "float32") c.state = adarank::state_format::float32;
    else if (state == "8bit") c.state = adarank::state_format::int8_blockwise;
    else velora::detail::fail(fn, "option 'state' is '", state, "'; expected 'float32' or '8bit'");
    c.state_block = get_or<std::int64_t>(d, "state_block", c.state_block);
    const auto basis = get_or<std::string>(d, "basis", "float32");
    if (basis == "float32") c.basis = adarank::basis_format::float32;
    else if (basis == "int8") c.basis = adarank::basis_format::int8;
    else if (basis == "int4") c.basis = adarank::basis_format::int4;
    else velora::detail::fail(fn, "option 'basis' is '", basis, "'; expected 'float32', 'int8' or 'int4'");
    c.basis_block = get_or<std::int64_t>(d, "basis_block", c.basis_block);
    vt::AdaRankGradAdamWOptions o;
    o.config(c);
    const auto kind = get_or<std::string>(d, "kind", "auto");
    if (kind == "auto") o.kind(adarank::param_kind::automatic);
    else if (kind == "low_rank") o.kind(adarank::param_kind::low_rank);
    else if (kind == "dense") o.kind(adarank::param_kind::dense);
    else velora::detail::fail(fn, "option 'kind' is '", kind, "'; expected 'auto', 'low_rank' or 'dense'");
    const auto nd = get_or<std::string>(d, "nd", "flatten");
    if (nd == "flatten") o.nd(vt::higher_dims::flatten);
    else if (nd == "dense") o.nd(vt::higher_dims::dense);
    else velora::detail::fail(fn, "option 'nd' is '", nd, "'; expected 'flatten' or 'dense'");
    const auto rounding = get_or<std::string>(d, "weight_rounding", "stochastic");
    if (rounding == "stochastic") o.weight_rounding(velora::bf16_rounding::stochastic);
    else if (rounding == "nearest") o.weight_rounding(velora::bf16_rounding::nearest);
    else velora::detail::fail(fn, "option 'weight_rounding' is '", rounding, "'; expected 'stochastic' or 'nearest'");
    return o;
}

void refuse_cuda(const std::vector<at::Tensor>& params, const char* fn) {
    for (const auto& p : params)
        velora::detail::require(p.device().is_cpu(), fn, "parameter ", vt::detail::describe(p),
                                " is not on the CPU; the Python package takes CPU tensors (the CUDA backend is not wired to torch yet)");
}

// The C++ optimizer over the Python optimizer's parameter tensors (the same TensorImpls: steps
// write the Python parameters in place).
class optimizer_core {
public:
    explicit optimizer_core(const py::list& groups) {
        std::vector<::torch::optim::OptimizerParamGroup> gs;
        for (const auto& g : groups) {
            const auto pair = g.cast<std::pair<std::vector<at::Tensor>, py::dict>>();
            refuse_cuda(pair.first, "velora.torch.AdaRankGradAdamW");
            gs.emplace_back(pair.first, std::make_unique<vt::AdaRankGradAdamWOptions>(options_of(pair.second)));
        }
        opt_ = std::make_unique<vt::AdaRankGradAdamW>(std::move(gs));
    }

    void add_param_group(const std::vector<at::Tensor>& params, const py::dict& options) {
        refuse_cuda(params, "velora.torch.AdaRankGradAdamW.add_param_group");
        opt_->add_param_group(::torch::optim::OptimizerParamGroup(params, std::make_unique<vt::AdaRankGradAdamWOptions>(options_of(options))));
    }

    // Sets every group's options from the Python groups (lr and the others: a change the library
    // cannot make throws ValueError naming it) and steps. Returns (status, skipped, stepped,
    // [(group, index, status)]).
    py::tuple step(const py::list& groups) {
        constexpr const char* fn = "velora.torch.AdaRankGradAdamW.step";
        auto& pg = opt_->param_groups();
        velora::detail::require(py::len(groups) == pg.size(), fn, "the optimizer has ", py::len(groups), " param groups but its engine ", pg.size());
        std::size_t g = 0;
        for (const auto& d : groups) {
            const auto params = d.cast<py::dict>()["params"].cast<std::vector<at::Tensor>>();
            refuse_cuda(params, fn);
            auto& group = pg[g];
            // parameters appended to a Python group after construction
            for (std::size_t i = group.params().size(); i < params.size(); ++i) group.params().push_back(params[i]);
            vt::AdaRankGradAdamWOptions o = options_of(d.cast<py::dict>());
            static_cast<vt::AdaRankGradAdamWOptions&>(group.options()).stored(o.stored());
            ++g;
        }
        const vt::step_report r = [&] {
            py::gil_scoped_release release;
            return opt_->step_checked();
        }();
        py::list events;
        for (const auto& e : r.events) events.append(py::make_tuple(e.group, e.index, std::string(velora::to_string(e.status))));
        return py::make_tuple(std::string(velora::to_string(r.status)), r.skipped, r.stepped, events);
    }

    // The optimizer as a torch archive's bytes (AdaRankGradAdamW::save: options and library state).
    py::bytes save() const {
        ::torch::serialize::OutputArchive archive;
        opt_->save(archive);
        std::ostringstream out;
        archive.save_to(out);
        return py::bytes(out.str());
    }
    void load(const py::bytes& data) {
        const std::string s = data;
        ::torch::serialize::InputArchive archive;
        archive.load_from(s.data(), s.size());
        opt_->load(archive);
    }
    // Every group's options after a load (lr included), as (lr, beta1, beta2, eps, weight_decay).
    py::list group_hyper() const {
        py::list out;
        for (const auto& g : opt_->param_groups()) {
            const auto& o = static_cast<const vt::AdaRankGradAdamWOptions&>(g.options());
            out.append(py::make_tuple(o.lr(), std::get<0>(o.betas()), std::get<1>(o.betas()), o.eps(), o.weight_decay()));
        }
        return out;
    }
    py::dict layer_state(const at::Tensor& p) const {
        const adarank::layer_info i = opt_->layer_state(p);
        py::dict d;
        d["low_rank"] = i.low_rank;
        d["rank"] = i.rank;
        d["refreshes"] = i.refreshes;
        d["state_bytes"] = i.state_bytes;
        d["side"] = i.side == adarank::projection_side::left ? "left" : "right";
        return d;
    }
    at::Tensor basis(const at::Tensor& p) const { return opt_->basis(p); }
    std::string set_basis(const at::Tensor& p, const at::Tensor& basis) { return std::string(velora::to_string(opt_->set_basis(p, basis))); }
    // Data-parallel steps over torch.distributed's `group` (None: the default group).
    void set_process_group(py::object group) {
        opt_->set_communicator(std::make_shared<process_group_communicator>(std::move(group), "velora.torch.AdaRankGradAdamW"));
    }
    void clear_process_group() { opt_->set_communicator(nullptr); }
    std::uint64_t skipped_steps() const { return opt_->skipped_steps(); }
    std::size_t state_bytes() const { return opt_->state_bytes(); }
    std::size_t adamw_state_bytes() const { return opt_->adamw_state_bytes(); }

private:
    std::unique_ptr<vt::AdaRankGradAdamW> opt_;
};

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "velora's CPU engines for velora.torch (see docs/python.md)";
    m.def("build_info", &velora_python::build_info, "What this extension was compiled with (velora.build_info, docs/python.md)");
    py::class_<linear_core>(m, "LinearCore")
        .def(py::init<std::int64_t, std::int64_t, std::int64_t, const std::string&, double, std::uint64_t, const std::string&, double>(),
             py::arg("in_features"), py::arg("out_features"), py::arg("groups"), py::arg("v"), py::arg("ema_decay"), py::arg("seed"),
             py::arg("z_storage"), py::arg("scale"))
        .def("compress", &linear_core::compress, py::call_guard<py::gil_scoped_release>())
        .def("gradient_factor", &linear_core::gradient_factor, py::call_guard<py::gil_scoped_release>())
        .def("share_first_batch_v", &linear_core::share_first_batch_v)
        // The accessors that take the layer's lock release the GIL first, as compress does: a
        // thread holding the lock may wait for the GIL (share_first_batch_v's collectives), so
        // none may wait for the lock while holding the GIL.
        .def("save_state", &linear_core::save_state, py::call_guard<py::gil_scoped_release>())
        .def("load_state", &linear_core::load_state, py::call_guard<py::gil_scoped_release>())
        .def("v", &linear_core::v, py::call_guard<py::gil_scoped_release>())
        .def("set_v", &linear_core::set_v, py::call_guard<py::gil_scoped_release>())
        .def("v_updates", &linear_core::v_updates)
        .def("initialised", &linear_core::initialised)
        .def_property_readonly("subtoken_size", &linear_core::subtoken_size)
        .def_property_readonly("groups", &linear_core::groups);
    py::class_<optimizer_core>(m, "OptimizerCore")
        .def(py::init<const py::list&>())
        .def("add_param_group", &optimizer_core::add_param_group)
        .def("step", &optimizer_core::step)
        .def("save", &optimizer_core::save)
        .def("load", &optimizer_core::load)
        .def("group_hyper", &optimizer_core::group_hyper)
        .def("layer_state", &optimizer_core::layer_state)
        .def("basis", &optimizer_core::basis)
        .def("set_basis", &optimizer_core::set_basis)
        .def("set_process_group", &optimizer_core::set_process_group)
        .def("clear_process_group", &optimizer_core::clear_process_group)
        .def("skipped_steps", &optimizer_core::skipped_steps)
        .def("state_bytes", &optimizer_core::state_bytes)
        .def("adamw_state_bytes", &optimizer_core::adamw_state_bytes);
}
