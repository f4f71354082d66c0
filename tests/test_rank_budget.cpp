// The global memory-budget rank rule (rank_policy::budget, adarank/rank_budget.hpp): the greedy
// allocation against an exhaustive search on small cases, ties, zero-energy units; and in the
// optimizer: state_bytes() within the budget at every step, the ranks reaching the allocation on
// stationary spectra, the same bits at 1 and 2 threads, refusal of bad budgets, a state round trip.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <adarank/adarank.hpp>
#include <adarank/rank_budget.hpp>
#include <velora/backend/eigen.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "spectra.hpp"
#include "test_util.hpp"

using velora::index_t;
using velora::status;
using adarank::budget_item;
using adarank::param_kind;
template <class T>
using optimizer_t = adarank::low_rank_adamw<velora::eigen_backend<T>>;

namespace {

double energy_of(std::span<const budget_item> items, std::span<const index_t> ranks) {
    double e = 0;
    for (std::size_t i = 0; i < items.size(); ++i)
        for (index_t k = 0; k < ranks[i]; ++k) e += items[i].energy[static_cast<std::size_t>(k)];
    return e;
}

// The best energy over every rank vector with lo <= r <= min(hi, |energy|) within the budget.
double exhaustive_best(std::span<const budget_item> items, std::uint64_t budget) {
    std::vector<index_t> r(items.size());
    double best = -1;
    const std::function<void(std::size_t)> visit = [&](std::size_t i) {
        if (i == items.size()) {
            if (adarank::budget_bytes_of(items, r) <= budget) best = std::max(best, energy_of(items, r));
            return;
        }
        const index_t top = std::max(items[i].lo, std::min<index_t>(items[i].hi, static_cast<index_t>(items[i].energy.size())));
        for (r[i] = items[i].lo; r[i] <= top; ++r[i]) visit(i + 1);
    };
    visit(0);
    return best;
}

// Non-increasing unit energies, n values from the counter-based stream.
std::vector<double> random_spectrum(std::size_t n, std::uint64_t seed) {
    std::vector<double> s(n);
    for (std::size_t i = 0; i < n; ++i) s[i] = 0.05 + std::abs(velora::gaussian_at(seed, i));
    std::sort(s.begin(), s.end(), std::greater<>());
    return s;
}

} // namespace

TEST_CASE("allocate_rank_budget: equal unit costs give the exhaustive optimum; unequal ones are within one unit's energy of it") {
    for (std::uint64_t trial = 0; trial < 300; ++trial) {
        const bool equal_costs = trial % 2 == 0;
        const std::size_t n = 2 + trial % 3;
        std::vector<std::vector<double>> spectra;
        std::vector<budget_item> items;
        for (std::size_t i = 0; i < n; ++i) spectra.push_back(random_spectrum(4, 1000 * trial + i));
        double largest_unit = 0;
        for (std::size_t i = 0; i < n; ++i) {
            const index_t lo = static_cast<index_t>((trial + i) % 2), hi = 2 + static_cast<index_t>((trial / 3 + i) % 3);
            const std::uint64_t unit = equal_costs ? 100 : 60 + 37 * ((trial + 3 * i) % 4);
            items.push_back({spectra[i], lo, hi, unit});
            largest_unit = std::max(largest_unit, spectra[i][0]);
        }
        std::vector<index_t> floor(n);
        for (std::size_t i = 0; i < n; ++i) floor[i] = items[i].lo;
        const std::uint64_t budget = adarank::budget_bytes_of(items, floor) + 50 + 41 * (trial % 11);
        std::vector<index_t> ranks(n);
        adarank::allocate_rank_budget(items, budget, ranks);
        CAPTURE(trial);
        CHECK(adarank::budget_bytes_of(items, ranks) <= budget);
        for (std::size_t i = 0; i < n; ++i) CHECK((ranks[i] >= items[i].lo && ranks[i] <= items[i].hi));
        const double best = exhaustive_best(items, budget), got = energy_of(items, ranks);
        CHECK(got <= best * (1 + 1e-12));
        if (equal_costs) CHECK(got == doctest::Approx(best).epsilon(1e-12));
        else CHECK(got >= best - largest_unit * (1 + 1e-12));
    }
}

TEST_CASE("allocate_rank_budget: a tie goes to the smaller index, a unit of zero energy is never bought, an infeasible floor stays at lo") {
    const std::vector<double> same{3, 2, 1};   // the energy of each rank unit
    std::vector<budget_item> items{{same, 1, 3, 10}, {same, 1, 3, 10}};
    std::vector<index_t> ranks(2);
    adarank::allocate_rank_budget(items, 30, ranks);   // one unit beyond the floors: both offer σ₂² = 4
    CHECK(ranks == std::vector<index_t>{2, 1});
    adarank::allocate_rank_budget(items, 40, ranks);
    CHECK(ranks == std::vector<index_t>{2, 2});

    const std::vector<double> flat{5, 0, 0};
    std::vector<budget_item> zero{{flat, 1, 3, 10}};
    std::vector<index_t> one(1);
    adarank::allocate_rank_budget(zero, 1000, one);
    CHECK(one[0] == 1);

    adarank::allocate_rank_budget(items, 5, ranks);   // below the floors' 20 bytes
    CHECK(ranks == std::vector<index_t>{1, 1});

    std::vector<budget_item> bad{{same, 3, 2, 10}};
    CHECK(test::invalid_argument_message([&] { adarank::allocate_rank_budget(bad, 100, one); }).find("adarank::allocate_rank_budget") !=
          std::string::npos);
}

namespace {

struct shape {
    index_t rows, cols;
    param_kind kind;
    std::vector<double> sigma;   // the gradient's spectrum (empty: a Gaussian gradient)
};

template <class T>
std::vector<T> gradient_of(const shape& s, std::uint64_t seed) {
    Eigen::MatrixXd g = s.sigma.empty() ? test::gaussian_matrix(s.rows, s.cols, seed) : test::with_spectrum(s.rows, s.cols, s.sigma, seed);
    std::vector<T> out(static_cast<std::size_t>(s.rows * s.cols));
    for (index_t i = 0; i < s.rows; ++i)
        for (index_t j = 0; j < s.cols; ++j) out[static_cast<std::size_t>(i * s.cols + j)] = static_cast<T>(g(i, j));
    return out;
}

// Steps every parameter `rounds` times with fixed gradients (or new Gaussian ones each round when
// `moving`), checking state_bytes() <= the budget after every step.
template <class T>
void run(optimizer_t<T>& o, const std::vector<shape>& shapes, std::vector<std::vector<T>>& weights, int rounds, bool moving, std::uint64_t budget,
         int first_round = 0) {
    for (int round = first_round; round < first_round + rounds; ++round)
        for (std::size_t p = 0; p < shapes.size(); ++p) {
            const auto g = gradient_of<T>(shapes[p], moving ? 100 * p + static_cast<std::uint64_t>(round) : 7 * p + 1);
            const auto st = o.step(static_cast<index_t>(p), velora::make_view(weights[p].data(), shapes[p].rows, shapes[p].cols),
                                   velora::make_view<const T>(g.data(), shapes[p].rows, shapes[p].cols));
            REQUIRE(st == status::ok);
            REQUIRE(o.state_bytes() <= budget);
        }
}

template <class T>
std::vector<std::vector<T>> initial_weights(const std::vector<shape>& shapes) {
    std::vector<std::vector<T>> w;
    for (std::size_t p = 0; p < shapes.size(); ++p) w.push_back(test::data<T>(static_cast<std::size_t>(shapes[p].rows * shapes[p].cols), 50 + p));
    return w;
}

} // namespace

TEST_CASE("budget rule in the optimizer: within the budget at every step, and the ranks reach the allocation of the spectra") {
    // Three low-rank parameters with known spectra (exact SVD: the sketch's σ are the gradient's)
    // and a dense bias; refresh every step.
    const std::vector<shape> shapes{{16, 24, param_kind::low_rank, {8, 6, 1, 0.5, 0.2, 0.1}},
                                    {24, 16, param_kind::low_rank, {5, 4.5, 4, 3.5, 0.3, 0.1}},
                                    {12, 12, param_kind::low_rank, {9, 0.4, 0.3, 0.2, 0.1, 0.05}},
                                    {1, 24, param_kind::dense, {}}};
    adarank::optimizer_config c;
    c.adam.lr = 1e-3;
    c.refresh = adarank::refresh_policy::every(1);
    c.rsvd.exact_fraction = 0.0;
    const std::uint64_t dense = 2 * 24 * sizeof(double);
    const std::uint64_t units[3] = {(16 + 2 * 24) * sizeof(double), (16 + 2 * 24) * sizeof(double), (12 + 2 * 12) * sizeof(double)};
    const std::uint64_t budget = dense + 2 * units[0] + 2 * units[1] + 2 * units[2] + 600;   // GaLore's rank 2, and change
    c.rank = adarank::rank_policy::budget(budget, 1, 6);
    velora::eigen_backend<double> backend(1);
    optimizer_t<double> o(backend, c);
    for (const shape& s : shapes) o.add_parameter(s.rows, s.cols, s.kind);
    auto w = initial_weights<double>(shapes);
    run(o, shapes, w, 4, false, budget);

    // The rule compares each matrix's energy fractions σ_i²/‖G‖_F².
    std::vector<std::vector<double>> fractions(3);
    std::vector<budget_item> items;
    for (std::size_t p = 0; p < 3; ++p) {
        double total = 0;
        for (double s : shapes[p].sigma) total += s * s;
        for (double s : shapes[p].sigma) fractions[p].push_back(s * s / total);
        items.push_back({fractions[p], 1, 6, units[p]});
    }
    std::vector<index_t> expected(3);
    adarank::allocate_rank_budget(items, budget - dense, expected);
    for (int p = 0; p < 3; ++p) CHECK(o.layer_state(p).rank == expected[static_cast<std::size_t>(p)]);
    // Parameter 1's flat spectrum gets more than GaLore's 2 and than parameter 2's single direction.
    CHECK(expected[1] > 2);
    CHECK(expected[1] > expected[2]);
    CHECK(o.state_bytes() <= budget);
}

TEST_CASE("budget rule: the same bits at 1 and 2 threads, and a saved state resumes bit for bit") {
    const std::vector<shape> shapes{{20, 32, param_kind::low_rank, {}}, {32, 20, param_kind::low_rank, {}}, {24, 24, param_kind::automatic, {}},
                                    {1, 32, param_kind::automatic, {}}};
    adarank::optimizer_config c;
    c.adam.lr = 1e-2;
    c.refresh = adarank::refresh_policy::converged(0.5, 2, 3);
    c.rsvd.oversampling = 2;
    const std::uint64_t budget = 2 * 32 * 4 + 9 * (20 + 2 * 32) * 4;
    c.rank = adarank::rank_policy::budget(budget, 1, 8);
    auto make = [&](velora::eigen_backend<float>& b) {
        optimizer_t<float> o(b, c);
        for (const shape& s : shapes) o.add_parameter(s.rows, s.cols, s.kind);
        return o;
    };
    velora::eigen_backend<float> one(1), two(2);
    auto a = make(one), b = make(two);
    auto wa = initial_weights<float>(shapes), wb = wa;
    run(a, shapes, wa, 8, true, budget);
    run(b, shapes, wb, 8, true, budget);
    CHECK(a.save_state() == b.save_state());
    CHECK(wa == wb);
    CHECK(a.layer_state(0).refreshes >= 3);

    // Round trip: a fresh optimizer loaded from a's state continues exactly as a does.
    auto c2 = make(one);
    c2.load_state(a.save_state());
    CHECK(c2.save_state() == a.save_state());
    auto wc = wa;
    run(a, shapes, wa, 6, true, budget, 8);
    run(c2, shapes, wc, 6, true, budget, 8);
    CHECK(c2.save_state() == a.save_state());
    CHECK(wc == wa);

    // A budget state does not load into an optimizer under another rank rule, or another budget.
    adarank::optimizer_config other = c;
    other.rank = adarank::rank_policy::adaptive(0.05, 1, 8);
    optimizer_t<float> adaptive(one, other);
    for (const shape& s : shapes) adaptive.add_parameter(s.rows, s.cols, s.kind);
    CHECK_THROWS_AS(adaptive.load_state(a.save_state()), velora::state_format_error);
    other.rank = adarank::rank_policy::budget(budget + 4, 1, 8);
    optimizer_t<float> wider(one, other);
    for (const shape& s : shapes) wider.add_parameter(s.rows, s.cols, s.kind);
    CHECK_THROWS_AS(wider.load_state(a.save_state()), velora::state_format_error);
}

TEST_CASE("budget rule: bad budgets are refused naming the values") {
    velora::eigen_backend<float> b(1);
    const std::string ctor = "adarank::low_rank_adamw::low_rank_adamw";
    auto config_with = [](adarank::rank_policy r) {
        adarank::optimizer_config c;
        c.rank = r;
        return c;
    };
    const std::string zero = test::invalid_argument_message([&] { optimizer_t<float> o(b, config_with(adarank::rank_policy::budget(0, 1, 8))); });
    CHECK(zero.find(ctor) != std::string::npos);
    CHECK(zero.find("budget_bytes must be > 0") != std::string::npos);
    auto stray = adarank::rank_policy::adaptive(0.1, 1, 8);
    stray.budget_bytes = 4096;
    const std::string set = test::invalid_argument_message([&] { optimizer_t<float> o(b, config_with(stray)); });
    CHECK(set.find("budget_bytes = 4096") != std::string::npos);
    auto eight_bit = config_with(adarank::rank_policy::budget(4096, 1, 8));   // the budget counts float moments
    eight_bit.state = adarank::state_format::int8_blockwise;
    const std::string q8 = test::invalid_argument_message([&] { optimizer_t<float> o(b, eight_bit); });
    CHECK(q8.find(ctor) != std::string::npos);
    CHECK(q8.find("4096 bytes") != std::string::npos);
    CHECK(q8.find("config.state must then be float32, got int8_blockwise") != std::string::npos);

    // 16x24 float at rank 1: (16 + 48)·4 = 256 bytes; a 1x24 bias: 192 bytes.
    optimizer_t<float> o(b, config_with(adarank::rank_policy::budget(500, 1, 8)));
    o.add_parameter(16, 24, param_kind::low_rank);
    const std::string over = test::invalid_argument_message([&] { o.add_parameter(24, 16, param_kind::low_rank); });
    CHECK(over.find("adarank::low_rank_adamw::add_parameter") != std::string::npos);
    CHECK(over.find("needs 256 bytes") != std::string::npos);
    CHECK(over.find("hold 256") != std::string::npos);
    CHECK(over.find("budget_bytes = 500") != std::string::npos);
    CHECK(o.size() == 1);   // nothing registered
    o.add_parameter(1, 24, param_kind::dense);   // 256 + 192 <= 500
    CHECK(o.size() == 2);

    // set_basis: a rank that would not fit beside the others is refused.
    std::vector<float> basis(2 * 16, 0.0f);
    basis[0] = 1;
    basis[16 + 1] = 1;
    const std::string given = test::invalid_argument_message([&] { (void)o.set_basis(0, velora::make_view<const float>(basis.data(), 2, 16)); });
    CHECK(given.find("adarank::low_rank_adamw::set_basis") != std::string::npos);
    CHECK(given.find("a basis of rank 2 needs 512 bytes") != std::string::npos);
    CHECK(o.set_basis(0, velora::make_view<const float>(basis.data(), 1, 16)) == status::ok);
    CHECK(o.state_bytes() <= 500);
}
