#pragma once
/// Decode attention directly on CQ codes, for one KV head and the query heads that share it.
///
/// For a query at position p the visible tokens are [0, p]:
///   sinks   [0, S)                       full precision
///   coded   [S, max(S, p + 1 - W))       key and value codes
///   window  [max(S, p + 1 - W), p + 1)   full precision (the W most recent tokens)
/// Scores of coded tokens come from a per-query-head table LUT[g][j] = scale * q_g . centroid_K[g][j]
/// (G lookups per token instead of D multiplies); softmax weights of coded tokens are accumulated
/// into per-group histograms over value codes, turned into an output by one small
/// (G x 2^Bits x C) product at the end. Full-precision tokens are scored and accumulated densely.
/// Everything is merged by a streaming softmax with a lazily raised reference maximum (the
/// accumulators are rescaled only when a score exceeds the reference by more than 16, so almost
/// never), and long code ranges can be split across threads and merged (flash-decoding).
///
/// Coded keys may be stored before RoPE (KVHeadView::rope set): then they are decoded and rotated
/// to their positions inside the kernel (no table; the quality/speed trade-off is measured in
/// bench/RESULTS.md). Post-RoPE coded keys use the table as is. Full-precision keys (sinks,
/// window) are always given rotated.

#include "cq/backend/native.hpp"
#include "cq/codebook.hpp"
#include "cq/detail/aligned_buffer.hpp"
#include "cq/detail/centroid_copy.hpp"
#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/executor.hpp"
#include "cq/packed_codes.hpp"
#include "cq/rope.hpp"
#include "cq/views.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace cq {

/// What attention reads of one KV head's cache, as views over memory someone else owns.
template <element_type T>
struct KVHeadView {
  std::size_t head_dim = 0;
  CodebookView key_codebook, value_codebook;
  ConstPackedCodesView key_codes, value_codes;  // code index i is position sinks + i
  ConstMatrixView<T> sink_keys, sink_values;    // positions [0, sink_keys.rows); keys after RoPE
  ConstMatrixView<T> recent_keys, recent_values;  // positions [recent_first, recent_first + rows); keys after RoPE
  std::size_t recent_first = 0;
  std::size_t sinks = 0;   // S
  std::size_t window = 0;  // W
  const RopeConfig* rope = nullptr;        // non-null: coded keys are stored before RoPE...
  const double* rope_inv_freq = nullptr;   // ...with these head_dim / 2 inverse frequencies
};

/// How attend_head computes the coded part.
enum class AttentionMethod : unsigned char {
  fused,            // key score tables; the backend's preferred value path (below)
  fused_histogram,  // key score tables; per-group histograms over value codes, one product at the end
  fused_centroids,  // key score tables; weighted value centroids accumulated per token
  dequantize,       // decode coded keys and values to float, then dense attention (baseline)
};

namespace detail {

inline constexpr float lazy_max_slack = 16.0f;   // see the top of this file
inline constexpr std::size_t superblock = 512;   // coded tokens scored per step (multiple of 32)

/// One query head's streaming-softmax state: acc (head_dim) and hist (value groups x stride) hold
/// sums of exp(score - ref) * value.
struct SoftmaxState {
  float* acc;
  float* hist;
  float ref;
  float sum;
};

struct AttentionScratch {
  AlignedBuffer<float> lut, scores, rows, parts;
  std::vector<std::uint32_t> codes;
  std::vector<SoftmaxState> states;
};
inline AttentionScratch& attention_scratch() {
  thread_local AttentionScratch s;
  return s;
}


template <class Backend>
void raise_reference(SoftmaxState& st, float block_max, std::size_t acc_len, std::size_t hist_len) {
  if (st.ref != -std::numeric_limits<float>::infinity() && block_max <= st.ref + lazy_max_slack) return;
  if (st.ref != -std::numeric_limits<float>::infinity()) {
    const float f = std::exp(st.ref - block_max);
    Backend::scale(st.acc, acc_len, f);
    if (hist_len) Backend::scale(st.hist, hist_len, f);
    st.sum *= f;
  }
  st.ref = block_max;
}

/// Layout of the per-head state buffer: [acc (head_dim) | hist (hist_len)].
struct StateLayout {
  std::size_t head_dim, hist_stride, hist_len;
  std::size_t floats() const { return head_dim + hist_len; }
};

template <class Backend, element_type T>
class HeadAttention {
 public:
  HeadAttention(const KVHeadView<T>& kv, const float* q, std::size_t heads, std::size_t pos, float scale,
                AttentionMethod method)
      : kv_(kv), q_(q), heads_(heads), pos_(pos), scale_(scale), method_(method) {
    const std::size_t D = kv.head_dim;
    CQ_CHECK(heads >= 1, "attend: at least one query head is needed");
    const std::size_t visible = pos + 1;
    const std::size_t S = std::min(kv.sinks, visible);
    CQ_CHECK(kv.sink_keys.rows >= S, "attend: position ", pos, " needs ", S, " sink tokens, the view has ",
             kv.sink_keys.rows);
    win_lo_ = std::max(kv.sinks, visible > kv.window ? visible - kv.window : 0);
    win_lo_ = std::min(win_lo_, visible);
    coded_ = win_lo_ > kv.sinks ? win_lo_ - kv.sinks : 0;
    CQ_CHECK(coded_ <= kv.key_codes.tokens && coded_ <= kv.value_codes.tokens, "attend: position ", pos,
             " needs ", coded_, " coded tokens, the view has ", std::min(kv.key_codes.tokens, kv.value_codes.tokens));
    CQ_CHECK(win_lo_ >= visible || (win_lo_ >= kv.recent_first && visible <= kv.recent_first + kv.recent_keys.rows),
             "attend: the window of position ", pos, " starts at ", win_lo_, " but full-precision rows cover [",
             kv.recent_first, ", ", kv.recent_first + kv.recent_keys.rows, ")");
    CQ_CHECK(kv.key_codebook.dim() == D && kv.value_codebook.dim() == D, "attend: codebooks of dim ",
             kv.key_codebook.dim(), " / ", kv.value_codebook.dim(), " for head_dim ", D);
    // Value path: histograms pay off once there are more coded tokens than bins to clear and
    // combine; backend::Simd prefers the direct centroid accumulation on CPUs (measured).
    fused_ = method != AttentionMethod::dequantize;
    hist_ = method == AttentionMethod::fused_histogram ||
            (method == AttentionMethod::fused && Backend::prefers_value_histogram(kv.value_codebook) &&
             coded_ >= kv.value_codebook.num_centroids());
    layout_.head_dim = D;
    layout_.hist_stride = kv.value_codebook.padded_centroids;
    layout_.hist_len = hist_ ? kv.value_codebook.groups * layout_.hist_stride : 0;
  }

  std::size_t coded_tokens() const { return coded_; }
  const StateLayout& layout() const { return layout_; }

  /// Attends over the coded range [c0, c1) (code indices; c0 % 32 == 0) and, if `dense`, over the
  /// sink and window tokens. `states` holds heads x layout().floats() floats.
  void run(std::size_t c0, std::size_t c1, bool dense, float* states, SoftmaxState* st) const {
    const std::size_t D = kv_.head_dim;
    for (std::size_t h = 0; h < heads_; ++h) {
      float* base = states + h * layout_.floats();
      std::fill(base, base + layout_.floats(), 0.0f);
      st[h] = {base, base + D, -std::numeric_limits<float>::infinity(), 0.0f};
    }
    if (dense) run_dense(st);
    if (c1 > c0) run_coded(c0, c1, st);
  }

  /// Merges `parts` partial states (each heads x floats) into the first one.
  void merge(float* states, SoftmaxState* st, std::size_t parts) const {
    const std::size_t n = layout_.floats();
    for (std::size_t p = 1; p < parts; ++p)
      for (std::size_t h = 0; h < heads_; ++h) {
        SoftmaxState& a = st[h];
        const SoftmaxState& b = st[p * heads_ + h];
        if (b.ref == -std::numeric_limits<float>::infinity()) continue;
        const float ref = std::max(a.ref, b.ref);
        const float fa = a.ref == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(a.ref - ref);
        const float fb = std::exp(b.ref - ref);
        float* x = states + h * n;
        const float* y = states + (p * heads_ + h) * n;
        for (std::size_t i = 0; i < n; ++i) x[i] = fa * x[i] + fb * y[i];
        a.sum = fa * a.sum + fb * b.sum;
        a.ref = ref;
      }
  }

  /// out (heads x head_dim) from merged states.
  void finish(const SoftmaxState* st, float* out) const {
    const std::size_t D = kv_.head_dim;
    for (std::size_t h = 0; h < heads_; ++h) {
      float* o = out + h * D;
      std::copy_n(st[h].acc, D, o);
      if (hist_) Backend::combine_centroids(kv_.value_codebook, st[h].hist, layout_.hist_stride, o);
      Backend::scale(o, D, st[h].sum > 0.0f ? 1.0f / st[h].sum : 0.0f);
    }
  }

 private:
  void run_dense(SoftmaxState* st) const {
    const std::size_t D = kv_.head_dim;
    const std::size_t visible = pos_ + 1;
    const std::size_t S = std::min(kv_.sinks, visible);
    const std::size_t nw = visible - win_lo_;
    const std::size_t n = S + nw;
    if (n == 0) return;
    AttentionScratch& sc = attention_scratch();
    sc.scores.resize(std::max(sc.scores.size(), n));
    for (std::size_t h = 0; h < heads_; ++h) {
      const float* q = q_ + h * D;
      float* s = sc.scores.data();
      auto key = [&](std::size_t j) { return j < S ? kv_.sink_keys.row(j) : kv_.recent_keys.row(win_lo_ + (j - S) - kv_.recent_first); };
      auto value = [&](std::size_t j) { return j < S ? kv_.sink_values.row(j) : kv_.recent_values.row(win_lo_ + (j - S) - kv_.recent_first); };
      for (std::size_t j = 0; j < n; ++j) s[j] = scale_ * Backend::dot(q, key(j), D);  // fp16/bf16 converted in registers
      raise_reference<Backend>(st[h], Backend::max_of(s, n), D, layout_.hist_len);
      st[h].sum += Backend::exp_sum(s, n, st[h].ref);
      for (std::size_t j = 0; j < n; ++j) Backend::axpy(s[j], value(j), st[h].acc, D);
    }
  }

  void run_coded(std::size_t c0, std::size_t c1, SoftmaxState* st) const {
    const std::size_t D = kv_.head_dim;
    const CodebookView& kcb = kv_.key_codebook;
    AttentionScratch& sc = attention_scratch();
    const bool use_lut = fused_ && kv_.rope == nullptr;
    const bool rope_fused = fused_ && kv_.rope != nullptr;  // pre-RoPE keys scored token by token
    const std::size_t lut_stride = kcb.padded_centroids;
    if (use_lut) {
      sc.lut.resize(std::max(sc.lut.size(), heads_ * kcb.groups * lut_stride));
      for (std::size_t h = 0; h < heads_; ++h)
        Backend::score_lut(kcb, q_ + h * D, scale_, sc.lut.data() + h * kcb.groups * lut_stride, lut_stride);
    }
    const bool decode_keys = !use_lut && !rope_fused;  // dequantise-then-attend
    const bool decode_values = !fused_;
    // Scratch rows: a superblock of decoded keys and values, or one key row for rope_fused.
    const std::size_t rows_needed = decode_keys || decode_values ? 2 * superblock * D : rope_fused ? D : 0;
    sc.scores.resize(std::max(sc.scores.size(), heads_ * superblock));
    sc.rows.resize(std::max(sc.rows.size(), rows_needed));
    std::unique_ptr<RopeStepper> stepper;
    if (kv_.rope) {
      CQ_CHECK(kv_.rope_inv_freq != nullptr, "attend: pre-RoPE keys need rope_inv_freq in the view");
      stepper = std::make_unique<RopeStepper>(kv_.rope_inv_freq, D, kv_.sinks + c0);
    }

    for (std::size_t t0 = c0; t0 < c1; t0 += superblock) {
      const std::size_t n = std::min(superblock, c1 - t0);
      float* krows = rows_needed ? sc.rows.data() : nullptr;  // (no scratch rows unless decoding)
      float* vrows = decode_values ? sc.rows.data() + superblock * D : nullptr;
      if (decode_keys) Backend::decode(kcb, kv_.key_codes, t0, MatrixView<float>(krows, n, D));
      if (decode_values) Backend::decode(kv_.value_codebook, kv_.value_codes, t0, MatrixView<float>(vrows, n, D));
      if (decode_keys && kv_.rope) rotate_rows(krows, n, *stepper);
      if (rope_fused) rope_scores(t0, n, *stepper, krows, sc);
      for (std::size_t h = 0; h < heads_; ++h) {
        float* s = sc.scores.data() + h * superblock;
        if (use_lut) {
          Backend::score_codes(sc.lut.data() + h * kcb.groups * lut_stride, lut_stride, kv_.key_codes, t0, n, s);
        } else if (!rope_fused) {
          const float* q = q_ + h * D;
          for (std::size_t i = 0; i < n; ++i) s[i] = scale_ * Backend::template dot<float>(q, krows + i * D, D);
        }
        raise_reference<Backend>(st[h], Backend::max_of(s, n), D, layout_.hist_len);
        st[h].sum += Backend::exp_sum(s, n, st[h].ref);
        if (hist_) {
          Backend::add_histogram(kv_.value_codes, t0, n, s, st[h].hist, layout_.hist_stride);
        } else if (fused_) {
          Backend::accumulate_centroids(kv_.value_codebook, kv_.value_codes, t0, n, s, st[h].acc);
        } else {
          for (std::size_t i = 0; i < n; ++i) Backend::axpy(s[i], vrows + i * D, st[h].acc, D);
        }
      }
    }
  }

  // Rotates decoded pre-RoPE key rows to their positions (consecutive, from the stepper's).
  void rotate_rows(float* rows, std::size_t n, RopeStepper& stepper) const {
    for (std::size_t i = 0; i < n; ++i, stepper.advance()) rotate_row(rows + i * kv_.head_dim, stepper);
  }
  void rotate_row(float* __restrict k, const RopeStepper& stepper) const {
    const std::size_t half_d = kv_.head_dim / 2;
    const float* __restrict c = stepper.cos();
    const float* __restrict s = stepper.sin();
    if (kv_.rope->style == RopeStyle::rotate_half) {
      for (std::size_t j = 0; j < half_d; ++j) {
        const float a = k[j], b = k[j + half_d];
        k[j] = a * c[j] - b * s[j];
        k[j + half_d] = b * c[j] + a * s[j];
      }
    } else {
      for (std::size_t j = 0; j < half_d; ++j) {
        const float a = k[2 * j], b = k[2 * j + 1];
        k[2 * j] = a * c[j] - b * s[j];
        k[2 * j + 1] = b * c[j] + a * s[j];
      }
    }
  }

  // Scores of pre-RoPE coded keys for the fused methods, token by token in L1: the key's
  // centroids are copied into one scratch row, rotated to the token's position and dotted with
  // each head's query. (Decoding a superblock of rows first, then rotating it in place, made
  // three passes over 256 KiB of rows through L2.)
  void rope_scores(std::size_t t0, std::size_t n, RopeStepper& stepper, float* k, AttentionScratch& sc) const {
    const CodebookView& kcb = kv_.key_codebook;
    const std::size_t D = kv_.head_dim, G = kcb.groups, C = kcb.channels, K = kcb.num_centroids();
    sc.codes.resize(std::max(sc.codes.size(), superblock * G));
    std::uint32_t* codes = sc.codes.data();
    for (std::size_t g = 0; g < G; ++g) load_group_codes(kv_.key_codes, g, t0, n, codes + g, G);
    for (std::size_t i = 0; i < n; ++i, stepper.advance()) {
      const std::uint32_t* code = codes + i * G;
      for (std::size_t g = 0; g < G; ++g) cq::detail::put_centroid(kcb.centroids + (g * K + code[g]) * C, C, k + g * C);
      rotate_row(k, stepper);
      for (std::size_t h = 0; h < heads_; ++h)
        sc.scores[h * superblock + i] = scale_ * Backend::template dot<float>(q_ + h * D, k, D);
    }
  }

  const KVHeadView<T>& kv_;
  const float* q_;
  std::size_t heads_, pos_;
  float scale_;
  AttentionMethod method_;
  std::size_t win_lo_ = 0, coded_ = 0;
  bool fused_ = true, hist_ = false;
  StateLayout layout_{};
};

}  // namespace detail

/// Attention of `heads` query heads (q: heads x head_dim, contiguous) at position `pos` over one
/// KV head's cache; writes out (heads x head_dim). With an executor and `parts` > 1 the coded
/// range is split into that many pieces computed in parallel and merged (for long contexts when
/// there are fewer heads than threads). Each thread keeps its own reusable scratch.
template <class Backend = backend::Native, element_type T>
void attend_head(const KVHeadView<T>& kv, const float* q, std::size_t heads, std::size_t pos, float scale, float* out,
                 AttentionMethod method = AttentionMethod::fused, Executor* exec = nullptr, std::size_t parts = 1) {
  detail::HeadAttention<Backend, T> ha(kv, q, heads, pos, scale, method);
  const std::size_t coded = ha.coded_tokens();
  // Pieces are whole 32-token blocks, at least a few superblocks long, or splitting costs more
  // than it saves.
  const std::size_t max_parts = std::max<std::size_t>(1, coded / (4 * detail::superblock));
  parts = exec ? std::clamp<std::size_t>(parts, 1, max_parts) : 1;
  const std::size_t per = (coded / parts + block_tokens - 1) / block_tokens * block_tokens;
  const std::size_t floats = heads * ha.layout().floats();
  // Partial states live in the caller's scratch; each piece's own scratch is its thread's.
  detail::AttentionScratch& sc = detail::attention_scratch();
  sc.parts.resize(std::max(sc.parts.size(), parts * floats));
  if (sc.states.size() < parts * heads) sc.states.resize(parts * heads);
  detail::SoftmaxState* st = sc.states.data();
  float* states = sc.parts.data();
  auto piece = [&](std::size_t p) {
    const std::size_t c0 = std::min(coded, p * per), c1 = p + 1 == parts ? coded : std::min(coded, (p + 1) * per);
    ha.run(c0, c1, p == 0, states + p * floats, st + p * heads);
  };
  if (parts == 1 || exec == nullptr) piece(0);
  else exec->parallel_for(parts, piece);
  ha.merge(states, st, parts);
  ha.finish(st, out);
}

}  // namespace cq
