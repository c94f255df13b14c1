#pragma once
// Host-side entry points into the CUDA backend for the CUDA tests: plain host types in and out,
// so the test file (compiled by the host compiler, with Eigen and doctest) never sees CUDA and
// the .cu file (compiled by nvcc) never sees Eigen.

#include <cq/codebook.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace cq::gpu_test {

/// Name of device 0, or empty when no CUDA device is usable.
std::string device_name();

/// Encodes rows x (rows, dim) into tokens [first, first + rows) of `codes` (packed, `tokens` tokens).
void encode(const Codebook& cb, const std::vector<float>& x, std::size_t rows, std::vector<std::uint8_t>& codes,
            std::size_t tokens, std::size_t first);
/// Decodes tokens [first, first + rows) of packed codes.
std::vector<float> decode(const Codebook& cb, const std::vector<std::uint8_t>& codes, std::size_t tokens,
                          std::size_t first, std::size_t rows);

/// One sequence of a batch: per KV head its packed key/value codes and full-precision rows.
struct Sequence {
  std::uint32_t coded = 0;
  std::vector<std::vector<std::uint8_t>> key_codes, value_codes;  // [kv_head]
  std::uint32_t dense = 0;
  std::vector<float> dense_keys, dense_values;  // [kv_head][dense][head_dim]
};
/// Which kernel FusedAttention runs (cq::cuda::FusedAttention::Kernel, without CUDA headers).
enum class Kernel { automatic, general, byte_codes };
/// Fused attention for a batch; q is [batch][q_heads][head_dim]. Returns the output likewise.
/// `misaligned` places every code buffer 4 bytes and every centroid table one float past a
/// 16-byte boundary (the kernels' narrow-load paths).
std::vector<float> attention(const std::vector<Codebook>& key_cb, const std::vector<Codebook>& value_cb,
                             const std::vector<Sequence>& batch, const std::vector<float>& q, int q_heads, int head_dim,
                             float scale, Kernel kernel = Kernel::automatic, int* splits_used = nullptr,
                             bool misaligned = false);

/// Batched k-means: x [jobs][n][dim]; returns codebooks [jobs] and objectives [jobs][groups][iterations + 1].
std::vector<Codebook> fit_batched(const std::vector<float>& x, const std::vector<float>* weights, int jobs, int n,
                                  int dim, int channels, int bits, int iterations, std::uint64_t seed,
                                  std::vector<double>* objectives = nullptr);

}  // namespace cq::gpu_test
