#pragma once
/// The general kernel's score tables, computed once per (sequence, query head) before the main
/// kernel: LUT[g][j] = scale * q_g . centroid_K[g][j], read from the transposed codebook
/// (coalesced), into global memory; every split block of that head copies them.

#include "cq/cuda/attention/params.cuh"

#include <cuda_runtime.h>

#include <cstddef>

namespace cq::cuda::detail {

/// Score tables of every (sequence, query head): lut[b][hq][g][j] = scale * q_g . centroid_K[g][j].
template <class = void>  // a template only so that headers can define it (cuda.cuh)
__global__ void score_table_kernel(AttentionBatch p, int key_groups, int key_centroids, float* __restrict__ lut) {
  const int bh = blockIdx.y, hq = bh % p.q_heads;
  const int kvh = hq / (p.q_heads / p.kv_heads), D = p.head_dim;
  const DeviceCodebookView kcb = p.key_codebooks[kvh];
  const int C = int(kcb.channels);
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));
  const std::size_t q0 = std::size_t(bh) * D;
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < key_groups * key_centroids; e += gridDim.x * blockDim.x) {
    const int g = e / key_centroids, j = e % key_centroids;
    const float* tcol = kcb.transposed + std::size_t(g) * C * kcb.padded_centroids + j;
    float s = 0.0f;
    for (int c = 0; c < C; ++c) s = fmaf(p.query(q0 + g * C + c), tcol[std::size_t(c) * kcb.padded_centroids], s);
    lut[std::size_t(bh) * key_groups * key_centroids + e] = scale * s;
  }
}

}  // namespace cq::cuda::detail
