#pragma once
/// The grouped-rows kernel: fused decode attention for a whole GQA group at once, 8-bit codes
/// with 2, 4 or 8 channels per group at head_dim 128 (CQ-2c8b, 4c8b, 8c8b), query groups of up
/// to 16 heads. Template flag Capped: the logits soft-capped (AttentionBatch::logits_soft_cap),
/// instantiated apart so that a batch without a cap runs a main loop without one (softmax_state.hpp).
///
/// Why: the lane-tables kernel does its lookups once per *query* head, so its cost grows with the
/// group while the bytes fp16 attention reads grow with the KV heads only. Here each coded token's
/// key and value rows are decoded once per KV head, from half-precision centroids in shared memory
/// (both codebooks: 2 x 256 x 128 halves = 128 KiB, at 8c8b the keys' twice: dual_key_slot), and
/// the group's heads are served by tensor cores (mma.sync m16n8k16, fp32 accumulate) with the
/// tokens as M and the heads as N (8 per column tile, so a group of 4-8 heads pads to 8, not 16):
/// S = K Q^T, then O^T += V^T P^T with the tokens as K -- P's two 8 x 8 blocks become the B
/// operand by one movmatrix transpose each.
/// Per 16-token tile that is 16 products for a group of up to 8 heads. The cost per token is the
/// decode (512 bytes of centroids from shared memory), independent of the group size.
///
/// The reduction dimension of K Q^T may be permuted (the same way in K and Q): a thread's
/// fragments then hold whole centroids -- channels 32 t .. 32 t + 31 of its two tokens for thread
/// t of a quad -- so one 4-, 8- or 16-byte load serves one code. Likewise the rows of O^T: row
/// tile j's rows g and g + 8 are channels 16 g + 2 j and + 1, so a thread decodes channels
/// 16 g .. 16 g + 15 of its four value tokens. And the tile's tokens (staged_token): a thread's
/// two key tokens and its four value tokens each share one 32-bit word of a group's staged codes,
/// so a code costs a quarter or half of a shared load, not a byte load.
///
/// Keys coded before RoPE (the Rope instantiation, AttentionBatch::rope): each decoded key is
/// rotated to its position in float before its products -- per 16-token tile, the warp computes
/// (a tile ahead) the anchor of every pair (one sincos each, exact in fixed-point turns:
/// attention/rope.cuh) and each thread composes it with the step table's rotation of its two
/// rows' offsets; the permuted reduction dimension then gives a thread both channels of each of its
/// pairs (key_channel), and with rotate_half the two groups of a pair share one half-precision
/// scale.
///
/// Half precision's range: each codebook group is scaled by a power of two into [2^7, 2^8) before
/// conversion (values of any magnitude keep 11 significant bits); key scales are folded into the
/// query, value scales divide the output channels at the end.
///
/// A launch: half_codebooks_kernel converts every KV head's codebooks once into the workspace;
/// then the grid is (splits, sequences x KV heads): a block copies its KV head's codebooks into
/// shared memory, and 16 warps (8 for groups of 9-16 heads, whose two column tiles need twice the
/// registers, and for keys rotated in the kernel at 2 channels) take 16-token tiles in turn, each
/// staging its next tile's codes by cp.async (through the page table when the codes are paged)
/// while it computes the current one, each with its own online softmax; the warps' states merge in
/// shared memory, then the full-precision tokens (split 0) join, by the rule of
/// cq/attention/softmax_state.hpp. One split writes the output; several write partial states for
/// combine_kernel (combine.cuh). Half-precision operands are a little less accurate than the
/// lane-tables kernel's float tables; both are tested to 1e-3 of the oracle (tests/cuda).

#include "cq/attention/softmax_state.hpp"
#include "cq/cuda/attention/params.cuh"
#include "cq/cuda/warp.cuh"

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
  static constexpr int head_dim = 128, max_group = 16, tile = 16;
  static constexpr int codebook_bytes = 256 * head_dim * 2;  // one codebook in half precision
  /// A warp's staged codes of one tile at `channels` per group: 16 bytes per key and value group.
  static constexpr int stage_bytes(int channels) { return 2 * (head_dim / channels) * tile; }
  /// Whether the key codebook is held twice in shared memory, placed so that the key fragment's
  /// centroid loads never meet on a bank (dual_key_slot): at 8 channels with keys not rotated in
  /// the kernel (with the RoPE tables it would not fit).
  static constexpr bool dual_keys(int channels, int rope_channels) { return channels == 8 && rope_channels == 0; }
  static constexpr int key_codebook_bytes(int channels, int rope_channels) {
    return codebook_bytes * (dual_keys(channels, rope_channels) ? 2 : 1);
  }
  /// Column tiles (8 heads each) for a group of `heads` query heads.
  static constexpr int head_tiles(int heads) { return heads <= 8 ? 1 : 2; }
  /// Warps of a block: 16 for one column tile of heads (128 registers a thread), 8 for two. With
  /// keys rotated in the kernel (rope_channels: the key channels per group; 0 when not rotated)
  /// the rotation spills at 128 registers, yet measured faster with 16 warps than with 8 of 255
  /// registers at 4 and 8 channels; at 2 channels 8 warps.
  static constexpr int warps(int tiles, int rope_channels = 0) { return tiles == 1 && rope_channels != 2 ? 16 : 8; }
  /// Bytes of the RoPE step table and the warps' two tile anchors (pre-RoPE keys): after the scales.
  static constexpr std::size_t rope_bytes(int tiles, int rope_channels) {
    return std::size_t(DeviceRope::steps + 2 * warps(tiles, rope_channels)) * DeviceRope::max_pairs * 2 * 4;
  }
  /// Dynamic shared memory for `full_cap` full-precision tokens at `channels` per group: the two
  /// codebooks (the keys' perhaps twice) and the warps' two code stages (the warps' states and the
  /// full tokens' scores reuse them after the main loop), then the group scales, then (pre-RoPE
  /// keys) rope_bytes.
  static constexpr std::size_t shared_bytes(int full_cap, int tiles, int channels, int rope_channels = 0) {
    const int w = warps(tiles, rope_channels), heads = 8 * tiles;
    const std::size_t merge = std::size_t(w * (heads * head_dim + 2 * heads) + heads * full_cap + 2 * heads) * 4;
    const std::size_t loop = std::size_t(key_codebook_bytes(channels, rope_channels)) + codebook_bytes +
                             std::size_t(w) * 2 * stage_bytes(channels);
    return (merge > loop ? merge : loop) + 2 * 64 * 4 + (rope_channels ? rope_bytes(tiles, rope_channels) : 0);
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
/// 0) or value codebook to half precision, scaled by range_scale of its largest magnitude -- with
/// rotate_half keys coded before RoPE (key_partners), of the larger of its own and its partner
/// group's (channels + head_dim / 2), so the two channels of a rotation pair share one scale.
template <class = void>  // a template only so that headers can define it (cuda.cuh)
__global__ void __launch_bounds__(256) half_codebooks_kernel(AttentionBatch p, int key_channels, int value_channels,
                                                             unsigned char* __restrict__ out, bool key_partners = false) {
  const int g = blockIdx.x, which = blockIdx.y, h = blockIdx.z, C = which ? value_channels : key_channels;
  float* scales = reinterpret_cast<float*>(out + std::size_t(h) * HalfCodebooks::bytes + 4 * HalfCodebooks::halves) +
                  64 * which;
  if (g >= GroupedRowsConfig::head_dim / C) {  // no such group: its scale slot (read by the kernel) is 1
    if (threadIdx.x == 0) scales[g] = 1.0f;
    return;
  }
  const float* src = (which ? p.value_codebooks : p.key_codebooks)[h].centroids + std::size_t(g) * 256 * C;
  unsigned char* base = out + std::size_t(h) * HalfCodebooks::bytes;
  __half* dst = reinterpret_cast<__half*>(base) + which * HalfCodebooks::halves + g * 256 * C;
  __shared__ float red[8];
  const int n = 256 * C;
  float m = 0.0f;
  for (int i = threadIdx.x; i < n; i += 256) m = fmaxf(m, fabsf(src[i]));
  if (which == 0 && key_partners) {
    const int half_groups = GroupedRowsConfig::head_dim / C / 2;
    const float* partner = src + (g < half_groups ? 1 : -1) * std::ptrdiff_t(half_groups) * 256 * C;
    for (int i = threadIdx.x; i < n; i += 256) m = fmaxf(m, fabsf(partner[i]));
  }
  m = warp_max(m);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  m = red[0];
  for (int w = 1; w < 8; ++w) m = fmaxf(m, red[w]);
  const float s = range_scale(m);
  if (threadIdx.x == 0) scales[g] = s;
  for (int i = threadIdx.x; i < n; i += 256) dst[i] = __float2half_rn(src[i] * s);
}

/// Stages the codes of the 16-token tile at coded index `t` (a multiple of 16; a tile never
/// crosses a 32-token block, so never a page; `page` is its page, CodeRun::page_of) in a warp's
/// buffer `dst`: key group g's 16 codes at 16 g, value group g's at 16 (GK + g). Asynchronous
/// (cp.async, 16-byte pieces, or 4-byte ones for code buffers off 16-byte alignment); the
/// caller commits and waits.
template <int GK, int GV>
__device__ __forceinline__ void stage_tile_codes(const CodeRun& keys, const CodeRun& values, std::uint32_t page, int t,
                                                 bool wide, unsigned dst, int lane) {
  const std::uint8_t* kb = keys.block_in(page, t / 32, GK * 32) + t % 32;  // group g at + 32 g
  const std::uint8_t* vb = values.block_in(page, t / 32, GV * 32) + t % 32;
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

/// The transpose of an 8 x 8 matrix of halves held as an mma fragment (row lane / 4, columns
/// 2 (lane % 4) + {0, 1} in one word): the same fragment of the transpose.
__device__ __forceinline__ unsigned transpose_8x8(unsigned x) {
  unsigned y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

/// Centroid `code` of group g in a codebook of C-channel centroids stored in order.
template <int C>
__device__ __forceinline__ const __half* centroid_at(const __half* cb, int g, unsigned code) {
  return cb + (g * 256 + int(code)) * C;
}

/// Appends the centroid at c (C halves, C / 2 words) to w at word i * C / 2.
template <int C>
__device__ __forceinline__ void put_centroid_words(const __half* c, unsigned* w, int i) {
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

/// The dual placement of an 8-channel key codebook (GroupedRowsConfig::dual_keys). In the key
/// fragment's load g (of 4), lane (gq, tq) reads group 4 tq + g for a token of row parity gq & 1,
/// and a quarter-warp's eight lanes are two such rows by four tq. Placed by group and code alone,
/// a centroid's bank quad is its code mod 8, so random codes meet (eight lanes on eight quads at
/// random: the busiest holds two or three, and the load replays as often). Held twice instead,
/// copy r of group 4 tq + g's centroid `code` in 16-byte slot dual_key_slot(g, code, r, tq), the
/// eight lanes (copy r = gq & 1) fall on the eight distinct quads 4 r + tq whatever their codes.
__device__ __forceinline__ int dual_key_slot(int g, unsigned code, int copy, int tq) {
  return 8 * (256 * g + int(code)) + 4 * copy + tq;
}

/// Where the tile's tokens sit: the mma fragments' token index r (0..15) is staged token
/// 4 (r % 8 / 2) + r % 2 + 2 (r / 8), so a thread's two key rows (r, r + 8) share a 32-bit word
/// of a group's staged codes (bytes e and e + 2), and its four value tokens (2 tq, 2 tq + 1,
/// 2 tq + 8, 2 tq + 9) are the four bytes of word tq.
__device__ __forceinline__ int staged_token(int r) { return 4 * ((r & 7) >> 1) + (r & 1) + 2 * (r >> 3); }

/// The channel of thread tq's i-th key channel (i < 32) in the permuted reduction dimension of
/// K Q^T: 32 tq + i; with keys rotated in the kernel (Rope), 16 tq + i and 64 + 16 tq + (i - 16),
/// so that both channels of every rotation pair -- (c, c + 64) with rotate_half, (2 i, 2 i + 1)
/// interleaved -- are the same thread's.
template <bool Rope>
__device__ __forceinline__ int key_channel(int tq, int i) {
  if constexpr (Rope) return i < 16 ? 16 * tq + i : 48 + 16 * tq + i;
  return 32 * tq + i;
}

__device__ __forceinline__ float2 unpack_half2(unsigned w) { return __half22float2(*reinterpret_cast<const __half2*>(&w)); }

/// Where two pairs' (cos, sin) (16 bytes: pairs 2 c and 2 c + 1) sit in shared memory: chunk c of
/// row t of the step table, or of a warp's anchor (t = 0), is stored at chunk
/// rope_chunk(c, t) of its row. In rotate_key_words a quarter-warp's eight lanes (two rows of
/// opposite parity, four tq) read chunks whose low three bits agree; unswizzled they fall on one
/// bank quad (eight wavefronts per quarter-warp, which made the rotation cost 3x the kernel);
/// the xor spreads them over all eight.
__device__ __forceinline__ int rope_chunk(int c, int t) { return c ^ ((2 * (c >> 3) + (t & 1)) & 7); }

/// (cos, sin) of two pairs at anchor + t: the anchor's a = (cos, sin, cos, sin) composed with the
/// step's t alike (angle addition).
__device__ __forceinline__ float4 rope_compose(float4 a, float4 t) {
  return make_float4(a.x * t.x - a.y * t.y, a.y * t.x + a.x * t.y, a.z * t.z - a.w * t.w, a.w * t.z + a.z * t.w);
}

/// Rotates a thread's decoded key words of its two tile rows (w0, w1: word k holds channels
/// key_channel<true>(tq, 2 k) and + 1) to the tile's anchor (`anchor`: (cos, sin) per pair, times
/// the attention factor) plus steps s0 and s1 (`steps`: [t][pair] (cos, sin), DeviceRope::step),
/// both stored by rope_chunk. In float; the words are half precision before and after.
__device__ __forceinline__ void rotate_key_words(unsigned (&w0)[16], unsigned (&w1)[16], const float* anchor,
                                                 const float* steps, int s0, int s1, int tq, bool rotate_half) {
  constexpr int P = DeviceRope::max_pairs;
  auto split = [](unsigned& x, unsigned& y, float4 cs) {  // x: channel a of two pairs, y: their channel b
    const float2 a = unpack_half2(x), b = unpack_half2(y);
    x = pack_half2(a.x * cs.x - b.x * cs.y, a.y * cs.z - b.y * cs.w);
    y = pack_half2(b.x * cs.x + a.x * cs.y, b.y * cs.z + a.y * cs.w);
  };
  auto pairs = [](unsigned& x, unsigned& y, float4 cs) {  // x: one pair (a, b), y: the next
    const float2 u = unpack_half2(x), v = unpack_half2(y);
    x = pack_half2(u.x * cs.x - u.y * cs.y, u.y * cs.x + u.x * cs.y);
    y = pack_half2(v.x * cs.z - v.y * cs.w, v.y * cs.z + v.x * cs.w);
  };
  if (rotate_half) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {  // words k and k + 8: channels c, c + 1 and c + 64, c + 65; pairs c, c + 1
      const int c = 8 * tq + k;  // pairs 2 c, 2 c + 1
      const float4 a = *reinterpret_cast<const float4*>(anchor + 4 * rope_chunk(c, 0));
      split(w0[k], w0[k + 8], rope_compose(a, *reinterpret_cast<const float4*>(steps + 2 * s0 * P + 4 * rope_chunk(c, s0))));
      split(w1[k], w1[k + 8], rope_compose(a, *reinterpret_cast<const float4*>(steps + 2 * s1 * P + 4 * rope_chunk(c, s1))));
    }
  } else {
#pragma unroll
    for (int k = 0; k < 16; k += 2) {  // words k and k + 1: pairs pr and pr + 1
      const int c = (k < 8 ? 8 * tq + k : 32 + 8 * tq + (k - 8)) / 2;  // pairs 2 c, 2 c + 1
      const float4 a = *reinterpret_cast<const float4*>(anchor + 4 * rope_chunk(c, 0));
      pairs(w0[k], w0[k + 1], rope_compose(a, *reinterpret_cast<const float4*>(steps + 2 * s0 * P + 4 * rope_chunk(c, s0))));
      pairs(w1[k], w1[k + 1], rope_compose(a, *reinterpret_cast<const float4*>(steps + 2 * s1 * P + 4 * rope_chunk(c, s1))));
    }
  }
}

template <int CK, int CV, int NT, bool Rope, bool Capped>
__global__ void __launch_bounds__(GroupedRowsConfig::warps(NT, Rope ? CK : 0) * 32, 1)
    grouped_rows_kernel(AttentionBatch p, GroupedRowsLayout L, const unsigned char* __restrict__ codebooks,
                        float* __restrict__ partial) {
  using Cfg = GroupedRowsConfig;
  constexpr int D = Cfg::head_dim, GK = D / CK, GV = D / CV, warps = Cfg::warps(NT, Rope ? CK : 0), threads = warps * 32;
  constexpr int MG = 8 * NT;  // heads a block's fragments hold (the group padded)
  constexpr bool dual = Cfg::dual_keys(CK, Rope ? CK : 0);
  constexpr int stage_bytes = Cfg::stage_bytes(CK);
  static_assert(CK == CV, "one stage size for keys and values");
  extern __shared__ __align__(16) unsigned char grouped_rows_smem[];
  __half* kc = reinterpret_cast<__half*>(grouped_rows_smem);
  __half* vc = kc + (dual ? 2 : 1) * 256 * D;
  const std::size_t small_at =
      Cfg::shared_bytes(L.full_cap, NT, CK, Rope ? CK : 0) - 2 * 64 * 4 - (Rope ? Cfg::rope_bytes(NT, CK) : 0);
  float* kscale = reinterpret_cast<float*>(grouped_rows_smem + small_at);  // [GK]
  float* vscale = kscale + 64;                                             // [GV]
  // Pre-RoPE keys: the step table [t][pair] (cos, sin), then each warp's two tile anchors
  // [2][pair] (cos, sin): the current tile's, and the next one's, written a tile ahead.
  float* rope_steps = vscale + 64;
  float* anchors = rope_steps + DeviceRope::steps * DeviceRope::max_pairs * 2 + (threadIdx.x / 32) * 4 * DeviceRope::max_pairs;

  const int group = p.q_heads / p.kv_heads;
  const int split = blockIdx.x, b = blockIdx.y / p.kv_heads, kvh = blockIdx.y % p.kv_heads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gq = lane / 4, tq = lane % 4;
  const DeviceSequence seq = p.sequences[b];
  const DeviceKVCodes codes = p.codes[b * p.kv_heads + kvh];
  const int c0 = split * L.split_tokens;
  const int n = max(0, min(int(seq.coded), c0 + L.split_tokens) - c0);
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));
  const std::size_t q0 = (std::size_t(b) * p.q_heads + std::size_t(kvh) * group) * D;  // the group's queries
  auto q = [&](int i) { return p.query(q0 + i); };

  {  // This KV head's half-precision codebooks and scales (half_codebooks_kernel) into shared memory.
    const uint4* src = reinterpret_cast<const uint4*>(codebooks + std::size_t(kvh) * HalfCodebooks::bytes);
    constexpr int words = 4 * HalfCodebooks::halves / 16, key_words = words / 2;  // 16-byte words
    // Keys (dual: twice, slot by slot so that a warp's stores are consecutive -- slot s =
    // dual_key_slot(g, code, copy, tq) holds group 4 tq + g's centroid `code`, whichever copy, bit
    // 2 of s, it is), then values as they are.
    uint4* kdst = reinterpret_cast<uint4*>(kc);
#pragma unroll 4
    for (int s = tid; s < (dual ? 2 : 1) * key_words; s += threads)
      kdst[s] = __ldg(src + (dual ? (4 * (s & 3) + (s >> 11)) * 256 + ((s >> 3) & 255) : s));
    uint4* vdst = reinterpret_cast<uint4*>(vc);
#pragma unroll 4
    for (int i = tid; i < key_words; i += threads) vdst[i] = __ldg(src + key_words + i);
    if (tid < 128) kscale[tid] = reinterpret_cast<const float*>(src + words)[tid];  // kscale, then vscale
    if constexpr (Rope)  // the step table, chunks placed by rope_chunk
      for (int i = tid; i < DeviceRope::steps * DeviceRope::max_pairs; i += threads) {
        const int t = i / DeviceRope::max_pairs, pr = i % DeviceRope::max_pairs;
        const float* cs = p.rope->step[t][pr];
        float* dst = rope_steps + 2 * t * DeviceRope::max_pairs + 4 * rope_chunk(pr / 2, t) + 2 * (pr & 1);
        dst[0] = cs[0], dst[1] = cs[1];
      }
  }
  __syncthreads();

  // The queries as B fragments of S = K Q^T (tokens x heads): column gq of column tile j is head
  // 8 j + gq; k-step s's rows 2 tq + {0, 1} and 2 tq + 8 + {0, 1} are channels 32 tq + 4 s + {0, 1}
  // and + {2, 3} (the reduction dimension permuted alike in K), so a thread's key fragments are
  // whole centroids. Each channel is divided by its key group's scale (times its reciprocal), then
  // all scaled by qs into half's range: qs from the largest of those, which the warp's fragments
  // cover once each (heads and channels), so the queries are loaded once, all at a time.
  unsigned qb[NT][8][2];
  float qmax = 0.0f, qx[NT][8][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const int h = 8 * j + gq, ch = key_channel<Rope>(tq, 4 * s);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        qx[j][s][k] = h < group ? q(h * D + ch + k) * __frcp_rn(kscale[(ch + k) / CK]) : 0.0f;
        qmax = fmaxf(qmax, fabsf(qx[j][s][k]));
      }
    }
  qmax = warp_max(qmax);
  const float qs = range_scale(qmax);
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      qb[j][s][0] = pack_half2(qx[j][s][0] * qs, qx[j][s][1] * qs);
      qb[j][s][1] = pack_half2(qx[j][s][2] * qs, qx[j][s][3] * qs);
    }
  const float score_mul = scale / qs;

  // Online softmax of heads 8 j + 2 tq + {0, 1} (this thread's columns); O^T = V^T P^T in o:
  // row tile mt's rows gq and gq + 8 are channels 16 gq + 2 mt and + 1 (a thread decodes 16
  // consecutive channels of its value rows).
  float m[NT][2], l[NT][2];
  float o[8][NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    m[j][0] = m[j][1] = -INFINITY;
    l[j][0] = l[j][1] = 0.0f;
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.0f;
  }
  const int tiles = (n + Cfg::tile - 1) / Cfg::tile;
  // Each warp stages its next tile's codes (cp.async) while it computes the current one.
  std::uint8_t* stages = grouped_rows_smem + Cfg::key_codebook_bytes(CK, Rope ? CK : 0) + Cfg::codebook_bytes +
                         warp * 2 * stage_bytes;
  const unsigned stages_at = unsigned(__cvta_generic_to_shared(stages));
  const bool wide = codes.aligned16();
  // Paged codes: the page of the tile after next is looked up a tile ahead, so the page-table
  // load is not waited for when its tile's copy goes out.
  const CodeRun key_run = codes.keys(p.page_shift()), value_run = codes.values(p.page_shift());
  auto page_of_tile = [&](int tile) { return tile < tiles ? key_run.page_of((c0 + tile * Cfg::tile) / 32) : 0u; };
  if (warp < tiles)
    stage_tile_codes<GK, GV>(key_run, value_run, page_of_tile(warp), c0 + warp * Cfg::tile, wide, stages_at, lane);
  asm volatile("cp.async.commit_group;" ::: "memory");
  std::uint32_t next_page = page_of_tile(warp + warps);
  const int row0 = staged_token(gq), e = gq & 1;  // this thread's key rows: staged tokens row0, row0 + 2
  const std::uint64_t position0 = Rope ? seq.position + seq.sinks + std::uint64_t(c0) : 0;  // of coded token c0
  const bool rotate_half = Rope && p.rope->style == int(RopeStyle::rotate_half);
  // The anchor of `tile` (pairs lane and lane + 32) into anchor buffer `buf`, read after the next
  // __syncwarp: written a tile ahead, so its sincos latency is not waited for.
  auto put_anchor = [&](int tile, int buf) {
    const std::uint64_t at = position0 + std::uint64_t(tile * Cfg::tile);
    for (int pr = lane; pr < DeviceRope::max_pairs; pr += 32)
      reinterpret_cast<float2*>(anchors + buf * 2 * DeviceRope::max_pairs)[2 * rope_chunk(pr / 2, 0) + (pr & 1)] =
          p.rope->at(pr, at);
  };
  if constexpr (Rope)
    if (warp < tiles) put_anchor(warp, 0);
  for (int tile = warp, i = 0; tile < tiles; tile += warps, ++i) {
    const int t0 = tile * Cfg::tile;
    if (tile + warps < tiles)
      stage_tile_codes<GK, GV>(key_run, value_run, next_page, c0 + t0 + warps * Cfg::tile, wide,
                               stages_at + ((i + 1) & 1) * stage_bytes, lane);
    asm volatile("cp.async.commit_group;" ::: "memory");
    next_page = page_of_tile(tile + 2 * warps);
    asm volatile("cp.async.wait_group 1;" ::: "memory");
    __syncwarp();
    const unsigned* staged = reinterpret_cast<const unsigned*>(stages + (i & 1) * stage_bytes);
    // Scores S = K Q^T: rows gq and gq + 8 of the tile (staged tokens row0 and row0 + 2), channels
    // 32 tq .. 32 tq + 31. Two accumulators (even and odd k-steps) halve the chain of products.
    float sc[NT][4];
    {
      unsigned w0[16], w1[16];
#pragma unroll
      for (int g = 0; g < 32 / CK; ++g) {
        const int grp = key_channel<Rope>(tq, g * CK) / CK;
        const unsigned word = staged[4 * grp + (row0 >> 2)] >> (8 * e);
        if constexpr (dual) {  // a slot is one 8-channel centroid
          put_centroid_words<CK>(kc + 8 * dual_key_slot(g, word & 255u, gq & 1, tq), w0, g);
          put_centroid_words<CK>(kc + 8 * dual_key_slot(g, (word >> 16) & 255u, gq & 1, tq), w1, g);
        } else {
          put_centroid_words<CK>(centroid_at<CK>(kc, grp, word & 255u), w0, g);
          put_centroid_words<CK>(centroid_at<CK>(kc, grp, (word >> 16) & 255u), w1, g);
        }
      }
      if constexpr (Rope) {
        rotate_key_words(w0, w1, anchors + (i & 1) * 2 * DeviceRope::max_pairs, rope_steps, row0, row0 + 2, tq,
                         rotate_half);
        if (tile + warps < tiles) put_anchor(tile + warps, (i + 1) & 1);  // the other buffer: read last tile
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float odd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
        for (int s = 0; s < 8; s += 2) {
          const unsigned a0[4] = {w0[2 * s], w1[2 * s], w0[2 * s + 1], w1[2 * s + 1]};
          const unsigned a1[4] = {w0[2 * s + 2], w1[2 * s + 2], w0[2 * s + 3], w1[2 * s + 3]};
          mma_16816(sc[j], a0, qb[j][s][0], qb[j][s][1]);
          mma_16816(odd, a1, qb[j][s + 1][0], qb[j][s + 1][1]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) sc[j][k] += odd[k];
      }
    }
    // Logits sc x score_mul; soft-capped ones divided back by score_mul, so the loop below is the
    // same with or without a cap.
    if constexpr (Capped) {
      const SoftCap cap(p.logits_soft_cap);
      const float back = 1.0f / score_mul;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) sc[j][c] = cap(sc[j][c] * score_mul) * back;
    }
    // Online softmax per head (column): the tile's maximum over its 16 rows (lanes of one tq).
    const bool valid0 = t0 + row0 < n, valid1 = t0 + row0 + 2 < n;
    unsigned pb[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float pw[4], f[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float s0 = valid0 ? sc[j][c] * score_mul : -INFINITY;
        const float s1 = valid1 ? sc[j][2 + c] * score_mul : -INFINITY;
        float tmax = fmaxf(s0, s1);
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 4));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 8));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 16));
        const float nm = fmaxf(m[j][c], tmax);  // > -inf: the tile's first token is valid
        f[c] = softmax_exp(m[j][c] - nm);
        m[j][c] = nm;
        pw[c] = softmax_exp(s0 - nm);
        pw[2 + c] = softmax_exp(s1 - nm);
        l[j][c] = l[j][c] * f[c] + pw[c] + pw[2 + c];
      }
#pragma unroll
      for (int mt = 0; mt < 8; ++mt)
#pragma unroll
        for (int k = 0; k < 4; ++k) o[mt][j][k] *= f[k & 1];
      // P^T as B fragments of O^T += V^T P^T: the transposes of P's two 8 x 8 blocks.
      pb[j][0] = transpose_8x8(pack_half2(pw[0], pw[1]));
      pb[j][1] = transpose_8x8(pack_half2(pw[2], pw[3]));
    }
    // Values: this thread's tokens 2 tq, 2 tq + 1, 2 tq + 8, 2 tq + 9 (staged 4 tq .. 4 tq + 3, the
    // bytes of one word per group), channels 16 gq .. 16 gq + 15.
    unsigned vw[4][8];
    const unsigned* vstaged = staged + 4 * GK;
#pragma unroll
    for (int g = 0; g < 16 / CV; ++g) {
      const int grp = 16 * gq / CV + g;
      const unsigned word = vstaged[4 * grp + tq];
#pragma unroll
      for (int r = 0; r < 4; ++r) put_centroid_words<CV>(centroid_at<CV>(vc, grp, (word >> (8 * r)) & 255u), vw[r], g);
    }
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) {
      const unsigned a[4] = {__byte_perm(vw[0][mt], vw[1][mt], 0x5410), __byte_perm(vw[0][mt], vw[1][mt], 0x7632),
                             __byte_perm(vw[2][mt], vw[3][mt], 0x5410), __byte_perm(vw[2][mt], vw[3][mt], 0x7632)};
#pragma unroll
      for (int j = 0; j < NT; ++j) mma_16816(o[mt][j], a, pb[j][0], pb[j][1]);
    }
    {  // The codes two rounds ahead head for L2 (one 128-byte line per lane).
      const int ahead = t0 + 2 * warps * Cfg::tile;
      if (ahead < n && (ahead & 31) == 0 && lane < GK / 4 + GV / 4) {
        const int blk = (c0 + ahead) / 32;
        const std::uint8_t* line = lane < GK / 4 ? key_run.block_in(next_page, blk, GK * 32) + lane * 128
                                                 : value_run.block_in(next_page, blk, GV * 32) + (lane - GK / 4) * 128;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
      }
    }
    __syncwarp();  // every lane is done with this stage before the next tile's copy lands in it
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      l[j][c] += __shfl_xor_sync(0xffffffffu, l[j][c], 4);
      l[j][c] += __shfl_xor_sync(0xffffffffu, l[j][c], 8);
      l[j][c] += __shfl_xor_sync(0xffffffffu, l[j][c], 16);
    }
  __syncthreads();  // the codebooks are done with; their room takes the warps' states

  // The warps' states: wo[warp][head][channel], then (m, l).
  float* wo = reinterpret_cast<float*>(grouped_rows_smem);
  float* wml = wo + warps * MG * D;  // [warp][head][2]
  float* fsc = wml + warps * MG * 2;  // [head][full_cap]: the full-precision tokens' weights
  float* fml = fsc + MG * L.full_cap;  // [head][2]
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
      for (int k = 0; k < 4; ++k)
        wo[(warp * MG + 8 * j + 2 * tq + (k & 1)) * D + 16 * gq + 2 * mt + (k >> 1)] = o[mt][j][k];
    if (gq == 0)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        wml[(warp * MG + 8 * j + 2 * tq + c) * 2] = m[j][c];
        wml[(warp * MG + 8 * j + 2 * tq + c) * 2 + 1] = l[j][c];
      }
  }
  // Full-precision tokens (split 0), scored in float: rows spread over the warps, a row's 64
  // channel pairs over the lanes (pairs lane and lane + 32: with keys before RoPE the rotation
  // pairs, rotated with exact sincos, else channels 2 pr and 2 pr + 1), each row loaded once for
  // all heads -- so no warp walks a row's channels alone while the others wait at the barrier.
  const int nfull = split == 0 ? int(seq.full) : 0;
  if (nfull > 0) visit_full_rows(p, b, kvh, [&](const auto& rows) {
    for (int j = warp; j < nfull; j += warps) {
      const auto* k = rows.key(j);
      int2 ch[2];
      float kr[2][2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int pr = lane + 32 * u;
        if constexpr (Rope) {
          ch[u] = p.rope->channels(pr, D);
          const float2 cs = p.rope->at(pr, seq.full_position(std::uint32_t(j)));
          const float ka = rows.at(k, ch[u].x), kb = rows.at(k, ch[u].y);
          kr[u][0] = ka * cs.x - kb * cs.y, kr[u][1] = kb * cs.x + ka * cs.y;
        } else {
          ch[u] = make_int2(2 * pr, 2 * pr + 1);
          kr[u][0] = rows.at(k, ch[u].x), kr[u][1] = rows.at(k, ch[u].y);
        }
      }
      for (int h = 0; h < group; ++h) {
        float sc = 0.0f;
#pragma unroll
        for (int u = 0; u < 2; ++u) sc = fmaf(q(h * D + ch[u].x), kr[u][0], fmaf(q(h * D + ch[u].y), kr[u][1], sc));
        sc = warp_sum(sc);
        if (lane == 0) fsc[h * L.full_cap + j] = Capped ? soft_cap(sc * scale, p.logits_soft_cap) : sc * scale;
      }
    }
  });
  __syncthreads();
  for (int h = warp; h < group && nfull > 0; h += warps) {
    float fm = -INFINITY;
    for (int j = lane; j < nfull; j += 32) fm = fmaxf(fm, fsc[h * L.full_cap + j]);
    fm = warp_max(fm);
    float fl = 0.0f;
    for (int j = lane; j < nfull; j += 32) {
      const float w = softmax_exp(fsc[h * L.full_cap + j] - fm);
      fsc[h * L.full_cap + j] = w;
      fl += w;
    }
    fl = warp_sum(fl);
    if (lane == 0) fml[2 * h] = fm, fml[2 * h + 1] = fl;
  }
  __syncthreads();

  // Merge: the warps' coded parts and the full part, per (head, channel).
  for (int i = tid; i < group * D; i += threads) {
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
      visit_full_rows(p, b, kvh, [&](const auto& rows) {
        for (int j = 0; j < nfull; ++j) acc = fmaf(fsc[h * L.full_cap + j], rows.at(rows.value(j), d), acc);
      });
      num = fmaf(f, acc, num);
      den = fmaf(f, fsum, den);
    }
    const int bh = b * p.q_heads + kvh * group + h;
    if (gridDim.x == 1) {
      p.write_output(std::size_t(bh), d, num, ref, den);
    } else {
      float* dst = partial + (std::size_t(bh) * gridDim.x + split) * (2 + D);
      if (d == 0) dst[0] = ref, dst[1] = den;
      dst[2 + d] = num;
    }
  }
}

}  // namespace cq::cuda::detail
