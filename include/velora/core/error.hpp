#pragma once
/// \file
/// Error conventions shared by the whole library.
///
/// Caller mistakes (shapes, out-of-range hyper-parameters, malformed state blobs) throw
/// std::invalid_argument whose message starts with the fully qualified function name and
/// names the argument and the values involved. Every public entry point validates before it
/// mutates anything, so a throw leaves all library state as it was. Numerical outcomes that
/// a caller may want to act on (non-finite gradients, rank collapse) are reported as a
/// `status`, never thrown and never silently absorbed.
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace velora {

/// Thrown when a serialized state blob is truncated, corrupted, of another kind or of an
/// unsupported version. It is an invalid_argument: the blob is the bad argument.
class state_format_error : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

/// Outcome of an operation that can fail for numerical (not programming) reasons.
enum class status {
    ok = 0,
    non_finite_input,   ///< NaN or Inf in an input; nothing was changed
    degenerate_input,   ///< e.g. an all-zero mean where a direction was needed; a documented fallback was used
};

constexpr std::string_view to_string(status s) noexcept {
    switch (s) {
    case status::ok: return "ok";
    case status::non_finite_input: return "non_finite_input";
    case status::degenerate_input: return "degenerate_input";
    }
    return "unknown";
}

namespace detail {

template <class Error = std::invalid_argument, class... Parts>
[[noreturn]] void fail_as(std::string_view function, const Parts&... parts) {
    std::ostringstream os;
    os << function << ": ";
    (os << ... << parts);
    throw Error(os.str());
}

/// Throws std::invalid_argument("<function>: <parts...>").
template <class... Parts>
[[noreturn]] void fail(std::string_view function, const Parts&... parts) {
    fail_as<std::invalid_argument>(function, parts...);
}

template <class... Parts>
void require(bool condition, std::string_view function, const Parts&... parts) {
    if (!condition) fail(function, parts...);
}

} // namespace detail
} // namespace velora
