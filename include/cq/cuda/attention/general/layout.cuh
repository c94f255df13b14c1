#pragma once
/// The general kernel's launch shape and its block's shared-memory layout (host-built, passed by
/// value to the kernel).

#include "cq/config.hpp"

namespace cq::cuda::detail {

constexpr int general_threads = 256;
constexpr int general_warps = general_threads / 32;
/// How far below a full-precision token the general kernel's reference may stay (general/kernel.cuh,
/// pass 1).
constexpr float full_reach = 60.0f;

/// Shape of a general-kernel launch and its block's shared memory (in 4-byte words). Tables (score
/// tables, u32 histograms) are in shared memory when they fit, else in a slice of global scratch.
struct GeneralLayout {
  int heads;                          // query heads per block (1, 2, 4 or 8)
  int key_groups, key_centroids;      // G and 2^bits of the keys
  int value_groups, value_centroids;  // and of the values
  int head_dim, full_cap;             // D; most full-precision tokens of a sequence
  int split_tokens, stage_words;      // coded tokens per split; code words per 32-token block
  float unit;                         // histogram fixed-point scale (hist_unit_for(split_tokens))
  bool tables_in_shared;
  CQ_HOST_DEVICE int lut_size() const { return key_groups * key_centroids; }
  CQ_HOST_DEVICE int hist_size() const { return value_groups * value_centroids; }
  CQ_HOST_DEVICE int tables_per_block() const { return heads * (lut_size() + hist_size()); }
  CQ_HOST_DEVICE int score_stride() const { return split_tokens + full_cap; }
  CQ_HOST_DEVICE int shared_words() const {
    return (tables_in_shared ? tables_per_block() : 0) + heads * score_stride() + general_warps * stage_words +
           heads * (general_warps + 3);
  }
};

}  // namespace cq::cuda::detail
