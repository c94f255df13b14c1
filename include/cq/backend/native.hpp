#pragma once
/// backend::Native — the widest CPU backend this translation unit is compiled for: Avx512, else
/// Avx2, else the scalar reference. The default backend of every cq class template.

#include "cq/backend/scalar.hpp"
#include "cq/backend/simd.hpp"

namespace cq::backend {

#if CQ_HAVE_AVX512
using Native = Avx512;
#elif CQ_HAVE_AVX2
using Native = Avx2;
#else
using Native = Scalar;
#endif

}  // namespace cq::backend
