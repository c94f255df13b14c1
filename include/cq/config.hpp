#pragma once
/// Compile-time configuration: host/device annotations, the overridable internal assert,
/// and which SIMD instruction set the native backend was compiled for.

#include <cassert>
#include <cstddef>
#include <cstdint>

// CQ_HOST_DEVICE marks helpers that serve both host code and CUDA kernels. Defined only under
// nvcc, so the host library never depends on CUDA headers.
#if defined(__CUDACC__)
#define CQ_HOST_DEVICE __host__ __device__
#else
#define CQ_HOST_DEVICE
#endif

// Internal invariants (bugs in cq, not bad input) in hot loops. Bad input at the API boundary
// throws cq::Error instead. Define CQ_ASSERT before including cq to route it elsewhere.
#ifndef CQ_ASSERT
#define CQ_ASSERT(cond) assert(cond)
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CQ_RESTRICT __restrict__
#define CQ_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CQ_RESTRICT
#define CQ_ALWAYS_INLINE inline
#endif

// Static SIMD dispatch: the native backend uses the widest instruction set the translation unit
// is compiled for (header-only code cannot dispatch dynamically without per-ISA objects).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CQ_HAVE_AVX512 1
#else
#define CQ_HAVE_AVX512 0
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define CQ_HAVE_AVX2 1
#else
#define CQ_HAVE_AVX2 0
#endif

namespace cq {

/// The instruction set the native CPU backend of this translation unit uses.
inline constexpr const char* simd_isa_name() {
#if CQ_HAVE_AVX512
  return "avx512";
#elif CQ_HAVE_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

/// Alignment of every buffer cq allocates (one cache line; also the widest SIMD load).
inline constexpr std::size_t buffer_alignment = 64;

}  // namespace cq
