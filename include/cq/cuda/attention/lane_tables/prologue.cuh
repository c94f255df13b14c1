#pragma once
/// The lane-tables kernel's prologue: the full-precision tokens (sinks and window: scores and
/// weighted values, against their own maximum), the head's score tables (q . centroid for every
/// group and code, staged code-major, then copied into the lanes' columns) and, in value-rows mode,
/// the value centroids as scaled half pairs in the lanes' histogram columns.
///
/// The full-precision rows come from DRAM while the rest of the GPU streams codes (latency of
/// microseconds), so their loads go out together: thread (part, d) takes value channel d of tokens
/// part, part + parts, ... (issued at block start, kept in registers until the scores are known);
/// a warp takes four tokens' keys, a lane 4 consecutive channels of each (D is a multiple of 16
/// here; 16-byte loads when the rows are aligned). The coded tokens keep their own reference; the
/// two parts meet in float in the epilogue, so a dominant sink cannot push the coded weights below
/// the fixed point's resolution.

#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/lane_tables/layout.cuh"
#include "cq/cuda/channels.cuh"
#include "cq/cuda/warp.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>

namespace cq::cuda::detail {

/// Row of Cv floats; Vec: 16-byte (Cv % 4 == 0) or 8-byte (Cv == 2) aligned rows, vector loads.
template <int Cv, bool Vec>
__device__ inline void load_row(float (&v)[Cv], const float* __restrict__ src) {
  if constexpr (Vec && Cv % 4 == 0) {
#pragma unroll
    for (int c = 0; c < Cv; c += 4) {
      const float4 x = __ldg(reinterpret_cast<const float4*>(src + c));
      v[c] = x.x, v[c + 1] = x.y, v[c + 2] = x.z, v[c + 3] = x.w;
    }
  } else if constexpr (Vec && Cv == 2) {
    const float2 x = __ldg(reinterpret_cast<const float2*>(src));
    v[0] = x.x, v[1] = x.y;
  } else {
#pragma unroll
    for (int c = 0; c < Cv; ++c) v[c] = __ldg(src + c);
  }
}

/// Calls f.template operator()<C, Vec>() for centroid rows of C floats (1, 2, 4, 8 or 16: the plan
/// admits no other) at `cent`; Vec when every row starts 16-byte (C = 2: 8-byte) aligned, for
/// vector loads.
template <class F>
__device__ inline void with_centroid_rows(int C, const float* cent, F&& f) {
  auto go = [&]<int Cc>() {
    if constexpr (Cc == 1)
      f.template operator()<1, false>();
    else if ((reinterpret_cast<std::uintptr_t>(cent) & (Cc == 2 ? 7u : 15u)) == 0)
      f.template operator()<Cc, true>();
    else
      f.template operator()<Cc, false>();
  };
  if (!with_channels<1, 2, 4, 8>(C, go)) go.template operator()<16>();
}

/// Reads full-precision key rows for score_full_keys: rows j0, j0 + warps, j0 + 2 warps and
/// j0 + 3 warps, this lane's 4-channel pieces of each (D <= 256: at most two per lane), as
/// 16-byte loads when the rows are aligned (`vec`); zeros past the rows or with stage_full off
/// (`scores`).
template <class Cfg, class Rows>
struct FullKeyRows {
  const Rows& rows;
  const int &D, &lane, &nfull;
  const bool &vec, &scores;

  __device__ __forceinline__ void operator()(float4 (&kr)[4][2], int j0) const {
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = j0 + k * Cfg::warps, d = 4 * (lane + 32 * h);
        kr[k][h] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (scores && j < nfull && d < D) kr[k][h] = rows.at4(rows.key(j), d, vec);
      }
  }
};

/// Scores of the full-precision tokens into full_score, four per warp at a time (their key rows
/// from load_keys(kr, j0)); the warp's maximum goes to red[2 warps + warp].
template <class Cfg, class LoadKeys>
__device__ __forceinline__ void score_full_keys(const LoadKeys& load_keys, const float* q_shared, float* full_score,
                                                float* red, float scale, float cap, int nfull, int warp,
                                                int lane, int D) {
  float dmax = -FLT_MAX;
  for (int j0 = warp; j0 < nfull; j0 += 4 * Cfg::warps) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float4 kr[4][2];
    load_keys(kr, j0);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int d = 4 * (lane + 32 * h);
      if (d >= D) continue;
      const float q0 = q_shared[d], q1 = q_shared[d + 1], q2 = q_shared[d + 2], q3 = q_shared[d + 3];
#pragma unroll
      for (int k = 0; k < 4; ++k)
        s[k] = fmaf(q0, kr[k][h].x, fmaf(q1, kr[k][h].y, fmaf(q2, kr[k][h].z, fmaf(q3, kr[k][h].w, s[k]))));
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = j0 + k * Cfg::warps;
      float sk = scale * warp_sum(s[k]);
      if (cap > 0.0f) sk = SoftCap(cap)(sk);
      if (j < nfull) {
        if (lane == 0) full_score[j] = sk;
        dmax = fmaxf(dmax, sk);
      }
    }
  }
  if (lane == 0) red[2 * Cfg::warps + warp] = dmax;
}

/// The full-precision tokens' maximum (from the warps' maxima in red[2 warps ..]), returned, and
/// their values weighted relative to it: thread (vpart, d) sums channel d of rows vpart,
/// vpart + parts, ... (the first `Chunk` of them loaded at block start, in `first`; the rest from
/// `rows`, channel `vd`) into product[tid].
template <class Cfg, int Chunk, class Rows>
__device__ __forceinline__ float weigh_full_values(const float* first, const Rows& rows, int vd,
                                                   const float* full_score, const float* red, float* product,
                                                   const int& vpart, const int& parts, int nfull, int tid) {
  float full_max = -FLT_MAX;
  for (int w = 0; w < Cfg::warps; ++w) full_max = fmaxf(full_max, red[2 * Cfg::warps + w]);
  if (vpart < parts) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < Chunk; ++k) {
      const int j = vpart + k * parts;
      if (j < nfull) acc = fmaf(softmax_exp(full_score[j] - full_max), first[k], acc);
    }
    for (int j0 = vpart + Chunk * parts; j0 < nfull; j0 += Chunk * parts) {  // longer windows
      float vv[Chunk];
#pragma unroll
      for (int k = 0; k < Chunk; ++k)
        vv[k] = j0 + k * parts < nfull ? rows.at(rows.value(j0 + k * parts), vd) : 0.0f;
#pragma unroll
      for (int k = 0; k < Chunk; ++k)
        if (j0 + k * parts < nfull) acc = fmaf(softmax_exp(full_score[j0 + k * parts] - full_max), vv[k], acc);
    }
    product[tid] = acc;
  }
  return full_max;
}

/// This head's score tables, code-major: stage[code * (G + 1) + g] = scale * q_g . centroid(g,
/// code) (the row padded by one word: the stores of consecutive codes hit different banks).
/// Thread t takes code t % 256 of groups t / 256, t / 256 + Threads / 256, ...: whole centroid
/// rows, coalesced, loads issued in batches before their products (one L2 round trip per 64
/// floats); q comes from shared memory (its loads would otherwise be hoisted with the rows').
template <int G, int C, int Threads, bool Vec>
__device__ inline void compute_score_table(float* stage, const float* q, const float* __restrict__ cent,
                                           float scale, int tid) {
  constexpr int step = Threads / 256, per_thread = G / step;
  constexpr int batch = per_thread * C <= 64 ? per_thread : (64 / C > 0 ? 64 / C : 1);  // rows per round trip
  const int code = tid % 256, g0 = tid / 256;
#pragma unroll
  for (int k0 = 0; k0 < per_thread; k0 += batch) {
    float row[batch][C];
#pragma unroll
    for (int k = 0; k < batch; ++k)
      load_row<C, Vec>(row[k], cent + (std::size_t(g0 + step * (k0 + k)) * 256 + code) * C);
#pragma unroll
    for (int k = 0; k < batch; ++k) {
      const int g = g0 + step * (k0 + k);
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < C; ++c) dot = fmaf(q[g * C + c], row[k][c], dot);
      stage[code * (G + 1) + g] = scale * dot;
    }
  }
}

/// This head's score tables (key centroids at `cent`, rows of D / GK floats) staged code-major in
/// `stage`, for fill_columns.
template <class Cfg>
__device__ __forceinline__ void stage_score_tables(const float* cent, float* const& stage, float* const& q,
                                                   const float& scale, int D, const int& tid) {
  with_centroid_rows(D / Cfg::KeyLanes::groups, cent, [&]<int C, bool Vec>() {
    compute_score_table<Cfg::KeyLanes::groups, C, Cfg::threads, Vec>(stage, q, cent, scale, tid);
  });
}

/// Copies staged per-(code, group) words (stage[code * (groups + 1) + g]) into the lanes' columns
/// from `column0` on (0: score tables, 32: value rows): thread (row r, lane l) copies rows r,
/// r + Threads / 32, ... of lane l's groups (conflict-free on both sides).
template <class Lanes, int Threads, int Column0>
__device__ inline void fill_columns(float* tab, const float* stage, int tid) {
  constexpr int rows = Threads / 32, passes = 256 / rows, stride = Lanes::groups + 1;
  const int lane = tid % 32, row = tid / 32;
  const unsigned* s = reinterpret_cast<const unsigned*>(stage) + row * stride + lane / Lanes::subsets;
  unsigned* t = reinterpret_cast<unsigned*>(tab) + table_word(0, row, Column0 + lane);
#pragma unroll
  for (int k = 0; k < Lanes::slots * passes; ++k)
    t[table_word(k / passes, rows * (k % passes), 0)] = s[rows * (k % passes) * stride + Lanes::span * (k / passes)];
}

/// Value-rows mode stores a 2-channel centroid in one word, a half pair, scaled per group by a
/// power of two that puts the group's largest magnitude in [0.5, 1): any float codebook fits half
/// range and precision, and the value lanes' short half-precision sums stay below 4 (they are
/// multiplied back by 2^e at the end). Half rounding alone is not precise enough: its error is
/// the same for every token of a code, so in near-uniform attention over many tokens -- whose
/// output is close to the codebook mean -- the mean rounding error of the codes shows. The block
/// adds it back: per (group, channel), mean = (1/256) sum over codes of (centroid -
/// half(centroid)), times the weight sum. What is left is the deviation of each code's error from
/// that mean, weighted by how far the attention is from uniform over the codes.
///
/// One pass over the codebook: warp w takes groups w, w + warps, ..., lane l codes l, l + 32, ...
/// (coalesced 8-byte rows, all loads issued first: one L2 round trip). It writes
/// stage[code * (G + 1) + g] (the scaled half pair; consecutive codes hit consecutive banks),
/// mean[2 g + c] and unscale[g] = 2^e.
template <int G, int Threads, bool Vec>
__device__ inline void stage_value_rows(float* stage, float* mean, float* unscale, const float* __restrict__ cent,
                                        int tid) {
  constexpr int warps = Threads / 32, per_warp = G / warps;
  static_assert(G % warps == 0, "stage_value_rows: groups per warp");
  const int warp = tid / 32, lane = tid % 32;
  float row[per_warp][8][2];
#pragma unroll
  for (int j = 0; j < per_warp; ++j)
#pragma unroll
    for (int k = 0; k < 8; ++k)
      load_row<2, Vec>(row[j][k], cent + (std::size_t(warp + warps * j) * 256 + lane + 32 * k) * 2);
  unsigned* st = reinterpret_cast<unsigned*>(stage);
#pragma unroll
  for (int j = 0; j < per_warp; ++j) {
    const int g = warp + warps * j;
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fmaxf(fabsf(row[j][k][0]), fabsf(row[j][k][1])));
    amax = warp_max(amax);
    // 2^e > amax >= 2^(e-1); the scale 2^-e and its inverse are exact (e clamped to float range).
    const int e = amax > 0.0f ? min(max(((__float_as_int(amax) >> 23) & 255) - 126, -125), 126) : 0;
    const float down = __int_as_float((127 - e) << 23), up = __int_as_float((127 + e) << 23);
    float e0 = 0.0f, e1 = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const __half2 h = __floats2half2_rn(row[j][k][0] * down, row[j][k][1] * down);
      st[(lane + 32 * k) * (G + 1) + g] = *reinterpret_cast<const unsigned*>(&h);
      e0 += row[j][k][0] - __low2float(h) * up;
      e1 += row[j][k][1] - __high2float(h) * up;
    }
    e0 = warp_sum(e0);
    e1 = warp_sum(e1);
    if (lane == 0) mean[g * 2] = e0 * (1.0f / 256), mean[g * 2 + 1] = e1 * (1.0f / 256), unscale[g] = up;
  }
}

/// Value-rows mode: the value centroids (at `cent`), as scaled half pairs, into the lanes' columns
/// 32-63 (staged like the score tables, through the same buffer).
template <class Cfg>
__device__ __forceinline__ void value_rows_to_columns(const float* cent, float* tab, float* stage, float* vmean,
                                                      float* vunscale, int tid) {
  using VL = typename Cfg::ValueLanes;
  if ((reinterpret_cast<std::uintptr_t>(cent) & 7u) == 0) {
    stage_value_rows<VL::groups, Cfg::threads, true>(stage, vmean, vunscale, cent, tid);
  } else {
    stage_value_rows<VL::groups, Cfg::threads, false>(stage, vmean, vunscale, cent, tid);
  }
  __syncthreads();
  fill_columns<VL, Cfg::threads, 32>(tab, stage, tid);
  __syncthreads();
}

}  // namespace cq::cuda::detail
