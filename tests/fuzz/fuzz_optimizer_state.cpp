// libFuzzer harness: adarank::low_rank_adamw<eigen_backend<float>>::load_state on arbitrary bytes.
//
// For every input and each of the optimizer targets of optimizer_targets.hpp (warmed up a few
// deterministic steps, so they hold bases, moments and refresh history):
//  1. load_state(input) on a copy of the warmed-up optimizer.
//  2. If it throws: the exception is a std::invalid_argument (state_format_error is one), and
//     save_state() is byte-identical to before the attempt ("a failed load changes nothing").
//  3. If it loads: save_state() of the loaded optimizer is itself accepted by a fresh copy and
//     re-saves to the same bytes (what the library writes it can read back).
//  4. Then one step per parameter with a finite deterministic gradient: the step does not
//     throw; status ok (or degenerate_input) ⇒ every weight of that parameter is finite;
//     any other status ⇒ that step changed neither the weights nor save_state().
//  5. After the steps, save_state() is again accepted by a fresh copy (an ok step never leaves
//     state that the loader itself would call damaged, e.g. non-finite moments).
// Repair mode (fuzz_optimizer_state_repair) first rewrites the envelope (fuzz_common.hpp), so
// mutations reach the per-field validation instead of the checksum.
#include "optimizer_targets.hpp"
#include "state_harness.hpp"

#include <exception>
#include <memory>
#include <stdexcept>

namespace {

constexpr const char* harness_name = "fuzz_optimizer_state";

struct live_target : fuzz::warmed_target<fuzz::optimizer_target, fuzz::optimizer> {
    std::vector<std::vector<float>> weights;      // after the warm-up
    std::vector<std::vector<float>> next_grad;    // the gradient of the step after a load
};

// Steps 3 and 5 are fuzz::check_reloadable: a state saved by an optimizer of this target is
// accepted by a fresh copy and re-saves identically.
std::vector<live_target>& targets() {
    static std::vector<live_target> t = fuzz::warmed_targets<live_target>(
        fuzz::optimizer_targets(),
        [](std::size_t i, const auto& spec) {
            live_target lt{{spec, i, std::make_unique<fuzz::optimizer>(fuzz::make_optimizer(fuzz::harness_backend(), spec)), {}}, {}, {}};
            for (std::size_t p = 0; p < spec.params.size(); ++p) {
                lt.weights.push_back(fuzz::initial_weight(i, p, spec.params[p]));
                lt.next_grad.push_back(fuzz::gradient(i, p, spec.params[p], 1000));
            }
            return lt;
        },
        [](live_target& lt) {
            for (int s = 0; s < lt.spec.warm_steps; ++s)
                fuzz::step_all(harness_name, *lt.pristine, lt.index, lt.spec, lt.weights, static_cast<std::uint64_t>(s));
        });
    return t;
}

template <class View>
double view_max_abs(View v) {
    std::vector<float> x;
    for (fuzz::index_t i = 0; i < v.rows; ++i)
        for (fuzz::index_t j = 0; j < v.cols; ++j) x.push_back(v(i, j));
    return fuzz::max_abs(x);
}

void describe(const live_target& t, const fuzz::optimizer& o, const char* when) {
    std::fprintf(stderr, "[%s] %s: lr %g\n", t.spec.name, when, o.learning_rate());
    for (std::size_t p = 0; p < t.spec.params.size(); ++p) {
        const auto id = static_cast<fuzz::index_t>(p);
        const auto i = o.layer_state(id);
        std::fprintf(stderr, "  p%zu %lldx%lld %s rank %lld t %llu since %llu refreshes %llu | max |basis| %g |m| %g |v| %g\n", p,
                     (long long)i.rows, (long long)i.cols, i.low_rank ? "low-rank" : "dense", (long long)i.rank, (unsigned long long)i.steps,
                     (unsigned long long)i.steps_in_subspace, (unsigned long long)i.refreshes,
                     // a quantised basis has no float view (basis() refuses it): -1
                     i.low_rank && o.config().basis != adarank::basis_format::float32 ? -1.0 : view_max_abs(o.basis(id)),
                     view_max_abs(o.first_moment(id)), view_max_abs(o.second_moment(id)));
    }
}

void run_target(live_target& t, std::span<const std::byte> input) {
    fuzz::optimizer opt = *t.pristine;
    if (!fuzz::loaded(harness_name, t.where(), opt, t.pristine_state, input)) return;
    const auto loaded = opt.save_state();
    if (fuzz::verbose) describe(t, opt, "accepted load");
    fuzz::check_reloadable(harness_name, t, loaded, "after an accepted load");

    auto weights = t.weights;
    for (std::size_t p = 0; p < t.spec.params.size(); ++p) {
        const auto& s = t.spec.params[p];
        const auto before_state = opt.save_state();
        const auto before_weight = weights[p];
        velora::status st{};
        try {
            st = opt.step(static_cast<fuzz::index_t>(p), velora::make_view(weights[p].data(), s.rows, s.cols),
                          velora::make_view(t.next_grad[p].data(), s.rows, s.cols));
        } catch (const std::exception& e) {
            fuzz::fail(harness_name, t.where() + "step of parameter " + std::to_string(p) + " threw after an accepted load: " + e.what());
        }
        if (fuzz::verbose) {
            std::fprintf(stderr, "  step of parameter %zu: %s, max |w| %g\n", p, std::string(velora::to_string(st)).c_str(), fuzz::max_abs(weights[p]));
            describe(t, opt, "after the step");
        }
        const std::string what = t.where() + "step of parameter " + std::to_string(p) + " after an accepted load returned " +
                                 std::string(velora::to_string(st));
        if (st == velora::status::ok || st == velora::status::degenerate_input) {
            FUZZ_CHECK(fuzz::all_finite(weights[p]), harness_name, what + " but left non-finite weights");
        } else {
            FUZZ_CHECK(fuzz::same_bytes(weights[p], before_weight), harness_name, what + " but changed the weights");
            FUZZ_CHECK(opt.save_state() == before_state, harness_name, what + " but changed the optimizer's state");
        }
    }
    fuzz::check_reloadable(harness_name, t, opt.save_state(), "after the steps that followed an accepted load");
}

} // namespace

FUZZ_STATE_HARNESS_ENTRY_POINTS(fuzz::optimizer::state_kind, fuzz::optimizer::state_version, targets, run_target)
