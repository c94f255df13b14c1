// Decode attention at D = 128, one query head on one KV head, contexts 4K / 32K / 128K:
//   dense/fp32, dense/f16  full-precision caches through the same kernel's dense path
//                          (vectorised dot products and axpys, fp16 converted in registers)
//   dequant/<cfg>          decode each 512-token superblock of codes to float, then dense
//   fused/<cfg>            score tables over key codes + value centroids (the CQ kernel);
//                          8c8b-prerope: keys coded before RoPE, decoded and rotated in the kernel
// on 1 and 2 threads (2 threads split the token range and merge, flash-decoding style).
// Window 32, no sinks. Counters: bytes of cache per token, tokens per second.
//
//   ./build/bench/cq_attention_bench [--benchmark_filter=32768]

#include "bench_util.hpp"

#include <benchmark/benchmark.h>

#include <map>
#include <memory>

using namespace cq;

namespace {

constexpr std::size_t D = 128;

struct Config {
  const char* name;
  std::size_t C;
  int bits;
  bool pre_rope = false;  // keys coded before RoPE, rotated inside the kernel
};
constexpr Config configs[] = {{"2c8b", 2, 8}, {"4c8b", 4, 8}, {"8c8b", 8, 8}, {"2c4b", 2, 4}, {"8c8b-prerope", 8, 8, true}};

// K and V rows of a context: synthetic KV-like data, different seeds for K and V.
const std::vector<float>& rows(std::size_t n, bool values) {
  static std::map<std::pair<std::size_t, bool>, std::vector<float>> cache;
  auto& r = cache[{n, values}];
  if (r.empty()) r = synthetic_kv(n, D, {.seed = values ? 1001u : 1000u});
  return r;
}

Codebook fitted(std::size_t C, int bits, bool values) {
  Codebook cb(D, C, bits);
  FitOptions o;
  o.iterations = 8;
  fit_codebook(cb, ConstMatrixView<float>(rows(8192, values).data(), 8192, D), {}, o);
  return cb;
}

// A KV cache holding n tokens coded with `cfg`, window 32.
const KVCache<float>& coded_cache(std::size_t n, const Config& cfg) {
  static std::map<std::pair<std::size_t, std::string>, std::unique_ptr<KVCache<float>>> caches;
  auto& c = caches[{n, cfg.name}];
  if (!c) {
    KVCacheConfig kc;
    kc.head_dim = D;
    kc.spec = {{cfg.C, cfg.bits}, {cfg.C, cfg.bits}};
    kc.window = 32;
    kc.max_rollback = 0;
    kc.pre_rope_keys = cfg.pre_rope;
    c = std::make_unique<KVCache<float>>(kc);
    c->set_codebooks(0, 0, fitted(cfg.C, cfg.bits, false), fitted(cfg.C, cfg.bits, true));
    c->append(0, ConstMatrixView<float>(rows(n, false).data(), n, D), ConstMatrixView<float>(rows(n, true).data(), n, D));
  }
  return *c;
}

// A full-precision head view of n tokens (everything in the "window"), of element type T.
template <class T>
struct DenseHead {
  std::vector<T> k, v;
  Codebook dummy{D, 8, 1};  // shape only: no token is coded
  KVHeadView<T> view;
  explicit DenseHead(std::size_t n) : k(n * D), v(n * D) {
    for (std::size_t i = 0; i < n * D; ++i) {
      k[i] = from_float<T>(rows(n, false)[i]);
      v[i] = from_float<T>(rows(n, true)[i]);
    }
    view.head_dim = D;
    view.key_codebook = view.value_codebook = dummy.view();
    view.recent_keys = PagedRowsView<T>::contiguous(ConstMatrixView<T>(k.data(), n, D), 0);
    view.recent_values = PagedRowsView<T>::contiguous(ConstMatrixView<T>(v.data(), n, D), 0);
    view.window = n;
  }
};

ThreadPool& pool2() {
  static ThreadPool p(2);
  return p;
}

void finish(benchmark::State& state, std::size_t n, double bytes_per_token) {
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * n * bytes_per_token));
  state.counters["bytes_per_token"] = bytes_per_token;
  state.counters["threads"] = static_cast<double>(state.range(1));
}

template <class T>
void BM_Dense(benchmark::State& state) {
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  const std::size_t threads = static_cast<std::size_t>(state.range(1));
  static std::map<std::size_t, std::unique_ptr<DenseHead<T>>> heads;
  auto& h = heads[n];
  if (!h) h = std::make_unique<DenseHead<T>>(n);
  const auto q = synthetic_kv(1, D, {.seed = 7});
  std::vector<float> out(D);
  for (auto _ : state) {
    // Dense tokens form one piece; two threads split it by halves of the sequence.
    if (threads == 1) {
      attend_head(h->view, q.data(), 1, n - 1, 0.0883883f, out.data());
    } else {
      std::vector<float> part(2 * D);
      pool2().parallel_for(2, [&](std::size_t i) {
        KVHeadView<T> v = h->view;
        const std::size_t lo = i * (n / 2), cnt = i ? n - n / 2 : n / 2;
        v.recent_keys = PagedRowsView<T>::contiguous(ConstMatrixView<T>(h->k.data() + lo * D, cnt, D), 0);
        v.recent_values = PagedRowsView<T>::contiguous(ConstMatrixView<T>(h->v.data() + lo * D, cnt, D), 0);
        v.window = cnt;
        attend_head(v, q.data(), 1, cnt - 1, 0.0883883f, part.data() + i * D);
      });
      benchmark::DoNotOptimize(part.data());  // (the merge of two halves is a few hundred flops)
    }
    benchmark::DoNotOptimize(out.data());
  }
  finish(state, n, 2.0 * D * sizeof(T));
}

template <AttentionMethod Method>
void BM_Coded(benchmark::State& state, Config cfg) {
  const std::size_t n = static_cast<std::size_t>(state.range(0));
  const std::size_t threads = static_cast<std::size_t>(state.range(1));
  const KVCache<float>& cache = coded_cache(n, cfg);
  const KVHeadView<float> view = cache.head_view(0, 0);
  const auto q = synthetic_kv(1, D, {.seed = 7});
  std::vector<float> out(D);
  for (auto _ : state) {
    attend_head(view, q.data(), 1, n - 1, 0.0883883f, out.data(), Method, threads > 1 ? &pool2() : nullptr, threads);
    benchmark::DoNotOptimize(out.data());
  }
  const double bytes = double(packed_code_bytes(n, D / cfg.C, cfg.bits)) * 2.0 / double(n);
  finish(state, n, bytes);
}

void args(benchmark::internal::Benchmark* b) {
  for (std::int64_t n : {4096, 32768, 131072})
    for (std::int64_t t : {1, 2}) b->Args({n, t});
  b->ArgNames({"ctx", "threads"})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

const bool registered = [] {
  benchmark::RegisterBenchmark("dense/fp32", BM_Dense<float>)->Apply(args);
  benchmark::RegisterBenchmark("dense/f16", BM_Dense<half>)->Apply(args);
  for (const Config& c : configs) {
    benchmark::RegisterBenchmark((std::string("dequant/") + c.name).c_str(), BM_Coded<AttentionMethod::dequantize>, c)
        ->Apply(args);
    benchmark::RegisterBenchmark((std::string("fused/") + c.name).c_str(), BM_Coded<AttentionMethod::fused>, c)->Apply(args);
  }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
