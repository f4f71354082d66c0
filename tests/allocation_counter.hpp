#pragma once
// Counts every C++ heap allocation of the test program that includes it, for the tests that
// assert "no allocation after reserve": the replaceable global operator new/delete are defined
// here (so include this header in exactly one translation unit of a program: each test program
// is one). `test::allocations` is the running count.
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace test {
inline std::atomic<long> allocations{0};

inline void* counted_allocation(std::size_t n, std::size_t align) {
    ++allocations;
    void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align) : std::malloc(n ? n : 1);
    if (!p) throw std::bad_alloc();
    return p;
}
} // namespace test

void* operator new(std::size_t n) { return test::counted_allocation(n, 0); }
void* operator new[](std::size_t n) { return test::counted_allocation(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return test::counted_allocation(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return test::counted_allocation(n, static_cast<std::size_t>(a)); }
// The nothrow forms count too (libtorch's allocator uses them): an allocation is one whatever it does on failure.
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    try {
        return test::counted_allocation(n, 0);
    } catch (const std::bad_alloc&) {
        return nullptr;
    }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
