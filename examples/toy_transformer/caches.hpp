#pragma once
// The KV caches the toy model is evaluated with:
//   FloatCache  the fp32 reference (keys stored after RoPE);
//   CQCache     one sequence of a cq::PagedKVCache over codebooks shared by every cache of the
//               configuration (keys coded before RoPE and rotated inside attention, or after);
//   IntCache    the KIVI-style INT baseline: values per token over 32-channel groups, keys per
//               channel over 32-token blocks (a block is quantized once complete; the current
//               partial block stays full precision, as KIVI's residual does), post-RoPE keys.
// Every cache keeps a window of the W most recent tokens in full precision *per query*, so a
// 512-token chunk evaluates exactly as token-by-token decoding would.

#include "model.hpp"

#include <cq/cq.hpp>

#include <memory>
#include <string>

namespace toy {

/// Dense causal attention for queries q (T, n_heads * D) at positions first..first+T-1 over
/// keys/values (n, n_kv_heads * D). Where `kq`/`vq` are given, key j (value j) is read from them
/// instead when use_quantized_key(p, j) (use_quantized_value(p, j)) says so.
template <class KeyRule, class ValueRule>
void dense_attention(const Config& cfg, const Mat& q, int first, const Mat& kf, const Mat& vf, const Mat* kq, const Mat* vq,
                     KeyRule use_quantized_key, ValueRule use_quantized_value, Mat& out) {
  const int D = cfg.head_dim, group = cfg.n_heads / cfg.n_kv_heads, T = static_cast<int>(q.rows());
  const int n = first + T;
  const float scale = 1.0f / std::sqrt(float(D));
  out.resize(T, cfg.q_width());
  for (int h = 0; h < cfg.n_heads; ++h) {
    const int g = h / group;
    const auto Q = q.middleCols(h * D, D);
    Mat s = Q * kf.block(0, g * D, n, D).transpose();
    if (kq) {
      const Mat sq = Q * kq->block(0, g * D, n, D).transpose();
      for (int r = 0; r < T; ++r)
        for (int j = 0; j < n; ++j)
          if (use_quantized_key(first + r, j)) s(r, j) = sq(r, j);
    }
    Mat pq = Mat::Zero(T, n);
    for (int r = 0; r < T; ++r) {
      const int p = first + r;
      float m = -INFINITY;
      for (int j = 0; j <= p; ++j) m = std::max(m, s(r, j) * scale);
      double z = 0.0;
      for (int j = 0; j < n; ++j) {
        const float e = j <= p ? std::exp(s(r, j) * scale - m) : 0.0f;
        s(r, j) = e;
        z += e;
      }
      s.row(r) /= static_cast<float>(z);
      if (vq)
        for (int j = 0; j <= p; ++j)
          if (use_quantized_value(p, j)) {
            pq(r, j) = s(r, j);
            s(r, j) = 0.0f;
          }
    }
    out.middleCols(h * D, D) = s * vf.block(0, g * D, n, D);
    if (vq) out.middleCols(h * D, D) += pq * vq->block(0, g * D, n, D);
  }
}

class FloatCache final : public ToyCache {
 public:
  explicit FloatCache(const Model& m) : model_(m), k_(m.config().n_layers), v_(m.config().n_layers) {}
  void reset() override {
    for (auto& x : k_) x.resize(0, model_.config().kv_width());
    for (auto& x : v_) x.resize(0, model_.config().kv_width());
  }
  std::size_t size(int layer) const override { return static_cast<std::size_t>(k_[layer].rows()); }
  void append(int layer, const Mat& k_pre, const Mat& v) override {
    const int first = static_cast<int>(k_[layer].rows());
    Mat k = k_pre;
    model_.rope().apply(k, model_.config().head_dim, first);
    append_rows(k_[layer], k);
    append_rows(v_[layer], v);
  }
  void attend(int layer, const Mat& q, Mat& out) override {
    const int first = static_cast<int>(k_[layer].rows() - q.rows());
    auto never = [](int, int) { return false; };
    dense_attention(model_.config(), q, first, k_[layer], v_[layer], nullptr, nullptr, never, never, out);
  }
  std::size_t kv_bytes() const override {
    std::size_t b = 0;
    for (std::size_t l = 0; l < k_.size(); ++l) b += (k_[l].size() + v_[l].size()) * sizeof(float);
    return b;
  }
  static void append_rows(Mat& m, const Mat& rows) {
    const Eigen::Index old = m.rows();
    m.conservativeResize(old + rows.rows(), rows.cols());
    m.bottomRows(rows.rows()) = rows;
  }

 private:
  const Model& model_;
  std::vector<Mat> k_, v_;
};

class CQCache final : public ToyCache {
 public:
  /// codebooks: shared by every CQCache of this configuration (loaded once); pre_rope: whether the
  /// key codebooks were fitted on keys before RoPE (the file records it; the cache checks).
  CQCache(const Model& m, const cq::KVCodebooks& codebooks, std::size_t window, bool pre_rope)
      : model_(m), pre_rope_(pre_rope) {
    cq::PagedCacheOptions o;
    o.window = window;
    o.pre_rope_keys = pre_rope;
    o.rope.theta = m.config().rope_theta;
    const cq::MemoryPlan plan(codebooks, o, sizeof(float));
    const std::size_t max_len = std::size_t(m.config().max_seq_len);
    cache_ = std::make_unique<cq::PagedKVCache<float>>(codebooks, plan.pool_for(1, max_len, max_len));
    seq_ = cache_->add_sequence();
  }
  void reset() override {
    cache_->free_sequence(seq_);
    seq_ = cache_->add_sequence();
  }
  std::size_t size(int layer) const override { return cache_->length(seq_, static_cast<std::size_t>(layer)); }
  void append(int layer, const Mat& k_pre, const Mat& v) override {
    const std::size_t w = static_cast<std::size_t>(k_pre.cols());
    if (pre_rope_) {
      cache_->append(layer, seq_, {k_pre.data(), std::size_t(k_pre.rows()), w}, {v.data(), std::size_t(v.rows()), w});
    } else {
      Mat k = k_pre;
      model_.rope().apply(k, model_.config().head_dim, static_cast<int>(size(layer)));
      cache_->append(layer, seq_, {k.data(), std::size_t(k.rows()), w}, {v.data(), std::size_t(v.rows()), w});
    }
  }
  void attend(int layer, const Mat& q, Mat& out) override {
    out.resize(q.rows(), q.cols());
    cache_->attend(layer, seq_, {q.data(), std::size_t(q.rows()), std::size_t(q.cols())},
                   {out.data(), std::size_t(out.rows()), std::size_t(out.cols())});
  }
  /// Code pages held, plus the window and sinks a decoding engine keeps (the prefill's extra
  /// full-precision rows, kept only so every query of a chunk sees its own window, are not counted).
  std::size_t kv_bytes() const override {
    const auto& cb = cache_->codebooks();
    const auto& o = cache_->options();
    const std::size_t fp_rows = std::min(cache_->length(seq_), o.window + o.sinks);
    return cache_->memory().codes_in_use + fp_rows * cb.layers() * cb.kv_heads() * cb.head_dim() * sizeof(float) * 2;
  }

 private:
  const Model& model_;
  bool pre_rope_;
  std::unique_ptr<cq::PagedKVCache<float>> cache_;
  cq::SeqId seq_ = 0;
};

class IntCache final : public ToyCache {
 public:
  static constexpr int group = 32;
  IntCache(const Model& m, int bits, std::size_t window)
      : model_(m), bits_(bits), window_(static_cast<int>(window)), k_(m.config().n_layers), v_(m.config().n_layers),
        kq_(m.config().n_layers), vq_(m.config().n_layers) {}
  void reset() override {
    for (auto* set : {&k_, &v_, &kq_, &vq_})
      for (auto& x : *set) x.resize(0, model_.config().kv_width());
  }
  std::size_t size(int layer) const override { return static_cast<std::size_t>(k_[layer].rows()); }
  void append(int layer, const Mat& k_pre, const Mat& v) override {
    const Config& c = model_.config();
    const int first = static_cast<int>(k_[layer].rows());
    Mat k = k_pre;
    model_.rope().apply(k, c.head_dim, first);
    FloatCache::append_rows(k_[layer], k);
    FloatCache::append_rows(v_[layer], v);
    // Values: per token, each 32-channel group its own scale and zero point.
    auto vquant = cq::UniformQuantizer<float>::values(c.head_dim, bits_, group);
    Mat vq(v.rows(), v.cols());
    for (int h = 0; h < c.n_kv_heads; ++h) quantize_into(vquant, v, 0, int(v.rows()), h, vq);
    FloatCache::append_rows(vq_[layer], vq);
    // Keys: per channel over each complete 32-token block (rows of incomplete blocks unused).
    const int n = static_cast<int>(k_[layer].rows());
    kq_[layer].conservativeResize(n, c.kv_width());
    auto kquant = cq::UniformQuantizer<float>::keys(c.head_dim, bits_, group);
    for (int b0 = first / group * group; b0 + group <= n; b0 += group)
      for (int h = 0; h < c.n_kv_heads; ++h) quantize_into(kquant, k_[layer], b0, group, h, kq_[layer]);
  }
  void attend(int layer, const Mat& q, Mat& out) override {
    const int first = static_cast<int>(k_[layer].rows() - q.rows());
    const int W = window_;
    auto old = [W](int p, int j) { return j < p + 1 - W; };
    auto key_rule = [old](int p, int j) { return old(p, j) && (j / group + 1) * group <= p + 1; };
    dense_attention(model_.config(), q, first, k_[layer], v_[layer], &kq_[layer], &vq_[layer], key_rule, old, out);
  }
  /// Codes at `bits` bits plus an fp16 scale and zero per 32 elements, for tokens outside the
  /// window; the window in fp32.
  std::size_t kv_bytes() const override {
    const Config& c = model_.config();
    const std::size_t n = size(0), fp = std::min<std::size_t>(n, window_);
    const std::size_t per_token_per_layer = std::size_t(c.kv_width()) * 2;  // K and V elements
    return c.n_layers * ((n - fp) * per_token_per_layer * (bits_ + 1) / 8 + fp * per_token_per_layer * sizeof(float));
  }

 private:
  void quantize_into(const cq::UniformQuantizer<float>& qz, const Mat& src, int row0, int rows, int head, Mat& dst) const {
    const int D = model_.config().head_dim;
    Mat block = src.block(row0, head * D, rows, D);
    const cq::UniformCodes codes = qz.encode({block.data(), std::size_t(rows), std::size_t(D)});
    qz.decode(codes, {block.data(), std::size_t(rows), std::size_t(D)});
    dst.block(row0, head * D, rows, D) = block;
  }

  const Model& model_;
  int bits_, window_;
  std::vector<Mat> k_, v_, kq_, vq_;
};

}  // namespace toy
