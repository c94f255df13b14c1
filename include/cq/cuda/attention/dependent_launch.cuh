#pragma once
/// Programmatic dependent launch (sm_90+; CUDA's "PDL"): a kernel launched with the programmatic
/// stream-serialization attribute is launched while the kernel before it in the stream finishes,
/// and waits (griddepcontrol.wait) before it reads that kernel's results. A short decode is a brief
/// main kernel and a brief split combine, so the gap between the two launches is a sizeable part of
/// it. (The earlier kernel could also let the dependent in before its own blocks end,
/// griddepcontrol.launch_dependents; in the attention kernels that made the short decodes slower,
/// not faster: docs/design/cuda-attention.md, "Session 19".)

#include "cq/cuda/error.cuh"

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <utility>

namespace cq::cuda::detail {

/// Waits until the kernel before this one in the stream has finished and its writes are visible
/// (immediately, when this kernel was launched normally). Nothing the earlier kernel writes may
/// be read before it.
__device__ __forceinline__ void wait_for_prerequisite() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/// Launches kernel<<<grid, block, shared, stream>>>(args...), as a programmatic dependent of the
/// stream's previous kernel when `dependent` (the device supports it: compute capability 9.0+);
/// throws cq::cuda::CudaError naming `name` if the launch fails.
template <class... Params, class... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared,
                   cudaStream_t stream, bool dependent, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent ? 1 : 0;
  const cudaError_t status = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (status != cudaSuccess) throw CudaError((std::string("launch of ") + name).c_str(), status, __FILE__, __LINE__);
}

}  // namespace cq::cuda::detail
