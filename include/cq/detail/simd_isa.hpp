#pragma once
/// Thin ISA traits for the SIMD backend: one struct per instruction set with the handful of
/// operations the kernels need, so each kernel is written once for every width. Only the structs
/// the translation unit is compiled for exist (static dispatch, see config.hpp).

#include "cq/config.hpp"
#include "cq/element.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>

#if CQ_HAVE_AVX2 || CQ_HAVE_AVX512
#include <immintrin.h>
#endif

namespace cq::detail {

#if CQ_HAVE_AVX512
struct Avx512Isa {
  static constexpr const char* name = "avx512";
  static constexpr int width = 16;
  using vf = __m512;
  using vi = __m512i;
  static CQ_ALWAYS_INLINE vf load(const float* p) { return _mm512_loadu_ps(p); }
  static CQ_ALWAYS_INLINE void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static CQ_ALWAYS_INLINE vf set1(float x) { return _mm512_set1_ps(x); }
  static CQ_ALWAYS_INLINE vf zero() { return _mm512_setzero_ps(); }
  static CQ_ALWAYS_INLINE vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
  static CQ_ALWAYS_INLINE vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static CQ_ALWAYS_INLINE vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  // min/max through compare + masked move: GCC 12's _mm512_min_ps/_mm512_max_ps trip
  // -Wmaybe-uninitialized on their internal _mm512_undefined_ps(). NaN in b is never taken.
  static CQ_ALWAYS_INLINE vf max(vf a, vf b) { return _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ), b); }
  static CQ_ALWAYS_INLINE vf min(vf a, vf b) { return _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(b, a, _CMP_LT_OQ), b); }
  // Horizontal reductions by lane shuffles. The masked forms with an explicit source are used on
  // purpose: GCC 12's unmasked ones (and _mm512_reduce_*) trip -Wuninitialized on their
  // internal _mm512_undefined_*().
  template <class Op>
  static CQ_ALWAYS_INLINE vf fold(vf a, Op op) {
    a = op(a, _mm512_mask_shuffle_f32x4(a, 0xFFFF, a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    a = op(a, _mm512_mask_shuffle_f32x4(a, 0xFFFF, a, a, _MM_SHUFFLE(2, 3, 0, 1)));
    a = op(a, _mm512_mask_permute_ps(a, 0xFFFF, a, _MM_SHUFFLE(1, 0, 3, 2)));
    return op(a, _mm512_mask_permute_ps(a, 0xFFFF, a, _MM_SHUFFLE(2, 3, 0, 1)));
  }
  static CQ_ALWAYS_INLINE float reduce_add(vf a) {
    return _mm512_cvtss_f32(fold(a, [](vf x, vf y) { return _mm512_add_ps(x, y); }));
  }
  static CQ_ALWAYS_INLINE float reduce_max(vf a) {
    return _mm512_cvtss_f32(fold(a, [](vf x, vf y) { return max(x, y); }));
  }
  static CQ_ALWAYS_INLINE float reduce_min(vf a) {
    return _mm512_cvtss_f32(fold(a, [](vf x, vf y) { return min(x, y); }));
  }
  static CQ_ALWAYS_INLINE vi iota() {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static CQ_ALWAYS_INLINE vi set1i(int x) { return _mm512_set1_epi32(x); }
  static CQ_ALWAYS_INLINE vi addi(vi a, vi b) { return _mm512_add_epi32(a, b); }
  template <int N>
  static CQ_ALWAYS_INLINE vi slli(vi a) { return _mm512_maskz_slli_epi32(0xFFFF, a, N); }
  static CQ_ALWAYS_INLINE void storei(std::uint32_t* p, vi v) { _mm512_storeu_si512(p, v); }
  /// Lane-wise: where a < minv (ordered, so NaN never wins) take (a, idx).
  static CQ_ALWAYS_INLINE void argmin_update(vf a, vi idx, vf& minv, vi& mini) {
    const __mmask16 m = _mm512_cmp_ps_mask(a, minv, _CMP_LT_OQ);
    minv = _mm512_mask_mov_ps(minv, m, a);
    mini = _mm512_mask_mov_epi32(mini, m, idx);
  }
  /// Index of the smallest lane value; among equal values the smallest index.
  static CQ_ALWAYS_INLINE std::uint32_t argmin_reduce(vf minv, vi mini) {
    const float m = reduce_min(minv);
    unsigned eq = _mm512_cmp_ps_mask(minv, _mm512_set1_ps(m), _CMP_EQ_OQ);
    if (eq == 0) return 0u;  // every lane +inf (or NaN input): code 0
    alignas(64) std::uint32_t idx[16];
    _mm512_store_si512(idx, mini);
    std::uint32_t best = UINT32_MAX;
    for (; eq; eq &= eq - 1) best = std::min(best, idx[__builtin_ctz(eq)]);  // usually one lane
    return best;
  }

  // ---- attention helpers (masked forms: see the note on reductions above) ----
  static CQ_ALWAYS_INLINE vf gather(const float* base, vi idx) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, idx, base, 4);
  }
  /// W consecutive 8-bit codes as 32-bit lanes.
  static CQ_ALWAYS_INLINE vi load_u8(const std::uint8_t* p) {
    return _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  /// W consecutive 16-bit little-endian codes as 32-bit lanes.
  static CQ_ALWAYS_INLINE vi load_u16(const std::uint8_t* p) {
    return _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static CQ_ALWAYS_INLINE vi load_u32(const std::uint32_t* p) { return _mm512_loadu_si512(p); }
  static CQ_ALWAYS_INLINE vf load(const half* p) {
    return _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static CQ_ALWAYS_INLINE vf load(const bfloat16* p) {
    const __m512i w = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, w, 16));
  }
  static CQ_ALWAYS_INLINE vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
  static CQ_ALWAYS_INLINE vf fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
  /// 2^n for integral n in [-126, 127], from the exponent bits (n + 127 sits in the low mantissa
  /// bits of n + 1.5 * 2^23 + 127).
  static CQ_ALWAYS_INLINE vf pow2i(vf n) {
    const __m512i e = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(n, set1(12582912.0f + 127.0f))),
                                       _mm512_set1_epi32(0x4B400000));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, e, 23));
  }
  static CQ_ALWAYS_INLINE vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
  static CQ_ALWAYS_INLINE vf abs(vf a) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  /// t (>= 0) with the sign of s.
  static CQ_ALWAYS_INLINE vf with_sign_of(vf t, vf s) {
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(INT32_MIN));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
  }
  static CQ_ALWAYS_INLINE vf exp(vf x);
};
#endif

#if CQ_HAVE_AVX2
struct Avx2Isa {
  static constexpr const char* name = "avx2";
  static constexpr int width = 8;
  using vf = __m256;
  using vi = __m256i;
  static CQ_ALWAYS_INLINE vf load(const float* p) { return _mm256_loadu_ps(p); }
  static CQ_ALWAYS_INLINE void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static CQ_ALWAYS_INLINE vf set1(float x) { return _mm256_set1_ps(x); }
  static CQ_ALWAYS_INLINE vf zero() { return _mm256_setzero_ps(); }
  static CQ_ALWAYS_INLINE vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
  static CQ_ALWAYS_INLINE vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
  static CQ_ALWAYS_INLINE vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static CQ_ALWAYS_INLINE vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
  /// The 8 horizontal sums of v[0..7], in order (transpose-add).
  static CQ_ALWAYS_INLINE vf reduce_add8(const vf* v) {
    const vf t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const vf t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const vf u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
  /// Stores the first n <= 8 lanes of v at p.
  static CQ_ALWAYS_INLINE void store_first(float* p, vf v, std::size_t n) {
    if (n == 8) return _mm256_storeu_ps(p, v);
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    std::copy_n(tmp, n, p);
  }
  static CQ_ALWAYS_INLINE float reduce_add(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static CQ_ALWAYS_INLINE float reduce_max(vf a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static CQ_ALWAYS_INLINE vi iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static CQ_ALWAYS_INLINE vi set1i(int x) { return _mm256_set1_epi32(x); }
  static CQ_ALWAYS_INLINE vi addi(vi a, vi b) { return _mm256_add_epi32(a, b); }
  template <int N>
  static CQ_ALWAYS_INLINE vi slli(vi a) { return _mm256_slli_epi32(a, N); }
  static CQ_ALWAYS_INLINE void storei(std::uint32_t* p, vi v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  static CQ_ALWAYS_INLINE void argmin_update(vf a, vi idx, vf& minv, vi& mini) {
    const vf m = _mm256_cmp_ps(a, minv, _CMP_LT_OQ);
    minv = _mm256_blendv_ps(minv, a, m);
    mini = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mini), _mm256_castsi256_ps(idx), m));
  }
  static CQ_ALWAYS_INLINE std::uint32_t argmin_reduce(vf minv, vi mini) {
    alignas(32) float v[8];
    alignas(32) std::uint32_t ix[8];
    _mm256_store_ps(v, minv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ix), mini);
    float best = v[0];
    std::uint32_t best_i = ix[0];
    for (int l = 1; l < 8; ++l)
      if (v[l] < best || (v[l] == best && ix[l] < best_i)) {
        best = v[l];
        best_i = ix[l];
      }
    return best_i;
  }

  // ---- attention helpers ----
  static CQ_ALWAYS_INLINE vf gather(const float* base, vi idx) { return _mm256_i32gather_ps(base, idx, 4); }
  static CQ_ALWAYS_INLINE vi load_u8(const std::uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static CQ_ALWAYS_INLINE vi load_u16(const std::uint8_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static CQ_ALWAYS_INLINE vi load_u32(const std::uint32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static CQ_ALWAYS_INLINE vf load(const half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static CQ_ALWAYS_INLINE vf load(const bfloat16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static CQ_ALWAYS_INLINE vf min(vf a, vf b) { return _mm256_min_ps(a, b); }
  static CQ_ALWAYS_INLINE vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
  static CQ_ALWAYS_INLINE vf fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
  static CQ_ALWAYS_INLINE vf pow2i(vf n) {
    const __m256i e = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(n, set1(12582912.0f + 127.0f))),
                                       _mm256_set1_epi32(0x4B400000));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static CQ_ALWAYS_INLINE vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
  static CQ_ALWAYS_INLINE vf abs(vf a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
  /// t (>= 0) with the sign of s.
  static CQ_ALWAYS_INLINE vf with_sign_of(vf t, vf s) {
    return _mm256_or_ps(t, _mm256_and_ps(s, _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN))));
  }
  static CQ_ALWAYS_INLINE vf exp(vf x);
};
#endif

/// exp(x) to ~1 ulp for x in [-87, 88] (clamped there), written once over the ISA traits: round
/// x / ln 2 to n with the 1.5 * 2^23 trick, a degree-6 polynomial on the remainder (Cephes expf),
/// times 2^n.
template <class Isa>
CQ_ALWAYS_INLINE typename Isa::vf simd_exp(typename Isa::vf x) {
  x = Isa::max(x, Isa::set1(-87.0f));
  x = Isa::min(x, Isa::set1(88.0f));
  const auto magic = Isa::set1(12582912.0f);
  const auto n = Isa::sub(Isa::fmadd(x, Isa::set1(1.44269504088896341f), magic), magic);
  auto r = Isa::fnmadd(n, Isa::set1(0.693359375f), x);
  r = Isa::fnmadd(n, Isa::set1(-2.12194440e-4f), r);
  auto p = Isa::set1(1.9875691500e-4f);
  p = Isa::fmadd(p, r, Isa::set1(1.3981999507e-3f));
  p = Isa::fmadd(p, r, Isa::set1(8.3334519073e-3f));
  p = Isa::fmadd(p, r, Isa::set1(4.1665795894e-2f));
  p = Isa::fmadd(p, r, Isa::set1(1.6666665459e-1f));
  p = Isa::fmadd(p, r, Isa::set1(5.0000001201e-1f));
  p = Isa::fmadd(p, Isa::mul(r, r), Isa::add(r, Isa::set1(1.0f)));
  return Isa::mul(p, Isa::pow2i(n));
}

#if CQ_HAVE_AVX512
CQ_ALWAYS_INLINE Avx512Isa::vf Avx512Isa::exp(vf x) { return simd_exp<Avx512Isa>(x); }
#endif
#if CQ_HAVE_AVX2
CQ_ALWAYS_INLINE Avx2Isa::vf Avx2Isa::exp(vf x) { return simd_exp<Avx2Isa>(x); }
#endif

}  // namespace cq::detail
