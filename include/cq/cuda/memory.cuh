#pragma once
/// RAII for the device memory cq allocates itself (codebook copies, scratch). The engine owns its
/// own buffers (codes, queries, outputs) and passes them to cq as pointers or views.

#include "cq/cuda/error.cuh"

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>
#include <vector>

namespace cq::cuda {

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n) CQ_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T)));
  }
  /// A device copy of host data.
  DeviceBuffer(const T* host, std::size_t n, cudaStream_t stream = nullptr) : DeviceBuffer(n) { upload(host, n, stream); }
  explicit DeviceBuffer(const std::vector<T>& host, cudaStream_t stream = nullptr) : DeviceBuffer(host.data(), host.size(), stream) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  std::size_t size() const { return n_; }

  void upload(const T* host, std::size_t n, cudaStream_t stream = nullptr, std::size_t offset = 0) {
    CQ_CHECK(offset + n <= n_, "DeviceBuffer::upload: ", n, " elements at ", offset, " exceed the buffer's ", n_);
    if (n) CQ_CUDA_CHECK(cudaMemcpyAsync(ptr_ + offset, host, n * sizeof(T), cudaMemcpyHostToDevice, stream));
  }
  void download(T* host, std::size_t n, cudaStream_t stream = nullptr, std::size_t offset = 0) const {
    CQ_CHECK(offset + n <= n_, "DeviceBuffer::download: ", n, " elements at ", offset, " exceed the buffer's ", n_);
    if (n) CQ_CUDA_CHECK(cudaMemcpyAsync(host, ptr_ + offset, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
  }
  /// Blocking copy of the whole buffer to the host.
  std::vector<T> to_host(cudaStream_t stream = nullptr) const {
    std::vector<T> h(n_);
    download(h.data(), n_, stream);
    CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    return h;
  }
  void fill_zero(cudaStream_t stream = nullptr) {
    if (n_) CQ_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, n_ * sizeof(T), stream));
  }

 private:
  void release() noexcept {
    if (ptr_) cudaFree(ptr_);  // never throws from a destructor
    ptr_ = nullptr;
    n_ = 0;
  }
  T* ptr_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace cq::cuda
