#pragma once
/// Host-built tables (slot mappings, page tables, page writes) uploaded for a device cache's next
/// launches: assembled in a host buffer, copied through pinned memory into a device buffer, in
/// stream order. A ring of eight pinned buffers, each reused only once its last copy has finished
/// (an event), lets the host run ahead of the device by a few calls; the device buffer is reused in
/// stream order, so a call's upload lands after the previous call's kernels have read theirs.

#include "cq/cuda/error.cuh"
#include "cq/cuda/memory.cuh"
#include "cq/error.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <vector>

namespace cq::cuda {

class Uploads {
 public:
  Uploads() = default;
  Uploads(const Uploads&) = delete;
  Uploads& operator=(const Uploads&) = delete;
  ~Uploads() {
    for (Slot& s : ring_) {
      if (s.event) cudaEventDestroy(s.event);  // never throws from a destructor
      if (s.host) cudaFreeHost(s.host);
    }
  }

  /// Makes the next upload of up to `bytes` bytes allocation-free: the host buffer, the next pinned
  /// buffer (waiting for its previous copy) and the device buffer. May throw; callers that must
  /// not fail halfway (a cache after committing pages) call it first.
  void reserve(std::size_t bytes) {
    blob_.reserve(bytes);
    reserve_device(bytes);
    ready(ring_[next_], bytes);
  }
  /// The host buffer of the next upload, `bytes` long (zeroed); fill it, then call send().
  unsigned char* host(std::size_t bytes) {
    bytes_ = bytes;
    blob_.assign(bytes, 0);
    return blob_.data();
  }
  /// Where offset `at` of the upload will be on the device (sizes the device buffer first, so
  /// pointers written into the upload stay valid).
  unsigned char* device_at(std::size_t at) {
    reserve_device(bytes_);
    return device_.data() + at;
  }
  /// Copies the host buffer into the device buffer on `stream` (asynchronous).
  void send(cudaStream_t stream) {
    reserve_device(bytes_);
    send_to(device_.data(), stream);
  }
  /// Copies the host buffer to `device` (the caller's device memory) on `stream` (asynchronous).
  void send_to(void* device, cudaStream_t stream) {
    if (bytes_ == 0) return;
    Slot& s = ring_[next_];
    ready(s, bytes_);
    next_ = (next_ + 1) % ring_.size();
    std::memcpy(s.host, blob_.data(), bytes_);
    CQ_CUDA_CHECK(cudaMemcpyAsync(device, s.host, bytes_, cudaMemcpyHostToDevice, stream));
    CQ_CUDA_CHECK(cudaEventRecord(s.event, stream));
    s.pending = true;
  }
  std::size_t device_bytes() const { return device_.size(); }

 private:
  /// Grows the device buffer (freeing the old one waits for the device: kernels still reading it
  /// finish first).
  void reserve_device(std::size_t bytes) {
    if (device_.size() < bytes) device_ = DeviceBuffer<unsigned char>(std::max<std::size_t>(bytes * 2, 4096));
  }
  struct Slot {
    unsigned char* host = nullptr;
    std::size_t bytes = 0;
    cudaEvent_t event = nullptr;
    bool pending = false;  // its last copy may still be reading it
  };
  /// Slot s free to be overwritten, holding at least `bytes`.
  static void ready(Slot& s, std::size_t bytes) {
    if (!s.event) CQ_CUDA_CHECK(cudaEventCreateWithFlags(&s.event, cudaEventDisableTiming));
    if (s.pending) CQ_CUDA_CHECK(cudaEventSynchronize(s.event));
    s.pending = false;
    if (s.bytes < bytes) {
      if (s.host) CQ_CUDA_CHECK(cudaFreeHost(s.host));
      s.host = nullptr;
      s.bytes = 0;
      const std::size_t want = std::max<std::size_t>(bytes * 2, 4096);
      CQ_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.host), want));
      s.bytes = want;
    }
  }
  std::array<Slot, 8> ring_{};
  std::size_t next_ = 0;
  std::vector<unsigned char> blob_;
  std::size_t bytes_ = 0;
  DeviceBuffer<unsigned char> device_;
};

}  // namespace cq::cuda
