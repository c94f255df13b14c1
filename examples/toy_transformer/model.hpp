#pragma once
// The toy LLaMA-style byte-level model of examples/toy_transformer (see model.py for the
// reference definition): RMSNorm, RoPE (rotate_half), SwiGLU, grouped-query attention with
// head_dim 128. Weights come from a safetensors file written by train.py (fp16, run in fp32).
// Attention goes through a KV cache implementing ToyCache, so the same model runs on an fp32
// cache, a cq::KVCache or the INT baseline.

#include <cq/cq.hpp>

#include <Eigen/Dense>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

namespace toy {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vec = Eigen::VectorXf;

struct Config {
  int vocab = 256, dim = 256, n_layers = 4, n_heads = 4, n_kv_heads = 2, head_dim = 128, ffn_hidden = 768;
  float rope_theta = 10000.0f, norm_eps = 1e-5f;
  int max_seq_len = 512;
  int q_width() const { return n_heads * head_dim; }
  int kv_width() const { return n_kv_heads * head_dim; }
};

/// A KV cache as the model sees it: per layer, append the new tokens' keys (before RoPE) and
/// values, then attend with their (rotated) queries. Rows are (tokens, heads * head_dim).
class ToyCache {
 public:
  virtual ~ToyCache() = default;
  virtual void reset() = 0;
  virtual std::size_t size(int layer) const = 0;
  virtual void append(int layer, const Mat& k_pre, const Mat& v) = 0;
  virtual void attend(int layer, const Mat& q, Mat& out) = 0;
  /// Bytes of KV state held now (codes, full-precision rows, scales; codebooks reported apart).
  virtual std::size_t kv_bytes() const = 0;
};

/// cos / sin of RoPE angles, float64 rounded to float32 as in model.py: (max_seq_len, head_dim/2).
struct RopeTable {
  Mat cos, sin;
  RopeTable(int max_len, int head_dim, float theta) : cos(max_len, head_dim / 2), sin(max_len, head_dim / 2) {
    for (int p = 0; p < max_len; ++p)
      for (int i = 0; i < head_dim / 2; ++i) {
        const double a = double(p) * std::pow(double(theta), -2.0 * i / head_dim);
        cos(p, i) = static_cast<float>(std::cos(a));
        sin(p, i) = static_cast<float>(std::sin(a));
      }
  }
  /// Rotates every head_dim-wide head of each row; row r is at position first + r.
  void apply(Mat& x, int head_dim, int first) const {
    const int half_d = head_dim / 2;
    for (int r = 0; r < x.rows(); ++r)
      for (int h = 0; h < x.cols() / head_dim; ++h) {
        float* v = x.row(r).data() + h * head_dim;
        for (int i = 0; i < half_d; ++i) {
          const float c = cos(first + r, i), s = sin(first + r, i);
          const float a = v[i], b = v[i + half_d];
          v[i] = a * c - b * s;
          v[i + half_d] = b * c + a * s;
        }
      }
  }
};

class Model {
 public:
  explicit Model(const std::filesystem::path& weights) {
    auto r = cq::io::SafetensorsReader::open(weights);
    auto meta_int = [&](const char* k) { return std::stoi(r.meta(k)); };
    CQ_CHECK(r.meta("format") == "cq-toy-llama", weights.string(), ": not a cq-toy-llama weights file");
    cfg_.vocab = meta_int("vocab");
    cfg_.dim = meta_int("dim");
    cfg_.n_layers = meta_int("n_layers");
    cfg_.n_heads = meta_int("n_heads");
    cfg_.n_kv_heads = meta_int("n_kv_heads");
    cfg_.head_dim = meta_int("head_dim");
    cfg_.ffn_hidden = meta_int("ffn_hidden");
    cfg_.max_seq_len = meta_int("max_seq_len");
    cfg_.rope_theta = std::stof(r.meta("rope_theta"));
    cfg_.norm_eps = std::stof(r.meta("norm_eps"));
    metadata_ = r.metadata();
    auto mat = [&](const std::string& name, int rows, int cols) {
      const auto& t = r.get(name);
      const std::vector<std::uint64_t> want{std::uint64_t(rows), std::uint64_t(cols)};
      CQ_CHECK(t.shape == want, weights.string(), ": tensor ", name, " has the wrong shape");
      const std::vector<float> f = r.read_floats(t);
      return Mat(Eigen::Map<const Mat>(f.data(), rows, cols));
    };
    auto vec = [&](const std::string& name, int n) {
      const std::vector<float> f = r.read_floats(name);
      CQ_CHECK(int(f.size()) == n, weights.string(), ": tensor ", name, " has the wrong size");
      return Vec(Eigen::Map<const Vec>(f.data(), n));
    };
    const int d = cfg_.dim;
    embed_ = mat("tok_embeddings.weight", cfg_.vocab, d);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      Layer L;
      L.attn_norm = vec(p + "attention_norm.weight", d);
      L.wq = mat(p + "attention.wq.weight", cfg_.q_width(), d);
      L.wk = mat(p + "attention.wk.weight", cfg_.kv_width(), d);
      L.wv = mat(p + "attention.wv.weight", cfg_.kv_width(), d);
      L.wo = mat(p + "attention.wo.weight", d, cfg_.q_width());
      L.ffn_norm = vec(p + "ffn_norm.weight", d);
      L.w1 = mat(p + "feed_forward.w1.weight", cfg_.ffn_hidden, d);
      L.w3 = mat(p + "feed_forward.w3.weight", cfg_.ffn_hidden, d);
      L.w2 = mat(p + "feed_forward.w2.weight", d, cfg_.ffn_hidden);
      layers_.push_back(std::move(L));
    }
    norm_ = vec("norm.weight", d);
    out_ = mat("output.weight", cfg_.vocab, d);
    rope_ = std::make_unique<RopeTable>(cfg_.max_seq_len, cfg_.head_dim, cfg_.rope_theta);
  }

  /// One block's weights, as nn.Linear stores them: (out_features, in_features).
  struct Layer {
    Vec attn_norm, ffn_norm;
    Mat wq, wk, wv, wo, w1, w2, w3;
  };

  const Config& config() const { return cfg_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const Mat& embeddings() const { return embed_; }     // (vocab, dim)
  const Layer& layer(int l) const { return layers_[std::size_t(l)]; }
  const Vec& final_norm() const { return norm_; }      // (dim)
  const Mat& output() const { return out_; }           // (vocab, dim)
  const RopeTable& rope() const { return *rope_; }

  /// Activations captured per layer for calibration: keys before and after RoPE, values.
  struct Capture {
    std::vector<Mat> k_pre, k_post, v;
  };

  /// Logits (tokens, vocab) for `tokens` continuing the sequence held by `cache` (positions
  /// cache.size() ..). Appends their keys and values to the cache.
  Mat forward(const std::vector<int>& tokens, ToyCache& cache, Capture* capture = nullptr) const {
    const int T = static_cast<int>(tokens.size());
    const int first = static_cast<int>(cache.size(0));
    CQ_CHECK(first + T <= cfg_.max_seq_len, "toy model: positions up to ", first + T, " exceed max_seq_len ",
             cfg_.max_seq_len);
    Mat x(T, cfg_.dim);
    for (int t = 0; t < T; ++t) x.row(t) = embed_.row(tokens[t]);
    Mat attn(T, cfg_.q_width());
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const Layer& L = layers_[l];
      const Mat a = rms_norm(x, L.attn_norm);
      Mat q = a * L.wq.transpose();
      const Mat k = a * L.wk.transpose();
      const Mat v = a * L.wv.transpose();
      rope_->apply(q, cfg_.head_dim, first);
      if (capture) {
        capture->k_pre.push_back(k);
        Mat kr = k;
        rope_->apply(kr, cfg_.head_dim, first);
        capture->k_post.push_back(std::move(kr));
        capture->v.push_back(v);
      }
      cache.append(l, k, v);
      cache.attend(l, q, attn);
      x += attn * L.wo.transpose();
      const Mat f = rms_norm(x, L.ffn_norm);
      Mat gate = f * L.w1.transpose();
      const Mat up = f * L.w3.transpose();
      gate = gate.unaryExpr([](float z) { return z / (1.0f + std::exp(-z)); }).cwiseProduct(up);
      x += gate * L.w2.transpose();
    }
    return rms_norm(x, norm_) * out_.transpose();
  }

  /// Sum over rows i < T-1 of -log softmax(logits[i])[tokens[i + 1]], in nats.
  static double next_token_nll(const Mat& logits, const std::vector<int>& tokens) {
    double total = 0.0;
    for (int i = 0; i + 1 < logits.rows(); ++i) {
      const float m = logits.row(i).maxCoeff();
      double z = 0.0;
      for (int j = 0; j < logits.cols(); ++j) z += std::exp(double(logits(i, j) - m));
      total += std::log(z) + m - logits(i, tokens[i + 1]);
    }
    return total;
  }

 private:
  Mat rms_norm(const Mat& x, const Vec& w) const {
    Mat y(x.rows(), x.cols());
    for (int r = 0; r < x.rows(); ++r) {
      const float inv = 1.0f / std::sqrt(x.row(r).squaredNorm() / float(x.cols()) + cfg_.norm_eps);
      y.row(r) = x.row(r).cwiseProduct(w.transpose()) * inv;
    }
    return y;
  }

  Config cfg_;
  std::map<std::string, std::string> metadata_;
  Mat embed_, out_;
  Vec norm_;
  std::vector<Layer> layers_;
  std::unique_ptr<RopeTable> rope_;
};

}  // namespace toy
