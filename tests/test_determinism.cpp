#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
// Bit-identical results whatever the thread count: the backend's GEMM and reductions, the
// compressor and a whole optimizer run with refreshes and rank changes, at 1, 2, 3 and 4
// OpenMP threads (more threads than cores is fine: only the partition matters).
#include <doctest/doctest.h>

#include <adarank/adarank.hpp>
#include <velora/velora.hpp>

#include <cstring>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "test_util.hpp"

namespace {

using velora::index_t;

constexpr int kThreadCounts[] = {1, 2, 3, 4};

// The backend caps its threads at omp_get_max_threads(); raise that cap for the test.
struct allow_threads {
    allow_threads() {
#if defined(_OPENMP)
        omp_set_num_threads(4);
#endif
    }
};
const allow_threads allow_threads_once;

template <class T>
std::vector<T> pattern(index_t n, std::uint64_t seed) {
    std::vector<T> v(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = static_cast<T>(velora::gaussian_at(seed, static_cast<std::uint64_t>(i)));
    return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// C = op(A)·op(B) + β·C for one shape at the given thread count.
template <class T>
std::vector<T> run_gemm(velora::cpu::gemm_engine engine, int threads, velora::op oa, velora::op ob, index_t m, index_t n, index_t k) {
    velora::eigen_backend<T> b(threads);
    b.set_gemm_engine(engine);
    const index_t ar = oa == velora::op::none ? m : k, ac = oa == velora::op::none ? k : m;
    const index_t br = ob == velora::op::none ? k : n, bc = ob == velora::op::none ? n : k;
    const auto a = pattern<T>(ar * ac, 1), bb = pattern<T>(br * bc, 2);
    auto c = pattern<T>(m * n, 3);
    b.gemm(oa, ob, T(0.75), velora::make_view(a.data(), ar, ac), velora::make_view(bb.data(), br, bc), T(0.5), velora::make_view(c.data(), m, n));
    return c;
}

} // namespace

TEST_CASE_TEMPLATE("gemm gives the same bits at 1, 2, 3 and 4 threads, with every engine", T, float, double) {
    const index_t shapes[][3] = {{256, 256, 256}, {1024, 96, 700}, {137, 1000, 333}, {48, 4096, 64}, {500, 17, 2000}, {2000, 64, 300}, {64, 3000, 256}, {1024, 32, 4096}, {1024, 4096, 128}};
    for (const auto engine : test::gemm_engines()) {
        const std::string engine_name = velora::cpu::engine_name(engine);
        CAPTURE(engine_name);
        for (const auto& s : shapes) {
            for (auto oa : {velora::op::none, velora::op::transpose}) {
                for (auto ob : {velora::op::none, velora::op::transpose}) {
                    CAPTURE(s[0]);
                    CAPTURE(s[1]);
                    CAPTURE(s[2]);
                    const auto ref = run_gemm<T>(engine, 1, oa, ob, s[0], s[1], s[2]);
                    for (int t : kThreadCounts) CHECK(same_bits(ref, run_gemm<T>(engine, t, oa, ob, s[0], s[1], s[2])));
                }
            }
        }
    }
}

TEST_CASE_TEMPLATE("reductions give the same bits at 1, 2, 3 and 4 threads", T, float, double) {
    const index_t rows = 3001, cols = 257;
    const auto x = pattern<T>(rows * cols, 7);
    const auto view = velora::make_view(x.data(), rows, cols);
    std::vector<T> ref_sums(static_cast<std::size_t>(cols)), ref_sub(16);
    double ref_ss = 0;
    for (int t : kThreadCounts) {
        velora::eigen_backend<T> b(t);
        std::vector<T> sums(static_cast<std::size_t>(cols)), sub(16);
        b.column_sums(view, sums.data());
        b.sum_subtokens(view, 16, sub.data());
        const double ss = b.sum_of_squares(view);
        if (t == 1) {
            ref_sums = sums;
            ref_sub = sub;
            ref_ss = ss;
        }
        CHECK(same_bits(ref_sums, sums));
        CHECK(same_bits(ref_sub, sub));
        CHECK(std::memcmp(&ref_ss, &ss, sizeof ss) == 0);
    }
}

namespace {

// What a run leaves behind: the optimizer's state blob and every weight, and a trace of ranks.
struct optimizer_run {
    std::vector<std::byte> state;
    std::vector<std::vector<float>> weights;
    std::vector<index_t> ranks;
    std::uint64_t refreshes = 0;
};

// 60 steps of AdaRankGrad (adaptive rank, convergence-triggered refresh, transport) on three
// parameters (left side, right side, dense), gradients of a slowly rotating low-rank signal plus
// noise, so that the run refreshes and changes rank. Shapes large enough that every kernel
// takes its threaded path.
optimizer_run run_optimizer(int threads) {
    velora::eigen_backend<float> b(threads);
    adarank::optimizer_config cfg;
    cfg.rank = adarank::rank_policy::adaptive(0.3, 2, 24);
    cfg.refresh = adarank::refresh_policy::converged(0.5, 5, 15);
    adarank::low_rank_adamw<velora::eigen_backend<float>> opt(b, cfg);
    const index_t shapes[][2] = {{192, 640}, {640, 160}, {64, 96}};
    const adarank::param_kind kinds[] = {adarank::param_kind::low_rank, adarank::param_kind::low_rank, adarank::param_kind::dense};
    optimizer_run run;
    for (int p = 0; p < 3; ++p) {
        REQUIRE(opt.add_parameter(shapes[p][0], shapes[p][1], kinds[p]) == p);
        run.weights.push_back(pattern<float>(shapes[p][0] * shapes[p][1], 100 + static_cast<std::uint64_t>(p)));
    }
    for (int step = 0; step < 60; ++step) {
        for (int p = 0; p < 3; ++p) {
            const index_t m = shapes[p][0], n = shapes[p][1];
            auto g = pattern<float>(m * n, 1000 + static_cast<std::uint64_t>(step * 3 + p));
            const int rank = 1 + (step / 20) * 4;   // the signal's rank grows: 1, 5, 9
            for (int k = 0; k < rank; ++k) {
                const auto u = pattern<float>(m, 50000 + static_cast<std::uint64_t>(p * 100 + k));
                const auto w = pattern<float>(n, 60000 + static_cast<std::uint64_t>(p * 100 + k + step / 7));
                for (index_t i = 0; i < m; ++i)
                    for (index_t j = 0; j < n; ++j) g[static_cast<std::size_t>(i * n + j)] += 4.0f * u[static_cast<std::size_t>(i)] * w[static_cast<std::size_t>(j)];
            }
            const auto s = opt.step(p, velora::make_view(run.weights[static_cast<std::size_t>(p)].data(), m, n), velora::make_view<const float>(g.data(), m, n));
            REQUIRE(s == velora::status::ok);
            run.ranks.push_back(opt.layer_state(p).rank);
        }
    }
    for (int p = 0; p < 3; ++p) run.refreshes += opt.layer_state(p).refreshes;
    run.state = opt.save_state();
    return run;
}

} // namespace

TEST_CASE("an AdaRankGrad run with refreshes and rank changes gives the same bits at 1, 2, 3 and 4 threads") {
    const optimizer_run ref = run_optimizer(1);
    // The run must exercise what it claims to: several refreshes and more than one rank.
    CHECK(ref.refreshes >= 6);
    index_t lowest = ref.ranks.front(), highest = ref.ranks.front();
    for (index_t r : ref.ranks) {
        lowest = std::min(lowest, r);
        highest = std::max(highest, r);
    }
    CHECK(lowest < highest);
    for (int t : kThreadCounts) {
        CAPTURE(t);
        const optimizer_run run = run_optimizer(t);
        CHECK(run.ranks == ref.ranks);
        CHECK(run.state == ref.state);
        for (std::size_t p = 0; p < ref.weights.size(); ++p) {
            CAPTURE(p);
            std::size_t differ = 0, first = 0;
            for (std::size_t i = 0; i < ref.weights[p].size(); ++i)
                if (std::memcmp(&ref.weights[p][i], &run.weights[p][i], sizeof(float)) != 0 && differ++ == 0) first = i;
            CAPTURE(first);
            CHECK(differ == 0);
        }
    }
}

TEST_CASE("a compressor run gives the same bits at 1, 2, 3 and 4 threads") {
    const index_t tokens = 2048, features = 768, out = 384;
    auto run = [&](int threads, velora::v_mode mode, velora::storage z) {
        velora::eigen_backend<float> b(threads);
        velora::compressor<velora::eigen_backend<float>> comp(b, features, {.groups = 24, .v = mode, .z_storage = z});
        velora::compressor<velora::eigen_backend<float>>::record_type record;
        std::vector<float> a(static_cast<std::size_t>(out * 24));
        std::vector<std::byte> result;
        for (int step = 0; step < 3; ++step) {
            const auto x = test::data<float>(static_cast<std::size_t>(tokens * features), 10 + static_cast<std::uint64_t>(step), 0.5);
            const auto dy = pattern<float>(tokens * out, 20 + static_cast<std::uint64_t>(step));
            REQUIRE(comp.compress(velora::make_view(x.data(), tokens, features), record) == velora::status::ok);
            comp.gradient_factor(record, velora::make_view(dy.data(), tokens, out), velora::make_view(a.data(), out, 24));
            const auto* bytes = reinterpret_cast<const std::byte*>(a.data());
            result.insert(result.end(), bytes, bytes + a.size() * sizeof(float));
        }
        const auto state = comp.save_state();
        result.insert(result.end(), state.begin(), state.end());
        return result;
    };
    for (auto mode : {velora::v_mode::batch_mean(), velora::v_mode::ema(0.9)}) {
        for (auto z : {velora::storage::f32, velora::storage::bf16}) {
            const auto ref = run(1, mode, z);
            for (int t : kThreadCounts) CHECK(run(t, mode, z) == ref);
        }
    }
}

namespace {

// `values` copied to a fresh buffer at `offset` elements past a 64-byte boundary.
template <class T>
struct placed {
    std::vector<T> storage;
    T* data;
    placed(const std::vector<T>& values, std::size_t offset) : storage(values.size() + offset + 64 / sizeof(T)) {
        auto address = reinterpret_cast<std::uintptr_t>(storage.data());
        const std::size_t skip = ((64 - address % 64) % 64) / sizeof(T) + offset;
        data = storage.data() + skip;
        std::copy(values.begin(), values.end(), data);
    }
    std::vector<T> values(std::size_t n) const { return {data, data + n}; }
};

} // namespace

TEST_CASE("results do not depend on where the caller's data lies in memory") {
    const index_t rows = 96, cols = 200, tokens = 300, features = 200;
    const auto w0 = pattern<float>(rows * cols, 1), g0 = pattern<float>(rows * cols, 2), x0 = test::data<float>(tokens * features, 3, 0.5);
    struct outcome {
        std::vector<float> dense_w, low_w, z;
        double norm2 = 0;
        bool operator==(const outcome&) const = default;
    };
    auto run = [&](std::size_t offset) {
        velora::eigen_backend<float> b(2);
        outcome o;
        placed<float> g(g0, offset), x(x0, offset);
        o.norm2 = b.sum_of_squares(velora::make_view<const float>(g.data, rows, cols));
        adarank::optimizer_config cfg;
        cfg.rank = adarank::rank_policy::adaptive(0.3, 2, 16);
        adarank::low_rank_adamw<velora::eigen_backend<float>> opt(b, cfg);
        REQUIRE(opt.add_parameter(rows, cols, adarank::param_kind::dense) == 0);
        REQUIRE(opt.add_parameter(rows, cols, adarank::param_kind::low_rank) == 1);
        placed<float> wd(w0, offset), wl(w0, offset);
        for (int step = 0; step < 3; ++step) {
            REQUIRE(opt.step(0, velora::make_view(wd.data, rows, cols), velora::make_view<const float>(g.data, rows, cols)) == velora::status::ok);
            REQUIRE(opt.step(1, velora::make_view(wl.data, rows, cols), velora::make_view<const float>(g.data, rows, cols)) == velora::status::ok);
        }
        o.dense_w = wd.values(w0.size());
        o.low_w = wl.values(w0.size());
        velora::compressor<velora::eigen_backend<float>> comp(b, features, {.groups = 8});   // s = 25: the generic path
        velora::compressor<velora::eigen_backend<float>>::record_type record;
        REQUIRE(comp.compress(velora::make_view<const float>(x.data, tokens, features), record) == velora::status::ok);
        const auto z = record.z<float>();
        o.z.assign(z.data, z.data + z.rows * z.cols);
        return o;
    };
    const outcome ref = run(0);
    for (std::size_t offset = 1; offset < 16; ++offset) {
        CAPTURE(offset);
        const outcome o = run(offset);
        CHECK(o.norm2 == ref.norm2);
        CHECK(same_bits(o.dense_w, ref.dense_w));
        CHECK(same_bits(o.low_w, ref.low_w));
        CHECK(same_bits(o.z, ref.z));
    }
}
