#pragma once
/// The nearest-centroid search every CUDA kernel of cq shares (the encoder and the batched
/// k-means assignment): argmin over k of the direct squared distance sum_c (x_c - c_kc)^2, the
/// lowest index winning ties, as on the CPU. Not |c_k|^2 - 2 x.c_k: that ranking cancels
/// catastrophically in float once |x| is large next to the distances (see backend/simd.hpp).

#include <cfloat>
#include <cstddef>

namespace cq::cuda::detail {

/// Index of the centroid nearest to x among centroids first, first + stride, ... < K, laid out
/// [k][C] (K when there are none), and its distance in `best`.
template <int C>
__device__ inline unsigned nearest_centroid_of(const float (&x)[C], const float* cents, unsigned K, unsigned first,
                                               unsigned stride, float& best) {
  best = FLT_MAX;
  unsigned code = K;
  for (unsigned k = first; k < K; k += stride) {
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

/// nearest_centroid with the search shared by Lanes consecutive lanes of a warp (a power of two up
/// to 32, all of them calling with the same x): lane i of the group scans centroids i, i + Lanes,
/// ..., then the groups' minima meet by shuffles, the lower index winning ties, so every lane
/// returns what nearest_centroid returns. Every lane of the warp must call it. For searches too
/// few to fill the device (a decode step's rows), where one thread's serial scan of 256
/// centroids is the whole latency.
template <int C, int Lanes>
__device__ inline unsigned nearest_centroid_lanes(const float (&x)[C], const float* cents, unsigned K) {
  static_assert(Lanes >= 1 && Lanes <= 32 && (Lanes & (Lanes - 1)) == 0, "Lanes: a power of two up to 32");
  float best;
  unsigned code = nearest_centroid_of<C>(x, cents, K, threadIdx.x % Lanes, Lanes, best);
#pragma unroll
  for (int o = Lanes / 2; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const unsigned oc = __shfl_xor_sync(0xffffffffu, code, o);
    if (ob < best || (ob == best && oc < code)) best = ob, code = oc;
  }
  return code == K ? 0 : code;
}

/// Index of the centroid nearest to x among K centroids laid out [k][C] (0 if none is nearer
/// than FLT_MAX, e.g. x has a NaN).
template <int C>
__device__ inline unsigned nearest_centroid(const float (&x)[C], const float* cents, unsigned K) {
  float best;
  const unsigned code = nearest_centroid_of<C>(x, cents, K, 0, 1, best);
  return code == K ? 0 : code;
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
