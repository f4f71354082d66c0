// The README's embedding snippets as a complete program (CI builds and runs it as the test
// example_embedding): one linear layer y = x·Wᵀ whose input is kept as a VeLoRA record, and its
// weight trained by AdaRankGrad from the factored gradient, with the definitions and the
// configuration a user needs. It exits non-zero when a step is not ok or the weight did not go
// low-rank, so the snippets cannot rot.
#include <adarank/adarank.hpp>
#include <velora/velora.hpp>

#include <cstdio>
#include <vector>

int main() {
    using velora::index_t;
    const index_t T = 512, D = 256, O = 128;   // tokens, input features, outputs
    std::vector<float> x(T * D), w(O * D), dy(T * O), dx(T * D), a(O * 32), dw(O * D);
    for (index_t i = 0; i < T * D; ++i) x[i] = static_cast<float>(velora::gaussian_at(1, i));
    for (index_t i = 0; i < O * D; ++i) w[i] = 0.05f * static_cast<float>(velora::gaussian_at(2, i));
    for (index_t i = 0; i < T * O; ++i) dy[i] = static_cast<float>(velora::gaussian_at(3, i));
    const float* x_ptr = x.data();
    const auto w_view = velora::make_view(w.data(), O, D);
    const auto dy_view = velora::make_view<const float>(dy.data(), T, O);
    const auto dx_view = velora::make_view(dx.data(), T, D);
    const auto a_view = velora::make_view(a.data(), O, 32);     // O×G
    const auto dw_view = velora::make_view(dw.data(), O, D);

    // ---- README: VeLoRA ----
    velora::eigen_backend<float> backend;                        // owns GEMM/reduction scratch
    velora::compressor<velora::eigen_backend<float>> comp(backend, D, {.groups = 32});
    velora::compressor<velora::eigen_backend<float>>::record_type record;   // reuse every step

    // ---- README: AdaRankGrad. With the defaults (rank cap 128) a 128×256 weight stays dense,
    // because low-rank state at rank 128 would not be smaller than AdamW's; cap the rank to make
    // it low-rank at this size.
    adarank::optimizer_config config;                                     // AdaRankGrad defaults
    config.rank = adarank::rank_policy::adaptive(0.05, 1, 32);           // the default ξ = 0.05, rank ≤ 32
    adarank::low_rank_adamw<velora::eigen_backend<float>> opt(backend, config);
    auto id = opt.add_parameter(O, D);                                    // low-rank when it saves memory

    int failures = 0;
    for (int step = 0; step < 3; ++step) {
        // forward: the host computes Y = X Wᵀ itself, then keeps only the record
        velora::status s = comp.compress(velora::make_view<const float>(x_ptr, T, D), record);   // T·G floats + v
        if (s == velora::status::non_finite_input || s == velora::status::overflow) {
            // NaN/Inf in X, or a value beyond the storage type's range: nothing was kept (record and v
            // are as before), so skip this step's backward. degenerate_input (all-zero X) is usable.
            ++failures;
            continue;
        }
        // backward: exact dX, factored dW (O×G), dense dW only if the optimizer needs it
        velora::linear_input_grad(backend, dy_view, velora::const_matrix_view<float>(w_view), dx_view);
        comp.gradient_factor(record, dy_view, a_view);                           // A = dYᵀZ
        comp.expand_weight_grad(record, a_view, dw_view);                        // scale·A·(I_G ⊗ vᵀ)

        s = opt.step(id, w_view, comp.factored(record, a_view));                 // or a dense gradient view
        // s == non_finite_input (NaN/Inf gradient) or overflow (a result too large for float): nothing changed.
        if (s != velora::status::ok) ++failures;
        const adarank::layer_info info = opt.layer_state(id);                          // rank, refreshes, state bytes
        std::printf("step %d: record %zu bytes (X is %zu), low-rank %d, rank %ld, refreshes %llu, optimizer state %zu bytes\n", step,
                    record.bytes(), static_cast<std::size_t>(T * D) * sizeof(float), info.low_rank ? 1 : 0, static_cast<long>(info.rank),
                    static_cast<unsigned long long>(info.refreshes), info.state_bytes);
        if (!info.low_rank || info.rank < 1 || info.rank > 32) ++failures;
    }
    std::printf("%s\n", failures == 0 ? "ok" : "FAILED");
    return failures == 0 ? 0 : 1;
}
