// cq_toy_gpu: the toy transformer decoding on the GPU with its KV cache in cq's device paged cache
// (cuda::PagedKVCache: append, encode and attention on the device), beside the same model on the
// CPU with the CPU cache, and beside an fp16 KV cache on the GPU. Prints held-out perplexity of each
// path and GPU decode tokens/s.
//
//   cq_toy_gpu [--model DIR] [--windows N] [--check]
//
// CQ-4c8b and 8c8b with keys after RoPE (the post-RoPE codebooks shipped with the model) and
// before it (the pre-RoPE ones: the cache rotates keys inside attention), window 0 and 32.
// --check (4 windows) exits 1 unless every GPU perplexity equals the CPU path's to 1e-3 (relative).
#include "caches.hpp"
#include "gpu_decode.hpp"
#include "model.hpp"

#include <cq/cq.hpp>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#ifndef CQ_TOY_MODEL_DIR
#define CQ_TOY_MODEL_DIR "examples/toy_transformer/model"
#endif

namespace {

using namespace toy;

std::vector<float> flat(const Mat& m) { return std::vector<float>(m.data(), m.data() + m.size()); }
std::vector<float> flat(const Vec& v) { return std::vector<float>(v.data(), v.data() + v.size()); }

gpu::Weights weights_of(const Model& m) {
  const Config& c = m.config();
  gpu::Weights w;
  w.vocab = c.vocab, w.dim = c.dim, w.layers = c.n_layers, w.heads = c.n_heads, w.kv_heads = c.n_kv_heads;
  w.head_dim = c.head_dim, w.ffn_hidden = c.ffn_hidden, w.max_len = c.max_seq_len, w.norm_eps = c.norm_eps;
  w.rope_theta = c.rope_theta;
  w.embed = flat(m.embeddings());
  w.norm = flat(m.final_norm());
  w.output = flat(m.output());
  for (int l = 0; l < c.n_layers; ++l) {
    const Model::Layer& L = m.layer(l);
    w.layer.push_back({flat(L.attn_norm), flat(L.ffn_norm), flat(L.wq), flat(L.wk), flat(L.wv), flat(L.wo), flat(L.w1),
                       flat(L.w2), flat(L.w3)});
  }
  w.rope_cos = flat(m.rope().cos);
  w.rope_sin = flat(m.rope().sin);
  return w;
}

/// The first `max` full windows of `len` bytes of the held-out text.
std::vector<std::vector<int>> full_windows(const std::filesystem::path& p, std::size_t len, std::size_t max) {
  std::ifstream in(p, std::ios::binary);
  CQ_CHECK(in.good(), p.string(), ": cannot open");
  const std::vector<char> text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  std::vector<std::vector<int>> w;
  for (std::size_t i = 0; i + len <= text.size() && w.size() < max; i += len) {
    std::vector<int> t;
    for (std::size_t j = i; j < i + len; ++j) t.push_back(static_cast<unsigned char>(text[j]));
    w.push_back(std::move(t));
  }
  return w;
}

double perplexity(const std::vector<double>& nll, const std::vector<std::vector<int>>& windows) {
  double total = 0.0;
  std::size_t n = 0;
  for (std::size_t i = 0; i < windows.size(); ++i) total += nll[i], n += windows[i].size() - 1;
  return std::exp(total / double(n));
}

/// The CPU path's NLL per window (the model on the CPU, prefill in one chunk, which equals decoding
/// token by token: toy_test.cpp).
std::vector<double> cpu_nll(const Model& model, const std::vector<std::vector<int>>& windows, const cq::KVCodebooks* books,
                            std::size_t window, bool pre_rope = false) {
  std::vector<double> nll;
  for (const auto& w : windows) {
    std::unique_ptr<ToyCache> cache;
    if (books) cache = std::make_unique<CQCache>(model, *books, window, pre_rope);
    else cache = std::make_unique<FloatCache>(model);
    cache->reset();
    nll.push_back(Model::next_token_nll(model.forward(w, *cache), w));
  }
  return nll;
}

}  // namespace

int main(int argc, char** argv) try {
  std::filesystem::path dir = CQ_TOY_MODEL_DIR;
  std::size_t max_windows = 16;
  bool check = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model" && i + 1 < argc) dir = argv[++i];
    else if (a == "--windows" && i + 1 < argc) max_windows = std::stoul(argv[++i]);
    else if (a == "--check") check = true;
    else {
      std::fprintf(stderr, "usage: %s [--model DIR] [--windows N] [--check]\n", argv[0]);
      return 2;
    }
  }
  if (check) max_windows = 4;
  const Model model(dir / "model.safetensors");
  const gpu::Weights weights = weights_of(model);
  const auto windows = full_windows(dir / ".." / "data" / "heldout.txt", 512, max_windows);
  std::printf("cq toy transformer on the GPU: %zu held-out windows of 512 bytes decoded as one batch, token by token\n\n",
              windows.size());
  std::printf("| KV cache | window | ppl CPU path | ppl GPU path | GPU / CPU - 1 | GPU decode tok/s | KV KiB at 512 |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  bool ok = true;
  {
    const double cpu = perplexity(cpu_nll(model, windows, nullptr, 0), windows);
    gpu::decode(weights, windows, {});  // warm-up: cuBLAS, the CUDA context
    const gpu::Result r = gpu::decode(weights, windows, {});
    std::printf("| fp32 (CPU) / fp16 rows (GPU) | all | %.4f | %.4f | %+.2e | %.0f | %.0f |\n", cpu, perplexity(r.nll, windows),
                perplexity(r.nll, windows) / cpu - 1.0, double(r.tokens) / r.seconds, r.kv_bytes / 1024.0);
  }
  for (const bool pre : {false, true})
    for (const char* cfg : {"4c8b", "8c8b"}) {
      const cq::KVCodebooks books = cq::io::load_kv_codebooks(
          dir / "codebooks" / (std::string(cfg) + (pre ? "-uniform.safetensors" : "-uniform-postrope.safetensors")));
      for (std::size_t window : {std::size_t(0), std::size_t(32)}) {
        const double cpu = perplexity(cpu_nll(model, windows, &books, window, pre), windows);
        const gpu::Result r = gpu::decode(weights, windows, {&books, window, pre});
        const double gpu_ppl = perplexity(r.nll, windows), diff = gpu_ppl / cpu - 1.0;
        ok = ok && std::abs(diff) <= 1e-3;
        std::printf("| CQ-%s %s | %zu | %.4f | %.4f | %+.2e | %.0f | %.0f |\n", cfg, pre ? "pre-RoPE" : "post-RoPE", window,
                    cpu, gpu_ppl, diff, double(r.tokens) / r.seconds, r.kv_bytes / 1024.0);
      }
    }
  std::printf("\nGPU path against the CPU path within 1e-3 for every CQ row: %s\n", ok ? "yes" : "NO");
  return check && !ok ? 1 : 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "cq_toy_gpu: %s\n", e.what());
  return 1;
}
