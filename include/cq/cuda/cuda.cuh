#pragma once
/// cq's CUDA backend (compile with nvcc): encode, decode, encoding into a paged code pool and
/// writing rows into full-precision pages, fused decode attention over codes and rows (contiguous
/// or paged) and batched k-means calibration, on device memory the caller owns and on the caller's
/// streams.

#include "cq/cuda/error.cuh"
#include "cq/cuda/memory.cuh"
#include "cq/cuda/codebook.cuh"
#include "cq/cuda/quantizer.cuh"
#include "cq/cuda/attention.cuh"
#include "cq/cuda/cache/encode_pages.cuh"
#include "cq/cuda/cache/full_pages.cuh"
#include "cq/cuda/kmeans.cuh"
