#pragma once
/// The nearest-centroid search every CUDA kernel of cq shares (the encoder and the batched
/// k-means assignment): argmin over k of the direct squared distance sum_c (x_c - c_kc)^2, the
/// lowest index winning ties, as on the CPU. Not |c_k|^2 - 2 x.c_k: that ranking cancels
/// catastrophically in float once |x| is large next to the distances (see backend/simd.hpp).

#include <cfloat>
#include <cstddef>

namespace cq::cuda::detail {

/// Index of the centroid nearest to x among K centroids laid out [k][C].
template <int C>
__device__ inline unsigned nearest_centroid(const float (&x)[C], const float* cents, unsigned K) {
  float best = FLT_MAX;
  unsigned code = 0;
  for (unsigned k = 0; k < K; ++k) {
    float d = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const float t = x[c] - cents[k * C + c];
      d = fmaf(t, t, d);
    }
    if (d < best) {
      best = d;
      code = k;
    }
  }
  return code;
}

/// Group g's K centroids of C channels (of a codebook's table `centroids`, [group][K][C]) for a
/// block's searches: staged in the block's shared memory `smem` when Shared (every thread of the
/// block must call this), else read where they are.
template <int C, bool Shared>
__device__ inline const float* block_group_centroids(const float* centroids, unsigned g, unsigned K, float* smem) {
  const float* cents = centroids + std::size_t(g) * K * C;
  if constexpr (Shared) {
    for (unsigned i = threadIdx.x; i < K * C; i += blockDim.x) smem[i] = cents[i];
    __syncthreads();
    return smem;
  }
  return cents;
}

}  // namespace cq::cuda::detail
