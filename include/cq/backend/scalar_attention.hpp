#pragma once
/// The attention primitives of the scalar reference backend (inherited by backend::Scalar):
/// obvious loops, the oracle the SIMD versions are tested against.
///
/// Conventions shared by every backend:
///   - a score table ("LUT") has one row of `lut_stride` floats per key group;
///     lut[g * lut_stride + j] = scale * (q_g . key_centroid[g][j]);
///   - a value histogram has one row of `hist_stride` floats per value group;
///   - code ranges start at a multiple of block_tokens (32) and may end anywhere;
///   - the grouped operations (`*_heads`) serve the L query heads of a GQA group at once, heads
///     innermost: a table or histogram entry (g, j) is L floats at ((g * K + j) * L), K = the
///     padded centroid count; per-token scores and weights are L floats at (i * L). Lanes past
///     the group's heads hold zeros and are ignored.

#include "cq/attention/softmax_state.hpp"
#include "cq/codebook.hpp"
#include "cq/detail/line_prefetch.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"
#include "cq/rope.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace cq::backend {

struct ScalarAttentionOps {
  /// lut[g * stride + j] = scale * sum_c q[g * C + c] * centroid[g][j][c]; stride >= num_centroids.
  static void score_lut(const CodebookView& cb, const float* q, float scale, float* lut, std::size_t stride) {
    for (std::size_t g = 0; g < cb.groups; ++g)
      for (std::size_t j = 0; j < cb.num_centroids(); ++j) {
        const float* c = cb.centroids + (g * cb.num_centroids() + j) * cb.channels;
        float s = 0.0f;
        for (std::size_t k = 0; k < cb.channels; ++k) s += q[g * cb.channels + k] * c[k];
        lut[g * stride + j] = scale * s;
      }
  }

  /// scores[i] = sum_g lut[g * stride + code(first + i, g)] for i < n.
  static void score_codes(const float* lut, std::size_t stride, ConstPackedCodesView codes, std::size_t first,
                          std::size_t n, float* scores) {
    for (std::size_t i = 0; i < n; ++i) {
      float s = 0.0f;
      for (std::size_t g = 0; g < codes.groups; ++g) s += lut[g * stride + codes.get(first + i, g)];
      scores[i] = s;
    }
  }

  /// hist[g * stride + code(first + i, g)] += p[i] for i < n.
  static void add_histogram(ConstPackedCodesView codes, std::size_t first, std::size_t n, const float* p, float* hist,
                            std::size_t stride) {
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t g = 0; g < codes.groups; ++g) hist[g * stride + codes.get(first + i, g)] += p[i];
  }

  /// acc[g * C + c] += sum_i p[i] * centroid[g][code(first + i, g)][c]: values straight from the
  /// value centroids, without a histogram. `pf` (optional): cache lines a fast backend issues a
  /// share of per 32-token block while it runs (detail::LinePrefetch); the reference ignores it.
  static void accumulate_centroids(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, std::size_t n,
                                   const float* p, float* acc, detail::LinePrefetch* = nullptr) {
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t g = 0; g < cb.groups; ++g) {
        const float* c = cb.centroids + (g * cb.num_centroids() + codes.get(first + i, g)) * cb.channels;
        for (std::size_t k = 0; k < cb.channels; ++k) acc[g * cb.channels + k] += p[i] * c[k];
      }
  }

  /// Whether a fused kernel should accumulate values through histograms (else straight from the
  /// centroids). The reference takes the histogram, the method the design specifies.
  static bool prefers_value_histogram(const CodebookView&) { return true; }

  /// out[g * C + c] += sum_j hist[g * stride + j] * centroid[g][j][c].
  static void combine_centroids(const CodebookView& cb, const float* hist, std::size_t stride, float* out) {
    for (std::size_t g = 0; g < cb.groups; ++g)
      for (std::size_t j = 0; j < cb.num_centroids(); ++j) {
        const float w = hist[g * stride + j];
        const float* c = cb.centroids + (g * cb.num_centroids() + j) * cb.channels;
        for (std::size_t k = 0; k < cb.channels; ++k) out[g * cb.channels + k] += w * c[k];
      }
  }

  // ---- grouped (GQA) operations ----

  /// lut[(g * K + j) * L + h] = scale * q_h[g] . centroid[g][j] for h < heads (q: heads x dim).
  static void score_lut_heads(const CodebookView& cb, const float* q, std::size_t heads, std::size_t L, float scale,
                              float* lut) {
    const std::size_t K = cb.padded_centroids;
    std::fill(lut, lut + cb.groups * K * L, 0.0f);
    for (std::size_t h = 0; h < heads; ++h)
      for (std::size_t g = 0; g < cb.groups; ++g)
        for (std::size_t j = 0; j < cb.num_centroids(); ++j) {
          const float* c = cb.centroids + (g * cb.num_centroids() + j) * cb.channels;
          float s = 0.0f;
          for (std::size_t k = 0; k < cb.channels; ++k) s += q[h * cb.dim() + g * cb.channels + k] * c[k];
          lut[(g * K + j) * L + h] = scale * s;
        }
  }

  /// scores[i * L + h] = sum_g lut[(g * K + code(first + i, g)) * L + h] for i < n.
  static void score_codes_heads(const float* lut, std::size_t K, std::size_t L, ConstPackedCodesView codes,
                                std::size_t first, std::size_t n, float* scores) {
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t h = 0; h < L; ++h) {
        float s = 0.0f;
        for (std::size_t g = 0; g < codes.groups; ++g) s += lut[(g * K + codes.get(first + i, g)) * L + h];
        scores[i * L + h] = s;
      }
  }

  /// hist[(g * K + code(first + i, g)) * L + h] += w[i * L + h] for i < n.
  static void add_histogram_heads(ConstPackedCodesView codes, std::size_t first, std::size_t n, const float* w,
                                  std::size_t K, std::size_t L, float* hist) {
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t g = 0; g < codes.groups; ++g)
        for (std::size_t h = 0; h < L; ++h) hist[(g * K + codes.get(first + i, g)) * L + h] += w[i * L + h];
  }

  /// out[h * out_stride + g * C + c] += sum_j hist[(g * K + j) * L + h] * centroid[g][j][c], h < heads.
  static void combine_centroids_heads(const CodebookView& cb, const float* hist, std::size_t L, std::size_t heads,
                                      float* out, std::size_t out_stride) {
    const std::size_t K = cb.padded_centroids;
    for (std::size_t h = 0; h < heads; ++h)
      for (std::size_t g = 0; g < cb.groups; ++g)
        for (std::size_t j = 0; j < cb.num_centroids(); ++j) {
          const float w = hist[(g * K + j) * L + h];
          const float* c = cb.centroids + (g * cb.num_centroids() + j) * cb.channels;
          for (std::size_t k = 0; k < cb.channels; ++k) out[h * out_stride + g * cb.channels + k] += w * c[k];
        }
  }

  /// scores[i * L + h] = sum_d qt[d * L + h] * rows[i * dim + d] for i < n: decoded (rotated) key
  /// rows against the group's queries, transposed to (dim, L) lanes.
  static void score_rows_heads(const float* qt, std::size_t L, const float* rows, std::size_t n, std::size_t dim,
                               float* scores) {
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t h = 0; h < L; ++h) {
        float s = 0.0f;
        for (std::size_t d = 0; d < dim; ++d) s += qt[d * L + h] * rows[i * dim + d];
        scores[i * L + h] = s;
      }
  }

  /// Most heads of a GQA group that score_rope_codes should serve in one call: up to this many,
  /// attention scores pre-RoPE keys from their codes; more decode and rotate each key once into
  /// rows (rope_rows) and score those against every head (score_rows_heads).
  static std::size_t rope_code_heads(const CodebookView&, const RopeSteps&) { return 4; }

  /// Pre-RoPE keys against queries turned back to their anchors (rope_rotate_back): for i < n
  /// (n <= 2 * rs.period), with k the decoded key of token first + i and t = i % rs.period:
  /// scores[h * stride + i] = qr[((i / rs.period) * heads + h) * dim ..] . R(t) k. Codes and
  /// queries (2, heads, dim) as the key codebook's dim.
  static void score_rope_codes(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, std::size_t n,
                               const RopeSteps& rs, const float* qr, std::size_t heads, float* scores,
                               std::size_t stride) {
    const std::size_t D = cb.dim();
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t h = 0; h < heads; ++h) {
        const float* q = qr + ((i / rs.period) * heads + h) * D;
        float s = 0.0f;
        for (std::size_t c = 0; c < D; ++c) s += q[c] * rope_channel(cb, codes, first + i, rs, i % rs.period, c);
        scores[h * stride + i] = s;
      }
  }

  /// rows[i * dim + c] = (R(i % rs.period) k)_c for i < n, k the decoded key of token first + i.
  static void rope_rows(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, std::size_t n,
                        const RopeSteps& rs, float* rows) {
    const std::size_t D = cb.dim();
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t c = 0; c < D; ++c) rows[i * D + c] = rope_channel(cb, codes, first + i, rs, i % rs.period, c);
  }

  /// Channel c of token `token`'s decoded key rotated by R(t).
  static float rope_channel(const CodebookView& cb, const ConstPackedCodesView& codes, std::size_t token,
                            const RopeSteps& rs, std::size_t t, std::size_t c) {
    auto key = [&](std::size_t d) {
      const std::size_t g = d / cb.channels;
      return cb.centroids[(g * cb.num_centroids() + codes.get(token, g)) * cb.channels + d % cb.channels];
    };
    if (c >= rs.rotary_dim) return key(c);
    return key(c) * rs.cos(t)[c] + key(rs.partner(c)) * rs.sin(t)[c];
  }

  /// Per lane h < L: m[h] = max over i < n of x[i * L + h].
  static void max_lanes(const float* x, std::size_t n, std::size_t L, float* m) {
    for (std::size_t h = 0; h < L; ++h) m[h] = -std::numeric_limits<float>::infinity();
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t h = 0; h < L; ++h) m[h] = x[i * L + h] > m[h] ? x[i * L + h] : m[h];
  }
  /// x[i * L + h] = exp(x[i * L + h] - shift[h]); sum[h] += the new values.
  static void exp_sum_lanes(float* x, std::size_t n, std::size_t L, const float* shift, float* sum) {
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t h = 0; h < L; ++h) sum[h] += x[i * L + h] = std::exp(x[i * L + h] - shift[h]);
  }

  static float max_of(const float* x, std::size_t n) {
    float m = -std::numeric_limits<float>::infinity();
    for (std::size_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
  }
  /// x[i] = exp(x[i] - shift); returns the sum.
  static float exp_sum(float* x, std::size_t n, float shift) {
    float s = 0.0f;
    for (std::size_t i = 0; i < n; ++i) s += x[i] = std::exp(x[i] - shift);
    return s;
  }
  static void scale(float* x, std::size_t n, float a) {
    for (std::size_t i = 0; i < n; ++i) x[i] *= a;
  }
  /// x[i] = cap * tanh(x[i] / cap) (cap > 0): logit soft-capping (softmax_state.hpp).
  static void soft_cap(float* x, std::size_t n, float cap) {
    const SoftCap c(cap);
    for (std::size_t i = 0; i < n; ++i) x[i] = c(x[i]);
  }

  /// sum_i a[i] * b[i] with b of any element type.
  template <element_type T>
  static float dot(const float* a, const T* b, std::size_t n) {
    float s = 0.0f;
    for (std::size_t i = 0; i < n; ++i) s += a[i] * to_float(b[i]);
    return s;
  }
  /// y[i] += a * x[i].
  template <element_type T>
  static void axpy(float a, const T* x, float* y, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
  }
};

}  // namespace cq::backend
