#pragma once
/// CUDA encode and decode, on device memory the caller owns, on the caller's stream.
///
/// encode: one warp per (32-token block, group): each lane finds its token's nearest centroid
/// (direct squared distances, nearest.cuh; centroids of the group in shared memory when they fit), then lanes 0..bits-1
/// each assemble one 32-bit word of the packed chunk. Chunks only partly covered by the token range
/// are read-modified-written, so codes outside the range are kept. decode: one thread per
/// (token, group) gathers the centroid. Both support C in {1, 2, 4, 8, 16, 32} and 1..16 bits.

#include "cq/codebook.hpp"
#include "cq/cuda/channels.cuh"
#include "cq/cuda/codebook.cuh"
#include "cq/cuda/error.cuh"
#include "cq/detail/checked.hpp"
#include "cq/cuda/nearest.cuh"
#include "cq/packed_codes.hpp"
#include "cq/views.hpp"

#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>

namespace cq::cuda {

namespace detail {

inline constexpr int encode_warps = 4;  // warps per block, each on its own 32-token block

template <int C, bool Shared>
__global__ void encode_kernel(DeviceCodebookView cb, const float* __restrict__ x, std::size_t rows, std::size_t stride, std::uint8_t* __restrict__ codes, std::size_t first) {
  extern __shared__ float smem[];
  const unsigned g = blockIdx.y;
  const unsigned K = 1u << cb.bits;
  const float* cents = block_group_centroids<C, Shared>(cb.centroids, g, K, smem);
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::size_t block = (first / 32) + std::size_t(blockIdx.x) * encode_warps + warp;  // 32-token block index
  const std::size_t token = block * 32 + lane;                                             // absolute token
  const bool valid = token >= first && token < first + rows;
  std::uint32_t code = 0;
  if (valid) {
    float xv[C];
    const float* row = x + (token - first) * stride + std::size_t(g) * C;
#pragma unroll
    for (int c = 0; c < C; ++c) xv[c] = row[c];
    code = nearest_centroid<C>(xv, cents, K);
  }
  // Pack: lane w < bits builds 32-bit word w of the chunk from the codes that overlap it.
  const unsigned bits = static_cast<unsigned>(cb.bits);
  const unsigned first_lane = static_cast<unsigned>(first > block * 32 ? first - block * 32 : 0);
  const unsigned end_lane = static_cast<unsigned>(first + rows < block * 32 + 32 ? first + rows - block * 32 : 32);
  const bool any = block * 32 + 32 > first && block * 32 < first + rows;
  if (!any) return;  // uniform across the warp: `block` is per warp
  std::uint32_t* chunk = reinterpret_cast<std::uint32_t*>(codes + (block * cb.groups + g) * 4u * bits);
  // Every lane takes part in the shuffles; lanes below `bits` keep the pieces of their word.
  std::uint32_t word = 0, mask = 0;
  for (unsigned i = 0; i < 32; ++i) {
    const std::uint32_t ci = __shfl_sync(0xFFFFFFFFu, code, i);
    if (lane >= bits) continue;
    const unsigned lo = lane * 32;
    const long long shift = static_cast<long long>(i) * bits - lo;  // position of code i relative to this word
    if (shift >= 32 || shift + bits <= 0) continue;
    const std::uint64_t m = ((std::uint64_t{1} << bits) - 1);
    const std::uint64_t placed_c = shift >= 0 ? (std::uint64_t(ci) & m) << shift : (std::uint64_t(ci) & m) >> (-shift);
    const std::uint64_t placed_m = shift >= 0 ? m << shift : m >> (-shift);
    if (i >= first_lane && i < end_lane) {
      word |= static_cast<std::uint32_t>(placed_c);
      mask |= static_cast<std::uint32_t>(placed_m);
    }
  }
  if (lane < bits && mask != 0) chunk[lane] = mask == 0xFFFFFFFFu ? word : ((chunk[lane] & ~mask) | word);
}

template <int C>
__global__ void decode_kernel(DeviceCodebookView cb, const std::uint8_t* __restrict__ codes, std::size_t tokens,
                              std::size_t first, std::size_t rows, float* __restrict__ out, std::size_t stride) {
  const std::size_t groups = cb.groups;
  const std::size_t K = std::size_t{1} << cb.bits;
  const ConstPackedCodesView v(codes, tokens, groups, cb.bits);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < rows * groups;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t r = i / groups, g = i % groups;
    const std::uint32_t code = v.get(first + r, g);
    const float* c = cb.centroids + (g * K + code) * C;
    float* o = out + r * stride + g * C;
#pragma unroll
    for (int k = 0; k < C; ++k) o[k] = c[k];
  }
}

/// The channel counts the encoder and decoder are instantiated for.
template <class F>
void with_codec_channels(std::size_t C, F&& f) {
  if (!with_channels<1, 2, 4, 8, 16, 32>(C, f))
    cq::detail::fail("CUDA backend: C = ", C, " channels per group is not supported (1, 2, 4, 8, 16 or 32)");
}

}  // namespace detail

/// Encodes rows x (rows, dim; device memory, row stride `stride` floats) into tokens
/// [first, first + rows) of the packed codes at `codes` (device memory, `tokens` tokens).
inline void encode(const DeviceCodebookView& cb, const float* x, std::size_t rows, std::size_t stride,
                   std::uint8_t* codes, std::size_t tokens, std::size_t first, cudaStream_t stream = nullptr) {
  check_code_bits(cb.bits, "cuda::encode: codebook");
  CQ_CHECK(cq::detail::checked_add(first, rows, "cuda::encode: first + rows") <= tokens, "cuda::encode: rows [", first,
           ", ", first + rows, ") exceed ", tokens, " tokens");
  CQ_CHECK(stride >= cb.dim(), "cuda::encode: stride ", stride, " is smaller than dim ", cb.dim());
  packed_code_bytes(tokens, cb.groups, cb.bits);  // the codes' size fits std::size_t
  if (rows == 0) return;
  const std::size_t blocks32 = (first + rows - 1) / 32 - first / 32 + 1;
  const std::size_t grid_x = (blocks32 + detail::encode_warps - 1) / detail::encode_warps;
  const dim3 grid(static_cast<unsigned>(cq::detail::checked_limit(grid_x, INT_MAX, "cuda::encode: grid x (token blocks)")),
                  static_cast<unsigned>(cq::detail::checked_limit(cb.groups, 65535, "cuda::encode: grid y (groups)")));
  const std::size_t K = cb.num_centroids();
  detail::with_codec_channels(cb.channels, [&]<int C>() {
    const std::size_t smem = K * C * sizeof(float);
    if (smem <= 48 * 1024) {
      detail::encode_kernel<C, true><<<grid, 32 * detail::encode_warps, smem, stream>>>(cb, x, rows, stride, codes, first);
    } else {
      detail::encode_kernel<C, false><<<grid, 32 * detail::encode_warps, 0, stream>>>(cb, x, rows, stride, codes, first);
    }
    CQ_CUDA_CHECK_LAUNCH(encode_kernel);
  });
}

/// Decodes tokens [first, first + rows) of packed codes (device) into out (rows, dim; device).
inline void decode(const DeviceCodebookView& cb, const std::uint8_t* codes, std::size_t tokens, std::size_t first,
                   std::size_t rows, float* out, std::size_t stride, cudaStream_t stream = nullptr) {
  check_code_bits(cb.bits, "cuda::decode: codebook");
  CQ_CHECK(cq::detail::checked_add(first, rows, "cuda::decode: first + rows") <= tokens, "cuda::decode: tokens [",
           first, ", ", first + rows, ") exceed ", tokens);
  CQ_CHECK(stride >= cb.dim(), "cuda::decode: stride ", stride, " is smaller than dim ", cb.dim());
  packed_code_bytes(tokens, cb.groups, cb.bits);  // the codes' size fits std::size_t
  if (rows == 0) return;
  const std::size_t work = cq::detail::checked_mul(rows, cb.groups, "cuda::decode: rows x groups");
  const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>(work / 256 + (work % 256 != 0), 65535));
  detail::with_codec_channels(cb.channels, [&]<int C>() {
    detail::decode_kernel<C><<<blocks, 256, 0, stream>>>(cb, codes, tokens, first, rows, out, stride);
    CQ_CUDA_CHECK_LAUNCH(decode_kernel);
  });
}

}  // namespace cq::cuda
