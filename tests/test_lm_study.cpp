// The demo trainer's configuration spellings (examples/lm/configs.hpp) and the study's statistics
// (examples/lm/study.hpp): what each key changes, the errors, that the named configurations
// are what they always were, GaLore's interpolation at equal bytes and the paired verdicts.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <lm/configs.hpp>
#include <lm/study.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using lm::configs::parse;
const lm::configs::defaults flags{.rank = 32, .lr = 1e-3, .lr_low_rank = 1e-2};

bool throws_with(const std::string& spec, const std::string& part) {
    try {
        (void)parse(spec, flags);
    } catch (const std::invalid_argument& e) {
        return std::string(e.what()).find(part) != std::string::npos;
    }
    return false;
}

} // namespace

TEST_CASE("the five names are the trainer's configurations as before") {
    const auto galore = parse("galore", flags);
    CHECK(galore.optimizer == [] {
        auto c = adarank::optimizer_config::galore(32, 200, 0.25);
        c.adam.lr = 1e-2;
        c.adam.weight_decay = 0;
        return c;
    }());
    CHECK(galore.fixed_rank);
    CHECK(galore.rank == 32);
    auto ada = adarank::optimizer_config{};
    ada.rank = adarank::rank_policy::adaptive(0.05, 1, 32);
    ada.adam.lr = 1e-2;
    ada.adam.weight_decay = 0;
    CHECK(parse("adarank", flags).optimizer == ada);
    CHECK(parse("velora+adarank", flags).optimizer == ada);
    CHECK(parse("velora+adarank", flags).velora);
    CHECK_FALSE(parse("adarank", flags).velora);
    CHECK(parse("adamw", flags).optimizer.adam.lr == 1e-3);
    CHECK_FALSE(parse("velora", flags).low_rank);
    CHECK(parse("velora", flags).rank == 0);
}

TEST_CASE("each key changes one ingredient, so the two methods are spelt from each other") {
    // GaLore with all of AdaRankGrad's ingredients and its SVD is AdaRankGrad; the reverse too.
    auto from_galore = parse("galore:rank=adaptive,refresh=converged,transport=rotation,svd=randomized", flags).optimizer;
    CHECK(from_galore == parse("adarank", flags).optimizer);
    CHECK(parse("adarank:rank=fixed,refresh=every,transport=none,svd=exact", flags).optimizer == parse("galore", flags).optimizer);
    const auto one = parse("galore:rank=adaptive", flags).optimizer;
    CHECK(one.rank == adarank::rank_policy::adaptive(0.05, 1, 32));
    CHECK(one.refresh == adarank::refresh_policy::every(200));
    CHECK(one.transport == adarank::transport_policy::none);
    CHECK(one.rsvd.exact_fraction == 0.0);
    const auto x = parse("adarank:r=64,xi=0.05,lr=0.02,interval=300,eps=0.4,scale=0.5,transport=reset", flags);
    CHECK(x.rank == 64);
    CHECK(x.optimizer.rank == adarank::rank_policy::adaptive(0.05, 1, 64));
    CHECK(x.optimizer.refresh == adarank::refresh_policy::converged(0.4, 50, 300));
    CHECK(x.optimizer.adam.lr == 0.02);
    CHECK(x.optimizer.scale == 0.5);
    CHECK(x.optimizer.transport == adarank::transport_policy::reset);
    CHECK(parse("galore:r=8", flags).optimizer.rank == adarank::rank_policy::fixed(8));
    CHECK(parse("adamw:lr=0.004", flags).optimizer.adam.lr == 0.004);
    const auto warm = parse("adamw:warmup=4,lr=0.004", flags);
    CHECK(lm::configs::lr_at(warm, 0) == doctest::Approx(0.001));
    CHECK(lm::configs::lr_at(warm, 2) == doctest::Approx(0.003));
    CHECK(lm::configs::lr_at(warm, 3) == 0.004);
    CHECK(lm::configs::lr_at(warm, 400) == 0.004);
    CHECK(lm::configs::lr_at(parse("adamw", flags), 0) == 1e-3);
}

TEST_CASE("bad spellings name the configuration, the key and what is wrong") {
    CHECK(throws_with("lion", "configuration 'lion': unknown configuration 'lion' (known: adamw, galore"));
    CHECK(throws_with("adamw:xi=0.1", "key 'xi' is for the low-rank configurations"));
    CHECK(throws_with("galore:r=0", "r=0 is not a number in [1"));
    CHECK(throws_with("galore:r=2.5", "r=2.5 is not a whole number"));
    CHECK(throws_with("galore:transport=teleport", "transport=teleport: expected rotation|clamped|none|reset"));
    CHECK(throws_with("galore:lr=1e-3,lr=2e-3", "key 'lr' given twice"));
    CHECK(throws_with("galore:", "nothing after ':'"));
    CHECK(throws_with("galore:r", "'r' is not key=value"));
    CHECK(throws_with("galore:colour=red", "unknown key 'colour'"));
    CHECK(throws_with("galore:eps=0.3", "eps is for refresh=converged"));
    CHECK(throws_with("adarank:rank=fixed,xi=0.1", "xi is for rank=adaptive"));
    CHECK(throws_with("adarank:xi=1", "xi=1 is not a number"));
}

namespace {

// A result of `series` whose seeds 1..n end at `losses` with `bytes` of peak state.
lm::study::point_result result(const std::string& config, const std::string& series, double bytes, std::vector<double> losses) {
    lm::study::point_result pr;
    pr.p = {config, series, config, {}};
    for (std::size_t i = 0; i < losses.size(); ++i) {
        report::run r;
        r.steps = 10;
        r.valid_steps = {10};
        r.valid_loss = {losses[i]};
        r.peak_optimizer_bytes = static_cast<std::size_t>(bytes);
        r.mean_optimizer_bytes = bytes;
        pr.seeds.push_back(i + 1);
        pr.runs.push_back(r);
    }
    return pr;
}

} // namespace

TEST_CASE("GaLore's loss at equal bytes is interpolated in log bytes, per seed, never extrapolated") {
    std::vector<lm::study::point_result> rs = {result("galore:r=8", "GaLore", 1000, {3.0, 3.2}), result("galore:r=32", "GaLore", 4000, {2.0, 2.4})};
    CHECK(lm::study::galore_at(rs, 1, 2000) == doctest::Approx(2.5));   // halfway in log bytes
    CHECK(lm::study::galore_at(rs, 2, 1000) == doctest::Approx(3.2));
    CHECK(lm::study::galore_at(rs, 2, 4000) == doctest::Approx(2.4));
    CHECK(std::isnan(lm::study::galore_at(rs, 1, 999)));
    CHECK(std::isnan(lm::study::galore_at(rs, 1, 4001)));
    CHECK(std::isnan(lm::study::galore_at(rs, 3, 2000)));   // no such seed
}

TEST_CASE("the verdict is a paired t-test over the seeds") {
    std::vector<lm::study::point_result> rs = {result("galore:r=8", "GaLore", 1000, {3.0, 3.1, 3.2}),
                                               result("galore:r=32", "GaLore", 4000, {2.0, 2.1, 2.2})};
    // At 2000 bytes GaLore gives 2.5, 2.6, 2.7.
    rs.push_back(result("a", "AdaRankGrad", 2000, {2.40, 2.51, 2.59}));   // -0.10, -0.09, -0.11
    rs.push_back(result("b", "AdaRankGrad", 2000, {2.60, 2.70, 2.81}));   // +0.10, +0.10, +0.11
    rs.push_back(result("c", "ablation", 2000, {2.40, 2.70, 2.75}));      // -0.10, +0.10, +0.05: spread too wide
    rs.push_back(result("d", "ablation", 8000, {1.0, 1.0, 1.0}));         // more bytes than any GaLore rank
    CHECK(lm::study::compare_with_galore(rs, rs[2]).verdict == "lower");
    CHECK(lm::study::compare_with_galore(rs, rs[2]).mean == doctest::Approx(-0.1));
    CHECK(lm::study::compare_with_galore(rs, rs[3]).verdict == "higher");
    CHECK(lm::study::compare_with_galore(rs, rs[4]).verdict == "tie");
    CHECK(lm::study::compare_with_galore(rs, rs[5]).verdict == "outside GaLore's range");
    CHECK(lm::study::compare_with_galore(rs, rs[0]).verdict.empty());   // GaLore itself
    // The budget rank rule is compared with GaLore at its bytes too (the budget and finetune plans).
    const auto budget = result("e", "budget", 2000, {2.40, 2.51, 2.59});
    rs.push_back(budget);
    CHECK(lm::study::compare_with_galore(rs, rs.back()).verdict == "lower");
    rs.pop_back();
    const auto s = lm::study::summarise(rs[4]);
    CHECK(s.mean == doctest::Approx(2.6166666667));
    CHECK(s.min == 2.40);
    CHECK(s.max == 2.75);
    CHECK(s.sd == doctest::Approx(0.1892969449));
    // A failed seed is left out of both.
    rs[2].runs[1].error = "diverged";
    CHECK(lm::study::compare_with_galore(rs, rs[2]).seeds == 2);
    CHECK(lm::study::summarise(rs[2]).mean == doctest::Approx(2.495));
}

TEST_CASE("a learning rate is appended to a configuration's spelling") {
    CHECK(lm::study::with_lr("adamw", 0.002) == "adamw:lr=0.002");
    CHECK(lm::study::with_lr("galore:r=8", 0.01) == "galore:r=8,lr=0.01");
    for (const auto& p : lm::study::find_plan("iso-memory")->points)
        for (double lr : p.lrs) CHECK_NOTHROW((void)parse(lm::study::with_lr(p.config, lr), flags));
}

TEST_CASE("rank=budget and budget=BYTES|rN spell the library's budget rank rule") {
    const auto bytes = parse("adarank:budget=4096", flags);
    CHECK(bytes.optimizer.rank == adarank::rank_policy::budget(4096, 1, 32));
    CHECK(bytes.budget_rank == 0);
    CHECK_FALSE(bytes.fixed_rank);
    const auto at_rank = parse("galore:r=64,rank=budget,budget=r16", flags);
    CHECK(at_rank.budget_rank == 16);
    CHECK(at_rank.optimizer.rank.is_budget());
    CHECK(at_rank.optimizer.rank.r_max == 64);
    CHECK(throws_with("adarank:rank=budget", "rank=budget needs budget=BYTES or budget=rN"));
    CHECK(throws_with("adarank:xi=0.1,budget=r8", "xi is for rank=adaptive"));
    CHECK(throws_with("adarank:budget=1.5", "not a whole number of bytes"));
    CHECK(throws_with("adarank:rank=fixed,budget=100", "budget is for rank=budget"));
    CHECK(throws_with("adarank:budget=100,rank=adaptive", "budget is for rank=budget"));
    CHECK(throws_with("adamw:budget=100", "for the low-rank configurations"));
    // budget=rN is GaLore's state at rank N: (r·(len + 2·other)) per matrix, dense moments 2·rows·cols.
    const std::vector<std::tuple<velora::index_t, velora::index_t, bool>> shapes{{128, 344, true}, {344, 128, true}, {1, 128, false}};
    CHECK(lm::configs::budget_bytes_at_rank(at_rank, 16, shapes, 4) == (16 * (128 + 2 * 344) * 2 + 2 * 128) * 4);
    for (const auto& p : lm::study::find_plan("budget")->points)
        for (double lr : p.lrs) CHECK_NOTHROW((void)parse(lm::study::with_lr(p.config, lr), flags));
}

TEST_CASE("the fine-tuning names: LoRA's adapters, what they train, their keys and errors") {
    const lm::configs::defaults d{.rank = 32, .lr = 1e-3, .lr_low_rank = 1e-2, .lr_lora = 4e-3};
    const auto lora = parse("lora", d);
    CHECK(lora.lora);
    CHECK(lora.adapters.on);
    CHECK(!lora.adapters.nf4);
    CHECK(!lora.velora);
    CHECK(!lora.low_rank);
    CHECK(lora.adapters.rank == 8);
    CHECK(lora.adapters.alpha == 16);
    CHECK(lora.adapters.dropout == 0.05);
    CHECK(lora.adapters.velora_scale == 0.1);
    CHECK(lora.optimizer.adam.lr == 4e-3);
    const auto vq = parse("velora+qlora:r=16,alpha=32,dropout=0.1,velora_scale=0.2,lr=1e-3", d);
    CHECK((vq.lora && vq.velora && vq.adapters.nf4));
    CHECK(vq.adapters.rank == 16);
    CHECK(vq.adapters.alpha == 32);
    CHECK(vq.adapters.dropout == 0.1);
    CHECK(vq.adapters.velora_scale == 0.2);
    CHECK(vq.optimizer.adam.lr == 1e-3);
    const auto vc = lm::configs::velora_of(vq, 32, true);   // share_qkv never applies to LoRA
    CHECK((vc.value && vc.down && !vc.share_qkv));
    const auto full = parse("full", d);
    CHECK((!full.lora && !full.low_rank && !full.velora && full.optimizer.adam.lr == 1e-3));
    CHECK(parse("qlora", d).adapters.nf4);
    CHECK(!parse("velora+lora", d).adapters.nf4);
    CHECK(throws_with("lora:xi=0.1", "key 'xi' is not a LoRA key"));
    CHECK(throws_with("lora:velora_scale=0.1", "key 'velora_scale' is for velora+lora and velora+qlora"));
    CHECK(throws_with("adamw:alpha=2", "is for the low-rank configurations (galore, adarank, velora+adarank) and the LoRA ones"));
    CHECK(throws_with("lora:dropout=1", "dropout=1 is not a number"));
    CHECK(throws_with("lora:r=0", "r=0 is not a number"));
    CHECK(throws_with("loraa", "unknown configuration 'loraa'"));
    for (const auto& p : lm::study::find_plan("finetune")->points)
        for (double lr : p.lrs) CHECK_NOTHROW((void)parse(lm::study::with_lr(p.config, lr), d));
}

TEST_CASE("a plan's pairs compare two configurations seed by seed") {
    std::vector<lm::study::point_result> rs = {result("lora", "LoRA", 100, {2.00, 2.10, 2.20}), result("velora+lora", "LoRA", 100, {2.010, 2.112, 2.211}),
                                               result("qlora", "LoRA", 100, {2.05, 2.05, 2.25})};
    const auto worse = lm::study::compare_pair(rs, {"velora+lora", "lora"});
    CHECK(worse.c.seeds == 3);
    CHECK(worse.c.mean == doctest::Approx(0.011));
    CHECK(worse.c.verdict == "higher");
    CHECK(lm::study::compare_pair(rs, {"lora", "velora+lora"}).c.verdict == "lower");
    CHECK(lm::study::compare_pair(rs, {"qlora", "lora"}).c.verdict == "tie");   // +0.05, -0.05, +0.05
    CHECK(lm::study::compare_pair(rs, {"adarank", "lora"}).c.verdict == "not run");
    rs[1].seeds = {7, 8, 9};
    CHECK(lm::study::compare_pair(rs, {"velora+lora", "lora"}).c.verdict == "no common seed");
    const auto* ft = lm::study::find_plan("finetune");
    REQUIRE(ft);
    CHECK(ft->fine_tuning);
    CHECK(ft->points.size() == 10);
    CHECK(ft->pairs.size() == 9);
    for (const auto* pl : {ft, lm::study::find_plan("budget")})
        for (const auto& pair : pl->pairs) {   // every pair names two points of the plan
            CHECK(std::any_of(pl->points.begin(), pl->points.end(), [&](const auto& p) { return p.config == pair.a; }));
            CHECK(std::any_of(pl->points.begin(), pl->points.end(), [&](const auto& p) { return p.config == pair.b; }));
        }
    CHECK(lm::study::find_plan("budget")->pairs.size() == 3);
}
