#pragma once
// What every state harness (fuzz_compressor_state, fuzz_optimizer_state, fuzz_nf4_state) shares:
// its backend, its targets built once before the first input, the "target '<name>': " prefix of
// its reports, the first two steps of each input (load, reload) and its two libFuzzer entry
// points. A harness writes only what it checks after an accepted load (its run_target).
#include "fuzz_common.hpp"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace fuzz {

// The harnesses' backend: one thread, so that a finding replays the same on every machine.
inline B& harness_backend() {
    static B b(1);
    return b;
}

// The prefix of every report about a target.
template <class Spec>
std::string where(const Spec& spec) {
    return std::string("target '") + spec.name + "': ";
}

// The live targets of `specs`, each made once by make(index, spec), kept for the process.
template <class Live, class Specs, class Make>
std::vector<Live> make_live_targets(const Specs& specs, Make&& make) {
    std::vector<Live> out;
    out.reserve(specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) out.push_back(make(i, specs[i]));
    return out;
}

// A target whose object is warmed up once (steps, compress calls) and copied for every input.
template <class Spec, class Object>
struct warmed_target {
    Spec spec;
    std::size_t index = 0;
    std::unique_ptr<Object> pristine;   // warmed up; never loaded into
    std::vector<std::byte> pristine_state;

    [[nodiscard]] std::string where() const { return fuzz::where(spec); }
};

// The warmed targets of `specs`: make(index, spec) builds one with its object, warm(target)
// warms the object up, and the state it then saves is the target's pristine state.
template <class Live, class Specs, class Make, class Warm>
std::vector<Live> warmed_targets(const Specs& specs, Make&& make, Warm&& warm) {
    return make_live_targets<Live>(specs, [&](std::size_t i, const auto& spec) {
        Live t = make(i, spec);
        warm(t);
        t.pristine_state = t.pristine->save_state();
        return t;
    });
}


// Selects the mode and builds the harness's targets once, before the first input.
template <class Targets>
int initialize(int* argc, char*** argv, Targets&& targets) {
    select_mode(argc, argv);
    (void)targets();
    return 0;
}

// One fuzz input: in repair mode its envelope is rewritten for (kind, version) first; then
// run_all(input) runs every target.
template <class RunAll>
int run_state_input(const std::uint8_t* data, std::size_t size, std::string_view kind, std::uint32_t version, RunAll&& run_all) {
    const std::span<const std::byte> raw(reinterpret_cast<const std::byte*>(data), size);
    if (!repair_mode) {
        run_all(raw);
        return 0;
    }
    const std::vector<std::byte> repaired = repair_envelope(raw, kind, version);
    run_all(std::span<const std::byte>(repaired));
    return 0;
}

// Loads `input` into `copy` (a copy of a target's pristine object, whose state is
// `pristine_state`). A refusal must be a std::invalid_argument (state_format_error is one) that
// changed nothing: returns false. Anything else thrown is a finding. Returns true when accepted.
template <class Object>
bool loaded(const char* harness, const std::string& where, Object& copy, const std::vector<std::byte>& pristine_state,
            std::span<const std::byte> input) {
    try {
        copy.load_state(input);
    } catch (const std::invalid_argument& e) {
        if (verbose) std::fprintf(stderr, "%srejected: %s\n", where.c_str(), e.what());
        FUZZ_CHECK(copy.save_state() == pristine_state, harness, where + "a failed load_state changed the state");
        return false;
    } catch (const std::exception& e) {
        fail(harness, where + "load_state threw something other than std::invalid_argument: " + e.what());
    }
    return true;
}

// `state` (saved by an object of this target) is accepted by `fresh` and re-saves to the same bytes.
template <class Object>
void check_reloadable(const char* harness, const std::string& where, Object fresh, const std::vector<std::byte>& state, const char* when) {
    try {
        fresh.load_state(state);
    } catch (const std::exception& e) {
        fail(harness, where + "the state saved " + when + " is rejected by load_state: " + e.what());
    }
    FUZZ_CHECK(fresh.save_state() == state, harness, where + "the state saved " + when + " does not re-save to the same bytes");
}

// The same for a warmed target: a fresh copy of its pristine object.
template <class Spec, class Object>
void check_reloadable(const char* harness, const warmed_target<Spec, Object>& t, const std::vector<std::byte>& state, const char* when) {
    check_reloadable(harness, t.where(), *t.pristine, state, when);
}

} // namespace fuzz

// The two libFuzzer entry points of a state harness whose objects save states of (kind, version):
// the mode and `targets()` are set up before the first input; each input runs `run_target(t,
// input)` for every target t. A macro because the entry points are extern "C" functions that
// each harness program must define itself.
#define FUZZ_STATE_HARNESS_ENTRY_POINTS(kind, version, targets, run_target)                                         \
    extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) { return ::fuzz::initialize(argc, argv, targets); } \
    extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {                              \
        return ::fuzz::run_state_input(data, size, kind, version, [](std::span<const std::byte> input) {             \
            for (auto& t : targets()) run_target(t, input);                                                          \
        });                                                                                                          \
    }
