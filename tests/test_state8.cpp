// 8-bit blockwise Adam moments: the dynamic codes (velora/backend/rules/dynamic_code.hpp), the
// CPU block kernel's three bodies (velora/backend/cpu/adam8.hpp), and the block split into lanes
// as the CUDA kernels run it (velora/backend/rules/adam8_block.hpp, cuda/adam8.cuh), on the host;
// the Eigen backend's adam8_update's refusal of a bad block size.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/backend/cpu/adam8.hpp>
#include <velora/backend/eigen.hpp>
#include <velora/backend/rules/adam8_block.hpp>
#include <velora/core/rng.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace {

using velora::index_t;
using velora::cpu::adam_row_kind;
using velora::rules::dynamic_code;

float from_bits(std::uint32_t b) {
    float f;
    std::memcpy(&f, &b, sizeof f);
    return f;
}

// bitsandbytes' create_dynamic_map, written out from its definition: decade i holds the midpoints
// of k_i equal cells of [0.1, 1] scaled by 10^(i-6).
std::vector<double> reference_magnitudes(bool is_signed) {
    std::vector<double> r{0.0};
    for (int i = 0; i < 7; ++i) {
        const int k = is_signed ? (1 << i) : (1 << (i + 1));
        for (int j = 0; j < k; ++j) r.push_back(std::pow(10.0, i - 6) * (0.1 + 0.9 * (j + 0.5) / k));
    }
    if (is_signed) r.back() = 1.0;
    else r.push_back(1.0);
    return r;
}

velora::rules::adamw_terms<float> galore_terms(int t) {
    velora::rules::adamw_terms<float> c;
    const double b1 = 0.9, b2 = 0.999, lr = 1e-3;
    c.beta1 = 0.9f;
    c.beta2 = 0.999f;
    c.c1 = 1.0f - c.beta1;
    c.c2 = 1.0f - c.beta2;
    c.eps = 1e-8f;
    c.step = static_cast<float>(lr * std::sqrt(1 - std::pow(b2, t)) / (1 - std::pow(b1, t)));
    c.decay = static_cast<float>(1 - lr * 0.01);
    return c;
}

velora::rules::adamw_terms<float> torch_terms(int t) {
    auto c = galore_terms(t);
    c.order = velora::rules::adamw_order::torch;
    c.step = static_cast<float>(1e-3 / (1 - std::pow(0.9, t)));
    c.bias2_sqrt = static_cast<float>(std::sqrt(1 - std::pow(0.999, t)));
    return c;
}

// A tensor of 8-bit moments with its arrays.
struct state8 {
    std::vector<std::uint8_t> qm, qv;
    std::vector<float> am, av;
    index_t count, block;
    state8(index_t n, index_t b) : qm(n), qv(n), am((n + b - 1) / b), av((n + b - 1) / b), count(n), block(b) {}
    velora::cpu::adam8_tensor_state view() { return {qm.data(), qv.data(), am.data(), av.data(), count, block}; }
    bool operator==(const state8&) const = default;
};

// Gradients over a wide dynamic range, with a block of zeros at [zero_first, zero_first + zero_n).
std::vector<float> gradient(index_t n, std::uint64_t seed, index_t zero_first = 0, index_t zero_n = 0) {
    std::vector<float> g(n);
    for (index_t i = 0; i < n; ++i) {
        const double scale = std::pow(10.0, -3.0 + 3.0 * (0.5 + 0.5 * std::erf(velora::gaussian_at(seed + 1, static_cast<std::uint64_t>(i)) / std::sqrt(2.0))));
        g[i] = static_cast<float>(scale * velora::gaussian_at(seed, static_cast<std::uint64_t>(i)));
    }
    for (index_t i = zero_first; i < zero_first + zero_n && i < n; ++i) g[i] = 0;
    return g;
}

// Every block of a tensor as cuda/adam8.cuh's kernel does it, on the host: `lanes` lanes share
// the block (lane t takes elements t, t + lanes, …), all run pass 1 into shared buffers, their
// maxima are combined, then all encode. The functions are the kernel's (VELORA_HOST_DEVICE), with
// the host's exactly rounded operations. False when some block was not finite (that block's bytes
// and absmax untouched).
template <adam_row_kind K>
bool lanes_tensor(index_t lanes, const float* g, float* out, const velora::rules::adam8_tensor_state& s, const velora::rules::adamw_terms<float>& c) {
    namespace a8 = velora::rules::adam8;
    const auto& cm = velora::rules::signed_dynamic_code();
    const auto& cv = velora::rules::unsigned_dynamic_code();
    std::vector<float> nm(static_cast<std::size_t>(s.block)), nv(static_cast<std::size_t>(s.block));
    bool all_finite = true;
    for (index_t b = 0; b < s.blocks(); ++b) {
        const index_t first = b * s.block, n = s.size_of(b);
        const auto bs = s.at(b);
        a8::lane_result total;
        for (index_t t = 0; t < lanes; ++t) {
            const auto r = a8::update_lane<K, velora::cpu::scalar_ops>(cm, cv, g + first, out + first, bs, n, c, nm.data(), nv.data(), t, lanes);
            total.finite = total.finite && r.finite;
            total.max_m = std::max(total.max_m, r.max_m);
            total.max_v = std::max(total.max_v, r.max_v);
        }
        if (!total.finite) {
            all_finite = false;
            continue;
        }
        const float am = a8::stored_absmax(total.max_m), av = a8::stored_absmax(total.max_v);
        for (index_t t = 0; t < lanes; ++t) {
            a8::encode_lane(cm, nm.data(), bs.qm, t, lanes, n, am);
            a8::encode_lane(cv, nv.data(), bs.qv, t, lanes, n, av);
        }
        *bs.absmax_m = am;
        *bs.absmax_v = av;
    }
    return all_finite;
}

template <adam_row_kind K>
void run_steps(velora::cpu::adam8_body body, int threads, int steps, index_t n, index_t block, state8& s, std::vector<float>& out,
               bool torch = false) {
    for (int t = 1; t <= steps; ++t) {
        // the block [block, 2·block) stays all zero: its moments stay 0
        std::vector<float> g = gradient(n, 100 + static_cast<std::uint64_t>(t), block, block);
        const auto c = torch ? torch_terms(t) : galore_terms(t);
        REQUIRE(velora::cpu::adam8_tensor<K>(threads, g.data(), out.data(), s.view(), c, body));
    }
}

} // namespace

TEST_CASE("dynamic codes: bitsandbytes' construction, sorted, 0 and 1 exact") {
    for (const bool is_signed : {true, false}) {
        const auto& code = is_signed ? velora::rules::signed_dynamic_code() : velora::rules::unsigned_dynamic_code();
        const auto ref = reference_magnitudes(is_signed);
        REQUIRE(code.magnitudes == static_cast<int>(ref.size()));
        CHECK(code.magnitudes == (is_signed ? 128 : 256));
        for (int k = 0; k < code.magnitudes; ++k) CHECK(code.value[static_cast<std::size_t>(k)] == static_cast<float>(ref[static_cast<std::size_t>(k)]));
        for (int k = 0; k + 1 < code.magnitudes; ++k) CHECK(code.value[static_cast<std::size_t>(k)] < code.value[static_cast<std::size_t>(k + 1)]);
        CHECK(code.value[0] == 0.0f);
        CHECK(code.value[static_cast<std::size_t>(code.magnitudes - 1)] == 1.0f);
        if (is_signed)
            for (int k = 0; k < 128; ++k) CHECK(code.value[static_cast<std::size_t>(128 + k)] == -code.value[static_cast<std::size_t>(k)]);
    }
    // bitsandbytes' unsigned map's smallest non-zero value: 10^-6·(0.1 + 0.9/4) = 3.25e-7
    CHECK(velora::rules::unsigned_dynamic_code().value[1] == doctest::Approx(3.25e-7).epsilon(1e-6));
}

TEST_CASE("dynamic codes: the arithmetic encoder gives the nearest code for every sampled float in [0, 1]") {
    for (const bool is_signed : {true, false}) {
        const auto& code = is_signed ? velora::rules::signed_dynamic_code() : velora::rules::unsigned_dynamic_code();
        CHECK(code.groups == 9);
        std::uint64_t not_nearest = 0, checked = 0;
        for (std::uint32_t bits = 0; bits <= 0x3F800000u; bits += (bits < 0x3F000000u ? 61u : 1u)) {
            const float y = from_bits(bits);
            const auto k = code.nearest_magnitude(y);
            REQUIRE(k < static_cast<std::uint32_t>(code.magnitudes));
            // nearest in exact arithmetic, up to the rounding of the cell index (a fused multiply-add)
            const double d = std::fabs(static_cast<double>(y) - code.value[k]);
            const double slack = 1e-6 * static_cast<double>(y) + 1e-45;
            if (k > 0 && std::fabs(static_cast<double>(y) - code.value[k - 1]) + slack < d) ++not_nearest;
            if (static_cast<int>(k) + 1 < code.magnitudes && std::fabs(static_cast<double>(y) - code.value[k + 1]) + slack < d) ++not_nearest;
            ++checked;
        }
        CHECK(checked > 8000000);
        CHECK(not_nearest == 0);
        // every code is its own nearest
        for (int k = 0; k < code.magnitudes; ++k) CHECK(code.nearest_magnitude(code.value[static_cast<std::size_t>(k)]) == static_cast<std::uint32_t>(k));
    }
}

TEST_CASE("dynamic codes: the dequantisation error of a block stays within its bound") {
    const index_t block = 256;
    const auto g = gradient(64 * block, 7);
    for (const bool is_signed : {true, false}) {
        const auto& code = is_signed ? velora::rules::signed_dynamic_code() : velora::rules::unsigned_dynamic_code();
        double worst_ratio = 0;
        for (index_t b = 0; b < 64; ++b) {
            float absmax = 0;
            std::vector<float> x(g.begin() + b * block, g.begin() + (b + 1) * block);
            if (!is_signed)
                for (float& e : x) e = e * e;
            for (float e : x) absmax = std::max(absmax, std::fabs(e));
            for (float e : x) {
                const std::uint8_t q = code.encode(e, dynamic_code::reciprocal(absmax));
                const double err = std::fabs(static_cast<double>(code.decode(q, absmax)) - e);
                // the gap around |e|/absmax, halved; plus the roundings of y and of the product
                const double y = std::fabs(static_cast<double>(e)) / absmax;
                int k = 0;
                while (k + 2 < code.magnitudes && code.value[static_cast<std::size_t>(k + 1)] <= y) ++k;
                const double gap = static_cast<double>(code.value[static_cast<std::size_t>(k + 1)]) - code.value[static_cast<std::size_t>(k)];
                // (y = |e|·(1/absmax) and the cell index are rounded: a few units of 2^-24·y)
                const double bound = absmax * (gap / 2 + 1e-6 * y) + 1e-45;
                CHECK(err <= bound);
                worst_ratio = std::max(worst_ratio, err / bound);
                // and the block-wide bound: half the largest gap
                CHECK(err <= absmax * (code.largest_gap() / 2 + 1e-6));
            }
            // the absmax element is exact
            for (float e : x)
                if (std::fabs(e) == absmax) CHECK(code.decode(code.encode(e, dynamic_code::reciprocal(absmax)), absmax) == e);
        }
        MESSAGE(std::string(is_signed ? "signed" : "unsigned") << " code: worst error / bound = " << worst_ratio << ", largest gap " << code.largest_gap());
    }
}

TEST_CASE("dynamic codes: an absmax near the largest float encodes without overflow") {
    const auto& code = velora::rules::signed_dynamic_code();
    const float big = std::numeric_limits<float>::max(), inv = dynamic_code::reciprocal(big);
    CHECK(inv > 0.0f);   // subnormal, not zero
    CHECK(code.encode(big, inv) == 127);
    CHECK(code.encode(-big, inv) == 255);
    CHECK(code.decode(255, big) == -big);
    CHECK(code.encode(big / 2, inv) == code.nearest_magnitude(0.5f));
    CHECK(code.encode(0.0f, 1.0f) == 0);
    CHECK(code.encode(-0.0f, 1.0f) == 0);    // no negative zero byte
    CHECK(code.encode(-1e-9f, 1.0f) == 0);   // below the smallest magnitude's midpoint
}

TEST_CASE("adam8: huge and subnormal moments (absmax overflow and underflow)") {
    const index_t n = 64;
    for (const auto body : {velora::cpu::adam8_body::scalar, velora::cpu::adam8_body::avx2, velora::cpu::adam8_body::avx512}) {
        state8 s(n, n);
        std::vector<float> w(n, 0.0f), g(n, 1e19f);   // v = (1 - β₂)·g² = 1e35: finite, its reciprocal is normal
        g[3] = -1.8e19f;
        auto c = galore_terms(1);
        c.c1 = 1.0f;   // m = g exactly
        c.decay = 1.0f;
        REQUIRE(velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(1, g.data(), w.data(), s.view(), c, body));
        CHECK(s.am[0] == 1.8e19f);
        CHECK(s.qm[3] == 255);   // −absmax, exact
        CHECK(velora::rules::signed_dynamic_code().decode(s.qm[0], s.am[0]) == doctest::Approx(1e19).epsilon(0.01));
        // moments below the smallest normal float: the block is stored as zeros
        state8 t(n, n);
        std::vector<float> tiny(n, 1e-39f);
        REQUIRE(velora::cpu::adam8_tensor<adam_row_kind::moments>(1, tiny.data(), w.data(), t.view(), c, body));
        CHECK(t.am[0] == 0.0f);
        CHECK(t.av[0] == 0.0f);
        for (index_t i = 0; i < n; ++i) CHECK((t.qm[i] | t.qv[i]) == 0);
    }
}

TEST_CASE_TEMPLATE("adam8: the AVX-512, AVX2 and scalar bodies give the same bits", Kind, std::integral_constant<int, 0>, std::integral_constant<int, 1>,
                   std::integral_constant<int, 2>) {
    using velora::cpu::adam8_body;
    constexpr adam_row_kind K = Kind::value == 0 ? adam_row_kind::galore_weight : Kind::value == 1 ? adam_row_kind::torch_weight : adam_row_kind::moments;
    MESSAGE("bodies compiled: avx512 " << velora::cpu::adam8_has_avx512 << ", avx2 " << velora::cpu::adam8_has_avx2);
    // A target with the instructions compiles the body (cpu/adam8.hpp): a -march=native build on
    // an AVX2 or AVX-512 machine must compare at least one vector body with the scalar one, not
    // pass by comparing nothing.
#if defined(__AVX512F__)
    CHECK(velora::cpu::adam8_has_avx512);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    CHECK(velora::cpu::adam8_has_avx2);
#endif
    int compared = 0;
    // last blocks of 37 (two packets and a scalar tail) and 100 (a 64-element chunk, two packets
    // and a tail: every path of the AVX-512 body's decode and encode)
    for (const auto& [block, tail] : {std::pair<index_t, index_t>{64, 37}, {256, 37}, {256, 100}, {2048, 37}, {2048, 100}}) {
        const index_t n = 5 * block + tail;
        const auto w0 = gradient(n, 3);
        state8 ref(n, block);
        std::vector<float> w_ref = w0;
        run_steps<K>(adam8_body::scalar, 1, 4, n, block, ref, w_ref, K == adam_row_kind::torch_weight);
        for (const adam8_body body : {adam8_body::avx2, adam8_body::avx512}) {
            if (body == adam8_body::avx2 && !velora::cpu::adam8_has_avx2) continue;
            if (body == adam8_body::avx512 && !velora::cpu::adam8_has_avx512) continue;
            state8 s(n, block);
            std::vector<float> w = w0;
            run_steps<K>(body, 1, 4, n, block, s, w, K == adam_row_kind::torch_weight);
            CHECK(s == ref);
            CHECK(std::memcmp(w.data(), w_ref.data(), sizeof(float) * static_cast<std::size_t>(n)) == 0);
            ++compared;
        }
        // the all-zero block kept absmax 0 and zero bytes
        CHECK(ref.am[1] == 0.0f);
        CHECK(ref.av[1] == 0.0f);
        for (index_t i = block; i < 2 * block; ++i) CHECK((ref.qm[i] | ref.qv[i]) == 0);
        CHECK(ref.am[0] > 0.0f);
    }
    MESSAGE("vector bodies compared with the scalar one: " << compared / 5 << " (avx512 " << velora::cpu::adam8_has_avx512 << ", avx2 "
                                                            << velora::cpu::adam8_has_avx2 << ")");
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    REQUIRE(compared > 0);
#endif
}

TEST_CASE("adam8: the same bits at 1 and 2 threads") {
    const index_t n = (index_t{1} << 17) + 5, block = 256;
    state8 one(n, block), two(n, block);
    std::vector<float> w1 = gradient(n, 4), w2 = w1;
    run_steps<adam_row_kind::galore_weight>(velora::cpu::adam8_body::avx512, 1, 3, n, block, one, w1);
    run_steps<adam_row_kind::galore_weight>(velora::cpu::adam8_body::avx512, 2, 3, n, block, two, w2);
    CHECK(one == two);
    CHECK(std::memcmp(w1.data(), w2.data(), sizeof(float) * static_cast<std::size_t>(n)) == 0);
}

TEST_CASE("adam8: close to the float update (the moments' quantisation error only), per block size") {
    // gradients whose scale varies over three decades from element to element
    const index_t n = 64 * 2048;
    for (const index_t block : {index_t{64}, index_t{256}, index_t{2048}, index_t{4096}}) {
        state8 s(n, block);
        std::vector<float> w8 = gradient(n, 5), w32 = w8, m(n, 0.0f), v(n, 0.0f);
        const std::vector<float> w0 = w8;
        for (int t = 1; t <= 10; ++t) {
            const auto g = gradient(n, 200 + static_cast<std::uint64_t>(t));
            const auto c = galore_terms(t);
            REQUIRE(velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(1, g.data(), w8.data(), s.view(), c));
            velora::cpu::adam_row<adam_row_kind::galore_weight>(g.data(), m.data(), v.data(), w32.data(), n, c);
        }
        double diff = 0, moved = 0;
        for (index_t i = 0; i < n; ++i) {
            diff += std::fabs(static_cast<double>(w8[i]) - w32[i]);
            moved += std::fabs(static_cast<double>(w32[i]) - w0[i]);
        }
        MESSAGE("block " << block << ", after 10 steps: mean |w8 - w32| / mean |w32 - w0| = " << diff / moved);
        CHECK(diff / moved < 0.035);   // measured 0.020 (64) to 0.028 (4096)
    }
}

TEST_CASE("adam8: a non-finite result is reported (the caller discards what was written)") {
    const index_t n = 300, block = 64;
    state8 s(n, block);
    std::vector<float> w(n, 1.0f), g(n, 0.5f);
    const auto c = galore_terms(1);
    REQUIRE(velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(1, g.data(), w.data(), s.view(), c));
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), 3e19f /* g² overflows */}) {
        for (const auto body : {velora::cpu::adam8_body::scalar, velora::cpu::adam8_body::avx2, velora::cpu::adam8_body::avx512}) {
            std::vector<float> gb = g, wb = w;
            state8 sb = s;
            gb[70] = bad;   // a packet element
            CHECK_FALSE(velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(1, gb.data(), wb.data(), sb.view(), c, body));
            gb[70] = 0.5f;
            gb[299] = bad;   // a tail element
            wb = w;
            sb = s;
            CHECK_FALSE(velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(1, gb.data(), wb.data(), sb.view(), c, body));
        }
    }
}

TEST_CASE("adam8: the Eigen backend's adam8_update refuses a block outside [1, adam8_max_block], naming the values, and changes nothing") {
    velora::eigen_backend<float> backend(1);
    const index_t n = 300;
    state8 s(n, 64);
    std::vector<float> w(n, 1.0f);
    const std::vector<float> g = gradient(n, 6);
    const auto c = galore_terms(1);
    REQUIRE(backend.adam8_update(adam_row_kind::galore_weight, g.data(), w.data(), s.view(), c));   // moments not all zero
    for (const index_t bad : {index_t{0}, index_t{-64}, velora::rules::adam8_max_block + 1, 2 * velora::rules::adam8_max_block}) {
        for (const adam_row_kind kind : {adam_row_kind::galore_weight, adam_row_kind::torch_weight, adam_row_kind::moments}) {
            state8 sb = s;
            std::vector<float> wb = w;
            auto view = sb.view();
            view.block = bad;
            const std::string message = test::invalid_argument_message([&] { (void)backend.adam8_update(kind, g.data(), wb.data(), view, c); });
            INFO(message);
            CHECK(message.find("velora::eigen_backend::adam8_update") != std::string::npos);
            CHECK(message.find("block = " + std::to_string(bad)) != std::string::npos);
            CHECK(message.find("[1, " + std::to_string(velora::rules::adam8_max_block) + "]") != std::string::npos);
            CHECK(sb == s);
            CHECK(wb == w);
        }
    }
    // the ends of the range are taken: blocks of 1 and of adam8_max_block
    for (const index_t block : {index_t{1}, velora::rules::adam8_max_block}) {
        const index_t count = block == 1 ? 5 : block + 3;
        state8 sb(count, block);
        std::vector<float> wb(count, 1.0f);
        const std::vector<float> gb = gradient(count, 7);
        CHECK(backend.adam8_update(adam_row_kind::galore_weight, gb.data(), wb.data(), sb.view(), c));
        CHECK(wb != std::vector<float>(count, 1.0f));
    }
}

TEST_CASE_TEMPLATE("adam8: the block split into lanes as the CUDA kernel runs it gives the CPU bodies' bits", Kind, std::integral_constant<int, 0>,
                   std::integral_constant<int, 1>, std::integral_constant<int, 2>) {
    constexpr adam_row_kind K = Kind::value == 0 ? adam_row_kind::galore_weight : Kind::value == 1 ? adam_row_kind::torch_weight : adam_row_kind::moments;
    const bool torch = K == adam_row_kind::torch_weight;
    // a partial last block (tail), the all-zero block [block, 2·block) of run_steps' gradients
    for (const auto& [block, tail] : {std::pair<index_t, index_t>{64, 37}, {256, 100}, {4096, 1000}}) {
        const index_t n = 5 * block + tail;
        const auto w0 = gradient(n, 9);
        state8 ref(n, block);
        std::vector<float> w_ref = w0;
        run_steps<K>(velora::cpu::adam8_body{}, 1, 4, n, block, ref, w_ref, torch);   // the widest body
        for (const index_t lanes : {index_t{1}, index_t{3}, index_t{256}}) {
            state8 s(n, block);
            std::vector<float> w = w0;
            for (int t = 1; t <= 4; ++t) {
                const std::vector<float> g = gradient(n, 100 + static_cast<std::uint64_t>(t), block, block);
                REQUIRE(lanes_tensor<K>(lanes, g.data(), w.data(), s.view(), torch ? torch_terms(t) : galore_terms(t)));
            }
            CHECK(s == ref);
            CHECK(std::memcmp(w.data(), w_ref.data(), sizeof(float) * static_cast<std::size_t>(n)) == 0);
        }
        CHECK(ref.am[1] == 0.0f);   // the all-zero block
        CHECK(ref.av[1] == 0.0f);
    }
}

TEST_CASE("adam8: lanes as the CUDA kernel runs them: absmax overflow and underflow, non-finite results") {
    const index_t n = 600, block = 256;
    auto c = galore_terms(1);
    c.c1 = 1.0f;   // m = g exactly
    c.decay = 1.0f;
    // huge (v = 1e35, its reciprocal normal; −absmax exact) and subnormal (stored as zeros) blocks
    std::vector<float> g(n, 1e19f);
    g[3] = -1.8e19f;
    for (index_t i = block; i < 2 * block; ++i) g[i] = 1e-39f;
    state8 ref(n, block), lanes(n, block);
    std::vector<float> w_ref(n, 0.0f), w(n, 0.0f);
    REQUIRE(velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(1, g.data(), w_ref.data(), ref.view(), c, velora::cpu::adam8_body::scalar));
    REQUIRE(lanes_tensor<adam_row_kind::galore_weight>(256, g.data(), w.data(), lanes.view(), c));
    CHECK(lanes == ref);
    CHECK(std::memcmp(w.data(), w_ref.data(), sizeof(float) * static_cast<std::size_t>(n)) == 0);
    CHECK(ref.am[0] == 1.8e19f);
    CHECK(ref.qm[3] == 255);
    CHECK(ref.am[1] == 0.0f);
    // NaN, Inf, g² overflowing in one element of the last block: false, that block's bytes and
    // absmax untouched, the other blocks updated as the scalar body updates them
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), 3e19f}) {
        std::vector<float> gb(n, 0.5f);
        gb[599] = bad;
        const auto before = lanes;
        state8 sb = lanes, sr = ref;
        std::vector<float> wb(n, 1.0f), wr(n, 1.0f);
        CHECK_FALSE(lanes_tensor<adam_row_kind::galore_weight>(256, gb.data(), wb.data(), sb.view(), galore_terms(2)));
        CHECK_FALSE(velora::cpu::adam8_tensor<adam_row_kind::galore_weight>(1, gb.data(), wr.data(), sr.view(), galore_terms(2),
                                                                               velora::cpu::adam8_body::scalar));
        CHECK(sb.am[2] == before.am[2]);
        CHECK(sb.av[2] == before.av[2]);
        CHECK(std::equal(sb.qm.begin() + 2 * block, sb.qm.end(), before.qm.begin() + 2 * block));
        CHECK(sb.am[0] == sr.am[0]);
        CHECK(std::equal(sb.qm.begin(), sb.qm.begin() + 2 * block, sr.qm.begin()));
        CHECK(std::equal(sb.qv.begin(), sb.qv.begin() + 2 * block, sr.qv.begin()));
        CHECK(std::memcmp(wb.data(), wr.data(), sizeof(float) * 2 * block) == 0);
    }
}
