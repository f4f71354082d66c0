#include <velora/velora.hpp>

#include <cstdio>
#include <vector>

int main() {
    velora::eigen_backend<float> backend;
    const velora::index_t t = 16, d = 64, o = 8;
    std::vector<float> x(t * d, 1.0f), dy(t * o, 0.5f), a(o * 32);
    velora::compressor<velora::eigen_backend<float>> c(backend, d);
    const auto record = c.compress(velora::make_view<const float>(x.data(), t, d));
    c.weight_grad(record, velora::make_view<const float>(dy.data(), t, o), velora::make_view(a.data(), o, 32));
    // X = all ones, v = 1/sqrt(2): Z = sqrt(2), A = T · 0.5 · sqrt(2).
    const bool ok = record.bytes() == t * 32 * 4 + 2 * 4 && a[0] > 11.31f && a[0] < 11.32f;
    std::printf("consumer: record %zu bytes, A[0] = %f: %s\n", record.bytes(), a[0], ok ? "ok" : "WRONG");
    return ok ? 0 : 1;
}
