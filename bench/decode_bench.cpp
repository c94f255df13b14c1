// One decode step of CPU attention on the paged cache, for side-by-side runs against another
// engine's kernel (bench/compare_decode.sh alternates processes and takes medians): one sequence
// of `ctx` tokens, `kv` KV heads with `q` query heads (GQA when q > kv), head_dim 128, CQ-8c8b
// keys and values, window 32, fp16 full-precision rows, post- or pre-RoPE keys, on `threads`
// threads (a cq::ThreadPool). Prints the median time of `reps` calls in microseconds.
//
//   ./build/bench/cq_decode_bench --q 8 --kv 1 --ctx 32768 --threads 2 [--pre-rope] [--reps 200]
//                                 [--method fused|histogram|centroids|dequantize] [--C 8] [--soft-cap 50]
//                                 [--evict 64]
//
// --evict M reads M MiB of other memory before every timed call, so the call finds its codes and
// codebooks out of the caches, as a decode step of a real model does (the layers' weights pass
// through the caches between two attention calls of a layer). Without it, repeated calls on the
// same small cache find it in L2/L3. The thread pool then spins through the eviction, as ggml's
// threadpool does by default (the peer of bench/compare_decode.sh).

#include "bench_util.hpp"

#include <cq/cq.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace cq;

int main(int argc, char** argv) {
  std::size_t q_heads = 1, kv_heads = 1, ctx = 32768, threads = 1, reps = 200, C = 8, evict_mib = 0;
  float soft_cap = 0.0f;
  bool pre_rope = false;
  std::string method = "fused";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return std::stoul(i + 1 < argc ? argv[++i] : "0"); };
    if (a == "--q") q_heads = next();
    else if (a == "--kv") kv_heads = next();
    else if (a == "--ctx") ctx = next();
    else if (a == "--threads") threads = next();
    else if (a == "--reps") reps = next();
    else if (a == "--C") C = next();
    else if (a == "--evict") evict_mib = next();
    else if (a == "--pre-rope") pre_rope = true;
    else if (a == "--soft-cap" && i + 1 < argc) soft_cap = std::stof(argv[++i]);
    else if (a == "--method" && i + 1 < argc) method = argv[++i];
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  constexpr std::size_t D = 128;
  const KVCodebooks cb = bench::synthetic_kv_codebooks(kv_heads, C, pre_rope ? KeyRope::pre : KeyRope::post, 4);
  PagedCacheOptions opt;
  opt.window = 32;
  opt.pre_rope_keys = pre_rope;
  PagedKVCache<half> cache(cb, MemoryPlan(cb, opt, sizeof(half)).pool_for(1, ctx, 4096));
  const SeqId s = cache.add_sequence();
  const auto rows = synthetic_kv(4096, kv_heads * D, {.seed = 4});
  std::vector<half> h(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) h[i] = half(rows[i]);
  for (std::size_t t = 0; t < ctx;) {
    const std::size_t m = std::min<std::size_t>(4096, ctx - t);
    cache.append(0, s, ConstMatrixView<half>(h.data(), m, kv_heads * D), ConstMatrixView<half>(h.data(), m, kv_heads * D));
    t += m;
  }
  const auto q = synthetic_kv(1, q_heads * D, {.seed = 5});
  std::vector<float> out(q_heads * D);
  // With --evict, the workers spin through the eviction instead of sleeping (ThreadPool's default
  // spin is 200 us; ggml's default threadpool polls for far longer): a woken worker starts ~45 us
  // late on the development VM, which would be charged to every cold call.
  ThreadPool pool(threads, evict_mib ? std::chrono::microseconds(200000) : std::chrono::microseconds(200));
  AttendOptions ao;
  ao.executor = threads > 1 ? &pool : nullptr;
  ao.logits_soft_cap = soft_cap;
  ao.method = method == "histogram"    ? AttentionMethod::fused_histogram
              : method == "centroids"  ? AttentionMethod::fused_centroids
              : method == "dequantize" ? AttentionMethod::dequantize
                                       : AttentionMethod::fused;
  auto run = [&] {
    cache.attend(0, s, ConstMatrixView<float>(q.data(), 1, q_heads * D), MatrixView<float>(out.data(), 1, q_heads * D), ao);
  };
  for (int i = 0; i < 10; ++i) run();
  std::vector<double> t(reps);
  std::vector<unsigned char> other(evict_mib << 20, 1);
  for (auto& x : t) {
    // One read per cache line: clean lines, nothing written back during the call.
    if (!other.empty()) detail::touch_lines(other.data(), other.size());
    const auto a = std::chrono::steady_clock::now();
    run();
    x = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count();
  }
  std::nth_element(t.begin(), t.begin() + std::ptrdiff_t(reps / 2), t.end());
  std::printf("%.2f\n", t[reps / 2]);
  return 0;
}
