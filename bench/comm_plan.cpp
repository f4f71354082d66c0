// comm_plan: per-step communication and per-rank memory of data-parallel LLaMA-7B training at
// 8, 64 and 512 ranks, for DDP + AdamW, ZeRO-1, ZeRO-2 and this library's low-rank AdamW,
// computed from the formulas below (all of them in this file, nothing measured). Usage:
//
//   comm_plan            (no arguments, no MPI; prints the tables)
//
// Assumptions (also printed in the output's header):
//  - Model: LLaMA-7B. 32 layers, each with q, k, v, o 4096×4096, gate and up 11008×4096,
//    down 4096×11008 (rows×cols, the weight as y = W·x sees it), two RMSNorm vectors of 4096;
//    token embeddings 32000×4096, lm_head 32000×4096, a final RMSNorm 4096.
//    Ψ = 6,738,415,616 values.
//  - Values: fp32 weights, gradients and optimizer states (4 bytes each); no mixed precision,
//    so there is no separate master copy. Activations, temporary buffers of the framework and
//    communication buckets of DDP/ZeRO are not counted (the same for every method or small).
//  - Ring collectives: an all-reduce of a payload of B bytes sends (and receives) 2(K−1)/K·B
//    per rank ("wire"); a reduce-scatter followed by an all-gather of the same B moves the same
//    (this is how velora::mpi_communicator all-reduces, and how ZeRO-1/2 reduce the gradients
//    and gather the updated weights). The tables give the payload (bytes entering collectives
//    per rank per step) and the wire bytes.
//  - DDP + AdamW: everything replicated; the gradient (Ψ values) is all-reduced every step.
//  - ZeRO-1: AdamW's two moments sharded over the K ranks; the gradients are reduce-scattered and
//    the updated weights all-gathered (same wire bytes as DDP).
//  - ZeRO-2: ZeRO-1 plus the gradients sharded (each rank keeps its 1/K of the reduced
//    gradient; the transient buckets are not counted).
//  - This library (adarank::low_rank_adamw, data-parallel): the 7 weight matrices of every
//    layer are low-rank with a fixed rank r (256 or 128), the side chosen by
//    adarank::choose_side(side_policy::standard, rows, cols) as the optimizer does (basis
//    r×len, len = min(rows, cols); moments r×other, other = max(rows, cols)); the embeddings,
//    lm_head and RMSNorm vectors are optimised densely (as in GaLore), reduced with
//    all_reduce_mean and stepped without a communicator.
//    Per step: each low-rank weight all-reduces its projected gradient (r·other values), each
//    dense parameter its gradient. A refresh (every 200 steps, due by the count, so the old
//    basis is not projected onto first) also all-reduces the full gradient once for ‖Ḡ‖² (the
//    energy pass, rows·cols values) plus the sketch products of the subspace finder: with the
//    library's default finder (adarank::rsvd_config{}: warm start, 1 power iteration,
//    oversampling 10, randomized because k < exact_fraction·min(rows, cols)) that is
//    q_warm·(k·other + k·len) + k·other values, k = r + 10. With GaLore's configuration
//    (optimizer_config::galore: exact SVD) the sketch product is C = M itself, rows·cols
//    values: a refresh then reduces the full gradient twice. Refresh traffic is amortised over
//    the 200 steps; the "refresh step" column is a step at which every low-rank weight
//    refreshes at once (the worst case; the first, cold refresh costs a little more).
//    Memory: weights replicated; optimizer state replicated (every rank holds the same bits):
//    r·(len + 2·other) per low-rank weight, 2·rows·cols per dense parameter; gradients held one
//    parameter at a time (the host steps each parameter as soon as its gradient exists, then
//    frees it: the largest single gradient, the embeddings' 32000×4096, is the peak); the
//    optimizer's shared workspace (sized for the largest low-rank weight, see
//    low_rank_adamw::add_parameter and subspace_finder::reserve, plus all_reduce_mean's bucket
//    and the energy pass's row blocks) is its own column.
#include <adarank/policies.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using adarank::index_t;

constexpr double kBytes = 4.0;                 // fp32
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr index_t kRefreshInterval = 200;      // steps between refreshes
constexpr int kRankCounts[] = {8, 64, 512};

// ------------------------------------------------------------------------- the model

struct parameter {
    const char* name;
    index_t rows, cols;   // a vector is 1×n
    int count;            // how many the model has
    bool low_rank;        // a layer weight (2-D, not embeddings/lm_head)
};

std::vector<parameter> llama_7b() {
    constexpr int layers = 32;
    constexpr index_t d = 4096, ffn = 11008, vocab = 32000;
    return {
        {"q,k,v,o", d, d, 4 * layers, true},
        {"gate,up", ffn, d, 2 * layers, true},
        {"down", d, ffn, layers, true},
        {"embeddings", vocab, d, 1, false},
        {"lm_head", vocab, d, 1, false},
        {"RMSNorm", 1, d, 2 * layers + 1, false},
    };
}

double elements(const parameter& p) { return static_cast<double>(p.rows) * static_cast<double>(p.cols); }

double total_elements(const std::vector<parameter>& model) {
    double psi = 0;
    for (const parameter& p : model) psi += p.count * elements(p);
    return psi;
}

// ------------------------------------------------------------------------- the low-rank side

struct low_rank_shape {
    adarank::projection_side side;
    index_t len, other;   // basis r×len, moments and projected gradient r×other
};

// The optimizer's rule (low_rank_adamw::add_parameter): side by side_policy::standard.
low_rank_shape shape_of(const parameter& p) {
    const adarank::projection_side side = adarank::choose_side(adarank::side_policy::standard, p.rows, p.cols);
    const bool left = side == adarank::projection_side::left;
    return {side, left ? p.rows : p.cols, left ? p.cols : p.rows};
}

// The finder's sketch size k for ranks up to r of a parameter (subspace_finder::sketch_size):
// min(r + p, min(rows, cols)), or min(rows, cols) on the exact path, taken when
// k >= exact_fraction·min(rows, cols).
struct sketch {
    index_t k;
    bool exact;
};
sketch sketch_of(const parameter& p, index_t r, const adarank::rsvd_config& c) {
    const index_t full = std::min(p.rows, p.cols), cap = std::min(r, full);
    const index_t k = cap >= full || c.oversampling >= full - cap ? full : cap + c.oversampling;
    const bool exact = static_cast<double>(k) >= c.exact_fraction * static_cast<double>(full);
    return {exact ? full : k, exact};
}

// The sketch products one refresh all-reduces (values), as subspace_finder::find forms them
// for a rank-r subspace of a parameter with a subspace already (warm start when configured).
double sketch_elements(const parameter& p, index_t r, const adarank::rsvd_config& c) {
    const low_rank_shape s = shape_of(p);
    const sketch sk = sketch_of(p, r, c);
    const double kk = static_cast<double>(sk.k), len = static_cast<double>(s.len), other = static_cast<double>(s.other);
    if (sk.exact) return s.len <= s.other ? kk * other : kk * len + kk * other;
    const double q = c.warm_start ? c.warm_power_iterations : c.power_iterations;
    return c.warm_start ? q * (kk * other + kk * len) + kk * other : kk * len + q * (kk * other + kk * len) + kk * other;
}

// ------------------------------------------------------------------------- one method

struct plan {
    std::string name;
    double payload_steady = 0;    // bytes all-reduced per rank at a step without refresh
    double refresh_extra = 0;     // bytes a step at which every low-rank weight refreshes adds
    double weights = 0, gradients = 0, state = 0, workspace = 0;   // bytes per rank

    [[nodiscard]] double payload() const { return payload_steady + refresh_extra / kRefreshInterval; }   // amortised
    [[nodiscard]] double memory() const { return weights + gradients + state + workspace; }
};

double wire(double payload, int ranks) { return 2.0 * (ranks - 1) / ranks * payload; }

plan ddp(const std::vector<parameter>& model) {
    const double psi = total_elements(model);
    return {"DDP + AdamW", kBytes * psi, 0, kBytes * psi, kBytes * psi, 2 * kBytes * psi, 0};
}

plan zero(const std::vector<parameter>& model, int stage, int ranks) {
    const double psi = total_elements(model);
    const double gradients = stage >= 2 ? kBytes * psi / ranks : kBytes * psi;
    return {"ZeRO-" + std::to_string(stage), kBytes * psi, 0, kBytes * psi, gradients, 2 * kBytes * psi / ranks, 0};
}

plan low_rank(const std::vector<parameter>& model, index_t r, const adarank::rsvd_config& finder, const std::string& name) {
    plan out;
    out.name = name;
    const double psi = total_elements(model);
    out.weights = kBytes * psi;
    double largest_gradient = 0;
    // Workspace buffers (values), each grown to its largest need over the parameters.
    double proj = 0, basis_next = 0, small = 0, sketch_s = 0, sketch_x = 0, sketch_u = 0, sigma = 0, reduce_rows = 0, bucket = 0;
    for (const parameter& p : model) {
        const double size = elements(p);
        largest_gradient = std::max(largest_gradient, size);
        if (!p.low_rank) {
            out.payload_steady += p.count * kBytes * size;
            out.state += p.count * 2 * kBytes * size;
            if (size < static_cast<double>(index_t{1} << 22)) bucket += p.count * size;   // all_reduce_mean packs the small ones
            continue;
        }
        const low_rank_shape s = shape_of(p);
        const double len = static_cast<double>(s.len), other = static_cast<double>(s.other), rr = static_cast<double>(r);
        out.payload_steady += p.count * kBytes * rr * other;
        out.refresh_extra += p.count * kBytes * (size + sketch_elements(p, r, finder));
        out.state += p.count * kBytes * rr * (len + 2 * other);
        const double kk = static_cast<double>(sketch_of(p, r, finder).k);
        proj = std::max(proj, 3 * rr * other);   // proj_, m_next_, v_next_
        basis_next = std::max(basis_next, rr * len);
        small = std::max(small, 2 * rr * rr);    // r_, r2_
        sketch_s = std::max(sketch_s, kk * len);
        sketch_x = std::max(sketch_x, kk * std::max(len, other));
        sketch_u = std::max(sketch_u, kk * kk);
        sigma = std::max(sigma, kk);
        // The energy pass reduces row blocks of at most max(2^20, one row) values.
        reduce_rows = std::max(reduce_rows, std::max(std::min(static_cast<double>(index_t{1} << 20), size), static_cast<double>(p.cols)));
    }
    out.gradients = kBytes * largest_gradient;
    bucket = std::min(bucket, static_cast<double>(index_t{1} << 22));
    out.workspace = kBytes * (proj + basis_next + small + sketch_s + sketch_x + sketch_u + reduce_rows + bucket) + 8.0 * sigma;
    return out;
}

// ------------------------------------------------------------------------- output

double gib(double bytes) { return bytes / kGiB; }

void print_header(const std::vector<parameter>& model) {
    const double psi = total_elements(model);
    std::printf("comm_plan: data-parallel LLaMA-7B, per-step communication and per-rank memory (formulas, nothing measured)\n\n");
    std::printf("Assumptions:\n");
    std::printf("  model      32 layers: q,k,v,o 4096x4096; gate,up 11008x4096; down 4096x11008; 2 RMSNorm 4096;\n");
    std::printf("             embeddings 32000x4096, lm_head 32000x4096, final RMSNorm 4096: Psi = %.0f values\n", psi);
    std::printf("  values     fp32 weights, gradients and optimizer states (4 bytes; no master copy); activations not counted\n");
    std::printf("  wire       ring collectives: all-reduce (or reduce-scatter + all-gather) of B bytes sends 2(K-1)/K*B per rank\n");
    std::printf("  DDP        all replicated; gradient all-reduced every step\n");
    std::printf("  ZeRO-1/2   AdamW moments (ZeRO-2: and gradients) sharded over K; reduce-scatter grads + all-gather weights\n");
    std::printf("  low-rank   adarank::low_rank_adamw, fixed rank r on the 7 layer weights (side by choose_side(standard):\n");
    std::printf("             basis r x min, moments r x max); embeddings, lm_head, RMSNorm dense (AdamW, all_reduce_mean);\n");
    std::printf("             per step: projected gradient r x max(rows,cols) per layer weight + dense gradients;\n");
    std::printf("             refresh every %td steps (amortised): full-gradient energy pass rows*cols + sketch products\n",
                kRefreshInterval);
    std::printf("             (rSVD = library default finder: warm start, 1 power iteration, oversampling 10;\n");
    std::printf("              exact = optimizer_config::galore's exact SVD, whose sketch product is the whole gradient);\n");
    std::printf("             state replicated on every rank; gradients held one parameter at a time (largest: 32000x4096)\n");
    std::printf("  GiB        2^30 bytes; 'vs DDP' = this method / DDP + AdamW\n");
}

void print_parameters(const std::vector<parameter>& model, const std::vector<index_t>& ranks_r) {
    std::printf("\nLow-rank layer weights: values all-reduced per weight (steady step; extra at a refresh with the default rSVD finder)\n");
    std::printf("%-10s %12s %6s %6s %6s %5s %16s %16s\n", "weight", "rows x cols", "count", "side", "len", "r", "steady values", "refresh extra");
    const adarank::rsvd_config finder{};
    for (const parameter& p : model) {
        if (!p.low_rank) continue;
        const low_rank_shape s = shape_of(p);
        for (const index_t r : ranks_r) {
            const std::string dims = std::to_string(p.rows) + "x" + std::to_string(p.cols);
            std::printf("%-10s %12s %6d %6s %6td %5td %16.0f %16.0f\n", p.name, dims.c_str(), p.count, std::string(adarank::to_string(s.side)).c_str(),
                        s.len, r, static_cast<double>(r) * static_cast<double>(s.other), elements(p) + sketch_elements(p, r, finder));
        }
    }
}

void print_table(const std::vector<plan>& plans, int ranks) {
    const plan& base = plans.front();
    std::printf("\nK = %d ranks (GiB per rank; communication per step)\n", ranks);
    std::printf("%-22s %9s %9s %8s %10s | %8s %8s %8s %8s %8s %8s\n", "method", "payload", "wire", "vs DDP", "refr.step", "weights", "grads",
                "state", "work", "total", "vs DDP");
    for (const plan& p : plans) {
        std::printf("%-22s %9.2f %9.2f %8.3f %10.2f | %8.2f %8.2f %8.2f %8.2f %8.2f %8.3f\n", p.name.c_str(), gib(p.payload()),
                    gib(wire(p.payload(), ranks)), p.payload() / base.payload(), gib(p.payload_steady + p.refresh_extra), gib(p.weights),
                    gib(p.gradients), gib(p.state), gib(p.workspace), gib(p.memory()), p.memory() / base.memory());
    }
}

} // namespace

int main() {
    const std::vector<parameter> model = llama_7b();
    print_header(model);
    print_parameters(model, {256, 128});
    const adarank::rsvd_config rsvd{};                                                // the library's default finder
    const adarank::rsvd_config exact = adarank::optimizer_config::galore(256).rsvd;   // GaLore: exact SVD
    for (const int k : kRankCounts) {
        std::vector<plan> plans{ddp(model), zero(model, 1, k), zero(model, 2, k), low_rank(model, 256, rsvd, "low-rank r=256 rSVD"),
                                low_rank(model, 128, rsvd, "low-rank r=128 rSVD"), low_rank(model, 256, exact, "low-rank r=256 exact")};
        print_table(plans, k);
    }
    std::printf("\npayload: bytes this rank puts into collectives per step, refresh traffic amortised over %td steps;\n", kRefreshInterval);
    std::printf("wire: 2(K-1)/K x payload; refr.step: payload of a step at which every low-rank weight refreshes;\n");
    std::printf("work: the low-rank optimizer's shared workspace (largest weight's buffers, sketch, bucket).\n");
    return 0;
}
