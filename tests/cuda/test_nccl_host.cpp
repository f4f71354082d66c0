// The NCCL communicator's plain-C++ side, built by the host compiler and run on every machine
// (no GPU needed): the concept, the error format, and the construction path NCCL refuses before
// it touches a device. Collectives need a communicator, i.e. a GPU: they are in test_nccl.cu.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <velora/cuda/nccl.hpp>

#include <string>
#include <type_traits>

using namespace velora::cuda;

namespace {
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
} // namespace

static_assert(velora::communicator<nccl_communicator>);
static_assert(!std::is_copy_constructible_v<nccl_communicator> && !std::is_copy_assignable_v<nccl_communicator>);
static_assert(std::is_nothrow_move_constructible_v<nccl_communicator>);

TEST_CASE("the linked NCCL library answers and has the header's major version") {
    int version = 0;
    REQUIRE(ncclGetVersion(&version) == ncclSuccess);
    MESSAGE("NCCL library version code " << version << ", header " << NCCL_VERSION_CODE);
    CHECK(version / 10000 == NCCL_MAJOR);
}

TEST_CASE("an NCCL status names the velora function, the call, the result's name and ncclGetErrorString") {
    for (int code = 1; code < static_cast<int>(ncclNumResults); ++code) {
        const auto r = static_cast<ncclResult_t>(code);
        CAPTURE(code);
        const cuda_status s = detail::make_status("velora::f", "ncclAllReduce", r);
        CHECK_FALSE(s.ok());
        CHECK(s.library == cuda_library::nccl);
        CHECK(s.code == code);
        CHECK(s.message == std::string("velora::f: ncclAllReduce failed: ") + detail::nccl_name(r) + " (" + ncclGetErrorString(r) + ")");
        CHECK(std::string(detail::nccl_name(r)) != "unknown NCCL result");
    }
    CHECK(std::string(detail::nccl_name(ncclInvalidArgument)) == "ncclInvalidArgument");
    CHECK(to_string(cuda_library::nccl) == "NCCL");
}

TEST_CASE("check_nccl is silent on success and throws cuda_error otherwise") {
    CHECK_NOTHROW(detail::check_nccl(ncclSuccess, nullptr, "velora::f", "ncclBroadcast"));
    try {
        detail::check_nccl(ncclSystemError, nullptr, "velora::f", "ncclBroadcast");
        FAIL("no exception");
    } catch (const cuda_error& e) {
        CHECK(e.status().library == cuda_library::nccl);
        CHECK(e.status().code == static_cast<int>(ncclSystemError));
        CHECK(contains(e.what(), "velora::f: ncclBroadcast failed: ncclSystemError ("));
        CHECK(contains(e.what(), ncclGetErrorString(ncclSystemError)));
    }
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
    // ncclInProgress is waited for through ncclCommGetAsyncError; when NCCL cannot answer for the
    // communicator (here: none) its answer is the error, instead of a wait that never ends.
    try {
        detail::check_nccl(ncclInProgress, nullptr, "velora::f", "ncclAllReduce");
        FAIL("no exception");
    } catch (const cuda_error& e) {
        CHECK(e.status().code == static_cast<int>(ncclInvalidArgument));
        CHECK(contains(e.what(), "velora::f: ncclAllReduce returned ncclInProgress; ncclCommGetAsyncError failed: ncclInvalidArgument ("));
        MESSAGE(std::string(e.what()));
    }
#endif
}

TEST_CASE("a null NCCL communicator is refused at construction with a cuda_error naming the call and NCCL's message") {
    try {
        const nccl_communicator comm(nullptr, nullptr);
        FAIL("constructed from a null communicator");
    } catch (const cuda_error& e) {
        CHECK(e.status().library == cuda_library::nccl);
        CHECK(e.status().code == static_cast<int>(ncclInvalidArgument));
        CHECK(contains(e.what(), "velora::cuda::nccl_communicator::nccl_communicator: ncclCommUserRank failed: ncclInvalidArgument ("));
        CHECK(contains(e.what(), ncclGetErrorString(ncclInvalidArgument)));
        MESSAGE(std::string(e.what()));
    }
}
