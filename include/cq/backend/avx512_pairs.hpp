#pragma once
/// Group pairs under AVX-512: with 8-channel groups, the centroids of two neighbouring groups fill
/// one 16-float register. A token's pair is addressed by one 64-bit entry holding both groups'
/// 32-bit centroid offsets (floats from the codebook's start), so reading a coded vector costs one
/// general-register load per 16 channels instead of one per 8. The loops that decode codes
/// (pre-RoPE key scores, the value pass) are short of load slots, and the offset load also starts
/// the dependent chain to the centroid load.

#include "cq/config.hpp"
#include "cq/detail/simd_isa.hpp"
#include "cq/packed_codes.hpp"

#include <cstdint>

#if CQ_HAVE_AVX512
#include <immintrin.h>

namespace cq::backend::avx512_pairs {

inline constexpr std::size_t B = block_tokens;

/// pairs (groups / 2, B): pairs[p * B + t] = off[2p * B + t] | off[(2p + 1) * B + t] << 32, from
/// 32-bit offsets off (groups, B), 64-byte aligned; groups even.
inline void from_offsets(const std::uint32_t* off, std::size_t groups, std::uint64_t* pairs) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (std::size_t p = 0; p < groups / 2; ++p)
    for (std::size_t t = 0; t < B; t += 16) {
      const __m512i a = _mm512_load_si512(off + 2 * p * B + t), b = _mm512_load_si512(off + (2 * p + 1) * B + t);
      std::uint64_t* o = pairs + p * B + t;
      _mm512_store_si512(o, _mm512_permutex2var_epi32(a, lo, b));
      _mm512_store_si512(o + 8, _mm512_permutex2var_epi32(a, hi, b));
    }
}

/// The same from the 8-bit codes of one block: offsets (g * K + code) * 8 for 8-channel groups of
/// K centroids; codes.groups even.
inline void from_codes8(const ConstPackedCodesView& codes, std::size_t block, std::size_t K, std::uint64_t* pairs) {
  alignas(64) std::uint32_t off[2 * B];
  for (std::size_t p = 0; p < codes.groups / 2; ++p) {
    // group_offsets' 8-bit branch, written out: with its unpacking branch inlined here too, GCC
    // spills the permute indices of from_offsets (1/1 32K value pass 241 -> 278 us).
    for (std::size_t k = 0; k < 2; ++k) {
      const std::size_t g = 2 * p + k;
      using Isa = cq::detail::Avx512Isa;
      const __m512i base = Isa::set1i(static_cast<int>(g * K));
      for (std::size_t t = 0; t < B; t += 16)
        Isa::storei(off + k * B + t, Isa::slli<3>(Isa::addi(Isa::load_u8(codes.chunk(block, g) + t), base)));
    }
    from_offsets(off, 2, pairs + p * B);
  }
}

/// The two 8-float centroids of the pair entry *e, as one register (first group low). The entry
/// is loaded into a general register on purpose: GCC otherwise routes it through a vector
/// register, a longer chain to the centroid loads.
CQ_ALWAYS_INLINE __m512 load(const float* cent, const std::uint64_t* e) {
  std::uint64_t x;
  __asm__("movq %1, %0" : "=r"(x) : "m"(*e));
  const __m256 lo = _mm256_loadu_ps(cent + static_cast<std::uint32_t>(x));
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), _mm256_loadu_ps(cent + (x >> 32)), 1);
}

}  // namespace cq::backend::avx512_pairs

#endif
