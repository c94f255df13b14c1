#pragma once
/// cq library version (semantic versioning). Written into every codebook file.

#define CQ_VERSION_MAJOR 0
#define CQ_VERSION_MINOR 1
#define CQ_VERSION_PATCH 0
#define CQ_VERSION_STRING "0.1.0"

namespace cq {
inline constexpr const char* version_string = CQ_VERSION_STRING;
}  // namespace cq
