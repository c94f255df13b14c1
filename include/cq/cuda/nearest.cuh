#pragma once
/// The nearest-centroid search every CUDA kernel of cq shares (the encoder and the batched
/// k-means assignment): argmin over k of |c_k|^2 - 2 x.c_k, the lowest index winning ties, as on
/// the CPU.

#include <cfloat>

namespace cq::cuda::detail {

/// Index of the centroid nearest to x among K centroids laid out [k][C] with norms [k].
template <int C>
__device__ inline unsigned nearest_centroid(const float (&x)[C], const float* cents, const float* norms, unsigned K) {
  float best = FLT_MAX;
  unsigned code = 0;
  for (unsigned k = 0; k < K; ++k) {
    float d = norms[k];
#pragma unroll
    for (int c = 0; c < C; ++c) d = fmaf(-2.0f * x[c], cents[k * C + c], d);
    if (d < best) {
      best = d;
      code = k;
    }
  }
  return code;
}

}  // namespace cq::cuda::detail
