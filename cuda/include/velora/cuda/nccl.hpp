#pragma once
/// \file
/// `nccl_communicator`: the communicator concept (velora/distributed/communicator.hpp) over an
/// NCCL communicator and a CUDA stream, both owned by the caller (target velora::cuda_nccl; NCCL
/// ships with the CUDA toolkit or as libnccl-dev). Use it with `cuda_backend`: its all-reduce
/// works on device memory.
///
/// Ownership. The wrapper never creates, duplicates or destroys the NCCL communicator or the
/// stream; the caller keeps both alive (and the communicator's device current when a member is
/// called, as for cuda_backend) while this object is used. It owns two small device buffers of
/// its own: the staging area of `broadcast` (grown on first use to at most
/// `broadcast_chunk_bytes`, then reused) and the flag of `any` (one int, allocated on first use).
///
/// Streams. Every NCCL call and copy is queued on the caller's stream, so a collective is
/// ordered with the backend's kernels when the backend uses the same stream (pass the
/// cuda_context's stream to both). `all_reduce_sum` only queues work: it returns before the
/// sum is done, and the backend's next call on the stream sees the result. `broadcast` and `any`
/// synchronise the stream before they return, because their results are host memory.
///
/// Same bits on every rank. `all_reduce_sum` is one in-place ncclAllReduce with ncclSum. NCCL
/// documents that it "leaves identical copies of the result in each recvbuff" (NCCL API,
/// "Collective Communication Functions", ncclAllReduce) and that AllReduce "ends with identical
/// arrays" on every rank (User Guide, "Operations"); its maintainers confirm that every
/// algorithm reduces an element once and sends the result unchanged to every rank ("all ranks
/// should get the same value, always": github.com/NVIDIA/nccl/issues/855; also issues/434,
/// still open over a 2020 fp16 report of one node differing, answered as "should not happen").
/// That is the concept's promise, so no reduce-scatter + all-gather is needed here as it is
/// for MPI (mpi.hpp). What NCCL does not promise is the same bits for the same data
/// across different counts, algorithms or communicators (github.com/NVIDIA/nccl/issues/157): the
/// ranks agree with each other, not necessarily with a run that reduces in different pieces.
///
/// Counts are size_t in NCCL, so a span of any length is one call (no pieces as for MPI's ints).
///
/// Errors. A failed NCCL call throws `cuda_error` whose status has library `cuda_library::nccl`,
/// the ncclResult_t as its code and the message "<velora function>: <call> failed: <name>
/// (<ncclGetErrorString>)"; a failed copy or synchronisation throws the CUDA runtime's
/// cuda_error as everywhere in the backend. A root outside [0, size) is a caller mistake:
/// std::invalid_argument before any work. With a non-blocking communicator (ncclConfig_t
/// blocking = 0) a call that returns ncclInProgress is waited for through ncclCommGetAsyncError.
///
/// A plain C++ header: it needs the CUDA toolkit's include directory and nccl.h, not nvcc.
#include <nccl.h>

#include <algorithm>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>

#include <velora/core/error.hpp>
#include <velora/distributed/communicator.hpp>

#include "buffer.hpp"
#include "error.hpp"

namespace velora::cuda {

namespace detail {

inline const char* nccl_name(ncclResult_t r) noexcept {
    switch (r) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
#endif
    default: return "unknown NCCL result";
    }
}

inline cuda_status make_status(std::string_view function, std::string_view call, ncclResult_t e) {
    return {cuda_library::nccl, static_cast<int>(e),
            std::string(function) + ": " + std::string(call) + " failed: " + nccl_name(e) + " (" + ncclGetErrorString(e) + ")"};
}

/// Throws cuda_error when `result` (of `call` on `comm`, made by `function`) is a failure. On a
/// non-blocking communicator ncclInProgress means "still being enqueued": wait until NCCL reports
/// the outcome (NCCL's own recipe: poll ncclCommGetAsyncError).
inline void check_nccl(ncclResult_t result, [[maybe_unused]] ncclComm_t comm, std::string_view function, std::string_view call) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
    while (result == ncclInProgress) {
        ncclResult_t state = ncclSuccess;
        const ncclResult_t query = ncclCommGetAsyncError(comm, &state);
        if (query != ncclSuccess)
            throw cuda_error(make_status(function, std::string(call) + " returned ncclInProgress; ncclCommGetAsyncError", query));
        result = state;
    }
#endif
    if (result != ncclSuccess) throw cuda_error(make_status(function, call, result));
}

} // namespace detail

class nccl_communicator {
public:
    /// The largest piece `broadcast` stages through device memory at once (and so the most its
    /// staging buffer ever holds); longer byte strings go in pieces.
    static constexpr std::size_t broadcast_chunk_bytes = std::size_t{1} << 24;

    /// Wraps `comm` and `stream` (neither created nor destroyed: the caller keeps owning both).
    /// Reads the rank, size and device from `comm`; throws cuda_error (library nccl) when NCCL
    /// refuses it, e.g. for a null communicator. Allocates nothing.
    nccl_communicator(ncclComm_t comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
        constexpr const char* fn = "velora::cuda::nccl_communicator::nccl_communicator";
        detail::check_nccl(ncclCommUserRank(comm_, &rank_), comm_, fn, "ncclCommUserRank");
        detail::check_nccl(ncclCommCount(comm_, &size_), comm_, fn, "ncclCommCount");
        detail::check_nccl(ncclCommCuDevice(comm_, &device_), comm_, fn, "ncclCommCuDevice");
    }
    nccl_communicator(const nccl_communicator&) = delete;
    nccl_communicator& operator=(const nccl_communicator&) = delete;
    nccl_communicator(nccl_communicator&&) noexcept = default;
    nccl_communicator& operator=(nccl_communicator&&) noexcept = default;
    ~nccl_communicator() = default;

    [[nodiscard]] int rank() const noexcept { return rank_; }
    [[nodiscard]] int size() const noexcept { return size_; }
    /// The CUDA device of `comm` (ncclCommCuDevice).
    [[nodiscard]] int device() const noexcept { return device_; }
    [[nodiscard]] ncclComm_t native() const noexcept { return comm_; }
    [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

    /// In place on DEVICE memory: every rank ends with the same sum, bit for bit (see the file
    /// comment). Queued on the stream; does not synchronise it.
    void all_reduce_sum(std::span<float> data) { reduce(data.data(), data.size(), ncclFloat32); }
    void all_reduce_sum(std::span<double> data) { reduce(data.data(), data.size(), ncclFloat64); }

    /// HOST bytes from `root` to every rank: staged through the communicator's device buffer in
    /// pieces of at most broadcast_chunk_bytes (H2D on the root, ncclBroadcast, D2H on every rank,
    /// the root included), then the stream is synchronised.
    void broadcast(std::span<std::byte> bytes, int root) {
        constexpr const char* fn = "velora::cuda::nccl_communicator::broadcast";
        velora::detail::require(root >= 0 && root < size_, fn, "root ", root, " is not a rank of this ", size_, "-rank communicator");
        if (bytes.empty()) return;
        staging_.resize(std::min(bytes.size(), broadcast_chunk_bytes));
        for (std::size_t done = 0; done < bytes.size();) {
            const std::size_t n = std::min(bytes.size() - done, broadcast_chunk_bytes);
            std::byte* host = bytes.data() + done;
            if (rank_ == root)
                detail::check(cudaMemcpyAsync(staging_.data(), host, n, cudaMemcpyHostToDevice, stream_), fn, "cudaMemcpyAsync (host to device)");
            detail::check_nccl(ncclBroadcast(staging_.data(), staging_.data(), n, ncclUint8, root, comm_, stream_), comm_, fn, "ncclBroadcast");
            // Every rank reads back, the root too: one path for all ranks (and one a single-rank
            // test exercises completely).
            detail::check(cudaMemcpyAsync(host, staging_.data(), n, cudaMemcpyDeviceToHost, stream_), fn, "cudaMemcpyAsync (device to host)");
            done += n;
        }
        detail::check(cudaStreamSynchronize(stream_), fn, "cudaStreamSynchronize");
    }

    /// True on every rank when `flag` is true on some rank: an int on the device, ncclAllReduce
    /// with ncclMax, read back; synchronises the stream.
    [[nodiscard]] bool any(bool flag) {
        constexpr const char* fn = "velora::cuda::nccl_communicator::any";
        flag_.resize(1);
        int value = flag ? 1 : 0;
        detail::check(cudaMemcpyAsync(flag_.data(), &value, sizeof(int), cudaMemcpyHostToDevice, stream_), fn, "cudaMemcpyAsync (host to device)");
        detail::check_nccl(ncclAllReduce(flag_.data(), flag_.data(), 1, ncclInt32, ncclMax, comm_, stream_), comm_, fn, "ncclAllReduce");
        detail::check(cudaMemcpyAsync(&value, flag_.data(), sizeof(int), cudaMemcpyDeviceToHost, stream_), fn, "cudaMemcpyAsync (device to host)");
        detail::check(cudaStreamSynchronize(stream_), fn, "cudaStreamSynchronize");
        return value != 0;
    }

private:
    void reduce(void* data, std::size_t count, ncclDataType_t type) {
        if (count == 0) return;
        detail::check_nccl(ncclAllReduce(data, data, count, type, ncclSum, comm_, stream_), comm_, "velora::cuda::nccl_communicator::all_reduce_sum",
                           "ncclAllReduce");
    }

    ncclComm_t comm_;
    cudaStream_t stream_;
    int rank_ = 0, size_ = 1, device_ = 0;
    device_buffer<std::byte> staging_;   // broadcast's pieces
    device_buffer<int> flag_;            // any's flag
};
static_assert(velora::communicator<nccl_communicator>);

} // namespace velora::cuda
