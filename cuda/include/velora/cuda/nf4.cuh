#pragma once
/// \file
/// The NF4 dequantisation kernel of the CUDA backend (cuda_backend::dequantize_nf4): a tile of
/// rows of an NF4 weight whose packed codes and absmaxes are in device memory, written as T.
/// The arithmetic is nf4_layout.hpp's, compiled for the device: ŵ = nf4_code(nibble) · absmax
/// (one float multiplication; the double-quantised absmax rebuilt with an explicit fma), so the
/// tile holds the same bits as the CPU backend's.
#include <cuda_runtime.h>

#include <velora/quant/nf4_layout.hpp>

namespace velora::cuda::kernels {

/// out[r, c] = Ŵ[first_row + r, c] for r < rows, every column: one thread per packed byte (two
/// neighbouring weights of a row, in one block since the block size is even), grid-stride.
template <class T>
__global__ void dequantize_nf4(nf4_blocks w, long long first_row, long long rows, T* out, long long ld) {
    const long long half_cols = w.cols / 2;
    const long long bytes = rows * half_cols;
    const long long bpr = w.blocks_per_row();
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < bytes;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long r = i / half_cols, p = i % half_cols;
        const long long row = first_row + r;
        const unsigned byte = w.codes[row * half_cols + p];
        const float a = nf4_block_absmax(w, row * bpr + (2 * p) / w.block_size);
        out[r * ld + 2 * p] = static_cast<T>(nf4_code(byte >> 4) * a);
        out[r * ld + 2 * p + 1] = static_cast<T>(nf4_code(byte & 0x0fu) * a);
    }
}

} // namespace velora::cuda::kernels
