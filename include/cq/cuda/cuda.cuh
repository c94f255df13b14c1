#pragma once
/// cq's CUDA backend (compile with nvcc): encode, decode, encoding into a paged code pool and
/// writing rows into full-precision pages, fused decode attention over codes and rows (contiguous
/// or paged) and batched k-means calibration, on device memory the caller owns and on the caller's
/// streams; and the paged cache with its pages in device memory (cuda::PagedKVCache).
///
/// Every kernel in these headers is a template (those without a parameter of their own take a
/// defaulted one): a plain __global__ function defined in a header would be defined again in every
/// translation unit that includes it, and a program with two such units would not link. Template
/// instantiations are emitted once per program. (tests/cuda builds two units that include this.)

#include "cq/cuda/error.cuh"
#include "cq/cuda/memory.cuh"
#include "cq/cuda/codebook.cuh"
#include "cq/cuda/quantizer.cuh"
#include "cq/cuda/attention.cuh"
#include "cq/cuda/attention/prefill.cuh"
#include "cq/cuda/cache/encode_pages.cuh"
#include "cq/cuda/cache/full_pages.cuh"
#include "cq/cuda/cache/paged_kv_cache.cuh"
#include "cq/cuda/host_elements.cuh"
#include "cq/cuda/kmeans.cuh"
