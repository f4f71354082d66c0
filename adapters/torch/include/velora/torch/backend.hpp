#pragma once
/// \file
/// The CPU backend as the adapter uses it: `eigen_backend<T>` fixes its thread count when it is
/// constructed, while a libtorch host sets its intra-op thread count with at::set_num_threads()
/// whenever it likes (and a thread that runs a backward pass has its own). `threads_following`
/// re-creates the backend when at::get_num_threads() on the calling thread differs from the
/// count it was made with, so every call uses libtorch's current count.
///
/// The object keeps its address: compressors and optimizers hold a pointer to the backend, and
/// re-creating it assigns a new backend to the same object. Scratch memory is dropped when that
/// happens (it grows again on first use); results do not depend on the thread count (the
/// backend's determinism, docs/architecture.md), so a change of count changes no bits.
#include <ATen/Parallel.h>

#include <algorithm>

#include <velora/backend/eigen.hpp>

namespace velora::torch {

template <class T>
class threads_following {
public:
    using backend_type = eigen_backend<T>;

    threads_following() : requested_(torch_threads()), backend_(requested_) {}
    threads_following(const threads_following&) = delete;
    threads_following& operator=(const threads_following&) = delete;

    /// The backend, re-created first when libtorch's thread count on this thread changed.
    backend_type& get() {
        const int n = torch_threads();
        // Compared with what was asked for, not with threads(): the backend caps the count at
        // OpenMP's maximum (1 without OpenMP), and comparing with the capped value would re-create
        // it on every call.
        if (n != requested_) {
            backend_ = backend_type(n);
            requested_ = n;
        }
        return backend_;
    }

    /// The backend as it is (for constructing the objects that keep a pointer to it).
    backend_type& current() noexcept { return backend_; }
    /// The thread count the backend was last made for (libtorch's count at the last get()).
    [[nodiscard]] int requested_threads() const noexcept { return requested_; }

    static int torch_threads() { return std::max(1, at::get_num_threads()); }

private:
    int requested_;
    backend_type backend_;
};

} // namespace velora::torch
