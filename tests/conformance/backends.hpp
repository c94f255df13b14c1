#pragma once
// The CPU backends this translation unit has: every conformance suite runs against each of them
// (the suites are compiled for AVX-512, AVX2 and baseline x86-64 builds, see tests/CMakeLists.txt).

#include <cq/cq.hpp>

#include <tuple>

namespace cq::test {

// (backend::Native is always one of these.)
using conformance_backends = std::tuple<backend::Scalar
#if CQ_HAVE_AVX2
                                        , backend::Avx2
#endif
#if CQ_HAVE_AVX512
                                        , backend::Avx512
#endif
                                        >;

}  // namespace cq::test
