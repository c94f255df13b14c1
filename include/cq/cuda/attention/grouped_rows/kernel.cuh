#pragma once
/// The grouped-rows kernel: fused decode attention for a whole GQA group at once, 8-bit codes
/// with 2, 4 or 8 channels per group at head_dim 128 (CQ-2c8b, 4c8b, 8c8b), query groups of up
/// to 16 heads.
///
/// Why: the lane-tables kernel does its lookups once per *query* head, so its cost grows with the
/// group while the bytes fp16 attention reads grow with the KV heads only. Here each coded token's
/// key and value rows are decoded once per KV head, from half-precision centroids in shared memory
/// (both codebooks: 2 x 256 x 128 halves = 128 KiB), and the group's heads are served by tensor
/// cores (mma.sync m16n8k16, fp32 accumulate): S^T = Q K^T with the heads as M (padded to 16) and
/// eight tokens as N, then O += P V with the tokens as K -- the score fragment is the next
/// product's A operand (FlashAttention-2's register reuse). The cost per token is the decode (512
/// bytes of centroids from shared memory), independent of the group size.
///
/// The reduction dimension of Q K^T may be permuted (the same way in Q and K): a thread's
/// fragments then hold whole centroids -- channels 32 t .. 32 t + 31 of its token for thread t of
/// a quad -- so one 4-, 8- or 16-byte load serves one code. Likewise the value product's output
/// columns: tile j's column n is channel 16 n + j, so a thread decodes channels 16 n .. 16 n + 15.
///
/// Half precision's range: each codebook group is scaled by a power of two into [2^7, 2^8) before
/// conversion (values of any magnitude keep 11 significant bits); key scales are folded into the
/// query, value scales divide the output channels at the end.
///
/// A launch: half_codebooks_kernel converts every KV head's codebooks once into the workspace;
/// then the grid is (splits, sequences x KV heads): a block copies its KV head's 128 KiB into
/// shared memory, and 8 warps take 16-token tiles in turn, each staging its next tile's codes by
/// cp.async while it computes the current one, each with its own online softmax; the warps'
/// states merge in shared memory, then the full-precision tokens (split 0) join, by the rule of
/// cq/attention/softmax_state.hpp. One split writes the output; several write partial states for
/// combine_kernel (combine.cuh). Half-precision operands are a little less accurate than the
/// lane-tables kernel's float tables; both are tested to 1e-3 of the oracle (tests/cuda).

#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/params.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace cq::cuda::detail {

/// Shape and plan of a grouped_rows_kernel launch.
struct GroupedRowsLayout {
  int split_tokens = 0;
  int full_cap = 0;  // most full-precision tokens of a sequence
};

struct GroupedRowsConfig {
  static constexpr int head_dim = 128, warps = 8, threads = warps * 32, max_group = 16, tile = 16;
  static constexpr int codebook_bytes = 256 * head_dim * 2;  // one codebook in half precision
  static constexpr int merge_floats = warps * (max_group * head_dim + 2 * max_group);
  /// A warp's staged codes of one tile: 16 bytes per key and value group (at most 64 each).
  static constexpr int stage_bytes = 2 * 64 * tile;
  /// Dynamic shared memory for `full_cap` full-precision tokens: the two codebooks and the warps'
  /// two code stages (the warps' states and the full tokens' scores reuse them after the main
  /// loop), then the group scales.
  static constexpr std::size_t shared_bytes(int full_cap) {
    const std::size_t merge = std::size_t(merge_floats + max_group * full_cap + 2 * max_group) * 4;
    const std::size_t loop = 2u * codebook_bytes + std::size_t(warps) * 2 * stage_bytes;
    return (merge > loop ? merge : loop) + 2 * 64 * 4;
  }
};

__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}

/// The power of two that brings |x| <= m into [2^7, 2^8) (1 for m = 0).
__device__ __forceinline__ float range_scale(float m) {
  if (!(m > 0.0f)) return 1.0f;
  int e;
  frexpf(m, &e);  // m = f 2^e, f in [0.5, 1)
  return ldexpf(1.0f, 8 - e);
}

/// The half-precision codebooks of one KV head in the workspace: keys, values (256 x head_dim
/// halves each, the float codebooks' layout), then the key and value groups' scales (64 floats
/// each). half_codebooks_kernel writes them once per launch; every block copies its KV head's.
struct HalfCodebooks {
  static constexpr int halves = 256 * GroupedRowsConfig::head_dim;
  static constexpr std::size_t bytes = 2 * halves * 2 + 2 * 64 * 4;
};

/// Grid (groups, 2, KV heads): block (g, which, h) converts group g of KV head h's key (which =
/// 0) or value codebook to half precision, scaled by range_scale of its largest magnitude.
__global__ void __launch_bounds__(256) half_codebooks_kernel(AttentionBatch p, int key_channels, int value_channels,
                                                             unsigned char* __restrict__ out) {
  const int g = blockIdx.x, which = blockIdx.y, h = blockIdx.z, C = which ? value_channels : key_channels;
  if (g >= GroupedRowsConfig::head_dim / C) return;
  const float* src = (which ? p.value_codebooks : p.key_codebooks)[h].centroids + std::size_t(g) * 256 * C;
  unsigned char* base = out + std::size_t(h) * HalfCodebooks::bytes;
  __half* dst = reinterpret_cast<__half*>(base) + which * HalfCodebooks::halves + g * 256 * C;
  float* scales = reinterpret_cast<float*>(base + 4 * HalfCodebooks::halves) + 64 * which;
  __shared__ float red[8];
  const int n = 256 * C;
  float m = 0.0f;
  for (int i = threadIdx.x; i < n; i += 256) m = fmaxf(m, fabsf(src[i]));
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  m = red[0];
  for (int w = 1; w < 8; ++w) m = fmaxf(m, red[w]);
  const float s = range_scale(m);
  if (threadIdx.x == 0) scales[g] = s;
  for (int i = threadIdx.x; i < n; i += 256) dst[i] = __float2half_rn(src[i] * s);
}

/// Stages the codes of the 16-token tile at coded index `t` (a multiple of 16) in a warp's buffer
/// `dst`: key group g's 16 codes at 16 g, value group g's at 16 (GK + g). Asynchronous
/// (cp.async, 16-byte pieces, or 4-byte ones for code buffers off 16-byte alignment); the
/// caller commits and waits.
template <int GK, int GV>
__device__ __forceinline__ void stage_tile_codes(const DeviceKVCodes& codes, int t, bool wide, unsigned dst, int lane) {
  const std::uint8_t* kb = codes.key_codes + std::size_t(t / 32) * GK * 32 + t % 32;  // group g at + 32 g
  const std::uint8_t* vb = codes.value_codes + std::size_t(t / 32) * GV * 32 + t % 32;
  if (wide) {
    for (int g = lane; g < GK + GV; g += 32) {
      const std::uint8_t* src = g < GK ? kb + 32 * g : vb + 32 * (g - GK);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + 16 * g), "l"(src) : "memory");
    }
  } else {
    for (int u = lane; u < 4 * (GK + GV); u += 32) {
      const int g = u / 4, k = u % 4;
      const std::uint8_t* src = (g < GK ? kb + 32 * g : vb + 32 * (g - GK)) + 4 * k;
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst + 16 * g + 4 * k), "l"(src) : "memory");
    }
  }
}

/// Copies the 32-bit words (two halves each) of `Count` consecutive groups' centroids (C channels
/// each) for one token into w, starting at group g0; `staged` holds the tile's codes of these
/// groups (16 per group, stage_tile_codes), `t` is the token's index in the tile.
template <int C, int Count>
__device__ __forceinline__ void decode_row(const __half* cb, const std::uint8_t* staged, int t, int g0, unsigned* w) {
#pragma unroll
  for (int i = 0; i < Count; ++i) {
    const int g = g0 + i;
    const unsigned code = staged[g * 16 + t];
    const __half* c = cb + (g * 256 + int(code)) * C;
    if constexpr (C == 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(c);
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    } else if constexpr (C == 4) {
      const uint2 v = *reinterpret_cast<const uint2*>(c);
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    } else {
      w[i] = *reinterpret_cast<const unsigned*>(c);
    }
  }
}

template <int CK, int CV>
__global__ void __launch_bounds__(GroupedRowsConfig::threads, 1)
    grouped_rows_kernel(AttentionBatch p, GroupedRowsLayout L, const unsigned char* __restrict__ codebooks,
                        float* __restrict__ partial) {
  using Cfg = GroupedRowsConfig;
  constexpr int D = Cfg::head_dim, GK = D / CK, GV = D / CV, warps = Cfg::warps, MG = Cfg::max_group;
  extern __shared__ __align__(16) unsigned char grouped_rows_smem[];
  __half* kc = reinterpret_cast<__half*>(grouped_rows_smem);
  __half* vc = kc + 256 * D;
  const std::size_t small_at = Cfg::shared_bytes(L.full_cap) - 2 * 64 * 4;
  float* kscale = reinterpret_cast<float*>(grouped_rows_smem + small_at);  // [GK]
  float* vscale = kscale + 64;                                             // [GV]

  const int group = p.q_heads / p.kv_heads;
  const int split = blockIdx.x, b = blockIdx.y / p.kv_heads, kvh = blockIdx.y % p.kv_heads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gq = lane / 4, tq = lane % 4;
  const DeviceSequence seq = p.sequences[b];
  const DeviceKVCodes codes = p.codes[b * p.kv_heads + kvh];
  const int c0 = split * L.split_tokens;
  const int n = max(0, min(int(seq.coded), c0 + L.split_tokens) - c0);
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));
  const float* q = p.q + (std::size_t(b) * p.q_heads + std::size_t(kvh) * group) * D;  // the group's queries

  {  // This KV head's half-precision codebooks and scales (half_codebooks_kernel) into shared memory.
    const uint4* src = reinterpret_cast<const uint4*>(codebooks + std::size_t(kvh) * HalfCodebooks::bytes);
    uint4* dst = reinterpret_cast<uint4*>(kc);
    constexpr int words = 4 * HalfCodebooks::halves / 16;
#pragma unroll 8
    for (int i = tid; i < words; i += Cfg::threads) dst[i] = __ldg(src + i);
    if (tid < 128) kscale[tid] = reinterpret_cast<const float*>(src + words)[tid];  // kscale, then vscale
  }
  __syncthreads();

  // The queries as A fragments: rows = heads gq and gq + 8, k-step s's slots 2 tq + {0, 1} and
  // 2 tq + 8 + {0, 1} = channels 32 tq + 4 s + {0, 1} and + {2, 3}; each channel divided by its key
  // group's scale, then all scaled by qs into half's range.
  float qmax = 0.0f;
  for (int i = lane; i < group * D; i += 32) qmax = fmaxf(qmax, fabsf(q[i] / kscale[(i % D) / CK]));
  for (int o = 16; o > 0; o >>= 1) qmax = fmaxf(qmax, __shfl_xor_sync(0xffffffffu, qmax, o));
  const float qs = range_scale(qmax);
  unsigned qa[8][4];
#pragma unroll
  for (int s = 0; s < 8; ++s)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int h = gq + 8 * r, ch = 32 * tq + 4 * s;
      float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (h < group)
#pragma unroll
        for (int k = 0; k < 4; ++k) x[k] = q[h * D + ch + k] / kscale[(ch + k) / CK] * qs;
      qa[s][r] = pack_half2(x[0], x[1]);
      qa[s][2 + r] = pack_half2(x[2], x[3]);
    }
  const float score_mul = scale / qs;

  // Main loop: warp w takes tiles w, w + warps, ... of 16 tokens.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  const int tiles = (n + Cfg::tile - 1) / Cfg::tile;
  // Each warp stages its next tile's codes (cp.async) while it computes the current one.
  std::uint8_t* stages = grouped_rows_smem + 2 * Cfg::codebook_bytes + warp * 2 * Cfg::stage_bytes;
  const unsigned stages_at = unsigned(__cvta_generic_to_shared(stages));
  const bool wide = ((reinterpret_cast<std::uintptr_t>(codes.key_codes) | reinterpret_cast<std::uintptr_t>(codes.value_codes)) & 15u) == 0;
  if (warp < tiles) stage_tile_codes<GK, GV>(codes, c0 + warp * Cfg::tile, wide, stages_at, lane);
  asm volatile("cp.async.commit_group;" ::: "memory");
  for (int tile = warp, i = 0; tile < tiles; tile += warps, ++i) {
    const int t0 = tile * Cfg::tile;
    if (tile + warps < tiles)
      stage_tile_codes<GK, GV>(codes, c0 + t0 + warps * Cfg::tile, wide, stages_at + ((i + 1) & 1) * Cfg::stage_bytes, lane);
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 1;" ::: "memory");
    __syncwarp();
    const std::uint8_t* staged = stages + (i & 1) * Cfg::stage_bytes;
    {  // The codes four rounds ahead head for L2 (one 128-byte line per lane).
      const int ahead = t0 + 4 * warps * Cfg::tile;
      if (ahead < n && (ahead & 31) == 0) {
        const std::size_t blk = std::size_t(c0 + ahead) / 32;
        const std::uint8_t* line = lane < GK / 4 ? codes.key_codes + blk * GK * 32 + lane * 128
                                                 : codes.value_codes + blk * GV * 32 + (lane - GK / 4) * 128;
        if (lane < GK / 4 + GV / 4) asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
      }
    }
    // Scores: n-tile nt holds tokens t0 + 8 nt + (0..7); this thread loads token 8 nt + gq of the
    // tile (past the end: a staged byte all the same, its score masked below). Two accumulators
    // (even and odd k-steps) halve the chain of dependent products.
    float sc[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      unsigned w[16];
      decode_row<CK, 32 / CK>(kc, staged, 8 * nt + gq, 32 * tq / CK, w);
      float odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
      for (int s2 = 0; s2 < 8; s2 += 2) {
        mma_16816(sc[nt], qa[s2], w[2 * s2], w[2 * s2 + 1]);
        mma_16816(odd, qa[s2 + 1], w[2 * s2 + 2], w[2 * s2 + 3]);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) sc[nt][k] += odd[k];
    }
    // Online softmax, rows gq (c0, c1) and gq + 8 (c2, c3); columns 8 nt + 2 tq + {0, 1}.
    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const bool valid = t0 + 8 * nt + 2 * tq + (k & 1) < n;
        sc[nt][k] = valid ? sc[nt][k] * score_mul : -INFINITY;
        tmax[k / 2] = fmaxf(tmax[k / 2], sc[nt][k]);
      }
    float f[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
      const float nm = fmaxf(m[r], tmax[r]);  // > -inf: the tile's first token is valid
      f[r] = softmax_exp(m[r] - nm);
      m[r] = nm;
      l[r] *= f[r];
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) o[j][0] *= f[0], o[j][1] *= f[0], o[j][2] *= f[1], o[j][3] *= f[1];
    float pw[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        pw[nt][k] = softmax_exp(sc[nt][k] - m[k / 2]);
        l[k / 2] += pw[nt][k];
      }
    const unsigned pa[4] = {pack_half2(pw[0][0], pw[0][1]), pack_half2(pw[0][2], pw[0][3]),
                            pack_half2(pw[1][0], pw[1][1]), pack_half2(pw[1][2], pw[1][3])};
    // Values: tokens 2 tq + {0, 1} and 8 + 2 tq + {0, 1}, channels 16 gq .. 16 gq + 15.
    unsigned vw[4][8];
#pragma unroll
    for (int r = 0; r < 4; ++r)
      decode_row<CV, 16 / CV>(vc, staged + 16 * GK, 2 * tq + (r & 1) + 8 * (r >> 1), 16 * gq / CV, vw[r]);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const unsigned sel = (j & 1) ? 0x7632u : 0x5410u;  // high or low halves of the two tokens' words
      mma_16816(o[j], pa, __byte_perm(vw[0][j / 2], vw[1][j / 2], sel), __byte_perm(vw[2][j / 2], vw[3][j / 2], sel));
    }
    __syncwarp();  // every lane is done with this stage before the next tile's copy lands in it
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  __syncthreads();  // the codebooks are done with; their room takes the warps' states

  // The warps' states: wo[warp][head][channel] (channel 16 column + j of tile j), then (m, l).
  float* wo = reinterpret_cast<float*>(grouped_rows_smem);
  float* wml = wo + warps * MG * D;  // [warp][head][2]
  float* fsc = wml + warps * MG * 2;  // [head][full_cap]: the full-precision tokens' weights
  float* fml = fsc + MG * L.full_cap;  // [head][2]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int h = gq + 8 * r;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      wo[(warp * MG + h) * D + 16 * (2 * tq) + j] = o[j][2 * r];
      wo[(warp * MG + h) * D + 16 * (2 * tq + 1) + j] = o[j][2 * r + 1];
    }
    if (tq == 0) wml[(warp * MG + h) * 2] = m[r], wml[(warp * MG + h) * 2 + 1] = l[r];
  }
  // Full-precision tokens (split 0): warp w scores heads w and w + 8 in float.
  const int nfull = split == 0 ? int(seq.full) : 0;
  for (int h = warp; h < group; h += warps) {
    float fm = -INFINITY;
    for (int j = lane; j < nfull; j += 32) {
      const float* k = seq.full_keys + (std::size_t(kvh) * seq.full + j) * D;
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s = fmaf(q[h * D + d], k[d], s);
      s *= scale;
      fsc[h * L.full_cap + j] = s;
      fm = fmaxf(fm, s);
    }
    for (int off = 16; off > 0; off >>= 1) fm = fmaxf(fm, __shfl_xor_sync(0xffffffffu, fm, off));
    float fl = 0.0f;
    for (int j = lane; j < nfull; j += 32) {
      const float w = softmax_exp(fsc[h * L.full_cap + j] - fm);
      fsc[h * L.full_cap + j] = w;
      fl += w;
    }
    for (int off = 16; off > 0; off >>= 1) fl += __shfl_xor_sync(0xffffffffu, fl, off);
    if (lane == 0) fml[2 * h] = fm, fml[2 * h + 1] = fl;
  }
  __syncthreads();

  // Merge: the warps' coded parts and the full part, per (head, channel).
  for (int i = tid; i < group * D; i += Cfg::threads) {
    const int h = i / D, d = i % D;
    float ref = -FLT_MAX;
    for (int w = 0; w < warps; ++w) ref = softmax_common_reference(ref, wml[(w * MG + h) * 2], wml[(w * MG + h) * 2 + 1]);
    const float fref = nfull > 0 ? fml[2 * h] : -FLT_MAX, fsum = nfull > 0 ? fml[2 * h + 1] : 0.0f;
    ref = softmax_common_reference(ref, fref, fsum);
    float num = 0.0f, den = 0.0f;
    for (int w = 0; w < warps; ++w) {
      const float f = softmax_merge_factor(wml[(w * MG + h) * 2], wml[(w * MG + h) * 2 + 1], ref);
      num = fmaf(f, wo[(w * MG + h) * D + d], num);
      den = fmaf(f, wml[(w * MG + h) * 2 + 1], den);
    }
    num /= vscale[d / CV];  // the value groups' half-precision scale
    if (nfull > 0 && fsum > 0.0f) {
      const float f = softmax_merge_factor(fref, fsum, ref);
      float acc = 0.0f;
      for (int j = 0; j < nfull; ++j)
        acc = fmaf(fsc[h * L.full_cap + j], seq.full_values[(std::size_t(kvh) * seq.full + j) * D + d], acc);
      num = fmaf(f, acc, num);
      den = fmaf(f, fsum, den);
    }
    const int bh = b * p.q_heads + kvh * group + h;
    if (gridDim.x == 1) {
      p.out[std::size_t(bh) * D + d] = den > 0.0f ? num / den : 0.0f;
    } else {
      float* dst = partial + (std::size_t(bh) * gridDim.x + split) * (2 + D);
      if (d == 0) dst[0] = ref, dst[1] = den;
      dst[2 + d] = num;
    }
  }
}

}  // namespace cq::cuda::detail
