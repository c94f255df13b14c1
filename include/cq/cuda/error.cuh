#pragma once
/// CUDA errors as cq::Error: every CUDA call and every kernel launch of the CUDA backend is
/// checked, and a failure throws cq::cuda::CudaError naming the call and CUDA's error string.

#include "cq/error.hpp"

#include <cuda_runtime.h>

namespace cq::cuda {

class CudaError : public Error {
 public:
  CudaError(const char* call, cudaError_t code, const char* file, int line)
      : Error(detail::concat("CUDA call ", call, " failed: ", cudaGetErrorName(code), " (", cudaGetErrorString(code),
                             ") at ", file, ":", line)),
        code_(code) {}
  cudaError_t code() const { return code_; }

 private:
  cudaError_t code_;
};

}  // namespace cq::cuda

/// Checks a CUDA runtime call; throws cq::cuda::CudaError on failure.
#define CQ_CUDA_CHECK(call)                                                        \
  do {                                                                             \
    const cudaError_t cq_cuda_status_ = (call);                                    \
    if (cq_cuda_status_ != cudaSuccess)                                            \
      throw ::cq::cuda::CudaError(#call, cq_cuda_status_, __FILE__, __LINE__);     \
  } while (0)

/// Checks the launch just made (configuration errors surface here; faults at the next sync).
#define CQ_CUDA_CHECK_LAUNCH(kernel_name) CQ_CUDA_CHECK(cudaPeekAtLastError() /* launch of kernel_name */)
