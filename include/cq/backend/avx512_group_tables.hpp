#pragma once
/// The fixed-size parts of a grouped (GQA) item under AVX-512, for groups of 4 or 8 query heads
/// in the lanes (backend/simd_group_attention.hpp): the score table and the final combine. Both
/// are 2^Bits x head_dim multiply-adds per head whatever the context, so at short contexts they
/// are a large share of a grouped decode.
///
/// - Score table: lut[(g, j)][h] = scale * q_h[g] . centroid[g][j]. Built from the transposed
///   codebook with the centroids in the lanes (16 per register) and one accumulator per head,
///   then transposed to heads-in-lanes rows: one 16-wide multiply-add per (head, channel, 16
///   centroids), against one N-wide multiply-add per (channel, centroid) with the heads in the
///   lanes. The sums run over the channels in the same order as the generic build's. Rows past
///   the centroids come out 0 because the transposed codebook is zero-padded (Codebook builds it
///   so); codes never index them.
/// - Combine: out[h][g * 8 + c] += sum_j hist[(g, j)][h] * centroid[g][j][c] for 8-channel
///   groups, as outer products: a register holds two heads x 8 channels, one permute spreads the
///   two heads' weights, so a centroid costs N / 2 multiply-adds of 16 lanes, not 8 of N lanes.

#include "cq/codebook.hpp"
#include "cq/config.hpp"
#include "cq/detail/simd_isa.hpp"

#include <cstddef>

#if CQ_HAVE_AVX512
#include <immintrin.h>

// GCC 12 warns that the `_mm512_undefined_*` operands inside its own shuffle and broadcast
// intrinsics "may be used uninitialized" wherever they are inlined (a false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace cq::backend::avx512_group_tables {

/// Whether `lut` serves N lanes and groups of C channels (`combine`: C == 8 too).
constexpr bool serves(int N) { return N == 4 || N == 8; }
inline bool serves_lut(int N, std::size_t C) { return serves(N) && C <= 64; }

/// lut (groups, padded centroids, N) for `heads` <= N heads (q: heads x dim); lanes past the heads
/// and rows past the centroids are 0.
template <int N>
void lut(const CodebookView& cb, const float* q, std::size_t heads, float scale, float* lut) {
  static_assert(serves(N));
  const std::size_t D = cb.dim(), C = cb.channels, K = cb.padded_centroids;  // K: a multiple of 16
  constexpr std::size_t max_C = 64;  // wider groups take the generic path (see simd_group_attention)
  CQ_ASSERT(C <= max_C);
  alignas(64) float qs[max_C][N];  // the group's scaled queries, qs[c][h]; 0 past the heads
  for (std::size_t g = 0; g < cb.groups; ++g) {
    for (std::size_t c = 0; c < C; ++c)
      for (std::size_t h = 0; h < N; ++h) qs[c][h] = h < heads ? scale * q[h * D + g * C + c] : 0.0f;
    const float* tr = cb.transposed + g * C * K;
    float* row = lut + g * K * N;
    for (std::size_t j = 0; j < K; j += 16) {
      __m512 a[N];
      for (int h = 0; h < N; ++h) a[h] = _mm512_setzero_ps();
      for (std::size_t c = 0; c < C; ++c) {
        const __m512 t = _mm512_loadu_ps(tr + c * K + j);
        for (int h = 0; h < N; ++h) a[h] = _mm512_fmadd_ps(_mm512_set1_ps(qs[c][h]), t, a[h]);
      }
      // a[h] holds centroids j..j+15 of head h. Interleave heads 4k..4k+3: d[4k + m]'s 128-bit
      // lane L holds centroid j + 4L + m for those four heads.
      __m512 d[N];
      for (int k = 0; k < N / 4; ++k) {
        const __m512* s = a + 4 * k;
        const __m512d b0 = _mm512_castps_pd(_mm512_unpacklo_ps(s[0], s[1]));
        const __m512d b1 = _mm512_castps_pd(_mm512_unpackhi_ps(s[0], s[1]));
        const __m512d b2 = _mm512_castps_pd(_mm512_unpacklo_ps(s[2], s[3]));
        const __m512d b3 = _mm512_castps_pd(_mm512_unpackhi_ps(s[2], s[3]));
        d[4 * k + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(b0, b2));
        d[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(b0, b2));
        d[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b1, b3));
        d[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b1, b3));
      }
      float* o = row + j * N;
      if constexpr (N == 4) {  // rows of 4: centroids 4L..4L+3 are d[0..3]'s lane L, side by side
        const __m512 t0 = _mm512_shuffle_f32x4(d[0], d[1], 0x44), t1 = _mm512_shuffle_f32x4(d[2], d[3], 0x44);
        const __m512 t2 = _mm512_shuffle_f32x4(d[0], d[1], 0xEE), t3 = _mm512_shuffle_f32x4(d[2], d[3], 0xEE);
        _mm512_storeu_ps(o, _mm512_shuffle_f32x4(t0, t1, 0x88));
        _mm512_storeu_ps(o + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
        _mm512_storeu_ps(o + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
        _mm512_storeu_ps(o + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
      } else {  // rows of 8: centroid 4L + m is d[m]'s lane L, then d[4 + m]'s
        for (int m = 0; m < 4; ++m) {
          const __m512 lo = _mm512_shuffle_f32x4(d[m], d[4 + m], 0x44);  // d[m].L0 d[m].L1 d[4+m].L0 d[4+m].L1
          const __m512 hi = _mm512_shuffle_f32x4(d[m], d[4 + m], 0xEE);  // the same for lanes 2, 3
          const __m512 r0 = _mm512_shuffle_f32x4(lo, lo, 0xD8), r1 = _mm512_shuffle_f32x4(hi, hi, 0xD8);
          _mm256_storeu_ps(o + m * 8, _mm512_castps512_ps256(r0));
          _mm256_storeu_ps(o + (4 + m) * 8, _mm512_extractf32x8_ps(r0, 1));
          _mm256_storeu_ps(o + (8 + m) * 8, _mm512_castps512_ps256(r1));
          _mm256_storeu_ps(o + (12 + m) * 8, _mm512_extractf32x8_ps(r1, 1));
        }
      }
    }
  }
}

/// out[h * out_stride + g * 8 + c] += sum_j hist[(g * K + j) * N + h] * centroid[g][j][c] for
/// h < heads; 8-channel groups.
template <int N>
void combine(const CodebookView& cb, const float* hist, std::size_t heads, float* out, std::size_t out_stride) {
  static_assert(serves(N));
  constexpr int P = N / 2;  // registers of two heads x 8 channels
  const std::size_t K = cb.padded_centroids, KC = cb.num_centroids();
  __m512i spread[P];  // lanes 0-7 take head 2k's weight, lanes 8-15 head 2k + 1's
  for (int k = 0; k < P; ++k)
    spread[k] = _mm512_inserti32x8(_mm512_set1_epi32(2 * k), _mm256_set1_epi32(2 * k + 1), 1);
  for (std::size_t g = 0; g < cb.groups; ++g) {
    __m512 a[2][P];  // even and odd centroids: two chains per register hide the latency
    for (auto& r : a)
      for (auto& x : r) x = _mm512_setzero_ps();
    const float* cent = cb.centroids + g * KC * 8;
    const float* h = hist + g * K * N;
    auto step = [&](int e, std::size_t j) {
      const __m512 c = _mm512_maskz_broadcast_f32x8(0xFFFF, _mm256_loadu_ps(cent + j * 8));
      __m512 w;
      if constexpr (N == 8) w = _mm512_zextps256_ps512(_mm256_loadu_ps(h + j * N));
      else w = _mm512_zextps128_ps512(_mm_loadu_ps(h + j * N));
      for (int k = 0; k < P; ++k) a[e][k] = _mm512_fmadd_ps(_mm512_permutexvar_ps(spread[k], w), c, a[e][k]);
    };
    std::size_t j = 0;
    for (; j + 2 <= KC; j += 2) step(0, j), step(1, j + 1);
    if (j < KC) step(0, j);
    for (int k = 0; k < P; ++k) {
      alignas(64) float t[16];
      _mm512_store_ps(t, _mm512_add_ps(a[0][k], a[1][k]));
      for (std::size_t half = 0; half < 2; ++half) {
        const std::size_t hd = 2 * k + half;
        if (hd >= heads) continue;
        float* o = out + hd * out_stride + g * 8;
        for (int c = 0; c < 8; ++c) o[c] += t[half * 8 + c];
      }
    }
  }
}

}  // namespace cq::backend::avx512_group_tables

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif
