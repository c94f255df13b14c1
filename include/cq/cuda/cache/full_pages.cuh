#pragma once
/// Writing new K/V rows into a pool of full-precision pages on the device, in-stream: the sinks'
/// and the window's rows of a decode step or a prefill chunk, where attention reads them
/// (attention.cuh, FullRowPages). The companion of encode_into_pages (encode_pages.cuh), which
/// writes the same rows' codes.
///
/// Where rows go is a slot mapping: row i goes to row slots[i] % page_rows of page
/// slots[i] / page_rows (a negative slot is padding, a slot past the pool is skipped). The pool has
/// the CPU cache's layout (cache/layout.hpp, FullPageLayout: per page, every KV head's page_rows
/// key rows, then its value rows), so the bytes written equal those cq::PagedKVCache writes on the
/// host for the same rows: for a row at position p of a sequence, the slot is
/// sink[p / F] x F + p % F for p < sinks, else recent[(p - recent_first) / F] x F +
/// (p - recent_first) % F (F = page_rows; SequenceTable's tables).

#include "cq/cache/layout.hpp"
#include "cq/cuda/cache/encode_pages.cuh"
#include "cq/cuda/error.cuh"
#include "cq/error.hpp"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace cq::cuda {

/// One call's rows (SlotRows, in the pool's element type: a copy, not a conversion) and where they
/// go: slots are row slots of the pool (row slot % page_rows of page slot / page_rows). All
/// pointers are device memory.
template <device_element T>
struct PagedRowWrite : SlotRows<T> {
  T* pool = nullptr;                    // page p at pool + p x layout.page_elements()
  FullPageLayout layout;                // page_rows, kv_heads, head_dim, element_bytes (sizeof(T))
  std::size_t pages = 0;                // pages in the pool: slots at or past pages x page_rows are skipped
};

namespace detail {

/// Block (row, KV head): thread d copies channel d (and d + blockDim.x, ...) of the key and the value.
template <device_element T>
__global__ void write_full_rows_kernel(PagedRowWrite<T> p) {
  const std::size_t i = blockIdx.x;
  const int h = int(blockIdx.y);
  const std::int64_t slot = p.slots[i];
  const FullPageLayout& L = p.layout;
  if (slot < 0 || std::uint64_t(slot) >= std::uint64_t(p.pages) * L.page_rows) return;
  const std::size_t page = std::size_t(slot) / L.page_rows, row = std::size_t(slot) % L.page_rows;
  T* base = p.pool + page * L.page_elements() + row * L.head_dim;
  const std::size_t src = i * p.row_stride + std::size_t(h) * p.head_stride;
  for (std::size_t d = threadIdx.x; d < L.head_dim; d += blockDim.x) {
    base[L.key_offset(std::size_t(h)) + d] = p.keys[src + d];
    base[L.value_offset(std::size_t(h)) + d] = p.values[src + d];
  }
}

}  // namespace detail

/// Copies p.rows rows of every KV head into their slots of the pool, on `stream` (asynchronous;
/// no allocation, no host synchronisation, so a decode step can be captured in a CUDA graph).
/// Throws cq::Error, launching nothing, if the layout is empty or not of T's size, or rows exceed
/// the grid (2^31 - 1 rows, 65535 KV heads).
template <device_element T>
void write_full_rows(const PagedRowWrite<T>& p, cudaStream_t stream = nullptr) {
  const FullPageLayout& L = p.layout;
  CQ_CHECK(L.kv_heads > 0 && L.head_dim > 0 && L.page_rows > 0, "cuda::write_full_rows: layout of ", L.kv_heads,
           " KV heads, head_dim ", L.head_dim, ", ", L.page_rows, " rows per page");
  CQ_CHECK(L.element_bytes == sizeof(T), "cuda::write_full_rows: the layout's elements are ", L.element_bytes,
           " bytes, the rows' ", sizeof(T));
  CQ_CHECK(L.kv_heads <= 65535 && p.rows <= 0x7fffffffu, "cuda::write_full_rows: ", p.rows, " rows x ", L.kv_heads,
           " KV heads exceed the grid");
  if (p.rows == 0) return;
  CQ_CHECK(p.keys && p.values && p.slots && p.pool, "cuda::write_full_rows: keys, values, slots and pool must be set");
  const unsigned threads = L.head_dim >= 128 ? 128u : 32u * unsigned((L.head_dim + 31) / 32);
  detail::write_full_rows_kernel<T><<<dim3(unsigned(p.rows), unsigned(L.kv_heads)), threads, 0, stream>>>(p);
  CQ_CUDA_CHECK_LAUNCH(write_full_rows_kernel);
}

}  // namespace cq::cuda
