// Steady state allocates nothing: after a warm-up step, a full VeLoRA forward/backward step
// (compress, factored weight gradient, expansion, dX, db, reconstruction) makes no heap
// allocation at all. Every C++ allocation is counted by replacing the global operator new,
// and Eigen's own heap use is forbidden through EIGEN_RUNTIME_NO_MALLOC.
#define EIGEN_RUNTIME_NO_MALLOC
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/velora.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <vector>

namespace {
std::atomic<long> allocations{0};
void* counted(std::size_t n, std::size_t align) {
    ++allocations;
    void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align) : std::malloc(n ? n : 1);
    if (!p) throw std::bad_alloc();
    return p;
}
} // namespace

void* operator new(std::size_t n) { return counted(n, 0); }
void* operator new[](std::size_t n) { return counted(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return counted(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted(n, static_cast<std::size_t>(a)); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using velora::index_t;

TEST_CASE_TEMPLATE("a steady-state VeLoRA layer step makes no heap allocation", T, float, double) {
    using B = velora::eigen_backend<T>;
    B backend;
    // Large enough for the threaded GEMM and kernel paths; D % G != 0 exercises padding.
    const index_t t = 512, d = 200, o = 96, g = 16;
    std::vector<T> x(static_cast<std::size_t>(t * d)), dy(static_cast<std::size_t>(t * o)), w(static_cast<std::size_t>(o * d));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<T>(velora::gaussian_at(1, i) + 0.3);
    for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = static_cast<T>(velora::gaussian_at(2, i));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<T>(velora::gaussian_at(3, i));
    std::vector<T> y(static_cast<std::size_t>(t * o)), dx(x.size()), a(static_cast<std::size_t>(o * g)), dw(w.size()),
        db(static_cast<std::size_t>(o)), xhat(x.size());
    for (velora::storage st : {velora::storage::f32, velora::storage::bf16}) {
        for (velora::v_mode mode : {velora::v_mode::first_batch_mean(), velora::v_mode::ema(0.9)}) {
            velora::compressor<B> c(backend, d, {.groups = g, .v = mode, .z_storage = st});
            typename velora::compressor<B>::record_type record;
            auto step = [&] {
                const auto xv = velora::make_view<const T>(x.data(), t, d);
                const auto dyv = velora::make_view<const T>(dy.data(), t, o);
                velora::linear_forward(backend, xv, velora::make_view<const T>(w.data(), o, d), nullptr, velora::make_view(y.data(), t, o));
                c.compress(xv, record);
                c.weight_grad(record, dyv, velora::make_view(a.data(), o, g));
                c.expand_weight_grad(record, velora::make_view<const T>(a.data(), o, g), velora::make_view(dw.data(), o, d));
                velora::linear_input_grad(backend, dyv, velora::make_view<const T>(w.data(), o, d), velora::make_view(dx.data(), t, d));
                velora::bias_grad(backend, dyv, db.data());
                c.reconstruct(record, velora::make_view(xhat.data(), t, d));
            };
            INFO("storage " << velora::to_string(st) << ", mode " << velora::to_string(mode.type));
            step();   // warm-up: sizes the record, the GEMM packing buffers and the reduction scratch
            const long before = allocations.load();
            Eigen::internal::set_is_malloc_allowed(false);
            step();
            step();
            Eigen::internal::set_is_malloc_allowed(true);
            CHECK(allocations.load() - before == 0);
        }
    }
}

TEST_CASE("the counter really counts") {
    const long before = allocations.load();
    auto* p = new std::vector<int>(100);
    delete p;
    CHECK(allocations.load() - before >= 2);
}
