#pragma once
/// \file
/// What a backend provides so that frozen weights stored narrower than its value type (NF4,
/// bf16/f16) live in its memory and turn into value-type tiles there. Optional members, kept out
/// of the core `backend` concept (concepts.hpp): a backend without them simply cannot hold such
/// weights (the frozen weight types name the concept they need, so the error is at the type).
///
/// - copy_bytes_from_host(src, dst, bytes): raw bytes from host memory into the backend's
///   memory (packed codes, block scales, 16-bit weights), complete when it returns.
/// - dequantize_nf4(w, first_row, out): out[r, c] = Ŵ[first_row + r, c] for r < out.rows, every
///   column, Ŵ the NF4 weight `w` (nf4_layout.hpp) whose pointers are the backend's memory;
///   the same bits on every backend (nf4_layout.hpp's arithmetic).
/// The bf16/f16 tile needs nothing new: every backend already converts half and bfloat16 views
/// to its value type (`convert`, part of `backend`).
#include <cstddef>

#include "../concepts.hpp"
#include "../core/view.hpp"
#include "nf4_layout.hpp"

namespace velora {

template <class B>
concept byte_upload = backend<B> && requires(B& b, const void* src, void* dst, std::size_t bytes) { b.copy_bytes_from_host(src, dst, bytes); };

template <class B>
concept nf4_kernels = byte_upload<B> && requires(B& b, const nf4_blocks& w, index_t first_row, matrix_view<typename B::value_type> out) {
    b.dequantize_nf4(w, first_row, out);
};

} // namespace velora
