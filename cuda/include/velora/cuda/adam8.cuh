#pragma once
/// \file
/// The kernels of the CUDA backend's 8-bit blockwise Adam moments (cuda_backend::adam8_update,
/// adam8_decode, adam8_encode). One thread block per quantisation block: its threads share the
/// block's elements as lanes of backend/rules/adam8_block.hpp (thread t takes elements t, t + 256,
/// …), keep the new moments in shared memory, combine their maxima by a fixed tree in shared
/// memory (no atomics; a maximum of finite values is exact in any order anyway) and encode. The
/// per-element arithmetic is the rule's, the same functions the CPU scalar body runs on one lane,
/// so the bytes, the absmax and `out` are the CPU backend's bits.
///
/// The code tables (two rules::dynamic_code) are read from device memory the backend fills once.
#include <cuda_runtime.h>

#include <algorithm>

#include <velora/backend/rules/adam8_block.hpp>

#include "kernels.cuh"

namespace velora::cuda::kernels {

/// Threads per quantisation block (a power of two, for the tree).
constexpr int kAdam8Threads = 256;

/// The largest of every thread's x, by a fixed tree over `scratch` (kAdam8Threads floats of
/// shared memory); every thread gets it. Begins and ends with a barrier.
__device__ inline float adam8_block_max(float* scratch, float x) {
    const int t = static_cast<int>(threadIdx.x);
    __syncthreads();   // scratch may still be read from the previous call
    scratch[t] = x;
    __syncthreads();
    for (int width = kAdam8Threads / 2; width > 0; width /= 2) {
        if (t < width) scratch[t] = std::max(scratch[t], scratch[t + width]);
        __syncthreads();
    }
    return scratch[0];
}

/// One quantisation block per thread block (gridDim.x = s.blocks()), kAdam8Threads threads,
/// 2·s.block floats of dynamic shared memory. A block whose result is not finite sets *bad
/// (an int: every such block writes 1) and leaves its bytes and absmax as they were.
template <rules::adam_row_kind K>
__global__ void __launch_bounds__(kAdam8Threads)
    adam8_update(const rules::dynamic_code* codes, const float* g, float* out, rules::adam8_tensor_state s, rules::adamw_terms<float> c, int* bad) {
    extern __shared__ float adam8_moments[];   // the block's new m, then its new v
    __shared__ float scratch[kAdam8Threads];
    const index b = blockIdx.x;
    const index first = b * s.block, n = s.size_of(b);
    const rules::adam8_block_state bs = s.at(b);
    float* nm = adam8_moments;
    float* nv = adam8_moments + s.block;
    const int t = static_cast<int>(threadIdx.x);
    const rules::adam8::lane_result r =
        rules::adam8::update_lane<K, device_ops>(codes[0], codes[1], g + first, out + first, bs, n, c, nm, nv, t, kAdam8Threads);
    if (__syncthreads_and(r.finite ? 1 : 0) == 0) {   // every thread has read the old absmax
        if (t == 0) *bad = 1;
        return;
    }
    const float am = rules::adam8::stored_absmax(adam8_block_max(scratch, r.max_m));
    const float av = rules::adam8::stored_absmax(adam8_block_max(scratch, r.max_v));
    rules::adam8::encode_lane(codes[0], nm, bs.qm, t, kAdam8Threads, n, am);
    rules::adam8::encode_lane(codes[1], nv, bs.qv, t, kAdam8Threads, n, av);
    if (t == 0) {
        *bs.absmax_m = am;
        *bs.absmax_v = av;
    }
}

/// x (count finite floats) encoded in blocks of `block` with `code`: one quantisation block per
/// thread block, kAdam8Threads threads; rules::adam8::encode_block's bits.
__global__ void __launch_bounds__(kAdam8Threads)
    adam8_encode(const rules::dynamic_code* code, const float* x, index count, index block, std::uint8_t* q, float* absmax) {
    const index b = blockIdx.x;
    const index first = b * block, n = count - first < block ? count - first : block;
    const int t = static_cast<int>(threadIdx.x);
    __shared__ float scratch[kAdam8Threads];
    const float a = rules::adam8::stored_absmax(adam8_block_max(scratch, rules::adam8::largest_lane(x + first, t, kAdam8Threads, n)));
    rules::adam8::encode_lane(*code, x + first, q + first, t, kAdam8Threads, n, a);
    if (t == 0) absmax[b] = a;
}

} // namespace velora::cuda::kernels
