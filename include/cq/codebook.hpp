#pragma once
/// Codebook: the learned centroids of one CQ quantizer (one KV head of one layer, K or V).
///
/// Layout: centroids (groups, num_centroids, channels), float, 64-byte aligned — group g's
/// centroid k is the `channels` floats at ((g * num_centroids) + k) * channels. Alongside it the
/// codebook keeps a derived table the encoders and attention read: a transposed copy
/// (groups, channels, padded_centroids), padded to a multiple of 16 so SIMD code can stride over
/// centroids. Padding centroids are zeros (so sums over them add nothing); a nearest-centroid
/// search must mask them out.

#include "cq/config.hpp"
#include "cq/detail/aligned_buffer.hpp"
#include "cq/detail/checked.hpp"
#include "cq/error.hpp"
#include "cq/packed_codes.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace cq {

/// How a codebook was produced; written to and read from codebook files.
struct FitInfo {
  std::string method = "none";   // "kmeans", "fisher-kmeans", "uniform-int", or "none"
  std::string init;              // "kmeans++" or "random"
  std::string dtype = "F32";     // activation type the codebook was fitted on
  std::uint32_t iterations = 0;  // Lloyd iterations run
  std::uint64_t calibration_rows = 0;  // rows the fit saw (after subsampling)
  std::uint64_t seed = 0;
  double objective = 0.0;        // final (weighted) mean squared error per element
};

/// Read-only view of one group's tables.
struct GroupCodebookView {
  const float* centroids = nullptr;   // (num_centroids, channels)
  const float* transposed = nullptr;  // (channels, padded_centroids), zeros past num_centroids
  std::uint32_t num_centroids = 0;
  std::uint32_t channels = 0;
  std::uint32_t padded_centroids = 0;
};

/// Read-only view of a whole codebook.
struct CodebookView {
  const float* centroids = nullptr;   // (groups, num_centroids, channels)
  const float* transposed = nullptr;  // (groups, channels, padded_centroids)
  std::size_t groups = 0;
  std::size_t channels = 0;
  int bits = 0;
  std::size_t padded_centroids = 0;

  CQ_HOST_DEVICE constexpr std::size_t num_centroids() const { return std::size_t{1} << bits; }
  CQ_HOST_DEVICE constexpr std::size_t dim() const { return groups * channels; }
  CQ_HOST_DEVICE constexpr GroupCodebookView group(std::size_t g) const {
    return {centroids + g * num_centroids() * channels, transposed + g * channels * padded_centroids,
            static_cast<std::uint32_t>(num_centroids()), static_cast<std::uint32_t>(channels),
            static_cast<std::uint32_t>(padded_centroids)};
  }
};

/// Padding of the centroid axis in the transposed table: a multiple of 16 floats (one AVX-512
/// register), at least 16.
CQ_HOST_DEVICE constexpr std::size_t padded_centroid_count(std::size_t k) { return k < 16 ? 16 : (k + 15) / 16 * 16; }

/// Checks the (dim, channels, bits) triple of a CQ configuration; throws naming `what`.
inline void check_cq_shape(std::size_t dim, std::size_t channels, int bits, const char* what) {
  check_code_bits(bits, what);
  CQ_CHECK(channels >= 1, what, ": channels per group must be >= 1, got ", channels);
  CQ_CHECK(dim >= 1, what, ": dim must be >= 1, got ", dim);
  CQ_CHECK(dim % channels == 0, what, ": dim ", dim, " is not a multiple of channels per group ", channels);
}

class Codebook {
 public:
  Codebook() = default;
  /// A codebook of zero centroids for vectors of `dim` channels cut into groups of `channels`.
  Codebook(std::size_t dim, std::size_t channels, int bits) {
    check_cq_shape(dim, channels, bits, "Codebook");
    const std::size_t floats =
        detail::checked_mul(dim, std::size_t{1} << bits, "Codebook: dim x 2^bits centroid floats");
    detail::checked_mul(dim, padded_centroid_count(std::size_t{1} << bits), "Codebook: dim x padded centroids");
    channels_ = channels;
    groups_ = dim / channels;
    bits_ = bits;
    centroids_.resize(floats, 0.0f);
    refresh();
  }

  Codebook(const Codebook&) = default;
  Codebook(Codebook&&) noexcept = default;
  /// Copy then commit: a copy that fails (out of memory) leaves this codebook as it was.
  Codebook& operator=(const Codebook& o) {
    if (this != &o) *this = Codebook(o);
    return *this;
  }
  Codebook& operator=(Codebook&&) noexcept = default;

  std::size_t dim() const { return groups_ * channels_; }
  std::size_t channels() const { return channels_; }
  std::size_t groups() const { return groups_; }
  int bits() const { return bits_; }
  std::size_t num_centroids() const { return std::size_t{1} << bits_; }
  bool empty() const { return groups_ == 0; }

  /// All centroids, layout (groups, num_centroids, channels).
  const float* data() const { return centroids_.data(); }
  std::size_t size() const { return centroids_.size(); }
  /// Group g's centroids, layout (num_centroids, channels).
  const float* group_data(std::size_t g) const {
    CQ_CHECK(g < groups_, "Codebook::group_data: group ", g, " out of range (groups = ", groups_, ")");
    return centroids_.data() + g * num_centroids() * channels_;
  }
  /// Channel c of centroid k of group g.
  float centroid(std::size_t g, std::size_t k, std::size_t c) const {
    CQ_CHECK(g < groups_ && k < num_centroids() && c < channels_, "Codebook::centroid: (group ", g, ", centroid ", k,
             ", channel ", c, ") is outside ", groups_, " x ", num_centroids(), " x ", channels_);
    return centroids_[(g * num_centroids() + k) * channels_ + c];
  }

  /// Replaces group g's centroids with (num_centroids, channels) floats; all must be finite.
  void set_group(std::size_t g, const float* centroids) {
    CQ_CHECK(g < groups_, "Codebook::set_group: group ", g, " out of range (groups = ", groups_, ")");
    CQ_CHECK(centroids != nullptr, "Codebook::set_group: centroids is null");
    const std::size_t n = num_centroids() * channels_;
    for (std::size_t i = 0; i < n; ++i)
      CQ_CHECK(std::isfinite(centroids[i]), "Codebook::set_group: centroid value ", centroids[i],
               " at group ", g, ", index ", i, " is not finite");
    std::memcpy(centroids_.data() + g * n, centroids, n * sizeof(float));
    refresh_group(g);
  }
  /// Replaces every centroid with (groups, num_centroids, channels) floats; all must be finite.
  void set_all(const float* centroids) {
    CQ_CHECK(centroids != nullptr || centroids_.empty(), "Codebook::set_all: centroids is null");
    for (std::size_t i = 0; i < centroids_.size(); ++i)
      CQ_CHECK(std::isfinite(centroids[i]), "Codebook::set_all: centroid value ", centroids[i],
               " at flat index ", i, " is not finite");
    if (!centroids_.empty()) std::memcpy(centroids_.data(), centroids, centroids_.size() * sizeof(float));
    refresh();
  }

  CodebookView view() const {
    return {centroids_.data(), transposed_.data(), groups_, channels_, bits_, padded_};
  }
  GroupCodebookView group(std::size_t g) const {
    CQ_CHECK(g < groups_, "Codebook::group: group ", g, " out of range (groups = ", groups_, ")");
    return view().group(g);
  }

  /// How the codebook was made (method, iterations, objective...).
  FitInfo& info() { return info_; }
  const FitInfo& info() const { return info_; }

  /// Bytes of centroid storage (what a file or a KV cache's accounting counts). The transposed
  /// table roughly doubles the resident size; allocated_bytes() includes it.
  std::size_t size_bytes() const { return centroids_.size() * sizeof(float); }
  std::size_t allocated_bytes() const {
    return centroids_.allocated_bytes() + transposed_.allocated_bytes();
  }

  /// Same shape and bit-identical centroids.
  friend bool operator==(const Codebook& a, const Codebook& b) {
    return a.channels_ == b.channels_ && a.groups_ == b.groups_ && a.bits_ == b.bits_ &&
           (a.centroids_.size() == 0 ||
            std::memcmp(a.centroids_.data(), b.centroids_.data(), a.centroids_.size() * sizeof(float)) == 0);
  }

 private:
  void refresh() {
    padded_ = padded_centroid_count(num_centroids());
    transposed_.resize(groups_ * channels_ * padded_);
    for (std::size_t g = 0; g < groups_; ++g) refresh_group(g);
  }
  void refresh_group(std::size_t g) {
    const std::size_t k_count = num_centroids();
    const float* c = group_data(g);
    float* tr = transposed_.data() + g * channels_ * padded_;
    for (std::size_t k = 0; k < padded_; ++k) {
      for (std::size_t j = 0; j < channels_; ++j) tr[j * padded_ + k] = k < k_count ? c[k * channels_ + j] : 0.0f;
    }
  }

  std::size_t channels_ = 0;
  std::size_t groups_ = 0;
  int bits_ = 0;
  std::size_t padded_ = 0;
  detail::AlignedBuffer<float> centroids_;
  detail::AlignedBuffer<float> transposed_;
  FitInfo info_;
};

}  // namespace cq
