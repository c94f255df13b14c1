#pragma once
/// Batched calibration on the GPU: every (job, group) codebook of a model — jobs being
/// (layer, K|V, KV head) — fitted in one launch over its calibration activations.
///
/// One thread block per (job, group) runs that group's whole k-means without leaving the kernel:
/// k-means++ initialisation (D^2 sampling: block-wide sums and a scan over per-thread segments),
/// then Lloyd iterations (centroids and the new sums in shared memory; assignment by direct
/// squared distances, nearest.cuh, which also give the objective; weighted means; an empty
/// cluster re-seeded on the point with the largest weighted error, as the CPU fit does). The
/// objective of every iteration is written out. Data: x [jobs][n][dim] floats, optional weights [jobs][n][groups]
/// (Fisher), all device memory.
///
/// Differences from the CPU fit (cq::fit_codebook): its own random stream, float (not double)
/// sums (of offsets to the current centroid), all iterations run (no early stop at a fixed point),
/// at most one empty cluster re-seeded per iteration, no subsampling (every row is used). Results
/// agree in MSE, not bit for bit.

#include "cq/codebook.hpp"
#include "cq/cuda/channels.cuh"
#include "cq/cuda/error.cuh"
#include "cq/cuda/memory.cuh"
#include "cq/cuda/nearest.cuh"
#include "cq/cuda/warp.cuh"
#include "cq/detail/checked.hpp"
#include "cq/detail/rng.hpp"

#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <vector>

namespace cq::cuda {

struct BatchedFitOptions {
  int iterations = 25;
  std::uint64_t seed = 1234;
};

namespace detail {

constexpr int km_threads = 512;

__device__ inline double km_uniform(std::uint64_t seed, std::uint64_t pair, std::uint64_t k) {
  using cq::detail::splitmix64;
  return double(splitmix64(seed ^ splitmix64(pair * 0x100000001b3ULL + k)) >> 11) * 0x1.0p-53;
}

/// Block-wide sum of one float per thread (all threads get the result).
__device__ inline float km_block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = 0.0f;
  for (int w = 0; w < km_threads / 32; ++w) t += scratch[w];
  return t;
}

template <int C>
__global__ void __launch_bounds__(km_threads) kmeans_kernel(const float* __restrict__ x, const float* __restrict__ weights,
                                                            int n, int dim, int bits, int iterations, std::uint64_t seed,
                                                            float* __restrict__ d2_all, float* __restrict__ out,
                                                            double* __restrict__ objective) {
  extern __shared__ float sm[];
  const int K = 1 << bits, G = dim / C;
  const int pair = blockIdx.x, job = pair / G, g = pair % G;
  const int tid = threadIdx.x;
  float* cen = sm;                 // [K][C]
  float* sums = cen + K * C;       // [K][C]
  float* wsum = sums + K * C;      // [K]
  float* scratch = wsum + K;       // [32 + 4]
  __shared__ int chosen;
  __shared__ unsigned long long far_key;
  __shared__ double obj_acc;

  const float* X = x + std::size_t(job) * n * dim + g * C;  // point i at X + i * dim
  auto w_of = [&](int i) { return weights ? weights[(std::size_t(job) * n + i) * G + g] : 1.0f; };
  float* d2 = d2_all + std::size_t(pair) * n;
  const int seg = (n + km_threads - 1) / km_threads;
  const int lo = min(n, tid * seg), hi = min(n, lo + seg);

  // ---- k-means++ ----
  for (int i = lo; i < hi; ++i) d2[i] = FLT_MAX;
  for (int k = 0; k < K; ++k) {
    // Mass of each point: weight (first pick) or weight x squared distance to the nearest centroid.
    float local = 0.0f;
    for (int i = lo; i < hi; ++i) {
      if (k > 0) {
        const float* c = cen + (k - 1) * C;
        float d = 0.0f;
#pragma unroll
        for (int j = 0; j < C; ++j) {
          const float t = X[std::size_t(i) * dim + j] - c[j];
          d = fmaf(t, t, d);
        }
        d2[i] = fminf(d2[i], d);
      }
      local += k == 0 ? w_of(i) : w_of(i) * d2[i];
    }
    // Exclusive scan of the per-thread masses (a simple two-level scan through shared memory).
    __syncthreads();
    float v = local;
    const int lane = tid % 32, warp = tid / 32;
    for (int o = 1; o < 32; o *= 2) {
      const float t = __shfl_up_sync(0xFFFFFFFFu, v, o);
      if (lane >= o) v += t;
    }
    if (lane == 31) scratch[warp] = v;
    __syncthreads();
    float before_warp = 0.0f, total = 0.0f;
    for (int w = 0; w < km_threads / 32; ++w) {
      if (w < warp) before_warp += scratch[w];
      total += scratch[w];
    }
    const float start = before_warp + v - local;  // exclusive prefix of this thread
    if (tid == 0) chosen = INT_MAX;
    __syncthreads();
    const double u = km_uniform(seed, std::uint64_t(pair), std::uint64_t(k));
    const float r = float(u * double(total));
    if (total > 0.0f && local > 0.0f && r >= start && (r < start + local || tid == km_threads - 1 || start + local >= total)) {
      float acc = start;
      int pick = -1;
      for (int i = lo; i < hi; ++i) {
        const float m = k == 0 ? w_of(i) : w_of(i) * d2[i];
        if (m <= 0.0f) continue;
        pick = i;
        acc += m;
        if (acc > r) break;
      }
      if (pick >= 0) atomicMin(&chosen, pick);  // rounding can let two threads claim r: lowest index wins
    }
    __syncthreads();
    if (tid == 0 && chosen == INT_MAX) chosen = int(u * n) % n;  // no mass left (duplicates): any point
    __syncthreads();
    for (int j = tid; j < C; j += km_threads) cen[k * C + j] = X[std::size_t(chosen) * dim + j];
    __syncthreads();
  }

  // ---- Lloyd iterations ----
  for (int it = 0;; ++it) {
    for (int e = tid; e < K * C; e += km_threads) sums[e] = 0.0f;
    for (int k = tid; k < K; k += km_threads) wsum[k] = 0.0f;
    if (tid == 0) {
      far_key = 0ull;
      obj_acc = 0.0;
    }
    __syncthreads();
    float local_obj = 0.0f, local_w = 0.0f;
    for (int i = tid; i < n; i += km_threads) {
      float xv[C];
#pragma unroll
      for (int j = 0; j < C; ++j) xv[j] = X[std::size_t(i) * dim + j];
      const int bk = int(nearest_centroid<C>(xv, cen, unsigned(K)));
      float exact = 0.0f;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const float t = xv[j] - cen[bk * C + j];
        exact = fmaf(t, t, exact);
      }
      const float w = w_of(i);
      local_obj += w * exact;
      local_w += w;
      if (w > 0.0f) {
#pragma unroll
        for (int j = 0; j < C; ++j) atomicAdd(&sums[bk * C + j], w * (xv[j] - cen[bk * C + j]));
        atomicAdd(&wsum[bk], w);
      }
      // Largest weighted error (ties to the lowest index): key = error bits << 32 | ~index.
      const unsigned long long key = (static_cast<unsigned long long>(__float_as_uint(w * exact)) << 32) |
                                     static_cast<unsigned long long>(0xFFFFFFFFu - unsigned(i));
      atomicMax(&far_key, key);
    }
    const float total_obj = km_block_sum(local_obj, scratch);
    const float total_w = km_block_sum(local_w, scratch);
    if (tid == 0 && objective) objective[std::size_t(pair) * (iterations + 1) + it] = double(total_obj) / (double(total_w) * C);
    __syncthreads();
    if (it == iterations) break;
    // Update: weighted means, from sums of offsets to the current centroid (float sums of the
    // points themselves would lose the digits that matter once the data sit far from the origin);
    // the first empty cluster takes the farthest point.
    if (tid == 0) chosen = -1;
    __syncthreads();
    for (int k = tid; k < K; k += km_threads)
      if (wsum[k] <= 0.0f) atomicMin(reinterpret_cast<unsigned*>(&chosen), unsigned(k));  // -1 = 0xFFFFFFFF
    __syncthreads();
    for (int e = tid; e < K * C; e += km_threads) {
      const int k = e / C;
      if (wsum[k] > 0.0f) cen[e] += sums[e] / wsum[k];
    }
    if (chosen >= 0 && tid < C) {
      const int far = int(0xFFFFFFFFu - unsigned(far_key & 0xFFFFFFFFull));
      cen[chosen * C + tid] = X[std::size_t(far) * dim + tid];
    }
    __syncthreads();
  }
  for (int e = tid; e < K * C; e += km_threads) out[std::size_t(pair) * K * C + e] = cen[e];
}

}  // namespace detail

/// Fits every (job, group) codebook of x [jobs][n][dim] (device) with k-means; writes centroids
/// [jobs][groups][2^bits][channels] and, if `objective` is given, [jobs][groups][iterations + 1]
/// objectives (weighted MSE per element after t updates). All pointers are device memory.
inline void fit_codebooks_batched(const float* x, const float* weights, int jobs, int n, int dim, int channels,
                                  int bits, const BatchedFitOptions& opt, float* centroids, double* objective,
                                  cudaStream_t stream = nullptr) {
  CQ_CHECK(jobs >= 1, "cuda fit: jobs must be >= 1, got ", jobs);
  CQ_CHECK(dim >= 1 && channels >= 1 && dim % channels == 0, "cuda fit: dim ", dim, " is not a multiple of channels ",
           channels);
  check_code_bits(bits, "cuda fit");
  CQ_CHECK(bits <= 12, "cuda fit: bits must be at most 12 (the centroids live in shared memory), got ", bits);
  CQ_CHECK(n >= (1 << bits), "cuda fit: ", n, " calibration rows are fewer than the ", 1 << bits, " centroids");
  // Row loops step by the block size in int: n + km_threads must not overflow.
  cq::detail::checked_limit(std::size_t(n), std::size_t(INT_MAX - detail::km_threads), "cuda fit: calibration rows");
  CQ_CHECK(opt.iterations >= 1 && opt.iterations < INT_MAX, "cuda fit: iterations must be in 1..", INT_MAX - 1,
           ", got ", opt.iterations);
  const int G = dim / channels, K = 1 << bits;
  // One block per (job, group), indexed by an int.
  const std::size_t pairs =
      cq::detail::checked_limit(cq::detail::checked_mul(std::size_t(jobs), std::size_t(G), "cuda fit: jobs x groups"),
                                INT_MAX, "cuda fit: jobs x groups");
  const std::size_t smem = (2 * std::size_t(K) * channels + K + 40) * sizeof(float);
  const std::size_t d2_floats = cq::detail::checked_mul(pairs, std::size_t(n), "cuda fit: jobs x groups x rows");
  cq::detail::checked_mul(d2_floats, sizeof(float), "cuda fit: distance scratch bytes");
  DeviceBuffer<float> d2(d2_floats);
  int device = 0, smem_max = 0;
  CQ_CUDA_CHECK(cudaGetDevice(&device));
  CQ_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  CQ_CHECK(smem <= std::size_t(smem_max), "cuda fit: ", channels, "c", bits, "b needs ", smem,
           " bytes of shared memory per block, the device allows ", smem_max);
  auto launch = [&](auto kernel) {
    CQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<unsigned(pairs), detail::km_threads, smem, stream>>>(x, weights, n, dim, bits, opt.iterations, opt.seed,
                                                                  d2.data(), centroids, objective);
    CQ_CUDA_CHECK_LAUNCH(kmeans_kernel);
  };
  if (!detail::with_channels<1, 2, 4, 8, 16>(channels, [&]<int C>() { launch(detail::kmeans_kernel<C>); }))
    cq::detail::fail("cuda fit: C = ", channels, " is not supported (1, 2, 4, 8 or 16)");
  CQ_CUDA_CHECK(cudaStreamSynchronize(stream));  // d2 is freed on return
}

}  // namespace cq::cuda
