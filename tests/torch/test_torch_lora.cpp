// velora::torch::VeloraLoRALinear and replace_lora: forward and gradients against a PEFT-style
// LoRA written with torch operations (frozen linear + dropout(x)·Aᵀ·Bᵀ·s, autograd), with and
// without dropout; the VeLoRA path against its closed form; bf16 and NF4 bases against
// dequantise-then-linear; the packed NF4 weight in torch archives; save/load; merge/unmerge;
// replace_lora on a module tree; only A and B trainable; AdamW training; bad inputs.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "torch_doctest.hpp"

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "../test_util.hpp"

using test::invalid_argument_message;
using velora::torch::base_storage;
using velora::torch::LoRAOptions;
using velora::torch::VeloraLoRALinear;

using torch_test::contains;
using torch_test::max_relative;

namespace {

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) { return a.defined() && b.defined() && a.sizes() == b.sizes() && a.equal(b); }

at::Tensor randn(std::vector<std::int64_t> sizes, std::uint64_t seed, double mean = 0.0) {
    at::manual_seed(seed);
    return torch::randn(sizes).add_(mean);
}

torch::nn::Linear make_linear(std::int64_t d, std::int64_t o, std::uint64_t seed, bool bias = true) {
    at::manual_seed(seed);
    return torch::nn::Linear(torch::nn::LinearOptions(d, o).bias(bias));
}

// Gives B a non-zero value (B = 0 at initialisation hides A from y and dA from the loss).
void randomise_b(VeloraLoRALinear& m, std::uint64_t seed) {
    torch::NoGradGuard no_grad;
    m->lora_B.copy_(randn({m->lora_B.size(0), m->lora_B.size(1)}, seed).mul_(0.3));
}

// PEFT's LoRA forward in torch operations: linear(x, W, b) + (dropout(x)·Aᵀ·Bᵀ)·s, with
// autograd. `seed` >= 0 draws the dropout mask after at::manual_seed(seed).
struct reference {
    at::Tensor x, a, b, y;
    reference(const at::Tensor& x_, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& a_, const at::Tensor& b_, double s,
              double p = 0, std::int64_t seed = -1) {
        x = x_.detach().clone().requires_grad_(true);
        a = a_.detach().clone().requires_grad_(true);
        b = b_.detach().clone().requires_grad_(true);
        at::Tensor xa = x;
        if (p > 0) {
            at::manual_seed(static_cast<std::uint64_t>(seed));
            xa = torch::dropout(x, p, /*train=*/true);
        }
        y = torch::nn::functional::linear(x, w.detach(), bias.defined() ? bias.detach() : at::Tensor()) + xa.matmul(a.t()).matmul(b.t()) * s;
    }
};

// VeLoRA's estimate of A's gradient in closed form, in double: dA = scale · Pᵀ·X̂ with
// P = s·dY·B, X̂ = Z·(I_G ⊗ vᵀ) and Z = X·(I_G ⊗ v)ᵀ (X zero-padded to G·s columns).
at::Tensor closed_form_da(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& b, double s, const at::Tensor& v, std::int64_t groups,
                          double scale) {
    const std::int64_t d = x.size(-1), sub = v.numel();
    const at::Tensor x2 = x.reshape({-1, d}).to(at::kDouble);
    const at::Tensor p = s * dy.reshape({-1, dy.size(-1)}).to(at::kDouble).mm(b.to(at::kDouble));
    const std::int64_t t = x2.size(0);
    const at::Tensor vd = v.to(at::kDouble);
    const at::Tensor z = (at::constant_pad_nd(x2, {0, groups * sub - d}).view({t, groups, sub}) * vd).sum(-1).to(at::kFloat).to(at::kDouble);
    const at::Tensor xhat = (z.unsqueeze(-1) * vd).reshape({t, groups * sub}).narrow(1, 0, d);
    return scale * p.t().mm(xhat);
}

// The NF4 weight the layer stores, dequantised by the library's nf4_weight (the reference's W).
at::Tensor nf4_dequantised(const at::Tensor& w, velora::nf4_options options) {
    const at::Tensor wc = w.detach().contiguous();
    const auto q = velora::nf4_weight::quantize(velora::torch::view_of<float>(wc, "w", velora::torch::flatten::outputs_first), options);
    at::Tensor out = at::empty_like(wc);
    q.dequantize_rows<float>(0, velora::torch::mutable_view_of<float>(out, "out", velora::torch::flatten::outputs_first));
    return out;
}

} // namespace

TEST_CASE("initialisation: B = 0 and A as PEFT's Kaiming-uniform, so the output equals the wrapped Linear's") {
    const std::int64_t d = 64, o = 24;
    auto lin = make_linear(d, o, 1);
    at::manual_seed(2);
    VeloraLoRALinear m(lin, LoRAOptions().r(8).lora_alpha(16));
    at::manual_seed(2);
    at::Tensor a = torch::empty({8, d});
    torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));   // what PEFT's reset_lora_parameters draws
    CHECK(bitwise_equal(m->lora_A, a));
    CHECK(m->lora_A.abs().max().item<double>() <= 1.0 / std::sqrt(double(d)));
    CHECK(m->lora_B.abs().max().item<float>() == 0.0f);
    CHECK(m->scaling() == 2.0f);
    const at::Tensor x = randn({5, 7, d}, 3);
    const double err = max_relative(m(x), lin(x));
    MESSAGE("y vs the wrapped Linear at initialisation: max relative " << err);
    CHECK(err < 1e-6);
    // The float base shares the Linear's storage (PEFT keeps the base module itself).
    CHECK(m->weight.data_ptr() == lin->weight.data_ptr());
    CHECK_FALSE(m->weight.requires_grad());
}

TEST_CASE("no dropout: y, dX, dA and dB equal the PEFT-style torch reference") {
    const std::int64_t d = 48, o = 20, r = 6;
    for (bool bias : {true, false}) {
        CAPTURE(bias);
        auto lin = make_linear(d, o, 4, bias);
        VeloraLoRALinear m(lin, LoRAOptions().r(r).lora_alpha(12));
        randomise_b(m, 5);
        const at::Tensor x = randn({3, 5, d}, 6).requires_grad_(true), g = randn({3, 5, o}, 7);
        reference ref(x, lin->weight, lin->bias, m->lora_A, m->lora_B, 2.0);
        const at::Tensor y = m(x);
        (y * g).sum().backward();
        (ref.y * g).sum().backward();
        const double ey = max_relative(y, ref.y), ex = max_relative(x.grad(), ref.x.grad()), ea = max_relative(m->lora_A.grad(), ref.a.grad()),
                     eb = max_relative(m->lora_B.grad(), ref.b.grad());
        MESSAGE("max relative errors vs torch: y " << ey << ", dX " << ex << ", dA " << ea << ", dB " << eb);
        CHECK(ey < 1e-5);
        CHECK(ex < 1e-5);
        CHECK(ea < 1e-5);
        CHECK(eb < 1e-5);
        CHECK_FALSE(m->weight.grad().defined());
        // The exact path keeps H and x_a (x itself here).
        CHECK(m->last_record_bytes() == static_cast<std::size_t>(15 * r * 4 + 15 * d * 4));
    }
}

TEST_CASE("dropout: the record is taken from dropout(x), dA and dX follow the same mask as the reference") {
    const std::int64_t d = 40, o = 16, r = 4;
    const double p = 0.3;
    auto lin = make_linear(d, o, 8);
    VeloraLoRALinear m(lin, LoRAOptions().r(r).lora_alpha(8).lora_dropout(p));
    randomise_b(m, 9);
    m->train();
    const at::Tensor x = randn({11, d}, 10).requires_grad_(true), g = randn({11, o}, 11);
    reference ref(x, lin->weight, lin->bias, m->lora_A, m->lora_B, 2.0, p, 12);
    at::manual_seed(12);   // the module's dropout draws the same mask
    const at::Tensor y = m(x);
    (y * g).sum().backward();
    (ref.y * g).sum().backward();
    const double ey = max_relative(y, ref.y), ex = max_relative(x.grad(), ref.x.grad()), ea = max_relative(m->lora_A.grad(), ref.a.grad()),
                 eb = max_relative(m->lora_B.grad(), ref.b.grad());
    MESSAGE("dropout p = 0.3, max relative errors vs torch: y " << ey << ", dX " << ex << ", dA " << ea << ", dB " << eb);
    CHECK(ey < 1e-5);
    CHECK(ex < 1e-5);
    CHECK(ea < 1e-5);
    CHECK(eb < 1e-5);
    // A different mask gives a different dA: the test does see the mask.
    reference other(x, lin->weight, lin->bias, m->lora_A, m->lora_B, 2.0, p, 13);
    (other.y * g).sum().backward();
    CHECK(max_relative(m->lora_A.grad(), other.a.grad()) > 1e-2);
    // Evaluation mode: no dropout, the output is the no-dropout reference.
    m->eval();
    reference plain(x, lin->weight, lin->bias, m->lora_A, m->lora_B, 2.0);
    CHECK(max_relative(m(x), plain.y) < 1e-5);
}

TEST_CASE("VeLoRA: dA is the closed form from dropout(x)'s record, y, dX and dB stay exact, x_a is not kept") {
    const std::int64_t d = 96, o = 32, r = 8, groups = 12;
    for (double p : {0.0, 0.2}) {
        CAPTURE(p);
        auto lin = make_linear(d, o, 14);
        VeloraLoRALinear m(lin, LoRAOptions().r(r).lora_alpha(16).lora_dropout(p).use_velora(true).groups(groups));
        CHECK(m->named_buffers().contains("v"));
        randomise_b(m, 15);
        m->train();
        const at::Tensor x = randn({2, 9, d}, 16, 0.5).requires_grad_(true), g = randn({2, 9, o}, 17);
        reference ref(x, lin->weight, lin->bias, m->lora_A, m->lora_B, 2.0, p, 18);
        at::manual_seed(18);
        const at::Tensor y = m(x);
        (y * g).sum().backward();
        (ref.y * g).sum().backward();
        // The record's x_a: dropout(x) with the same mask (x when p = 0).
        at::Tensor xa = x.detach();
        if (p > 0) {
            at::manual_seed(18);
            xa = torch::dropout(x.detach(), p, true);
        }
        const at::Tensor da = closed_form_da(xa, g, m->lora_B.detach(), 2.0, m->v, groups, 0.1);
        const double ey = max_relative(y, ref.y), ex = max_relative(x.grad(), ref.x.grad()), eb = max_relative(m->lora_B.grad(), ref.b.grad()),
                     ea = max_relative(m->lora_A.grad(), da);
        MESSAGE("VeLoRA p = " << p << ": y " << ey << ", dX " << ex << ", dB " << eb << " vs torch; dA " << ea << " vs the closed form");
        CHECK(ey < 1e-5);
        CHECK(ex < 1e-5);
        CHECK(eb < 1e-5);
        CHECK(ea < 1e-5);
        // Kept on the adapter path: H (T·r floats) + Z (T·G floats) + v, not x_a (T·D floats).
        const std::size_t kept = m->last_record_bytes(), input = m->last_input_bytes();
        MESSAGE("adapter-path bytes kept " << kept << " vs x_a " << input);
        CHECK(kept == static_cast<std::size_t>(18 * r * 4 + 18 * groups * 4 + (d / groups) * 4));
        CHECK(input == static_cast<std::size_t>(18 * d * 4));
    }
}

TEST_CASE("bf16 and NF4 bases: y and dX equal dequantise-then-linear to rounding; the NF4 weight is packed") {
    const std::int64_t d = 128, o = 48, r = 4;
    auto lin = make_linear(d, o, 19);
    struct config {
        base_storage base;
        bool dq;
    };
    for (const config c : {config{base_storage::bf16, false}, config{base_storage::nf4, false}, config{base_storage::nf4, true}}) {
        CAPTURE(static_cast<int>(c.base));
        CAPTURE(c.dq);
        VeloraLoRALinear m(lin, LoRAOptions().r(r).base(c.base).nf4_double_quant(c.dq));
        randomise_b(m, 20);
        const at::Tensor w = c.base == base_storage::bf16 ? lin->weight.detach().to(at::kBFloat16).to(at::kFloat)
                                                          : nf4_dequantised(lin->weight, velora::nf4_options{.block_size = 64, .double_quant = c.dq});
        const at::Tensor x = randn({13, d}, 21).requires_grad_(true), g = randn({13, o}, 22);
        reference ref(x, w, lin->bias, m->lora_A, m->lora_B, 2.0);
        const at::Tensor y = m(x);
        (y * g).sum().backward();
        (ref.y * g).sum().backward();
        const double ey = max_relative(y, ref.y), ex = max_relative(x.grad(), ref.x.grad()), ea = max_relative(m->lora_A.grad(), ref.a.grad());
        const double bpw = 8.0 * static_cast<double>(m->base_weight_bytes()) / static_cast<double>(o * d);
        MESSAGE("base " << static_cast<int>(c.base) << std::string(c.dq ? " (double quant)" : "") << ": y " << ey << ", dX " << ex << ", dA " << ea
                        << " vs dequantised torch; " << bpw << " bits per weight");
        CHECK(ey < 1e-5);
        CHECK(ex < 1e-5);
        CHECK(ea < 1e-5);
        if (c.base == base_storage::bf16) CHECK(bpw == 16.0);
        else if (!c.dq) CHECK(bpw == 4.5);
        else CHECK(bpw < 4.5);
        CHECK_FALSE(m->named_parameters().contains("weight"));
    }
}

TEST_CASE("torch archives: the NF4 weight is saved packed, and a loaded layer gives the same bits") {
    const std::int64_t d = 256, o = 256, r = 8;
    auto lin = make_linear(d, o, 23);
    const auto options = LoRAOptions().r(r).base(base_storage::nf4).use_velora(true).groups(16);
    VeloraLoRALinear m(lin, options);
    randomise_b(m, 24);
    (void)m(randn({10, d}, 25, 0.3)).sum();   // sets v (first batch), saved with the module
    std::stringstream nf4_archive, f32_archive;
    torch::save(m, nf4_archive);
    VeloraLoRALinear dense(lin, LoRAOptions().r(r));
    torch::save(dense, f32_archive);
    const double nf4_bytes = static_cast<double>(nf4_archive.str().size()), f32_bytes = static_cast<double>(f32_archive.str().size());
    const double packed = static_cast<double>(o * d) / 2 + static_cast<double>(o * d / 64) * 4;
    const double adapters = static_cast<double>((o + d) * r * 4);
    MESSAGE("archive bytes: NF4 base " << nf4_bytes << " (" << nf4_bytes / double(o * d) << " B/weight; packed weight " << packed << ", adapters "
                                       << adapters << "), float base " << f32_bytes << " (" << f32_bytes / double(o * d) << " B/weight)");
    CHECK(nf4_bytes < packed + adapters + 8192);   // + the archive's own records (names, headers)
    CHECK(nf4_bytes > packed + adapters);
    CHECK(f32_bytes > double(o * d) * 4);

    VeloraLoRALinear loaded(d, o, true, options);
    torch::load(loaded, nf4_archive);
    CHECK(bitwise_equal(loaded->nf4_codes, m->nf4_codes));
    CHECK(bitwise_equal(loaded->v, m->v));
    const at::Tensor x = randn({2, 6, d}, 26, -0.4), g = randn({2, 6, o}, 27);
    const at::Tensor y1 = m(x), y2 = loaded(x);
    CHECK(bitwise_equal(y1, y2));
    (y1 * g).sum().backward();
    (y2 * g).sum().backward();
    CHECK(bitwise_equal(m->lora_A.grad(), loaded->lora_A.grad()));
    CHECK(bitwise_equal(m->lora_B.grad(), loaded->lora_B.grad()));
    CHECK(bitwise_equal(loaded->v, m->v));   // the loaded state, not a v from its own first batch

    // An archive of another configuration is refused with the tensor's name.
    VeloraLoRALinear wrong(d, o, true, LoRAOptions().r(r).base(base_storage::nf4).nf4_block_size(32).use_velora(true).groups(16));
    nf4_archive.seekg(0);
    torch::load(wrong, nf4_archive);
    CHECK(contains(invalid_argument_message([&] { (void)wrong(x); }), "tensor 'nf4_absmax'"));
    // A corrupt scale (NaN) is refused, not spread through y.
    VeloraLoRALinear corrupt(d, o, true, options);
    nf4_archive.seekg(0);
    torch::load(corrupt, nf4_archive);
    corrupt->nf4_absmax[3] = std::nanf("");
    CHECK(contains(invalid_argument_message([&] { (void)corrupt(x); }), "non-finite or negative"));
}

TEST_CASE("merge and unmerge (float base): the merged layer is the base alone with W + s·B·A; NF4 and bf16 refuse") {
    const std::int64_t d = 64, o = 40;
    auto lin = make_linear(d, o, 28);
    const at::Tensor w0 = lin->weight.detach().clone();
    VeloraLoRALinear m(lin, LoRAOptions().r(8).lora_alpha(32));
    randomise_b(m, 29);
    const at::Tensor x = randn({7, d}, 30);
    const at::Tensor before = m(x).detach();
    m->merge();
    CHECK(m->merged());
    const at::Tensor merged_w = (w0.to(at::kDouble) + 4.0 * m->lora_B.detach().to(at::kDouble).mm(m->lora_A.detach().to(at::kDouble)));
    const double ew = max_relative(m->weight, merged_w), ey = max_relative(m(x), before);
    MESSAGE("merge: W vs W + s·B·A " << ew << ", y merged vs unmerged " << ey);
    CHECK(ew < 1e-6);
    CHECK(ey < 1e-5);
    // Merged, A and B take no gradient.
    const at::Tensor xr = x.clone().requires_grad_(true);
    m(xr).sum().backward();
    CHECK_FALSE(m->lora_A.grad().defined());
    CHECK(xr.grad().defined());
    CHECK(contains(invalid_argument_message([&] { m->merge(); }), "already merged"));
    m->unmerge();
    const double eu = max_relative(m->weight, w0);
    MESSAGE("unmerge: W vs the original " << eu);
    CHECK(eu < 1e-6);
    CHECK(contains(invalid_argument_message([&] { m->unmerge(); }), "not merged"));
    for (base_storage b : {base_storage::nf4, base_storage::bf16}) {
        VeloraLoRALinear q(lin, LoRAOptions().r(8).base(b));
        CHECK(contains(invalid_argument_message([&] { q->merge(); }), "velora::torch::VeloraLoRALinear::merge"));
        CHECK(contains(invalid_argument_message([&] { q->merge(); }), "cannot hold W + s*B*A exactly"));
    }
}

namespace {

// An attention-like block that calls its projections through the registry (forward_child), so
// replace_lora's replacements take effect; and a model with a Sequential MLP.
struct BlockImpl : torch::nn::Module {
    BlockImpl(std::int64_t d) {
        for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"}) register_module(n, torch::nn::Linear(d, d));
    }
    at::Tensor forward(const at::Tensor& x) {
        using velora::torch::forward_child;
        const at::Tensor q = forward_child(*this, "q_proj", x), k = forward_child(*this, "k_proj", x), v = forward_child(*this, "v_proj", x);
        return forward_child(*this, "o_proj", torch::tanh(q * k) + v);
    }
};
TORCH_MODULE(Block);

struct ModelImpl : torch::nn::Module {
    torch::nn::ModuleList layers;
    torch::nn::Sequential mlp;
    ModelImpl(std::int64_t d) {
        layers = register_module("layers", torch::nn::ModuleList(Block(d), Block(d)));
        mlp = register_module("mlp", torch::nn::Sequential(torch::nn::Linear(d, 2 * d), torch::nn::ReLU(), torch::nn::Linear(2 * d, d)));
    }
    at::Tensor forward(at::Tensor x) {
        for (const auto& layer : *layers) x = layer->as<BlockImpl>()->forward(x);
        return mlp->forward(x);
    }
};
TORCH_MODULE(Model);

std::vector<std::string> lora_names(torch::nn::Module& root) {
    std::vector<std::string> names;
    for (const auto& item : root.named_modules("", false))
        if (item.value()->as<velora::torch::VeloraLoRALinearImpl>()) names.push_back(item.key());
    return names;
}

} // namespace

TEST_CASE("replace_lora: PEFT's target_modules by name suffix, others untouched, output equal at initialisation") {
    using velora::torch::matches_target;
    CHECK(matches_target("layers.0.v_proj", {"v_proj"}));
    CHECK(matches_target("v_proj", {"v_proj"}));
    CHECK(matches_target("layers.0.v_proj", {"0.v_proj"}));
    CHECK_FALSE(matches_target("layers.0.xv_proj", {"v_proj"}));
    CHECK_FALSE(matches_target("layers.0.v_proj", {"proj"}));

    const std::int64_t d = 16;
    at::manual_seed(31);
    Model model(d);
    const at::Tensor x = randn({5, d}, 32);
    const at::Tensor before = model(x).detach();
    const std::size_t params_before = model->parameters().size();
    const at::Tensor k_weight = model->layers[0]->as<BlockImpl>()->named_children()["k_proj"]->as<torch::nn::LinearImpl>()->weight;

    const auto replaced = velora::torch::replace_lora(*model, {"q_proj", "v_proj", "mlp.2"}, LoRAOptions().r(4).lora_dropout(0.1));
    const std::vector<std::string> expected{"layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj", "mlp.2"};
    CHECK((replaced == expected));
    CHECK((lora_names(*model) == expected));
    // Untouched: k_proj, o_proj and mlp.0 are still the same Linear objects, still trainable.
    const auto k = model->layers[0]->as<BlockImpl>()->named_children()["k_proj"]->as<torch::nn::LinearImpl>();
    REQUIRE(k != nullptr);
    CHECK(k->weight.data_ptr() == k_weight.data_ptr());
    CHECK(k->weight.requires_grad());
    CHECK(model->mlp[0]->as<torch::nn::LinearImpl>() != nullptr);
    // The Sequential calls the replacement (its own list was updated, not only the registry).
    CHECK(model->mlp[2]->as<velora::torch::VeloraLoRALinearImpl>() != nullptr);
    // Parameters: 5 replaced layers lose weight and bias and gain A and B.
    CHECK(model->parameters().size() == params_before);
    model->eval();
    const double e = max_relative(model(x), before);
    MESSAGE("model output after replace_lora vs before (B = 0): " << e);
    CHECK(e < 1e-5);
    CHECK(contains(invalid_argument_message([&] { (void)velora::torch::replace_lora(*model, {"qproj"}); }), "no torch::nn::Linear"));
}

TEST_CASE("only A and B are trainable: an optimizer over parameters() leaves the base untouched, and AdamW reduces the loss") {
    const std::int64_t d = 64, o = 24, r = 4;
    for (base_storage b : {base_storage::f32, base_storage::nf4}) {
        for (bool velora_path : {false, true}) {
            CAPTURE(static_cast<int>(b));
            CAPTURE(velora_path);
            auto lin = make_linear(d, o, 33);
            VeloraLoRALinear m(lin, LoRAOptions().r(r).lora_alpha(8).base(b).use_velora(velora_path).groups(8));
            std::vector<std::string> names;
            for (const auto& item : m->named_parameters()) names.push_back(item.key());
            CHECK((names == std::vector<std::string>{"lora_A", "lora_B"}));
            const at::Tensor w = b == base_storage::f32 ? m->weight.clone() : m->nf4_codes.clone();
            const at::Tensor bias = m->bias.clone();
            torch::optim::AdamW opt(m->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
            // Target: the base plus a rank-2 change, which the adapters can represent (the base
            // cancels out of the loss, so the float and NF4 runs follow the same path).
            const at::Tensor delta = randn({o, 2}, 34).mm(randn({2, d}, 35)).mul_(0.2);
            const at::Tensor x = randn({64, d}, 36);
            const at::Tensor target = (m(x) + x.mm(delta.t())).detach();
            double first = 0, last = 0;
            for (int step = 0; step < 60; ++step) {
                opt.zero_grad();
                const at::Tensor loss = (m(x) - target).pow(2).mean();
                loss.backward();
                opt.step();
                if (step == 0) first = loss.item<double>();
                last = loss.item<double>();
            }
            MESSAGE("base " << static_cast<int>(b) << std::string(velora_path ? " VeLoRA" : "") << ": AdamW loss " << first << " -> " << last);
            // Per-path margins: exact dA fits the rank-2 change; VeLoRA's estimate of dA (G = 8
            // groups of 8, scale 0.1) moves A slowly, and B's exact gradient carries the fit.
            CHECK(last < (velora_path ? 0.9 : 0.02) * first);
            CHECK(bitwise_equal(b == base_storage::f32 ? m->weight : m->nf4_codes, w));
            CHECK(bitwise_equal(m->bias, bias));
        }
    }
}

TEST_CASE("half-precision inputs are cast; float64 is refused, not silently computed in float32") {
    const std::int64_t d = 32, o = 8;
    auto lin = make_linear(d, o, 37);
    VeloraLoRALinear m(lin, LoRAOptions().r(2));
    randomise_b(m, 38);
    const at::Tensor x = randn({4, d}, 39);
    const at::Tensor xh = x.to(at::kBFloat16).requires_grad_(true);
    const at::Tensor y = m(xh);
    CHECK((y.scalar_type() == at::kBFloat16));
    y.sum().backward();
    CHECK((xh.grad().scalar_type() == at::kBFloat16));
    CHECK(max_relative(y, m(xh.detach().to(at::kFloat))) < 1e-2);
    const std::string msg = invalid_argument_message([&] { (void)m(x.to(at::kDouble)); });
    CHECK(contains(msg, "velora::torch::VeloraLoRALinear::forward"));
    CHECK(contains(msg, "float64"));
    // Module::to(double) converts A and B: refused by name too.
    VeloraLoRALinear converted(lin, LoRAOptions().r(2));
    converted->to(at::kDouble);
    CHECK(contains(invalid_argument_message([&] { (void)converted(x); }), "tensor 'lora_A'"));
}

TEST_CASE("bad configurations and inputs: std::invalid_argument naming the function, the option and the values") {
    auto lin = make_linear(32, 8, 40);
    const auto err = [&](LoRAOptions o) { return invalid_argument_message([&] { VeloraLoRALinear m(lin, o); }); };
    CHECK(contains(err(LoRAOptions().r(0)), "option r must satisfy 1 <= r <= min(O, D) = 8, got r = 0"));
    CHECK(contains(err(LoRAOptions().r(9)), "got r = 9 with O = 8, D = 32"));
    CHECK(contains(err(LoRAOptions().lora_alpha(0)), "option lora_alpha must be finite and non-zero"));
    CHECK(contains(err(LoRAOptions().lora_dropout(1.0)), "option lora_dropout must satisfy 0 <= p < 1, got 1"));
    CHECK(contains(err(LoRAOptions().use_velora(true).groups(33)), "option groups must satisfy 1 <= G <= in_features, got G = 33"));
    CHECK(contains(err(LoRAOptions().use_velora(true).z_storage(velora::storage::f64)), "z_storage = f64"));
    CHECK(contains(err(LoRAOptions().base(base_storage::nf4).nf4_block_size(24)), "option nf4_block_size must be even and divide in_features, got 24"));
    CHECK(contains(err(LoRAOptions().r(0)), "velora::torch::VeloraLoRALinear"));
    {
        torch::nn::Linear half_lin(4, 4);
        half_lin->to(at::kHalf);
        CHECK(contains(invalid_argument_message([&] { VeloraLoRALinear m(half_lin, LoRAOptions().r(2)); }), "must be a float32 CPU tensor"));
    }
    VeloraLoRALinear m(lin, LoRAOptions().r(2));
    CHECK(contains(invalid_argument_message([&] { (void)m(torch::randn({3, 31})); }), "argument 'x' (shape [3, 31]"));
    CHECK(contains(invalid_argument_message([&] { (void)m(torch::ones({3, 32}, at::kInt)); }), "not a floating-point tensor"));
    // An empty batch: empty y and dX, zero gradients.
    const at::Tensor e = torch::zeros({0, 32}).requires_grad_(true);
    m(e).sum().backward();
    CHECK(m(e).size(0) == 0);
    CHECK(m->lora_A.grad().abs().sum().item<float>() == 0.0f);
}

TEST_CASE("VeLoRA: an x with NaN gives y, an unchanged v, last_status non_finite_input and a NaN dA") {
    auto lin = make_linear(32, 8, 41);
    VeloraLoRALinear m(lin, LoRAOptions().r(2).use_velora(true).groups(8));
    (void)m(randn({4, 32}, 42, 0.5));
    const at::Tensor v = m->v.clone();
    at::Tensor x = randn({4, 32}, 43);
    x[1][3] = std::nanf("");
    m(x).sum().backward();
    CHECK(m->last_status() == velora::status::non_finite_input);
    CHECK(bitwise_equal(m->v, v));
    CHECK(torch::isnan(m->lora_A.grad()).all().item<bool>());
}

TEST_CASE("gradient accumulation and clone: each forward keeps its own record; a clone computes the same bits") {
    const std::int64_t d = 64, o = 16;
    auto lin = make_linear(d, o, 44);
    VeloraLoRALinear m(lin, LoRAOptions().r(4).use_velora(true).groups(8).base(base_storage::nf4));
    randomise_b(m, 45);
    const at::Tensor x1 = randn({6, d}, 46, 0.3), x2 = randn({5, d}, 47, -0.2);
    const at::Tensor y1 = m(x1), y2 = m(x2);   // two forwards, then two backwards
    y2.sum().backward();
    y1.sum().backward();
    const at::Tensor accumulated = m->lora_A.grad().clone();
    m->zero_grad();
    m(x1).sum().backward();
    m(x2).sum().backward();
    CHECK(max_relative(m->lora_A.grad(), accumulated) < 1e-6);
    const auto cloned = std::dynamic_pointer_cast<velora::torch::VeloraLoRALinearImpl>(m->clone());
    REQUIRE(cloned != nullptr);
    CHECK(bitwise_equal(cloned->forward(x2), m(x2)));
    CHECK(bitwise_equal(cloned->v, m->v));
}
