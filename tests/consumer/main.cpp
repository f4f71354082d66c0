#include <adarank/adarank.hpp>
#include <velora/velora.hpp>

#include <cstdio>
#include <vector>

int main() {
    velora::eigen_backend<float> backend;
    const velora::index_t t = 16, d = 64, o = 8;
    std::vector<float> x(t * d, 1.0f), dy(t * o, 0.5f), a(o * 32);
    velora::compressor<velora::eigen_backend<float>> c(backend, d);
    const auto record = c.compress(velora::make_view<const float>(x.data(), t, d));
    c.gradient_factor(record, velora::make_view<const float>(dy.data(), t, o), velora::make_view(a.data(), o, 32));
    // X = all ones, v = 1/sqrt(2): Z = sqrt(2), A = T · 0.5 · sqrt(2).
    // One AdaRankGrad step on the factored gradient of an 8×64 weight: A has rank 1 (all rows
    // equal), so the adaptive rank is 1 and the state is 1·8 + 2·1·64 floats (left side).
    std::vector<float> w(o * d, 0.0f);
    adarank::low_rank_adamw<velora::eigen_backend<float>> opt(backend);
    const auto id = opt.add_parameter(o, d, adarank::param_kind::low_rank);
    const auto st = opt.step(id, velora::make_view(w.data(), o, d), c.factored(record, velora::make_view<const float>(a.data(), o, 32)));
    const bool ok = record.bytes() == t * 32 * 4 + 2 * 4 && a[0] > 11.31f && a[0] < 11.32f && st == velora::status::ok &&
                    opt.layer_state(id).rank == 1 && opt.layer_state(id).state_bytes == (8 + 2 * 64) * 4;
    std::printf("consumer: record %zu bytes, A[0] = %f, optimizer rank %ld, state %zu bytes: %s\n", record.bytes(), a[0],
                static_cast<long>(opt.layer_state(id).rank), opt.layer_state(id).state_bytes, ok ? "ok" : "WRONG");
    return ok ? 0 : 1;
}
