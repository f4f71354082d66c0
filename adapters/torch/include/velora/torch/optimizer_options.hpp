#pragma once
/// \file
/// `AdaRankGradAdamWOptions`, a param group's options (the library's `optimizer_config`, whose
/// defaults they take, plus `kind`, `nd` and `weight_rounding`), and `AdaRankGradAdamWParamState`, what torch's
/// state() holds per parameter. An archive stores the options as options_format.hpp describes.
#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <cstdint>
#include <tuple>

#include <adarank/parameter.hpp>
#include <adarank/policies.hpp>

#include "archive_io.hpp"
#include "options_format.hpp"
#include "parameter_shape.hpp"

namespace velora::torch {

struct AdaRankGradAdamWOptions : public ::torch::optim::OptimizerCloneableOptions<AdaRankGradAdamWOptions> {
    using betas_t = std::tuple<double, double>;

private:
    // The library's defaults, taken from its configuration so that they are written once.
    static constexpr adarank::optimizer_config library_defaults{};

public:
    AdaRankGradAdamWOptions(double lr = library_defaults.adam.lr) : lr_(lr) {}   // NOLINT: implicit, as torch's options

    TORCH_ARG(double, lr) = library_defaults.adam.lr;
    TORCH_ARG(betas_t, betas) = std::make_tuple(library_defaults.adam.beta1, library_defaults.adam.beta2);
    TORCH_ARG(double, eps) = library_defaults.adam.eps;
    TORCH_ARG(double, weight_decay) = library_defaults.adam.weight_decay;
    /// Where ε and the weight decay enter the update: the library's default (GaLore's) or
    /// torch.optim.AdamW's, under which dense parameters match torch::optim::AdamW to rounding.
    TORCH_ARG(adarank::adam_convention, convention) = library_defaults.adam.convention;
    TORCH_ARG(double, scale) = library_defaults.scale;   ///< α, low-rank parameters only
    TORCH_ARG(adarank::rank_policy, rank) = library_defaults.rank;
    TORCH_ARG(adarank::refresh_policy, refresh) = library_defaults.refresh;
    TORCH_ARG(adarank::transport_policy, transport) = library_defaults.transport;
    TORCH_ARG(adarank::side_policy, side) = library_defaults.side;
    TORCH_ARG(adarank::rsvd_config, rsvd) = library_defaults.rsvd;
    TORCH_ARG(std::uint64_t, seed) = library_defaults.seed;
    /// How the moments are stored: float, or 8-bit blockwise (float parameters on the CPU;
    /// adarank/state_format.hpp), in blocks of state_block elements.
    TORCH_ARG(adarank::state_format, state) = library_defaults.state;
    TORCH_ARG(std::int64_t, state_block) = library_defaults.state_block;
    /// How a low-rank parameter's projection basis is stored: float, or quantised to int8 / int4
    /// with one float scale per block of basis_block elements of a row (float parameters on the
    /// CPU; adarank/basis_format.hpp).
    TORCH_ARG(adarank::basis_format, basis) = library_defaults.basis;
    TORCH_ARG(std::int64_t, basis_block) = library_defaults.basis_block;
    TORCH_ARG(adarank::param_kind, kind) = adarank::param_kind::automatic;   ///< 2-D (and flattened) parameters
    TORCH_ARG(higher_dims, nd) = higher_dims::flatten;
    /// How a bfloat16 parameter's new weight is rounded back to bf16 at each step: stochastically
    /// (unbiased, the noise a function of the seed, the parameter, its step count and the element;
    /// adarank/bf16_weights.hpp) or to nearest. The step itself runs in float from the bf16 weight
    /// (no float master copy is kept). Float parameters do not round.
    TORCH_ARG(velora::bf16_rounding, weight_rounding) = velora::bf16_rounding::stochastic;

public:
    double get_lr() const override { return lr(); }
    void set_lr(const double value) override { lr(value); }

    /// The library configuration these options describe.
    [[nodiscard]] adarank::optimizer_config config() const {
        adarank::optimizer_config c;
        c.adam = {lr(), std::get<0>(betas()), std::get<1>(betas()), eps(), weight_decay(), convention()};
        c.scale = scale();
        c.side = side();
        c.rank = rank();
        c.refresh = refresh();
        c.transport = transport();
        c.rsvd = rsvd();
        c.seed = seed();
        c.state = state();
        c.state_block = state_block();
        c.basis = basis();
        c.basis_block = basis_block();
        return c;
    }
    /// Sets every option a library configuration has (kind, nd and weight_rounding are kept).
    AdaRankGradAdamWOptions& config(const adarank::optimizer_config& c) {
        lr(c.adam.lr);
        betas(std::make_tuple(c.adam.beta1, c.adam.beta2));
        eps(c.adam.eps);
        weight_decay(c.adam.weight_decay);
        convention(c.adam.convention);
        scale(c.scale);
        side(c.side);
        rank(c.rank);
        refresh(c.refresh);
        transport(c.transport);
        rsvd(c.rsvd);
        seed(c.seed);
        state(c.state);
        state_block(c.state_block);
        basis(c.basis);
        basis_block(c.basis_block);
        return *this;
    }
    /// torch::optim::AdamW's defaults (betas (0.9, 0.999), ε 1e-8, weight decay 1e-2, the torch
    /// convention), for a program that swaps torch::optim::AdamW for this optimizer: the
    /// library's own defaults (ε 1e-6, weight decay 0, GaLore's convention) are GaLore's, and a
    /// plain swap would silently change them. The low-rank options keep the library's defaults.
    static AdaRankGradAdamWOptions adamw_defaults(double lr = 1e-3) {
        AdaRankGradAdamWOptions o(lr);
        o.eps(1e-8).weight_decay(1e-2).convention(adarank::adam_convention::torch);
        return o;
    }
    /// GaLore as options (adarank::optimizer_config::galore).
    static AdaRankGradAdamWOptions galore(std::int64_t rank, std::int64_t interval = 200, double scale = 0.25) {
        AdaRankGradAdamWOptions o;
        o.config(adarank::optimizer_config::galore(rank, interval, scale));
        return o;
    }

    /// Every option, as options_format.hpp stores them: one blob under the key "options".
    void serialize(::torch::serialize::OutputArchive& archive) const override {
        detail::write_blob(archive, "options", detail::save_options(stored()));
    }
    /// Reads what serialize wrote, or an archive of format 1 (one key per option). Throws
    /// velora::state_format_error for a malformed archive; the options are checked when the
    /// optimizer uses them.
    void serialize(::torch::serialize::InputArchive& archive) override {
        constexpr const char* fn = "velora::torch::AdaRankGradAdamWOptions::serialize";
        const std::optional<at::Tensor> blob = detail::read_blob(archive, "options", fn);
        stored(blob ? detail::load_options(detail::bytes_of(*blob), fn) : detail::read_format1_options(archive));
    }

    /// The options as one value (what an archive stores, what the optimizer checks).
    [[nodiscard]] detail::stored_options stored() const { return {config(), kind(), nd(), weight_rounding()}; }
    AdaRankGradAdamWOptions& stored(const detail::stored_options& o) {
        config(o.config);
        kind(o.kind);
        nd(o.nd);
        weight_rounding(o.weight_rounding);
        return *this;
    }
};

/// What torch's state() holds for a registered parameter (a description; the moments and the
/// basis live in the group's low_rank_adamw and are reported by layer_state()).
struct AdaRankGradAdamWParamState : public ::torch::optim::OptimizerCloneableParamState<AdaRankGradAdamWParamState> {
    TORCH_ARG(std::int64_t, group) = 0;
    TORCH_ARG(std::int64_t, index) = 0;   ///< position in the group
    TORCH_ARG(std::int64_t, rows) = 0;
    TORCH_ARG(std::int64_t, cols) = 0;
    TORCH_ARG(bool, low_rank) = false;
};

} // namespace velora::torch
