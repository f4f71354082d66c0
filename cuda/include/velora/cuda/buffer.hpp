#pragma once
/// \file
/// `device_buffer<T>`: an owning, growable array in device memory (cudaMalloc; never managed
/// memory), the CUDA backend's counterpart of `host_buffer<T>`.
///
/// Same contract as host_buffer: growth is the only operation that allocates, `resize` within
/// the capacity never does, and contents are left uninitialised on growth. Move-only: copying
/// device memory is an explicit backend call. A failed allocation throws `cuda_error` (the CUDA
/// error string included) and leaves the buffer as it was. The destructor frees with cudaFree,
/// which waits for work on the device that may still use the memory.
///
/// A plain C++ header: it needs the CUDA toolkit's include directory, not nvcc.
#include <cstddef>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

#include "error.hpp"

namespace velora::cuda {

template <class T>
class device_buffer {
    static_assert(std::is_trivially_copyable_v<T>, "device_buffer holds trivially copyable elements only");

public:
    device_buffer() = default;
    explicit device_buffer(std::size_t n) { resize(n); }
    device_buffer(const device_buffer&) = delete;
    device_buffer& operator=(const device_buffer&) = delete;
    device_buffer(device_buffer&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)), capacity_(std::exchange(other.capacity_, 0)) {}
    device_buffer& operator=(device_buffer&& other) noexcept {
        if (this != &other) {
            release();
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
            capacity_ = std::exchange(other.capacity_, 0);
        }
        return *this;
    }
    ~device_buffer() { release(); }

    /// Sets the size; allocates only when `n` exceeds the capacity (contents are then not kept).
    void resize(std::size_t n) {
        if (n > capacity_) {
            // A byte count that does not fit in a size_t is refused, never wrapped to a small allocation.
            if (n > std::numeric_limits<std::size_t>::max() / sizeof(T)) throw std::bad_array_new_length();
            void* fresh = nullptr;
            detail::check(cudaMalloc(&fresh, n * sizeof(T)), "velora::cuda::device_buffer::resize",
                          "cudaMalloc of " + std::to_string(n * sizeof(T)) + " bytes");
            release();
            data_ = static_cast<T*>(fresh);
            capacity_ = n;
        }
        size_ = n;
    }

    [[nodiscard]] T* data() noexcept { return data_; }
    [[nodiscard]] const T* data() const noexcept { return data_; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }

private:
    void release() noexcept {
        if (data_) (void)cudaFree(data_);
        data_ = nullptr;
        size_ = capacity_ = 0;
    }

    T* data_ = nullptr;
    std::size_t size_ = 0;
    std::size_t capacity_ = 0;
};

} // namespace velora::cuda
