#pragma once
// libtorch (with everything the adapter includes) before doctest: Debian's libtorch is built with
// glog, and some of its headers pull in glog's CHECK, CHECK_EQ, ... macros, which abort the
// process on failure. Included after doctest they silently replace doctest's assertions (the
// system-header redefinition is not warned about), so they are removed here first.
#include <torch/torch.h>
#include <velora/torch/torch.hpp>

#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE

#include <doctest/doctest.h>

#include <string>

// Helpers shared by the adapter's test programs.
namespace torch_test {

// Whether `s` contains `part`; reports the whole string when it does not.
inline bool contains(const std::string& s, const std::string& part) {
    if (s.find(part) != std::string::npos) return true;
    MESSAGE("'" << part << "' not found in: " << s);
    return false;
}

// Restores libtorch's intra-op thread count at the end of a test that changes it.
struct thread_count_guard {
    int saved = at::get_num_threads();
    ~thread_count_guard() { at::set_num_threads(saved); }
};

// max |a − b| / max |b|, computed in double.
inline double max_relative(const at::Tensor& a, const at::Tensor& b) {
    const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-300)).item<double>();
}

} // namespace torch_test
