// libFuzzer harness: velora::nf4_weight::load_state on arbitrary bytes (a packed NF4 base weight
// from an untrusted archive), and the products of the weight it loads.
//
// For every input and each NF4 target of nf4_targets.hpp (plain and double-quantised absmaxes):
//  1. load_state(input) on a copy of the target's weight.
//  2. If it throws: the exception is a std::invalid_argument (state_format_error is one), and
//     save_state() is byte-identical to before ("a failed load changes nothing").
//  3. If it loads: save_state() is byte-identical to the input (the format has no slack), and a
//     fresh weight accepts it.
//  4. The loaded weight dequantises to finite values only (every code is within [-1, 1] and every
//     rebuilt absmax finite), the host loop and the backend's dequantize_nf4 agree bit for bit,
//     and forward / input_grad through nf4_frozen_weight<eigen_backend<float>> (tiles of 1 row
//     and the default) run without throwing on a finite 2-token batch.
// Repair mode (fuzz_nf4_state_repair) first rewrites the envelope (fuzz_common.hpp).
#include "nf4_targets.hpp"
#include "state_harness.hpp"

#include <algorithm>
#include <exception>
#include <stdexcept>

namespace {

using fuzz::index_t;
constexpr const char* harness_name = "fuzz_nf4_state";
constexpr index_t tokens = 2;

struct live_target {
    fuzz::nf4_target spec;
    velora::nf4_weight pristine;
    std::vector<std::byte> pristine_state;
};

std::vector<live_target>& targets() {
    static std::vector<live_target> t = fuzz::make_live_targets<live_target>(fuzz::nf4_targets(), [](std::size_t i, const auto& spec) {
        auto w = fuzz::make_nf4(i, spec);
        auto state = w.save_state();
        return live_target{spec, std::move(w), std::move(state)};
    });
    return t;
}

void check_products(const live_target& t, const velora::nf4_weight& w) {
    const index_t rows = w.rows(), cols = w.cols();
    std::vector<float> host(static_cast<std::size_t>(rows * cols)), kernel(host.size());
    w.dequantize_rows(0, velora::make_view(host.data(), rows, cols));
    FUZZ_CHECK(fuzz::all_finite(host), harness_name, fuzz::where(t.spec) + "an accepted weight dequantises to a non-finite value");
    for (index_t tile : {index_t{1}, index_t{0}}) {
        const velora::nf4_frozen_weight<fuzz::B> frozen(fuzz::harness_backend(), w, tile);
        for (index_t r = 0; r < rows; ++r) fuzz::harness_backend().dequantize_nf4(frozen.blocks(), r, velora::make_view(kernel.data() + r * cols, 1, cols));
        FUZZ_CHECK(fuzz::same_bytes(host, kernel), harness_name, fuzz::where(t.spec) + "the backend's dequantize_nf4 differs from the host loop");
        std::vector<float> ws(frozen.workspace_elements()), y(static_cast<std::size_t>(tokens * rows)), dx(static_cast<std::size_t>(tokens * cols));
        const auto x = fuzz::gaussian(static_cast<std::size_t>(tokens * cols), 77);
        const auto dy = fuzz::gaussian(static_cast<std::size_t>(tokens * rows), 78);
        try {
            frozen.forward(fuzz::harness_backend(), velora::make_view(x.data(), tokens, cols), velora::make_view(y.data(), tokens, rows), std::span<float>(ws));
            frozen.input_grad(fuzz::harness_backend(), velora::make_view(dy.data(), tokens, rows), velora::make_view(dx.data(), tokens, cols), std::span<float>(ws));
        } catch (const std::exception& e) {
            fuzz::fail(harness_name, fuzz::where(t.spec) + "a product through an accepted weight threw: " + e.what());
        }
    }
}

void run_target(live_target& t, std::span<const std::byte> input) {
    velora::nf4_weight w = t.pristine;
    if (!fuzz::loaded(harness_name, fuzz::where(t.spec), w, t.pristine_state, input)) return;
    if (fuzz::verbose)
        std::fprintf(stderr, "[%s] accepted: %lldx%lld block %lld%s\n", t.spec.name, (long long)w.rows(), (long long)w.cols(),
                     (long long)w.block_size(), w.double_quantized() ? " double-quantised" : "");
    const auto saved = w.save_state();
    FUZZ_CHECK(saved.size() == input.size() && std::equal(saved.begin(), saved.end(), input.begin()), harness_name,
               fuzz::where(t.spec) + "an accepted state does not re-save to the same bytes");
    fuzz::check_reloadable(harness_name, fuzz::where(t.spec), velora::nf4_weight{}, saved, "after an accepted load");
    check_products(t, w);
}

} // namespace

FUZZ_STATE_HARNESS_ENTRY_POINTS(velora::nf4_weight::state_kind, velora::nf4_weight::state_version, targets, run_target)
