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
#include "cq/error.hpp"

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

/// The device kernels' form, made where a loop of scores is capped. The main loops of the
/// lane-tables and grouped-rows kernels are instantiated with and without a cap: a run-time branch
/// there still slowed the uncapped code (register allocation and scheduling around it; see
/// docs/design/cuda-attention.md). The general and prefill kernels cap inside a branch on the
/// parameter, read there: a select per score would let the compiler compute the tanh for every
/// score, and a SoftCap held across a main loop costs registers. tanh as (1 - e) / (1 + e),
/// e = exp(-2 |x|), through the hardware exp and reciprocal: absolute error ~1e-7 of cap, which is
/// what a softmax sees (an absolute error in a logit is a relative one in its weight); tanh.approx
/// is ~2^-11 *relative*, up to cap x 5e-4 in a logit, too coarse for the attention's 1e-3
/// tolerance. The unit of cap is the kernel's score unit (a kernel in log2 units gives cap x log2 e).
struct SoftCap {
  float cap, inv;
  CQ_HOST_DEVICE explicit SoftCap(float c) : cap(c), inv(1.0f / c) {}
  /// cap x tanh(s / cap).
  CQ_HOST_DEVICE float operator()(float s) const {
#if defined(__CUDA_ARCH__)
    const float e = __expf(-2.0f * fabsf(s * inv));
    return copysignf(cap * __fdividef(1.0f - e, 1.0f + e), s);
#else
    return cap * std::tanh(s * inv);
#endif
  }
};

/// Logit soft-capping (Gemma 2's attn_logit_softcapping; FlashInfer's and vLLM's logits_soft_cap):
/// a scaled score s becomes cap x tanh(s / cap) before the softmax, so no logit exceeds cap in
/// magnitude; cap == 0 leaves s as it is. Applied by every attention path of cq, CPU and CUDA, to
/// each score before its maximum is taken (tanh is increasing, so a capped maximum is the maximum of
/// the capped scores).
CQ_HOST_DEVICE inline float soft_cap(float s, float cap) { return cap > 0.0f ? SoftCap(cap)(s) : s; }

namespace detail {
/// A logit soft cap as given by a caller: returned when 0 (none) or finite and positive, else
/// throws cq::Error naming `what`.
inline float check_soft_cap(float cap, const char* what) {
  CQ_CHECK(std::isfinite(cap) && cap >= 0.0f, what, ": logits_soft_cap ", cap, " must be 0 (none) or finite and positive");
  return cap;
}
}  // namespace detail

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
