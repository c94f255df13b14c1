#pragma once
/// The chunked-prefill kernel: many query rows of a sequence (a chunk of new tokens, all query
/// heads of one KV head) attend over the sequence's cached tokens -- coded tokens, then its sinks'
/// and window's full-precision rows -- and over the chunk's own keys and values, causally. A
/// FlashAttention-2 style loop on tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate):
/// each block holds 256 query rows (GQA: the tokens x the group's heads, so a key tile serves the
/// whole group), 32 per warp (two m-tiles: each K and V fragment read from shared memory serves
/// both, halving that traffic, which bounded the kernel at 16 rows per warp), and walks the keys in
/// tiles (PrefillConfig::tile), each in 32-token online-softmax steps (the kernel spilled with
/// 64-token steps). Every tile is first written into shared memory as fp16 rows, so the products
/// never see codes.
///
/// Keys coded before RoPE (AttentionBatch::rope) are rotated to their positions as the rows enter
/// the tiles (coded rows: as they are decoded into the workspace), which only the first way does.
///
/// Coded tiles come one of two ways (PrefillPlan::decoded):
/// - decoded once (prefill_decode_kernel): every (sequence, KV head)'s coded rows are decoded into
///   a workspace before the attention, once, not once per block of query rows (a 4K-token chunk of
///   a 4-head group has 64 such blocks per KV head); the kernel then reads every tile by cp.async
///   into one of two buffers while it computes on the other, as FlashAttention-2 does over fp16.
///   Costs a workspace of 512 bytes per coded token and KV head;
/// - decoded in the kernel, into shared memory, from the block's copy of the KV head's fp16
///   codebooks (128 KiB), when the workspace would be too large: no room is left for a second
///   buffer, so the next tile's codes are loaded into registers during the products and decoded
///   between two barriers.
///
/// Precision: the codebooks are the decode kernels' half copies, each group scaled by a power of
/// two into [128, 256) (half_codebooks_kernel); full-precision and chunk rows are scaled by the
/// same per-channel powers of two, the queries by their inverse (then each query row by a power of
/// two of its own), and the outputs divided by the value scales, so all of it is exact
/// rescaling. Rows are rounded to fp16 (a bf16 model's rows must lie within fp16's range, as in
/// the decode kernels). Both ways give the same halves, so the same outputs.

#include "cq/cuda/attention/grouped_rows/kernel.cuh"
#include "cq/cuda/attention/params.cuh"
#include "cq/cuda/elements.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace cq::cuda {

/// A batch's chunk (device memory): sequence b's rows are [indptr[b], indptr[b + 1]) of q, k, v,
/// out and lse; row i of sequence b is the token at position (its cached tokens) + i - indptr[b].
struct PrefillRows {
  const std::uint32_t* indptr = nullptr;  // [batch + 1]
  const void* q = nullptr;                // [rows][q_heads][head_dim], row stride q_stride elements
  const void* k = nullptr;                // [rows][kv_heads][head_dim], row stride kv_stride
  const void* v = nullptr;                // likewise
  void* out = nullptr;                    // [rows][q_heads][head_dim], row stride out_stride
  float* lse = nullptr;                   // optional [rows][q_heads]: natural log-sum-exp of the scaled scores
  std::size_t q_stride = 0, kv_stride = 0, out_stride = 0;
  int q_heads = 0;
};

namespace detail {

struct PrefillConfig {
  static constexpr int head_dim = 128;
  /// Tokens of a K or V tile: 128 from decoded rows (half the barriers and loop overhead of 64);
  /// 64 when the kernel decodes tiles itself (its codebooks fill the room of larger tiles).
  static constexpr int tile(bool decoded) { return decoded ? 128 : 64; }
  static constexpr int tile_bytes(bool decoded) { return tile(decoded) * head_dim * 2; }  // in fp16
  /// Query rows of a block, one thread each, 32 a warp: each tile in shared memory serves them all
  /// (as measured, faster than two blocks of 128 an SM).
  static constexpr int rows = 256, threads = 256;
  /// Shared memory: the codebooks and scales (decoded beforehand: the scales only), the block's
  /// queries in fp16, the K and V tiles (decoded beforehand: two of each), the row scales.
  static constexpr std::size_t shared(bool decoded) {
    return (decoded ? 2 * 64 * 4 + 4 * tile_bytes(true) : HalfCodebooks::bytes + 2 * tile_bytes(false)) +
           std::size_t(rows) * (head_dim * 2 + 4);
  }
  /// The decoded rows of one (sequence, KV head, keys or values) in the workspace: row t at
  /// t x head_dim halves.
  static constexpr std::size_t decoded_run(int batch_index, int kv_heads, int kvh, int which, int cap) {
    return ((std::size_t(batch_index) * kv_heads + kvh) * 2 + which) * std::size_t(cap) * head_dim;
  }
};

/// Byte offset of 8-channel chunk c of tile row r: 16-byte chunks xor-swizzled by the row, so the
/// eight rows an ldmatrix reads at one chunk fall in eight different bank groups.
__device__ __forceinline__ unsigned prefill_chunk(int r, int c) { return unsigned(r * 256 + ((c ^ (r & 7)) << 4)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned (&b)[4], bool trans) {
  if (trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(addr));
}

/// Eight elements (one 16-byte load) as floats.
template <class E>
__device__ __forceinline__ void unpack8(uint4 w, float (&x)[8]) {
  const E* e = reinterpret_cast<const E*>(&w);
  for (int i = 0; i < 8; ++i) x[i] = element_to_float(e[i]);
}

/// Channels 8c .. 8c + 7 of a row, scaled by their groups' powers of two (groups of C channels),
/// as eight halves.
template <int C>
__device__ __forceinline__ uint4 scaled_halves(const float (&x)[8], const float* scales, int c) {
  uint4 w;
  unsigned* u = reinterpret_cast<unsigned*>(&w);
  for (int i = 0; i < 4; ++i)
    u[i] = pack_half2(x[2 * i] * scales[(8 * c + 2 * i) / C], x[2 * i + 1] * scales[(8 * c + 2 * i + 1) / C]);
  return w;
}

/// What a thread carries from the loads of the next tile to its decode: its key and value codes.
/// (Chunk rows go to shared memory by cp.async instead: in registers they made the kernel spill.)
struct PrefillStage {
  uint4 raw[2];
};

/// NB (4, 8 or 16) bytes of codes at `src` (NB-byte aligned), in the low bytes of a uint4.
template <int NB>
__device__ __forceinline__ uint4 load_code_bytes(const std::uint8_t* src) {
  if constexpr (NB == 16) return *reinterpret_cast<const uint4*>(src);
  else if constexpr (NB == 8) return make_uint4(reinterpret_cast<const uint2*>(src)->x, reinterpret_cast<const uint2*>(src)->y, 0, 0);
  else return make_uint4(*reinterpret_cast<const unsigned*>(src), 0, 0, 0);
}

/// 2^x by the SFU alone (ex2.approx.ftz: results below 2^-126 flush to zero, as softmax weights
/// that small vanish beside the row's largest, which is 1); exp2f adds denormal handling.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// 16 bytes from global `src` to shared `dst` without registers; zeros when !valid.
__device__ __forceinline__ void copy16_async(unsigned dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

/// Channels 8c .. 8c + 7 of a key row (x, unscaled) rotated to position `pos`; `partner` holds
/// channels 8 (c ^ 8) .. 8 (c ^ 8) + 7 of the same row (rotate_half pairs channel i with i + 64;
/// interleaved pairs lie within x).
__device__ __forceinline__ void rotate_chunk(float (&x)[8], const float (&partner)[8], int c, std::uint64_t pos,
                                             const DeviceRope& rope) {
  if (rope.style == int(RopeStyle::rotate_half)) {
    const float sign = c < 8 ? -1.0f : 1.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 cs = rope.at(8 * (c & 7) + i, pos);
      x[i] = x[i] * cs.x + sign * partner[i] * cs.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 cs = rope.at(4 * c + k, pos);
      const float a = x[2 * k], b = x[2 * k + 1];
      x[2 * k] = a * cs.x - b * cs.y;
      x[2 * k + 1] = b * cs.x + a * cs.y;
    }
  }
}

/// rotate_chunk for the tile fills, where the lane holding chunk c ^ 8 of the same row is this
/// lane ^ 8 (16 chunks a row, consecutive threads): all 32 lanes must call it.
__device__ __forceinline__ void rotate_tile_chunk(float (&x)[8], int c, std::uint64_t pos, const DeviceRope& rope,
                                                  bool valid) {
  float partner[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) partner[i] = __shfl_xor_sync(0xffffffffu, x[i], 8);
  if (valid) rotate_chunk(x, partner, c, pos, rope);
}

/// Grid (coded tokens / 64, KV heads, sequences): block (t, h, b) decodes coded tokens 64 t ..
/// 64 t + 63 of sequence b's KV head h, keys and values, from the half codebooks into the
/// workspace rows (PrefillConfig::decoded_run; tokens past `cap` are not written: the attention
/// reads none). A thread writes 16 bytes of a row at a time (8 / C groups), consecutive threads
/// consecutive chunks, so the rows are written whole; the centroids are read through L1. Keys
/// coded before RoPE (p.rope) are rotated to their positions here, once: with rotate_half a
/// thread takes the two groups of its channels' pairs (their half codebooks share a scale:
/// key_partners), so the rotation of scaled halves is exact rescaling.
template <int CK, int CV>
__global__ void __launch_bounds__(256) prefill_decode_kernel(AttentionBatch p, const unsigned char* __restrict__ codebooks,
                                                             __half* __restrict__ out, int cap) {
  constexpr int D = PrefillConfig::head_dim;
  const int t0 = 64 * blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int n = min(int(p.sequences[b].coded), cap) - t0;
  if (n <= 0) return;
  const DeviceKVCodes& kv = p.codes[std::size_t(b) * p.kv_heads + kvh];
  const __half* cb = reinterpret_cast<const __half*>(codebooks + std::size_t(kvh) * HalfCodebooks::bytes);
  auto run = [&](auto channels, const CodeRun& codes, int which) {
    constexpr int C = decltype(channels)::value, G = D / C;
    const __half* book = cb + which * HalfCodebooks::halves;
    __half* dst = out + PrefillConfig::decoded_run(b, p.kv_heads, kvh, which, cap) + std::size_t(t0) * D;
    constexpr int per = 8 / C;  // groups of one 16-byte chunk
    for (int u = threadIdx.x; u < min(n, 64) * (D / 8); u += 256) {
      const int r = u / (D / 8), j0 = per * (u % (D / 8)), t = t0 + r;
      const std::uint8_t* block = codes.block(t / 32, 32 * G) + t % 32;
      uint4 w;
      if constexpr (C == 8) w = __ldg(reinterpret_cast<const uint4*>(book + (j0 * 256 + __ldg(block + j0 * 32)) * C));
      else {
        unsigned* wu = reinterpret_cast<unsigned*>(&w);
#pragma unroll
        for (int k = 0; k < per; ++k) {
          const __half* src = book + ((j0 + k) * 256 + __ldg(block + (j0 + k) * 32)) * C;
          if constexpr (C == 4) {
            const uint2 x = __ldg(reinterpret_cast<const uint2*>(src));
            wu[2 * k] = x.x, wu[2 * k + 1] = x.y;
          } else {
            wu[k] = __ldg(reinterpret_cast<const unsigned*>(src));
          }
        }
      }
      *reinterpret_cast<uint4*>(dst + std::size_t(r) * D + 8 * (u % (D / 8))) = w;
    }
  };
  if (p.rope == nullptr) run(std::integral_constant<int, CK>{}, kv.keys(p.page_shift()), 0);
  else {
    constexpr int C = CK, G = D / C;
    const DeviceRope& rope = *p.rope;
    const bool half_style = rope.style == int(RopeStyle::rotate_half);
    const int units = half_style ? G / 2 : G;  // per row: pairs of groups (j, j + G / 2), or groups
    const CodeRun codes = kv.keys(p.page_shift());
    const std::uint64_t pos0 = p.sequences[b].position + p.sequences[b].sinks + std::uint64_t(t0);
    __half* dst = out + PrefillConfig::decoded_run(b, p.kv_heads, kvh, 0, cap) + std::size_t(t0) * D;
    for (int u = threadIdx.x; u < min(n, 64) * units; u += 256) {
      const int r = u / units, j = u % units, t = t0 + r;
      const std::uint8_t* block = codes.block(t / 32, 32 * G) + t % 32;
      const __half* a = cb + (j * 256 + __ldg(block + j * 32)) * C;
      float x[C], y[C];
#pragma unroll
      for (int e = 0; e < C; ++e) x[e] = __half2float(a[e]);
      if (half_style) {
        const __half* bb = cb + ((j + G / 2) * 256 + __ldg(block + (j + G / 2) * 32)) * C;
#pragma unroll
        for (int e = 0; e < C; ++e) {
          const float2 cs = rope.at(j * C + e, pos0 + r);
          const float xa = x[e], xb = __half2float(bb[e]);
          x[e] = xa * cs.x - xb * cs.y;
          y[e] = xb * cs.x + xa * cs.y;
        }
#pragma unroll
        for (int e = 0; e < C; ++e) dst[std::size_t(r) * D + (j + G / 2) * C + e] = __float2half_rn(y[e]);
      } else {
#pragma unroll
        for (int e = 0; e < C; e += 2) {
          const float2 cs = rope.at((j * C + e) / 2, pos0 + r);
          const float xa = x[e], xb = x[e + 1];
          x[e] = xa * cs.x - xb * cs.y;
          x[e + 1] = xb * cs.x + xa * cs.y;
        }
      }
#pragma unroll
      for (int e = 0; e < C; ++e) dst[std::size_t(r) * D + j * C + e] = __float2half_rn(x[e]);
    }
  }
  run(std::integral_constant<int, CV>{}, kv.values(p.page_shift()), 1);
}

/// `Decoded`: coded tiles are read from `decoded` (prefill_decode_kernel's rows, `cap` tokens per
/// run) into two alternating buffers; otherwise decoded in shared memory from `codebooks`.
template <int CK, int CV, class E, bool Decoded>
__global__ void __launch_bounds__(PrefillConfig::threads, 1)
    prefill_kernel(AttentionBatch p, PrefillRows rows, const unsigned char* __restrict__ codebooks,
                   const __half* __restrict__ decoded, int cap) {
  using Cfg = PrefillConfig;
  constexpr int D = Cfg::head_dim, GK = D / CK, GV = D / CV, TILE = Cfg::tile(Decoded), TB = Cfg::tile_bytes(Decoded);
  constexpr int ROWS = Cfg::rows, THREADS = Cfg::threads, PIECES = TILE * (D / 8) / THREADS;
  constexpr int NBK = GK / 4, NBV = GV / 4;  // code bytes of a tile per thread (64 tokens x groups / 256)
  // Online-softmax steps of 32 tokens (NJ score n-tiles): half the score registers of 64, which
  // spill (with decoded rows too).
  constexpr int STEP = 32, NJ = STEP / 8;
  extern __shared__ __align__(16) unsigned char prefill_smem[];
  unsigned char* const smem = prefill_smem;
  const int b = blockIdx.z, kvh = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int G = rows.q_heads / p.kv_heads;
  const int row0 = int(rows.indptr[b]), nrows = int(rows.indptr[b + 1]) - row0, nq = nrows * G;
  // The blocks of the latest rows first: they have the most chunk tiles (causal), so the last
  // wave holds the shortest blocks.
  const int R0 = (gridDim.x - 1 - blockIdx.x) * ROWS;
  if (R0 >= nq) return;

  // Shared memory: codebooks and scales (decoded beforehand: the scales only), queries, the K and
  // V tiles (decoded beforehand: two of each), row scales.
  constexpr std::size_t head_bytes = Decoded ? 2 * 64 * 4 : HalfCodebooks::bytes;
  {
    const uint4* src = reinterpret_cast<const uint4*>(codebooks + std::size_t(kvh) * HalfCodebooks::bytes +
                                                      (HalfCodebooks::bytes - head_bytes));
    uint4* dst = reinterpret_cast<uint4*>(smem);
    for (int i = tid; i < int(head_bytes / 16); i += THREADS) dst[i] = src[i];
  }
  const __half* cbk = reinterpret_cast<const __half*>(smem);
  const __half* cbv = cbk + HalfCodebooks::halves;
  const float* sk = reinterpret_cast<const float*>(smem + head_bytes - 2 * 64 * 4);
  const float* sv = sk + 64;
  unsigned char* const q_tile = smem + head_bytes;
  unsigned char* const tiles = q_tile + ROWS * D * 2;  // buffer u: K at 2 u tile_bytes, V after it
  float* const row_scales = reinterpret_cast<float*>(tiles + (Decoded ? 4 : 2) * TB);
  const unsigned q_at = unsigned(__cvta_generic_to_shared(q_tile)), tiles_at = q_at + ROWS * D * 2;
  __syncthreads();

  // Query row tid of the block (tokens x the group's heads): divided by the key scales, then by a
  // power of two of its own into fp16's range; the score scale undoes both.
  const float base_scale = (p.scale != 0.0f ? p.scale : rsqrtf(float(D))) * 1.4426950408889634f;
  {
    const int R = R0 + tid;
    const bool valid = R < nq;
    const E* q = static_cast<const E*>(rows.q) + std::size_t(row0 + (valid ? R / G : 0)) * rows.q_stride +
                 std::size_t(kvh * G + (valid ? R % G : 0)) * D;
    float m = 0.0f;
    for (int c = 0; c < 16; ++c) {
      float x[8] = {};
      if (valid) unpack8<E>(*reinterpret_cast<const uint4*>(q + 8 * c), x);
      for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(x[i] / sk[(8 * c + i) / CK]));
    }
    const float e = range_scale(m);
    for (int c = 0; c < 16; ++c) {
      float x[8] = {};
      if (valid) unpack8<E>(*reinterpret_cast<const uint4*>(q + 8 * c), x);
      uint4 w;
      unsigned* u = reinterpret_cast<unsigned*>(&w);
      for (int i = 0; i < 4; ++i)
        u[i] = pack_half2(x[2 * i] / sk[(8 * c + 2 * i) / CK] * e, x[2 * i + 1] / sk[(8 * c + 2 * i + 1) / CK] * e);
      *reinterpret_cast<uint4*>(q_tile + prefill_chunk(tid, c)) = w;
    }
    row_scales[tid] = base_scale / e;
  }

  const DeviceSequence& seq = p.sequences[b];
  const int coded = int(seq.coded), full = int(seq.full);
  const DeviceKVCodes& kv = p.codes[std::size_t(b) * p.kv_heads + kvh];
  const CodeRun key_run = kv.keys(p.page_shift()), value_run = kv.values(p.page_shift());
  const int last_row = min(R0 + ROWS, nq) - 1;
  // With decoded rows the plan's cap bounds the coded tokens attended (PrefillPlan::decoded_cap).
  const int attended = Decoded ? min(coded, cap) : coded;
  const int n_coded = (attended + TILE - 1) / TILE, n_full = (full + TILE - 1) / TILE;
  const int n_tiles = n_coded + n_full + last_row / G / TILE + 1;
  const E* kb = static_cast<const E*>(rows.k) + std::size_t(row0) * rows.kv_stride + std::size_t(kvh) * D;
  const E* vb = static_cast<const E*>(rows.v) + std::size_t(row0) * rows.kv_stride + std::size_t(kvh) * D;
  const int g = lane / 4, t4 = lane % 4, mi = lane / 8, r8 = lane % 8;
  const int warp_row = 32 * warp;  // this warp's 32 rows: two m-tiles of 16
  const bool warp_active = R0 + warp_row < nq;
  const int warp_first_token = (R0 + warp_row) / G, warp_last_token = min(R0 + warp_row + 31, nq - 1) / G;

  // Loads of coded tile i's codes into registers (issued before the products of the tile before;
  // decoded in the kernel only).
  auto fetch = [&](int i, PrefillStage& st) {
    if (Decoded || i >= n_coded) return;
    // This thread's bytes of the tile's two 32-token blocks: one group, consecutive tokens.
    const int o = NBK * tid, blk = o / (32 * GK), ov = NBV * tid, blkv = ov / (32 * GV);
    st.raw[0] = TILE * i + 32 * blk < coded
                    ? load_code_bytes<NBK>(key_run.block(2 * i + blk, 32 * GK) + o % (32 * GK))
                    : make_uint4(0, 0, 0, 0);
    st.raw[1] = TILE * i + 32 * blkv < coded
                    ? load_code_bytes<NBV>(value_run.block(2 * i + blkv, 32 * GV) + ov % (32 * GV))
                    : make_uint4(0, 0, 0, 0);
  };
  // Tile i into buffer u: decoded rows or the chunk's rows by cp.async (the chunk's converted in
  // place by finish: each thread its own pieces), codes decoded here, or full rows loaded.
  auto fill = [&](int i, int u, const PrefillStage& st) {
    unsigned char* const kt = tiles + 2 * u * TB;
    unsigned char* const vt = kt + TB;
    const unsigned kt_at = tiles_at + 2 * u * TB, vt_at = kt_at + TB;
    if (i < n_coded && !Decoded) {
      auto decode = [&](const uint4& w, int nb, int grp_count, int C, const __half* cb, unsigned char* tile) {
        const int o = nb * tid, blk = o / (32 * grp_count), within = o % (32 * grp_count);
        const int grp = within / 32, r0 = 32 * blk + within % 32;
        const std::uint8_t* codes = reinterpret_cast<const std::uint8_t*>(&w);
        for (int j = 0; j < nb; ++j) {
          const int r = r0 + j;
          const __half* src = cb + (grp * 256 + codes[j]) * C;
          unsigned char* dst = tile + prefill_chunk(r, grp * C / 8) + (grp * C % 8) * 2;
          if (C == 8) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
          else if (C == 4) *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
          else *reinterpret_cast<unsigned*>(dst) = *reinterpret_cast<const unsigned*>(src);
        }
      };
      decode(st.raw[0], NBK, GK, CK, cbk, kt);
      decode(st.raw[1], NBV, GV, CV, cbv, vt);
    } else if (i < n_coded || i >= n_coded + n_full) {
      // Rows from `k`, `v` with row stride `stride` elements, `n` of them valid.
      auto copy_rows = [&](const auto* k, const auto* v, std::size_t stride, int n) {
        for (int j = 0; j < PIECES; ++j) {
          const int w = tid + THREADS * j, r = w / 16, c = w % 16;
          const bool ok = r < n;
          const std::size_t at = ok ? std::size_t(r) * stride + 8 * c : 0;
          copy16_async(kt_at + prefill_chunk(r, c), k + at, ok);
          copy16_async(vt_at + prefill_chunk(r, c), v + at, ok);
        }
      };
      if (i < n_coded) {
        const std::size_t t0 = std::size_t(TILE) * i;
        copy_rows(decoded + Cfg::decoded_run(b, p.kv_heads, kvh, 0, cap) + t0 * D,
                  decoded + Cfg::decoded_run(b, p.kv_heads, kvh, 1, cap) + t0 * D, D, attended - int(t0));
      } else {
        const int c0 = (i - n_coded - n_full) * TILE;
        copy_rows(kb + std::size_t(c0) * rows.kv_stride, vb + std::size_t(c0) * rows.kv_stride, rows.kv_stride,
                  nrows - c0);
      }
      asm volatile("cp.async.commit_group;" ::: "memory");
    } else {
      const int f0 = (i - n_coded) * TILE;
      visit_full_rows(p, b, kvh, [&](auto fr) {
        const bool vec = fr.vec(D);
        for (int j = 0; j < PIECES; ++j) {
          const int w = tid + THREADS * j, r = w / 16, c = w % 16;
          float x[8] = {}, y[8] = {};
          if (f0 + r < full) {
            const auto* key = fr.key(f0 + r);
            const auto* value = fr.value(f0 + r);
            const float4 k0 = fr.at4(key, 8 * c, vec), k1 = fr.at4(key, 8 * c + 4, vec);
            const float4 v0 = fr.at4(value, 8 * c, vec), v1 = fr.at4(value, 8 * c + 4, vec);
            x[0] = k0.x, x[1] = k0.y, x[2] = k0.z, x[3] = k0.w, x[4] = k1.x, x[5] = k1.y, x[6] = k1.z, x[7] = k1.w;
            y[0] = v0.x, y[1] = v0.y, y[2] = v0.z, y[3] = v0.w, y[4] = v1.x, y[5] = v1.y, y[6] = v1.z, y[7] = v1.w;
          }
          if (Decoded && p.rope != nullptr)  // keys before RoPE
            rotate_tile_chunk(x, c, seq.full_position(std::uint32_t(f0 + r)), *p.rope, f0 + r < full);
          *reinterpret_cast<uint4*>(kt + prefill_chunk(r, c)) = scaled_halves<CK>(x, sk, c);
          *reinterpret_cast<uint4*>(vt + prefill_chunk(r, c)) = scaled_halves<CV>(y, sv, c);
        }
      });
    }
  };
  // After fill(i, u): waits for its copies; a chunk tile's rows are converted in place (each
  // thread the pieces it copied). The caller's barrier then publishes the tile.
  auto finish = [&](int i, int u) {
    asm volatile("cp.async.wait_all;" ::: "memory");
    if (i < n_coded + n_full) return;
    unsigned char* const kt = tiles + 2 * u * TB;
    unsigned char* const vt = kt + TB;
    for (int j = 0; j < PIECES; ++j) {
      const int w = tid + THREADS * j, r = w / 16, c = w % 16;
      float x[8];
      uint4* k = reinterpret_cast<uint4*>(kt + prefill_chunk(r, c));
      uint4* v = reinterpret_cast<uint4*>(vt + prefill_chunk(r, c));
      unpack8<E>(*k, x);
      if (Decoded && p.rope != nullptr)  // keys before RoPE: the chunk's tokens follow the cached ones
        rotate_tile_chunk(x, c, seq.position + std::uint64_t(coded) + full + (i - n_coded - n_full) * TILE + r,
                          *p.rope, true);
      *k = scaled_halves<CK>(x, sk, c);
      unpack8<E>(*v, x);
      *v = scaled_halves<CV>(x, sv, c);
    }
  };

  PrefillStage st;
  fetch(0, st);
  fill(0, 0, st);
  finish(0, 0);
  __syncthreads();  // the tiles, and the queries and their scales
  // This thread's four rows: m-tile m's rows g and g + 8 (index 2 m + i); their tokens (-1 past
  // the block's rows) and scales are recomputed or reloaded where needed, not held in registers.
  auto row_of = [&](int ri) { return warp_row + 16 * (ri >> 1) + g + 8 * (ri & 1); };
  auto token_of = [&](int ri) { return R0 + row_of(ri) < nq ? (R0 + row_of(ri)) / G : -1; };
  float o[2][16][4] = {}, m_run[4], l_run[4];
  #pragma unroll
  for (int ri = 0; ri < 4; ++ri) m_run[ri] = -INFINITY, l_run[ri] = 0.0f;
  for (int i = 0; i < n_tiles; ++i) {
    const int u = Decoded ? i & 1 : 0;
    const unsigned kt_at = tiles_at + 2 * u * TB, vt_at = kt_at + TB;
    if (i + 1 < n_tiles) {
      if constexpr (Decoded) fill(i + 1, u ^ 1, st);  // into the other buffer, during the products
      else fetch(i + 1, st);
    }
    const bool chunk = i >= n_coded + n_full;
    const int first = i < n_coded ? TILE * i : chunk ? TILE * (i - n_coded - n_full) : TILE * (i - n_coded);
    const int valid = i < n_coded ? attended - first : chunk ? nrows - first : full - first;
    if (warp_active && !(chunk && first > warp_last_token)) {
      // Steps of STEP tokens, each its own online-softmax step.
#pragma unroll 1
      for (int h = 0; h < TILE / STEP; ++h) {
        if (chunk && first + STEP * h > warp_last_token) break;
        float s[2][NJ][4] = {};
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
          unsigned qa[2][4];
#pragma unroll
          for (int m = 0; m < 2; ++m)
            ldmatrix_x4(q_at + prefill_chunk(warp_row + 16 * m + (mi & 1) * 8 + r8, 2 * ks + (mi >> 1)), qa[m], false);
#pragma unroll
          for (int jp = 0; jp < NJ / 2; ++jp) {
            unsigned bk[4];
            ldmatrix_x4(kt_at + prefill_chunk(STEP * h + 8 * (2 * jp + (mi >> 1)) + r8, 2 * ks + (mi & 1)), bk, false);
#pragma unroll
            for (int m = 0; m < 2; ++m) {
              mma_16816(s[m][2 * jp], qa[m], bk[0], bk[1]);
              mma_16816(s[m][2 * jp + 1], qa[m], bk[2], bk[3]);
            }
          }
        }
        // Masks only where a token of the step may not count (warp-uniform): a tile's last
        // tokens, and chunk tokens past the warp's first row (causal). Columns 8 j + (e & 1) of
        // this thread (past STEP h + 2 t4) count while below limit[ri]: the tile's valid tokens
        // and, in the chunk, the row's own position. Scores stay unscaled (the row scale is
        // positive, so it commutes with the maximum) until the exponent's multiply-add.
        float row_scale[4];
#pragma unroll
        for (int ri = 0; ri < 4; ++ri) row_scale[ri] = row_scales[row_of(ri)];
        if (p.logits_soft_cap > 0.0f) {  // soft-capped logits in log2 units (SoftCap); the row scale is then 1
          const SoftCap cap2(p.logits_soft_cap * 1.4426950408889634f);
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int j = 0; j < NJ; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) s[m][j][e] = cap2(s[m][j][e] * row_scale[2 * m + (e >> 1)]);
#pragma unroll
          for (int ri = 0; ri < 4; ++ri) row_scale[ri] = 1.0f;
        }
        if ((chunk && first + STEP * h + STEP - 1 > warp_first_token) || valid - STEP * h < STEP) {
          int limit[4];
#pragma unroll
          for (int ri = 0; ri < 4; ++ri)
            limit[ri] = (chunk ? min(valid, token_of(ri) - first + 1) : valid) - STEP * h - 2 * t4;
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int j = 0; j < NJ; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e)
                if (8 * j + (e & 1) >= limit[2 * m + (e >> 1)]) s[m][j][e] = -INFINITY;
        }
        float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) mx[2 * m + (e >> 1)] = fmaxf(mx[2 * m + (e >> 1)], s[m][j][e]);
        float alpha[4], mb[4];
        bool moved = false;
#pragma unroll
        for (int ri = 0; ri < 4; ++ri) {
          mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 1));
          mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 2));
          const float m_new = fmaxf(m_run[ri], mx[ri] * row_scale[ri]);
          mb[ri] = m_new == -INFINITY ? 0.0f : m_new;
          alpha[ri] = fast_exp2(m_run[ri] - mb[ri]);
          moved |= alpha[ri] != 1.0f;
          m_run[ri] = m_new;
          l_run[ri] *= alpha[ri];
        }
        if (__any_sync(0xffffffffu, moved))  // once the maxima settle: rarely
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int n = 0; n < 16; ++n)
#pragma unroll
              for (int e = 0; e < 4; ++e) o[m][n][e] *= alpha[2 * m + (e >> 1)];
        unsigned pa[2][NJ / 2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            float pr[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              pr[e] = fast_exp2(fmaf(s[m][j][e], row_scale[2 * m + (e >> 1)], -mb[2 * m + (e >> 1)]));
              l_run[2 * m + (e >> 1)] += pr[e];
            }
            pa[m][j / 2][(j & 1) * 2] = pack_half2(pr[0], pr[1]);
            pa[m][j / 2][(j & 1) * 2 + 1] = pack_half2(pr[2], pr[3]);
          }
#pragma unroll
        for (int kk = 0; kk < STEP / 16; ++kk)
#pragma unroll
          for (int n2 = 0; n2 < 8; ++n2) {
            unsigned bv[4];
            ldmatrix_x4(vt_at + prefill_chunk(STEP * h + 16 * kk + (mi & 1) * 8 + r8, 2 * n2 + (mi >> 1)), bv, true);
#pragma unroll
            for (int m = 0; m < 2; ++m) {
              mma_16816(o[m][2 * n2], pa[m][kk], bv[0], bv[1]);
              mma_16816(o[m][2 * n2 + 1], pa[m][kk], bv[2], bv[3]);
            }
          }
      }
    }
    if (i + 1 < n_tiles) {
      if constexpr (Decoded) {
        finish(i + 1, u ^ 1);
        __syncthreads();  // the next tile is in; every warp is done with this one
      } else {
        __syncthreads();  // every warp is done with the tiles
        fill(i + 1, 0, st);
        finish(i + 1, 0);
        __syncthreads();
      }
    }
  }

  // Out: o / l per row, the value scales undone; the log-sum-exp (natural log) when asked.
  #pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    l_run[ri] += __shfl_xor_sync(0xffffffffu, l_run[ri], 1);
    l_run[ri] += __shfl_xor_sync(0xffffffffu, l_run[ri], 2);
  }
  #pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    const int token = token_of(ri);
    if (token < 0) continue;
    const int lr = warp_row + 16 * (ri >> 1) + g + 8 * (ri & 1), head = kvh * G + (R0 + lr) % G, m = ri >> 1;
    const std::size_t r = std::size_t(row0 + token);
    E* out = static_cast<E*>(rows.out) + r * rows.out_stride + std::size_t(head) * D;
    const float inv = l_run[ri] > 0.0f ? 1.0f / l_run[ri] : 0.0f;
    #pragma unroll
    for (int n = 0; n < 16; ++n) {
      const int c = 8 * n + 2 * t4, e = 2 * (ri & 1);
      const float a = o[m][n][e] * inv / sv[c / CV], bb = o[m][n][e + 1] * inv / sv[(c + 1) / CV];
      if constexpr (std::is_same_v<E, __half>) *reinterpret_cast<__half2*>(out + c) = __floats2half2_rn(a, bb);
      else *reinterpret_cast<__nv_bfloat162*>(out + c) = __floats2bfloat162_rn(a, bb);
    }
    if (rows.lse != nullptr && t4 == 0)
      rows.lse[r * rows.q_heads + head] =
          l_run[ri] > 0.0f ? (m_run[ri] + log2f(l_run[ri])) * 0.6931471805599453f : -INFINITY;
  }
}

}  // namespace detail
}  // namespace cq::cuda
