#pragma once
/// Encoding new K/V rows straight into a paged code pool on the device, in-stream: the step of a
/// decode (one row per sequence) or a prefill chunk (many) that turns the model's new keys and
/// values into CQ codes where attention reads them (attention.cuh, DeviceKVCodes with a page
/// table).
///
/// Where rows go is a slot mapping, as in vLLM's cache writes: row i goes to token slot slots[i]
/// of the pool, i.e. token slots[i] % page_tokens of page slots[i] / page_tokens; a negative slot
/// is padding and writes nothing. The pool has the CPU cache's page layout (cache/layout.hpp,
/// CodePageLayout), so the codes written here equal, byte for byte, those cq::PagedKVCache writes
/// on the host for the same rows (ties between equidistant centroids aside: both take the lowest
/// index of a direct squared distance, in float, nearest.cuh).
///
/// One block per (KV head, group, 128 rows) and side (keys, values): the group's centroids in
/// shared memory, a thread per row searching them, its code written into the packed chunk in place
/// (byte stores for 8-bit codes; 32-bit atomics otherwise, since the rows of a prefill chunk share
/// chunks). The pool's other codes are kept.

#include "cq/cache/layout.hpp"
#include "cq/cuda/codebook.cuh"
#include "cq/cuda/elements.cuh"
#include "cq/cuda/error.cuh"
#include "cq/cuda/nearest.cuh"
#include "cq/cuda/quantizer.cuh"
#include "cq/error.hpp"
#include "cq/packed_codes.hpp"

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

namespace cq::cuda {

/// New K/V rows in device memory: the key (and value) of row i, KV head h at keys + i x row_stride
/// + h x head_stride (elements; [tokens, kv_heads, head_dim] is row_stride = kv_heads x head_dim,
/// head_stride = head_dim; one sequence's [kv_heads, tokens, head_dim] is row_stride = head_dim,
/// head_stride = tokens x head_dim).
template <device_element T>
struct DeviceRows {
  const T* keys = nullptr;
  const T* values = nullptr;
  std::size_t rows = 0, row_stride = 0, head_stride = 0;
};

/// One call's new rows and their slots (encode_into_pages, write_full_rows): slots[i] is where row
/// i goes (each call says in what), negative for padding. All pointers are device memory.
template <device_element T>
struct SlotRows : DeviceRows<T> {
  const std::int64_t* slots = nullptr;  // [rows]
};

/// One call's rows and where their codes go: slots are token slots of the code pool (token
/// slot % page_tokens of page slot / page_tokens).
template <device_element T>
struct PagedEncode : SlotRows<T> {
  const DeviceCodebookView* key_codebooks = nullptr;    // [layout.kv_heads]
  const DeviceCodebookView* value_codebooks = nullptr;  // [layout.kv_heads]
  int head_dim = 0;
  int key_channels = 0, key_bits = 0, value_channels = 0, value_bits = 0;  // every head's codebooks'
  std::uint8_t* pool = nullptr;  // page p at pool + p x layout.page_bytes() (one layer's code pages)
  CodePageLayout layout;         // page_tokens (a multiple of 32), kv_heads, block bytes
  std::size_t pages = 0;         // pages in the pool: slots at or past pages x page_tokens are skipped
};

namespace detail {

/// Threads per block of encode_pages_kernel: 128 rows of one thread, or 64 rows of 8 (a block
/// stages its group's centroids once for as many rows either way: fewer rows per block would
/// multiply the staging, which then costs more than the searches).
template <int Lanes>
inline constexpr int encode_pages_threads = Lanes == 1 ? 128 : 64 * Lanes;
/// Blocks of one-thread searches per multiprocessor up to which each row's search is shared by 8
/// threads instead: a decode step over few (group, head) pairs fills the device only so, and one
/// thread's serial scan of 256 centroids is then the whole time; past it (many heads, or many
/// rows) the blocks fill the device already and 8x the threads only add scheduling.
inline constexpr std::size_t encode_pages_shared_search_blocks_per_sm = 4;

/// Writes a `bits`-bit code at position i (< 32) of a packed chunk (packed_codes.hpp: code i at bit
/// i x bits of the chunk's little-endian bit stream), leaving the other codes' bits as they are
/// even while other threads write theirs.
__device__ inline void write_code_atomic(std::uint8_t* chunk, unsigned i, int bits, std::uint32_t code) {
  if (bits == 8) {
    chunk[i] = static_cast<std::uint8_t>(code);
    return;
  }
  auto* words = reinterpret_cast<unsigned*>(chunk);
  const unsigned bit = i * unsigned(bits), w = bit / 32, s = bit % 32;
  const unsigned long long mask = ((1ull << bits) - 1) << s, placed = static_cast<unsigned long long>(code) << s;
  atomicAnd(words + w, ~unsigned(mask));
  atomicOr(words + w, unsigned(placed));
  if (s + unsigned(bits) > 32) {  // the code straddles into the next word
    atomicAnd(words + w + 1, ~unsigned(mask >> 32));
    atomicOr(words + w + 1, unsigned(placed >> 32));
  }
}

/// Group blockIdx.y of a block's rows from blockIdx.x x rows per block on, each row's search shared
/// by Lanes threads (nearest_centroid_lanes): of side `side` (0: keys, 1: values) of KV head
/// blockIdx.z, or with side 2 (both sides in one launch: same channels and bits) of side
/// blockIdx.z / kv_heads, KV head blockIdx.z % kv_heads.
template <int C, bool Shared, int Lanes, device_element T>
__global__ void __launch_bounds__(encode_pages_threads<Lanes>) encode_pages_kernel(PagedEncode<T> p, int side) {
  extern __shared__ float smem[];
  const int heads = int(p.layout.kv_heads), g = int(blockIdx.y);
  const int values = side == 2 ? int(blockIdx.z) / heads : side, h = side == 2 ? int(blockIdx.z) % heads : int(blockIdx.z);
  const DeviceCodebookView cb = values ? p.value_codebooks[h] : p.key_codebooks[h];
  const unsigned K = 1u << cb.bits;
  const float* cents = block_group_centroids<C, Shared>(cb.centroids, unsigned(g), K, smem);
  const std::size_t first_row = std::size_t(blockIdx.x) * (encode_pages_threads<Lanes> / Lanes);
  const std::size_t row = first_row + threadIdx.x / Lanes;
  // A warp wholly past the rows leaves (no shuffle waits for it); so does a one-lane row that
  // writes nothing. Other rows that write nothing search (zeros) with their warp: its shuffles
  // need every lane.
  if (first_row + threadIdx.x / 32 * (32 / Lanes) >= p.rows) return;
  const std::size_t P = p.layout.page_tokens;
  const std::int64_t slot = row < p.rows ? p.slots[row] : -1;
  const bool write = slot >= 0 && std::size_t(slot) < p.pages * P;
  if (Lanes == 1 && !write) return;
  float xv[C] = {};
  if (write) {
    const T* x = (values ? p.values : p.keys) + row * p.row_stride + std::size_t(h) * p.head_stride + std::size_t(g) * C;
#pragma unroll
    for (int c = 0; c < C; ++c) xv[c] = element_to_float(x[c]);
  }
  const unsigned code = nearest_centroid_lanes<C, Lanes>(xv, cents, K);
  if (!write || threadIdx.x % Lanes != 0) return;
  const std::size_t page = std::size_t(slot) / P, t = std::size_t(slot) % P;
  const std::size_t run = values ? p.layout.value_offset(std::size_t(h)) : p.layout.key_offset(std::size_t(h));
  const PackedCodesView codes(p.pool + page * p.layout.page_bytes() + run, P, cb.groups, cb.bits);
  write_code_atomic(codes.chunk(t / block_tokens, std::size_t(g)), unsigned(t % block_tokens), cb.bits, code);
}

}  // namespace detail

/// Encodes p.rows new key and value rows into the code pool, on `stream`: no allocation, no host
/// synchronization (graph-capturable). Throws cq::Error, launching nothing, when the shapes
/// disagree: head_dim not channels x groups of the codebooks' configuration, unsupported channels
/// (1, 2, 4, 8, 16, 32) or bits (1..16), a layout whose page_tokens is not a positive multiple of
/// 32, without heads, or whose block bytes do not match the codebooks, or a grid
/// too large. The device codebook views must have the configuration the call states (not checked:
/// they are device memory).
template <device_element T>
void encode_into_pages(const PagedEncode<T>& p, cudaStream_t stream = nullptr) {
  const auto& L = p.layout;
  CQ_CHECK(L.kv_heads > 0 && p.head_dim > 0, "cuda::encode_into_pages: ", L.kv_heads, " KV heads of head_dim ",
           p.head_dim);
  CQ_CHECK(L.page_tokens > 0 && L.page_tokens % block_tokens == 0, "cuda::encode_into_pages: page_tokens ",
           L.page_tokens, " is not a positive multiple of ", block_tokens);
  CQ_CHECK(L.kv_heads <= 32767, "cuda::encode_into_pages: ", L.kv_heads, " KV heads exceed the grid's 32767 (x 2 sides)");
  auto check_side = [&](int channels, int bits, std::size_t block_bytes, const char* what) {
    check_code_bits(bits, "cuda::encode_into_pages: codebook");
    CQ_CHECK(channels > 0 && p.head_dim % channels == 0, "cuda::encode_into_pages: ", what, ": head_dim ", p.head_dim,
             " is not a multiple of ", channels, " channels");
    const std::size_t groups = std::size_t(p.head_dim / channels);
    CQ_CHECK(block_bytes == packed_code_bytes(block_tokens, groups, bits), "cuda::encode_into_pages: ", what,
             ": the layout's block bytes ", block_bytes, " are not those of ", groups, " groups of ", bits, "-bit codes");
  };
  check_side(p.key_channels, p.key_bits, L.key_block_bytes, "keys");
  check_side(p.value_channels, p.value_bits, L.value_block_bytes, "values");
  if (p.rows == 0) return;
  int device = 0, sms = 0;
  CQ_CUDA_CHECK(cudaGetDevice(&device));
  CQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  auto launch = [&](int channels, int bits, int side) {
    // Each row's search by 8 threads when one-thread searches would leave the device idle and the
    // codebook is large (the scan is the latency), else by one.
    const std::size_t one_lane_blocks = (p.rows + detail::encode_pages_threads<1> - 1) / detail::encode_pages_threads<1> *
                                        std::size_t(p.head_dim / channels) * L.kv_heads * (side == 2 ? 2 : 1);
    const bool shared_search =
        bits >= 6 && one_lane_blocks <= detail::encode_pages_shared_search_blocks_per_sm * std::size_t(sms);
    const int threads = shared_search ? detail::encode_pages_threads<8> : detail::encode_pages_threads<1>;
    const std::size_t rows_per_block = std::size_t(threads / (shared_search ? 8 : 1));
    const std::size_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
    detail::with_codec_channels(std::size_t(channels), [&]<int C>() {
      const dim3 grid(unsigned(cq::detail::checked_limit(blocks, INT_MAX, "cuda::encode_into_pages: row blocks")),
                      unsigned(cq::detail::checked_limit(std::size_t(p.head_dim / C), 65535, "cuda::encode_into_pages: groups")),
                      unsigned(L.kv_heads * (side == 2 ? 2 : 1)));
      const std::size_t smem = (std::size_t{1} << bits) * C * sizeof(float);
      const bool staged = smem <= 48 * 1024;
      if (staged && shared_search)
        detail::encode_pages_kernel<C, true, 8, T><<<grid, threads, smem, stream>>>(p, side);
      else if (staged)
        detail::encode_pages_kernel<C, true, 1, T><<<grid, threads, smem, stream>>>(p, side);
      else if (shared_search)
        detail::encode_pages_kernel<C, false, 8, T><<<grid, threads, 0, stream>>>(p, side);
      else
        detail::encode_pages_kernel<C, false, 1, T><<<grid, threads, 0, stream>>>(p, side);
      CQ_CUDA_CHECK_LAUNCH(encode_pages_kernel);
    });
  };
  if (p.key_channels == p.value_channels && p.key_bits == p.value_bits) {
    launch(p.key_channels, p.key_bits, 2);  // one launch: a decode step's launches are a good part of its time
  } else {
    launch(p.key_channels, p.key_bits, 0);
    launch(p.value_channels, p.value_bits, 1);
  }
}

}  // namespace cq::cuda
