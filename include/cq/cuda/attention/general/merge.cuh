#pragma once
/// The general kernel's merge: per (sequence, query head), the splits' weights moved to the largest
/// reference (combine.cuh), the weighted sum of their u32 histograms, then out = (sum of the
/// full-precision parts + histogram x value centroids) / total weight. The product runs once per
/// head here, not once per split block.

#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/combine.cuh"
#include "cq/cuda/attention/params.cuh"

#include <cuda_runtime.h>

#include <cstddef>

namespace cq::cuda::detail {

/// Merges the general kernel's splits of every (sequence, query head) and writes the output.
/// HistShared: the summed histogram in shared memory, else in this head's slice of `hist_global`.
template <bool HistShared>
__global__ void general_merge_kernel(AttentionBatch p, int splits, int value_groups, int value_centroids, float unit,
                                     const float* __restrict__ partial, const unsigned* __restrict__ partial_hist,
                                     float* __restrict__ hist_global) {
  extern __shared__ float sm[];
  const int bh = blockIdx.x, D = p.head_dim, hq = bh % p.q_heads;
  float* hist;  // [value groups][value centroids]
  if constexpr (HistShared)
    hist = sm;
  else
    hist = hist_global + std::size_t(bh) * value_groups * value_centroids;
  const DeviceCodebookView vcb = p.value_codebooks[hq / (p.q_heads / p.kv_heads)];
  const int Cv = int(vcb.channels);
  const float* src = partial + std::size_t(bh) * splits * (2 + D);
  const float m = largest_split_reference(src, splits, D);
  const int hsize = value_groups * value_centroids;
  for (int i = threadIdx.x; i < hsize; i += blockDim.x) {
    float h = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float* ps = src + s * (2 + D);
      const SoftmaxState part{ps[0], ps[1]};
      if (part.empty()) continue;
      h = fmaf(softmax_merge_factor(part.ref, part.sum, m), float(partial_hist[(std::size_t(bh) * splits + s) * hsize + i]),
               h);
    }
    hist[i] = h * (1.0f / unit);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.0f, den = 0.0f;
    merge_splits(src, splits, D, d, m, num, den);
    const int g = d / Cv, c = d % Cv;
    const float* hrow = hist + g * value_centroids;
    const float* tcol = vcb.transposed + (std::size_t(g) * Cv + c) * vcb.padded_centroids;
    for (int j = 0; j < value_centroids; ++j) num = fmaf(hrow[j], tcol[j], num);
    p.write_output(std::size_t(bh), d, num, m, den);
  }
}

}  // namespace cq::cuda::detail
