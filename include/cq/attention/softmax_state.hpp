#pragma once
/// The online softmax and its merge rule, shared by every attention kernel of cq (CPU pieces,
/// CUDA splits, the CUDA kernels' own parts).
///
/// A kernel that has seen scores s_i keeps a reference maximum `ref` and the weight sum
/// sum_i exp(s_i - ref); its accumulators hold sum_i exp(s_i - ref) v_i. Two partial states over
/// disjoint tokens merge by moving both to a common reference (the larger one): each side's sum
/// and accumulators are multiplied by exp(ref_side - common). The attention output is the merged
/// accumulator divided by the merged sum. (Milakov & Gimelshein 2018; flash-decoding's combine.)
/// A state whose weights sum to zero is empty and contributes nothing, whatever its reference.

#include "cq/config.hpp"

#include <cmath>
#include <limits>

namespace cq {

/// exp for softmax weights: std::exp on the host, the hardware approximation (__expf) on the
/// device, as every CUDA kernel of cq uses.
CQ_HOST_DEVICE inline float softmax_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

/// One query head's online-softmax state over some tokens (accumulators live beside it).
struct SoftmaxState {
  float ref = -std::numeric_limits<float>::infinity();  // weights are exp(score - ref)
  float sum = 0.0f;                                      // sum of the weights

  CQ_HOST_DEVICE constexpr bool empty() const { return !(sum > 0.0f); }
};

/// The reference two or more states merge at: the largest reference of the non-empty ones. Fold
/// it over the parts, starting from any value below every score (e.g. -inf or -FLT_MAX).
CQ_HOST_DEVICE inline float softmax_common_reference(float common, float ref, float sum) {
  return sum > 0.0f && ref > common ? ref : common;
}

/// The factor a part's sum and accumulators are multiplied by when merged at reference
/// `common`: exp(ref - common), or 0 for an empty part.
CQ_HOST_DEVICE inline float softmax_merge_factor(float ref, float sum, float common) {
  return sum > 0.0f ? softmax_exp(ref - common) : 0.0f;
}

/// Merges `b` into `a` (both over disjoint tokens): returns the factors (fa, fb) by which the
/// caller scales a's and b's accumulators before adding them; a's reference and sum are updated.
struct MergeFactors {
  float a, b;
};
CQ_HOST_DEVICE inline MergeFactors merge_into(SoftmaxState& a, const SoftmaxState& b) {
  const float common = softmax_common_reference(softmax_common_reference(-std::numeric_limits<float>::infinity(),
                                                                         a.ref, a.sum),
                                                b.ref, b.sum);
  const MergeFactors f{softmax_merge_factor(a.ref, a.sum, common), softmax_merge_factor(b.ref, b.sum, common)};
  if (!b.empty()) {
    a.sum = f.a * a.sum + f.b * b.sum;
    a.ref = common;
  }
  return f;
}

}  // namespace cq
