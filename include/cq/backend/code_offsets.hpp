#pragma once
/// Code offsets for the SIMD kernels that read centroids straight from codes (the value pass,
/// pre-RoPE keys): a block's codes of one group turned into element offsets from the codebook's
/// start, so a token's centroid is one base register plus a scaled index.

#include "cq/detail/bit_packing.hpp"
#include "cq/detail/simd_isa.hpp"
#include "cq/packed_codes.hpp"

#include <bit>
#include <cstdint>

#if CQ_HAVE_AVX2 || CQ_HAVE_AVX512

namespace cq::backend {

/// out[t] = (g * K + code of token t of `block` in group g) * C, t < block_tokens, for groups of C
/// channels (a power of two) and K centroids. 8-bit codes are widened, offset and shifted in
/// registers and stored a vector at a time: written as scalars, they would stall the kernels'
/// vector reads of them (no store forwarding from several stores into one load). Other widths are
/// unpacked, then offset in place.
template <class Isa, int C>
CQ_ALWAYS_INLINE void group_offsets(const ConstPackedCodesView& codes, std::size_t block, std::size_t g,
                                    std::size_t K, std::uint32_t* out) {
  static_assert(std::has_single_bit(unsigned(C)), "cq: group widths here are powers of two");
  const std::uint32_t base = static_cast<std::uint32_t>(g * K);
  if (codes.bits == 8) {
    const std::uint8_t* chunk = codes.chunk(block, g);
    const typename Isa::vi vbase = Isa::set1i(static_cast<int>(base));
    constexpr int shift = std::countr_zero(unsigned(C));
    for (std::size_t t = 0; t < block_tokens; t += Isa::width)
      Isa::storei(out + t, Isa::template slli<shift>(Isa::addi(Isa::load_u8(chunk + t), vbase)));
    return;
  }
  cq::detail::unpack_chunk(codes.chunk(block, g), codes.bits, out);
  for (std::size_t t = 0; t < block_tokens; ++t) out[t] = (out[t] + base) * C;
}

}  // namespace cq::backend

#endif
