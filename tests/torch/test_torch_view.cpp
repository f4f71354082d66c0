// velora::torch::view_of / mutable_view_of / matrix_input: which tensors become which matrix
// views, what is copied and when, and the errors for tensors that cannot be read.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "torch_doctest.hpp"

#include <string>

#include "../test_util.hpp"

using test::invalid_argument_message;
using velora::torch::flatten;
using velora::torch::matrix_input;
using velora::torch::mutable_view_of;
using velora::torch::view_of;

using torch_test::contains;

namespace {

// Every element of the view equals the tensor's element at the same (row, col) of its
// flattened matrix, read through torch's own indexing.
template <class T>
void check_same_values(const velora::const_matrix_view<T>& v, const at::Tensor& matrix) {
    REQUIRE(matrix.dim() == 2);
    REQUIRE(v.rows == matrix.size(0));
    REQUIRE(v.cols == matrix.size(1));
    const at::Tensor m = matrix.to(velora::torch::dtype_of<T>()).contiguous();
    const T* p = m.data_ptr<T>();
    for (velora::index_t r = 0; r < v.rows; ++r)
        for (velora::index_t c = 0; c < v.cols; ++c) REQUIRE(v(r, c) == p[r * v.cols + c]);
}

} // namespace

TEST_CASE("contiguous tensors: zero-copy views, [..., D] flattened to rows x D") {
    const at::Tensor x = at::randn({3, 5, 7});
    const auto v = view_of<float>(x, "x");
    CHECK(v.data == x.data_ptr<float>());
    CHECK(v.rows == 15);
    CHECK(v.cols == 7);
    CHECK(v.ld == 7);
    check_same_values(v, x.reshape({15, 7}));

    const at::Tensor d = at::randn({4, 6}, at::kDouble);
    const auto vd = view_of<double>(d);
    CHECK(vd.rows == 4);
    CHECK(vd.cols == 6);
    CHECK(vd.data == d.data_ptr<double>());
}

TEST_CASE("outputs_first: [O, ...] is O x rest (a convolution kernel)") {
    const at::Tensor k = at::randn({8, 3, 3, 3});
    const auto v = view_of<float>(k, "kernel", flatten::outputs_first);
    CHECK(v.rows == 8);
    CHECK(v.cols == 27);
    CHECK(v.ld == 27);
    check_same_values(v, k.reshape({8, 27}));
    // The activation rule would cut the same kernel into 72 rows of 3.
    const auto a = view_of<float>(k, "kernel");
    CHECK(a.rows == 72);
    CHECK(a.cols == 3);
}

TEST_CASE("0-D is 1x1 and 1-D is 1xn under both rules") {
    const at::Tensor s = at::tensor(2.5f);
    for (flatten f : {flatten::features_last, flatten::outputs_first}) {
        const auto v = view_of<float>(s, "s", f);
        CHECK(v.rows == 1);
        CHECK(v.cols == 1);
        CHECK(v(0, 0) == 2.5f);
        const at::Tensor b = at::randn({9});
        const auto vb = view_of<float>(b, "b", f);
        CHECK(vb.rows == 1);
        CHECK(vb.cols == 9);
        CHECK(vb.ld == 9);
    }
}

TEST_CASE("strided rows: a column slice keeps the parent's row stride") {
    const at::Tensor parent = at::randn({6, 10});
    const at::Tensor x = parent.narrow(1, 2, 4);   // 6x4, row stride 10
    const auto v = view_of<float>(x, "x");
    CHECK(v.rows == 6);
    CHECK(v.cols == 4);
    CHECK(v.ld == 10);
    CHECK(v.data == parent.data_ptr<float>() + 2);
    check_same_values(v, x);
    // [2, 3, D] sliced from a [2, 3, 2D] parent: the leading dimensions still collapse (stride 3·2D = 3 x row stride).
    const at::Tensor p3 = at::randn({2, 3, 8});
    const auto v3 = view_of<float>(p3.narrow(2, 0, 4), "x3");
    CHECK(v3.rows == 6);
    CHECK(v3.ld == 8);
    check_same_values(v3, p3.narrow(2, 0, 4).reshape({6, 4}));
}

TEST_CASE("one row whose row stride is smaller than its width is normalised, not rejected") {
    // A [8, 1] column transposed is [1, 8] with strides [1, 1]: ld 1 < cols 8, which check_view
    // would reject; one row never uses its stride.
    const at::Tensor col = at::randn({8, 1});
    const at::Tensor row = col.t();
    REQUIRE(row.stride(0) == 1);
    const auto v = view_of<float>(row, "row");
    CHECK(v.rows == 1);
    CHECK(v.cols == 8);
    CHECK(v.ld == 8);
    velora::check_view(v, "test", "row");   // the library accepts it now
    check_same_values(v, row);
    // A size-1 batch with any stride: [1, 1, 8] as_strided with row strides 0.
    const at::Tensor odd = at::randn({8}).as_strided({1, 1, 8}, {0, 0, 1});
    const auto vo = view_of<float>(odd, "odd");
    CHECK(vo.rows == 1);
    CHECK(vo.ld == 8);
}

TEST_CASE("stride-0 rows (expand, the gradient of sum()): view_of rejects, matrix_input materialises") {
    const at::Tensor g = at::ones({1, 8}).expand({5, 8});
    REQUIRE(g.stride(0) == 0);
    const std::string msg = invalid_argument_message([&] { (void)view_of<float>(g, "grad_output"); });
    CHECK(contains(msg, "velora::torch::view_of: argument 'grad_output'"));
    CHECK(contains(msg, "shape [5, 8]"));
    CHECK(contains(msg, "strides [0, 1]"));
    CHECK(contains(msg, "dtype Float"));
    CHECK(contains(msg, "expand()"));
    const matrix_input<float> in(g, "grad_output");
    CHECK(in.copied());
    CHECK(in.view().ld == 8);
    check_same_values(in.view(), g);

    // The real thing: the gradient that autograd hands to the layer below sum().
    const at::Tensor x = torch::randn({4, 3}, torch::requires_grad());
    at::Tensor seen;
    const at::Tensor y = x * 2;
    y.register_hook([&](const at::Tensor& grad) { seen = grad; });
    y.sum().backward();
    REQUIRE(seen.defined());
    const matrix_input<float> from_sum(seen, "grad");
    check_same_values(from_sum.view(), at::ones({4, 3}));
    // An expanded column (stride 0 along D) is not contiguous either.
    const at::Tensor c = at::randn({5, 1}).expand({5, 6});
    CHECK(contains(invalid_argument_message([&] { (void)view_of<float>(c, "c"); }), "strides [1, 0]"));
    check_same_values(matrix_input<float>(c, "c").view(), c);
}

TEST_CASE("layouts that are not row-major matrices") {
    const at::Tensor base = at::randn({5, 7});
    const at::Tensor t = base.t();   // columns not contiguous
    CHECK(contains(invalid_argument_message([&] { (void)view_of<float>(t, "wt"); }), "shape [7, 5], dtype Float, strides [1, 7]"));
    const matrix_input<float> in(t, "wt");
    CHECK(in.copied());
    check_same_values(in.view(), t);
    // Rows that are not evenly spaced: [2, 3, D] cut from [2, 4, D].
    const at::Tensor p = at::randn({2, 4, 6}).narrow(1, 0, 3);
    CHECK(contains(invalid_argument_message([&] { (void)view_of<float>(p, "p"); }), "not evenly spaced"));
    check_same_values(matrix_input<float>(p, "p").view(), p.reshape({6, 6}));
    // Overlapping rows with a stride > 0 (a sliding window).
    const at::Tensor w = at::randn({20}).as_strided({4, 8}, {2, 1});
    CHECK_FALSE(invalid_argument_message([&] { (void)view_of<float>(w, "w"); }).empty());
    check_same_values(matrix_input<float>(w, "w").view(), w);
    // A contiguous tensor is not copied.
    const at::Tensor c = at::randn({3, 4});
    const matrix_input<float> none(c, "c");
    CHECK_FALSE(none.copied());
    CHECK(none.view().data == c.data_ptr<float>());
}

TEST_CASE("empty batches: an empty view, no pointer; the library's calls are never reached with it") {
    const at::Tensor e = at::empty({0, 16});
    const auto v = view_of<float>(e, "x");
    CHECK(v.rows == 0);
    CHECK(v.cols == 16);
    CHECK(v.empty());
    CHECK(v.data == nullptr);
    const at::Tensor e3 = at::empty({4, 0, 16});
    CHECK(view_of<float>(e3, "x").rows == 0);
    const matrix_input<float> in(at::empty({0, 16}, at::kHalf), "x");
    CHECK(in.view().empty());
    const at::Tensor no_cols = at::empty({3, 0});
    CHECK(view_of<float>(no_cols, "x").cols == 0);
}

TEST_CASE("dtypes: exact match for views, floating casts in matrix_input, integers refused") {
    const at::Tensor i = at::arange(12, at::kInt).reshape({3, 4});
    std::string msg = invalid_argument_message([&] { (void)view_of<float>(i, "x"); });
    CHECK(contains(msg, "velora::torch::view_of: argument 'x' (shape [3, 4], dtype Int, strides [4, 1], device cpu) has dtype Int but Float is required"));
    CHECK(contains(msg, "integer, bool and complex tensors have no meaning here"));
    msg = invalid_argument_message([&] { matrix_input<float>(i, "x"); });
    CHECK(contains(msg, "velora::torch::matrix_input: argument 'x' (shape [3, 4], dtype Int"));
    CHECK(contains(msg, "not a floating-point tensor"));
    CHECK(contains(invalid_argument_message([&] { matrix_input<float>(at::ones({2, 2}, at::kBool), "mask"); }), "dtype Bool"));
    CHECK(contains(invalid_argument_message([&] { matrix_input<float>(at::ones({2, 2}, at::kComplexFloat), "z"); }), "dtype ComplexFloat"));

    const at::Tensor h = at::randn({4, 6}).to(at::kHalf);
    msg = invalid_argument_message([&] { (void)view_of<float>(h, "x"); });
    CHECK(contains(msg, "dtype Half but Float is required"));
    CHECK(contains(msg, "matrix_input casts"));
    const matrix_input<float> hin(h, "x");
    CHECK(hin.copied());
    check_same_values(hin.view(), h.to(at::kFloat));   // half -> float is exact
    const at::Tensor bf = at::randn({3, 5}).to(at::kBFloat16).t();   // a cast of a transposed tensor: one copy, contiguous
    const matrix_input<float> bin(bf, "x");
    check_same_values(bin.view(), bf.to(at::kFloat));
    CHECK(bin.view().ld == 3);
    // double <-> float in matrix_input, not in view_of
    CHECK_FALSE(invalid_argument_message([&] { (void)view_of<double>(at::randn({2, 2}), "x"); }).empty());
    const at::Tensor f = at::randn({2, 2});
    const matrix_input<double> fin(f, "x");
    CHECK(fin.copied());
    check_same_values(fin.view(), f.to(at::kDouble));
}

TEST_CASE("devices, layouts and undefined tensors") {
    const at::Tensor meta = at::empty({2, 3}, at::TensorOptions().device(at::kMeta));
    std::string msg = invalid_argument_message([&] { (void)view_of<float>(meta, "x"); });
    CHECK(contains(msg, "velora::torch::view_of: argument 'x' (shape [2, 3], dtype Float, strides [3, 1], device meta) is not on the CPU"));
    CHECK(contains(invalid_argument_message([&] { matrix_input<float>(meta, "x"); }), "is not on the CPU"));
    const at::Tensor sparse = at::eye(3).to_sparse();
    CHECK(contains(invalid_argument_message([&] { (void)view_of<float>(sparse, "g"); }), "not a dense (strided) tensor"));
    CHECK(contains(invalid_argument_message([&] { (void)view_of<float>(at::Tensor(), "w"); }), "argument 'w' is an undefined tensor"));
}

TEST_CASE("a lazily negated view is refused by view_of and resolved by matrix_input") {
    const at::Tensor x = at::randn({3, 4});
    const at::Tensor n = at::_neg_view(x);
    REQUIRE(n.is_neg());
    CHECK(contains(invalid_argument_message([&] { (void)view_of<float>(n, "x"); }), "lazily negated"));
    check_same_values(matrix_input<float>(n, "x").view(), -x);
}

TEST_CASE("mutable views write the tensor's memory; bump_version tells autograd") {
    at::Tensor w = at::zeros({2, 3});
    const auto v = mutable_view_of<float>(w, "w");
    v(1, 2) = 4.0f;
    CHECK(w[1][2].item<float>() == 4.0f);
    const auto before = w._version();
    velora::torch::bump_version(w);
    CHECK(w._version() == before + 1);
    // An autograd graph that saved w now refuses to use the changed values.
    at::Tensor p = torch::ones({2, 3}, torch::requires_grad());
    at::Tensor loss = (p * p).sum();
    velora::torch::bump_version(p);
    CHECK_THROWS_WITH_AS(loss.backward(), doctest::Contains("modified by an inplace operation"), c10::Error);
}
