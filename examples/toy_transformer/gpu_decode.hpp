#pragma once
// The toy transformer's decode on the GPU (gpu_decode.cu, compiled by nvcc), in host types only so
// that the driver (gpu_main.cpp, with Eigen and the CPU model) never sees CUDA.

#include <cq/kv_codebooks.hpp>

#include <cstddef>
#include <vector>

namespace toy::gpu {

/// The model's weights as row-major floats (nn.Linear's (out_features, in_features)), and the
/// CPU model's RoPE table, so both sides rotate with the same numbers.
struct Weights {
  int vocab = 0, dim = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, ffn_hidden = 0, max_len = 0;
  float norm_eps = 0.0f, rope_theta = 0.0f;
  std::vector<float> embed, norm, output;  // (vocab, dim), (dim), (vocab, dim)
  struct Layer {
    std::vector<float> attn_norm, ffn_norm, wq, wk, wv, wo, w1, w2, w3;
  };
  std::vector<Layer> layer;
  std::vector<float> rope_cos, rope_sin;  // (max_len, head_dim / 2)
};

/// The KV cache of a GPU decode: cq's device paged cache (cuda::PagedKVCache<float> over
/// `codebooks`, `window` recent tokens in full precision; keys appended before RoPE when pre_rope,
/// so the codebooks must be pre-RoPE ones, else after it), or, without codebooks, fp16 rows read by
/// a plain decode-attention kernel.
struct CacheChoice {
  const cq::KVCodebooks* codebooks = nullptr;
  std::size_t window = 0;
  bool pre_rope = false;
};

struct Result {
  std::vector<double> nll;  // per window: summed next-token NLL in nats (window length - 1 predictions)
  double seconds = 0.0;     // the decode loop, from the first token to the last logits on the device
  std::size_t tokens = 0;   // tokens decoded (windows x length)
  std::size_t kv_bytes = 0; // KV bytes held at the end (codes and full-precision pages in use, or fp16 rows)
};

/// Decodes the windows token by token, all at once as a batch (one sequence each, equal lengths up
/// to max_len), with the whole model on the GPU (cuBLAS for the projections), and returns each
/// window's next-token NLL. Throws cq::Error on bad input or a CUDA/cuBLAS failure.
Result decode(const Weights& w, const std::vector<std::vector<int>>& windows, const CacheChoice& cache);

}  // namespace toy::gpu
