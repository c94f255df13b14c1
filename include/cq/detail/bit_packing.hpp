#pragma once
/// Bit packing of codes inside one chunk: 32 codes of `bits` bits (1..16) stored as a little-endian
/// bitstream of exactly 4 * bits bytes. Code i occupies bits [i * bits, (i + 1) * bits), bit 0 being
/// the least significant bit of byte 0. Fast paths for 4, 8 and 16 bits.

#include "cq/config.hpp"

#include <cstdint>
#include <cstring>

namespace cq::detail {

inline constexpr unsigned chunk_codes = 32;

CQ_HOST_DEVICE constexpr std::size_t chunk_bytes(int bits) { return 4u * static_cast<unsigned>(bits); }

/// Reads code i (< 32) of a chunk. Touches only the bytes that hold the code.
CQ_HOST_DEVICE inline std::uint32_t read_code(const std::uint8_t* chunk, unsigned i, int bits) {
  switch (bits) {
    case 8: return chunk[i];
    case 4: return (chunk[i >> 1] >> ((i & 1u) * 4u)) & 0xFu;
    case 16: return static_cast<std::uint32_t>(chunk[2 * i]) | (static_cast<std::uint32_t>(chunk[2 * i + 1]) << 8);
    default: break;
  }
  const unsigned bit = i * static_cast<unsigned>(bits);
  const unsigned byte = bit >> 3, shift = bit & 7u;
  const unsigned nbytes = (shift + static_cast<unsigned>(bits) + 7u) >> 3;  // 1..3
  std::uint32_t word = 0;
  for (unsigned b = 0; b < nbytes; ++b) word |= static_cast<std::uint32_t>(chunk[byte + b]) << (8u * b);
  return (word >> shift) & ((1u << bits) - 1u);
}

/// Writes code i (< 32) of a chunk, leaving every other code's bits untouched.
CQ_HOST_DEVICE inline void write_code(std::uint8_t* chunk, unsigned i, int bits, std::uint32_t code) {
  switch (bits) {
    case 8: chunk[i] = static_cast<std::uint8_t>(code); return;
    case 4: {
      const unsigned s = (i & 1u) * 4u;
      chunk[i >> 1] = static_cast<std::uint8_t>((chunk[i >> 1] & ~(0xFu << s)) | ((code & 0xFu) << s));
      return;
    }
    case 16:
      chunk[2 * i] = static_cast<std::uint8_t>(code);
      chunk[2 * i + 1] = static_cast<std::uint8_t>(code >> 8);
      return;
    default: break;
  }
  const unsigned bit = i * static_cast<unsigned>(bits);
  const unsigned byte = bit >> 3, shift = bit & 7u;
  const unsigned nbytes = (shift + static_cast<unsigned>(bits) + 7u) >> 3;
  const std::uint32_t mask = ((1u << bits) - 1u) << shift;
  std::uint32_t word = 0;
  for (unsigned b = 0; b < nbytes; ++b) word |= static_cast<std::uint32_t>(chunk[byte + b]) << (8u * b);
  word = (word & ~mask) | ((code << shift) & mask);
  for (unsigned b = 0; b < nbytes; ++b) chunk[byte + b] = static_cast<std::uint8_t>(word >> (8u * b));
}

/// Packs 32 codes into a chunk (overwrites all 4 * bits bytes).
inline void pack_chunk(const std::uint32_t* CQ_RESTRICT codes, int bits, std::uint8_t* CQ_RESTRICT chunk) {
  if (bits == 8) {
    for (unsigned i = 0; i < chunk_codes; ++i) chunk[i] = static_cast<std::uint8_t>(codes[i]);
    return;
  }
  if (bits == 4) {
    for (unsigned i = 0; i < chunk_codes / 2; ++i)
      chunk[i] = static_cast<std::uint8_t>((codes[2 * i] & 0xFu) | ((codes[2 * i + 1] & 0xFu) << 4));
    return;
  }
  if (bits == 16) {
    for (unsigned i = 0; i < chunk_codes; ++i) {
      chunk[2 * i] = static_cast<std::uint8_t>(codes[i]);
      chunk[2 * i + 1] = static_cast<std::uint8_t>(codes[i] >> 8);
    }
    return;
  }
  const std::uint64_t mask = (1ull << bits) - 1ull;
  std::uint64_t acc = 0;
  unsigned filled = 0, out = 0;
  for (unsigned i = 0; i < chunk_codes; ++i) {
    acc |= (codes[i] & mask) << filled;
    filled += static_cast<unsigned>(bits);
    while (filled >= 8) {
      chunk[out++] = static_cast<std::uint8_t>(acc);
      acc >>= 8;
      filled -= 8;
    }
  }
}

/// Unpacks all 32 codes of a chunk.
inline void unpack_chunk(const std::uint8_t* CQ_RESTRICT chunk, int bits, std::uint32_t* CQ_RESTRICT codes) {
  if (bits == 8) {
    for (unsigned i = 0; i < chunk_codes; ++i) codes[i] = chunk[i];
    return;
  }
  if (bits == 4) {
    for (unsigned i = 0; i < chunk_codes / 2; ++i) {
      codes[2 * i] = chunk[i] & 0xFu;
      codes[2 * i + 1] = chunk[i] >> 4;
    }
    return;
  }
  if (bits == 16) {
    for (unsigned i = 0; i < chunk_codes; ++i)
      codes[i] = static_cast<std::uint32_t>(chunk[2 * i]) | (static_cast<std::uint32_t>(chunk[2 * i + 1]) << 8);
    return;
  }
  const std::uint32_t mask = (1u << bits) - 1u;
  std::uint64_t acc = 0;
  unsigned avail = 0, in = 0;
  for (unsigned i = 0; i < chunk_codes; ++i) {
    while (avail < static_cast<unsigned>(bits)) {
      acc |= static_cast<std::uint64_t>(chunk[in++]) << avail;
      avail += 8;
    }
    codes[i] = static_cast<std::uint32_t>(acc) & mask;
    acc >>= bits;
    avail -= static_cast<unsigned>(bits);
  }
}

}  // namespace cq::detail
