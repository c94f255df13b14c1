// Batched decode attention over the paged cache: 16 sequences of 4K tokens, one layer of
// LLaMA-3-8B shape (8 KV heads, 32 query heads, head_dim 128), CQ-8c8b, window 32, fp16 rows, on
// 2 threads: one batched call (every sequence and head spread over the pool) against 16 calls,
// one per sequence (each spreading its heads and long ranges over the same pool).
//
//   ./build/bench/cq_batch_attention_bench --benchmark_repetitions=11 --benchmark_report_aggregates_only=true

#include "bench_util.hpp"

#include <benchmark/benchmark.h>

#include <memory>

using namespace cq;

namespace {

constexpr std::size_t kv_heads = 8, q_heads = 32, D = 128, seqs = 16, tokens = 4096;

struct Fixture {
  KVCodebooks cb = bench::synthetic_kv_codebooks(kv_heads, 8, KeyRope::post, 6);
  std::unique_ptr<PagedKVCache<half>> cache;
  std::vector<SeqId> ids;
  std::vector<std::size_t> indptr;
  std::vector<float> q, out;
  ThreadPool pool{2};
  Fixture() {
    PagedCacheOptions opt;
    opt.window = 32;
    cache = std::make_unique<PagedKVCache<half>>(cb, MemoryPlan(cb, opt, sizeof(half)).pool_for(seqs, tokens, 512));
    const auto kv = synthetic_kv(tokens, kv_heads * D, {.seed = 4});
    std::vector<half> h(kv.size());
    for (std::size_t i = 0; i < kv.size(); ++i) h[i] = half(kv[i]);
    indptr.push_back(0);
    for (std::size_t s = 0; s < seqs; ++s) {
      ids.push_back(cache->add_sequence());
      for (std::size_t t = 0; t < tokens; t += 512)
        cache->append(0, ids.back(), ConstMatrixView<half>(h.data() + t * kv_heads * D, 512, kv_heads * D),
                      ConstMatrixView<half>(h.data() + t * kv_heads * D, 512, kv_heads * D));
      indptr.push_back(s + 1);
    }
    q = synthetic_kv(seqs, q_heads * D, {.seed = 5});
    out.resize(q.size());
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

void BM_Batched(benchmark::State& state) {
  Fixture& f = fixture();
  for (auto _ : state) {
    f.cache->attend(0, f.ids, f.indptr, ConstMatrixView<float>(f.q.data(), seqs, q_heads * D),
                    MatrixView<float>(f.out.data(), seqs, q_heads * D), {.executor = &f.pool});
    benchmark::DoNotOptimize(f.out.data());
  }
  state.SetItemsProcessed(state.iterations() * seqs * tokens);
}

void BM_Serial(benchmark::State& state) {
  Fixture& f = fixture();
  for (auto _ : state) {
    for (std::size_t s = 0; s < seqs; ++s)
      f.cache->attend(0, f.ids[s], ConstMatrixView<float>(f.q.data() + s * q_heads * D, 1, q_heads * D),
                      MatrixView<float>(f.out.data() + s * q_heads * D, 1, q_heads * D), {.executor = &f.pool});
    benchmark::DoNotOptimize(f.out.data());
  }
  state.SetItemsProcessed(state.iterations() * seqs * tokens);
}

BENCHMARK(BM_Batched)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Serial)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
