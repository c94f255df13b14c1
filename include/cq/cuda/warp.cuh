#pragma once
/// Warp-wide reductions (butterfly shuffles: every lane ends with the result).

#include <cuda_runtime.h>

namespace cq::cuda::detail {

__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

}  // namespace cq::cuda::detail
