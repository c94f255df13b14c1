// Memory of the paged cache at LLaMA-3-8B shape (32 layers, 8 KV heads, head_dim 128, CQ-8c8b,
// window 32, fp16 full-precision rows) for 1, 16 and 64 sequences of 4K and 32K tokens, against
// an fp16 cache of the same tokens: bytes per token and total bytes, codebooks and tables counted.
//
// Sequences are measured with real appends (every token coded) where that is affordable on a CPU
// (--measure: 1 x 4K, 1 x 32K, 4 x 4K); every row is also computed from the MemoryPlan, and
// the measured rows check that the plan's arithmetic is what the cache holds.
//
//   ./build/bench/cq_cache_memory [--measure] [--full-page-rows 8]

#include <cq/cq.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace cq;

namespace {

constexpr std::size_t layers = 32, kv_heads = 8, D = 128;

struct Row {
  std::size_t sequences, tokens;
  double codes, full, codebooks, tables, total, fp16;
  bool measured;
};

void print(const Row& r) {
  const double per_token = r.total / double(r.sequences * r.tokens);
  std::printf("| %zu x %zuK | %s | %.1f | %.1f | %.1f | %.3f | %.1f | %.0f | %.2f | %.1f%% |\n", r.sequences,
              r.tokens / 1024, r.measured ? "measured" : "planned", r.codes / 1048576.0, r.full / 1048576.0,
              r.codebooks / 1048576.0, r.tables / 1048576.0, r.total / 1048576.0, per_token, r.fp16 / r.total,
              100.0 * (1.0 - (r.fp16 / r.total) / 16.0));
}

}  // namespace

int main(int argc, char** argv) {
  bool measure = false;
  std::size_t full_rows = PagedCacheOptions{}.full_page_rows;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--measure")) measure = true;
    else if (!std::strcmp(argv[i], "--full-page-rows") && i + 1 < argc) full_rows = std::stoul(argv[++i]);
  }
  // Codebooks: random centroids (memory does not depend on their values), one per (layer, K|V, head).
  KVCodebooks cb(layers, kv_heads, D, {{{8, 8}, {8, 8}}}, KeyRope::post);
  detail::Rng rng(1);
  std::vector<float> c(16 * 256 * 8);
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t h = 0; h < kv_heads; ++h) {
      Codebook k(D, 8, 8), v(D, 8, 8);
      for (float& x : c) x = float(rng.normal());
      k.set_all(c.data());
      for (float& x : c) x = float(rng.normal());
      v.set_all(c.data());
      cb.set(l, h, std::move(k), std::move(v));
    }
  PagedCacheOptions opt;
  opt.window = 32;
  opt.max_rollback = 0;
  opt.full_page_rows = full_rows;
  const MemoryPlan plan(cb, opt, sizeof(half));
  const double fp16_per_token = double(layers * kv_heads * D * 2 * sizeof(half));

  std::printf("paged cache memory, LLaMA-3-8B shape: %zu layers x %zu KV heads x %zu, CQ-8c8b, window 32, fp16 rows, "
              "pages of %zu tokens / %zu full-precision rows; codebooks %.1f MiB (counted once)\n\n",
              layers, kv_heads, D, opt.page_tokens, opt.full_page_rows, double(cb.memory()) / 1048576.0);
  std::printf("| sequences x tokens | how | codes MiB | full-precision MiB | codebooks MiB | tables MiB | total MiB | "
              "bytes/token | vs fp16 | short of 16x |\n|---|---|---|---|---|---|---|---|---|---|\n");

  // Planned: whole code pages for the tokens; full-precision pages at rest after one-token decode
  // steps (the window and the last append spread over pages, from the plan's own rule).
  auto planned = [&](std::size_t seqs, std::size_t tokens) {
    Row r{seqs, tokens, 0, 0, double(cb.memory()), 0, 0, double(seqs * tokens) * fp16_per_token, false};
    r.codes = double(seqs * plan.code_pages_for(tokens) * plan.code_page_bytes());
    // Rows kept at rest: [n - 1 - W, n) (decode steps of one token), on pages aligned at 0.
    const std::size_t first = tokens - 1 - opt.window, P = opt.full_page_rows;
    const std::size_t pages = (tokens + P - 1) / P - first / P;
    r.full = double(seqs * pages * plan.full_page_bytes());
    // Tables: a page id per code page and per full-precision page, sequence records.
    r.tables = double(seqs * (plan.code_pages_for(tokens) + pages) * sizeof(std::uint32_t));
    r.total = r.codes + r.full + r.codebooks + r.tables;
    return r;
  };
  for (std::size_t seqs : {1u, 16u, 64u})
    for (std::size_t tokens : {4096u, 32768u}) print(planned(seqs, tokens));

  if (measure) {
    std::printf("\nmeasured (real appends: prefill in chunks of 512, then 40 one-token decode steps):\n\n");
    for (auto [seqs, tokens] : {std::pair<std::size_t, std::size_t>{1, 4096}, {4, 4096}, {1, 32768}}) {
      const auto t0 = std::chrono::steady_clock::now();
      PagedKVCache<half> cache(cb, plan.pool_for(seqs, tokens, 512));
      std::vector<half> rows(512 * kv_heads * D);
      for (auto& x : rows) x = half(float(rng.normal()));
      for (std::size_t s = 0; s < seqs; ++s) {
        const SeqId id = cache.add_sequence();
        for (std::size_t t = 0; t < tokens;) {
          const std::size_t m = t + 40 >= tokens ? 1 : std::min<std::size_t>(512, tokens - 40 - t);
          for (std::size_t l = 0; l < layers; ++l)
            cache.append(l, id, ConstMatrixView<half>(rows.data(), m, kv_heads * D),
                         ConstMatrixView<half>(rows.data(), m, kv_heads * D));
          t += m;
        }
      }
      const MemoryUsage m = cache.memory();
      Row r{seqs, tokens, double(m.codes_in_use), double(m.full_in_use), double(m.codebooks), double(m.tables), 0,
            double(seqs * tokens) * fp16_per_token, true};
      r.total = r.codes + r.full + r.codebooks + r.tables;
      print(r);
      const Row p = planned(seqs, tokens);
      std::printf("  (plan: codes %s, full-precision %s; %.0f s)\n", p.codes == r.codes ? "equal" : "DIFFERS",
                  p.full == r.full ? "equal" : "DIFFERS",
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  return 0;
}
