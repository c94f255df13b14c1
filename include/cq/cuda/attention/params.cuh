#pragma once
/// The device-side problem of fused decode attention: what a launch reads (device pointers to the
/// batch's codes, full-precision rows, codebooks and queries) and where it writes.
///
/// A sequence's tokens are split as cq/attention/problem.hpp says: coded tokens (positions sinks ..
/// sinks + coded - 1, as codes) and full-precision tokens (the sinks and the window, as rows). The
/// launch serves one query per sequence, the last one, with keys after RoPE.

#include "cq/cuda/codebook.cuh"

#include <cstdint>

namespace cq::cuda {

/// One (sequence, KV head)'s codes: `coded` tokens in the packed layout, keys and values.
struct DeviceKVCodes {
  const std::uint8_t* key_codes = nullptr;
  const std::uint8_t* value_codes = nullptr;
};

/// One sequence: how many coded tokens, and its full-precision tokens (sinks, then the window;
/// keys after RoPE) as [kv_heads][full][head_dim] floats.
struct DeviceSequence {
  std::uint32_t coded = 0;
  std::uint32_t full = 0;
  const float* full_keys = nullptr;
  const float* full_values = nullptr;
};

/// Everything one launch reads (device pointers) and its shape.
struct AttentionBatch {
  int batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  const DeviceKVCodes* codes = nullptr;     // [batch][kv_heads]
  const DeviceSequence* sequences = nullptr;  // [batch]
  const DeviceCodebookView* key_codebooks = nullptr;    // [kv_heads]
  const DeviceCodebookView* value_codebooks = nullptr;  // [kv_heads]
  const float* q = nullptr;                 // [batch][q_heads][head_dim]
  float* out = nullptr;                     // [batch][q_heads][head_dim]
  float scale = 0.0f;                       // 0: 1 / sqrt(head_dim)
};

namespace detail {

/// Steps of a fused-attention launch, for timing experiments only (detail::run_stages, used by
/// bench/cuda; the results are meaningless unless all are on): score tables, key scan, value
/// histograms, full-precision tokens, and the lane-tables kernel's histogram x codebook product.
enum AttentionStage : unsigned {
  stage_lut = 1,
  stage_scan = 2,
  stage_hist = 4,
  stage_full = 8,
  stage_product = 16,
  stage_all = 31
};

}  // namespace detail

}  // namespace cq::cuda
