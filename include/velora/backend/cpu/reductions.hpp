#pragma once
/// \file
/// Reductions of the CPU backend whose bits depend neither on timing nor on the thread count:
/// each part (cut by the shape alone, fixed_parts) accumulates into its own scratch, and the
/// parts' results are then added in part order.
#include <Eigen/Core>

#include <cstddef>
#include <vector>

#include "../../core/buffer.hpp"
#include "../../core/view.hpp"
#include "lanes.hpp"
#include "threading.hpp"

namespace velora::cpu {

template <class T>
class reducer {
public:
    reducer() : scratch_(max_parts), partials_(max_parts) {}

    /// Sizes every part's scratch for column sums up to `width` wide, so that no later
    /// column_sums of that width or less allocates (the first one otherwise would, per part).
    void reserve(index_t width) {
        for (scratch& s : scratch_) {
            if (s.block.capacity() < static_cast<std::size_t>(width)) s.block.resize(static_cast<std::size_t>(width));
            if (s.total.capacity() < static_cast<std::size_t>(width)) s.total.resize(static_cast<std::size_t>(width));
        }
    }
    /// Bytes reserve(width) holds.
    [[nodiscard]] static std::size_t workspace_bytes(index_t width) {
        return static_cast<std::size_t>(max_parts) * static_cast<std::size_t>(width) * (sizeof(T) + sizeof(double));
    }

    /// out[j] = Σ_rows of what add_row(t, acc) adds into a width-long accumulator row: rows are
    /// folded in T, a block of 64 rows at a time, into a double accumulator per part.
    template <class RowFn>
    void column_sums(int threads, index_t rows, index_t width, index_t work, T* out, RowFn&& add_row) {
        const int parts = fixed_parts(rows, work);
        for (int p = 0; p < parts; ++p) {
            scratch_[p].block.resize(static_cast<std::size_t>(width));
            scratch_[p].total.resize(static_cast<std::size_t>(width));
        }
        parallel_for_parts(threads, parts, [&](int part) {
            const auto [first, last] = part_range(rows, parts, part);
            auto& scratch = scratch_[part];
            Eigen::Map<Eigen::VectorXd> total(scratch.total.data(), width);
            Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>> block(scratch.block.data(), width);
            total.setZero();
            constexpr index_t rows_per_block = 64;
            for (index_t t0 = first; t0 < last; t0 += rows_per_block) {
                block.setZero();
                for (index_t t = t0; t < std::min(last, t0 + rows_per_block); ++t) add_row(t, scratch.block.data());
                total += block.template cast<double>();
            }
        });
        Eigen::Map<Eigen::VectorXd> sum(scratch_[0].total.data(), width);
        for (int p = 1; p < parts; ++p) sum += Eigen::Map<Eigen::VectorXd>(scratch_[p].total.data(), width);
        Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>(out, width) = sum.template cast<T>();
    }

    /// Σ a[i, j]², accumulated in double; Inf or NaN in a gives a non-finite result.
    double sum_of_squares(int threads, const_matrix_view<T> a) {
        const int parts = fixed_parts(a.rows, a.size());
        parallel_for_parts(threads, parts, [&](int part) {
            const auto [first, last] = part_range(a.rows, parts, part);
            double sum = 0;
            for (index_t r = first; r < last; ++r) sum += sum_of_squares_in_lanes(a.row(r), a.cols);
            partials_[static_cast<std::size_t>(part)] = sum;
        });
        double total = 0;
        for (int p = 0; p < parts; ++p) total += partials_[static_cast<std::size_t>(p)];
        return total;
    }

private:
    struct scratch {
        host_buffer<T> block;
        host_buffer<double> total;
    };
    std::vector<scratch> scratch_;
    std::vector<double> partials_;
};

} // namespace velora::cpu
