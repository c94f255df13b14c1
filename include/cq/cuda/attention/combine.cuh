#pragma once
/// The split combine (flash-decoding): a (sequence, query head) whose tokens were cut into splits
/// gets one partial state per split, laid out [split][2 + D] as (reference, weight sum, D partial
/// outputs), each relative to its own reference; the combine moves them to the largest reference of
/// the splits that have weight and divides the summed outputs by the summed weights -- the merge
/// rule of cq/attention/softmax_state.hpp, which every merge on the GPU uses. Both kernels'
/// splits end here: the lane-tables kernel through combine_kernel, the general kernel through its
/// merge kernel (general/merge.cuh), which also sums the splits' histograms.

#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/dependent_launch.cuh"
#include "cq/cuda/attention/params.cuh"

#include <cuda_runtime.h>

#include <cfloat>
#include <cstddef>

namespace cq::cuda::detail {

// The two helpers below spell out softmax_common_reference and softmax_merge_factor as a branch
// taken before a split's reference is read: the calls, whose arguments load every split's
// reference up front, compiled this loop into slower code (the split combine is on the critical
// path of short decodes). Same rule: empty splits (weight sum not > 0) are skipped.

/// The reference the splits (at `src`, [split][2 + D]) merge at: the largest of those with weight.
__device__ inline float largest_split_reference(const float* src, int splits, int D) {
  float m = -FLT_MAX;
  for (int s = 0; s < splits; ++s)
    if (src[s * (2 + D) + 1] > 0.0f) m = fmaxf(m, src[s * (2 + D)]);
  return m;
}
/// Adds every split's output channel d and weight sum, moved to reference m, to num and den.
__device__ inline void merge_splits(const float* src, int splits, int D, int d, float m, float& num, float& den) {
  for (int s = 0; s < splits; ++s) {
    const float* ps = src + s * (2 + D);
    if (!(ps[1] > 0.0f)) continue;  // empty: contributes nothing; its outputs are not read
    const float f = softmax_exp(ps[0] - m);
    num = fmaf(f, ps[2 + d], num);
    den = fmaf(f, ps[1], den);
  }
}

/// Merges the splits of every (sequence, query head): out = sum_s e^(m_s - m) o_s / sum_s e^(m_s - m) l_s.
template <class = void>  // a template only so that headers can define it (cuda.cuh)
__global__ void combine_kernel(AttentionBatch p, int splits, const float* __restrict__ partial) {
  wait_for_prerequisite();  // the main kernel's partial states (a dependent launch)
  const int bh = blockIdx.x, D = p.head_dim;
  const float* src = partial + std::size_t(bh) * splits * (2 + D);
  const float m = largest_split_reference(src, splits, D);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.0f, den = 0.0f;
    merge_splits(src, splits, D, d, m, num, den);
    p.write_output(std::size_t(bh), d, num, m, den);
  }
}

}  // namespace cq::cuda::detail
