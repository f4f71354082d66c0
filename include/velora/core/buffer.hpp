#pragma once
/// \file
/// `host_buffer<T>`: an owning, 64-byte aligned, growable array for host memory.
///
/// Growth is the only operation that allocates; `resize` to a size within the capacity never
/// does. Library objects size their buffers once (at construction or `reserve`) so that a
/// steady-state call allocates nothing. Elements are trivially copyable and left
/// uninitialised on growth, like device memory.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

namespace velora {

template <class T>
class host_buffer {
    static_assert(std::is_trivially_copyable_v<T>, "host_buffer holds trivially copyable elements only");

public:
    static constexpr std::size_t alignment = 64;

    host_buffer() = default;
    explicit host_buffer(std::size_t n) { resize(n); }
    host_buffer(const host_buffer& other) : host_buffer(other.size_) {
        if (size_) std::memcpy(data_.get(), other.data_.get(), size_ * sizeof(T));
    }
    host_buffer& operator=(const host_buffer& other) {
        if (this != &other) {
            resize(other.size_);
            if (size_) std::memcpy(data_.get(), other.data_.get(), size_ * sizeof(T));
        }
        return *this;
    }
    host_buffer(host_buffer&& other) noexcept
        : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)), capacity_(std::exchange(other.capacity_, 0)) {}
    host_buffer& operator=(host_buffer&& other) noexcept {
        data_ = std::move(other.data_);
        size_ = std::exchange(other.size_, 0);
        capacity_ = std::exchange(other.capacity_, 0);
        return *this;
    }

    /// Sets the size; allocates only when `n` exceeds the capacity (contents are then not kept).
    /// A size whose bytes do not fit in a size_t throws std::bad_array_new_length (never a
    /// wrapped, too-small allocation); the public entry points reject such sizes earlier.
    void resize(std::size_t n) {
        if (n > capacity_) {
            data_.reset(static_cast<T*>(::operator new[](bytes_of(n), std::align_val_t{alignment})));
            capacity_ = n;
        }
        size_ = n;
    }
    /// Grows the capacity to at least `n` without changing the size (contents are kept).
    void reserve(std::size_t n) {
        if (n <= capacity_) return;
        std::unique_ptr<T[], deleter> grown(static_cast<T*>(::operator new[](bytes_of(n), std::align_val_t{alignment})));
        if (size_) std::memcpy(grown.get(), data_.get(), size_ * sizeof(T));
        data_ = std::move(grown);
        capacity_ = n;
    }

    [[nodiscard]] T* data() noexcept { return data_.get(); }
    [[nodiscard]] const T* data() const noexcept { return data_.get(); }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
    [[nodiscard]] T& operator[](std::size_t i) noexcept { return data_[i]; }
    [[nodiscard]] const T& operator[](std::size_t i) const noexcept { return data_[i]; }

private:
    static std::size_t bytes_of(std::size_t n) {
        if (n > std::numeric_limits<std::size_t>::max() / sizeof(T)) throw std::bad_array_new_length();
        return n * sizeof(T);
    }
    struct deleter {
        void operator()(T* p) const noexcept { ::operator delete[](p, std::align_val_t{alignment}); }
    };
    std::unique_ptr<T[], deleter> data_;
    std::size_t size_ = 0;
    std::size_t capacity_ = 0;
};

} // namespace velora
