// velora::torch::AdaRankGradAdamW's memory-saving options: 8-bit blockwise moments (options `state`
// int8_blockwise and `state_block`, adarank/blockwise_moments.hpp), a quantised projection basis
// (options `basis` int8/int4 and `basis_block`, adarank/basis_format.hpp) and bfloat16 parameters
// stepped with no float master copy (option `weight_rounding`, adarank/bf16_weights.hpp). Each reaches the
// library (the adapter's weights, state bytes and decoded basis are those of
// adarank::low_rank_adamw stepped with the same configuration on the same gradients), is saved and
// loaded with the optimizer (a resumed run is bit-identical), and values the library refuses are
// refused naming the option.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "torch_doctest.hpp"

#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <velora/core/serialize.hpp>

#include "../test_util.hpp"

using test::invalid_argument_message;
using velora::torch::AdaRankGradAdamW;
using OptionsT = velora::torch::AdaRankGradAdamWOptions;
using torch_test::contains;

namespace {

constexpr std::int64_t rows = 48, cols = 40;

at::Tensor weight(std::uint64_t seed) {
    at::manual_seed(seed);
    return torch::randn({rows, cols}).mul_(0.5).requires_grad_(true);
}

// Step t's gradient: a rank-3 part plus noise, so that the subspace search has something to find.
at::Tensor gradient(int t) {
    at::manual_seed(500 + static_cast<std::uint64_t>(t));
    return torch::randn({rows, 3}).mm(torch::randn({3, cols})) + 0.1 * torch::randn({rows, cols});
}

// Fixed rank 6, a new subspace every 4 steps (so that encoding happens more than once).
OptionsT options(adarank::basis_format f, std::int64_t block) {
    return OptionsT(3e-3).rank(adarank::rank_policy::fixed(6)).refresh(adarank::refresh_policy::every(4)).kind(adarank::param_kind::low_rank).basis(f).basis_block(block);
}

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) { return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.equal(b); }

// Steps 1-12 of `w` with options `o`, against a run saved after step 6 (torch::save) and resumed
// from the archive into an optimizer constructed with default options (its options come from the
// archive): the resumed weight must equal the uninterrupted run's bit for bit, and its state
// bytes too. Returns the resumed optimizer and weight.
struct resumed_run {
    std::unique_ptr<AdaRankGradAdamW> opt;
    at::Tensor w;
};
resumed_run check_resumed(const OptionsT& o, const at::Tensor& w) {
    AdaRankGradAdamW opt({w}, o);
    for (int t = 1; t <= 6; ++t) {
        w.mutable_grad() = gradient(t);
        REQUIRE(opt.step_checked().status == velora::status::ok);
    }
    std::stringstream saved;
    torch::save(opt, saved);
    const at::Tensor snapshot = w.detach().clone();
    for (int t = 7; t <= 12; ++t) {
        w.mutable_grad() = gradient(t);
        REQUIRE(opt.step_checked().status == velora::status::ok);
    }
    const at::Tensor resumed = snapshot.clone().requires_grad_(true);
    resumed_run r{std::make_unique<AdaRankGradAdamW>(std::vector<at::Tensor>{resumed}, OptionsT()), resumed};
    torch::load(*r.opt, saved);
    for (int t = 7; t <= 12; ++t) {
        r.w.mutable_grad() = gradient(t);
        REQUIRE(r.opt->step_checked().status == velora::status::ok);
    }
    CHECK(bitwise_equal(w, r.w));
    CHECK(r.opt->state_bytes() == opt.state_bytes());
    return r;
}

// adarank::low_rank_adamw with the configuration of `o`, its parameter 0 of `kind` stepped with
// the gradients the adapter's parameter `w` gets in check_as_library.
struct library_run {
    velora::eigen_backend<float> backend;
    adarank::low_rank_adamw<velora::eigen_backend<float>> opt;
    library_run(const OptionsT& o, adarank::param_kind kind) : opt(backend, o.config()) { opt.add_parameter(rows, cols, kind); }
};

// Steps 1-10 of `w` through `opt` (options `o`) and of a copy through the library configured
// alike: the weights must be bit-identical and the state bytes equal. Returns the library's run.
std::unique_ptr<library_run> check_as_library(AdaRankGradAdamW& opt, const OptionsT& o, const at::Tensor& w, adarank::param_kind kind) {
    auto lib = std::make_unique<library_run>(o, kind);
    at::Tensor w_lib = w.detach().clone();
    for (int t = 1; t <= 10; ++t) {
        const at::Tensor g = gradient(t);
        w.mutable_grad() = g;
        REQUIRE(opt.step_checked().status == velora::status::ok);
        REQUIRE(lib->opt.step(0, velora::torch::mutable_view_of<float>(w_lib), velora::torch::view_of<float>(g)) == velora::status::ok);
    }
    CHECK(bitwise_equal(w, w_lib));
    CHECK(opt.state_bytes() == lib->opt.state_bytes());
    return lib;
}

const OptionsT& group_options(const AdaRankGradAdamW& opt) { return static_cast<const OptionsT&>(opt.param_groups()[0].options()); }

} // namespace

namespace {

// 8-bit moments in blocks of `block`, fixed rank 6 and a new subspace every 4 steps (moments
// transported between subspaces), for a parameter of the given kind.
OptionsT options8(std::int64_t block, adarank::param_kind kind) {
    return OptionsT(3e-3)
        .rank(adarank::rank_policy::fixed(6))
        .refresh(adarank::refresh_policy::every(4))
        .kind(kind)
        .state(adarank::state_format::int8_blockwise)
        .state_block(block);
}

} // namespace

TEST_CASE("state int8_blockwise: the adapter steps as the library does with the same configuration, in the 8-bit state's bytes") {
    torch::NoGradGuard no_grad;
    for (const auto kind : {adarank::param_kind::low_rank, adarank::param_kind::dense}) {
        CAPTURE(static_cast<int>(kind));
        const OptionsT o = options8(64, kind);
        const at::Tensor w = weight(11);
        AdaRankGradAdamW opt({w}, o);
        (void)check_as_library(opt, o, w, kind);
        CHECK(opt.layer_state(w).low_rank == (kind == adarank::param_kind::low_rank));
        if (kind == adarank::param_kind::dense)   // a byte per element and moment, a float per block of 64 and moment
            CHECK(opt.state_bytes() == static_cast<std::size_t>(2 * (rows * cols + 4 * ((rows * cols + 63) / 64))));
        else
            CHECK(opt.layer_state(w).refreshes == 3);
    }
}

TEST_CASE("state int8_blockwise: saved and loaded with the optimizer's state; the resumed run is bit-identical") {
    torch::NoGradGuard no_grad;
    // a refresh at step 9, after the load: the loaded 8-bit moments are transported
    const resumed_run r = check_resumed(options8(128, adarank::param_kind::low_rank), weight(12));
    CHECK((group_options(*r.opt).state() == adarank::state_format::int8_blockwise));
    CHECK(group_options(*r.opt).state_block() == 128);
}

TEST_CASE("state int8_blockwise: a bad state_block is refused naming the option and the value; a float64 parameter is refused") {
    torch::NoGradGuard no_grad;
    const at::Tensor w = weight(13);
    for (const std::int64_t block : {100, 16, 8192}) {
        CAPTURE(block);
        const std::string msg = invalid_argument_message([&] { AdaRankGradAdamW o({w}, options8(block, adarank::param_kind::low_rank)); });
        CHECK(contains(msg, "param group 0:"));
        CHECK(contains(msg, "state_block"));
        CHECK(contains(msg, std::to_string(block)));
    }
    // docs/torch.md: a float64 parameter in a group with state = int8_blockwise throws (the
    // library keeps 8-bit moments for float parameters only), its weight unchanged.
    const at::Tensor d = weight(14).detach().to(at::kDouble).requires_grad_(true);
    AdaRankGradAdamW od({d}, options8(256, adarank::param_kind::low_rank));
    d.mutable_grad() = gradient(1).to(at::kDouble);
    const at::Tensor before = d.detach().clone();
    const std::string msg = invalid_argument_message([&] { (void)od.step(); });
    CHECK(contains(msg, "param group 0:"));
    CHECK(contains(msg, "int8_blockwise"));
    CHECK(bitwise_equal(d, before));
}

TEST_CASE("basis int8/int4: the adapter steps as the library does with the same configuration; the basis is held at its quantised size") {
    torch::NoGradGuard no_grad;
    std::size_t float_bytes = 0;
    for (const auto format : {adarank::basis_format::float32, adarank::basis_format::int8, adarank::basis_format::int4}) {
        CAPTURE(static_cast<int>(format));
        const OptionsT o = options(format, 32);
        const at::Tensor w = weight(1);
        AdaRankGradAdamW opt({w}, o);
        const auto lib = check_as_library(opt, o, w, adarank::param_kind::low_rank);
        const at::Tensor q = opt.basis(w);
        const std::vector<float> q_lib = lib->opt.basis_values(0);
        REQUIRE(q.numel() == static_cast<std::int64_t>(q_lib.size()));
        CHECK(std::equal(q_lib.begin(), q_lib.end(), q.data_ptr<float>()));
        if (format == adarank::basis_format::float32) {
            float_bytes = opt.state_bytes();
        } else {
            // The basis (6 × len floats) shrinks to a byte (int8) or half a byte (int4) per value
            // plus a float per block; the moments are unchanged.
            CHECK(opt.state_bytes() < float_bytes);
            const auto len = q.size(1);
            const std::size_t codes = format == adarank::basis_format::int8 ? len : (len + 1) / 2;
            CHECK(float_bytes - opt.state_bytes() == static_cast<std::size_t>(6 * len) * sizeof(float) - 6 * (codes + sizeof(float) * ((len + 31) / 32)));
        }
    }
}

TEST_CASE("basis int4: saved and loaded with the optimizer's state; the resumed run is bit-identical; another format is refused") {
    torch::NoGradGuard no_grad;
    const resumed_run r = check_resumed(options(adarank::basis_format::int4, 64), weight(2));
    CHECK((group_options(*r.opt).basis() == adarank::basis_format::int4));
    CHECK(group_options(*r.opt).basis_block() == 64);
    AdaRankGradAdamW& opt2 = *r.opt;
    const at::Tensor& resumed = r.w;

    // Changing the format after the first step is refused naming the option, nothing changed.
    static_cast<OptionsT&>(opt2.param_groups()[0].options()).basis(adarank::basis_format::int8);
    resumed.mutable_grad() = gradient(13);
    const at::Tensor before = resumed.detach().clone();
    CHECK(contains(invalid_argument_message([&] { (void)opt2.step(); }), "option basis changed after the group's first step"));
    CHECK(bitwise_equal(resumed, before));
}

TEST_CASE("bad basis options are refused naming the option and the value") {
    torch::NoGradGuard no_grad;
    const at::Tensor w = weight(3);
    std::string msg = invalid_argument_message([&] { AdaRankGradAdamW o({w}, options(adarank::basis_format::int8, 48)); });
    CHECK(contains(msg, "velora::torch::AdaRankGradAdamW::AdaRankGradAdamW: param group 0:"));
    CHECK(contains(msg, "config.basis_block must be a power of two in [32, 4096], got 48"));
    msg = invalid_argument_message([&] { AdaRankGradAdamW o({w}, options(static_cast<adarank::basis_format>(3), 256)); });
    CHECK(contains(msg, "param group 0:"));
    CHECK(contains(msg, "basis"));
    // A float64 parameter cannot hold a quantised basis (the library's rule, at registration).
    const at::Tensor d = weight(4).detach().to(at::kDouble).requires_grad_(true);
    AdaRankGradAdamW od({d}, options(adarank::basis_format::int8, 256));
    d.mutable_grad() = gradient(1).to(at::kDouble);
    msg = invalid_argument_message([&] { (void)od.step(); });
    CHECK(contains(msg, "param group 0:"));
    CHECK(contains(msg, "basis"));
}

namespace {

// The library's float optimizer stepping a bf16 copy of `w0` with the gradients `gradient(t)` as
// torch delivers them for a bf16 parameter (bf16), widened to float as the adapter reads them.
at::Tensor library_bf16_run(const OptionsT& o, const at::Tensor& w0, int steps, velora::bf16_rounding rounding) {
    velora::eigen_backend<float> backend;
    adarank::low_rank_adamw<velora::eigen_backend<float>> lib(backend, o.config());
    const auto id = lib.add_parameter(rows, cols, adarank::param_kind::low_rank);
    at::Tensor w = w0.detach().clone();
    const velora::matrix_view<velora::bfloat16> bits(static_cast<velora::bfloat16*>(w.data_ptr()), rows, cols, cols);
    for (int t = 1; t <= steps; ++t) {
        const at::Tensor g = gradient(t).to(at::kBFloat16).to(at::kFloat);
        REQUIRE(lib.step(id, adarank::bf16_weight_view{bits, rounding}, velora::torch::view_of<float>(g)) == velora::status::ok);
    }
    return w;
}

at::Tensor bf16_weight(std::uint64_t seed) { return weight(seed).detach().to(at::kBFloat16).requires_grad_(true); }

} // namespace

TEST_CASE("bfloat16 parameters: stepped in float from the bf16 weight and rounded back as the library's bf16 step, stochastic or nearest") {
    torch::NoGradGuard no_grad;
    std::vector<at::Tensor> results;
    for (const auto rounding : {velora::bf16_rounding::stochastic, velora::bf16_rounding::nearest}) {
        CAPTURE(static_cast<int>(rounding));
        OptionsT o = options(adarank::basis_format::float32, 256);
        if (rounding == velora::bf16_rounding::nearest) o.weight_rounding(rounding);   // stochastic is the default
        const at::Tensor w = bf16_weight(5);
        const at::Tensor w0 = w.detach().clone();
        AdaRankGradAdamW opt({w}, o);
        for (int t = 1; t <= 8; ++t) {
            w.mutable_grad() = gradient(t).to(at::kBFloat16);
            REQUIRE(opt.step_checked().status == velora::status::ok);
        }
        CHECK((w.scalar_type() == at::kBFloat16));
        CHECK(bitwise_equal(w, library_bf16_run(o, w0, 8, rounding)));
        CHECK_FALSE(bitwise_equal(w, w0));
        CHECK(opt.layer_state(w).low_rank);
        CHECK((opt.basis(w).scalar_type() == at::kFloat));   // the optimizer's state is float
        CHECK(opt.adamw_state_bytes() == static_cast<std::size_t>(2 * rows * cols * 2));   // torch's AdamW: bf16 moments
        results.push_back(w.detach().clone());
    }
    CHECK_FALSE(bitwise_equal(results[0], results[1]));   // the option reached the rounding
}

TEST_CASE("bfloat16 parameters: weight_rounding is saved and loaded; the resumed run is bit-identical; bad values are refused") {
    torch::NoGradGuard no_grad;
    const OptionsT o = OptionsT(options(adarank::basis_format::int8, 32)).weight_rounding(velora::bf16_rounding::nearest);
    const at::Tensor w = bf16_weight(6);
    AdaRankGradAdamW opt({w}, o);
    for (int t = 1; t <= 5; ++t) {
        w.mutable_grad() = gradient(t).to(at::kBFloat16);
        REQUIRE(opt.step_checked().status == velora::status::ok);
    }
    std::stringstream saved;
    torch::save(opt, saved);
    const at::Tensor snapshot = w.detach().clone();
    for (int t = 6; t <= 9; ++t) {
        w.mutable_grad() = gradient(t).to(at::kBFloat16);
        REQUIRE(opt.step_checked().status == velora::status::ok);
    }
    const at::Tensor resumed = snapshot.clone().requires_grad_(true);
    AdaRankGradAdamW opt2({resumed}, OptionsT());
    torch::load(opt2, saved);
    CHECK((static_cast<const OptionsT&>(opt2.param_groups()[0].options()).weight_rounding() == velora::bf16_rounding::nearest));
    for (int t = 6; t <= 9; ++t) {
        resumed.mutable_grad() = gradient(t).to(at::kBFloat16);
        REQUIRE(opt2.step_checked().status == velora::status::ok);
    }
    CHECK(bitwise_equal(w, resumed));

    static_cast<OptionsT&>(opt2.param_groups()[0].options()).weight_rounding(velora::bf16_rounding::stochastic);
    CHECK(contains(invalid_argument_message([&] { (void)opt2.step(); }), "option weight_rounding changed after the group's first step"));
    const std::string msg = invalid_argument_message([&] { AdaRankGradAdamW bad({bf16_weight(7)}, OptionsT().weight_rounding(static_cast<velora::bf16_rounding>(5))); });
    CHECK(contains(msg, "param group 0:"));
    CHECK(contains(msg, "option weight_rounding has the invalid value 5"));
    // Another dtype than float32, float64 or bfloat16 is refused naming the three.
    const at::Tensor half = weight(8).detach().to(at::kHalf).requires_grad_(true);
    AdaRankGradAdamW oh({half}, OptionsT());
    half.mutable_grad() = torch::ones_like(half);
    CHECK(contains(invalid_argument_message([&] { (void)oh.step(); }), "must be float32, float64 or bfloat16"));
}

TEST_CASE("an options blob of version 1 (before weight_rounding) loads with the default rounding") {
    velora::torch::detail::stored_options o;
    o.config = options(adarank::basis_format::int4, 64).config();
    o.kind = adarank::param_kind::low_rank;
    velora::state_writer w(velora::torch::detail::options_blob_kind, 1);
    w.put(adarank::config_version);
    adarank::put_config(w, o.config);
    w.put(static_cast<std::uint8_t>(o.kind));
    w.put(static_cast<std::uint8_t>(o.nd));
    const std::vector<std::byte> blob = std::move(w).finish();
    const auto loaded = velora::torch::detail::load_options(blob, "test");
    CHECK((loaded.config == o.config));
    CHECK((loaded.kind == adarank::param_kind::low_rank));
    CHECK((loaded.weight_rounding == velora::bf16_rounding::stochastic));
    // and the current version round-trips a non-default rounding
    o.weight_rounding = velora::bf16_rounding::nearest;
    CHECK((velora::torch::detail::load_options(velora::torch::detail::save_options(o), "test").weight_rounding == velora::bf16_rounding::nearest));
}
