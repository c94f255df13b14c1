#pragma once
/// PackedCodes: CQ codes for n tokens x G groups, bit-packed at exactly `bits` bits (1..16).
///
/// Layout (blocked, group-major inside a block):
///   tokens are cut into blocks of `block_tokens` = 32; block b holds, for each group g, one chunk
///   of 32 codes packed at `bits` bits = 4 * bits bytes:
///     byte offset of chunk (b, g) = (b * groups + g) * 4 * bits
///   so every chunk is byte-aligned for every `bits`, the only padding is the unused tail of the
///   last block, and a SIMD lane (or a GPU warp) reads 32 consecutive tokens of one group at once.

#include "cq/config.hpp"
#include "cq/detail/aligned_buffer.hpp"
#include "cq/detail/bit_packing.hpp"
#include "cq/detail/checked.hpp"
#include "cq/error.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cq {

/// Tokens per block of the packed code layout.
inline constexpr std::size_t block_tokens = detail::chunk_codes;

/// The one check of a code width: every quantizer, container and kernel of cq takes 1..16 bits
/// (codes are read and written as at most 16-bit fields, centroid counts fit 32 bits).
constexpr void check_code_bits(int bits, const char* what) {
  CQ_CHECK(bits >= 1 && bits <= 16, what, ": bits must be in 1..16, got ", bits);
}

/// Bytes needed for `tokens` tokens of `groups` codes at `bits` bits in the blocked layout. On the
/// host, throws cq::Error for bits outside 1..16 or a size that does not fit std::size_t; device
/// code sees only sizes its host side has already checked.
CQ_HOST_DEVICE constexpr std::size_t packed_code_bytes(std::size_t tokens, std::size_t groups, int bits) {
  const std::size_t blocks = tokens / block_tokens + (tokens % block_tokens != 0);
#if defined(__CUDA_ARCH__)
  return blocks * groups * detail::chunk_bytes(bits);
#else
  check_code_bits(bits, "packed_code_bytes");
  return detail::checked_mul(detail::checked_mul(blocks, groups, "packed code bytes (32-token blocks x groups)"),
                             detail::chunk_bytes(bits), "packed code bytes (chunks x bytes per chunk)");
#endif
}

/// A non-owning view of packed codes (see the layout above). Byte is std::uint8_t (mutable) or
/// const std::uint8_t (read-only).
template <class Byte>
struct BasicPackedCodesView {
  static_assert(std::is_same_v<std::remove_const_t<Byte>, std::uint8_t>,
                "cq: a packed code view points at std::uint8_t");
  Byte* data = nullptr;
  std::size_t tokens = 0;
  std::size_t groups = 0;
  int bits = 8;

  constexpr BasicPackedCodesView() = default;
  CQ_HOST_DEVICE constexpr BasicPackedCodesView(Byte* d, std::size_t t, std::size_t g, int b)
      : data(d), tokens(t), groups(g), bits(b) {}
  template <class U>
    requires(std::is_same_v<Byte, const U>)
  CQ_HOST_DEVICE constexpr BasicPackedCodesView(const BasicPackedCodesView<U>& o)  // NOLINT
      : data(o.data), tokens(o.tokens), groups(o.groups), bits(o.bits) {}

  CQ_HOST_DEVICE constexpr std::size_t chunk_bytes() const { return detail::chunk_bytes(bits); }
  CQ_HOST_DEVICE constexpr std::size_t block_bytes() const { return groups * chunk_bytes(); }
  CQ_HOST_DEVICE constexpr std::size_t num_blocks() const { return (tokens + block_tokens - 1) / block_tokens; }
  CQ_HOST_DEVICE constexpr std::size_t size_bytes() const { return packed_code_bytes(tokens, groups, bits); }
  /// The chunk holding the codes of group g for tokens [32 * block, 32 * block + 32).
  CQ_HOST_DEVICE constexpr Byte* chunk(std::size_t block, std::size_t g) const {
    return data + (block * groups + g) * chunk_bytes();
  }
  CQ_HOST_DEVICE std::uint32_t get(std::size_t t, std::size_t g) const {
    CQ_ASSERT(t < tokens && g < groups);
    return detail::read_code(chunk(t / block_tokens, g), static_cast<unsigned>(t % block_tokens), bits);
  }
  CQ_HOST_DEVICE void set(std::size_t t, std::size_t g, std::uint32_t code) const
    requires(!std::is_const_v<Byte>)
  {
    CQ_ASSERT(t < tokens && g < groups && code < (1u << bits));
    detail::write_code(chunk(t / block_tokens, g), static_cast<unsigned>(t % block_tokens), bits, code);
  }
};

using PackedCodesView = BasicPackedCodesView<std::uint8_t>;
using ConstPackedCodesView = BasicPackedCodesView<const std::uint8_t>;

namespace detail {

/// Walks tokens [first, first + n) chunk by chunk: f(i, token, take, whole) for each run of `take`
/// tokens inside one 32-token block, starting at offset i of the range; `whole` when the run is
/// the entire block (the fast pack/unpack paths apply).
template <class F>
void for_each_chunk_run(std::size_t first, std::size_t n, F&& f) {
  std::size_t i = 0;
  while (i < n) {
    const std::size_t t = first + i;
    const std::size_t in_block = t % block_tokens;
    const std::size_t take = std::min(n - i, block_tokens - in_block);
    f(i, t, take, in_block == 0 && take == block_tokens);
    i += take;
  }
}

/// Writes the codes of group g for tokens [first, first + n) (codes[i * code_stride] is token
/// first + i).
inline void store_group_codes(const PackedCodesView& v, std::size_t g, std::size_t first, std::size_t n,
                              const std::uint32_t* codes, std::size_t code_stride = 1) {
  for_each_chunk_run(first, n, [&](std::size_t i, std::size_t t, std::size_t take, bool whole) {
    if (whole) {
      std::uint32_t tmp[chunk_codes];
      for (std::size_t k = 0; k < block_tokens; ++k) tmp[k] = codes[(i + k) * code_stride];
      pack_chunk(tmp, v.bits, v.chunk(t / block_tokens, g));
    } else {
      for (std::size_t k = 0; k < take; ++k) v.set(t + k, g, codes[(i + k) * code_stride]);
    }
  });
}

/// Reads the codes of group g for tokens [first, first + n) into codes[i * code_stride].
inline void load_group_codes(const ConstPackedCodesView& v, std::size_t g, std::size_t first, std::size_t n,
                             std::uint32_t* codes, std::size_t code_stride = 1) {
  for_each_chunk_run(first, n, [&](std::size_t i, std::size_t t, std::size_t take, bool whole) {
    if (whole) {
      std::uint32_t tmp[chunk_codes];
      unpack_chunk(v.chunk(t / block_tokens, g), v.bits, tmp);
      for (std::size_t k = 0; k < block_tokens; ++k) codes[(i + k) * code_stride] = tmp[k];
    } else {
      for (std::size_t k = 0; k < take; ++k) codes[(i + k) * code_stride] = v.get(t + k, g);
    }
  });
}

}  // namespace detail

/// Owns packed codes for a growing sequence of tokens (see the layout at the top of this file).
class PackedCodes {
 public:
  PackedCodes() = default;
  /// `groups` codes per token at `bits` bits each, `tokens` tokens initialised to code 0.
  PackedCodes(std::size_t groups, int bits, std::size_t tokens = 0) : groups_(groups), bits_(bits) {
    check_code_bits(bits, "PackedCodes");
    CQ_CHECK(groups >= 1, "PackedCodes: groups must be >= 1, got ", groups);
    resize(tokens);
  }

  std::size_t size() const { return tokens_; }
  bool empty() const { return tokens_ == 0; }
  std::size_t groups() const { return groups_; }
  int bits() const { return bits_; }
  /// Bytes holding codes (whole blocks, the last one possibly part-filled).
  std::size_t size_bytes() const { return packed_code_bytes(tokens_, groups_, bits_); }
  /// Bytes allocated (what memory accounting reports).
  std::size_t allocated_bytes() const { return bytes_.allocated_bytes(); }
  const std::uint8_t* data() const { return bytes_.data(); }
  std::uint8_t* data() { return bytes_.data(); }

  PackedCodesView view() { return {bytes_.data(), tokens_, groups_, bits_}; }
  ConstPackedCodesView view() const { return {bytes_.data(), tokens_, groups_, bits_}; }

  std::uint32_t get(std::size_t t, std::size_t g) const {
    CQ_CHECK(t < tokens_ && g < groups_, "PackedCodes::get: (token ", t, ", group ", g, ") is outside ",
             tokens_, " x ", groups_);
    return view().get(t, g);
  }
  void set(std::size_t t, std::size_t g, std::uint32_t code) {
    CQ_CHECK(t < tokens_ && g < groups_, "PackedCodes::set: (token ", t, ", group ", g, ") is outside ",
             tokens_, " x ", groups_);
    CQ_CHECK(code < (1u << bits_), "PackedCodes::set: code ", code, " does not fit in ", bits_, " bits");
    view().set(t, g, code);
  }

  /// Ensures room for `tokens` tokens without reallocating; on failure the codes are unchanged.
  void reserve(std::size_t tokens) { bytes_.reserve(packed_code_bytes(tokens, groups_, bits_)); }

  /// Grows (new tokens get code 0) or shrinks to `tokens`. Shrinking clears the dropped codes'
  /// bits so the bytes equal those of a sequence that never held them, and never allocates.
  /// Growing that fails (out of memory) leaves the codes unchanged.
  void resize(std::size_t tokens) {
    if (tokens < tokens_) {
      const std::size_t keep_bytes = packed_code_bytes(tokens, groups_, bits_);
      if (tokens % block_tokens != 0) {
        // Zero the dropped codes of the now-partial last block, chunk by chunk.
        const std::size_t b = tokens / block_tokens;
        for (std::size_t g = 0; g < groups_; ++g)
          for (std::size_t t = tokens; t < std::min(tokens_, (b + 1) * block_tokens); ++t) view().set(t, g, 0);
      }
      bytes_.resize(keep_bytes);
      tokens_ = tokens;
      return;
    }
    bytes_.resize(packed_code_bytes(tokens, groups_, bits_), 0);
    tokens_ = tokens;
  }
  /// Drops every token at index >= tokens (rollback).
  void truncate(std::size_t tokens) {
    CQ_CHECK(tokens <= tokens_, "PackedCodes::truncate: ", tokens, " exceeds size ", tokens_);
    resize(tokens);
  }
  void clear() { resize(0); }

  /// Appends n tokens whose codes are given row-major: codes[t * groups + g]. Every code is checked
  /// against 2^bits before anything is written, so a bad code leaves the container unchanged.
  void append(const std::uint32_t* codes, std::size_t n) {
    if (n == 0) return;  // (codes may be null then)
    CQ_CHECK(codes != nullptr, "PackedCodes::append: codes is null for ", n, " tokens");
    const std::uint32_t limit = 1u << bits_;
    const std::size_t count = detail::checked_mul(n, groups_, "PackedCodes::append: tokens x groups");
    detail::checked_add(tokens_, n, "PackedCodes::append: size + tokens");
    for (std::size_t i = 0; i < count; ++i)
      CQ_CHECK(codes[i] < limit, "PackedCodes::append: code ", codes[i], " at token ", i / groups_,
               ", group ", i % groups_, " does not fit in ", bits_, " bits");
    const std::size_t first = tokens_;
    resize(tokens_ + n);
    for (std::size_t g = 0; g < groups_; ++g)
      detail::store_group_codes(view(), g, first, n, codes + g, groups_);
  }
  /// Copies the codes of tokens [first, first + n) out row-major: codes[t * groups + g].
  void unpack(std::size_t first, std::size_t n, std::uint32_t* codes) const {
    CQ_CHECK(first + n <= tokens_ && first + n >= first, "PackedCodes::unpack: tokens [", first, ", ",
             first + n, ") exceed size ", tokens_);
    if (n == 0) return;
    CQ_CHECK(codes != nullptr, "PackedCodes::unpack: codes is null for ", n, " tokens");
    for (std::size_t g = 0; g < groups_; ++g)
      detail::load_group_codes(view(), g, first, n, codes + g, groups_);
  }

  /// Equal when shapes and every code match (bytes past the last token are always zero).
  friend bool operator==(const PackedCodes& a, const PackedCodes& b) {
    return a.groups_ == b.groups_ && a.bits_ == b.bits_ && a.tokens_ == b.tokens_ &&
           (a.size_bytes() == 0 || std::memcmp(a.data(), b.data(), a.size_bytes()) == 0);
  }

 private:
  // The bytes come first: copy-assignment assigns members in this order, and only the bytes can
  // fail (out of memory, leaving them as they were), so a failed copy changes nothing.
  detail::AlignedBuffer<std::uint8_t> bytes_;
  std::size_t groups_ = 1;
  int bits_ = 8;
  std::size_t tokens_ = 0;
};

}  // namespace cq
