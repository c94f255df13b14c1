// The peer of bench/compare_decode.sh: one decode step of ggml's CPU flash_attn_ext over f16 K/V.
// Not part of cq's build (it needs ggml); built outside the repository against ggml's public source:
//
//   git clone https://github.com/ggml-org/ggml && cd ggml
//   cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
//   cmake --build build -j
//   g++ -O2 -std=c++17 -I include <cq>/bench/peers/ggml_fa_decode.cpp \
//       build/src/libggml.a build/src/libggml-cpu.a build/src/libggml-base.a -fopenmp -o fa_bench
//
// Usage: fa_bench Q KV CTX THREADS REPS [EVICT_MIB] -- Q query heads over KV heads of head_dim 128,
// CTX f16 tokens, one query row (f32, as ggml keeps activations), on a ggml_threadpool of THREADS;
// prints the median microseconds of REPS graph computes (after 3 warm-up computes). EVICT_MIB > 0
// reads that many MiB of other memory before every timed compute (cq_decode_bench --evict).
#include <ggml-cpu.h>
#include <ggml.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 6 && argc != 7) {
    std::fprintf(stderr, "usage: %s Q KV CTX THREADS REPS [EVICT_MIB]\n", argv[0]);
    return 2;
  }
  const int q_heads = std::atoi(argv[1]), kv_heads = std::atoi(argv[2]), ctx_len = std::atoi(argv[3]);
  const int threads = std::atoi(argv[4]), reps = std::atoi(argv[5]);
  std::vector<unsigned char> other(argc == 7 ? std::size_t(std::atoi(argv[6])) << 20 : 0, 1);
  volatile unsigned sink = 0;
  constexpr int d = 128;

  ggml_init_params params{};
  params.mem_size = std::size_t(2) * d * ctx_len * kv_heads * sizeof(ggml_fp16_t) + (std::size_t(64) << 20);
  params.no_alloc = false;
  ggml_context* ctx = ggml_init(params);
  ggml_tensor* q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, 1, q_heads);
  ggml_tensor* k = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d, ctx_len, kv_heads);
  ggml_tensor* v = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d, ctx_len, kv_heads);

  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto* qd = static_cast<float*>(q->data);
  for (int i = 0; i < d * q_heads; ++i) qd[i] = normal(rng);
  for (ggml_tensor* t : {k, v}) {
    auto* td = static_cast<ggml_fp16_t*>(t->data);
    for (std::int64_t i = 0; i < ggml_nelements(t); ++i) td[i] = ggml_fp32_to_fp16(normal(rng));
  }

  ggml_tensor* out = ggml_flash_attn_ext(ctx, q, k, v, nullptr, 1.0f / std::sqrt(float(d)), 0.0f, 0.0f);
  ggml_cgraph* graph = ggml_new_graph(ctx);
  ggml_build_forward_expand(graph, out);

  ggml_threadpool_params tp = ggml_threadpool_params_default(threads);
  ggml_threadpool* pool = ggml_threadpool_new(&tp);
  ggml_cplan plan = ggml_graph_plan(graph, threads, pool);
  std::vector<std::uint8_t> work(plan.work_size + 1);
  plan.work_data = work.data();

  std::vector<double> us;
  for (int r = 0; r < reps + 3; ++r) {
    if (!other.empty()) {
      unsigned sum = 0;
      for (std::size_t i = 0; i < other.size(); i += 64) sum += other[i];
      sink = sink + sum;
    }
    const auto t0 = std::chrono::steady_clock::now();
    if (ggml_graph_compute(graph, &plan) != GGML_STATUS_SUCCESS) {
      std::fprintf(stderr, "ggml_graph_compute failed\n");
      return 1;
    }
    const auto t1 = std::chrono::steady_clock::now();
    if (r >= 3) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  std::sort(us.begin(), us.end());
  std::printf("%.1f\n", us[us.size() / 2]);
  ggml_threadpool_free(pool);
  ggml_free(ctx);
  return 0;
}
