#pragma once
// Naive dense reference implementations (double precision, plain loops) used as test oracles.
// Deliberately independent of the library's kernels: no Eigen, no views beyond indexing.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace ref {

struct matrix {
    std::ptrdiff_t rows = 0, cols = 0;
    std::vector<double> a;
    matrix() = default;
    matrix(std::ptrdiff_t r, std::ptrdiff_t c) : rows(r), cols(c), a(static_cast<std::size_t>(r * c), 0.0) {}
    double& operator()(std::ptrdiff_t r, std::ptrdiff_t c) { return a[static_cast<std::size_t>(r * cols + c)]; }
    double operator()(std::ptrdiff_t r, std::ptrdiff_t c) const { return a[static_cast<std::size_t>(r * cols + c)]; }
};

template <class T>
matrix from(const std::vector<T>& data, std::ptrdiff_t rows, std::ptrdiff_t cols) {
    matrix m(rows, cols);
    for (std::ptrdiff_t i = 0; i < rows * cols; ++i) m.a[static_cast<std::size_t>(i)] = static_cast<double>(data[static_cast<std::size_t>(i)]);
    return m;
}

inline matrix matmul(const matrix& a, bool ta, const matrix& b, bool tb) {
    const auto m = ta ? a.cols : a.rows, k = ta ? a.rows : a.cols, n = tb ? b.rows : b.cols;
    matrix c(m, n);
    for (std::ptrdiff_t i = 0; i < m; ++i)
        for (std::ptrdiff_t j = 0; j < n; ++j) {
            double acc = 0;
            for (std::ptrdiff_t p = 0; p < k; ++p) acc += (ta ? a(p, i) : a(i, p)) * (tb ? b(j, p) : b(p, j));
            c(i, j) = acc;
        }
    return c;
}

// Z[t, g] = Σ_j X[t, g·s + j] v[j] over the zero-padded X.
inline matrix compress(const matrix& x, const std::vector<double>& v, std::ptrdiff_t groups) {
    const auto s = static_cast<std::ptrdiff_t>(v.size());
    matrix z(x.rows, groups);
    for (std::ptrdiff_t t = 0; t < x.rows; ++t)
        for (std::ptrdiff_t g = 0; g < groups; ++g)
            for (std::ptrdiff_t j = 0; j < s; ++j)
                if (g * s + j < x.cols) z(t, g) += x(t, g * s + j) * v[static_cast<std::size_t>(j)];
    return z;
}

// The paper's closed form: scale · dW_exact · (I_G ⊗ v vᵀ), on the padded width, trimmed to D.
inline matrix velora_weight_grad(const matrix& x, const matrix& dy, const std::vector<double>& v, std::ptrdiff_t groups, double scale) {
    const auto s = static_cast<std::ptrdiff_t>(v.size());
    const auto d = x.cols;
    const matrix exact = matmul(dy, true, x, false);   // O×D
    // Build P = I_G ⊗ v vᵀ explicitly (padded size G·s) and multiply densely.
    const auto dp = groups * s;
    matrix p(dp, dp);
    for (std::ptrdiff_t g = 0; g < groups; ++g)
        for (std::ptrdiff_t i = 0; i < s; ++i)
            for (std::ptrdiff_t j = 0; j < s; ++j) p(g * s + i, g * s + j) = v[static_cast<std::size_t>(i)] * v[static_cast<std::size_t>(j)];
    matrix out(exact.rows, d);
    for (std::ptrdiff_t o = 0; o < exact.rows; ++o)
        for (std::ptrdiff_t c = 0; c < d; ++c) {
            double acc = 0;
            for (std::ptrdiff_t k = 0; k < d; ++k) acc += exact(o, k) * p(k, c);
            out(o, c) = scale * acc;
        }
    return out;
}

// Normalised mean of all sub-tokens of the zero-padded X.
inline std::vector<double> subtoken_direction(const matrix& x, std::ptrdiff_t s) {
    std::vector<double> m(static_cast<std::size_t>(s), 0.0);
    for (std::ptrdiff_t t = 0; t < x.rows; ++t)
        for (std::ptrdiff_t c = 0; c < x.cols; ++c) m[static_cast<std::size_t>(c % s)] += x(t, c);
    double n = 0;
    for (double e : m) n += e * e;
    n = std::sqrt(n);
    for (double& e : m) e /= n;
    return m;
}

// Relative Frobenius distance ‖a − b‖ / max(‖b‖, tiny).
template <class T>
double rel_error(const std::vector<T>& a, const matrix& b) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < b.a.size(); ++i) {
        const double d = static_cast<double>(a[i]) - b.a[i];
        num += d * d;
        den += b.a[i] * b.a[i];
    }
    return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

} // namespace ref
