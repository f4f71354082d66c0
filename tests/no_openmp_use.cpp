// Compiled (not run) by CTest without -fopenmp and with -Wall -Wextra -Werror: the CPU backend's
// kernels, the compressor and the optimizer instantiated as a host without OpenMP would use them
// (a parameter read only inside an OpenMP pragma once broke such builds).
#include <adarank/adarank.hpp>
#include <velora/velora.hpp>

#include <vector>

int main() {
    using B = velora::eigen_backend<float>;
    B backend;
    const velora::index_t t = 4, d = 8, o = 6;
    std::vector<float> x(t * d, 1.0f), dy(t * o, 1.0f), w(o * d, 0.5f), a(o * 2), dw(o * d);
    velora::compressor<B> c(backend, d, {.groups = 2});
    velora::compressor<B>::record_type rec;
    (void)c.compress(velora::make_view<const float>(x.data(), t, d), rec);
    c.gradient_factor(rec, velora::make_view<const float>(dy.data(), t, o), velora::make_view(a.data(), o, 2));
    c.expand_weight_grad(rec, velora::make_view<const float>(a.data(), o, 2), velora::make_view(dw.data(), o, d));
    adarank::low_rank_adamw<B> opt(backend);
    const auto id = opt.add_parameter(o, d, adarank::param_kind::low_rank);
    return opt.step(id, velora::make_view(w.data(), o, d), c.factored(rec, velora::make_view<const float>(a.data(), o, 2))) == velora::status::ok ? 0 : 1;
}
