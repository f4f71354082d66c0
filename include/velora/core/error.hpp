#pragma once
/// \file
/// Error conventions shared by the whole library.
///
/// One channel per kind of trouble:
/// - Caller mistakes (shapes, sizes whose products overflow, out-of-range hyper-parameters,
///   aliased outputs, malformed or meaningless state blobs) throw std::invalid_argument whose
///   message starts with the fully qualified function name and names the argument and the
///   values involved.
/// - Numerical events (NaN/Inf in activations or gradients, a result that would overflow,
///   an all-zero input where a direction was needed) are returned as a `status`, which is
///   `[[nodiscard]]`: a caller cannot drop it without saying so.
/// Either way the library's state is left exactly as it was (a `status` other than ok or
/// degenerate_input means nothing was written), and `ok` is never returned with a non-finite
/// result.
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
enum class [[nodiscard]] status {
    ok = 0,
    non_finite_input = 1,   ///< NaN or Inf in an input; nothing was changed
    degenerate_input = 2,   ///< e.g. an all-zero mean where a direction was needed; a documented fallback was used
    overflow = 3,           ///< finite inputs whose result would not be finite (too large for the type); nothing was changed
};

constexpr std::string_view to_string(status s) noexcept {
    switch (s) {
    case status::ok: return "ok";
    case status::non_finite_input: return "non_finite_input";
    case status::degenerate_input: return "degenerate_input";
    case status::overflow: return "overflow";
    }
    return "unknown";
}

/// Thrown, carrying the status, by the few convenience calls that have no status to return
/// (e.g. the `compress(x)` overload that returns a new record) where the status-returning call
/// would report a numerical event. As with the status, nothing was changed.
class numerical_error : public std::runtime_error {
public:
    numerical_error(status outcome, const std::string& what) : std::runtime_error(what), outcome_(outcome) {}
    [[nodiscard]] status outcome() const noexcept { return outcome_; }

private:
    status outcome_;
};

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
