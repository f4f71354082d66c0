#pragma once
/// \file
/// `mpi_communicator`: the communicator concept over an MPI communicator the caller owns
/// (target velora::mpi; Debian: libopenmpi-dev, openmpi-bin). Host memory only: use it with the
/// CPU backend (for the CUDA backend use velora::cuda::nccl_communicator).
///
/// Every rank must hold the same bits after an all-reduce, or bases computed from sums that
/// differ in the last bit drift apart. MPI_Allreduce does not promise that for P > 2 (the
/// standard only recommends that a reduction give the same result for the same arguments in
/// the same order), so from 3 ranks on the all-reduce is a reduce-scatter followed by an
/// all-gather: each element is summed once, by the rank that owns its block, and the others
/// receive copies, moving the same bytes as a ring all-reduce (2·(P−1)/P of the data per rank).
/// With 2 ranks MPI_Allreduce is used: whatever its algorithm, each element is one addition of
/// the two ranks' values, and IEEE addition is commutative, so both ranks get the same bits (and
/// it was 1.5–2× faster than the two collectives in bench_distributed).
///
/// MPI errors: with the communicator's default handler (MPI_ERRORS_ARE_FATAL) MPI aborts; with
/// MPI_ERRORS_RETURN a failed call throws std::runtime_error naming the call and MPI's message.
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "communicator.hpp"

namespace velora {

class mpi_communicator {
public:
    /// Wraps `comm` (not duplicated, not freed: the caller keeps owning it; MPI must be
    /// initialised and stay so while this object is used).
    explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
        check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
        check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
        counts_.resize(static_cast<std::size_t>(size_));
        displacements_.resize(static_cast<std::size_t>(size_));
    }

    [[nodiscard]] int rank() const noexcept { return rank_; }
    [[nodiscard]] int size() const noexcept { return size_; }
    [[nodiscard]] MPI_Comm native() const noexcept { return comm_; }

    void all_reduce_sum(std::span<float> data) { reduce(data.data(), data.size(), MPI_FLOAT); }
    void all_reduce_sum(std::span<double> data) { reduce(data.data(), data.size(), MPI_DOUBLE); }

    void broadcast(std::span<std::byte> bytes, int root) {
        std::byte* p = bytes.data();
        for (std::size_t left = bytes.size(); left > 0;) {
            const std::size_t n = std::min<std::size_t>(left, INT_MAX);
            check(MPI_Bcast(p, static_cast<int>(n), MPI_BYTE, root, comm_), "MPI_Bcast");
            p += n;
            left -= n;
        }
    }

    [[nodiscard]] bool any(bool flag) {
        int local = flag ? 1 : 0, global = 0;
        check(MPI_Allreduce(&local, &global, 1, MPI_INT, MPI_LOR, comm_), "MPI_Allreduce");
        return global != 0;
    }

private:
    // In place: MPI_Allreduce for 2 ranks, reduce_scatter_gather from 3 (see the file comment).
    template <class T>
    void reduce(T* data, std::size_t count, MPI_Datatype type) {
        if (size_ == 1 || count == 0) return;
        if (size_ == 2) {
            for (std::size_t done = 0; done < count;) {
                const std::size_t n = std::min<std::size_t>(count - done, INT_MAX);
                check(MPI_Allreduce(MPI_IN_PLACE, data + done, static_cast<int>(n), type, MPI_SUM, comm_), "MPI_Allreduce");
                done += n;
            }
            return;
        }
        reduce_scatter_gather(data, count, type);
    }

    // In place, in pieces whose counts and displacements fit MPI's ints. Each piece: rank i owns the
    // i-th of P nearly equal blocks; MPI_Reduce_scatter with MPI_IN_PLACE leaves the owner's
    // summed block at the start of the buffer, which is moved to the block's place before the
    // in-place MPI_Allgatherv gives everyone every block.
    // Out of line on purpose: inlined into a caller that reduces a small buffer on its stack,
    // GCC 12 cannot see that the guarded move below never runs for it and warns
    // (-Wstringop-overflow); the call costs nothing next to two collectives.
    template <class T>
    [[gnu::noinline]] void reduce_scatter_gather(T* data, std::size_t count, MPI_Datatype type) {
        const auto p = static_cast<std::size_t>(size_);
        const std::size_t piece_max = std::size_t{1} << 30;
        for (std::size_t done = 0; done < count;) {
            const std::size_t n = std::min(count - done, piece_max);
            T* piece = data + done;
            std::size_t offset = 0;
            for (std::size_t i = 0; i < p; ++i) {
                const std::size_t block = n / p + (i < n % p ? 1 : 0);
                counts_[i] = static_cast<int>(block);
                displacements_[i] = static_cast<int>(offset);
                offset += block;
            }
            check(MPI_Reduce_scatter(MPI_IN_PLACE, piece, counts_.data(), type, MPI_SUM, comm_), "MPI_Reduce_scatter");
            const auto mine = static_cast<std::size_t>(rank_);
            if (displacements_[mine] != 0 && counts_[mine] > 0)
                std::memmove(piece + displacements_[mine], piece, static_cast<std::size_t>(counts_[mine]) * sizeof(T));
            check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, piece, counts_.data(), displacements_.data(), type, comm_), "MPI_Allgatherv");
            done += n;
        }
    }

    static void check(int rc, const char* call) {
        if (rc == MPI_SUCCESS) return;
        char text[MPI_MAX_ERROR_STRING];
        int length = 0;
        MPI_Error_string(rc, text, &length);
        throw std::runtime_error(std::string("velora::mpi_communicator: ") + call + " failed: " + std::string(text, static_cast<std::size_t>(length)));
    }

    MPI_Comm comm_;
    int rank_ = 0, size_ = 1;
    std::vector<int> counts_, displacements_;   // sized once: a collective allocates nothing
};
static_assert(communicator<mpi_communicator>);

} // namespace velora
