#pragma once
// process_group_communicator: the library's communicator concept over torch.distributed, for the
// extension's optimizer (data-parallel steps) and VeloraLinear (a v shared by the ranks). Included
// by bindings.cpp only: the extension stays one translation unit.
#include <torch/extension.h>

#include <cstddef>
#include <span>

#include <velora/torch/torch.hpp>

namespace velora_python {

namespace py = pybind11;
namespace vt = velora::torch;

// The library's communicator over torch.distributed: every collective is the torch.distributed
// call on a tensor that views the library's buffer (torch::from_blob: no copy), on `group` (any
// ProcessGroup: Gloo on CPU). Called without the GIL (an optimizer step, a layer's shared first v):
// each collective takes it. Gloo's and NCCL's ring all-reduce leave the same bits on every rank (each chunk is summed
// once, then copied), as the concept requires. `fn` names the caller in the error for a group
// this process is not a member of.
class process_group_communicator final : public vt::dynamic_communicator {
public:
    process_group_communicator(py::object group, const char* fn) : group_(std::move(group)), dist_(py::module_::import("torch.distributed")) {
        rank_ = dist_.attr("get_rank")(group_).cast<int>();
        size_ = dist_.attr("get_world_size")(group_).cast<int>();
        velora::detail::require(rank_ >= 0 && size_ >= 1, fn, "argument 'process_group': this process is not a member (rank ",
                                rank_, " of ", size_, ")");
    }
    ~process_group_communicator() override {
        py::gil_scoped_acquire gil;
        group_ = py::object();
        dist_ = py::object();
    }
    int rank() const override { return rank_; }
    int size() const override { return size_; }
    void all_reduce_sum(std::span<float> data) override { all_reduce(data.data(), data.size(), at::kFloat); }
    void all_reduce_sum(std::span<double> data) override { all_reduce(data.data(), data.size(), at::kDouble); }
    void broadcast(std::span<std::byte> data, int root) override {
        if (data.empty()) return;
        py::gil_scoped_acquire gil;
        const at::Tensor view = at::from_blob(data.data(), {static_cast<std::int64_t>(data.size())}, at::kByte);
        dist_.attr("broadcast")(view, py::arg("src") = global_rank(root), py::arg("group") = group_);
    }
    bool any(bool flag) override {
        py::gil_scoped_acquire gil;
        const at::Tensor t = at::full({1}, flag ? 1 : 0, at::kInt);
        dist_.attr("all_reduce")(t, py::arg("group") = group_);
        return t.item<int>() > 0;
    }

private:
    void all_reduce(void* data, std::size_t n, at::ScalarType type) {
        if (n == 0) return;
        py::gil_scoped_acquire gil;
        const at::Tensor view = at::from_blob(data, {static_cast<std::int64_t>(n)}, type);
        dist_.attr("all_reduce")(view, py::arg("group") = group_);
    }
    // torch.distributed.broadcast takes the root's global rank.
    py::object global_rank(int root) {
        if (group_.is_none()) return py::int_(root);
        py::object c10d = dist_.attr("distributed_c10d");
        if (py::hasattr(dist_, "get_global_rank")) return dist_.attr("get_global_rank")(group_, root);
        return c10d.attr("_get_global_rank")(group_, root);
    }

    py::object group_, dist_;
    int rank_ = 0, size_ = 1;
};

} // namespace velora_python
