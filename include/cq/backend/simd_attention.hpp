#pragma once
/// The attention primitives of the SIMD backend (inherited by backend::Simd<Isa>), written once
/// over the ISA traits. Same contracts as backend/scalar_attention.hpp.
///
/// Score scan: per 32-token block and key group, the codes are widened to 32-bit lanes and the
/// group's table row is gathered (8-bit, 16-bit and generic widths). With AVX-512 the lookup stays
/// in registers, the float analogue of faiss's PQ fast-scan: at 4-bit codes a table row is 16
/// floats, one register, so one permute (vpermps); at 8-bit codes the 256-float row is 16
/// registers, read by eight two-register permutes (vpermt2ps) and a three-level blend on the
/// code's top bits — fewer micro-ops than a 16-lane gather, which issues a load per lane. Value
/// histograms are scalar read-modify-writes ordered token-major so consecutive updates hit
/// different groups.

#include "cq/backend/avx512_pairs.hpp"
#include "cq/backend/code_offsets.hpp"
#include "cq/backend/scalar_attention.hpp"
#include "cq/backend/simd_group_attention.hpp"
#include "cq/backend/simd_rope_attention.hpp"
#include "cq/codebook.hpp"
#include "cq/detail/bit_packing.hpp"
#include "cq/detail/line_prefetch.hpp"
#include "cq/detail/simd_isa.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <limits>

namespace cq::backend {

template <class Isa>
struct SimdAttentionOps : SimdGroupOps<Isa>, SimdRopeOps<Isa> {
  using vf = typename Isa::vf;
  using vi = typename Isa::vi;
  static constexpr int W = Isa::width;
  static constexpr std::size_t B = block_tokens;  // 32
  static constexpr int per_block = static_cast<int>(B) / W;

  static void score_lut(const CodebookView& cb, const float* q, float scale, float* lut, std::size_t stride) {
    const std::size_t P = cb.padded_centroids, C = cb.channels;
    for (std::size_t g = 0; g < cb.groups; ++g) {
      const float* tr = cb.transposed + g * C * P;
      float* out = lut + g * stride;
      std::size_t j = 0;
      for (; j + 4 * W <= P; j += 4 * W) {
        vf a0 = Isa::zero(), a1 = Isa::zero(), a2 = Isa::zero(), a3 = Isa::zero();
        for (std::size_t c = 0; c < C; ++c) {
          const vf qc = Isa::set1(scale * q[g * C + c]);
          const float* col = tr + c * P + j;
          a0 = Isa::fmadd(qc, Isa::load(col), a0);
          a1 = Isa::fmadd(qc, Isa::load(col + W), a1);
          a2 = Isa::fmadd(qc, Isa::load(col + 2 * W), a2);
          a3 = Isa::fmadd(qc, Isa::load(col + 3 * W), a3);
        }
        Isa::store(out + j, a0);
        Isa::store(out + j + W, a1);
        Isa::store(out + j + 2 * W, a2);
        Isa::store(out + j + 3 * W, a3);
      }
      for (; j < P; j += W) {  // P is a multiple of 16 >= W
        vf a = Isa::zero();
        for (std::size_t c = 0; c < C; ++c) a = Isa::fmadd(Isa::set1(scale * q[g * C + c]), Isa::load(tr + c * P + j), a);
        Isa::store(out + j, a);
      }
    }
  }

  static void score_codes(const float* lut, std::size_t stride, ConstPackedCodesView codes, std::size_t first,
                          std::size_t n, float* scores) {
    CQ_ASSERT(first % B == 0);
    alignas(64) float tmp[B];
    for (std::size_t done = 0; done < n; done += B) {
      const std::size_t block = (first + done) / B;
      const std::size_t take = std::min(B, n - done);
      float* dst = take == B ? scores + done : tmp;
      score_block(lut, stride, codes, block, dst);
      if (take < B) std::copy_n(tmp, take, scores + done);
    }
  }

  /// Scores of all 32 tokens of one block (codes past the end of the sequence are zero, i.e.
  /// valid; their scores are discarded by the caller).
  static void score_block(const float* lut, std::size_t stride, const ConstPackedCodesView& codes, std::size_t block,
                          float* out) {
    vf acc[per_block];
    for (auto& a : acc) a = Isa::zero();
    const int bits = codes.bits;
#if CQ_HAVE_AVX512
    if constexpr (W == 16) {
      if (bits == 4) {  // in-register tables: one 16-float row per group
        vf even = Isa::zero(), odd = Isa::zero();
        const __m512i low4 = _mm512_set1_epi32(0xF);
        for (std::size_t g = 0; g < codes.groups; ++g) {
          const vf row = Isa::load(lut + g * stride);
          const vi bytes = Isa::load_u8(codes.chunk(block, g));  // byte i: tokens 2i (low), 2i+1 (high)
          even = Isa::add(even, _mm512_maskz_permutexvar_ps(0xFFFF, _mm512_and_si512(bytes, low4), row));
          odd = Isa::add(odd, _mm512_maskz_permutexvar_ps(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, bytes, 4), row));
        }
        const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        Isa::store(out, _mm512_permutex2var_ps(even, lo_idx, odd));
        Isa::store(out + 16, _mm512_permutex2var_ps(even, hi_idx, odd));
        return;
      }
      if (bits == 8 && stride >= 256) {  // a 256-float row in 16 registers: 8 two-register permutes, a 3-level blend
        const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64), bit7 = _mm512_set1_epi32(128);
        for (std::size_t g = 0; g < codes.groups; ++g) {
          const float* row = lut + g * stride;
          vf t[16];
          for (int r = 0; r < 16; ++r) t[r] = Isa::load(row + 16 * r);
          const std::uint8_t* chunk = codes.chunk(block, g);
          for (int k = 0; k < per_block; ++k) {
            const vi idx = Isa::load_u8(chunk + k * W);
            const __mmask16 m5 = _mm512_test_epi32_mask(idx, bit5), m6 = _mm512_test_epi32_mask(idx, bit6),
                            m7 = _mm512_test_epi32_mask(idx, bit7);
            vf p[8];  // p[j]: entry (32 j + idx % 32)
            for (int j = 0; j < 8; ++j) p[j] = _mm512_permutex2var_ps(t[2 * j], idx, t[2 * j + 1]);
            for (int j = 0; j < 4; ++j) p[j] = _mm512_mask_blend_ps(m5, p[2 * j], p[2 * j + 1]);
            for (int j = 0; j < 2; ++j) p[j] = _mm512_mask_blend_ps(m6, p[2 * j], p[2 * j + 1]);
            acc[k] = Isa::add(acc[k], _mm512_mask_blend_ps(m7, p[0], p[1]));
          }
        }
        for (int k = 0; k < per_block; ++k) Isa::store(out + k * W, acc[k]);
        return;
      }
    }
#endif
    if (bits == 8) {
      for (std::size_t g = 0; g < codes.groups; ++g) {
        const std::uint8_t* chunk = codes.chunk(block, g);
        const float* row = lut + g * stride;
        for (int k = 0; k < per_block; ++k) acc[k] = Isa::add(acc[k], Isa::gather(row, Isa::load_u8(chunk + k * W)));
      }
    } else if (bits == 16) {
      for (std::size_t g = 0; g < codes.groups; ++g) {
        const std::uint8_t* chunk = codes.chunk(block, g);
        const float* row = lut + g * stride;
        for (int k = 0; k < per_block; ++k)
          acc[k] = Isa::add(acc[k], Isa::gather(row, Isa::load_u16(chunk + 2 * k * W)));
      }
    } else {
      alignas(64) std::uint32_t idx[B];
      for (std::size_t g = 0; g < codes.groups; ++g) {
        detail::unpack_chunk(codes.chunk(block, g), bits, idx);
        const float* row = lut + g * stride;
        for (int k = 0; k < per_block; ++k) acc[k] = Isa::add(acc[k], Isa::gather(row, Isa::load_u32(idx + k * W)));
      }
    }
    for (int k = 0; k < per_block; ++k) Isa::store(out + k * W, acc[k]);
  }

  static void add_histogram(ConstPackedCodesView codes, std::size_t first, std::size_t n, const float* p, float* hist,
                            std::size_t stride) {
    CQ_ASSERT(first % B == 0);
    const std::size_t G = codes.groups;
    for (std::size_t done = 0; done < n; done += B) {
      const std::size_t block = (first + done) / B;
      const std::size_t take = std::min(B, n - done);
      const float* w = p + done;
      if (codes.bits == 8) {
        // Token-major, group-minor: consecutive updates hit different rows, so they never wait on
        // each other through store forwarding.
        const std::uint8_t* base = codes.chunk(block, 0);
        for (std::size_t t = 0; t < take; ++t) {
          const float wt = w[t];
          for (std::size_t g = 0; g < G; ++g) hist[g * stride + base[g * B + t]] += wt;
        }
        continue;
      }
      // Other widths: unpack up to 64 groups at a time, then the same token-major loop.
      alignas(64) std::uint32_t idx[64][B];
      for (std::size_t g0 = 0; g0 < G; g0 += 64) {
        const std::size_t gn = std::min<std::size_t>(64, G - g0);
        for (std::size_t g = 0; g < gn; ++g) detail::unpack_chunk(codes.chunk(block, g0 + g), codes.bits, idx[g]);
        float* h = hist + g0 * stride;
        for (std::size_t t = 0; t < take; ++t) {
          const float wt = w[t];
          for (std::size_t g = 0; g < gn; ++g) h[g * stride + idx[g][t]] += wt;
        }
      }
    }
  }

  /// Values straight from the centroids: for each 32-token block, `gc` groups at a time keep their
  /// C-wide accumulators in registers while the block's tokens stream through, so every token
  /// costs one C-float load and one fused multiply-add per group, with no memory round trip.
  /// `pf` (optional): lines issued a share per block (detail::LinePrefetch).
  static void accumulate_centroids(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, std::size_t n,
                                   const float* p, float* acc, detail::LinePrefetch* pf = nullptr) {
    switch (cb.channels) {
      case 1: accumulate_fixed<1>(cb, codes, first, n, p, acc, pf); break;
      case 2: accumulate_fixed<2>(cb, codes, first, n, p, acc, pf); break;
      case 4: accumulate_fixed<4>(cb, codes, first, n, p, acc, pf); break;
      case 8: accumulate_fixed<8>(cb, codes, first, n, p, acc, pf); break;
      case 16: accumulate_fixed<16>(cb, codes, first, n, p, acc, pf); break;
      default: ScalarAttentionOps::accumulate_centroids(cb, codes, first, n, p, acc); break;
    }
    if (pf) pf->finish();
  }

  /// Measured on AVX-512 (bench/RESULTS.md): the register-resident centroid accumulation beats
  /// scalar histogram updates for every group width, so the histogram is never preferred here.
  static bool prefers_value_histogram(const CodebookView&) { return false; }

  template <int C>
  static void accumulate_fixed(const CodebookView& cb, const ConstPackedCodesView& codes, std::size_t first, std::size_t n,
                               const float* p, float* acc, detail::LinePrefetch* pf) {
    CQ_ASSERT(first % B == 0);
#if CQ_HAVE_AVX512
    if constexpr (W == 16 && C == 8)
      if (codes.bits == 8 && cb.groups % 2 == 0 && cb.groups <= 2 * max_pairs)
        return accumulate_pairs(cb, codes, first, n, p, acc, pf);
#endif
    constexpr int gc = 8;  // groups per pass: 8 accumulators in flight hide the FMA latency
    const std::size_t G = cb.groups, K = cb.num_centroids();
    alignas(64) std::uint32_t idx[gc][B];
    for (std::size_t done = 0; done < n; done += B) {
      if (pf) pf->step();
      const std::size_t block = (first + done) / B;
      const std::size_t take = std::min(B, n - done);
      const float* w = p + done;
      std::size_t g0 = 0;
      // Codes become element offsets from the codebook's start up front (group_offsets), so the
      // token loop's address is one base register and a scaled index: load offset, load C
      // floats, multiply-add.
      auto offsets = [&](int k, std::size_t g) { group_offsets<Isa, C>(codes, block, g, K, idx[k]); };
      for (; g0 + gc <= G; g0 += gc) {
        for (int k = 0; k < gc; ++k) offsets(k, g0 + k);
        accumulate_pass<C, gc>(cb.centroids, idx, w, take, acc + g0 * C);
      }
      for (; g0 < G; ++g0) {
        offsets(0, g0);
        accumulate_pass<C, 1>(cb.centroids, idx, w, take, acc + g0 * C);
      }
    }
  }

#if CQ_HAVE_AVX512
  static constexpr std::size_t max_pairs = 64;  // a block's pair entries sit on the stack

  // 8-channel groups and 8-bit codes under AVX-512: two groups' centroids per register
  // (avx512_pairs), so a token costs one entry load, two centroid loads and one multiply-add per
  // 16 channels, and 16 groups share each pass over the block's tokens and weights.
  static void accumulate_pairs(const CodebookView& cb, const ConstPackedCodesView& codes, std::size_t first,
                               std::size_t n, const float* p, float* acc, detail::LinePrefetch* pf) {
    const std::size_t P = cb.groups / 2;
    alignas(64) std::uint64_t pairs[max_pairs * B];
    for (std::size_t done = 0; done < n; done += B) {
      if (pf) pf->step();
      avx512_pairs::from_codes8(codes, (first + done) / B, cb.num_centroids(), pairs);
      const std::size_t take = std::min(B, n - done);
      std::size_t q = 0;
      for (; q + 8 <= P; q += 8) pair_pass<8>(cb.centroids, pairs + q * B, p + done, take, acc + 16 * q);
      if (P - q >= 4) pair_pass<4>(cb.centroids, pairs + q * B, p + done, take, acc + 16 * q), q += 4;
      for (; q < P; ++q) pair_pass<1>(cb.centroids, pairs + q * B, p + done, take, acc + 16 * q);
    }
  }

  // NP pairs (entries e[k * B + t]) over `take` tokens of weights w; accumulators in registers.
  template <int NP>
  static CQ_ALWAYS_INLINE void pair_pass(const float* cent, const std::uint64_t* e, const float* w, std::size_t take,
                                         float* acc) {
    __m512 a[NP];
    for (int k = 0; k < NP; ++k) a[k] = _mm512_loadu_ps(acc + 16 * k);
    for (std::size_t t = 0; t < take; ++t) {
      const __m512 wt = _mm512_set1_ps(w[t]);
      for (int k = 0; k < NP; ++k) a[k] = _mm512_fmadd_ps(wt, avx512_pairs::load(cent, e + k * B + t), a[k]);
    }
    for (int k = 0; k < NP; ++k) _mm512_storeu_ps(acc + 16 * k, a[k]);
  }
#endif

  // NG groups over `take` tokens; off[k][t] is the element offset of token t's centroid of the
  // pass's group k from `cents`. Accumulators stay in registers.
  template <int C, int NG>
  static CQ_ALWAYS_INLINE void accumulate_pass(const float* cents, const std::uint32_t (*off)[B], const float* w,
                                               std::size_t take, float* acc) {
    if constexpr (C == 1) {
      float a[NG];
      for (int k = 0; k < NG; ++k) a[k] = acc[k];
      for (std::size_t t = 0; t < take; ++t)
        for (int k = 0; k < NG; ++k) a[k] += w[t] * cents[off[k][t]];
      for (int k = 0; k < NG; ++k) acc[k] = a[k];
    } else {
      using V = typename FloatVec<C>::type;
      static_assert(sizeof(V) == C * sizeof(float), "cq: FloatVec must be C floats wide");
      V a[NG];
      for (int k = 0; k < NG; ++k) std::memcpy(&a[k], acc + k * C, sizeof(V));
      for (std::size_t t = 0; t < take; ++t) {
        V wt;
        for (int c = 0; c < C; ++c) wt[c] = w[t];  // a broadcast (V{} + w[t] would add a zero)
        for (int k = 0; k < NG; ++k) {
          V c;
          std::memcpy(&c, cents + off[k][t], sizeof(V));
          a[k] += wt * c;
        }
      }
      for (int k = 0; k < NG; ++k) std::memcpy(acc + k * C, &a[k], sizeof(V));
    }
  }

  static void combine_centroids(const CodebookView& cb, const float* hist, std::size_t stride, float* out) {
    const std::size_t P = cb.padded_centroids, C = cb.channels;
    for (std::size_t g = 0; g < cb.groups; ++g) {
      const float* h = hist + g * stride;
      for (std::size_t c = 0; c < C; ++c) {
        const float* col = cb.transposed + (g * C + c) * P;
        vf a0 = Isa::zero(), a1 = Isa::zero();
        std::size_t j = 0;
        for (; j + 2 * W <= P; j += 2 * W) {
          a0 = Isa::fmadd(Isa::load(h + j), Isa::load(col + j), a0);
          a1 = Isa::fmadd(Isa::load(h + j + W), Isa::load(col + j + W), a1);
        }
        for (; j < P; j += W) a0 = Isa::fmadd(Isa::load(h + j), Isa::load(col + j), a0);
        out[g * C + c] += Isa::reduce_add(Isa::add(a0, a1));
      }
    }
  }

  static float max_of(const float* x, std::size_t n) {
    std::size_t i = 0;
    float m = -std::numeric_limits<float>::infinity();
    if (n >= static_cast<std::size_t>(W)) {
      vf v = Isa::load(x);
      for (i = W; i + W <= n; i += W) v = Isa::max(v, Isa::load(x + i));
      m = Isa::reduce_max(v);
    }
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
  }

  static float exp_sum(float* x, std::size_t n, float shift) {
    const vf neg = Isa::set1(-shift);
    vf acc = Isa::zero();
    std::size_t i = 0;
    for (; i + W <= n; i += W) {
      const vf e = Isa::exp(Isa::add(Isa::load(x + i), neg));
      Isa::store(x + i, e);
      acc = Isa::add(acc, e);
    }
    float total = Isa::reduce_add(acc);
    if (i < n) {  // the tail through the same polynomial, so every element is computed alike
      alignas(64) float tail[W];
      for (int k = 0; k < W; ++k) tail[k] = i + k < n ? x[i + k] : shift - 1000.0f;
      const vf e = Isa::exp(Isa::add(Isa::load(tail), neg));
      Isa::store(tail, e);
      for (std::size_t k = 0; i + k < n; ++k) total += x[i + k] = tail[k];
    }
    return total;
  }

  /// x[i] = cap * tanh(x[i] / cap) (cap > 0), as cap * sign(x) (1 - e) / (1 + e) with e =
  /// exp(-2 |x| / cap): within a few ulp of cap (the size that matters to a softmax: an absolute
  /// error in a logit is a relative one in its weight). The tail through the same formula.
  static void soft_cap(float* x, std::size_t n, float cap) {
    const vf vcap = Isa::set1(cap), m2 = Isa::set1(-2.0f / cap), one = Isa::set1(1.0f);
    auto cap_vector = [&](vf v) {
      const vf e = Isa::exp(Isa::mul(Isa::abs(v), m2));
      return Isa::with_sign_of(Isa::mul(vcap, Isa::div(Isa::sub(one, e), Isa::add(one, e))), v);
    };
    std::size_t i = 0;
    for (; i + W <= n; i += W) Isa::store(x + i, cap_vector(Isa::load(x + i)));
    if (i < n) {
      alignas(64) float tail[W] = {};
      for (std::size_t k = 0; i + k < n; ++k) tail[k] = x[i + k];
      Isa::store(tail, cap_vector(Isa::load(tail)));
      for (std::size_t k = 0; i + k < n; ++k) x[i + k] = tail[k];
    }
  }

  static void scale(float* x, std::size_t n, float a) {
    const vf va = Isa::set1(a);
    std::size_t i = 0;
    for (; i + W <= n; i += W) Isa::store(x + i, Isa::mul(Isa::load(x + i), va));
    for (; i < n; ++i) x[i] *= a;
  }

  template <element_type T>
  static float dot(const float* a, const T* b, std::size_t n) {
    vf s0 = Isa::zero(), s1 = Isa::zero();
    std::size_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      s0 = Isa::fmadd(Isa::load(a + i), Isa::load(b + i), s0);
      s1 = Isa::fmadd(Isa::load(a + i + W), Isa::load(b + i + W), s1);
    }
    for (; i + W <= n; i += W) s0 = Isa::fmadd(Isa::load(a + i), Isa::load(b + i), s0);
    float s = Isa::reduce_add(Isa::add(s0, s1));
    for (; i < n; ++i) s += a[i] * to_float(b[i]);
    return s;
  }

  template <element_type T>
  static void axpy(float a, const T* x, float* y, std::size_t n) {
    const vf va = Isa::set1(a);
    std::size_t i = 0;
    for (; i + W <= n; i += W) Isa::store(y + i, Isa::fmadd(va, Isa::load(x + i), Isa::load(y + i)));
    for (; i < n; ++i) y[i] += a * to_float(x[i]);
  }
};

}  // namespace cq::backend
