#pragma once
// Naive dense reference implementations (double precision, Eigen) of plain AdamW and of GaLore's
// AdamW step, used as test oracles. Deliberately simple and independent of the library's kernels:
// full SVDs, dense matrices, no workspace reuse, no cleverness.
//
// Source of truth: GaLore (Zhao et al., arXiv 2403.03507), github.com/jiaweizzhao/GaLore,
// galore_torch/adamw.py (the AdamW step, with decoupled weight decay applied after the update)
// and galore_torch/galore_projector.py (proj_type = "std").
#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace ref {

// Hyper-parameters of GaLore's AdamW (the defaults of galore_torch/adamw.py; correct_bias = true).
struct adamw_params {
    double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-6, weight_decay = 0.0;
};

namespace galore_detail {

inline void require_shape(const char* fn, const char* what, const Eigen::MatrixXd& a, Eigen::Index rows, Eigen::Index cols) {
    if (a.rows() != rows || a.cols() != cols)
        throw std::invalid_argument(std::string(fn) + ": " + what + " is " + std::to_string(a.rows()) + "x" + std::to_string(a.cols()) +
                                    ", expected " + std::to_string(rows) + "x" + std::to_string(cols));
}

// One AdamW moment update on (already projected, for GaLore) gradient g; returns N = m / (sqrt(v) + eps)
// and the bias-corrected step size for step number t (t >= 1, already incremented).
inline Eigen::MatrixXd adam_direction(Eigen::MatrixXd& m, Eigen::MatrixXd& v, const Eigen::MatrixXd& g, long long t, const adamw_params& p,
                                      double& step_size) {
    m = p.beta1 * m + (1.0 - p.beta1) * g;
    v = p.beta2 * v + (1.0 - p.beta2) * g.cwiseProduct(g);
    const Eigen::MatrixXd denom = (v.array().sqrt() + p.eps).matrix();
    const double bc1 = 1.0 - std::pow(p.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(p.beta2, static_cast<double>(t));
    step_size = p.lr * std::sqrt(bc2) / bc1;
    return m.cwiseQuotient(denom);
}

// Decoupled weight decay exactly as galore_torch/adamw.py: p.add_(p, alpha=-lr*wd), after the update.
inline void weight_decay(Eigen::MatrixXd& w, const adamw_params& p) {
    if (p.weight_decay > 0.0) w -= (p.lr * p.weight_decay) * w;
}

// Index of the entry of largest |value| of x; on exact ties the first such index wins.
template <class Vec>
Eigen::Index argmax_abs_first(const Vec& x) {
    Eigen::Index best = 0;
    for (Eigen::Index i = 1; i < x.size(); ++i)
        if (std::abs(x(i)) > std::abs(x(best))) best = i;   // strict '>': earlier index keeps exact ties
    return best;
}

} // namespace galore_detail

// ---------------------------------------------------------------------------------------------
// Plain dense AdamW for one parameter matrix (galore_torch/adamw.py without a "rank" group):
//   t += 1; m = b1 m + (1-b1) G; v = b2 v + (1-b2) G∘G; N = m / (sqrt(v) + eps);
//   W -= lr·sqrt(1-b2^t)/(1-b1^t) · N;  then, if wd > 0, W -= lr·wd·W (on the updated W).
// ---------------------------------------------------------------------------------------------
class dense_adamw {
public:
    dense_adamw(Eigen::Index rows, Eigen::Index cols, adamw_params params = {})
        : p_(params), m_(Eigen::MatrixXd::Zero(rows, cols)), v_(Eigen::MatrixXd::Zero(rows, cols)) {
        if (rows < 1 || cols < 1) throw std::invalid_argument("ref::dense_adamw: rows and cols must be >= 1");
    }

    void step(Eigen::MatrixXd& w, const Eigen::MatrixXd& g) {
        galore_detail::require_shape("ref::dense_adamw::step", "weight", w, m_.rows(), m_.cols());
        galore_detail::require_shape("ref::dense_adamw::step", "gradient", g, m_.rows(), m_.cols());
        ++t_;
        double step_size = 0.0;
        const Eigen::MatrixXd n = galore_detail::adam_direction(m_, v_, g, t_, p_, step_size);
        w -= step_size * n;
        galore_detail::weight_decay(w, p_);
    }

    const Eigen::MatrixXd& m() const { return m_; }
    const Eigen::MatrixXd& v() const { return v_; }
    long long steps() const { return t_; }
    const adamw_params& params() const { return p_; }

private:
    adamw_params p_;
    Eigen::MatrixXd m_, v_;
    long long t_ = 0;
};

// ---------------------------------------------------------------------------------------------
// GaLore projector basis ("std" projection) of gradient g at rank r, from an exact thin SVD
// g = U S Vᵀ (singular values in decreasing order):
//   left  (rows < cols): P = U[:, :r]   (rows×r, orthonormal columns)
//   right (rows >= cols): Q = Vᵀ[:r, :] (r×cols, orthonormal rows)
// Like torch's slicing, r is clamped to min(rows, cols).
//
// SIGN CONVENTION. Singular vectors are only defined up to sign (and, for repeated singular values,
// up to a rotation within the eigenspace — tests should avoid degenerate spectra). GaLore itself
// takes whatever signs torch.linalg.svd returns. Here, and in the library under test, every basis
// vector (each column of P, each row of Q) is canonicalised so that its entry of largest absolute
// value is positive; on exact ties of |value| the first such entry in index order decides.
// Within one projector period the signs cancel (Ĝ, m and N flip together, v is unchanged, the
// back-projection is unchanged), but they matter across refreshes because the moments are carried
// over untransformed, so the oracle and the library must agree on them.
// ---------------------------------------------------------------------------------------------
inline void canonicalize_basis_signs(Eigen::MatrixXd& basis, bool left) {
    if (left) {
        for (Eigen::Index j = 0; j < basis.cols(); ++j) {
            const Eigen::Index k = galore_detail::argmax_abs_first(basis.col(j));
            if (basis(k, j) < 0.0) basis.col(j) *= -1.0;
        }
    } else {
        for (Eigen::Index i = 0; i < basis.rows(); ++i) {
            const Eigen::Index k = galore_detail::argmax_abs_first(basis.row(i));
            if (basis(i, k) < 0.0) basis.row(i) *= -1.0;
        }
    }
}

inline Eigen::MatrixXd galore_basis(const Eigen::MatrixXd& g, int rank, bool left) {
    if (rank < 1) throw std::invalid_argument("ref::galore_basis: rank must be >= 1, got " + std::to_string(rank));
    const Eigen::Index r = std::min<Eigen::Index>(rank, std::min(g.rows(), g.cols()));
    const Eigen::JacobiSVD<Eigen::MatrixXd> svd(g, Eigen::ComputeThinU | Eigen::ComputeThinV);
    Eigen::MatrixXd basis = left ? Eigen::MatrixXd(svd.matrixU().leftCols(r)) : Eigen::MatrixXd(svd.matrixV().leftCols(r).transpose());
    canonicalize_basis_signs(basis, left);
    return basis;
}

// ---------------------------------------------------------------------------------------------
// GaLore AdamW for one rows×cols weight (galore_torch/adamw.py + GaLoreProjector, proj_type "std").
// Per call to step(W, G), with the parameter's step counter t (0 before the first call):
//   1. if t % update_proj_gap == 0: recompute the basis from G (full SVD, signs canonicalised);
//      this happens BEFORE the moments are touched, i.e. at the 1st, (T+1)th, (2T+1)th ... call;
//   2. Ĝ = G Qᵀ (right, rows >= cols; rows×r) or Ĝ = Pᵀ G (left, rows < cols; r×cols);
//   3. t += 1 (never reset); m, v updated with Ĝ in the projected shape — they are NOT
//      transformed when the basis changes (GaLore reuses them as they are in the new basis);
//   4. N = m / (sqrt(v) + eps); step_size = lr·sqrt(1-b2^t)/(1-b1^t);
//      W -= step_size · scale · back(N), back(N) = N Q (right) or P N (left);
//   5. if wd > 0: W -= lr·wd·W (decoupled, on the updated W).
// The side is decided once, from the full shape. rank is clamped to min(rows, cols).
// ---------------------------------------------------------------------------------------------
class galore_adamw {
public:
    galore_adamw(Eigen::Index rows, Eigen::Index cols, int rank, adamw_params params = {}, int update_proj_gap = 200, double scale = 0.25)
        : p_(params), rows_(rows), cols_(cols), gap_(update_proj_gap), scale_(scale), left_(rows < cols) {
        if (rows < 1 || cols < 1) throw std::invalid_argument("ref::galore_adamw: rows and cols must be >= 1");
        if (rank < 1) throw std::invalid_argument("ref::galore_adamw: rank must be >= 1, got " + std::to_string(rank));
        if (update_proj_gap < 1)
            throw std::invalid_argument("ref::galore_adamw: update_proj_gap must be >= 1, got " + std::to_string(update_proj_gap));
        rank_ = rank;
        r_ = std::min<Eigen::Index>(rank, std::min(rows, cols));
        m_ = left_ ? Eigen::MatrixXd::Zero(r_, cols) : Eigen::MatrixXd::Zero(rows, r_);
        v_ = m_;
    }

    void step(Eigen::MatrixXd& w, const Eigen::MatrixXd& g) {
        galore_detail::require_shape("ref::galore_adamw::step", "weight", w, rows_, cols_);
        galore_detail::require_shape("ref::galore_adamw::step", "gradient", g, rows_, cols_);
        if (t_ % gap_ == 0) {   // t_ counts calls made so far: refresh at calls 1, T+1, 2T+1, ...
            basis_ = galore_basis(g, rank_, left_);
            ++refreshes_;
        }
        const Eigen::MatrixXd gh = project(g);
        ++t_;
        double step_size = 0.0;
        const Eigen::MatrixXd n = galore_detail::adam_direction(m_, v_, gh, t_, p_, step_size);
        w -= (step_size * scale_) * project_back(n);
        galore_detail::weight_decay(w, p_);
    }

    // Ĝ for the current basis (valid once at least one step has run).
    Eigen::MatrixXd project(const Eigen::MatrixXd& g) const { return left_ ? Eigen::MatrixXd(basis_.transpose() * g) : Eigen::MatrixXd(g * basis_.transpose()); }
    // back(N) without the scale factor.
    Eigen::MatrixXd project_back(const Eigen::MatrixXd& n) const { return left_ ? Eigen::MatrixXd(basis_ * n) : Eigen::MatrixXd(n * basis_); }

    const Eigen::MatrixXd& basis() const { return basis_; }   // P (rows×r) if left(), else Q (r×cols); empty before the first step
    bool left() const { return left_; }
    Eigen::Index rank() const { return r_; }                  // effective rank, min(rank, rows, cols)
    const Eigen::MatrixXd& m() const { return m_; }
    const Eigen::MatrixXd& v() const { return v_; }
    long long steps() const { return t_; }
    long long refreshes() const { return refreshes_; }
    const adamw_params& params() const { return p_; }
    int update_proj_gap() const { return gap_; }
    double scale() const { return scale_; }

private:
    adamw_params p_;
    Eigen::Index rows_, cols_;
    int gap_;
    double scale_;
    bool left_;
    int rank_ = 1;
    Eigen::Index r_ = 1;
    Eigen::MatrixXd basis_, m_, v_;
    long long t_ = 0, refreshes_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Subspace quality helpers.
// ---------------------------------------------------------------------------------------------

// Eckart–Young optimum min_{rank(X) <= r} ||A - X||_F = sqrt(sum_{i > r} sigma_i^2).
inline double optimal_residual(const Eigen::MatrixXd& a, int r) {
    const Eigen::JacobiSVD<Eigen::MatrixXd> svd(a);
    const Eigen::VectorXd& s = svd.singularValues();
    double acc = 0.0;
    for (Eigen::Index i = std::max(0, r); i < s.size(); ++i) acc += s(i) * s(i);
    return std::sqrt(acc);
}

// Residual of A after projecting onto the span of the orthonormal rows of B (r×len):
//   left  (len == A.rows()): ||A - Bᵀ (B A)||_F   (for GaLore's P, pass B = Pᵀ)
//   right (len == A.cols()): ||A - (A Bᵀ) B||_F   (for GaLore's Q, pass B = Q)
inline double projection_residual_rows(const Eigen::MatrixXd& a, const Eigen::MatrixXd& basis_rows, bool left) {
    const Eigen::Index len = left ? a.rows() : a.cols();
    if (basis_rows.cols() != len)
        throw std::invalid_argument("ref::projection_residual_rows: basis_rows has " + std::to_string(basis_rows.cols()) + " columns, expected " +
                                    std::to_string(len));
    const Eigen::MatrixXd proj = left ? Eigen::MatrixXd(basis_rows.transpose() * (basis_rows * a)) : Eigen::MatrixXd((a * basis_rows.transpose()) * basis_rows);
    return (a - proj).norm();
}

} // namespace ref
