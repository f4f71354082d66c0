// Shared core: views, errors, storage conversions, RNG, serialization, buffers, backend GEMM
// and kernels against naive references, concept conformance.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/backend/eigen.hpp>
#include <velora/core/checked.hpp>
#include <velora/core/serialize.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference.hpp"
#include "test_util.hpp"

using velora::index_t;

namespace {

template <class T>
std::vector<T> gaussian(std::size_t n, std::uint64_t seed, double mean = 0.0) { return test::data<T>(n, seed, mean); }

template <class T>
constexpr double tol() { return std::is_same_v<T, float> ? 2e-5 : 1e-12; }

// A type that looks like a backend but has no GEMM: must not satisfy the concept.
struct backend_without_gemm {
    using value_type = float;
    template <class U>
    using buffer = velora::host_buffer<U>;
};

} // namespace

static_assert(velora::backend<velora::eigen_backend<float>>);
static_assert(velora::backend<velora::eigen_backend<double>>);
static_assert(!velora::backend<backend_without_gemm>);
static_assert(!velora::backend<int>);

TEST_CASE("matrix_view: shape, blocks and validation") {
    std::vector<float> data(12);
    auto v = velora::make_view(data.data(), 3, 3, 4);
    CHECK(v.size() == 9);
    CHECK_FALSE(v.contiguous());
    CHECK(&v(2, 1) == &data[9]);
    CHECK(v.row_block(1, 2).data == data.data() + 4);
    CHECK(v.col_block(1, 2)(0, 0) == data[1]);
    velora::const_matrix_view<float> c = v;   // mutable -> const conversion
    CHECK(c.ld == 4);

    const auto empty = test::invalid_argument_message([&] { velora::check_view(velora::make_view(data.data(), 0, 3), "velora::f", "x"); });
    CHECK(empty.find("velora::f") == 0);
    CHECK(empty.find("'x' is empty (0x3)") != std::string::npos);
    const auto ld = test::invalid_argument_message([&] { velora::check_view(velora::make_view(data.data(), 2, 4, 3), "velora::f", "y"); });
    CHECK(ld.find("leading dimension 3 < cols 4") != std::string::npos);
    const auto null = test::invalid_argument_message([&] { velora::check_view(velora::make_view<float>(nullptr, 2, 2), "velora::f", "z"); });
    CHECK(null.find("null data pointer") != std::string::npos);
    const auto shape = test::invalid_argument_message([&] { velora::check_shape(v, 3, 2, "velora::g", "w"); });
    CHECK(shape.find("'w' is 3x3 but must be 3x2") != std::string::npos);
}

TEST_CASE("half and bfloat16: exact values, rounding to nearest even, specials") {
    using velora::detail::float_to_half_bits, velora::detail::half_bits_to_float;
    CHECK(float_to_half_bits(1.0f) == 0x3c00);
    CHECK(float_to_half_bits(-2.0f) == 0xc000);
    CHECK(float_to_half_bits(65504.0f) == 0x7bff);
    CHECK(float_to_half_bits(65520.0f) == 0x7c00);                 // overflow -> Inf
    CHECK(float_to_half_bits(5.9604644775390625e-8f) == 0x0001);   // smallest subnormal
    CHECK(float_to_half_bits(2.9802322387695312e-8f) == 0x0000);   // half of it: ties to even (0)
    CHECK(float_to_half_bits(1.0f + 1.0f / 2048) == 0x3c00);       // tie -> even
    CHECK(float_to_half_bits(1.0f + 3.0f / 2048) == 0x3c02);       // tie -> even (up)
    CHECK(std::isnan(half_bits_to_float(float_to_half_bits(std::numeric_limits<float>::quiet_NaN()))));
    CHECK(std::isinf(half_bits_to_float(float_to_half_bits(std::numeric_limits<float>::infinity()))));
    // Every finite half round-trips exactly through float.
    int mismatches = 0;
    for (std::uint32_t h = 0; h < 0x10000; ++h) {
        if ((h & 0x7c00) == 0x7c00) continue;
        if (float_to_half_bits(half_bits_to_float(static_cast<std::uint16_t>(h))) != h) ++mismatches;
    }
    CHECK(mismatches == 0);
    using velora::detail::float_to_bfloat16_bits, velora::detail::bfloat16_bits_to_float;
    CHECK(float_to_bfloat16_bits(1.0f) == 0x3f80);
    CHECK(bfloat16_bits_to_float(float_to_bfloat16_bits(3.140625f)) == 3.140625f);
    CHECK(float_to_bfloat16_bits(std::bit_cast<float>(0x3f808000u)) == 0x3f80);   // tie -> even
    CHECK(float_to_bfloat16_bits(std::bit_cast<float>(0x3f818000u)) == 0x3f82);   // tie -> even (up)
    CHECK(std::isnan(bfloat16_bits_to_float(float_to_bfloat16_bits(std::numeric_limits<float>::quiet_NaN()))));
    CHECK(velora::storage_bytes(velora::storage::f16) == 2);
    CHECK(velora::storage_bytes(velora::storage::f64) == 8);
}

TEST_CASE("counter-based Gaussian stream: reproducible, order-free, plausible moments") {
    CHECK(velora::gaussian_at(7, 123) == velora::gaussian_at(7, 123));
    CHECK(velora::gaussian_at(7, 123) != velora::gaussian_at(8, 123));
    double sum = 0, sum2 = 0;
    const int n = 200000;
    for (int i = 0; i < n; ++i) {
        const double g = velora::gaussian_at(42, static_cast<std::uint64_t>(i));
        sum += g;
        sum2 += g * g;
    }
    CHECK(std::abs(sum / n) < 0.01);
    CHECK(std::abs(sum2 / n - 1.0) < 0.02);
    double pair_product = 0;   // the two values of a Box-Muller pair are independent
    for (int p = 0; p < n / 2; ++p) pair_product += velora::gaussian_at(42, 2u * p) * velora::gaussian_at(42, 2u * p + 1);
    CHECK(std::abs(pair_product / (n / 2)) < 0.01);
    velora::eigen_backend<float> b;
    std::vector<float> a(10), c(5);
    b.fill_gaussian(3, 0, a.data(), 10);
    b.fill_gaussian(3, 5, c.data(), 5);   // the second half of the same stream
    CHECK(std::memcmp(a.data() + 5, c.data(), 5 * sizeof(float)) == 0);
    std::vector<float> big(100001);   // threaded, odd offset and odd length
    b.fill_gaussian(9, 3, big.data(), static_cast<velora::index_t>(big.size()));
    int mismatches = 0;
    for (std::size_t i = 0; i < big.size(); ++i) mismatches += big[i] != static_cast<float>(velora::gaussian_at(9, 3 + i));
    CHECK(mismatches == 0);
}

TEST_CASE("state container: round trip and every kind of damage is rejected") {
    velora::state_writer w("test.kind", 2);
    w.put(std::uint32_t{7});
    w.put(3.5);
    const std::vector<float> payload{1, 2, 3};
    w.put_array(std::span<const float>(payload));
    const auto blob = std::move(w).finish();

    {
        velora::state_reader r(blob, "test.kind", 2, "velora::test");
        CHECK(r.version() == 2);
        CHECK(r.get<std::uint32_t>() == 7);
        CHECK(r.get<double>() == 3.5);
        CHECK(r.get_array<float>(3) == payload);
        r.expect_end();
    }
    auto rejects = [&](std::vector<std::byte> b, std::string_view kind, std::uint32_t max_version, const char* needle) {
        try {
            velora::state_reader r(b, kind, max_version, "velora::test");
            (void)r.get<std::uint32_t>();
            (void)r.get<double>();
            (void)r.get_array<float>(3);
            r.expect_end();
        } catch (const velora::state_format_error& e) {
            INFO(e.what());
            CHECK(std::string(e.what()).find("velora::test: ") == 0);
            CHECK(std::string(e.what()).find(needle) != std::string::npos);
            return;
        }
        FAIL("no state_format_error");
    };
    for (std::size_t cut : {std::size_t{0}, std::size_t{3}, std::size_t{20}, blob.size() - 1})
        rejects(std::vector<std::byte>(blob.begin(), blob.begin() + static_cast<std::ptrdiff_t>(cut)), "test.kind", 2, "");
    auto corrupted = blob;
    corrupted[corrupted.size() - 12] ^= std::byte{0x40};
    rejects(corrupted, "test.kind", 2, "checksum mismatch");
    rejects(blob, "other.kind", 2, "expected 'other.kind'");
    rejects(blob, "test.kind", 1, "state version 2");
    auto magic = blob;
    magic[0] = std::byte{'X'};
    rejects(magic, "test.kind", 2, "magic");
    auto longer = blob;
    longer.push_back(std::byte{0});
    rejects(longer, "test.kind", 2, "trailing bytes");
}

TEST_CASE("host_buffer: grows only when needed, copies and moves") {
    velora::host_buffer<float> b(8);
    const float* p = b.data();
    CHECK(reinterpret_cast<std::uintptr_t>(p) % 64 == 0);
    b.resize(4);
    CHECK(b.data() == p);
    b.resize(8);
    CHECK(b.data() == p);
    for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = float(i);
    velora::host_buffer<float> c = b;
    CHECK(c[7] == 7.0f);
    velora::host_buffer<float> m = std::move(c);
    CHECK(m.size() == 8);
    CHECK(c.size() == 0);
    CHECK(c.capacity() == 0);
    m.reserve(100);
    CHECK(m[5] == 5.0f);
}

TEST_CASE_TEMPLATE("eigen_backend::gemm matches the naive product for every engine, transpose, ld, alpha and beta", T, float, double) {
  for (const auto engine : test::gemm_engines()) {
    const std::string engine_name = velora::cpu::engine_name(engine);
    CAPTURE(engine_name);
    velora::eigen_backend<T> b;
    b.set_gemm_engine(engine);
    struct shape { index_t m, n, k; };
    // Small shapes stay whole; the larger ones split rows (m >= n) or columns (m < n) across
    // threads.
    for (shape sh : {shape{3, 5, 4}, shape{1, 1, 1}, shape{257, 65, 130}, shape{300, 200, 400}, shape{130, 700, 200}}) {
        for (int ta = 0; ta < 2; ++ta)
            for (int tb = 0; tb < 2; ++tb)
                for (auto [alpha, beta] : {std::pair{T(1), T(0)}, std::pair{T(-0.5), T(2)}}) {
                    const index_t ar = ta ? sh.k : sh.m, ac = ta ? sh.m : sh.k;
                    const index_t br = tb ? sh.n : sh.k, bc = tb ? sh.k : sh.n;
                    const index_t lda = ac + 3, ldb = bc + 1, ldc = sh.n + 2;
                    auto a = gaussian<T>(static_cast<std::size_t>(ar * lda), 1);
                    auto bm = gaussian<T>(static_cast<std::size_t>(br * ldb), 2);
                    auto c = gaussian<T>(static_cast<std::size_t>(sh.m * ldc), 3);
                    ref::matrix ra(ar, ac), rb(br, bc), rc(sh.m, sh.n);
                    for (index_t i = 0; i < ar; ++i) for (index_t j = 0; j < ac; ++j) ra(i, j) = a[static_cast<std::size_t>(i * lda + j)];
                    for (index_t i = 0; i < br; ++i) for (index_t j = 0; j < bc; ++j) rb(i, j) = bm[static_cast<std::size_t>(i * ldb + j)];
                    const auto prod = ref::matmul(ra, ta, rb, tb);
                    for (index_t i = 0; i < sh.m; ++i)
                        for (index_t j = 0; j < sh.n; ++j) rc(i, j) = double(alpha) * prod(i, j) + double(beta) * c[static_cast<std::size_t>(i * ldc + j)];
                    const auto padding = c[static_cast<std::size_t>(ldc - 1)];
                    b.gemm(ta ? velora::op::transpose : velora::op::none, tb ? velora::op::transpose : velora::op::none, alpha,
                           velora::make_view<const T>(a.data(), ar, ac, lda), velora::make_view<const T>(bm.data(), br, bc, ldb), beta,
                           velora::make_view(c.data(), sh.m, sh.n, ldc));
                    std::vector<T> packed(static_cast<std::size_t>(sh.m * sh.n));
                    for (index_t i = 0; i < sh.m; ++i) for (index_t j = 0; j < sh.n; ++j) packed[static_cast<std::size_t>(i * sh.n + j)] = c[static_cast<std::size_t>(i * ldc + j)];
                    INFO("m=" << sh.m << " n=" << sh.n << " k=" << sh.k << " ta=" << ta << " tb=" << tb);
                    CHECK(ref::rel_error(packed, rc) < tol<T>());
                    CHECK(c[static_cast<std::size_t>(ldc - 1)] == padding);   // columns past n untouched
                }
    }
  }
}

#if defined(__linux__)
// The BLAS's threads and the library's must not oversubscribe the cores: the backend splits each
// GEMM over its own OpenMP team and calls the engine single-threaded per part, so a process that
// runs GEMMs with the backend's default thread count (omp_get_max_threads()) never holds more
// threads than that. A BLAS with its own thread pool (OpenBLAS built with pthreads, or one told
// to thread inside parallel regions) adds threads and fails this. Counted in /proc/self/task.
TEST_CASE("the GEMM engines never run more threads than the backend's") {
#if defined(_OPENMP)
    const long allowed = omp_get_max_threads();
#else
    const long allowed = 1;
#endif
    velora::eigen_backend<float> b;
    const index_t m = 512, n = 384, k = 1024;   // large enough to be split across threads
    auto a = gaussian<float>(static_cast<std::size_t>(m * k), 1), bm = gaussian<float>(static_cast<std::size_t>(k * n), 2);
    std::vector<float> c(static_cast<std::size_t>(m * n));
    for (const auto engine : test::gemm_engines()) {
        b.set_gemm_engine(engine);
        for (int op = 0; op < 4; ++op)
            b.gemm(op & 1 ? velora::op::transpose : velora::op::none, op & 2 ? velora::op::transpose : velora::op::none, 1.0f,
                   velora::make_view<const float>(a.data(), op & 1 ? k : m, op & 1 ? m : k),
                   velora::make_view<const float>(bm.data(), op & 2 ? n : k, op & 2 ? k : n), 0.0f, velora::make_view(c.data(), m, n));
    }
    const auto tasks = std::distance(std::filesystem::directory_iterator("/proc/self/task"), std::filesystem::directory_iterator{});
    CHECK(tasks <= allowed);
}
#endif

TEST_CASE("eigen_backend::gemm: beta = 0 ignores NaN in C with every engine; shape errors name the operands") {
    velora::eigen_backend<float> b;
    std::vector<float> a{1, 2, 3, 4}, i{1, 0, 0, 1};
    for (const auto engine : test::gemm_engines()) {
        b.set_gemm_engine(engine);
        std::vector<float> c(4, std::numeric_limits<float>::quiet_NaN());
        b.gemm(velora::op::none, velora::op::none, 1.0f, velora::make_view<const float>(a.data(), 2, 2),
               velora::make_view<const float>(i.data(), 2, 2), 0.0f, velora::make_view(c.data(), 2, 2));
        CHECK(c == a);
    }
    if (!velora::cpu::has_blas) {
        const auto no_blas = test::invalid_argument_message([&] { b.set_gemm_engine(velora::cpu::gemm_engine::blas); });
        CHECK(no_blas.find("velora::cpu::gemm_driver::set_engine: argument 'engine' is blas but this build has no BLAS") == 0);
    }
    std::vector<float> c(4);
    const auto msg = test::invalid_argument_message([&] {
        b.gemm(velora::op::none, velora::op::none, 1.0f, velora::make_view<const float>(a.data(), 2, 2),
               velora::make_view<const float>(i.data(), 1, 4), 0.0f, velora::make_view(c.data(), 2, 2));
    });
    CHECK(msg.find("velora::eigen_backend::gemm: inner dimensions differ: op(a) is 2x2, op(b) is 1x4") == 0);
}

TEST_CASE("size arithmetic: products that do not fit are std::invalid_argument naming the values") {
    using velora::detail::checked_mul;
    constexpr index_t big = index_t{1} << 40;
    CHECK(checked_mul(index_t{3}, index_t{5}, "f", "x") == 15);
    CHECK(test::invalid_argument_message([&] { (void)checked_mul(big, big, "velora::f", "argument 'rows' x 'cols'"); }) ==
          "velora::f: argument 'rows' x 'cols' = 1099511627776 x 1099511627776 overflows (or is negative)");
    CHECK(test::invalid_argument_message([&] { (void)velora::detail::checked_add(std::numeric_limits<index_t>::max(), index_t{1}, "f", "x"); })
              .find("overflows") != std::string::npos);
    CHECK(test::invalid_argument_message([&] { (void)velora::detail::checked_elements(index_t{1} << 61, 8, "f", "x"); }).find("exceeds the address space") !=
          std::string::npos);
    // A view with 2^60 rows used to pass check_view; its extent does not fit the address space.
    float x = 0;
    const velora::matrix_view<float> huge{&x, index_t{1} << 60, 4, 4};
    CHECK(test::invalid_argument_message([&] { velora::check_view(huge, "velora::f", "x"); }) ==
          "velora::f: argument 'x' (1152921504606846976x4, ld 4) spans more memory than the address space holds");
    // host_buffer refuses a byte count that wraps instead of allocating a tiny block.
    velora::host_buffer<double> buffer;
    CHECK_THROWS_AS(buffer.resize(std::numeric_limits<std::size_t>::max() / 4), std::bad_array_new_length);
    CHECK(buffer.capacity() == 0);
}

TEST_CASE("overlaps and gemm's aliasing check") {
    std::vector<float> m(64, 1.0f);
    const auto whole = velora::make_view(m.data(), 8, 8);
    CHECK(velora::overlaps(whole, whole.row_block(7, 1)));
    CHECK_FALSE(velora::overlaps(whole.row_block(0, 4), whole.row_block(4, 4)));
    CHECK(velora::overlaps(whole.col_block(0, 4), whole.col_block(4, 4)));   // conservative: interleaved rows share an address range
    velora::eigen_backend<float> b;
    const auto msg = test::invalid_argument_message([&] {
        b.gemm(velora::op::none, velora::op::none, 1.0f, velora::matrix_view<const float>(whole.row_block(0, 4).col_block(0, 4)),
               velora::matrix_view<const float>(whole.row_block(0, 4).col_block(0, 4)), 0.0f, whole.row_block(0, 4).col_block(4, 4));
    });
    CHECK(msg.find("velora::eigen_backend::gemm: argument 'c' (4x4) overlaps argument 'a' (4x4)") == 0);
}

TEST_CASE_TEMPLATE("eigen_backend reductions and column kernels match naive loops", T, float, double) {
    velora::eigen_backend<T> b;
    const index_t rows = 300, cols = 77;
    const auto x = gaussian<T>(static_cast<std::size_t>(rows * cols), 5, 0.25);
    const auto rx = ref::from(x, rows, cols);
    std::vector<T> sums(static_cast<std::size_t>(cols));
    b.column_sums(velora::make_view<const T>(x.data(), rows, cols), sums.data());
    ref::matrix expect(1, cols);
    for (index_t t = 0; t < rows; ++t) for (index_t j = 0; j < cols; ++j) expect(0, j) += rx(t, j);
    CHECK(ref::rel_error(sums, expect) < tol<T>());

    const index_t s = 10;   // 77 = 7·10 + 7: a padded last group
    std::vector<T> sub(static_cast<std::size_t>(s));
    b.sum_subtokens(velora::make_view<const T>(x.data(), rows, cols), s, sub.data());
    ref::matrix expect_sub(1, s);
    for (index_t t = 0; t < rows; ++t) for (index_t j = 0; j < cols; ++j) expect_sub(0, j % s) += rx(t, j);
    CHECK(ref::rel_error(sub, expect_sub) < tol<T>());

    const auto w = gaussian<T>(static_cast<std::size_t>(cols), 6), bias = gaussian<T>(static_cast<std::size_t>(cols), 7);
    std::vector<T> y(x.size());
    b.scale_shift_columns(velora::make_view<const T>(x.data(), rows, cols), w.data(), bias.data(), velora::make_view(y.data(), rows, cols));
    ref::matrix expect_y(rows, cols);
    for (index_t t = 0; t < rows; ++t) for (index_t j = 0; j < cols; ++j) expect_y(t, j) = rx(t, j) * double(w[static_cast<std::size_t>(j)]) + double(bias[static_cast<std::size_t>(j)]);
    CHECK(ref::rel_error(y, expect_y) < tol<T>());
}
