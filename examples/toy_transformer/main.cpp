// The toy-transformer example: a small LLaMA-style model trained on the King James Bible, run on
// held-out books with its KV cache in fp32, in CQ (uniform and Fisher-weighted codebooks) and in
// the KIVI-style INT baseline. Prints held-out perplexity, bits per channel with every per-token
// overhead, KV memory and throughput, then a greedy generation with an fp32 and a CQ-8c8b cache.
//
//   cq_toy_transformer [--model DIR] [--windows N] [--threads N]
//   cq_toy_transformer --codebooks A.safetensors[,B...]  fp32 against CQ with these codebook files
//                                            (cq-calibrate's output; keys before or after RoPE as
//                                            the file says) instead of the shipped table
//   cq_toy_transformer --check               small regression run (ctest), exits 1 on regression
//   cq_toy_transformer --dump-calibration OUT --train data/train.txt
//                                            K (pre/post RoPE) and V activations for cq-calibrate

#include "caches.hpp"
#include "model.hpp"

#include <cq/cq.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <string>
#include <utility>

#ifndef CQ_TOY_MODEL_DIR
#define CQ_TOY_MODEL_DIR "examples/toy_transformer/model"
#endif

namespace {

using namespace toy;
using Clock = std::chrono::steady_clock;

std::vector<int> read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  CQ_CHECK(in.good(), p.string(), ": cannot open");
  std::vector<int> out;
  for (std::istreambuf_iterator<char> it(in), end; it != end; ++it) out.push_back(static_cast<unsigned char>(*it));
  return out;
}

/// Non-overlapping windows of `len` bytes (the last one may be shorter), at most `max` of them.
std::vector<std::vector<int>> windows_of(const std::vector<int>& text, std::size_t len, std::size_t max) {
  std::vector<std::vector<int>> w;
  for (std::size_t i = 0; i + 1 < text.size() && w.size() < max; i += len)
    w.emplace_back(text.begin() + static_cast<std::ptrdiff_t>(i),
                   text.begin() + static_cast<std::ptrdiff_t>(std::min(text.size(), i + len)));
  return w;
}

struct Eval {
  double nll = 0.0;
  std::size_t predicted = 0;
  double seconds = 0.0;
  std::size_t kv_bytes = 0;  // after the first full window
  double ppl() const { return std::exp(nll / double(predicted)); }
};

using CacheFactory = std::function<std::unique_ptr<ToyCache>()>;

Eval evaluate(const Model& model, const std::vector<std::vector<int>>& windows, const CacheFactory& make,
              cq::ThreadPool& pool) {
  const std::size_t threads = pool.concurrency();
  std::vector<double> nll(windows.size());
  std::vector<std::size_t> kv(threads, 0);
  const auto t0 = Clock::now();
  pool.parallel_for(threads, [&](std::size_t t) {
    auto cache = make();
    for (std::size_t i = t; i < windows.size(); i += threads) {
      cache->reset();
      const Mat logits = model.forward(windows[i], *cache);
      nll[i] = Model::next_token_nll(logits, windows[i]);
      if (kv[t] == 0) kv[t] = cache->kv_bytes();
    }
  });
  Eval e;
  e.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (std::size_t i = 0; i < windows.size(); ++i) {
    e.nll += nll[i];
    e.predicted += windows[i].size() - 1;
  }
  e.kv_bytes = kv[0];
  return e;
}

std::filesystem::path codebook_path(const std::filesystem::path& dir, const std::string& cfg, const std::string& method) {
  return dir / "codebooks" / (cfg + "-" + method + ".safetensors");
}

struct Row {
  std::string name;
  CacheFactory make[2];  // window 0, window 32
  std::size_t codebook_bytes = 0;
};

int dump_calibration(const Model& model, const std::filesystem::path& train, const std::filesystem::path& out) {
  // The sequences train.py took its squared gradients on: 24 x 512 bytes from offset 1,000,000.
  const std::size_t offset = 1000000, seq = 512, count = 24;
  const std::vector<int> text = read_bytes(train);
  CQ_CHECK(text.size() >= offset + seq * count + 1, train.string(), ": too short for the calibration sequences");
  const Config& c = model.config();
  const std::size_t N = seq * count, D = c.head_dim, L = c.n_layers, H = c.n_kv_heads;
  std::vector<float> kpre(L * H * N * D), kpost(kpre.size()), v(kpre.size());
  for (std::size_t j = 0; j < count; ++j) {
    std::vector<int> tokens(text.begin() + static_cast<std::ptrdiff_t>(offset + j * seq),
                            text.begin() + static_cast<std::ptrdiff_t>(offset + (j + 1) * seq));
    FloatCache cache(model);
    cache.reset();
    Model::Capture cap;
    model.forward(tokens, cache, &cap);
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t h = 0; h < H; ++h)
        for (std::size_t t = 0; t < seq; ++t)
          for (std::size_t d = 0; d < D; ++d) {
            const std::size_t dst = ((l * H + h) * N + j * seq + t) * D + d;
            kpre[dst] = cap.k_pre[l](t, h * D + d);
            kpost[dst] = cap.k_post[l](t, h * D + d);
            v[dst] = cap.v[l](t, h * D + d);
          }
    std::fprintf(stderr, "\rcalibration activations: %zu/%zu sequences", j + 1, count);
  }
  std::fprintf(stderr, "\n");
  std::filesystem::create_directories(out);
  const std::vector<std::uint64_t> shape{L, H, N, D};
  cq::io::save_npy_f32(out / "calib_k_pre.npy", shape, kpre.data());
  cq::io::save_npy_f32(out / "calib_k_post.npy", shape, kpost.data());
  cq::io::save_npy_f32(out / "calib_v.npy", shape, v.data());
  std::printf("wrote %s/calib_{k_pre,k_post,v}.npy, shape [%zu, %zu, %zu, %zu] float32\n", out.string().c_str(), L, H, N, D);
  return 0;
}

std::string generate(const Model& model, ToyCache& cache, const std::string& prompt, int n, double& tokens_per_s) {
  cache.reset();
  std::vector<int> toks(prompt.begin(), prompt.end());
  Mat logits = model.forward(toks, cache);
  std::string out;
  const auto t0 = Clock::now();
  for (int i = 0; i < n && cache.size(0) < std::size_t(model.config().max_seq_len); ++i) {
    Eigen::Index next;
    logits.row(logits.rows() - 1).maxCoeff(&next);
    out += static_cast<char>(next);
    logits = model.forward({static_cast<int>(next)}, cache);
  }
  tokens_per_s = double(out.size()) / std::chrono::duration<double>(Clock::now() - t0).count();
  return out;
}

}  // namespace

int main(int argc, char** argv) try {
  std::filesystem::path dir = CQ_TOY_MODEL_DIR;
  std::size_t max_windows = 16, threads = 2;
  bool check = false;
  std::string dump, train;
  std::vector<std::string> codebook_files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      CQ_CHECK(i + 1 < argc, a, " needs a value");
      return argv[++i];
    };
    if (a == "--model") dir = next();
    else if (a == "--windows") max_windows = std::stoul(next());
    else if (a == "--threads") threads = std::stoul(next());
    else if (a == "--check") check = true;
    else if (a == "--dump-calibration") dump = next();
    else if (a == "--train") train = next();
    else if (a == "--codebooks") {
      std::string list = next();
      for (std::size_t at = 0; at <= list.size();) {
        const std::size_t comma = std::min(list.find(',', at), list.size());
        if (comma > at) codebook_files.push_back(list.substr(at, comma - at));
        at = comma + 1;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--model DIR] [--windows N] [--threads N] [--check] "
                           "[--codebooks FILE[,FILE...]] [--dump-calibration OUT --train FILE]\n", argv[0]);
      return 2;
    }
  }
  const Model model(dir / "model.safetensors");
  if (!dump.empty())
    return dump_calibration(model, train.empty() ? dir / ".." / "data" / "train.txt" : std::filesystem::path(train), dump);

  const Config& c = model.config();
  if (check) max_windows = 4;
  const auto text = read_bytes(dir / ".." / "data" / "heldout.txt");
  const auto windows = windows_of(text, 512, max_windows);
  std::size_t predicted = 0;
  for (const auto& w : windows) predicted += w.size() - 1;
  cq::ThreadPool pool(threads);

  std::printf("cq toy transformer: %d layers, dim %d, %d query / %d KV heads of %d, trained on the KJV Bible\n",
              c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim);
  std::printf("held-out books (Ruth, Esther, Ecclesiastes, Jonah, Philippians, James): %zu windows of 512 bytes, "
              "%zu predicted bytes; %zu threads\n", windows.size(), predicted, threads);
  if (model.metadata().count("heldout_loss"))
    std::printf("training run: held-out loss %.4f nats/byte (ppl %.3f) on all held-out text; unigram %.4f (ppl %.2f)\n\n",
                std::stod(model.metadata().at("heldout_loss")), std::exp(std::stod(model.metadata().at("heldout_loss"))),
                std::stod(model.metadata().at("unigram_loss")), std::exp(std::stod(model.metadata().at("unigram_loss"))));

  // The configurations of the table.
  std::vector<Row> rows;
  rows.push_back({"fp32", {[&] { return std::make_unique<FloatCache>(model); }, nullptr}, 0});
  struct CqCfg {
    const char* name;
    bool check;
  };
  // One KVCodebooks per configuration, loaded once and shared by every thread's cache.
  std::map<std::string, cq::KVCodebooks> books;
  auto add_row = [&](const std::string& key, cq::KVCodebooks loaded, const std::string& name, bool pre_rope) {
    const cq::KVCodebooks* set = &books.emplace(key, std::move(loaded)).first->second;
    Row r;
    r.name = name;
    for (int w = 0; w < 2; ++w)
      r.make[w] = [&model, set, w, pre_rope] { return std::make_unique<CQCache>(model, *set, w ? 32 : 0, pre_rope); };
    r.codebook_bytes = set->memory();
    rows.push_back(std::move(r));
  };
  auto cq_row = [&](const std::string& cfg, const std::string& method, bool pre_rope) {
    add_row(cfg + "-" + method, cq::io::load_kv_codebooks(codebook_path(dir, cfg, method)), "CQ-" + cfg + " " + method,
            pre_rope);
  };
  const std::vector<std::string> cq_cfgs = check ? std::vector<std::string>{"4c8b", "8c8b"}
                                                 : std::vector<std::string>{"2c8b", "4c8b", "8c8b", "8c10b"};
  for (const auto& file : codebook_files) {
    cq::KVCodebooks set = cq::io::load_kv_codebooks(file);
    CQ_CHECK(set.key_rope() != cq::KeyRope::unknown, "--codebooks ", file, ": keys neither before nor after RoPE");
    const auto cfg = [](const cq::Codebook& b) { return std::to_string(b.channels()) + "c" + std::to_string(b.bits()) + "b"; };
    const std::string k = cfg(set.key(0, 0)), v = cfg(set.value(0, 0));
    const bool pre_rope = set.key_rope() == cq::KeyRope::pre;
    add_row(file, std::move(set), "CQ-" + k + (k == v ? "" : " / " + v) + " " + std::filesystem::path(file).stem().string(),
            pre_rope);
  }
  if (codebook_files.empty())
    for (const auto& cfg : cq_cfgs)
      for (const char* method : {"uniform", "fisher"}) cq_row(cfg, method, true);
  for (int bits : !codebook_files.empty() ? std::vector<int>{} : check ? std::vector<int>{2} : std::vector<int>{4, 2, 1}) {
    Row r;
    r.name = "INT" + std::to_string(bits) + "-g32 (KIVI)";
    for (int w = 0; w < 2; ++w) r.make[w] = [&model, bits, w] { return std::make_unique<IntCache>(model, bits, w ? 32 : 0); };
    rows.push_back(std::move(r));
  }
  if (!check && codebook_files.empty())
    for (const char* cfg : {"4c8b", "8c8b"}) cq_row(cfg, "uniform-postrope", false);

  std::vector<std::array<Eval, 2>> results(rows.size());
  std::size_t done = 0, total = 0;
  for (const auto& r : rows) total += r.make[1] ? 2 : 1;
  const auto start = Clock::now();
  for (std::size_t i = 0; i < rows.size(); ++i)
    for (int w = 0; w < 2; ++w) {
      if (!rows[i].make[w]) continue;
      std::fprintf(stderr, "\r[%2zu/%zu] %-28s window %2d  (%.0f s)   ", ++done, total, rows[i].name.c_str(), w ? 32 : 0,
                   std::chrono::duration<double>(Clock::now() - start).count());
      results[i][w] = evaluate(model, windows, rows[i].make[w], pool);
    }
  std::fprintf(stderr, "\r%80s\r", "");

  const double fp32_ppl = results[0][0].ppl();
  const double channels_per_token = double(c.n_layers) * c.n_kv_heads * c.head_dim * 2 * 512;
  std::printf("| KV cache | bits/ch W=0 | bits/ch W=32 | ppl W=0 | ppl W=32 | vs fp32 W=0 | vs fp32 W=32 | KV MiB @512 (W=32) | codebooks KiB | tok/s (W=32) |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Eval& a = results[i][0];
    const Eval& b = rows[i].make[1] ? results[i][1] : results[i][0];
    auto bits = [&](const Eval& e) { return double(e.kv_bytes) * 8.0 / channels_per_token; };
    if (!rows[i].make[1]) {
      std::printf("| %s | %.1f | — | %.4f | — | — | — | %.2f | — | %.0f |\n", rows[i].name.c_str(), bits(a), a.ppl(),
                  a.kv_bytes / 1048576.0, double(predicted + windows.size()) / a.seconds);
      continue;
    }
    std::printf("| %s | %.2f | %.2f | %.4f | %.4f | %+.1f%% | %+.1f%% | %.3f | %.0f | %.0f |\n", rows[i].name.c_str(), bits(a),
                bits(b), a.ppl(), b.ppl(), 100.0 * (a.ppl() / fp32_ppl - 1), 100.0 * (b.ppl() / fp32_ppl - 1),
                b.kv_bytes / 1048576.0, rows[i].codebook_bytes / 1024.0, double(predicted + windows.size()) / b.seconds);
  }
  std::printf("\nbits/ch: KV bytes per token per channel incl. every per-token overhead (window rows in fp32, INT "
              "scales and zero points), at 512 tokens; codebooks are a per-model constant, listed apart.\n");

  auto find = [&](const std::string& name) -> const std::array<Eval, 2>& {
    for (std::size_t i = 0; i < rows.size(); ++i)
      if (rows[i].name == name) return results[i];
    cq::detail::fail("no row ", name);
  };
  if (check) {
    // Regression thresholds. Measured 2026-11-29 on these 4 windows: fp32 2.8771, CQ-4c8b Fisher
    // W=32 +0.1%, CQ-4c8b uniform W=0 +0.3%, INT2 W=0 +2.7% (see bench/RESULTS.md).
    const double cq4 = find("CQ-4c8b fisher")[1].ppl(), int2 = find("INT2-g32 (KIVI)")[1].ppl();
    const double cq4u0 = find("CQ-4c8b uniform")[0].ppl(), int2_0 = find("INT2-g32 (KIVI)")[0].ppl();
    bool ok = true;
    auto expect = [&](bool cond, const std::string& what) {
      std::printf("%s %s\n", cond ? "PASS" : "FAIL", what.c_str());
      ok = ok && cond;
    };
    expect(cq4 < fp32_ppl * 1.01, "CQ-4c8b Fisher (2 bits/ch, W=32) within 1% of fp32 perplexity");
    expect(cq4u0 < fp32_ppl * 1.02, "CQ-4c8b uniform (2 bits/ch, W=0) within 2% of fp32 perplexity");
    expect(cq4u0 < int2_0, "CQ at 2 bits/ch (4c8b, W=0) beats INT2 (3 bits/ch incl. scales, W=0)");
    expect(find("CQ-8c8b fisher")[1].ppl() < int2, "CQ-8c8b Fisher (1 bit/ch, W=32) beats INT2 (W=32)");
    return ok ? 0 : 1;
  }

  if (!codebook_files.empty()) return 0;  // the generation below uses the shipped 8c8b codebooks

  const std::string prompt = "And it came to pass, when the king";
  FloatCache fp(model);
  CQCache cq8(model, books.at("8c8b-fisher"), 32, true);
  double fps = 0, cqs = 0;
  const std::string a = generate(model, fp, prompt, 160, fps), b = generate(model, cq8, prompt, 160, cqs);
  std::printf("\ngreedy generation, prompt \"%s\":\n  fp32 cache       (%.0f tok/s): %s\n  CQ-8c8b Fisher W=32 (%.0f tok/s): %s\n",
              prompt.c_str(), fps, a.c_str(), cqs, b.c_str());
  std::printf("\ntotal %.1f s\n", std::chrono::duration<double>(Clock::now() - start).count());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
