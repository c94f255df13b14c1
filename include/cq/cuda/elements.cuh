#pragma once
/// The element types of the tensors cq's kernels read and write (the model's dtype: fp32, fp16,
/// bf16) on the device: typed conversions for code compiled per element type, and the dispatch
/// from a run-time DType to that code.
///
/// Loops over elements are compiled per type (visit_element_type at the loop, not a branch per
/// load): a type branch inside a loop keeps the compiler from batching the loop's loads, and a
/// loop of dependent global loads is then as slow as its latency times its length. Loads are plain,
/// not __ldg: the compiler treats read-only-path loads as free to speculate and once hoisted
/// loop-invariant ones (a query row read once per key row) out of their loop, past its guard,
/// reading beyond the tensor's end (compute-sanitizer initcheck showed it).

#include "cq/dtype.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <concepts>
#include <cstddef>

namespace cq::cuda {

/// Element types the device code reads and writes: the model's dtype.
template <class T>
concept device_element = std::same_as<T, float> || std::same_as<T, __half> || std::same_as<T, __nv_bfloat16>;

/// Calls f(T{}) with T the device element type of t (float for F32, __half for F16,
/// __nv_bfloat16 for BF16; t must be one of them: callers check attention_dtype or the like).
template <class F>
__host__ __device__ __forceinline__ void visit_element_type(DType t, F&& f) {
  if (t == DType::f16) f(__half{});
  else if (t == DType::bf16) f(__nv_bfloat16{});
  else f(float{});
}

#ifdef __CUDACC__
__device__ __forceinline__ float element_to_float(float x) { return x; }
__device__ __forceinline__ float element_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float element_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

/// Elements i .. i + 3 of a T array as floats, in one load: the address must be 16-byte (float)
/// or 8-byte (16-bit types) aligned.
template <device_element T>
__device__ __forceinline__ float4 load_float4(const T* p, std::size_t i) {
  if constexpr (std::same_as<T, float>) {
    return *reinterpret_cast<const float4*>(p + i);
  } else {
    const uint2 w = *reinterpret_cast<const uint2*>(p + i);
    const T* e = reinterpret_cast<const T*>(&w);
    return make_float4(element_to_float(e[0]), element_to_float(e[1]), element_to_float(e[2]), element_to_float(e[3]));
  }
}

/// Stores v as element i of a tensor of type `t` (rounded to nearest).
__device__ __forceinline__ void store_element(void* p, DType t, std::size_t i, float v) {
  if (t == DType::f16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else if (t == DType::bf16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}
#endif

}  // namespace cq::cuda
