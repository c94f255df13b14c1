#pragma once
/// CUDA errors as cq::Error: every CUDA call and every kernel launch of the CUDA backend is
/// checked, and a failure throws cq::cuda::CudaError naming the call and CUDA's error string.

#include "cq/error.hpp"

#include <cuda_runtime.h>

namespace cq::cuda {

class CudaError : public Error {
 public:
  /// `what` failed: "call cudaMalloc(...)", "launch of encode_kernel", ...
  CudaError(const char* what, cudaError_t code, const char* file, int line)
      : Error(cq::detail::concat("CUDA ", what, " failed: ", cudaGetErrorName(code), " (", cudaGetErrorString(code), ") at ",
                             file, ":", line)),
        code_(code) {}
  cudaError_t code() const { return code_; }

 private:
  cudaError_t code_;
};

}  // namespace cq::cuda

/// Checks a CUDA runtime call; throws cq::cuda::CudaError naming the call on failure.
#define CQ_CUDA_CHECK(call)                                                              \
  do {                                                                                   \
    const cudaError_t cq_cuda_status_ = (call);                                          \
    if (cq_cuda_status_ != cudaSuccess)                                                  \
      throw ::cq::cuda::CudaError("call " #call, cq_cuda_status_, __FILE__, __LINE__);   \
  } while (0)

/// Checks the launch of `kernel` just made (configuration errors surface here; faults at the next
/// sync); throws cq::cuda::CudaError naming the kernel.
#define CQ_CUDA_CHECK_LAUNCH(kernel)                                                         \
  do {                                                                                       \
    const cudaError_t cq_cuda_status_ = cudaPeekAtLastError();                               \
    if (cq_cuda_status_ != cudaSuccess)                                                      \
      throw ::cq::cuda::CudaError("launch of " #kernel, cq_cuda_status_, __FILE__, __LINE__); \
  } while (0)
