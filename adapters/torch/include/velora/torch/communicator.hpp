#pragma once
/// \file
/// `dynamic_communicator`: the library's communicator concept (velora/distributed/communicator.hpp)
/// behind virtual functions, so that AdaRankGradAdamW can be handed a host's engine at run time
/// (set_communicator) without becoming a template: the Python package implements it over
/// torch.distributed (any ProcessGroup), a C++ host may implement it over c10d or MPI.
///
/// An implementation's contract is the concept's: every rank calls the collectives in the same
/// order; all_reduce_sum leaves the SAME bits on every rank (a ring all-reduce, as Gloo's and
/// NCCL's, does: each chunk is summed once and then copied); buffers are host memory here (the
/// adapter runs the CPU backend). Errors thrown by a collective propagate out of the step.
#include <cstddef>
#include <span>

#include <velora/distributed/communicator.hpp>

namespace velora::torch {

class dynamic_communicator {
public:
    virtual ~dynamic_communicator() = default;
    [[nodiscard]] virtual int rank() const = 0;
    [[nodiscard]] virtual int size() const = 0;
    virtual void all_reduce_sum(std::span<float> data) = 0;
    virtual void all_reduce_sum(std::span<double> data) = 0;
    virtual void broadcast(std::span<std::byte> data, int root) = 0;
    [[nodiscard]] virtual bool any(bool flag) = 0;
};
static_assert(velora::communicator<dynamic_communicator>);

} // namespace velora::torch
