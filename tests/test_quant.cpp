// Frozen base weights stored narrow (quant/): QLoRA's NF4 against an independent scalar
// implementation of its published algorithm written here, the round-trip error bound, double
// quantisation, the products through NF4 and bf16/f16 bases against dequantise-then-dense-GEMM,
// storage and workspace figures, bad input, and the state blob (round trip, corruption).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/backend/eigen.hpp>
#include <velora/finetune/frozen_weight.hpp>
#include <velora/quant/half_weight.hpp>
#include <velora/quant/nf4.hpp>
#include <velora/quant/nf4_frozen_weight.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"

using velora::index_t;

namespace {

// ------------------------------------------------------------------ the independent reference
// QLoRA (Dettmers et al. 2023, §3 and Appendix): the NF4 values as published (bitsandbytes'
// table, typed here from the paper's code listing, not taken from the library).
constexpr double qlora_nf4[16] = {-1.0,
                                  -0.6961928009986877,
                                  -0.5250730514526367,
                                  -0.39491748809814453,
                                  -0.28444138169288635,
                                  -0.18477343022823334,
                                  -0.09105003625154495,
                                  0.0,
                                  0.07958029955625534,
                                  0.16093020141124725,
                                  0.24611230194568634,
                                  0.33791524171829224,
                                  0.44070982933044434,
                                  0.5626170039176941,
                                  0.7229568362236023,
                                  1.0};
// bitsandbytes' dQuantizeNF4 decision-tree literals, lowest first.
constexpr double bnb_thresholds[15] = {-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                                       -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                                       0.1202552504837513,  0.2035212516784668,  0.2920137718319893,  0.3893125355243683,
                                       0.5016634166240692,  0.6427869200706482,  0.8614784181118011};

// The published algorithm, scalar and in double: blocks of `block` consecutive weights (row-major,
// flattened), absmax = max |w|, x = w / absmax, the nearest code (ties to the lower one).
struct reference_nf4 {
    std::vector<int> codes;       // one per weight, unpacked
    std::vector<double> absmax;   // one per block
    std::vector<double> x;        // the normalised values
};

reference_nf4 reference_quantize(const std::vector<float>& w, index_t block) {
    reference_nf4 r;
    const auto n = static_cast<index_t>(w.size());
    for (index_t b = 0; b < n / block; ++b) {
        double a = 0;
        for (index_t j = 0; j < block; ++j) a = std::max(a, std::abs(static_cast<double>(w[static_cast<std::size_t>(b * block + j)])));
        r.absmax.push_back(a);
        for (index_t j = 0; j < block; ++j) {
            const double x = a == 0 ? 0.0 : static_cast<double>(w[static_cast<std::size_t>(b * block + j)]) / a;
            int best = 0;
            for (int c = 1; c < 16; ++c)
                if (std::abs(x - qlora_nf4[c]) < std::abs(x - qlora_nf4[best])) best = c;   // strict: ties stay lower
            r.codes.push_back(best);
            r.x.push_back(x);
        }
    }
    return r;
}

// The nibble of weight i in the packed bytes, by the documented order (high nibble first).
int unpack(std::span<const std::uint8_t> bytes, std::size_t i) { return i % 2 == 0 ? bytes[i / 2] >> 4 : bytes[i / 2] & 0x0f; }

// Test weights: Gaussian rows with varied scales, one all-zero block, one single-spike block,
// one block of huge values (reciprocal subnormal) and one of subnormal values (reciprocal inf).
std::vector<float> test_weight(index_t rows, index_t cols, index_t block, std::uint64_t seed, bool extremes = true) {
    auto w = test::data<float>(static_cast<std::size_t>(rows * cols), seed);
    for (index_t r = 0; r < rows; ++r)
        for (index_t c = 0; c < cols; ++c) w[static_cast<std::size_t>(r * cols + c)] *= static_cast<float>(0.02 * (1 + r % 5));
    if (extremes && rows * cols >= 5 * block) {
        std::fill_n(w.begin(), block, 0.0f);
        std::fill_n(w.begin() + block, block, 0.0f);
        w[static_cast<std::size_t>(block + 3)] = -0.5f;
        for (index_t j = 0; j < block; ++j) w[static_cast<std::size_t>(2 * block + j)] *= 1e38f;
        for (index_t j = 0; j < block; ++j) w[static_cast<std::size_t>(3 * block + j)] *= 1e-39f;
    }
    return w;
}

// 8-bit linear double quantisation as documented (nf4.hpp), written out independently.
struct reference_dq {
    float mean;
    std::vector<int> codes;
    std::vector<float> scales;
};
reference_dq reference_double_quantize(const std::vector<float>& absmax) {
    reference_dq d;
    double sum = 0;
    for (float a : absmax) sum += a;
    d.mean = static_cast<float>(sum / static_cast<double>(absmax.size()));
    for (std::size_t first = 0; first < absmax.size(); first += 256) {
        const std::size_t last = std::min(absmax.size(), first + 256);
        double m = 0;
        for (std::size_t b = first; b < last; ++b) m = std::max(m, std::abs(double(absmax[b]) - d.mean));
        const float s = static_cast<float>(m / 127);
        d.scales.push_back(s);
        for (std::size_t b = first; b < last; ++b) {
            double q = s == 0 ? 0.0 : std::nearbyint((double(absmax[b]) - d.mean) / s);
            d.codes.push_back(static_cast<int>(std::clamp(q, -127.0, 127.0)));
        }
    }
    return d;
}

template <class T>
double naive_abs_dot(const T* a, index_t sa, const T* b, index_t sb, index_t k) {
    double s = 0;
    for (index_t i = 0; i < k; ++i) s += std::abs(double(a[i * sa])) * std::abs(double(b[i * sb]));
    return s;
}

std::string message_of(auto&& f) { return test::invalid_argument_message(f); }

} // namespace

// ================================================================== code table and quantisation
TEST_CASE("the NF4 code table and thresholds are QLoRA's and bitsandbytes'") {
    for (unsigned i = 0; i < 16; ++i) {
        CHECK(velora::nf4_code_table[i] == static_cast<float>(qlora_nf4[i]));
        CHECK(double(velora::nf4_code_table[i]) == qlora_nf4[i]);   // the published values are floats
        CHECK(velora::nf4_code(i) == velora::nf4_code_table[i]);
    }
    for (unsigned i = 0; i < 15; ++i) {
        CHECK(velora::nf4_thresholds[i] == static_cast<float>(bnb_thresholds[i]));
        CHECK(bnb_thresholds[i] == (qlora_nf4[i] + qlora_nf4[i + 1]) / 2);   // the literals are the exact midpoints
        // A value on a float threshold goes to the lower code; the next float up to the upper one.
        const float t = velora::nf4_thresholds[i];
        CHECK(velora::nf4_quantize_value(t) == i);
        CHECK(velora::nf4_quantize_value(std::nextafter(t, 2.0f)) == i + 1);
    }
    CHECK(velora::nf4_quantize_value(-1.0f) == 0);
    CHECK(velora::nf4_quantize_value(1.0f) == 15);
    CHECK(velora::nf4_quantize_value(0.0f) == 7);
    CHECK(velora::nf4_quantize_value(-0.0f) == 7);
    CHECK(velora::nf4_max_half_gap == doctest::Approx((1.0 - 0.6961928009986877) / 2).epsilon(1e-15));   // between -1 and the next code
}

TEST_CASE("nf4_weight::quantize equals the independent implementation of QLoRA's algorithm") {
    for (auto [rows, cols, block] : {std::tuple<index_t, index_t, index_t>{37, 192, 64}, {12, 96, 32}, {5, 8, 2}, {300, 128, 16}}) {
        CAPTURE(rows);
        CAPTURE(cols);
        CAPTURE(block);
        const auto w = test_weight(rows, cols, block, 11 + static_cast<std::uint64_t>(rows));
        const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = block});
        const auto ref = reference_quantize(w, block);
        REQUIRE(q.codes().size() == w.size() / 2);
        REQUIRE(q.absmax().size() == ref.absmax.size());
        for (std::size_t b = 0; b < ref.absmax.size(); ++b) CHECK(double(q.absmax()[b]) == ref.absmax[b]);
        // Codes: equal, except where x lies within a few float ulps of a midpoint (the library
        // multiplies by the float reciprocal and compares with float thresholds, as bitsandbytes).
        int near_midpoint = 0;
        for (std::size_t i = 0; i < w.size(); ++i) {
            const int got = unpack(q.codes(), i), want = ref.codes[i];
            if (got == want) continue;
            const int lo = std::min(got, want);
            const double m = (qlora_nf4[lo] + qlora_nf4[lo + 1]) / 2;
            CHECK(std::abs(got - want) == 1);
            CHECK(std::abs(ref.x[i] - m) <= 4 * std::ldexp(1.0, -24));
            ++near_midpoint;
        }
        CHECK(near_midpoint <= 2);
        // Dequantised values: code · absmax, one float rounding from the exact product.
        std::vector<double> wd(w.size());
        q.dequantize_rows(0, velora::make_view(wd.data(), rows, cols));
        for (std::size_t i = 0; i < w.size(); ++i) {
            const double exact = qlora_nf4[unpack(q.codes(), i)] * ref.absmax[i / static_cast<std::size_t>(block)];
            CHECK(wd[i] == double(static_cast<float>(exact)));
        }
        // Whole-block cases: the all-zero block is code 7 throughout and absmax 0.
        if (rows * cols >= 5 * block) {
            CHECK(q.absmax()[0] == 0.0f);
            for (index_t j = 0; j < block; ++j) CHECK(unpack(q.codes(), static_cast<std::size_t>(j)) == 7);
            CHECK(unpack(q.codes(), static_cast<std::size_t>(block + 3)) == 0);   // the spike -0.5 is -absmax
        }
        // A tile of rows dequantises alone to the same values.
        const index_t first = rows / 2, count = rows - first;
        std::vector<float> tile(static_cast<std::size_t>(count * cols));
        q.dequantize_rows(first, velora::make_view(tile.data(), count, cols));
        for (std::size_t i = 0; i < tile.size(); ++i) CHECK(double(tile[i]) == wd[static_cast<std::size_t>(first * cols) + i]);
    }
}

TEST_CASE("NF4 round trip error: |w - w^| <= absmax * max half gap (plus the double-quantised absmax error)") {
    const index_t rows = 300, cols = 128, block = 16;   // 2400 blocks: 10 double-quantisation groups
    for (bool extremes : {true, false})
        for (bool dq : {false, true}) {
            CAPTURE(extremes);
            CAPTURE(dq);
            const auto w = test_weight(rows, cols, block, 5, extremes);
            const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = block, .double_quant = dq});
            const auto plain = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = block});
            std::vector<float> wd(w.size());
            q.dequantize_rows(0, velora::make_view(wd.data(), rows, cols));
            double worst = 0, worst_absmax_error = 0;
            for (std::size_t i = 0; i < w.size(); ++i) {
                const auto b = static_cast<index_t>(i) / block;
                const double a = plain.absmax()[static_cast<std::size_t>(b)];
                const double absmax_error = std::abs(a - double(q.block_absmax(b)));
                if (a > 0) worst_absmax_error = std::max(worst_absmax_error, absmax_error / a);
                // |w - c·a'| <= |w - c·a| + |c|·|a - a'| <= a·g + |a - a'|, each with a float rounding.
                const double bound = (a * velora::nf4_max_half_gap + absmax_error) * (1 + 1e-6) + 1e-45;
                CHECK(std::abs(double(w[i]) - double(wd[i])) <= bound);
                if (a > 0) worst = std::max(worst, std::abs(double(w[i]) - double(wd[i])) / a);
            }
            if (!dq) {
                CHECK(worst <= velora::nf4_max_half_gap * (1 + 1e-6));
                CHECK(worst_absmax_error == 0.0);
            }
            MESSAGE(std::string(extremes ? "weights with extreme blocks (1e38, 1e-39, zero)" : "Gaussian weights") << ", NF4 block " << block
                    << std::string(dq ? " double-quantised" : "") << ": max |w - w^| / absmax = " << worst << " (bound without double quantisation "
                    << velora::nf4_max_half_gap << "), max |a - a'| / a = " << worst_absmax_error);
        }
}

TEST_CASE("double quantisation: codes, scales and mean as documented, and the absmax error bound") {
    const index_t rows = 300, cols = 128, block = 16;
    const auto w = test_weight(rows, cols, block, 9);
    const auto plain = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = block});
    const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = block, .double_quant = true});
    CHECK(q.double_quantized());
    CHECK(q.absmax().empty());
    CHECK(std::equal(q.codes().begin(), q.codes().end(), plain.codes().begin(), plain.codes().end()));   // the 4-bit codes do not change
    const std::vector<float> absmax(plain.absmax().begin(), plain.absmax().end());
    const auto ref = reference_double_quantize(absmax);
    CHECK(q.absmax_mean() == ref.mean);
    REQUIRE(q.absmax_groups() == 10);
    for (std::size_t g = 0; g < ref.scales.size(); ++g) CHECK(q.absmax_scales()[g] == ref.scales[g]);
    for (std::size_t b = 0; b < absmax.size(); ++b) {
        CHECK(int(q.absmax_codes()[b]) == ref.codes[b]);
        const float s = ref.scales[b / 256];
        const double rebuilt = std::max(0.0f, std::fma(float(ref.codes[b]), s, ref.mean));
        CHECK(double(q.block_absmax(static_cast<index_t>(b))) == rebuilt);
        CHECK(std::abs(double(absmax[b]) - rebuilt) <= s / 2.0 * (1 + 1e-6) + std::abs(double(absmax[b])) * 1e-7);
    }
}

// ================================================================== products through frozen bases
namespace {

template <class T, class Frozen, class Dense>
void check_products(velora::eigen_backend<T>& b, const Frozen& frozen, const Dense& w_hat, index_t tokens, std::uint64_t seed) {
    const index_t rows = frozen.rows(), cols = frozen.cols();
    const auto x = test::data<T>(static_cast<std::size_t>(tokens * cols), seed);
    const auto dy = test::data<T>(static_cast<std::size_t>(tokens * rows), seed + 1);
    std::vector<T> ws(frozen.workspace_elements()), y(static_cast<std::size_t>(tokens * rows)), dx(static_cast<std::size_t>(tokens * cols));
    std::vector<T> y_ref(y.size()), dx_ref(dx.size());
    const auto xv = velora::make_view<const T>(x.data(), tokens, cols);
    const auto dyv = velora::make_view<const T>(dy.data(), tokens, rows);
    const auto wv = velora::make_view<const T>(w_hat.data(), rows, cols);
    frozen.forward(b, xv, velora::make_view(y.data(), tokens, rows), std::span<T>(ws));
    frozen.input_grad(b, dyv, velora::make_view(dx.data(), tokens, cols), std::span<T>(ws));
    b.gemm(velora::op::none, velora::op::transpose, T(1), xv, wv, T(0), velora::make_view(y_ref.data(), tokens, rows));
    b.gemm(velora::op::none, velora::op::none, T(1), dyv, wv, T(0), velora::make_view(dx_ref.data(), tokens, cols));
    // Both sides compute the same exact products (the tiles hold W^'s values exactly) and differ
    // only in summation order: each is within K·u·Σ|a||b| (u = ε/2) of the exact sum, K the
    // inner length, plus one rounding per extra tile on the input gradient's side.
    const double eps = std::numeric_limits<T>::epsilon();
    const index_t tiles = (rows + frozen.tile_rows() - 1) / frozen.tile_rows();
    for (index_t t = 0; t < tokens; ++t) {
        for (index_t o = 0; o < rows; ++o) {
            const double scale = naive_abs_dot(x.data() + t * cols, 1, w_hat.data() + o * cols, 1, cols);
            CHECK(std::abs(double(y[t * rows + o]) - double(y_ref[t * rows + o])) <= double(cols) * eps * scale + 1e-300);
        }
        for (index_t c = 0; c < cols; ++c) {
            const double scale = naive_abs_dot(dy.data() + t * rows, 1, w_hat.data() + c, cols, rows);
            CHECK(std::abs(double(dx[t * cols + c]) - double(dx_ref[t * cols + c])) <= double(rows + tiles) * eps * scale + 1e-300);
        }
    }
}

} // namespace

static_assert(velora::frozen_weight<velora::nf4_frozen_weight<velora::eigen_backend<float>>>);
static_assert(velora::frozen_weight<velora::nf4_frozen_weight<velora::eigen_backend<double>>>);
static_assert(velora::frozen_weight<velora::bf16_frozen_weight<velora::eigen_backend<float>>>);
static_assert(velora::frozen_weight<velora::f16_frozen_weight<velora::eigen_backend<double>>>);
static_assert(velora::nf4_kernels<velora::eigen_backend<float>>);

TEST_CASE_TEMPLATE("forward and dX through an NF4 base equal dequantise-then-dense-GEMM, across tile boundaries", T, float, double) {
    velora::eigen_backend<T> b;
    for (auto engine : test::gemm_engines())
    for (auto [rows, cols, block, dq] : {std::tuple<index_t, index_t, index_t, bool>{37, 192, 64, false}, {37, 192, 64, true},
                                         {300, 128, 16, true}, {9, 64, 64, false}}) {
        CAPTURE(int(engine));
        CAPTURE(rows);
        CAPTURE(cols);
        CAPTURE(dq);
        b.set_gemm_engine(engine);
        const auto w = test_weight(rows, cols, block, 21);
        const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = block, .double_quant = dq});
        std::vector<T> w_hat(w.size());   // the test's dense copy, the reference
        q.dequantize_rows(0, velora::make_view(w_hat.data(), rows, cols));
        for (index_t tile : {index_t{0}, index_t{1}, index_t{5}, rows}) {
            CAPTURE(tile);
            const velora::nf4_frozen_weight<velora::eigen_backend<T>> frozen(b, q, tile);
            CHECK(frozen.workspace_elements() == static_cast<std::size_t>(frozen.tile_rows() * cols));
            CHECK(frozen.stored_bytes() == q.stored_bytes());
            check_products(b, frozen, w_hat, 7, 100 + static_cast<std::uint64_t>(tile));
        }
    }
}

TEST_CASE_TEMPLATE("forward and dX through bf16 and f16 bases equal widen-then-dense-GEMM", T, float, double) {
    velora::eigen_backend<T> b;
    const index_t rows = 23, cols = 50;
    const auto w = test_weight(rows, cols, 64, 3, false);
    const auto bf = velora::bf16_weight::quantize(velora::make_view(w.data(), rows, cols));
    const auto hf = velora::f16_weight::quantize(velora::make_view(w.data(), rows, cols));
    std::vector<T> bf_hat(w.size()), hf_hat(w.size());
    bf.dequantize_rows(0, velora::make_view(bf_hat.data(), rows, cols));
    hf.dequantize_rows(0, velora::make_view(hf_hat.data(), rows, cols));
    for (std::size_t i = 0; i < w.size(); ++i) {   // round to nearest even: within half an ulp of the 16-bit format
        CHECK(std::abs(double(bf_hat[i]) - w[i]) <= std::abs(double(w[i])) * std::ldexp(1.0, -8));
        CHECK(double(bf_hat[i]) == double(velora::detail::bfloat16_bits_to_float(velora::detail::float_to_bfloat16_bits(w[i]))));
        CHECK(double(hf_hat[i]) == double(velora::detail::half_bits_to_float(velora::detail::float_to_half_bits(w[i]))));
    }
    CHECK(bf.stored_bytes() == static_cast<std::size_t>(rows * cols * 2));
    CHECK(bf.bits_per_weight() == 16.0);
    for (index_t tile : {index_t{0}, index_t{1}, index_t{4}}) {
        const velora::bf16_frozen_weight<velora::eigen_backend<T>> fb(b, bf, tile);
        const velora::f16_frozen_weight<velora::eigen_backend<T>> fh(b, hf, tile);
        CHECK(fb.stored_bytes() == bf.stored_bytes());
        check_products(b, fb, bf_hat, 6, 7);
        check_products(b, fh, hf_hat, 6, 8);
    }
}

#if defined(_OPENMP)
TEST_CASE("NF4 products: the same bits at 1 and 2 threads") {
    const index_t rows = 300, cols = 128;
    const auto w = test_weight(rows, cols, 16, 2);
    const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = 16, .double_quant = true});
    std::vector<std::vector<float>> outputs;
    for (int threads : {1, 2}) {
        velora::eigen_backend<float> b(threads);
        const velora::nf4_frozen_weight<velora::eigen_backend<float>> f(b, q, 64);
        const auto x = test::data<float>(static_cast<std::size_t>(33 * cols), 4);
        const auto dy = test::data<float>(static_cast<std::size_t>(33 * rows), 5);
        std::vector<float> ws(f.workspace_elements()), y(static_cast<std::size_t>(33 * rows)), dx(static_cast<std::size_t>(33 * cols));
        f.forward(b, velora::make_view(x.data(), 33, cols), velora::make_view(y.data(), 33, rows), std::span<float>(ws));
        f.input_grad(b, velora::make_view(dy.data(), 33, rows), velora::make_view(dx.data(), 33, cols), std::span<float>(ws));
        y.insert(y.end(), dx.begin(), dx.end());
        outputs.push_back(std::move(y));
    }
    CHECK(std::memcmp(outputs[0].data(), outputs[1].data(), outputs[0].size() * sizeof(float)) == 0);
}
#endif

// ================================================================== storage and workspace figures
TEST_CASE("stored bytes and bits per weight follow the formula") {
    using velora::nf4_weight;
    const index_t rows = 64, cols = 4096;
    const auto w = test::data<float>(static_cast<std::size_t>(rows * cols), 17);
    for (bool dq : {false, true}) {
        const auto q = nf4_weight::quantize(velora::make_view(w.data(), rows, cols), {.block_size = 64, .double_quant = dq});
        const std::size_t n = static_cast<std::size_t>(rows * cols), blocks = n / 64;
        const std::size_t expected = dq ? n / 2 + blocks + 4 * ((blocks + 255) / 256) + 4 : n / 2 + 4 * blocks;
        CHECK(q.stored_bytes() == expected);
        CHECK(q.stored_bytes() == nf4_weight::stored_bytes_for(rows, cols, {.block_size = 64, .double_quant = dq}));
        CHECK(q.bits_per_weight() == doctest::Approx(8.0 * double(expected) / double(n)).epsilon(1e-15));
        MESSAGE("NF4 " << rows << "x" << cols << std::string(dq ? " double-quantised: " : ": ") << q.stored_bytes() << " bytes, " << q.bits_per_weight()
                       << " bits per weight (float32: 32)");
    }
    // The figures at 4096 x 4096 from the formula (the same code path as stored_bytes()).
    const auto plain = nf4_weight::stored_bytes_for(4096, 4096, {.block_size = 64});
    const auto dq = nf4_weight::stored_bytes_for(4096, 4096, {.block_size = 64, .double_quant = true});
    CHECK(plain == 8388608u + 4u * 262144u);
    CHECK(dq == 8388608u + 262144u + 4u * 1024u + 4u);
    const double bpw_dq = 8.0 * double(dq) / (4096.0 * 4096.0);
    CHECK(bpw_dq == doctest::Approx(4.0 + 8.0 / 64 + 32.0 / (64 * 256) + 32.0 / (4096.0 * 4096.0)).epsilon(1e-15));
    CHECK(bpw_dq < 4.128);
    MESSAGE("NF4 4096x4096 (block 64): " << plain << " bytes = " << 8.0 * double(plain) / (4096.0 * 4096.0) << " bits per weight; "
                                          << "double-quantised " << dq << " bytes = " << bpw_dq << " bits per weight");
}

TEST_CASE("the workspace is one tile, bounded and independent of the number of rows") {
    velora::eigen_backend<float> b;
    // Wide enough rows that a weight of a few hundred rows spans several default tiles.
    const index_t cols = 16384;
    std::size_t first = 0;
    for (index_t rows : {index_t{2} * velora::frozen_tile_values / cols + 3, index_t{4} * velora::frozen_tile_values / cols}) {
        const auto w = test::data<float>(static_cast<std::size_t>(rows * cols), 1);
        const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), rows, cols));
        const velora::nf4_frozen_weight<velora::eigen_backend<float>> f(b, q);
        CHECK(f.tile_rows() == velora::frozen_tile_values / cols);
        CHECK(f.workspace_elements() == static_cast<std::size_t>(velora::frozen_tile_values));
        if (first == 0) first = f.workspace_elements();
        CHECK(f.workspace_elements() == first);
    }
    // A row longer than the default tile: one row per tile.
    const index_t long_row = velora::frozen_tile_values + 64;
    const auto w = test::data<float>(static_cast<std::size_t>(2 * long_row), 1);
    const auto q = velora::nf4_weight::quantize(velora::make_view(w.data(), 2, long_row));
    const velora::nf4_frozen_weight<velora::eigen_backend<float>> f(b, q);
    CHECK(f.tile_rows() == 1);
    CHECK(f.workspace_elements() == static_cast<std::size_t>(long_row));
    // Small weights: the tile is the whole weight.
    const auto s = velora::nf4_weight::quantize(velora::make_view(w.data(), 4, 64));
    CHECK(velora::nf4_frozen_weight<velora::eigen_backend<float>>(b, s).workspace_elements() == 256u);
    MESSAGE("default tile: " << velora::frozen_tile_values << " values (" << velora::frozen_tile_values * 4 / 1024 << " KiB in float); at D = 4096: "
                             << velora::frozen_tile_values / 4096 << " rows");
}

// ================================================================== bad input
TEST_CASE("bad input: block size, non-finite W, shapes, workspace, aliasing") {
    using velora::nf4_weight;
    std::vector<float> w(6 * 100, 0.5f);
    const auto wv = velora::make_view(w.data(), 6, 100);
    auto msg = message_of([&] { (void)nf4_weight::quantize(wv, {.block_size = 64}); });
    CHECK(msg.find("velora::nf4_weight::quantize") == 0);
    CHECK(msg.find("options.block_size' = 64 does not divide a row of 'w' (100 columns)") != std::string::npos);
    msg = message_of([&] { (void)nf4_weight::quantize(wv, {.block_size = 5}); });
    CHECK(msg.find("'options.block_size' = 5 must be a positive even number") != std::string::npos);
    CHECK(message_of([&] { (void)nf4_weight::quantize(wv, {.block_size = 0}); }).find("options.block_size' = 0") != std::string::npos);
    w[2 * 100 + 7] = std::numeric_limits<float>::quiet_NaN();
    msg = message_of([&] { (void)nf4_weight::quantize(wv, {.block_size = 50}); });
    CHECK(msg.find("velora::nf4_weight::quantize: argument 'w' has a non-finite value: w[2, 7] = nan") == 0);
    w[2 * 100 + 7] = -std::numeric_limits<float>::infinity();
    CHECK(message_of([&] { (void)nf4_weight::quantize(wv, {.block_size = 50}); }).find("w[2, 7] = -inf") != std::string::npos);
    CHECK(message_of([&] { (void)velora::bf16_weight::quantize(wv); }).find("velora::half_weight::quantize: argument 'w' has a non-finite value: w[2, 7] = -inf") == 0);
    w[2 * 100 + 7] = 1e5f;
    CHECK(message_of([&] { (void)velora::f16_weight::quantize(wv); }).find("w[2, 7] = 100000, which overflows f16") != std::string::npos);
    CHECK_NOTHROW((void)velora::bf16_weight::quantize(wv));
    w[2 * 100 + 7] = 0.5f;
    CHECK(message_of([&] { (void)nf4_weight::quantize(velora::make_view(w.data(), 0, 100)); }).find("argument 'w' is empty") != std::string::npos);

    velora::eigen_backend<float> b;
    const auto q = nf4_weight::quantize(wv, {.block_size = 50});
    CHECK(message_of([&] { velora::nf4_frozen_weight<velora::eigen_backend<float>> f(b, q, 7); }).find("argument 'tile_rows' = 7") != std::string::npos);
    CHECK(message_of([&] { velora::nf4_frozen_weight<velora::eigen_backend<float>> f(b, nf4_weight{}); }).find("empty nf4_weight") != std::string::npos);
    const velora::nf4_frozen_weight<velora::eigen_backend<float>> f(b, q, 4);
    std::vector<float> x(3 * 100), y(3 * 6), ws(f.workspace_elements()), big(10000);
    const std::span<float> wsp(ws);
    const auto xv = velora::make_view<const float>(x.data(), 3, 100);
    const auto yv = velora::make_view(y.data(), 3, 6);
    msg = message_of([&] { f.forward(b, velora::make_view<const float>(x.data(), 3, 99), yv, wsp); });
    CHECK(msg.find("velora::nf4_frozen_weight::forward: argument 'x' is 3x99 but must be 3x100") == 0);
    msg = message_of([&] { f.forward(b, xv, velora::make_view(y.data(), 3, 5), wsp); });
    CHECK(msg.find("argument 'y' is 3x5 but must be 3x6") != std::string::npos);
    msg = message_of([&] { f.forward(b, xv, yv, wsp.first(399)); });
    CHECK(msg.find("argument 'workspace' holds 399 values but the weight needs workspace_elements() = 400") != std::string::npos);
    msg = message_of([&] { f.forward(b, velora::make_view<const float>(big.data(), 3, 100), velora::make_view(big.data() + 250, 3, 6), wsp); });
    CHECK(msg.find("argument 'y' (3x6) overlaps argument 'x'") != std::string::npos);
    msg = message_of([&] { f.forward(b, xv, velora::make_view(big.data(), 3, 6), std::span<float>(big.data() + 10, 400)); });
    CHECK(msg.find("argument 'y' (3x6) overlaps argument 'workspace'") != std::string::npos);
    msg = message_of([&] { f.forward(b, velora::make_view<const float>(big.data(), 3, 100), yv, std::span<float>(big.data() + 100, 400)); });
    CHECK(msg.find("argument 'workspace' (1x400) overlaps argument 'x'") != std::string::npos);
    msg = message_of([&] { f.input_grad(b, velora::make_view<const float>(y.data(), 3, 6), velora::make_view(x.data(), 3, 64), wsp); });
    CHECK(msg.find("velora::nf4_frozen_weight::input_grad: argument 'dx' is 3x64 but must be 3x100") == 0);
    msg = message_of([&] { f.input_grad(b, velora::make_view<const float>(big.data(), 3, 6), velora::make_view(big.data() + 5, 3, 100), wsp); });
    CHECK(msg.find("argument 'dx' (3x100) overlaps argument 'dy'") != std::string::npos);
    // The stored weight may not be written (y over the codes' memory).
    auto* codes = const_cast<std::uint8_t*>(f.blocks().codes);
    msg = message_of([&] { f.forward(b, xv, velora::make_view(reinterpret_cast<float*>(codes), 3, 6), wsp); });
    CHECK(msg.find("overlaps argument 'the stored weight'") != std::string::npos);
    // Row ranges of the host dequantisation.
    std::vector<float> out(2 * 100);
    CHECK(message_of([&] { q.dequantize_rows(5, velora::make_view(out.data(), 2, 100)); }).find("rows [5, 5 + 2) are not within the weight's 6 rows") !=
          std::string::npos);
    CHECK(message_of([&] { q.dequantize_rows(0, velora::make_view(out.data(), 2, 50)); }).find("'out' has 50 columns but the weight has D = 100") !=
          std::string::npos);
}

// ================================================================== state blob
namespace {

velora::nf4_weight small_weight(bool dq) {
    const auto w = test_weight(4, 64, 16, 31);
    return velora::nf4_weight::quantize(velora::make_view(w.data(), 4, 64), {.block_size = 16, .double_quant = dq});
}

// A blob written field by field (valid envelope), to reach load_state's meaning checks.
struct fields {
    std::int64_t rows = 1, cols = 4, block = 4;
    std::uint8_t dq = 0;
    std::int64_t group = 256;
    std::vector<std::uint8_t> codes{0xf7, 0x77};
    std::vector<float> absmax{1.0f};
    std::vector<std::int8_t> qcodes{0};
    std::vector<float> scales{0.0f};
    float mean = 1.0f;
    std::vector<std::byte> blob() const {
        velora::state_writer w(velora::nf4_weight::state_kind, velora::nf4_weight::state_version);
        w.put(rows);
        w.put(cols);
        w.put(block);
        w.put(dq);
        w.put(group);
        w.put_array(std::span<const std::uint8_t>(codes));
        if (dq) {
            w.put_array(std::span<const std::int8_t>(qcodes));
            w.put_array(std::span<const float>(scales));
            w.put(mean);
        } else {
            w.put_array(std::span<const float>(absmax));
        }
        return std::move(w).finish();
    }
};

std::string load_message(const std::vector<std::byte>& blob) {
    velora::nf4_weight q;
    try {
        q.load_state(blob);
    } catch (const velora::state_format_error& e) {
        return e.what();
    }
    return "<accepted>";
}

} // namespace

TEST_CASE("nf4_weight state: round trip bit-identical; every byte flip and truncation refused, nothing changed") {
    for (bool dq : {false, true}) {
        CAPTURE(dq);
        const auto q = small_weight(dq);
        const auto blob = q.save_state();
        velora::nf4_weight loaded;
        loaded.load_state(blob);
        CHECK(loaded.save_state() == blob);
        CHECK(loaded.rows() == 4);
        CHECK(loaded.double_quantized() == dq);
        std::vector<float> a(4 * 64), c(4 * 64);
        q.dequantize_rows(0, velora::make_view(a.data(), 4, 64));
        loaded.dequantize_rows(0, velora::make_view(c.data(), 4, 64));
        CHECK(std::memcmp(a.data(), c.data(), a.size() * sizeof(float)) == 0);

        auto target = small_weight(!dq);   // a live weight of the other kind: a failed load must leave it as it was
        const auto before = target.save_state();
        int refused = 0;
        for (std::size_t i = 0; i < blob.size(); ++i) {
            for (std::uint8_t flip : {std::uint8_t{0x01}, std::uint8_t{0x80}, std::uint8_t{0xff}}) {
                auto bad = blob;
                bad[i] ^= std::byte{flip};
                try {
                    target.load_state(bad);
                } catch (const velora::state_format_error&) {
                    ++refused;
                }
            }
        }
        CHECK(refused == static_cast<int>(3 * blob.size()));
        for (std::size_t n = 0; n < blob.size(); ++n)
            CHECK_THROWS_AS(target.load_state(std::span<const std::byte>(blob.data(), n)), velora::state_format_error);
        CHECK(target.save_state() == before);
        MESSAGE("nf4 state blob (4x64, block 16" << std::string(dq ? ", double-quantised" : "") << "): " << blob.size() << " bytes, all "
                                                 << 3 * blob.size() << " single-byte flips and " << blob.size() << " truncations refused");
    }
}

TEST_CASE("nf4_weight state: blobs with a valid checksum but an impossible weight are refused, naming the field") {
    CHECK(load_message(fields{}.blob()) == "<accepted>");
    auto f = [](auto change) {
        fields x;
        change(x);
        return load_message(x.blob());
    };
    CHECK(f([](fields& x) { x.rows = 0; }).find("velora::nf4_weight::load_state: state has a 0x4 weight") == 0);
    CHECK(f([](fields& x) { x.block = 3; }).find("block size 3 for rows of 4 weights") != std::string::npos);
    CHECK(f([](fields& x) { x.cols = 6; }).find("block size 4 for rows of 6 weights") != std::string::npos);
    CHECK(f([](fields& x) { x.rows = std::int64_t{1} << 40; x.cols = std::int64_t{1} << 40; }).find("more weights than the address space") !=
          std::string::npos);
    CHECK(f([](fields& x) { x.dq = 2; }).find("double quantisation flag = 2") != std::string::npos);
    CHECK(f([](fields& x) { x.group = 128; }).find("absmax groups of 128 blocks") != std::string::npos);
    CHECK(f([](fields& x) { x.codes.push_back(0); }).find("array holds 3 elements, expected 2") != std::string::npos);
    CHECK(f([](fields& x) { x.absmax = {-1.0f}; }).find("absmax[0] = -1") != std::string::npos);
    CHECK(f([](fields& x) { x.absmax = {-0.0f}; x.codes = {0x77, 0x77}; }).find("absmax[0] = -0") != std::string::npos);
    CHECK(f([](fields& x) { x.absmax = {std::numeric_limits<float>::infinity()}; }).find("absmax[0] = inf") != std::string::npos);
    CHECK(f([](fields& x) { x.absmax = {0.0f}; }).find("for a block that is not all zero") != std::string::npos);
    CHECK(f([](fields& x) { x.codes = {0x77, 0x77}; }).find("for a block of zeros (must be 0)") != std::string::npos);
    CHECK(f([](fields& x) { x.codes = {0x87, 0x77}; }).find("neither all 7") != std::string::npos);
    CHECK(f([](fields& x) { x.dq = 1; x.qcodes = {-128}; }).find("absmax code[0] = -128") != std::string::npos);
    CHECK(f([](fields& x) { x.dq = 1; x.qcodes = {3}; }).find("absmax scale[0] = 0 but absmax code[0] = 3") != std::string::npos);
    CHECK(f([](fields& x) { x.dq = 1; x.scales = {-0.5f}; }).find("absmax scale[0] = -0.5") != std::string::npos);
    CHECK(f([](fields& x) { x.dq = 1; x.mean = std::numeric_limits<float>::quiet_NaN(); }).find("absmax mean nan") != std::string::npos);
    CHECK(f([](fields& x) {
              x.dq = 1;
              x.qcodes = {127};
              x.scales = {std::numeric_limits<float>::max()};
              x.mean = std::numeric_limits<float>::max();
          }).find("rebuilt absmax inf is not finite") != std::string::npos);
    CHECK(load_message([] {
              fields x;
              x.dq = 1;
              return x.blob();
          }()) == "<accepted>");
    // Another kind of state is refused by the envelope.
    velora::state_writer other("velora.compressor", 1);
    other.put(std::uint8_t{4});
    CHECK(load_message(std::move(other).finish()).find("blob holds state of kind 'velora.compressor', expected 'velora.nf4_weight'") !=
          std::string::npos);
    CHECK(message_of([] { (void)velora::nf4_weight{}.save_state(); }).find("velora::nf4_weight::save_state: the weight is empty") == 0);
}
