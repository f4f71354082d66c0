// libFuzzer harness: velora::compressor<eigen_backend<float>>::load_state on arbitrary bytes.
//
// For every input and each compressor target of compressor_targets.hpp (groups with and without
// padding, v modes first_batch_mean / ema / random / given / batch_mean, Z stored as f32, f16
// or bf16; each warmed up by a few deterministic compress calls):
//  1. load_state(input) on a copy of the warmed-up compressor.
//  2. If it throws: the exception is a std::invalid_argument (state_format_error is one), and
//     save_state() is byte-identical to before ("a failed load changes nothing").
//  3. If it loads: save_state() of the loaded compressor is accepted by a fresh copy and
//     re-saves to the same bytes.
//  4. The next compress of a finite batch does not throw (the one documented exception: given
//     mode with no v yet, which must throw std::invalid_argument and change nothing), and
//     - ok / degenerate_input ⇒ the record holds T×G finite values of Z and a finite v of unit
//       norm (|‖v‖ − 1| ≤ 1e-2: K = I_G ⊗ vᵀ has orthonormal rows), and so does the compressor;
//     - any other status ⇒ the compressor's save_state() is unchanged and the record is empty.
//  5. After that compress, save_state() is again accepted by a fresh copy.
// Repair mode (fuzz_compressor_state_repair) first rewrites the envelope (fuzz_common.hpp).
#include "compressor_targets.hpp"
#include "state_harness.hpp"

#include <exception>
#include <memory>
#include <stdexcept>

namespace {

constexpr const char* harness_name = "fuzz_compressor_state";
using velora::index_t;

struct live_target : fuzz::warmed_target<fuzz::compressor_target, fuzz::compressor> {
    std::vector<float> next_batch;
};

std::vector<live_target>& targets() {
    static std::vector<live_target> t = fuzz::warmed_targets<live_target>(
        fuzz::compressor_targets(),
        [](std::size_t i, const auto& spec) {
            return live_target{{spec, i, std::make_unique<fuzz::compressor>(fuzz::make_compressor(fuzz::harness_backend(), spec)), {}},
                               fuzz::batch(i, spec, 1000)};
        },
        [](live_target& lt) {
            fuzz::compress_batches(harness_name, *lt.pristine, lt.index, lt.spec, 0, static_cast<std::uint64_t>(lt.spec.warm_batches));
        });
    return t;
}

double norm(std::span<const float> v) {
    double s = 0;
    for (float e : v) s += static_cast<double>(e) * static_cast<double>(e);
    return std::sqrt(s);
}

void check_record(const live_target& t, const fuzz::compressor& c, const fuzz::compressor::record_type& r, const std::string& what) {
    FUZZ_CHECK(!r.empty() && r.tokens() == fuzz::compress_tokens && r.groups() == t.spec.config.groups, harness_name,
               what + " but the record does not hold T x G values");
    std::vector<float> z;
    velora::visit_storage(r.z_storage(), [&](auto tag) {
        using U = decltype(tag);
        const auto view = r.template z<U>();
        for (index_t i = 0; i < view.rows; ++i)
            for (index_t j = 0; j < view.cols; ++j) z.push_back(velora::to_arithmetic<float>(view(i, j)));
    });
    FUZZ_CHECK(fuzz::all_finite(z), harness_name, what + " but the record's Z is not finite");
    const std::span<const float> rv(r.v(), static_cast<std::size_t>(r.subtoken_size()));
    FUZZ_CHECK(fuzz::all_finite(rv), harness_name, what + " but the record's v is not finite");
    const double n = norm(rv);
    FUZZ_CHECK(std::abs(n - 1.0) <= 1e-2, harness_name, what + " but the record's v has norm " + std::to_string(n) + ", not 1");
    FUZZ_CHECK(c.initialised() && fuzz::all_finite(c.v()), harness_name, what + " but the compressor's v is missing or not finite");
}

void run_target(live_target& t, std::span<const std::byte> input) {
    fuzz::compressor c = *t.pristine;
    if (!fuzz::loaded(harness_name, t.where(), c, t.pristine_state, input)) return;
    const auto loaded = c.save_state();
    if (fuzz::verbose)
        std::fprintf(stderr, "[%s] accepted load: initialised %d fallback %d updates %llu |v| %g\n", t.spec.name, int(c.initialised()),
                     int(c.fallback_used()), (unsigned long long)c.v_updates(), norm(c.v()));
    fuzz::check_reloadable(harness_name, t, loaded, "after an accepted load");

    fuzz::compressor::record_type record;
    const auto x = velora::make_view(t.next_batch.data(), fuzz::compress_tokens, t.spec.features);
    const bool given_without_v = t.spec.config.v.type == velora::v_mode::kind::given && !c.initialised();
    velora::status st{};
    try {
        st = c.compress(x, record);
    } catch (const std::invalid_argument& e) {
        FUZZ_CHECK(given_without_v, harness_name,
                   t.where() + "compress of a finite batch threw after an accepted load: " + e.what());
        FUZZ_CHECK(c.save_state() == loaded, harness_name, t.where() + "compress threw (given mode, no v) and changed the compressor");
        return;
    } catch (const std::exception& e) {
        fuzz::fail(harness_name, t.where() + "compress threw something other than std::invalid_argument after an accepted load: " + e.what());
    }
    if (fuzz::verbose)
        std::fprintf(stderr, "  compress: %s, record |v| %g\n", std::string(velora::to_string(st)).c_str(),
                     record.empty() ? 0.0 : norm(std::span<const float>(record.v(), static_cast<std::size_t>(record.subtoken_size()))));
    FUZZ_CHECK(!given_without_v, harness_name, t.where() + "compress in given mode without v did not throw");
    const std::string what = t.where() + "compress after an accepted load returned " + std::string(velora::to_string(st));
    if (st == velora::status::ok || st == velora::status::degenerate_input) {
        check_record(t, c, record, what);
    } else {
        FUZZ_CHECK(c.save_state() == loaded, harness_name, what + " but changed the compressor");
        FUZZ_CHECK(record.empty(), harness_name, what + " but left a record");
    }
    fuzz::check_reloadable(harness_name, t, c.save_state(), "after the compress that followed an accepted load");
}

} // namespace

FUZZ_STATE_HARNESS_ENTRY_POINTS(fuzz::compressor::state_kind, fuzz::compressor::state_version, targets, run_target)
