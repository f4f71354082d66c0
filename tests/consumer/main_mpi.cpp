// The installed package's MPI component: one data-parallel step through velora::mpi.
#include <adarank/adarank.hpp>
#include <velora/backend/eigen.hpp>
#include <velora/distributed/mpi.hpp>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    int rc = 0;
    {
        velora::mpi_communicator comm(MPI_COMM_WORLD);
        velora::eigen_backend<float> backend;
        adarank::low_rank_adamw<velora::eigen_backend<float>> opt(backend, adarank::optimizer_config::galore(4));
        const auto id = opt.add_parameter(16, 32, adarank::param_kind::low_rank, comm);
        std::vector<float> w(16 * 32, 0.5f), g(16 * 32);
        for (std::size_t i = 0; i < g.size(); ++i) g[i] = static_cast<float>(i % 7) - 3.0f;
        const velora::status s = opt.step(id, {w.data(), 16, 32, 32}, velora::const_matrix_view<float>{g.data(), 16, 32, 32}, comm);
        rc = s == velora::status::ok && opt.layer_state(id).rank == 4 ? 0 : 1;
        std::printf("velora::mpi consumer: %d rank(s), step %s, rank %ld\n", comm.size(), s == velora::status::ok ? "ok" : "failed",
                    static_cast<long>(opt.layer_state(id).rank));
    }
    MPI_Finalize();
    return rc;
}
