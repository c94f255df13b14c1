#pragma once
/// Device copies of codebooks: the same two tables as cq::Codebook (centroids
/// [group][centroid][C] and the transposed table padded to 16), as a view kernels take.

#include "cq/codebook.hpp"
#include "cq/cuda/memory.cuh"

namespace cq::cuda {

class DeviceCodebook {
 public:
  DeviceCodebook() = default;
  explicit DeviceCodebook(const Codebook& cb, cudaStream_t stream = nullptr)
      : centroids_(cb.data(), cb.size(), stream),
        transposed_(cb.view().transposed, cb.groups() * cb.channels() * cb.view().padded_centroids, stream),
        groups_(cb.groups()), channels_(cb.channels()), bits_(cb.bits()), padded_(cb.view().padded_centroids) {}

  /// A CodebookView whose pointers are device pointers (usable in kernels only).
  CodebookView view() const {
    return {centroids_.data(), transposed_.data(), groups_, channels_, bits_, padded_};
  }
  std::size_t bytes() const { return (centroids_.size() + transposed_.size()) * sizeof(float); }

 private:
  DeviceBuffer<float> centroids_, transposed_;
  std::size_t groups_ = 0, channels_ = 0;
  int bits_ = 0;
  std::size_t padded_ = 0;
};

}  // namespace cq::cuda
