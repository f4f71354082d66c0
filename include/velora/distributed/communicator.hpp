#pragma once
/// \file
/// `communicator`: what data-parallel training needs from a distributed engine, and the
/// single-process implementation.
///
/// Four collectives, each called by every rank in the same order:
///   all_reduce_sum(span<float | double>)  in place; the data lives where the backend keeps its
///                                         buffers (host memory for the CPU backend, device
///                                         memory for the CUDA backend). After the call every
///                                         rank holds the SAME bits: an implementation must not
///                                         let ranks sum in different orders (see mpi.hpp).
///   broadcast(span<std::byte>, root)      host bytes from `root` to every rank
///   any(bool)                             true on every rank when it is true on some rank
///   rank(), size()
/// The library's implementations: `single_process` (here), `mpi_communicator`
/// (velora/distributed/mpi.hpp, target velora::mpi) and `velora::cuda::nccl_communicator`
/// (cuda/include/velora/cuda/nccl.hpp, target velora::cuda_nccl). The caller owns the
/// underlying MPI or NCCL communicator (and the CUDA stream), as with the CUDA handles. A host
/// with its own engine (torch.distributed's process group, Gloo, ...) implements these members.
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "../core/error.hpp"
#include "../core/hash.hpp"

namespace velora {

template <class C>
concept communicator = requires(C& c, const C& cc, std::span<float> f, std::span<double> d, std::span<std::byte> bytes, bool flag) {
    { cc.rank() } -> std::convertible_to<int>;
    { cc.size() } -> std::convertible_to<int>;
    c.all_reduce_sum(f);
    c.all_reduce_sum(d);
    c.broadcast(bytes, 0);
    { c.any(flag) } -> std::same_as<bool>;
};

/// One process: every collective is the identity.
struct single_process {
    [[nodiscard]] static constexpr int rank() noexcept { return 0; }
    [[nodiscard]] static constexpr int size() noexcept { return 1; }
    static constexpr void all_reduce_sum(std::span<float>) noexcept {}
    static constexpr void all_reduce_sum(std::span<double>) noexcept {}
    static constexpr void broadcast(std::span<std::byte>, int) noexcept {}
    [[nodiscard]] static constexpr bool any(bool flag) noexcept { return flag; }
};
static_assert(communicator<single_process>);

/// The library's one hash (core/hash.hpp: 64-bit FNV-1a, continuing from `h`), for consistency
/// checks across ranks and state hashes; not cryptographic.
[[nodiscard]] inline std::uint64_t hash_bytes(std::span<const std::byte> bytes, std::uint64_t h = 0xcbf29ce484222325ULL) noexcept {
    return fnv1a64(bytes, h);
}

/// Whether `value` is the same on every rank (two small collectives: rank 0's value is broadcast,
/// then every rank says whether its own differs). Every rank gets the same answer.
template <communicator C>
[[nodiscard]] bool same_on_all_ranks(C& comm, std::uint64_t value) {
    std::uint64_t root = value;
    comm.broadcast(std::as_writable_bytes(std::span<std::uint64_t>(&root, 1)), 0);
    return !comm.any(root != value);
}

/// Gives every rank `root`'s byte string (e.g. a checkpoint written by rank 0): its length first,
/// then the bytes. `blob` is resized on the other ranks.
template <communicator C>
void broadcast_blob(C& comm, std::vector<std::byte>& blob, int root = 0) {
    std::uint64_t n = blob.size();
    comm.broadcast(std::as_writable_bytes(std::span<std::uint64_t>(&n, 1)), root);
    if (comm.rank() != root) blob.resize(static_cast<std::size_t>(n));
    comm.broadcast(std::span<std::byte>(blob), root);
}

} // namespace velora
