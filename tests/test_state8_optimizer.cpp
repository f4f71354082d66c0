// low_rank_adamw with 8-bit blockwise moments (optimizer_config::state = int8_blockwise): the
// configuration's checks, dense and low-rank steps against the float moments, the status rule,
// thread-count determinism, state bytes, and the packed state's save and load.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <adarank/adarank.hpp>
#include <velora/backend/eigen.hpp>

#include "allocation_counter.hpp"   // every allocation counted (the steady-state test)
#include "optimizer_run.hpp"
#include "test_util.hpp"

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

// A 64x96 low-rank, a 48x40 dense and a 1x40 vector parameter, `steps` steps (refresh every 4).
run_result run(const adarank::optimizer_config& c, int threads, int steps) {
    static constexpr test::parameter_shape parameters[] = {{64, 96, adarank::param_kind::low_rank}, {48, 40, adarank::param_kind::dense}, {1, 40, adarank::param_kind::automatic}};
    return test::run_optimizer(c, threads, steps, parameters);
}

} // namespace

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
        // 64x96 at rank 8 (left side: moments 8x96): basis 8*64 floats; moments 2 bytes + 2 absmax per block
        MESSAGE("block " << block << ": state bytes: 8-bit " << a.state_bytes << ", float " << f.state_bytes);
        CHECK(a.state_bytes < f.state_bytes / 2);
    }
}

TEST_CASE("state8: the same bits at 1 and 2 threads") {
    // blocks of 64 in 48x40 dense (30 blocks) and 8x96 moments: enough work for two threads' parts
    const run_result one = run(config8(64), 1, 9), two = run(config8(64), 2, 9);
    CHECK(one.state == two.state);
    for (std::size_t p = 0; p < 3; ++p) CHECK(std::memcmp(one.weights[p].data(), two.weights[p].data(), one.weights[p].size() * sizeof(float)) == 0);
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
}

TEST_CASE("state8: saved packed, loaded back, the next steps give the same bits; a float state is refused") {
    const auto c = config8(128);
    B backend(1);
    const index_t shapes[2][2] = {{64, 96}, {48, 40}};
    const auto make = [&] {
        optimizer o(backend, c);
        o.add_parameter(64, 96, adarank::param_kind::low_rank);
        o.add_parameter(48, 40, adarank::param_kind::dense);
        return o;
    };
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
    optimizer f(backend, c32);
    f.add_parameter(64, 96, adarank::param_kind::low_rank);
    f.add_parameter(48, 40, adarank::param_kind::dense);
    CHECK_THROWS_WITH_AS(b.load_state(f.save_state()), doctest::Contains("moment state format differs"), velora::state_format_error);
    CHECK_THROWS_WITH_AS(f.load_state(blob), doctest::Contains("moment state format differs"), velora::state_format_error);
    auto c64 = c;
    c64.state_block = 64;
    optimizer g(backend, c64);
    g.add_parameter(64, 96, adarank::param_kind::low_rank);
    g.add_parameter(48, 40, adarank::param_kind::dense);
    CHECK_THROWS_WITH_AS(g.load_state(blob), doctest::Contains("block size differs"), velora::state_format_error);
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
    REQUIRE(o.set_basis(id, velora::make_view(basis.data(), 6, 64)) == velora::status::ok);
    CHECK(o.layer_state(id).rank == 6);
    CHECK(o.layer_state(id).state_bytes == 6 * 64 * sizeof(float) + 2 * 6 * 96 + 2 * 4 * 9);
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
