#pragma once
/// The AVX-512 pre-RoPE key scores (used by backend::Simd<Avx512Isa> through SimdRopeOps): keys of
/// 8- or 16-channel groups decoded sixteen channels to a register, rotated, and dotted with the
/// anchor-rotated queries. Contract: ScalarAttentionOps::score_rope_codes.
///
/// Why it is shaped so: a coded key is a chain of dependent loads (code offset, then centroid),
/// and these loops are short of load slots, not arithmetic. So
/// - with C = 8 a 16-channel register is a group pair's two centroids (avx512_pairs);
/// - one query head keeps its query in registers and scores each key where it is decoded;
/// - two or more heads rotate four keys into rows (in L1) and score them in register tiles of
///   (up to 4 heads) x (4 tokens), so each query vector loaded serves four tokens and each key
///   vector up to four heads — a key decoded once for the whole GQA group;
/// - the common head sizes (64 and 128, fully rotary) are compile-time, so the loops unroll and
///   a head's query stays in registers.
/// Other shapes (C = 2 or 4, head_dim over 512, rotary_dim not a multiple of 32 with rotate_half
/// or of 16 interleaved) take the 8-lane kernels of simd_rope_attention.hpp.

#include "cq/backend/avx512_pairs.hpp"
#include "cq/codebook.hpp"
#include "cq/config.hpp"
#include "cq/detail/simd_isa.hpp"
#include "cq/packed_codes.hpp"
#include "cq/rope.hpp"

#include <algorithm>
#include <cstdint>

#if CQ_HAVE_AVX512
#include <immintrin.h>

namespace cq::backend::detail_rope512 {

inline constexpr std::size_t B = block_tokens;
inline constexpr std::size_t period = Rope::step_period;
inline constexpr std::size_t max_dim = 512;  // the rows of a 4-token chunk sit on the stack

/// Whether the kernels below take this shape (with 32-bit offsets as SimdRopeOps computes them).
inline bool fits(const CodebookView& cb, const RopeSteps& rs) {
  const std::size_t C = cb.channels, D = cb.dim(), r = rs.rotary_dim;
  const bool rot = rs.style == RopeStyle::rotate_half ? r % 32 == 0 : r % 16 == 0;
  return (C == 8 || C == 16) && D % 16 == 0 && D <= max_dim && rot;
}

// Keeps a value in a register: GCC otherwise folds a reused load into each instruction that uses
// it, and loads are what these loops are short of.
CQ_ALWAYS_INLINE void in_register(__m512& v) { __asm__("" : "+v"(v)); }

// Channels [16J, 16J + 16) of one token's key. C = 8: e[J * B] is the entry of groups 2J and
// 2J + 1 (avx512_pairs); C = 16: the u32 e[J * B] is group J's offset, loaded into a general
// register for the same reason as the pairs'.
template <int C>
CQ_ALWAYS_INLINE __m512 key(const float* cent, const void* e, std::size_t J) {
  if constexpr (C == 16) {
    std::uint32_t x;
    __asm__("movl %1, %0" : "=r"(x) : "m"(static_cast<const std::uint32_t*>(e)[J * B]));
    return _mm512_loadu_ps(cent + x);
  } else {
    return avx512_pairs::load(cent, static_cast<const std::uint64_t*>(e) + J * B);
  }
}

// The head shape, compile-time when D > 0 (D channels, R of them rotating), else from the call.
template <std::size_t D, std::size_t R>
struct Dims {
  static constexpr std::size_t fixed = D;  // 0: from the call
  std::size_t dim, rotary;
  constexpr std::size_t d() const { return D ? D : dim; }
  constexpr std::size_t r() const { return D ? R : rotary; }
};

// Calls f(Dims<D, R>) with the compile-time form for the common head sizes.
template <class F>
void with_dims(std::size_t dim, std::size_t rotary, F&& f) {
  if (dim == 128 && rotary == 128) return f(Dims<128, 128>{dim, rotary});
  if (dim == 64 && rotary == 64) return f(Dims<64, 64>{dim, rotary});
  f(Dims<0, 0>{dim, rotary});
}

// A token's key (entries e) rotated by R(t): each of its D / 16 vectors passed once to out(J, v).
template <int C, class Dm, class Out>
CQ_ALWAYS_INLINE void rotated_key(const float* cent, const void* e, const RopeSteps& rs, std::size_t t, Dm dm,
                                  Out&& out) {
  const std::size_t V = dm.d() / 16, r = dm.r();
  const float* cs = rs.cos(t);
  const float* sn = rs.sin(t);  // signed: -sin on a pair's first channel
  if (rs.style == RopeStyle::rotate_half) {
    // Vector j of the first half pairs element-wise with vector j + r / 32.
    const std::size_t hv = r / 32;
    for (std::size_t j = 0; j < hv; ++j) {
      const __m512 k1 = key<C>(cent, e, j), k2 = key<C>(cent, e, j + hv);
      __m512 c = _mm512_loadu_ps(cs + 16 * j), s = _mm512_loadu_ps(sn + 16 * j);
      in_register(c);
      in_register(s);
      out(j, _mm512_fmadd_ps(k2, s, _mm512_mul_ps(k1, c)));
      out(j + hv, _mm512_fnmadd_ps(k1, s, _mm512_mul_ps(k2, c)));
    }
  } else {
    // Pair partners are neighbouring lanes.
    for (std::size_t j = 0; j < r / 16; ++j) {
      const __m512 k = key<C>(cent, e, j);
      const __m512 sw = _mm512_mask_permute_ps(k, 0xFFFF, k, 0xB1);
      out(j, _mm512_fmadd_ps(sw, _mm512_loadu_ps(sn + 16 * j), _mm512_mul_ps(k, _mm512_loadu_ps(cs + 16 * j))));
    }
  }
  for (std::size_t j = r / 16; j < V; ++j) out(j, key<C>(cent, e, j));
}

// The sum of a's two halves. (The masked forms with an explicit source on purpose: GCC 12's unmasked
// extract and permute trip -Wmaybe-uninitialized on their internal _mm*_undefined_*().)
CQ_ALWAYS_INLINE __m256 fold(__m512 a) {
  const __m512d d = _mm512_castps_pd(a);
  const __m256d lo = _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, d, 0);
  const __m256d hi = _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, d, 1);
  return _mm256_add_ps(_mm256_castpd_ps(lo), _mm256_castpd_ps(hi));
}

// The 4 horizontal sums of a..d.
CQ_ALWAYS_INLINE __m128 sums4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// One head: the query of each 8-token slice (one anchor) in registers when the shape is
// compile-time, each key scored where it is decoded.
template <int C, class Dm>
void score_one_head(const float* cent, const void* e, std::size_t esize, std::size_t n, const RopeSteps& rs,
                    const float* qr, float* scores, Dm dm) {
  static_assert(period % 8 == 0, "cq: an 8-token slice lies in one step period");
  constexpr std::size_t VQ = Dm::fixed ? Dm::fixed / 16 : 1;  // query vectors held in registers
  const std::size_t D = dm.d();
  alignas(32) __m256 part[8];
  for (std::size_t i0 = 0; i0 < n; i0 += 8) {
    const std::size_t take = std::min<std::size_t>(8, n - i0);
    const float* q = qr + (i0 / period) * D;
    __m512 qv[VQ];
    if constexpr (Dm::fixed != 0)
      for (std::size_t j = 0; j < VQ; ++j) qv[j] = _mm512_loadu_ps(q + 16 * j), in_register(qv[j]);
    for (std::size_t u = 0; u < 8; ++u) {
      if (u >= take) {
        part[u] = _mm256_setzero_ps();
        continue;
      }
      const std::size_t i = i0 + u;
      __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();  // two chains: half the latency
      rotated_key<C>(cent, static_cast<const char*>(e) + i * esize, rs, i % period, dm, [&](std::size_t j, __m512 k) {
        __m512 qj;
        if constexpr (Dm::fixed != 0) qj = qv[j];
        else qj = _mm512_loadu_ps(q + 16 * j);
        if (j % 2) b = _mm512_fmadd_ps(qj, k, b);
        else a = _mm512_fmadd_ps(qj, k, a);
      });
      part[u] = fold(_mm512_add_ps(a, b));
    }
    cq::detail::Avx2Isa::store_first(scores + i0, cq::detail::Avx2Isa::reduce_add8(part), take);
  }
}

// Heads h0 .. h0 + HB - 1 against the 4 rotated keys in rows (4, D), anchor a; writes `take` scores
// per head at scores[h * stride].
template <int HB, class Dm>
CQ_ALWAYS_INLINE void score_tile(const float* rows, const float* qa, std::size_t h0, std::size_t take, float* scores,
                                 std::size_t stride, Dm dm) {
  const std::size_t D = dm.d();
  __m512 acc[HB][4];
  for (int h = 0; h < HB; ++h)
    for (int u = 0; u < 4; ++u) acc[h][u] = _mm512_setzero_ps();
  for (std::size_t j = 0; j < D / 16; ++j) {
    __m512 k[4];
    for (int u = 0; u < 4; ++u) k[u] = _mm512_load_ps(rows + u * D + 16 * j), in_register(k[u]);
    for (int h = 0; h < HB; ++h) {
      __m512 qv = _mm512_loadu_ps(qa + (h0 + h) * D + 16 * j);
      in_register(qv);
      for (int u = 0; u < 4; ++u) acc[h][u] = _mm512_fmadd_ps(qv, k[u], acc[h][u]);
    }
  }
  for (int h = 0; h < HB; ++h) {
    const __m128 s = sums4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    float* out = scores + (h0 + h) * stride;
    if (take == 4) {
      _mm_storeu_ps(out, s);
    } else {
      alignas(16) float tmp[4];
      _mm_store_ps(tmp, s);
      std::copy_n(tmp, take, out);
    }
  }
}

// Several heads: 4 keys at a time rotated into rows, then scored in tiles of heads.
template <int C, class Dm>
void score_heads(const float* cent, const void* e, std::size_t esize, std::size_t n, const RopeSteps& rs,
                 const float* qr, std::size_t heads, float* scores, std::size_t stride, Dm dm) {
  static_assert(period % 4 == 0, "cq: a 4-token chunk lies in one step period");
  const std::size_t D = dm.d();
  alignas(64) float rows[4 * max_dim];
  for (std::size_t i0 = 0; i0 < n; i0 += 4) {
    const std::size_t take = std::min<std::size_t>(4, n - i0);
    for (std::size_t u = 0; u < take; ++u) {
      const std::size_t i = i0 + u;
      float* row = rows + u * D;
      rotated_key<C>(cent, static_cast<const char*>(e) + i * esize, rs, i % period, dm,
                     [&](std::size_t j, __m512 k) { _mm512_store_ps(row + 16 * j, k); });
    }
    if (take < 4) std::fill(rows + take * D, rows + 4 * D, 0.0f);
    const float* qa = qr + (i0 / period) * heads * D;
    float* out = scores + i0;
    std::size_t h = 0;
    for (; h + 4 <= heads; h += 4) score_tile<4>(rows, qa, h, take, out, stride, dm);
    if (heads - h >= 2) score_tile<2>(rows, qa, h, take, out, stride, dm), h += 2;
    if (h < heads) score_tile<1>(rows, qa, h, take, out, stride, dm);
  }
}

/// Scores of the block whose 32-bit offsets off (groups, B) SimdRopeOps computed (see
/// SimdRopeOps::with_offsets), for fits() shapes.
template <int C>
void score_rope_codes(const CodebookView& cb, const std::uint32_t* off, std::size_t n, const RopeSteps& rs,
                      const float* qr, std::size_t heads, float* scores, std::size_t stride) {
  const void* e = off;
  std::size_t esize = sizeof(std::uint32_t);
  alignas(64) std::uint64_t pairs[(max_dim / 16) * B];
  if constexpr (C == 8) {
    avx512_pairs::from_offsets(off, cb.groups, pairs);
    e = pairs;
    esize = sizeof(std::uint64_t);
  }
  with_dims(cb.dim(), rs.rotary_dim, [&](auto dm) {
    if (heads == 1) score_one_head<C>(cb.centroids, e, esize, n, rs, qr, scores, dm);
    else score_heads<C>(cb.centroids, e, esize, n, rs, qr, heads, scores, stride, dm);
  });
}

}  // namespace cq::backend::detail_rope512

#endif
