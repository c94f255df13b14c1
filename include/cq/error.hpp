#pragma once
/// cq::Error: the one exception type cq throws for bad input, with helpers that build messages
/// naming the argument and its value.

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace cq {

/// Thrown for every bad input at the API boundary (shapes, values, files, a full cache).
/// The message names the function or argument and the offending value. Subclasses add context
/// (e.g. cq::cuda::CudaError for CUDA calls).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error("cq: " + what) {}
};

namespace detail {

template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(concat(args...));
}

}  // namespace detail
}  // namespace cq

/// Throws cq::Error with the concatenated message unless `cond` holds. For API-boundary checks
/// only (once per call, never per element).
#define CQ_CHECK(cond, ...)                 \
  do {                                      \
    if (!(cond)) ::cq::detail::fail(__VA_ARGS__); \
  } while (0)
