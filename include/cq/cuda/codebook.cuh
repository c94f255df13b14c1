#pragma once
/// Codebooks in device memory: DeviceCodebook owns device copies of a cq::Codebook's two tables
/// (centroids [group][centroid][C] and the transposed table padded to 16), DeviceCodebookView is
/// what kernels take (device pointers only; a host CodebookView never carries device pointers).

#include "cq/codebook.hpp"
#include "cq/cuda/memory.cuh"

#include <cstddef>

namespace cq::cuda {

/// A codebook in device memory, as kernels read it: centroids (groups, 2^bits, channels) and the
/// transposed table (groups, channels, padded_centroids), zeros past 2^bits.
struct DeviceCodebookView {
  const float* centroids = nullptr;
  const float* transposed = nullptr;
  std::size_t groups = 0;
  std::size_t channels = 0;
  int bits = 0;
  std::size_t padded_centroids = 0;

  CQ_HOST_DEVICE constexpr std::size_t num_centroids() const { return std::size_t{1} << bits; }
  CQ_HOST_DEVICE constexpr std::size_t dim() const { return groups * channels; }
};

/// Device copies of a codebook's tables: the centroids and the transposed table.
class DeviceCodebook {
 public:
  DeviceCodebook() = default;
  /// Device copies of the tables of a codebook in host memory.
  explicit DeviceCodebook(const CodebookView& cb, cudaStream_t stream = nullptr)
      : centroids_(cb.centroids, cb.groups * cb.num_centroids() * cb.channels, stream),
        transposed_(cb.transposed, cb.groups * cb.channels * cb.padded_centroids, stream),
        groups_(cb.groups), channels_(cb.channels), bits_(cb.bits), padded_(cb.padded_centroids) {}
  explicit DeviceCodebook(const Codebook& cb, cudaStream_t stream = nullptr) : DeviceCodebook(cb.view(), stream) {}

  DeviceCodebookView view() const {
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
