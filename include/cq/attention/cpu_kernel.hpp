#pragma once
/// The CPU attention kernel for one KV head and the query heads that share it (GQA), at one
/// query position, over one piece of the coded range (the planner, cpu_plan.hpp, splits long
/// ranges into pieces that run on different threads and merge).
///
/// Scores of coded tokens come from a per-query-head table LUT[g][j] = scale * q_g . centroid_K[g][j]
/// (G lookups per token instead of D multiplies); softmax weights of coded tokens are either
/// accumulated into per-group histograms over value codes, turned into values by one small
/// (G x 2^Bits x C) product at the end of each piece, or multiplied into the value centroids as
/// they stream (the backend chooses). The query heads of a GQA group are served together
/// ("grouped"): their tables and histograms keep the heads innermost, so each coded token costs
/// one table row and one histogram update per group for all of them
/// (backend/simd_group_attention.hpp), and the work per token does not grow with the group.
/// Full-precision tokens are scored and accumulated densely. Each query head keeps an
/// online-softmax state (softmax_state.hpp) whose reference maximum is raised
/// lazily: accumulators are rescaled only when a score exceeds the reference by more than 16, so
/// almost never. Coded tokens are walked in steps of at most 512 that never cross a page.
///
/// Keys stored before RoPE (view.rope set) are rotated here. Coded keys (no table): a key at
/// position anchor + t rotates as R(anchor) R(t), so the queries are turned back by R(anchor) once
/// per 16 tokens and each key is decoded and rotated by R(t) from the Rope's step table, in
/// registers for up to four heads at a time (Backend::score_rope_codes); grouped items of more
/// heads rotate each key once into rows and score them with the heads in lanes
/// (Backend::rope_rows, score_rows_heads). Full-precision rows are rotated once per KV head for
/// all its query heads.

#include "cq/attention/head_view.hpp"
#include "cq/attention/problem.hpp"
#include "cq/attention/softmax_state.hpp"
#include "cq/codebook.hpp"
#include "cq/detail/aligned_buffer.hpp"
#include "cq/detail/line_prefetch.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"
#include "cq/rope.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>

namespace cq::detail {

inline constexpr float lazy_max_slack = 16.0f;   // see the top of this file
inline constexpr std::size_t superblock = 512;   // coded tokens scored per step (multiple of 32)

/// Layout of a piece's accumulators: acc (heads, head_dim), then the value histograms: one per
/// head (heads, value groups, hist_stride), or one for the group with the heads in `lanes` lanes
/// (value groups, hist_stride, lanes).
struct StateLayout {
  std::size_t heads = 0, head_dim = 0, hist_stride = 0, hist_entries = 0, lanes = 0;  // lanes > 0: grouped
  std::size_t acc_len() const { return heads * head_dim; }
  std::size_t hist_len() const { return lanes ? hist_entries * lanes : heads * hist_entries; }
  std::size_t floats() const { return acc_len() + hist_len(); }
};

/// One query head's running state in a piece: its online-softmax state and its accumulators.
struct HeadState {
  float* acc;   // (head_dim): sum of weight x value of full-precision and centroid-accumulated tokens
  float* hist;  // value histogram: this head's (value groups, hist_stride), or the group's (lane `lane`)
  std::size_t lane;
  SoftmaxState softmax;
};

/// Scratch of one piece, reused across calls on a thread. Only HeadAttention::run touches it, and
/// run never calls an executor, so no other work can run on this thread while it is in use.
struct PieceScratch {
  AlignedBuffer<float> lut, scores, rows;
};
inline PieceScratch& piece_scratch() {
  thread_local PieceScratch s;
  return s;
}

/// Raises a head's reference to `block_max` when it exceeds it by more than the slack, rescaling
/// the head's accumulators (in a grouped histogram, its lane).
template <class Backend>
void raise_reference(HeadState& st, float block_max, const StateLayout& L, bool hist) {
  SoftmaxState& sm = st.softmax;
  const bool empty = sm.ref == -std::numeric_limits<float>::infinity();
  if (!empty && block_max <= sm.ref + lazy_max_slack) return;
  if (!empty) {
    const float f = softmax_exp(sm.ref - block_max);
    Backend::scale(st.acc, L.head_dim, f);
    if (hist && L.lanes)
      for (std::size_t e = 0; e < L.hist_entries; ++e) st.hist[e * L.lanes + st.lane] *= f;
    else if (hist)
      Backend::scale(st.hist, L.hist_entries, f);
    sm.sum *= f;
  }
  sm.ref = block_max;
}

/// Lanes of a grouped state for `heads` query heads (2, 4, 8 or 16).
inline std::size_t group_lanes(std::size_t heads) {
  std::size_t L = 2;
  while (L < heads) L *= 2;
  return L;
}

template <element_type T>
void row_to_float(const T* src, std::size_t n, float* dst) {
  if constexpr (std::is_same_v<T, float>) std::memcpy(dst, src, n * sizeof(float));
  else for (std::size_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <class Backend, element_type T>
class HeadAttention {
 public:
  /// `heads` query heads (q: heads x head_dim, contiguous) at position `pos`. The view must have
  /// passed check_head_view; the positions the query reads are checked here.
  /// `soft_cap` > 0 soft-caps every logit (cq::soft_cap) before its maximum is taken.
  HeadAttention(const KVHeadView<T>& kv, const float* q, std::size_t heads, std::size_t pos, float scale,
                float soft_cap, AttentionMethod method)
      : kv_(kv), q_(q), heads_(heads), scale_(scale), cap_(soft_cap), method_(method) {
    CQ_CHECK(heads >= 1, "attend: at least one query head is needed");
    vis_ = check_visible(kv, pos, "attend");
    // Value path: histograms pay off once there are more coded tokens than bins to clear and
    // combine; backend::Simd prefers the direct centroid accumulation on CPUs (measured).
    // A GQA group of 4..max_group_heads heads is served grouped unless a method asks otherwise,
    // once its coded range is long enough to pay for the group's table and histogram (each about
    // 2^Bits x head_dim lane vectors to build, clear and combine); smaller groups and short
    // ranges take the per-head path.
    CQ_CHECK(heads <= max_group_heads, "attend: ", heads, " query heads in one item (at most ", max_group_heads, ")");
    fused_ = method != AttentionMethod::dequantize;
    const bool grouped = heads >= 4 && vis_.coded() >= min_group_tokens &&
                         (method == AttentionMethod::fused || method == AttentionMethod::fused_histogram);
    hist_ = grouped || method == AttentionMethod::fused_histogram ||
            (method == AttentionMethod::fused && Backend::prefers_value_histogram(kv.value_codebook) &&
             vis_.coded() >= kv.value_codebook.num_centroids());
    layout_.heads = heads;
    layout_.head_dim = kv.head_dim;
    layout_.hist_stride = kv.value_codebook.padded_centroids;
    layout_.hist_entries = hist_ ? kv.value_codebook.groups * layout_.hist_stride : 0;
    layout_.lanes = grouped ? group_lanes(heads) : 0;
  }

  /// Most query heads one item serves (a larger GQA group is split into items).
  static constexpr std::size_t max_group_heads = 16;
  /// Fewest coded tokens the grouped path is taken for.
  static constexpr std::size_t min_group_tokens = 1024;
  std::size_t coded_tokens() const { return vis_.coded(); }
  std::size_t heads() const { return heads_; }
  const StateLayout& layout() const { return layout_; }

  /// Attends over code indices [c0, c1) (c0 % 32 == 0) and, if `full`, over the sink and window
  /// tokens. `states` holds layout().floats() floats, `st` heads states.
  void run(std::size_t c0, std::size_t c1, bool full, float* states, HeadState* st) const {
    std::fill(states, states + layout_.floats(), 0.0f);
    bind(states, st);
    if (full) run_full(st);
    if (c1 > c0) {
      if (layout_.lanes) run_coded_grouped(c0, c1, st);
      else run_coded(c0, c1, st);
      fold_histograms(st);
    }
  }

  /// Merges `parts` partial states into the first one: part p's layout().floats() floats at
  /// states + p x stride (stride >= layout().floats()), its heads states at st + p x st_stride.
  /// Only the value accumulators merge: every piece folded its histograms into them (run).
  void merge(float* states, std::size_t stride, HeadState* st, std::size_t st_stride, std::size_t parts) const {
    const std::size_t D = kv_.head_dim;
    for (std::size_t p = 1; p < parts; ++p) {
      const float* y = states + p * stride;
      for (std::size_t h = 0; h < heads_; ++h) {
        const MergeFactors f = merge_into(st[h].softmax, st[p * st_stride + h].softmax);
        for (std::size_t i = 0; i < D; ++i) states[h * D + i] = f.a * states[h * D + i] + f.b * y[h * D + i];
      }
    }
  }

  /// out (heads x head_dim) from merged states.
  void finish(const HeadState* st, float* out) const {
    const std::size_t D = kv_.head_dim;
    for (std::size_t h = 0; h < heads_; ++h) {
      float* o = out + h * D;
      std::copy_n(st[h].acc, D, o);
      Backend::scale(o, D, st[h].softmax.sum > 0.0f ? 1.0f / st[h].softmax.sum : 0.0f);
    }
  }

 private:
  // A piece's value histograms into its value accumulators, at the end of its coded range: the
  // histograms hold weights relative to the same softmax references as the accumulators, so the
  // pieces then merge (heads x head_dim) values instead of (value groups x 2^Bits) histograms per
  // head -- and each piece reads only its own histogram, on its own core, where a merge of
  // histograms read every other piece's from the core that wrote it.
  void fold_histograms(HeadState* st) const {
    if (!hist_) return;
    if (layout_.lanes) {  // the group's histogram, heads in lanes; the heads' accumulators are contiguous
      Backend::combine_centroids_heads(kv_.value_codebook, st[0].hist, layout_.lanes, heads_, st[0].acc, kv_.head_dim);
      return;
    }
    for (std::size_t h = 0; h < heads_; ++h)
      Backend::combine_centroids(kv_.value_codebook, st[h].hist, layout_.hist_stride, st[h].acc);
  }

  // Points each head's state at its accumulators in `states`.
  void bind(float* states, HeadState* st) const {
    float* hist = states + layout_.acc_len();
    for (std::size_t h = 0; h < heads_; ++h)
      st[h] = {states + h * layout_.head_dim, layout_.lanes ? hist : hist + h * layout_.hist_entries, h, SoftmaxState{}};
  }

  // Sinks and window: every row scored for every query head (pre-RoPE keys rotated once), then
  // one softmax step per head.
  void run_full(HeadState* st) const {
    const std::size_t D = kv_.head_dim, n = vis_.full();
    if (n == 0) return;
    PieceScratch& sc = piece_scratch();
    sc.scores.resize(std::max(sc.scores.size(), heads_ * n));
    float* s = sc.scores.data();  // (heads, n)
    auto value = [&](std::size_t j) {
      return j < vis_.sink_end ? kv_.sink_values.at(j) : kv_.recent_values.at(vis_.window_begin + (j - vis_.sink_end));
    };
    auto score = [&](std::size_t j, const auto* k) {
      for (std::size_t h = 0; h < heads_; ++h) s[h * n + j] = scale_ * Backend::dot(q_ + h * D, k, D);
    };
    if (kv_.rope) {
      sc.rows.resize(std::max(sc.rows.size(), D));
      float* k = sc.rows.data();
      RopeStepper stepper(*kv_.rope, kv_.position_offset);
      for (std::size_t j = 0; j < vis_.sink_end; ++j, stepper.advance()) {
        row_to_float(kv_.sink_keys.at(j), D, k);
        rope_rotate_stepped(*kv_.rope, stepper, k);
        score(j, k);
      }
      stepper.reset(*kv_.rope, kv_.position_offset + vis_.window_begin);
      for (std::size_t p = vis_.window_begin; p < vis_.window_end; ++p, stepper.advance()) {
        row_to_float(kv_.recent_keys.at(p), D, k);
        rope_rotate_stepped(*kv_.rope, stepper, k);
        score(vis_.sink_end + (p - vis_.window_begin), k);
      }
    } else {
      for (std::size_t j = 0; j < vis_.sink_end; ++j) score(j, kv_.sink_keys.at(j));
      for (std::size_t p = vis_.window_begin; p < vis_.window_end; ++p)
        score(vis_.sink_end + (p - vis_.window_begin), kv_.recent_keys.at(p));
    }
    cap(s, heads_ * n);
    for (std::size_t h = 0; h < heads_; ++h) {
      float* sh = s + h * n;
      raise_reference<Backend>(st[h], Backend::max_of(sh, n), layout_, hist_);
      st[h].softmax.sum += Backend::exp_sum(sh, n, st[h].softmax.ref);
      for (std::size_t j = 0; j < n; ++j) Backend::axpy(sh[j], value(j), st[h].acc, D);  // fp16/bf16 converted in registers
    }
  }

  void run_coded(std::size_t c0, std::size_t c1, HeadState* st) const {
    const std::size_t D = kv_.head_dim;
    const CodebookView& kcb = kv_.key_codebook;
    PieceScratch& sc = piece_scratch();
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
    const bool stream_values = fused_ && !hist_;  // values straight from the centroids, read at random
    // Scratch rows: a step of decoded keys and values, or the anchored queries (2, heads, D) for
    // rope_fused.
    const std::size_t rows_needed = decode_keys || decode_values ? 2 * superblock * D : rope_fused ? 2 * heads_ * D : 0;
    sc.scores.resize(std::max(sc.scores.size(), heads_ * superblock));
    sc.rows.resize(std::max(sc.rows.size(), rows_needed));
    std::optional<RopeStepper> stepper;
    if (kv_.rope) stepper.emplace(*kv_.rope, kv_.position_offset + kv_.sinks + c0);

    touch_codebooks(rope_fused, stream_values);
    const std::size_t P = kv_.key_codes.page_tokens;
    for (std::size_t t0 = c0; t0 < c1;) {
      const std::size_t page = t0 / P, in_page = t0 % P;
      const std::size_t n = step_tokens(t0, c1);
      const ConstPackedCodesView kc = kv_.key_codes.page(page), vc = kv_.value_codes.page(page);
      float* krows = rows_needed ? sc.rows.data() : nullptr;
      float* vrows = decode_values ? sc.rows.data() + superblock * D : nullptr;
      if (decode_keys) Backend::decode(kcb, kc, in_page, MatrixView<float>(krows, n, D));
      if (decode_values) Backend::decode(kv_.value_codebook, vc, in_page, MatrixView<float>(vrows, n, D));
      if (decode_keys && kv_.rope)
        for (std::size_t i = 0; i < n; ++i, stepper->advance()) rope_rotate_stepped(*kv_.rope, *stepper, krows + i * D);
      if (rope_fused)
        for (std::size_t b = 0; b < n; b += block_tokens) {
          const std::size_t m = std::min(block_tokens, n - b);
          anchor_queries(*stepper, m, nullptr, 0, krows);
          Backend::score_rope_codes(kcb, kc, in_page + b, m, kv_.rope->steps(), krows, heads_, sc.scores.data() + b,
                                    superblock);
        }
      // The value pass streams centroids: it also brings in the next step's code runs, a share of
      // lines per block over every head's pass (detail::LinePrefetch says why).
      LinePrefetch next;
      if (stream_values && t0 + n < c1)
        next = next_step_lines(t0 + n, c1, (n + block_tokens - 1) / block_tokens * heads_);
      for (std::size_t h = 0; h < heads_; ++h) {
        float* s = sc.scores.data() + h * superblock;
        if (use_lut) {
          Backend::score_codes(sc.lut.data() + h * kcb.groups * lut_stride, lut_stride, kc, in_page, n, s);
        } else if (!rope_fused) {
          const float* q = q_ + h * D;
          for (std::size_t i = 0; i < n; ++i) s[i] = scale_ * Backend::template dot<float>(q, krows + i * D, D);
        }
        cap(s, n);
        raise_reference<Backend>(st[h], Backend::max_of(s, n), layout_, hist_);
        st[h].softmax.sum += Backend::exp_sum(s, n, st[h].softmax.ref);
        if (hist_) {
          Backend::add_histogram(vc, in_page, n, s, st[h].hist, layout_.hist_stride);
        } else if (fused_) {
          Backend::accumulate_centroids(kv_.value_codebook, vc, in_page, n, s, st[h].acc, &next);
        } else {
          for (std::size_t i = 0; i < n; ++i) Backend::axpy(s[i], vrows + i * D, st[h].acc, D);
        }
      }
      t0 += n;
    }
  }

  // The coded range for a GQA group, heads in lanes: per step, scores (n, L) from the grouped
  // table (or pre-RoPE keys rotated once and dotted with every head), one lazy reference per head,
  // weights, and one histogram update per token and value group for all heads.
  void run_coded_grouped(std::size_t c0, std::size_t c1, HeadState* st) const {
    const std::size_t D = kv_.head_dim, L = layout_.lanes;
    const CodebookView& kcb = kv_.key_codebook;
    const std::size_t K = kcb.padded_centroids, Kv = layout_.hist_stride;
    PieceScratch& sc = piece_scratch();
    sc.scores.resize(std::max(sc.scores.size(), superblock * L));
    std::optional<RopeStepper> stepper;
    float *qt = nullptr, *qr = nullptr, *tmp = nullptr;
    // Pre-RoPE keys, each step period's queries turned back to its anchor: up to
    // Backend::rope_code_heads heads score the keys from their codes (Backend::score_rope_codes,
    // then the scores transposed to lanes); more heads decode and rotate each key once into a
    // block's rows in scratch and score them against every head at once, the queries transposed
    // to lanes (dim, L).
    const bool key_rows = kv_.rope && heads_ > Backend::rope_code_heads(kcb, kv_.rope->steps());
    if (kv_.rope) {
      stepper.emplace(*kv_.rope, kv_.position_offset + kv_.sinks + c0);
      const std::size_t head = block_tokens * std::max(D, L);
      sc.rows.resize(std::max(sc.rows.size(), head + 3 * D * L));
      qt = sc.rows.data() + head;
      qr = qt + D * L;
      tmp = sc.rows.data();  // key_rows ? the block's rows (block_tokens, D) : scores (heads, block_tokens)
      std::fill(qt, qt + D * L, 0.0f);
      for (std::size_t h = 0; h < heads_; ++h)
        for (std::size_t d = 0; d < D; ++d) qt[d * L + h] = q_[h * D + d];
    } else {
      sc.lut.resize(std::max(sc.lut.size(), kcb.groups * K * L));
      Backend::score_lut_heads(kcb, q_, heads_, L, scale_, sc.lut.data());
    }
    touch_codebooks(kv_.rope != nullptr, false);  // pre-RoPE keys are decoded; values go to the histogram
    float* s = sc.scores.data();
    float* hist = st[0].hist;
    const std::size_t P = kv_.key_codes.page_tokens;
    for (std::size_t t0 = c0; t0 < c1;) {
      const std::size_t page = t0 / P, in_page = t0 % P;
      const std::size_t n = step_tokens(t0, c1);
      const ConstPackedCodesView kc = kv_.key_codes.page(page), vc = kv_.value_codes.page(page);
      if (kv_.rope) {
        // 32 tokens at a time, so decoded keys or scores stay in L1.
        for (std::size_t b = 0; b < n; b += block_tokens) {
          const std::size_t m = std::min(block_tokens, n - b);
          const std::size_t per = Rope::step_period;
          if (key_rows) {
            anchor_queries(*stepper, m, qt, L, qr);
            Backend::rope_rows(kcb, kc, in_page + b, m, kv_.rope->steps(), tmp);
            for (std::size_t p = 0; p * per < m; ++p)
              Backend::score_rows_heads(qr + p * D * L, L, tmp + p * per * D, std::min(per, m - p * per), D,
                                        s + (b + p * per) * L);
          } else {
            anchor_queries(*stepper, m, nullptr, 0, qr);
            Backend::score_rope_codes(kcb, kc, in_page + b, m, kv_.rope->steps(), qr, heads_, tmp, block_tokens);
            for (std::size_t i = 0; i < m; ++i)
              for (std::size_t h = 0; h < L; ++h) s[(b + i) * L + h] = h < heads_ ? tmp[h * block_tokens + i] : 0.0f;
          }
        }
      } else {
        Backend::score_codes_heads(sc.lut.data(), K, L, kc, in_page, n, s);
      }
      cap(s, n * L);  // (padding lanes hold 0, which stays 0)
      float m[max_group_heads], shift[max_group_heads] = {}, sum[max_group_heads] = {};
      Backend::max_lanes(s, n, L, m);
      for (std::size_t h = 0; h < heads_; ++h) {
        raise_reference<Backend>(st[h], m[h], layout_, true);
        shift[h] = st[h].softmax.ref;
      }
      Backend::exp_sum_lanes(s, n, L, shift, sum);
      for (std::size_t h = 0; h < heads_; ++h) st[h].softmax.sum += sum[h];
      Backend::add_histogram_heads(vc, in_page, n, s, Kv, L, hist);
      t0 += n;
    }
  }

  // The codebooks a piece reads at random -- the key codebook when coded keys are decoded (pre-RoPE
  // keys; post-RoPE keys read it once, in order, for the score table), the value codebook when the
  // value pass streams centroids -- read in order first (detail::touch_lines says why).
  void touch_codebooks(bool keys, bool values) const {
    auto bytes = [](const CodebookView& cb) { return cb.groups * cb.num_centroids() * cb.channels * sizeof(float); };
    if (keys) touch_lines(kv_.key_codebook.centroids, bytes(kv_.key_codebook));
    if (values) touch_lines(kv_.value_codebook.centroids, bytes(kv_.value_codebook));
  }

  // Tokens of the step that starts at coded token t0 < c1: at most a superblock, inside one page
  // (the page size is a multiple of 32, t0 too).
  std::size_t step_tokens(std::size_t t0, std::size_t c1) const {
    const std::size_t P = kv_.key_codes.page_tokens;
    return std::min({superblock, c1 - t0, P - t0 % P});
  }

  // The key and value runs of the step that starts at coded token t1 (< c1), as lines to issue
  // over `blocks` calls of step().
  LinePrefetch next_step_lines(std::size_t t1, std::size_t c1, std::size_t blocks) const {
    const std::size_t P = kv_.key_codes.page_tokens, page = t1 / P, in_page = t1 % P;
    const std::size_t n = step_tokens(t1, c1);
    const ConstPackedCodesView kc = kv_.key_codes.page(page), vc = kv_.value_codes.page(page);
    const std::size_t first = in_page / block_tokens, count = (n + block_tokens - 1) / block_tokens;
    return {kc.chunk(first, 0), count * kc.block_bytes(), vc.chunk(first, 0), count * vc.block_bytes(), blocks};
  }

  // Logit soft-capping of n scores, when asked for.
  void cap(float* s, std::size_t n) const {
    if (cap_ > 0.0f) Backend::soft_cap(s, n, cap_);
  }

  // Queries turned back to the anchors of the (at most) two step periods of a 32-token block that
  // starts at the stepper's position: qr (2, heads, head_dim) or, transposed to lanes, qr (2,
  // head_dim, lanes) from base (head_dim, lanes); the stepper ends at the next block's anchor.
  void anchor_queries(RopeStepper& stepper, std::size_t m, const float* base, std::size_t lanes, float* qr) const {
    const std::size_t D = kv_.head_dim, per = Rope::step_period;
    static_assert(block_tokens == 2 * Rope::step_period, "cq: a code block spans two RoPE step periods");
    for (std::size_t p = 0; p * per < m; ++p, stepper.jump()) {
      float* out = qr + p * std::max(heads_, lanes) * D;
      if (lanes) rope_rotate_back(*kv_.rope, stepper, scale_, base, lanes, out);
      else
        for (std::size_t h = 0; h < heads_; ++h) rope_rotate_back(*kv_.rope, stepper, scale_, q_ + h * D, 1, out + h * D);
    }
  }

  const KVHeadView<T>& kv_;
  const float* q_;
  std::size_t heads_;
  float scale_, cap_;
  AttentionMethod method_;
  VisibleTokens vis_{};
  bool fused_ = true, hist_ = false;
  StateLayout layout_{};
};

}  // namespace cq::detail
