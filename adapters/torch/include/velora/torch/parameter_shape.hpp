#pragma once
/// \file
/// How AdaRankGradAdamW sees a parameter tensor as a matrix: a 0-D parameter is 1×1, a 1-D one
/// 1×n (both always dense); a 2-D one is rows×cols; one of more dimensions [O, ...] is
/// O × (Π rest), GaLore's convention, low-rank eligible or not by `higher_dims`.
#include <ATen/ATen.h>

#include <cstdint>

#include <velora/core/view.hpp>

namespace velora::torch {

/// How a parameter of three or more dimensions [O, ...] is optimised. Either way it is seen as
/// the O × (Π rest) matrix (a view of its memory); `flatten` lets it be low-rank like a 2-D
/// weight (per the group's `kind`), `dense` always gives it dense AdamW.
enum class higher_dims : std::uint8_t { flatten = 0, dense = 1 };

/// A parameter's matrix shape, and whether it must be optimised densely whatever the group's kind.
struct parameter_matrix {
    index_t rows = 0, cols = 0;
    bool force_dense = false;
};

inline parameter_matrix parameter_matrix_of(const at::Tensor& p, higher_dims nd) {
    parameter_matrix s;
    if (p.dim() <= 1) {   // a scalar is 1x1, a vector 1xn: dense
        s.rows = 1;
        s.cols = p.numel();
        s.force_dense = true;
        return s;
    }
    s.rows = p.size(0);
    s.cols = s.rows == 0 ? 0 : p.numel() / s.rows;
    s.force_dense = p.dim() > 2 && nd == higher_dims::dense;
    return s;
}

} // namespace velora::torch
