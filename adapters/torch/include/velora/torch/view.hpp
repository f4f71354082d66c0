#pragma once
/// \file
/// libtorch tensors as the library's row-major matrix views (velora::matrix_view).
///
/// Two ways in:
/// - `view_of<T>(tensor)` / `mutable_view_of<T>(tensor)`: zero-copy. The tensor must already be
///   what the library reads: a dense (strided) CPU tensor of dtype T whose memory is a row-major
///   matrix with a leading dimension. Anything else throws std::invalid_argument naming the
///   function, the argument and the tensor's shape, dtype, strides and device.
/// - `matrix_input<T>`: for data the caller does not control (gradients handed to a backward
///   pass, activations in half precision). It casts floating-point dtypes to T and copies layouts
///   a view cannot describe into a contiguous tensor that it owns; it still refuses what has no
///   meaning here (integer, bool or complex dtypes, other devices, sparse layouts).
///
/// Flattening. A tensor becomes a matrix by cutting its dimensions in two:
/// - `flatten::features_last` (activations): [..., D] → (Π leading sizes) × D;
/// - `flatten::outputs_first` (parameters): [O, ...] → O × (Π trailing sizes), so a convolution
///   kernel [O, C, kh, kw] is O × (C·kh·kw), GaLore's convention for >2-D weights.
/// A 0-D tensor is 1×1; a 1-D tensor of n elements is 1×n under either rule (the library's
/// convention for vectors). The trailing group must be contiguous (stride 1 along the flattened
/// columns) and the leading group must collapse into one row stride `ld`; dimensions of size 1
/// are ignored, since their stride never addresses memory.
///
/// Rows and strides:
/// - one row (or no row): `ld` is normalised to the width, whatever the tensor's row stride says
///   (torch gives a [1, D] slice of a larger tensor or a size-1 batch any stride);
/// - several rows with a row stride smaller than the width overlap (stride 0 from `expand`, e.g.
///   the gradient of `sum()`, or an `as_strided` window): `view_of` rejects them, `matrix_input`
///   materialises them;
/// - an empty tensor (0 rows, e.g. an empty batch, or 0 columns) gives an empty view with a null
///   pointer; the library's calls reject empty views, so callers branch on `empty()` first (the
///   adapter's module and optimizer do).
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <velora/core/error.hpp>
#include <velora/core/view.hpp>

namespace velora::torch {

/// How a tensor's dimensions become rows and columns (see the file comment).
enum class flatten : std::uint8_t {
    features_last = 0,   ///< [..., D] → (Π leading) × D: activations and their gradients
    outputs_first = 1,   ///< [O, ...] → O × (Π trailing): weights (>2-D kernels included)
};

/// The torch dtype of T (float → kFloat, double → kDouble).
template <class T>
constexpr c10::ScalarType dtype_of() noexcept {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "velora::torch supports float and double");
    return std::is_same_v<T, float> ? c10::ScalarType::Float : c10::ScalarType::Double;
}

namespace detail {

template <class Range>
std::string bracketed(const Range& r) {
    std::ostringstream os;
    os << '[';
    bool first = true;
    for (const auto x : r) {
        if (!first) os << ", ";
        os << x;
        first = false;
    }
    os << ']';
    return os.str();
}

/// "shape [2, 3], dtype Float, strides [3, 1], device cpu": what an error message says about a tensor.
inline std::string describe(const at::Tensor& t) {
    if (!t.defined()) return "an undefined tensor";
    std::ostringstream os;
    os << "shape " << bracketed(t.sizes()) << ", dtype " << t.scalar_type();
    if (t.layout() == c10::kStrided) os << ", strides " << bracketed(t.strides());
    else os << ", layout " << t.layout();
    os << ", device " << t.device();
    return os.str();
}

/// The matrix shape of `t` under rule `f`, and the leading dimension when its memory is a
/// row-major matrix (nullopt when it is not: overlapping rows, rows that are not evenly spaced,
/// columns that are not contiguous).
struct matrix_layout {
    index_t rows = 0, cols = 0;
    std::optional<index_t> ld;
};

inline matrix_layout layout_of(const at::Tensor& t, flatten f) {
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    const auto dims = static_cast<std::ptrdiff_t>(sizes.size());
    // Dimensions [0, split) are rows, [split, dims) columns. A vector is one row under both rules.
    std::ptrdiff_t split = 0;
    if (dims >= 2) split = f == flatten::features_last ? dims - 1 : 1;
    matrix_layout m;
    m.rows = 1;
    m.cols = 1;
    for (std::ptrdiff_t i = 0; i < split; ++i) m.rows *= sizes[static_cast<std::size_t>(i)];
    for (std::ptrdiff_t i = split; i < dims; ++i) m.cols *= sizes[static_cast<std::size_t>(i)];
    if (m.rows == 0 || m.cols == 0) {   // empty: nothing is addressed, any strides describe it
        m.ld = m.cols;
        return m;
    }
    // Columns: stride 1 along the flattened trailing group, walking from the last dimension.
    index_t expected = 1;
    for (std::ptrdiff_t i = dims - 1; i >= split; --i) {
        const auto k = static_cast<std::size_t>(i);
        if (sizes[k] == 1) continue;
        if (strides[k] != expected) return m;
        expected *= sizes[k];
    }
    if (m.rows == 1) {   // one row: the row stride never addresses memory
        m.ld = m.cols;
        return m;
    }
    // Rows: the leading group must be one evenly spaced dimension of stride ld >= cols.
    std::optional<index_t> ld;
    index_t step = 0;
    for (std::ptrdiff_t i = split - 1; i >= 0; --i) {
        const auto k = static_cast<std::size_t>(i);
        if (sizes[k] == 1) continue;
        if (!ld) {
            ld = strides[k];
            step = strides[k] * sizes[k];
        } else {
            if (strides[k] != step) return m;
            step *= sizes[k];
        }
    }
    if (*ld < m.cols) return m;   // rows overlap: stride 0 (expand) or a sliding window
    m.ld = ld;
    return m;
}

// The checks are written as `if (!ok) fail(...)`, not require(ok, ...): require's arguments, the
// tensor's description among them, would be formatted (allocated) on every call, also when the
// check passes, and an optimizer step calls this for every parameter.
inline void check_device_and_layout(const at::Tensor& t, std::string_view fn, std::string_view name) {
    if (!t.defined()) velora::detail::fail(fn, "argument '", name, "' is an undefined tensor");
    if (t.layout() != c10::kStrided)
        velora::detail::fail(fn, "argument '", name, "' (", describe(t), ") is not a dense (strided) tensor; sparse and other layouts are not supported");
    if (!t.device().is_cpu())
        velora::detail::fail(fn, "argument '", name, "' (", describe(t),
                             ") is not on the CPU; velora::torch works on CPU tensors (the CUDA backend is velora::cuda)");
}

template <class T>
matrix_view<T> view_impl(const at::Tensor& t, std::string_view fn, std::string_view name, flatten f) {
    check_device_and_layout(t, fn, name);
    const c10::ScalarType want = dtype_of<std::remove_const_t<T>>();
    if (t.scalar_type() != want) {
        const bool floating = at::isFloatingType(t.scalar_type());
        velora::detail::fail(fn, "argument '", name, "' (", describe(t), ") has dtype ", t.scalar_type(), " but ", want, " is required",
                             floating ? "; velora::torch::matrix_input casts floating-point tensors (a copy)"
                                      : "; integer, bool and complex tensors have no meaning here");
    }
    if (t.is_neg() || t.is_conj())
        velora::detail::fail(fn, "argument '", name, "' (", describe(t),
                             ") is a lazily negated or conjugated view whose memory does not hold its values; call resolve_neg() first");
    const matrix_layout m = layout_of(t, f);
    if (!m.ld) {
        velora::detail::fail(fn, "argument '", name, "' (", describe(t), ") is not a row-major matrix of ", m.rows, "x", m.cols,
                             " (", f == flatten::features_last ? "[..., D] flattened to rows x D" : "[O, ...] flattened to O x rest",
                             "): its columns are not contiguous, its rows overlap (stride 0 from expand(), e.g. the gradient of sum()) or "
                             "they are not evenly spaced; call contiguous() or use velora::torch::matrix_input, which copies");
    }
    if (m.rows == 0 || m.cols == 0) return {nullptr, m.rows, m.cols, m.cols};
    return {static_cast<T*>(t.data_ptr()), m.rows, m.cols, *m.ld};
}

} // namespace detail

/// A zero-copy read-only view of `t` as a (rows × cols) matrix, flattened by `f`. Throws
/// std::invalid_argument (naming `name` and the tensor's shape, dtype, strides and device) for an
/// undefined, non-CPU or non-strided tensor, a dtype other than T, a lazily negated view, or a
/// layout that is not a row-major matrix (see the file comment). An empty tensor gives an
/// empty view.
template <class T>
[[nodiscard]] const_matrix_view<T> view_of(const at::Tensor& t, std::string_view name = "tensor", flatten f = flatten::features_last) {
    return detail::view_impl<const T>(t, "velora::torch::view_of", name, f);
}

/// As view_of, writable: for tensors the library updates in place (weights, outputs). The
/// caller bumps the tensor's version counter after writing through it (torch cannot see writes
/// through a raw pointer; see bump_version).
template <class T>
[[nodiscard]] matrix_view<T> mutable_view_of(const at::Tensor& t, std::string_view name = "tensor", flatten f = flatten::features_last) {
    return detail::view_impl<T>(t, "velora::torch::mutable_view_of", name, f);
}

/// Marks an in-place write to `t` that bypassed torch (through a view's pointer): autograd then
/// refuses a backward that saved the old values ("modified by an inplace operation") instead of
/// using them silently.
inline void bump_version(const at::Tensor& t) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

/// A floating-point CPU tensor read as a matrix of T, copying only when it must: a dtype other
/// than T (half, bfloat16, the other of float/double) is cast, and a layout view_of rejects
/// (stride-0 rows from expand(), a transpose, a lazily negated view) is made contiguous. What
/// has no meaning (undefined, integer/bool/complex, non-CPU, sparse) throws std::invalid_argument
/// naming `function`, `name` and the tensor. The tensor viewed is kept alive by this object.
template <class T>
class matrix_input {
public:
    matrix_input(const at::Tensor& t, std::string_view name, flatten f = flatten::features_last,
                 std::string_view function = "velora::torch::matrix_input") {
        detail::check_device_and_layout(t, function, name);
        const c10::ScalarType st = t.scalar_type();
        if (!at::isFloatingType(st))
            velora::detail::fail(function, "argument '", name, "' (", detail::describe(t),
                                 ") is not a floating-point tensor; integer, bool and complex tensors have no meaning here");
        held_ = t;
        if (st != dtype_of<T>()) {
            // A cast copies anyway: into a contiguous tensor, so that no second copy is needed below.
            held_ = t.to(dtype_of<T>(), /*non_blocking=*/false, /*copy=*/false, c10::MemoryFormat::Contiguous);
            copied_ = true;
        }
        if (held_.is_neg() || held_.is_conj() || !detail::layout_of(held_, f).ld) {
            held_ = held_.resolve_neg().contiguous();
            copied_ = true;
        }
        view_ = detail::view_impl<const T>(held_, function, name, f);
    }

    [[nodiscard]] const_matrix_view<T> view() const noexcept { return view_; }
    /// Whether a copy was made (a cast or a materialised layout).
    [[nodiscard]] bool copied() const noexcept { return copied_; }
    /// The tensor the view points into (the argument itself, or the copy).
    [[nodiscard]] const at::Tensor& tensor() const noexcept { return held_; }

private:
    at::Tensor held_;
    const_matrix_view<T> view_;
    bool copied_ = false;
};

} // namespace velora::torch
