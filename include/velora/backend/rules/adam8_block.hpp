#pragma once
/// \file
/// Adam(W) on one block of 8-bit blockwise moments (dynamic_code.hpp), written once for the CPU
/// scalar body (cpu/adam8.hpp, the reference its vector bodies match) and the CUDA kernels
/// (cuda/adam8.cuh): every function here is VELORA_HOST_DEVICE. A block is done in three steps:
///  1. update_lane: each element's m and v decoded (value·absmax, one product), adam_element's
///     update run, `out` written, the new moments kept in block-sized buffers, and the largest
///     |m|, v and whether everything was finite gathered;
///  2. the lanes' maxima combined (a maximum is exact in any order) and made stored_absmax;
///  3. encode_lane: the buffers encoded with the new absmax.
/// A lane is every `stride`-th element from `first`: the CPU runs one lane (0, 1), a CUDA thread
/// block one per thread. Every element's arithmetic is exactly rounded and the same on both
/// sides, and the maximum is order-free, so the bytes, the absmax and `out` are the same bits
/// however the block's elements are shared among lanes.
///
/// A block whose new m, v or out is not finite is not encoded (its bytes and absmax are left as
/// they were, `out` is written): the caller must discard it. An all-zero block, or one whose largest
/// value is below the smallest normal float, stores absmax 0 and zero bytes (code 0 is 0 in both
/// codes).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../../core/host_device.hpp"
#include "../../core/view.hpp"
#include "adam_element.hpp"
#include "dynamic_code.hpp"

namespace velora::rules {

/// The largest block the bodies take (the CPU bodies keep two blocks of floats on the stack, the
/// CUDA kernel in shared memory).
inline constexpr index_t adam8_max_block = 4096;

/// One block's state: n bytes of each moment and their absmax.
struct adam8_block_state {
    std::uint8_t* qm;
    std::uint8_t* qv;
    float* absmax_m;
    float* absmax_v;
};

/// A tensor's 8-bit moments: `count` elements in blocks of `block` (the last one may be shorter),
/// bytes qm, qv (count each) and absmax per block (ceil(count / block) each), in the memory of
/// the backend that updates them.
struct adam8_tensor_state {
    std::uint8_t* qm;
    std::uint8_t* qv;
    float* absmax_m;
    float* absmax_v;
    index_t count, block;
    [[nodiscard]] VELORA_HOST_DEVICE index_t blocks() const noexcept { return (count + block - 1) / block; }
    /// Block b's state (b < blocks()).
    [[nodiscard]] VELORA_HOST_DEVICE adam8_block_state at(index_t b) const noexcept {
        const index_t first = b * block;
        return {qm + first, qv + first, absmax_m + b, absmax_v + b};
    }
    /// Block b's number of elements.
    [[nodiscard]] VELORA_HOST_DEVICE index_t size_of(index_t b) const noexcept { return count - b * block < block ? count - b * block : block; }
};

namespace adam8 {

/// A block whose largest value is below the smallest normal float (its reciprocal would overflow)
/// is stored as zeros: such moments are invisible next to ε, which is at least that large
/// (adamw_rule.hpp: check_eps_representable).
VELORA_HOST_DEVICE inline float stored_absmax(float largest) noexcept { return largest >= std::numeric_limits<float>::min() ? largest : 0.0f; }

VELORA_HOST_DEVICE inline bool finite_value(float x) noexcept { return std::fabs(x) <= std::numeric_limits<float>::max(); }

/// value[q]·absmax as one rounded product that no compiler contracts into the update's first add
/// (a plain product could be, differently in each body).
template <class Ops>
VELORA_HOST_DEVICE inline float decoded(const dynamic_code& code, std::uint8_t q, float absmax) noexcept {
    return Ops::product(code.value[q], absmax);
}

/// What a lane of pass 1 gathers.
struct lane_result {
    float max_m = 0, max_v = 0;
    bool finite = true;
};

/// Pass 1 over elements first, first + stride, … < n of one block: see the file comment. nm and
/// nv (n floats each) receive the new moments; g and out may be the same array.
template <adam_row_kind K, class Ops>
VELORA_HOST_DEVICE inline lane_result update_lane(const dynamic_code& cm, const dynamic_code& cv, const float* g, float* out, adam8_block_state s,
                                                  index_t n, const adamw_terms<float>& c, float* nm, float* nv, index_t first,
                                                  index_t stride) noexcept {
    const float am = *s.absmax_m, av = *s.absmax_v, minus_step = -c.step;
    const bool decays = c.decay != 1.0f;
    lane_result r;
    for (index_t j = first; j < n; j += stride) {
        float m = decoded<Ops>(cm, s.qm[j], am), v = decoded<Ops>(cv, s.qv[j], av), o = K == adam_row_kind::moments ? 0.0f : out[j];
        adam_element<K, Ops>(g[j], m, v, o, c.beta1, c.c1, c.beta2, c.c2, c.bias2_sqrt, c.eps, minus_step, c.decay, decays);
        out[j] = o;
        nm[j] = m;
        nv[j] = v;
        r.finite = r.finite && finite_value(m) && finite_value(v) && finite_value(o);
        r.max_m = std::max(r.max_m, std::fabs(m));
        r.max_v = std::max(r.max_v, std::fabs(v));
    }
    return r;
}

/// Pass 2 over elements first, first + stride, … < n: x (finite) encoded into q with the block's
/// stored absmax (0: zero bytes).
VELORA_HOST_DEVICE inline void encode_lane(const dynamic_code& code, const float* x, std::uint8_t* q, index_t first, index_t stride, index_t n,
                                           float absmax) noexcept {
    if (absmax == 0.0f) {
        for (index_t j = first; j < n; j += stride) q[j] = 0;
        return;
    }
    const float inv = dynamic_code::reciprocal(absmax);
    for (index_t j = first; j < n; j += stride) q[j] = code.encode(x[j], inv);
}

/// The largest |x| of elements first, first + stride, … < n.
VELORA_HOST_DEVICE inline float largest_lane(const float* x, index_t first, index_t stride, index_t n) noexcept {
    float largest = 0;
    for (index_t j = first; j < n; j += stride) largest = std::max(largest, std::fabs(x[j]));
    return largest;
}

/// A whole block of n elements on one lane (the CPU scalar body; the reference the CUDA kernel's
/// lanes match): false, with the bytes and absmax unchanged, when a result is not finite.
template <adam_row_kind K, class Ops>
VELORA_HOST_DEVICE inline bool block(const dynamic_code& cm, const dynamic_code& cv, const float* g, float* out, adam8_block_state s, index_t n,
                                     const adamw_terms<float>& c, float* nm, float* nv) noexcept {
    const lane_result r = update_lane<K, Ops>(cm, cv, g, out, s, n, c, nm, nv, 0, 1);
    if (!r.finite) return false;
    const float max_m = stored_absmax(r.max_m), max_v = stored_absmax(r.max_v);
    encode_lane(cm, nm, s.qm, 0, 1, n, max_m);
    encode_lane(cv, nv, s.qv, 0, 1, n, max_v);
    *s.absmax_m = max_m;
    *s.absmax_v = max_v;
    return true;
}

/// Encodes n finite floats as one block on one lane: absmax = their largest |x| (0 below the
/// smallest normal float), then the bytes.
VELORA_HOST_DEVICE inline void encode_block(const dynamic_code& code, const float* x, std::uint8_t* q, index_t n, float& absmax) noexcept {
    absmax = stored_absmax(largest_lane(x, 0, 1, n));
    encode_lane(code, x, q, 0, 1, n, absmax);
}

} // namespace adam8
} // namespace velora::rules
