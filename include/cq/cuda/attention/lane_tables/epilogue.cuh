#pragma once
/// The lane-tables kernel's epilogue: the lanes' weight sums, the merge of the coded part (its own
/// running reference) with the full-precision part (the prologue's), the codes' share of the
/// output -- histograms x value centroids, or in value-rows mode the warps' register sums -- and
/// the write-out: with one split the output itself, otherwise (reference, weight sum, partial
/// output) for combine_kernel (combine.cuh).

#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/lane_tables/layout.cuh"
#include "cq/cuda/attention/lane_tables/mainloop.cuh"
#include "cq/cuda/attention/lane_tables/prologue.cuh"
#include "cq/cuda/warp.cuh"

#include <cuda_runtime.h>

#include <cfloat>
#include <cstddef>

namespace cq::cuda::detail {

/// out[g * Cv + c] = inv_unit * sum over codes of histogram(g, code) x centroid(g, code)[c], the
/// value groups' share of the attention output. Threads / G consecutive threads share a group,
/// each taking every (Threads / G)-th code (whole centroid rows: coalesced, vector loads when
/// aligned), then sum over shuffles; loads go out in batches.
template <class VL, int Cv, int Threads, bool Vec>
__device__ inline void hist_product(const float* tab, const float* __restrict__ cent, float inv_unit, float* out,
                                   int tid) {
  constexpr int per_group = Threads / VL::groups, codes = 256 / per_group;
  // Codes per batch of loads: a power of two dividing `codes`, with batch x (Cv + 1) <= 80
  // registers (the scan's registers are free by now): one L2 round trip at 8c8b and 4c8b.
  constexpr int batch = [] {
    int b = 1;
    while (2 * b <= codes && 2 * b * (Cv + 1) <= 80) b *= 2;
    return b;
  }();
  static_assert(per_group >= 1 && 32 % per_group == 0 && codes % batch == 0, "hist_product: shape");
  const int g = tid / per_group, sub = tid % per_group;
  const unsigned* hist = reinterpret_cast<const unsigned*>(tab) + table_word(VL::slot_of(g), sub, 32);
  const float* c0 = cent + (std::size_t(g) * 256 + sub) * Cv;
  float acc[Cv];
#pragma unroll
  for (int c = 0; c < Cv; ++c) acc[c] = 0.0f;
#pragma unroll
  for (int k0 = 0; k0 < codes; k0 += batch) {
    float cv[batch][Cv], hv[batch];
#pragma unroll
    for (int k = 0; k < batch; ++k) load_row<Cv, Vec>(cv[k], c0 + (k0 + k) * per_group * Cv);
#pragma unroll
    for (int k = 0; k < batch; ++k) {
      hv[k] = 0.0f;
#pragma unroll
      for (int s = 0; s < VL::subsets; ++s)
        hv[k] += float(hist[table_word(0, (k0 + k) * per_group, VL::lane_of(g, s))]);
    }
#pragma unroll
    for (int k = 0; k < batch; ++k)
#pragma unroll
      for (int c = 0; c < Cv; ++c) acc[c] = fmaf(hv[k], cv[k][c], acc[c]);
  }
#pragma unroll
  for (int o = per_group / 2; o > 0; o /= 2)
#pragma unroll
    for (int c = 0; c < Cv; ++c) acc[c] += __shfl_xor_sync(0xFFFFFFFFu, acc[c], o);
  if (sub == 0)
#pragma unroll
    for (int c = 0; c < Cv; ++c) out[g * Cv + c] = acc[c] * inv_unit;
}

/// The lanes' weight sums per warp into red[3 warps + warp] (value-rows mode: and each warp's
/// reference into red[warp], its lanes' sums into the now idle stage, [warp][slot][lane][2]).
template <class Cfg, bool Rows>
__device__ __forceinline__ void publish_lane_sums(const LaneTablesBlock& k, const LaneTablesShared& sh, float ref,
                                                  LaneWeight<Rows> wsum,
                                                  const float (&acc)[Cfg::ValueLanes::slots][2]) {
  const float lane_weights = warp_sum(float(wsum));
  if (k.lane == 0) {
    sh.red[3 * Cfg::warps + k.warp] = lane_weights;
    if (Rows) sh.red[k.warp] = ref;
  }
  if constexpr (Rows) {
#pragma unroll
    for (int i = 0; i < Cfg::ValueLanes::slots; ++i)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        sh.stage[((k.warp * Cfg::ValueLanes::slots + i) * 32 + k.lane) * 2 + c] = acc[i][c];  // 4-byte aligned
  }
}

/// Value-rows mode: the factor taking warp w's sums (relative to its own reference, red[w]) to the
/// coded tokens' reference; 1 in histogram mode (one reference per block).
template <bool Rows>
__device__ __forceinline__ float warp_factor(const float* red, int w, float coded_ref) {
  return !Rows ? 1.0f : red[w] > -FLT_MAX ? softmax_exp(red[w] - coded_ref) : 0.0f;
}

/// The block's two parts, each relative to its own reference, merged at the larger one, m.
struct PartsMerge {
  float coded_ref, m, coded_factor, full_factor, coded_weights, total;
};

/// The merge of the block's two parts by the online-softmax rule (cq/attention/softmax_state.hpp):
/// the coded tokens' reference (value-rows mode: the warps' largest) and weight sum, the
/// full-precision tokens' (full_max and their weights), the common reference m and each part's
/// factor, and the total weight.
template <class Cfg, bool Rows>
__device__ __forceinline__ PartsMerge merge_parts(const LaneTablesLayout& L, const LaneTablesBlock& k,
                                                  const LaneTablesShared& sh, float ref, float full_max) {
  PartsMerge mp;
  mp.coded_ref = ref;
  if constexpr (Rows) {
    mp.coded_ref = -FLT_MAX;
    for (int w = 0; w < Cfg::warps; ++w) mp.coded_ref = fmaxf(mp.coded_ref, sh.red[w]);
  }
  mp.coded_weights = 0.0f;
  for (int w = 0; w < Cfg::warps; ++w)
    mp.coded_weights += sh.red[3 * Cfg::warps + w] * warp_factor<Rows>(sh.red, w, mp.coded_ref);
  mp.coded_weights *= 1.0f / L.unit;
  float full_weights = 0.0f;
  for (int j = 0; j < k.nfull; ++j) full_weights += softmax_exp(sh.full_score[j] - full_max);
  mp.m = softmax_common_reference(softmax_common_reference(-FLT_MAX, mp.coded_ref, mp.coded_weights), full_max,
                                  full_weights);
  mp.coded_factor = softmax_merge_factor(mp.coded_ref, mp.coded_weights, mp.m);
  mp.full_factor = softmax_merge_factor(full_max, full_weights, mp.m);
  mp.total = mp.coded_weights * mp.coded_factor + full_weights * mp.full_factor;
  return mp;
}

/// Histogram mode: the codes' share of the output, histograms x value centroids (at `cent`), into
/// code_part (hist_product).
template <class Cfg>
__device__ __forceinline__ void hist_share(const float* cent, float* const& tab, float* const& code_part,
                                           const float& unit, const int& D, const int& tid) {
  using VL = typename Cfg::ValueLanes;
  const float inv = 1.0f / unit;
  with_centroid_rows(D / VL::groups, cent, [&]<int Cv, bool Vec>() {
    hist_product<VL, Cv, Cfg::threads, Vec>(tab, cent, inv, code_part, tid);
  });
}

/// out = (codes' part + full-precision part) / total weight with one split; otherwise the split's
/// (reference, weight sum, partial output) at `partial`, [bh][split][2 + D].
template <class Cfg>
__device__ __forceinline__ void write_out(const AttentionBatch& p, const LaneTablesBlock& k, const LaneTablesShared& sh,
                                          const PartsMerge& mp, int parts, bool codes_part, float* partial) {
  for (int d = k.tid; d < k.D; d += Cfg::threads) {
    float full_part = 0.0f;  // the prologue's weighted full-precision values
    for (int part = 0; part < parts; ++part) full_part += sh.product[part * k.D + d];
    const float o = (codes_part ? sh.code_part[d] * mp.coded_factor : 0.0f) + full_part * mp.full_factor;
    if (gridDim.y == 1) {  // one split: the block's result is the output (no combine_kernel)
      p.write_output(std::size_t(k.bh), d, o, mp.m, mp.total);
      continue;
    }
    float* dst = partial + (std::size_t(k.bh) * gridDim.y + k.split) * (2 + k.D);
    if (d == 0) {
      dst[0] = mp.total > 0.0f ? mp.m : -FLT_MAX;
      dst[1] = mp.total;
    }
    dst[2 + d] = o;
  }
}

}  // namespace cq::cuda::detail
