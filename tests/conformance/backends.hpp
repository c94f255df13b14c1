#pragma once
// The CPU backends this translation unit has: every conformance suite runs against each of them
// (the suites are compiled for AVX-512, AVX2 and baseline x86-64 builds, see tests/CMakeLists.txt).

#include <cq/cq.hpp>

#include <tuple>

namespace cq::test {

// (backend::Native is always one of these.) A build of the suite for a SIMD instruction set
// only (CQ_CONFORMANCE_SIMD_ONLY: the AVX2 variant) leaves out Scalar, whose source is the same in
// every build and which the main suite already runs.
#if CQ_CONFORMANCE_SIMD_ONLY && CQ_HAVE_AVX2
using conformance_backends = std::tuple<backend::Avx2
#else
using conformance_backends = std::tuple<backend::Scalar
#if CQ_HAVE_AVX2
                                        , backend::Avx2
#endif
#endif
#if CQ_HAVE_AVX512
                                        , backend::Avx512
#endif
                                        >;

}  // namespace cq::test
