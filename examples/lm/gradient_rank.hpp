#pragma once
// `lm_train --grad-rank-every N --grad-rank-out FILE.json [--grad-rank-plot FILE.svg]`: measures
// AdaRankGrad's motivating observation ("as training progresses, the rank of the estimated layer
// gradients gradually decreases, and asymptotically approaches rank one") on this model. Every N
// steps (and at step 1) each projection matrix's full gradient, as the optimizer receives it (a
// VeLoRA layer's factored gradient expanded), is decomposed by an exact SVD in double, and its
// ξ-energy rank is recorded for ξ = 0.05, 0.1 and 0.2: the smallest r whose top-r singular
// values keep all but ξ² of ‖G‖_F² (the adaptive rank rule's definition, without its cap). The
// file holds, per matrix, the steps, the ranks per ξ and min(rows, cols); the plot draws them as
// small multiples per matrix kind (q, k, v, o, gate, up, down), one line per layer and ξ.
// One process only (a data-parallel rank sees only its share of the gradient).
#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include <Eigen/SVD>

#include <velora/velora.hpp>

#include "report.hpp"

namespace lm::gradient_rank {

using velora::index_t;

inline constexpr std::array<double, 3> xis = {0.05, 0.1, 0.2};

/// The smallest r >= 1 with Σ_{i>r} σ_i² <= ξ²·Σ σ_i² (σ descending); 0 for a zero gradient.
inline index_t energy_rank(const std::vector<double>& sigma, double xi) {
    double total = 0;
    for (double s : sigma) total += s * s;
    if (total == 0) return 0;
    const double allowed = xi * xi * total;
    double kept = 0;
    for (std::size_t r = 0; r < sigma.size(); ++r) {
        kept += sigma[r] * sigma[r];
        if (total - kept <= allowed) return static_cast<index_t>(r + 1);
    }
    return static_cast<index_t>(sigma.size());
}

/// The singular values of a rows×cols matrix (row-major, leading dimension ld), descending.
template <class T>
std::vector<double> singular_values(velora::const_matrix_view<T> g) {
    Eigen::MatrixXd a(g.rows, g.cols);
    for (index_t i = 0; i < g.rows; ++i)
        for (index_t j = 0; j < g.cols; ++j) a(i, j) = static_cast<double>(g.data[i * g.ld + j]);
    const Eigen::BDCSVD<Eigen::MatrixXd> svd(a);
    const Eigen::VectorXd s = svd.singularValues();
    return {s.data(), s.data() + s.size()};
}

struct matrix_series {
    std::string name;   ///< e.g. "layer0.wq"
    index_t rows = 0, cols = 0;
    std::vector<int> steps;                          ///< 1-based: the step whose gradient was measured
    std::array<std::vector<index_t>, xis.size()> ranks;
};

class recorder {
public:
    explicit recorder(int every) : every_(every) {}

    /// Whether the gradients of 0-based step `step` are measured: step 0 and every `every`-th after.
    [[nodiscard]] bool due(int step) const noexcept { return every_ > 0 && (step == 0 || (step + 1) % every_ == 0); }

    template <class T>
    void observe(const std::string& name, int step, velora::const_matrix_view<T> g) {
        matrix_series& s = series_[name];
        s.name = name;
        s.rows = g.rows;
        s.cols = g.cols;
        s.steps.push_back(step + 1);
        const std::vector<double> sigma = singular_values(g);
        for (std::size_t k = 0; k < xis.size(); ++k) s.ranks[k].push_back(energy_rank(sigma, xis[k]));
    }

    [[nodiscard]] const std::map<std::string, matrix_series>& series() const noexcept { return series_; }

    void write_json(std::ostream& out, const std::string& config) const {
        out << "{\"config\":\"" << config << "\",\"every\":" << every_ << ",\"xi\":[";
        for (std::size_t k = 0; k < xis.size(); ++k) out << (k ? "," : "") << xis[k];
        out << "],\"matrices\":[";
        bool first = true;
        for (const auto& [name, s] : series_) {
            out << (first ? "" : ",") << "\n{\"name\":\"" << name << "\",\"rows\":" << s.rows << ",\"cols\":" << s.cols << ",\"steps\":[";
            for (std::size_t i = 0; i < s.steps.size(); ++i) out << (i ? "," : "") << s.steps[i];
            out << "],\"ranks\":[";
            for (std::size_t k = 0; k < xis.size(); ++k) {
                out << (k ? "," : "") << "[";
                for (std::size_t i = 0; i < s.ranks[k].size(); ++i) out << (i ? "," : "") << s.ranks[k][i];
                out << "]";
            }
            out << "]}";
            first = false;
        }
        out << "\n]}\n";
    }

    // Small multiples: one cell per matrix kind, x = step, y = rank (0 to the largest
    // min(rows, cols) of that kind); per layer and ξ one polyline, ξ by dash pattern, the layer
    // by lightness. Structure for tests: <g class="grad-rank-cell" data-kind=KIND>, <polyline
    // class="grad-rank" data-xi=X data-layer=L>.
    void write_svg(std::ostream& out, const std::string& config) const {
        using report::svg_detail::kind_label;
        using report::svg_detail::shade;
        using report::svg_detail::split_parameter;
        std::vector<std::string> kinds;
        int layers = 1, last_step = 1;
        for (const auto& [name, s] : series_) {
            const auto [layer, kind] = split_parameter(name);
            if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end()) kinds.push_back(kind);
            layers = std::max(layers, layer + 1);
            if (!s.steps.empty()) last_step = std::max(last_step, s.steps.back());
        }
        // The model's order: attention (q, k, v, o), then the MLP (gate, up, down).
        const std::vector<std::string> order = {"wq", "wk", "wv", "wo", "w1", "w3", "w2"};
        const auto rank_of = [&order](const std::string& k) { return std::find(order.begin(), order.end(), k) - order.begin(); };
        std::stable_sort(kinds.begin(), kinds.end(), [&rank_of](const std::string& a, const std::string& b) { return rank_of(a) < rank_of(b); });
        const double cell_w = 230, cell_h = 170, pad_l = 40, pad_t = 40, gap = 30;
        const int columns = 4;
        const int rows_of_cells = static_cast<int>((kinds.size() + columns - 1) / columns);
        const double w = pad_l + columns * (cell_w + gap), h = pad_t + rows_of_cells * (cell_h + gap) + 40;
        out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w << "\" height=\"" << h << "\" font-family=\"sans-serif\" font-size=\"11\">\n"
            << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
            << "<text x=\"" << pad_l << "\" y=\"18\" font-size=\"13\">xi-energy rank of each matrix's full gradient (exact SVD) over training: "
            << config << "; solid xi=0.05, dashed 0.1, dotted 0.2; lighter = earlier layer</text>\n";
        const char* dashes[] = {"", "5,3", "1,3"};
        for (std::size_t c = 0; c < kinds.size(); ++c) {
            const double x0 = pad_l + static_cast<double>(c % columns) * (cell_w + gap), y0 = pad_t + static_cast<double>(c / columns) * (cell_h + gap);
            index_t top = 1;
            for (const auto& [name, s] : series_)
                if (split_parameter(name).second == kinds[c]) top = std::max(top, std::min(s.rows, s.cols));
            out << "<g class=\"grad-rank-cell\" data-kind=\"" << kinds[c] << "\">\n"
                << "<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << cell_w << "\" height=\"" << cell_h << "\" fill=\"none\" stroke=\"#999\"/>\n"
                << "<text x=\"" << x0 + 4 << "\" y=\"" << y0 + 13 << "\">" << kind_label(kinds[c]) << "</text>\n"
                << "<text x=\"" << x0 - 4 << "\" y=\"" << y0 + 10 << "\" text-anchor=\"end\">" << top << "</text>\n"
                << "<text x=\"" << x0 - 4 << "\" y=\"" << y0 + cell_h << "\" text-anchor=\"end\">0</text>\n"
                << "<text x=\"" << x0 + cell_w << "\" y=\"" << y0 + cell_h + 13 << "\" text-anchor=\"end\">step " << last_step << "</text>\n";
            for (const auto& [name, s] : series_) {
                const auto [layer, kind] = split_parameter(name);
                if (kind != kinds[c]) continue;
                for (std::size_t k = 0; k < xis.size(); ++k) {
                    out << "<polyline class=\"grad-rank\" data-xi=\"" << xis[k] << "\" data-layer=\"" << layer << "\" fill=\"none\" stroke=\""
                        << shade(static_cast<int>(20 + 50 * c), layer, layers) << "\" stroke-width=\"1.3\"";
                    if (*dashes[k]) out << " stroke-dasharray=\"" << dashes[k] << "\"";
                    out << " points=\"";
                    for (std::size_t i = 0; i < s.steps.size(); ++i) {
                        const double x = x0 + cell_w * static_cast<double>(s.steps[i]) / last_step;
                        const double y = y0 + cell_h - cell_h * static_cast<double>(s.ranks[k][i]) / static_cast<double>(top);
                        char pt[64];
                        std::snprintf(pt, sizeof pt, "%s%.1f,%.1f", i ? " " : "", x, y);
                        out << pt;
                    }
                    out << "\"/>\n";
                }
            }
            out << "</g>\n";
        }
        out << "</svg>\n";
    }

private:
    int every_;
    std::map<std::string, matrix_series> series_;
};

} // namespace lm::gradient_rank
