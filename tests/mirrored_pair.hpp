#pragma once
// Two data-parallel ranks that hold the same gradients, as rank `r` sees them: a sum over the
// ranks is twice the value, so the mean over ranks is the value itself, exactly. A step through
// it takes the data-parallel path (the all-reduces, the ranks' agreement) and must give the bits
// of one process stepping on that gradient alone: the optimizer's promise of the same bits at
// any number of ranks, checked in one process.
#include <velora/distributed/communicator.hpp>

#include <cstddef>
#include <span>

namespace test {

struct mirrored_pair {
    int r = 0;
    [[nodiscard]] int rank() const noexcept { return r; }
    [[nodiscard]] static int size() noexcept { return 2; }
    static void all_reduce_sum(std::span<float> x) noexcept {
        for (float& e : x) e *= 2;
    }
    static void all_reduce_sum(std::span<double> x) noexcept {
        for (double& e : x) e *= 2;
    }
    static void broadcast(std::span<std::byte>, int) noexcept {}
    [[nodiscard]] static bool any(bool flag) noexcept { return flag; }
};
static_assert(velora::communicator<mirrored_pair>);

} // namespace test
