#pragma once
/// The pre-RoPE key primitives of the SIMD backend (inherited by backend::Simd<Isa>): coded keys
/// decoded, rotated by the step table and dotted with the anchor-rotated queries in registers,
/// never written as rows. Contracts: backend/scalar_attention.hpp.
///
/// Work in 8-channel vectors (AVX2 width, also under AVX-512: a key is only 16 of them). With
/// rotate_half, vector j of the first half pairs element-wise with vector j + r/16 of the second
/// half, so a pair of vectors rotates with one cos and one sin vector:
///   k1' = k1 cos - k2 sin,  k2' = k2 cos + k1 sin;
/// interleaved pairs are neighbouring lanes (one in-lane swap). A vector of channels is one
/// centroid (C = 8), two (4), four (2) or half of one (16). Up to four heads share each rotated
/// key (one head: two tokens share the query loads instead). Scores of 8 tokens are summed
/// horizontally at once (transpose-add). Other shapes (C = 1 or odd, rotary_dim or head_dim not a
/// multiple of 16 / 8, code widths over 16 bits) take the scalar reference. Under AVX-512, keys of
/// 8- and 16-channel groups take the 16-lane kernels of simd_rope_avx512.hpp instead, for any
/// number of heads.

#include "cq/backend/code_offsets.hpp"
#include "cq/backend/scalar_attention.hpp"
#include "cq/backend/simd_rope_avx512.hpp"
#include "cq/codebook.hpp"
#include "cq/config.hpp"
#include "cq/detail/simd_isa.hpp"
#include "cq/packed_codes.hpp"
#include "cq/rope.hpp"

#include <algorithm>
#include <cstdint>

namespace cq::backend {

template <class Isa>
struct SimdRopeOps {
  /// Most heads score_rope_codes serves at once at a cost that grows slower than the heads (see
  /// ScalarAttentionOps::rope_code_heads).
  static std::size_t rope_code_heads(const CodebookView& cb, const RopeSteps& rs) {
#if CQ_HAVE_AVX512
    if constexpr (Isa::width == 16)
      if (fast_shape(cb, rs, rs.period) && detail_rope512::fits(cb, rs)) return max_heads;
#endif
    (void)cb, (void)rs;
    return 4;
  }

  static void score_rope_codes(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, std::size_t n,
                               const RopeSteps& rs, const float* qr, std::size_t heads, float* scores,
                               std::size_t stride) {
#if CQ_HAVE_AVX2 || CQ_HAVE_AVX512
    if (fast_shape(cb, rs, n)) {
      with_offsets(cb, codes, first, [&]<int C>(const std::uint32_t* cd) {
#if CQ_HAVE_AVX512
        if constexpr (Isa::width == 16 && (C == 8 || C == 16))
          if (detail_rope512::fits(cb, rs))
            return detail_rope512::score_rope_codes<C>(cb, cd, n, rs, qr, heads, scores, stride);
#endif
        // Up to four heads share each rotated key; a single head takes two tokens at a time.
        for (std::size_t h = 0; h < heads;) {
          if (heads - h >= 4) score_fixed<C, 4, 1>(cb, cd, n, rs, qr, heads, h, scores, stride), h += 4;
          else if (heads - h >= 2) score_fixed<C, 2, 1>(cb, cd, n, rs, qr, heads, h, scores, stride), h += 2;
          else score_fixed<C, 1, 2>(cb, cd, n, rs, qr, heads, h, scores, stride), h += 1;
        }
      });
      return;
    }
#endif
    ScalarAttentionOps::score_rope_codes(cb, codes, first, n, rs, qr, heads, scores, stride);
  }

  static void rope_rows(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, std::size_t n,
                        const RopeSteps& rs, float* rows) {
#if CQ_HAVE_AVX2 || CQ_HAVE_AVX512
    if (fast_shape(cb, rs, n)) {
      with_offsets(cb, codes, first, [&]<int C>(const std::uint32_t* cd) { rows_fixed<C>(cb, cd, n, rs, rows); });
      return;
    }
#endif
    ScalarAttentionOps::rope_rows(cb, codes, first, n, rs, rows);
  }

#if CQ_HAVE_AVX2 || CQ_HAVE_AVX512
 private:
  static constexpr std::size_t max_heads = std::size_t{1} << 20;  // no limit that matters
  static constexpr std::size_t max_groups = 128;  // a block's code offsets sit on the stack
  static constexpr std::size_t period = Rope::step_period;

  static bool fast_shape(const CodebookView& cb, const RopeSteps& rs, std::size_t n) {
    const std::size_t C = cb.channels, D = cb.dim();
    return (C == 2 || C == 4 || C == 8 || C == 16) && D % 8 == 0 && rs.rotary_dim % 16 == 0 && D == rs.head_dim &&
           rs.period == period && n <= 2 * period &&  cb.groups <= max_groups;
  }

  // Calls f.template operator()<C>(off) with off (groups, 32): the element offset
  // (g * K + code) * C of each code of the block, token `first` first (group_offsets).
  template <class F>
  static void with_offsets(const CodebookView& cb, const ConstPackedCodesView& codes, std::size_t first, F&& f) {
    CQ_ASSERT(first % block_tokens == 0);
    const std::size_t block = first / block_tokens, K = cb.num_centroids();
    alignas(64) std::uint32_t off[max_groups * block_tokens];
    auto run = [&]<int C>() {
      for (std::size_t g = 0; g < cb.groups; ++g) group_offsets<Isa, C>(codes, block, g, K, off + g * block_tokens);
      return f.template operator()<C>(static_cast<const std::uint32_t*>(off));
    };
    switch (cb.channels) {
      case 2: return run.template operator()<2>();
      case 4: return run.template operator()<4>();
      case 8: return run.template operator()<8>();
      default: return run.template operator()<16>();
    }
  }

  // Channels [8j, 8j + 8) of the key whose offsets are off[g * 32] (see with_offsets).
  template <int C>
  static CQ_ALWAYS_INLINE __m256 key_vector(const float* cent, const std::uint32_t* off, std::size_t j) {
    constexpr std::size_t B = block_tokens;
    if constexpr (C == 8) {
      return _mm256_loadu_ps(cent + off[j * B]);
    } else if constexpr (C == 16) {
      return _mm256_loadu_ps(cent + off[(j / 2) * B] + (j % 2) * 8);
    } else if constexpr (C == 4) {
      const std::uint32_t* o = off + 2 * j * B;
      return _mm256_set_m128(_mm_loadu_ps(cent + o[B]), _mm_loadu_ps(cent + o[0]));
    } else {
      const std::uint32_t* o = off + 4 * j * B;
      auto pair = [&](std::size_t k) {
        const double* p = reinterpret_cast<const double*>(cent + o[k * B]);
        const double* q = reinterpret_cast<const double*>(cent + o[(k + 1) * B]);
        return _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(p), q));
      };
      return _mm256_set_m128(pair(2), pair(0));
    }
  }

  // Keeps a loaded vector in a register: GCC otherwise folds its load into every instruction that
  // uses it, loading it again each time, and loads are what these loops are short of.
  static CQ_ALWAYS_INLINE void in_register(__m256& v) { __asm__("" : "+x"(v)); }

  // Heads h0 .. h0 + H - 1 over the n tokens of the block, U tokens at a time (they share the
  // query loads; H * U <= 4 keeps the accumulators and rotated keys in registers).
  template <int C, int H, int U>
  static void score_fixed(const CodebookView& cb, const std::uint32_t* cd, std::size_t n, const RopeSteps& rs,
                          const float* qr, std::size_t heads, std::size_t h0, float* scores, std::size_t stride) {
    static_assert(8 % U == 0 && period % 8 == 0, "cq: tokens per step divide the 8 of a horizontal sum and a period");
    const std::size_t D = cb.dim(), r = rs.rotary_dim;
    const float* cent = cb.centroids;
    const bool half = rs.style == RopeStyle::rotate_half;
    alignas(32) __m256 part[H][8];
    for (std::size_t i0 = 0; i0 < n; i0 += 8) {
      const std::size_t take = std::min<std::size_t>(8, n - i0);
      for (std::size_t u0 = 0; u0 < 8; u0 += U) {
        if (u0 >= take) {  // past the end: zeros for the horizontal sums
          for (int h = 0; h < H; ++h)
            for (int u = 0; u < U; ++u) part[h][u0 + u] = _mm256_setzero_ps();
          continue;
        }
        const std::size_t i = i0 + u0;  // the U tokens share one step period (U divides 8)
        const std::uint32_t* ct[U];
        const float *cs[U], *sn[U], *q[H];
        for (int u = 0; u < U; ++u) {
          ct[u] = cd + i + u;
          cs[u] = rs.cos((i + u) % period);
          sn[u] = rs.sin((i + u) % period);
        }
        for (int h = 0; h < H; ++h) q[h] = qr + ((i / period) * heads + h0 + h) * D;
        __m256 a[H][U], b[H][U];
        for (int h = 0; h < H; ++h)
          for (int u = 0; u < U; ++u) a[h][u] = b[h][u] = _mm256_setzero_ps();
        if (half) {
          const std::size_t hv = r / 16;  // vector pairs
          for (std::size_t j = 0; j < hv; ++j) {
            __m256 r1[U], r2[U];
            for (int u = 0; u < U; ++u) {
              const __m256 k1 = key_vector<C>(cent, ct[u], j), k2 = key_vector<C>(cent, ct[u], j + hv);
              __m256 c = _mm256_loadu_ps(cs[u] + 8 * j), s = _mm256_loadu_ps(sn[u] + 8 * j);  // s: -sin
              in_register(c);
              in_register(s);
              r1[u] = _mm256_fmadd_ps(k2, s, _mm256_mul_ps(k1, c));
              r2[u] = _mm256_fnmadd_ps(k1, s, _mm256_mul_ps(k2, c));
            }
            for (int h = 0; h < H; ++h) {
              __m256 q1 = _mm256_loadu_ps(q[h] + 8 * j), q2 = _mm256_loadu_ps(q[h] + 8 * (j + hv));
              in_register(q1);
              in_register(q2);
              for (int u = 0; u < U; ++u) {
                a[h][u] = _mm256_fmadd_ps(q1, r1[u], a[h][u]);
                b[h][u] = _mm256_fmadd_ps(q2, r2[u], b[h][u]);
              }
            }
          }
        } else {
          for (std::size_t j = 0; j < r / 8; ++j) {
            __m256 rk[U];
            for (int u = 0; u < U; ++u) {
              const __m256 k = key_vector<C>(cent, ct[u], j);
              const __m256 sw = _mm256_permute_ps(k, 0xB1);  // pair partners
              rk[u] = _mm256_fmadd_ps(sw, _mm256_loadu_ps(sn[u] + 8 * j), _mm256_mul_ps(k, _mm256_loadu_ps(cs[u] + 8 * j)));
            }
            for (int h = 0; h < H; ++h) {
              __m256 qv = _mm256_loadu_ps(q[h] + 8 * j);
              in_register(qv);
              for (int u = 0; u < U; ++u) {
                if (j % 2) b[h][u] = _mm256_fmadd_ps(qv, rk[u], b[h][u]);
                else a[h][u] = _mm256_fmadd_ps(qv, rk[u], a[h][u]);
              }
            }
          }
        }
        for (std::size_t j = r / 8; j < D / 8; ++j) {  // channels that do not rotate
          __m256 k[U];
          for (int u = 0; u < U; ++u) k[u] = key_vector<C>(cent, ct[u], j);
          for (int h = 0; h < H; ++h) {
            const __m256 qv = _mm256_loadu_ps(q[h] + 8 * j);
            for (int u = 0; u < U; ++u) {
              if (j % 2) b[h][u] = _mm256_fmadd_ps(qv, k[u], b[h][u]);
              else a[h][u] = _mm256_fmadd_ps(qv, k[u], a[h][u]);
            }
          }
        }
        for (int h = 0; h < H; ++h)
          for (int u = 0; u < U; ++u) part[h][u0 + u] = _mm256_add_ps(a[h][u], b[h][u]);
      }
      for (int h = 0; h < H; ++h)
        cq::detail::Avx2Isa::store_first(scores + (h0 + h) * stride + i0, cq::detail::Avx2Isa::reduce_add8(part[h]),
                                         take);
    }
  }

  template <int C>
  static void rows_fixed(const CodebookView& cb, const std::uint32_t* cd, std::size_t n, const RopeSteps& rs, float* rows) {
    const std::size_t D = cb.dim(), r = rs.rotary_dim;
    const float* cent = cb.centroids;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t t = i % period;
      const std::uint32_t* ct = cd + i;
      const float* cs = rs.cos(t);
      const float* sn = rs.sin(t);
      float* row = rows + i * D;
      if (rs.style == RopeStyle::rotate_half) {
        const std::size_t hv = r / 16;
        for (std::size_t j = 0; j < hv; ++j) {
          const __m256 k1 = key_vector<C>(cent, ct, j), k2 = key_vector<C>(cent, ct, j + hv);
          const __m256 c = _mm256_loadu_ps(cs + 8 * j), s = _mm256_loadu_ps(sn + 8 * j);
          _mm256_storeu_ps(row + 8 * j, _mm256_fmadd_ps(k2, s, _mm256_mul_ps(k1, c)));
          _mm256_storeu_ps(row + 8 * (j + hv), _mm256_fnmadd_ps(k1, s, _mm256_mul_ps(k2, c)));
        }
      } else {
        for (std::size_t j = 0; j < r / 8; ++j) {
          const __m256 k = key_vector<C>(cent, ct, j);
          const __m256 sw = _mm256_permute_ps(k, 0xB1);
          _mm256_storeu_ps(row + 8 * j,
                           _mm256_fmadd_ps(sw, _mm256_loadu_ps(sn + 8 * j), _mm256_mul_ps(k, _mm256_loadu_ps(cs + 8 * j))));
        }
      }
      for (std::size_t j = r / 8; j < D / 8; ++j) _mm256_storeu_ps(row + 8 * j, key_vector<C>(cent, ct, j));
    }
  }
#endif
};

}  // namespace cq::backend
