// low_rank_adamw with 8-bit blockwise moments (optimizer_config::state = int8_blockwise): the
// configuration's checks, dense and low-rank steps against the float moments, the status rule,
// thread-count determinism, state bytes, and the packed state's save and load.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <adarank/adarank.hpp>
#include <velora/backend/cpu/threading.hpp>
#include <velora/backend/eigen.hpp>

#include "allocation_counter.hpp"   // every allocation counted (the steady-state test)
#include "optimizer_run.hpp"
#include "state_blob.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using velora::index_t;
using B = velora::eigen_backend<float>;
using optimizer = adarank::low_rank_adamw<B>;

adarank::optimizer_config config8(index_t block = 256) {
    adarank::optimizer_config c = adarank::optimizer_config::galore(8, 4, 0.25);
    c.adam.lr = 1e-2;
    c.transport = adarank::transport_policy::squared_rotation;
    c.state = adarank::state_format::int8_blockwise;
    c.state_block = block;
    return c;
}

using test::gaussian;

using run_result = test::optimizer_run;

// One rows×cols parameter of `kind` under config8(64).
optimizer one_parameter(B& backend, index_t rows, index_t cols, adarank::param_kind kind) {
    optimizer o(backend, config8(64));
    o.add_parameter(rows, cols, kind);
    return o;
}

// A 64x96 low-rank and a 48x40 dense parameter, registered in that order.
optimizer low_rank_and_dense(B& backend, const adarank::optimizer_config& c) {
    optimizer o(backend, c);
    o.add_parameter(64, 96, adarank::param_kind::low_rank);
    o.add_parameter(48, 40, adarank::param_kind::dense);
    return o;
}

// A 64x96 low-rank, a 48x40 dense and a 1x40 vector parameter, `steps` steps (refresh every 4).
run_result run(const adarank::optimizer_config& c, int threads, int steps) {
    static constexpr test::parameter_shape parameters[] = {{64, 96, adarank::param_kind::low_rank}, {48, 40, adarank::param_kind::dense}, {1, 40, adarank::param_kind::automatic}};
    return test::run_optimizer(c, threads, steps, parameters);
}

// The optimizer keeps 8-bit moments for the CPU backend in float only (the CUDA backend's twin:
// tests/cuda/test_cuda.cu).
static_assert(adarank::blockwise_state_backend<B>);
static_assert(!adarank::blockwise_state_backend<velora::eigen_backend<double>>);

} // namespace

TEST_CASE("state8: the backend's whole-tensor adam8_encode and adam8_decode give the block encoder's and the code's bits; a bad block is refused") {
    B backend(1);
    const index_t n = 3 * 64 + 17, block = 64;
    for (const auto sign : {velora::rules::code_sign::signed_code, velora::rules::code_sign::unsigned_code}) {
        const auto& code = sign == velora::rules::code_sign::signed_code ? velora::rules::signed_dynamic_code() : velora::rules::unsigned_dynamic_code();
        auto x = gaussian(n, 7, 1.0);
        for (index_t i = 0; i < n; ++i) {
            float& e = x[static_cast<std::size_t>(i)];
            e *= static_cast<float>(std::pow(10.0, double(i % 7) - 3.0));   // three decades within a block
            if (sign == velora::rules::code_sign::unsigned_code) e = std::fabs(e);
            if (i >= block && i < 2 * block) e = 0.0f;   // an all-zero block: absmax 0
        }
        std::vector<std::uint8_t> q_ref(static_cast<std::size_t>(n)), q(q_ref.size(), 0xAB);
        std::vector<float> a_ref(4), a(4, -1.0f);
        for (index_t b = 0; b * block < n; ++b)
            velora::rules::adam8::encode_block(code, x.data() + b * block, q_ref.data() + b * block, std::min(block, n - b * block),
                                               a_ref[static_cast<std::size_t>(b)]);
        backend.adam8_encode(sign, x.data(), n, block, q.data(), a.data());
        CHECK(q == q_ref);
        CHECK(std::memcmp(a.data(), a_ref.data(), a.size() * sizeof(float)) == 0);
        CHECK(a[1] == 0.0f);
        std::vector<float> out(static_cast<std::size_t>(n)), out_ref(out.size());
        for (index_t i = 0; i < n; ++i)
            out_ref[static_cast<std::size_t>(i)] = code.decode(q_ref[static_cast<std::size_t>(i)], a_ref[static_cast<std::size_t>(i / block)]);
        backend.adam8_decode(sign, q.data(), a.data(), n, block, out.data());
        CHECK(std::memcmp(out.data(), out_ref.data(), out.size() * sizeof(float)) == 0);
    }
    std::vector<std::uint8_t> q(8);
    std::vector<float> x(8), a(8);
    for (const index_t bad : {index_t{0}, index_t{4097}}) {
        const std::string e = test::invalid_argument_message([&] { backend.adam8_encode(velora::rules::code_sign::signed_code, x.data(), 8, bad, q.data(), a.data()); });
        CHECK(e.find("velora::eigen_backend::adam8_encode") != std::string::npos);
        CHECK(e.find("block = " + std::to_string(bad)) != std::string::npos);
        const std::string d = test::invalid_argument_message([&] { backend.adam8_decode(velora::rules::code_sign::signed_code, q.data(), a.data(), 8, bad, x.data()); });
        CHECK(d.find("velora::eigen_backend::adam8_decode") != std::string::npos);
    }
}

TEST_CASE("state8: the configuration refuses unsupported block sizes and backends, naming the values") {
    B backend(1);
    for (const index_t block : {index_t{0}, index_t{100}, index_t{32}, index_t{8192}, index_t{-256}}) {
        const std::string msg = test::invalid_argument_message([&] { optimizer o(backend, config8(block)); });
        CHECK(msg.find("low_rank_adamw") != std::string::npos);
        CHECK(msg.find("state_block") != std::string::npos);
        CHECK(msg.find(std::to_string(block)) != std::string::npos);
    }
    auto c = config8();
    c.state = static_cast<adarank::state_format>(7);
    CHECK(test::invalid_argument_message([&] { optimizer o(backend, c); }).find("config.state") != std::string::npos);
    velora::eigen_backend<double> dbackend(1);
    const std::string msg = test::invalid_argument_message([&] { adarank::low_rank_adamw<velora::eigen_backend<double>> o(dbackend, config8()); });
    CHECK(msg.find("int8_blockwise") != std::string::npos);
    CHECK(msg.find("8-byte") != std::string::npos);
}

TEST_CASE("state8: steps close to the float moments' steps, in a quarter of their bytes") {
    auto c32 = config8();
    c32.state = adarank::state_format::float32;
    const run_result f = run(c32, 1, 12);
    for (const index_t block : {index_t{64}, index_t{256}, index_t{2048}}) {
        const run_result a = run(config8(block), 1, 12);
        for (std::size_t p = 0; p < 3; ++p) {
            double diff = 0, moved = 0;
            const auto w0 = gaussian(static_cast<index_t>(a.weights[p].size()), 10 + p, 0.5);
            for (std::size_t i = 0; i < a.weights[p].size(); ++i) {
                diff += std::fabs(static_cast<double>(a.weights[p][i]) - f.weights[p][i]);
                moved += std::fabs(static_cast<double>(f.weights[p][i]) - w0[i]);
            }
            MESSAGE("block " << block << ", parameter " << p << ": mean |w8 - w32| / mean |w32 - w0| = " << diff / moved);
            CHECK(diff / moved < 0.05);   // the 8-bit steps follow the float ones to a few per cent
        }
        // 64x96 at rank 8 (left side: basis 8x64 floats, moments 8x96), 48x40 and 1x40 dense: each
        // moment a byte per element and a float absmax per block of `block`, against 4 bytes per
        // element; the basis is float in both.
        MESSAGE("block " << block << ": state bytes: 8-bit " << a.state_bytes << ", float " << f.state_bytes);
        const std::size_t basis = 8 * 64 * sizeof(float);
        std::size_t moments8 = 0, moments32 = 0;
        for (const index_t count : {index_t{8 * 96}, index_t{48 * 40}, index_t{40}}) {
            moments8 += 2 * (static_cast<std::size_t>(count) + sizeof(float) * static_cast<std::size_t>((count + block - 1) / block));
            moments32 += 2 * sizeof(float) * static_cast<std::size_t>(count);
        }
        CHECK(f.state_bytes == basis + moments32);
        CHECK(a.state_bytes == basis + moments8);
    }
}

TEST_CASE("state8: the same bits at 1, 2 and 3 threads, with the moments' blocks really cut into parts") {
    // The CPU backend cuts a tensor into parts only above velora::cpu::parallel_threshold
    // elements (below it every thread count runs one part on the calling thread, and the test
    // could not fail). Here both 8-bit tensors are above it: a 32x4104 low-rank parameter (left
    // side, rank 8: 8x4104 moments) and a 192x192 dense one; refresh every 4 steps, so the 9 steps
    // include two moment transports.
    static constexpr test::parameter_shape parameters[] = {{32, 4104, adarank::param_kind::low_rank}, {192, 192, adarank::param_kind::dense}};
    static_assert(192 * 192 > velora::cpu::parallel_threshold && 8 * 4104 > velora::cpu::parallel_threshold);
    MESSAGE("threads available to OpenMP for 3 requested: " << velora::cpu::resolve_threads(3));
    const auto c = config8(64);
    const run_result one = test::run_optimizer(c, 1, 9, parameters), two = test::run_optimizer(c, 2, 9, parameters),
                     three = test::run_optimizer(c, 3, 9, parameters);
    REQUIRE(one.layers[0].rank == 8);   // the moments above the threshold, as claimed
    CHECK(one.layers[0].rank * one.layers[0].cols > velora::cpu::parallel_threshold);
    CHECK(one.layers[0].refreshes == 3);
    for (const run_result* other : {&two, &three}) {
        CHECK(one.state == other->state);
        for (std::size_t p = 0; p < 2; ++p) CHECK(std::memcmp(one.weights[p].data(), other->weights[p].data(), one.weights[p].size() * sizeof(float)) == 0);
    }
}

TEST_CASE("state8: data-parallel ranks step to the bits of one process with the mean gradient, saved state included, across refreshes") {
    // Both ranks of a mirrored pair (the mean over ranks is each rank's gradient, exactly) through
    // the data-parallel path: dense and vector steps all-reduce the gradient, the low-rank one its
    // projection (and the sketch at a refresh); 9 steps with a refresh every 4 transport the 8-bit
    // moments twice.
    static constexpr test::parameter_shape parameters[] = {{64, 96, adarank::param_kind::low_rank}, {48, 40, adarank::param_kind::dense}, {1, 40, adarank::param_kind::automatic}};
    const auto c = config8(64);
    const run_result single = test::run_optimizer(c, 1, 9, parameters), rank0 = test::run_optimizer(c, 1, 9, parameters, 0),
                     rank1 = test::run_optimizer(c, 1, 9, parameters, 1);
    REQUIRE(single.layers[0].refreshes == 3);
    CHECK(single.layers[0].communicated_bytes == 0);   // the ranks' steps took the data-parallel path
    CHECK(rank0.layers[0].communicated_bytes > 0);
    CHECK(rank1.layers[1].communicated_bytes == 48 * 40 * sizeof(float));
    for (const run_result* rank : {&rank0, &rank1}) {
        CHECK(rank->state == single.state);
        for (std::size_t p = 0; p < 3; ++p)
            CHECK(std::memcmp(rank->weights[p].data(), single.weights[p].data(), single.weights[p].size() * sizeof(float)) == 0);
    }
}

TEST_CASE("state8: NaN/Inf and overflow leave the parameter as it was") {
    B backend(1);
    optimizer o(backend, config8(64));
    const auto dense = o.add_parameter(48, 40, adarank::param_kind::dense);
    const auto low = o.add_parameter(64, 96, adarank::param_kind::low_rank);
    auto wd = gaussian(48 * 40, 1, 0.5), wl = gaussian(64 * 96, 2, 0.5);
    const auto gd = gaussian(48 * 40, 3, 1.0), gl = gaussian(64 * 96, 4, 1.0);
    REQUIRE(o.step(dense, velora::make_view(wd.data(), 48, 40), velora::make_view(gd.data(), 48, 40)) == velora::status::ok);
    REQUIRE(o.step(low, velora::make_view(wl.data(), 64, 96), velora::make_view(gl.data(), 64, 96)) == velora::status::ok);
    const auto state = o.save_state();
    const auto wd0 = wd, wl0 = wl;
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), 3e38f}) {
        auto g1 = gd, g2 = gl;
        g1[100] = bad;
        g2[100] = bad;
        const auto s1 = o.step(dense, velora::make_view(wd.data(), 48, 40), velora::make_view(g1.data(), 48, 40));
        const auto s2 = o.step(low, velora::make_view(wl.data(), 64, 96), velora::make_view(g2.data(), 64, 96));
        const auto expected = std::isfinite(bad) ? velora::status::overflow : velora::status::non_finite_input;
        CHECK(s1 == expected);
        CHECK(s2 == expected);
        CHECK(o.save_state() == state);
        CHECK(wd == wd0);
        CHECK(wl == wl0);
    }
}

TEST_CASE("state8: an all-zero gradient block keeps absmax 0; steps after it stay finite") {
    B backend(1);
    optimizer o(backend, config8(64));
    const auto id = o.add_parameter(16, 16, adarank::param_kind::dense);
    auto w = gaussian(256, 5, 0.5);
    auto g = gaussian(256, 6, 1.0);
    std::fill(g.begin() + 64, g.begin() + 128, 0.0f);   // block 1
    for (int t = 0; t < 3; ++t) REQUIRE(o.step(id, velora::make_view(w.data(), 16, 16), velora::make_view(g.data(), 16, 16)) == velora::status::ok);
    for (const float x : w) CHECK(std::isfinite(x));
    CHECK(o.layer_state(id).state_bytes == 2 * 256 + 2 * 4 * 4);
    const test::saved_moments8 s = test::last_moments8(o.save_state(), 256, 64);
    CHECK(s.am[1] == 0.0f);
    CHECK(s.av[1] == 0.0f);
    CHECK(std::all_of(s.qm.begin() + 64, s.qm.begin() + 128, [](std::uint8_t q) { return q == 0; }));
    CHECK(std::all_of(s.qv.begin() + 64, s.qv.begin() + 128, [](std::uint8_t q) { return q == 0; }));
    for (const std::size_t b : {0u, 2u, 3u}) {   // the other blocks hold moments
        CHECK(s.am[b] > 0.0f);
        CHECK(s.av[b] > 0.0f);
    }
}

TEST_CASE("state8: saved packed, loaded back, the next steps give the same bits; a float state is refused") {
    const auto c = config8(128);
    B backend(1);
    const index_t shapes[2][2] = {{64, 96}, {48, 40}};
    const auto make = [&] { return low_rank_and_dense(backend, c); };
    optimizer a = make();
    std::vector<std::vector<float>> w = {gaussian(64 * 96, 1, 0.5), gaussian(48 * 40, 2, 0.5)};
    const auto step_all = [&](optimizer& o, std::vector<std::vector<float>>& ws, int t) {
        for (int p = 0; p < 2; ++p) {
            const auto g = gaussian(shapes[p][0] * shapes[p][1], 100 + static_cast<std::uint64_t>(t * 2 + p), 1.0);
            REQUIRE(o.step(p, velora::make_view(ws[static_cast<std::size_t>(p)].data(), shapes[p][0], shapes[p][1]),
                           velora::make_view(g.data(), shapes[p][0], shapes[p][1])) == velora::status::ok);
        }
    };
    for (int t = 0; t < 5; ++t) step_all(a, w, t);
    const auto blob = a.save_state();
    // packed: 64x96 at rank 8 → 8x96 moments; 48x40 dense → 1920 bytes per moment
    CHECK(blob.size() < 2 * (8 * 96 + 48 * 40) * sizeof(float));
    optimizer b = make();
    b.load_state(blob);
    CHECK(b.save_state() == blob);
    auto wb = w;
    for (int t = 5; t < 9; ++t) {
        step_all(a, w, t);
        step_all(b, wb, t);
    }
    CHECK(a.save_state() == b.save_state());
    CHECK(w == wb);
    // a float state (and one with another block size) is refused, naming the difference
    auto c32 = c;
    c32.state = adarank::state_format::float32;
    optimizer f = low_rank_and_dense(backend, c32);
    CHECK_THROWS_WITH_AS(b.load_state(f.save_state()), doctest::Contains("moment state format differs"), velora::state_format_error);
    CHECK_THROWS_WITH_AS(f.load_state(blob), doctest::Contains("moment state format differs"), velora::state_format_error);
    auto c64 = c;
    c64.state_block = 64;
    optimizer g = low_rank_and_dense(backend, c64);
    CHECK_THROWS_WITH_AS(g.load_state(blob), doctest::Contains("block size differs"), velora::state_format_error);
}

TEST_CASE("state8: load_state refuses a NaN, Inf, negative or subnormal absmax in an 8-bit block, changing nothing") {
    // The loader's rule (optimizer_state_io.hpp): every absmax finite and either 0 or at least the
    // smallest normal float, what the encoder stores. The blob is resealed after each edit so that
    // this rule, not the checksum, is what refuses it.
    const auto c = config8(64);
    B backend(1);
    const auto make = [&] { return low_rank_and_dense(backend, c); };
    optimizer a = make();
    std::vector<float> w0 = gaussian(64 * 96, 1, 0.5), w1 = gaussian(48 * 40, 2, 0.5);
    for (int t = 0; t < 2; ++t) {
        const auto g0 = gaussian(64 * 96, 30 + static_cast<std::uint64_t>(t), 1.0), g1 = gaussian(48 * 40, 40 + static_cast<std::uint64_t>(t), 1.0);
        REQUIRE(a.step(0, velora::make_view(w0.data(), 64, 96), velora::make_view(g0.data(), 64, 96)) == velora::status::ok);
        REQUIRE(a.step(1, velora::make_view(w1.data(), 48, 40), velora::make_view(g1.data(), 48, 40)) == velora::status::ok);
    }
    const auto blob = a.save_state();
    const test::saved_moments8 s = test::last_moments8(blob, 48 * 40, 64);   // the dense parameter's 30 blocks
    // The loading optimizer holds a state of its own (one step), which a refusal must leave as it was.
    optimizer d = make();
    const auto gd = gaussian(48 * 40, 50, 1.0);
    REQUIRE(d.step(1, velora::make_view(w1.data(), 48, 40), velora::make_view(gd.data(), 48, 40)) == velora::status::ok);
    const auto before = d.save_state();
    const auto with_absmax = [&](std::size_t at, float value) {
        auto e = blob;
        std::memcpy(e.data() + at, &value, sizeof(float));
        test::reseal(e);
        return e;
    };
    for (const bool first : {true, false}) {
        const std::size_t at = (first ? s.am_at : s.av_at) + 3 * sizeof(float);   // block 3
        CAPTURE(first);
        for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -0.5f, std::numeric_limits<float>::denorm_min(),
                                std::numeric_limits<float>::min() / 2}) {
            CAPTURE(bad);
            CHECK_THROWS_WITH_AS(d.load_state(with_absmax(at, bad)), doctest::Contains(first ? "first moment has the absmax" : "second moment has the absmax"),
                                 velora::state_format_error);
            CHECK(d.save_state() == before);
        }
        // The edges of the rule load: 0 (an all-zero block) and the smallest normal float.
        for (const float good : {0.0f, std::numeric_limits<float>::min()}) {
            optimizer e = make();
            const auto edited = with_absmax(at, good);
            e.load_state(edited);
            CHECK(e.save_state() == edited);
        }
    }
}

TEST_CASE("state8: set_basis transports 8-bit moments; a double optimizer (float moments) still steps") {
    B backend(1);
    optimizer o(backend, config8(64));
    const auto id = o.add_parameter(64, 96, adarank::param_kind::low_rank);
    auto w = gaussian(64 * 96, 1, 0.5);
    for (int t = 0; t < 3; ++t) {
        const auto g = gaussian(64 * 96, 50 + static_cast<std::uint64_t>(t), 1.0);
        REQUIRE(o.step(id, velora::make_view(w.data(), 64, 96), velora::make_view(g.data(), 64, 96)) == velora::status::ok);
    }
    // the first 6 unit vectors as the new basis (rows of length 64: the left side)
    std::vector<float> basis(6 * 64, 0.0f);
    for (int i = 0; i < 6; ++i) basis[static_cast<std::size_t>(i * 64 + i)] = 1.0f;
    const auto old_basis_view = o.basis(id);
    const std::vector<float> old_basis(old_basis_view.data, old_basis_view.data + 8 * 64);
    const test::saved_moments8 old = test::last_moments8(o.save_state(), 8 * 96, 64);
    REQUIRE(o.set_basis(id, velora::make_view(basis.data(), 6, 64)) == velora::status::ok);
    CHECK(o.layer_state(id).rank == 6);
    CHECK(o.layer_state(id).state_bytes == 6 * 64 * sizeof(float) + 2 * 6 * 96 + 2 * 4 * 9);
    {
        // The moments set_basis stores are quantize(transport(dequantize(old))): the old bytes
        // decoded by the dynamic codes, rotated by R = B_new·B_oldᵀ (squared rotation for v) on a
        // backend of its own, and encoded block by block.
        std::vector<float> m_old(8 * 96), v_old(8 * 96), m_new(6 * 96), v_new(6 * 96), r(6 * 8), r2(6 * 8);
        for (std::size_t i = 0; i < m_old.size(); ++i) {
            m_old[i] = velora::rules::signed_dynamic_code().decode(old.qm[i], old.am[i / 64]);
            v_old[i] = velora::rules::unsigned_dynamic_code().decode(old.qv[i], old.av[i / 64]);
        }
        B own(1);
        adarank::transport_moments(own, adarank::transport_policy::squared_rotation, velora::make_view<const float>(basis.data(), 6, 64),
                                   velora::make_view<const float>(old_basis.data(), 8, 64), velora::make_view<const float>(m_old.data(), 8, 96),
                                   velora::make_view<const float>(v_old.data(), 8, 96), velora::make_view(m_new.data(), 6, 96), velora::make_view(v_new.data(), 6, 96),
                                   velora::make_view(r.data(), 6, 8), velora::make_view(r2.data(), 6, 8));
        const test::saved_moments8 got = test::last_moments8(o.save_state(), 6 * 96, 64);
        for (std::size_t b = 0; b < 9; ++b) {
            std::uint8_t qm[64], qv[64];
            float am = -1, av = -1;
            velora::cpu::adam8_encode_block(velora::rules::signed_dynamic_code(), m_new.data() + 64 * b, qm, 64, am);
            velora::cpu::adam8_encode_block(velora::rules::unsigned_dynamic_code(), v_new.data() + 64 * b, qv, 64, av);
            CAPTURE(b);
            CHECK(got.am[b] == am);
            CHECK(got.av[b] == av);
            CHECK(std::memcmp(got.qm.data() + 64 * b, qm, 64) == 0);
            CHECK(std::memcmp(got.qv.data() + 64 * b, qv, 64) == 0);
        }
        CHECK(std::count(old.am.begin(), old.am.end(), 0.0f) == 0);   // the old moments were not trivial
    }
    const auto g = gaussian(64 * 96, 99, 1.0);
    CHECK(o.step(id, velora::make_view(w.data(), 64, 96), velora::make_view(g.data(), 64, 96)) == velora::status::ok);
    for (const float x : w) CHECK(std::isfinite(x));

    velora::eigen_backend<double> dbackend(1);
    adarank::low_rank_adamw<velora::eigen_backend<double>> d(dbackend, adarank::optimizer_config::galore(4, 2));
    d.add_parameter(16, 24, adarank::param_kind::low_rank);
    d.add_parameter(8, 8, adarank::param_kind::dense);
    std::vector<double> w1(16 * 24, 0.5), g1(16 * 24), w2(64, 0.5), g2(64, 0.25);
    for (std::size_t i = 0; i < g1.size(); ++i) g1[i] = velora::gaussian_at(3, i);
    CHECK(d.step(0, velora::make_view(w1.data(), 16, 24), velora::make_view(g1.data(), 16, 24)) == velora::status::ok);
    CHECK(d.step(1, velora::make_view(w2.data(), 8, 8), velora::make_view(g2.data(), 8, 8)) == velora::status::ok);
}

TEST_CASE("state8: a low-rank step the overflow certificate cannot vouch for takes the exact path and stores the fused pass's bits") {
    // The certificate bounds |n| <= M'/ε with M' >= (1 − β₁)·‖Ĝ‖, and certifies the weight update
    // only when |α|·‖B‖·‖N‖ stays below max(float)/4. A learning rate of 1e34 (α = lr·scale·the bias
    // correction, >= lr/40 at t = 3) fails it while the exact update is finite (|n| of order 1, the
    // weights of order 1e33). The moments do not depend on the learning rate: the exact path
    // (decode, float update, encode) must store the bits that the fused 8-bit pass of a
    // certified step (lr 1e-2) stores from the same state and gradient.
    B backend(1);
    optimizer fused = one_parameter(backend, 64, 96, adarank::param_kind::low_rank), exact = one_parameter(backend, 64, 96, adarank::param_kind::low_rank);
    auto wf = gaussian(64 * 96, 1, 0.5);
    auto we = wf;
    for (int t = 0; t < 3; ++t) {   // the subspace found at t = 0; t = 1 and 2 in it (refresh every 4)
        const auto g = gaussian(64 * 96, 70 + static_cast<std::uint64_t>(t), 1.0);
        const auto gv = velora::make_view(g.data(), 64, 96);
        if (t == 2) exact.set_learning_rate(1e34);
        REQUIRE(fused.step(0, velora::make_view(wf.data(), 64, 96), gv) == velora::status::ok);
        REQUIRE(exact.step(0, velora::make_view(we.data(), 64, 96), gv) == velora::status::ok);
    }
    using cert = adarank::overflow_certificate<float>;
    const double projected = std::sqrt(exact.layer_state(0).projected_norm2), eps = config8().adam.eps;
    // a lower bound of the certificate's product (‖B‖_F >= 1 for any basis with a unit row)
    CHECK(1e34 / 40 * (0.1 * projected / eps) > cert::quarter_max);
    CHECK(exact.layer_state(0).refreshes == 1);
    CHECK(exact.layer_state(0).steps == 3);
    double largest = 0;
    for (const float x : we) {
        REQUIRE(std::isfinite(x));
        largest = std::max(largest, std::fabs(static_cast<double>(x)));
    }
    CHECK(largest > 1e31);   // the huge step was taken
    exact.set_learning_rate(1e-2);   // the saved learning rate: the only other difference
    CHECK(exact.save_state() == fused.save_state());
}

TEST_CASE("state8: a dense step on copies (a strided weight, or a step the certificate refuses) stores the in-place pass's bits") {
    // dense_step8 runs the fused pass in place only on contiguous arrays with a certified step;
    // otherwise on copies, committed when finite. The moments do not depend on the learning rate
    // nor on the weight's layout: every path must store the same bytes from the same state.
    B backend(1);
    const auto make = [&] { return one_parameter(backend, 48, 40, adarank::param_kind::dense); };
    optimizer in_place = make(), strided = make(), huge = make();
    const index_t ld = 43;   // the strided weight: rows of 40 in rows of 43
    auto w = gaussian(48 * 40, 1, 0.5), wh = w;
    std::vector<float> ws(48 * ld, 7.0f);
    for (index_t r = 0; r < 48; ++r) std::copy(w.begin() + r * 40, w.begin() + r * 40 + 40, ws.begin() + r * ld);
    for (int t = 0; t < 3; ++t) {
        const auto g = gaussian(48 * 40, 80 + static_cast<std::uint64_t>(t), 1.0);
        const auto gv = velora::make_view(g.data(), 48, 40);
        if (t == 2) {
            // The certificate's |n| bound is at least (1 − β₁)·‖G‖/ε and the step at least lr/40 at
            // t = 3: their product beyond max(float)/4 refuses the in-place pass; the exact update
            // is finite (|n| of order 1).
            double energy = 0;
            for (const float x : g) energy += static_cast<double>(x) * x;
            CHECK(1e34 / 40 * (0.1 * std::sqrt(energy) / config8().adam.eps) > adarank::overflow_certificate<float>::quarter_max);
            huge.set_learning_rate(1e34);
        }
        REQUIRE(in_place.step(0, velora::make_view(w.data(), 48, 40), gv) == velora::status::ok);
        REQUIRE(strided.step(0, velora::matrix_view<float>{ws.data(), 48, 40, ld}, gv) == velora::status::ok);
        REQUIRE(huge.step(0, velora::make_view(wh.data(), 48, 40), gv) == velora::status::ok);
    }
    for (index_t r = 0; r < 48; ++r) {
        CHECK(std::memcmp(ws.data() + r * ld, w.data() + r * 40, 40 * sizeof(float)) == 0);
        CHECK(std::all_of(ws.begin() + r * ld + 40, ws.begin() + (r + 1) * ld, [](float x) { return x == 7.0f; }));   // the gaps untouched
    }
    CHECK(strided.save_state() == in_place.save_state());
    CHECK(std::any_of(wh.begin(), wh.end(), [](float x) { return std::fabs(x) > 1e31f; }));   // the huge step was taken
    huge.set_learning_rate(1e-2);   // the saved learning rate: the only other difference
    CHECK(huge.save_state() == in_place.save_state());
}

TEST_CASE("state8: a steady-state step allocates nothing (dense and low-rank, 1 and 2 threads)") {
    for (const int threads : {1, 2}) {
        B backend(threads);
        auto c = config8(64);
        c.refresh = adarank::refresh_policy::every(1000);
        optimizer o(backend, c);
        const auto dense = o.add_parameter(48, 40, adarank::param_kind::dense);
        const auto low = o.add_parameter(64, 96, adarank::param_kind::low_rank);
        auto wd = gaussian(48 * 40, 1, 0.5), wl = gaussian(64 * 96, 2, 0.5);
        const auto gd = gaussian(48 * 40, 3, 1.0), gl = gaussian(64 * 96, 4, 1.0);
        const auto step = [&] {
            REQUIRE(o.step(dense, velora::make_view(wd.data(), 48, 40), velora::make_view(gd.data(), 48, 40)) == velora::status::ok);
            REQUIRE(o.step(low, velora::make_view(wl.data(), 64, 96), velora::make_view(gl.data(), 64, 96)) == velora::status::ok);
        };
        step();   // the first step finds the subspace
        step();
        const long before = test::allocations.load();
        for (int t = 0; t < 3; ++t) step();
        CHECK(test::allocations.load() - before == 0);
    }
}
