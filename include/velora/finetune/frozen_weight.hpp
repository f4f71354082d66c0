#pragma once
/// \file
/// The frozen base weight W (O×D) of a fine-tuned linear layer: what a layer needs from it is
/// two products, y = x·Wᵀ (forward) and dX = dY·W (input gradient), never dW. How W is stored
/// (float in backend memory, bf16/f16, NF4) is the implementation's business; a storage that is
/// not the backend's value type turns W into value-type tiles inside a caller-owned workspace of
/// `workspace_elements()` values and calls the backend's GEMM per tile, so no call ever holds a
/// dense copy of W.
///
/// `frozen_weight` is an extension point: a host can store its base weights any way it likes
/// (another 4-bit code, weights paged from disk) by implementing these members.
#include <concepts>
#include <cstddef>
#include <span>

#include "../concepts.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"

namespace velora {

/// W (O×D) for the two products of a linear layer over backend `W::backend_type`.
/// - forward(b, x, y, workspace): y = x·Wᵀ (T×O), overwriting y;
/// - input_grad(b, dy, dx, workspace): dX = dY·W (T×D), overwriting dx;
/// - workspace_elements(): the backend-memory values those calls need (0 when W is used as is);
/// - stored_bytes(): the bytes W occupies as stored (NF4: packed codes and block scales).
/// Outputs may not overlap the inputs or W (std::invalid_argument, as layers.hpp).
template <class W>
concept frozen_weight = backend<typename W::backend_type> &&
    std::same_as<typename W::value_type, typename W::backend_type::value_type> &&
    requires(const W& w, typename W::backend_type& b, const_matrix_view<typename W::value_type> in,
             matrix_view<typename W::value_type> out, std::span<typename W::value_type> workspace) {
        { w.rows() } -> std::same_as<index_t>;
        { w.cols() } -> std::same_as<index_t>;
        { w.workspace_elements() } -> std::convertible_to<std::size_t>;
        { w.stored_bytes() } -> std::convertible_to<std::size_t>;
        w.forward(b, in, out, workspace);
        w.input_grad(b, in, out, workspace);
    };

/// A base weight kept in the backend's own value type, read in place (not owned: the host keeps
/// W alive and unchanged while the layer uses it).
template <backend B>
class dense_frozen_weight {
public:
    using backend_type = B;
    using value_type = typename B::value_type;

    explicit dense_frozen_weight(const_matrix_view<value_type> w) : w_(w) {
        check_view(w, "velora::dense_frozen_weight", "w");
        detail::require(w.rows > 0 && w.cols > 0, "velora::dense_frozen_weight", "argument 'w' is ", w.rows, "x", w.cols,
                        " but must have at least one row and one column");
    }

    [[nodiscard]] index_t rows() const noexcept { return w_.rows; }
    [[nodiscard]] index_t cols() const noexcept { return w_.cols; }
    [[nodiscard]] std::size_t workspace_elements() const noexcept { return 0; }
    [[nodiscard]] std::size_t stored_bytes() const noexcept {
        return static_cast<std::size_t>(w_.rows) * static_cast<std::size_t>(w_.cols) * sizeof(value_type);
    }
    [[nodiscard]] const_matrix_view<value_type> view() const noexcept { return w_; }

    void forward(B& b, const_matrix_view<value_type> x, matrix_view<value_type> y, std::span<value_type> /*workspace*/) const {
        constexpr const char* fn = "velora::dense_frozen_weight::forward";
        check_shape(x, x.rows, w_.cols, fn, "x");
        check_shape(y, x.rows, w_.rows, fn, "y");
        check_no_alias(y, "y", x, "x", fn);
        check_no_alias(y, "y", w_, "w", fn);
        b.gemm(op::none, op::transpose, value_type(1), x, w_, value_type(0), y);
    }

    void input_grad(B& b, const_matrix_view<value_type> dy, matrix_view<value_type> dx, std::span<value_type> /*workspace*/) const {
        constexpr const char* fn = "velora::dense_frozen_weight::input_grad";
        check_shape(dy, dy.rows, w_.rows, fn, "dy");
        check_shape(dx, dy.rows, w_.cols, fn, "dx");
        check_no_alias(dx, "dx", dy, "dy", fn);
        check_no_alias(dx, "dx", w_, "w", fn);
        b.gemm(op::none, op::none, value_type(1), dy, w_, value_type(0), dx);
    }

private:
    const_matrix_view<value_type> w_;
};

} // namespace velora
