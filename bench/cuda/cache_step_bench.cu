// cq_cuda_cache_bench: a decode step through cuda::PagedKVCache at an engine's scale, to see what the
// cache's host side (page planning, slot mappings, page tables, uploads) costs beside its kernels.
//
//   cq_cuda_cache_bench [--batch 64] [--ctx 4096] [--q-heads 32] [--kv-heads 8] [--C 8] [--layers 8] [--steps 30]
//                       [--pre-rope 0|1]
//
// Fills `batch` sequences of `ctx` tokens (fp16 rows, CQ-<C>c8b keys and values with random
// codebooks, window 32, pages of 256), then runs `steps` decode steps, each appending one row per
// sequence and attending in every layer. Prints per layer and step: the host time inside append
// and attend (the calls return before the device finishes), the wall time of a step synchronised
// after every layer (latency), and of steps queued back to back (throughput); then the same steps
// through begin_decode_step and one CUDA graph of all layers (synchronised per step, and queued);
// then attention alone, `steps` rounds of every layer's attend queued back to back (device-bound
// from batch 16: the attention kernels' time). --pre-rope 1: keys appended before RoPE (LLaMA-3's
// RoPE, theta 500000), rotated inside attention.
#pragma nv_diag_suppress 20012
#include <cq/cuda/cache/paged_kv_cache.cuh>
#pragma nv_diag_default 20012

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double, std::micro>(Clock::now() - t).count(); }

template <class = void>
__global__ void fill_kernel(__half* x, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    x[i] = __float2half(float(h % 2001) / 1000.0f - 1.0f);
  }
}

}  // namespace

int main(int argc, char** argv) try {
  std::size_t B = 64, ctx = 4096, Hq = 32, H = 8, C = 8, layers = 8, steps = 30, pre_rope = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const std::size_t v = std::stoul(argv[i + 1]);
    if (a == "--batch") B = v;
    else if (a == "--ctx") ctx = v;
    else if (a == "--q-heads") Hq = v;
    else if (a == "--kv-heads") H = v;
    else if (a == "--C") C = v;
    else if (a == "--layers") layers = v;
    else if (a == "--steps") steps = v;
    else if (a == "--pre-rope") pre_rope = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  constexpr std::size_t D = 128;
  cq::RopeConfig rope;
  rope.theta = 500000.0;
  cq::KVCodebooks books(layers, H, D, std::vector<cq::LayerSpec>{{{C, 8}, {C, 8}}},
                        pre_rope ? cq::KeyRope::pre : cq::KeyRope::post, pre_rope ? rope : cq::RopeConfig{});
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (std::size_t l = 0; l < layers; ++l)
    for (std::size_t h = 0; h < H; ++h) {
      cq::Codebook k(D, C, 8), v(D, C, 8);
      std::vector<float> c(k.size());
      for (float& x : c) x = normal(rng);
      k.set_all(c.data());
      for (float& x : c) x = normal(rng);
      v.set_all(c.data());
      books.set(l, h, std::move(k), std::move(v));
    }
  cudaStream_t stream;
  CQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cq::PagedCacheOptions o;
  o.page_tokens = 256;
  o.full_page_rows = 16;
  o.window = 32;
  if (pre_rope) o.pre_rope_keys = true, o.rope = rope;
  const cq::MemoryPlan plan(books, o, sizeof(cq::half));
  cq::cuda::PagedKVCache<cq::half> cache(books, plan.pool_for(B, ctx + 4 * steps + 4, 512), stream);
  std::vector<cq::SeqId> seqs;
  for (std::size_t b = 0; b < B; ++b) seqs.push_back(cache.add_sequence());
  const std::size_t chunk = 512;
  cq::cuda::DeviceBuffer<__half> rows(B * chunk * H * D), q(B * Hq * D), out(B * Hq * D);
  fill_kernel<><<<1024, 256, 0, stream>>>(rows.data(), rows.size(), 1);
  fill_kernel<><<<256, 256, 0, stream>>>(q.data(), q.size(), 2);
  // Prefill, a chunk of each sequence per call.
  for (std::size_t done = 0; done < ctx; done += chunk) {
    const std::size_t n = std::min(chunk, ctx - done);
    std::vector<std::size_t> indptr(B + 1);
    for (std::size_t b = 0; b <= B; ++b) indptr[b] = b * n;
    for (std::size_t l = 0; l < layers; ++l)
      cache.append(l, seqs, indptr, {rows.data(), rows.data(), B * n, H * D, D});
  }
  CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<std::size_t> one(B + 1);
  std::iota(one.begin(), one.end(), std::size_t{0});
  cq::cuda::DecodeQueries in;
  in.q_heads = int(Hq);
  in.q = q.data(), in.q_type = cq::DType::f16;
  in.out = out.data(), in.out_type = cq::DType::f16;
  double host_append = 0, host_attend = 0, latency = 0;
  auto step = [&](bool sync_each_layer) {
    for (std::size_t l = 0; l < layers; ++l) {
      auto t = Clock::now();
      cache.append(l, seqs, one, {rows.data(), rows.data(), B, H * D, D});
      host_append += since(t);
      t = Clock::now();
      cache.attend(l, seqs, in);
      host_attend += since(t);
      if (sync_each_layer) CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
  };
  step(true);  // warm-up: plans, codebooks on the device
  host_append = host_attend = 0;
  auto t = Clock::now();
  for (std::size_t s = 0; s < steps; ++s) step(true);
  latency = since(t);
  const double calls = double(steps * layers);
  const double ha = host_append / calls, ht = host_attend / calls;
  host_append = host_attend = 0;
  t = Clock::now();
  for (std::size_t s = 0; s < steps; ++s) step(false);
  CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  const double throughput = since(t);
  // The same steps through begin_decode_step and one CUDA graph of every layer's append_step and
  // attend_step, replayed: host work once per step instead of per layer.
  cudaGraphExec_t exec = nullptr;
  auto graph_step = [&] {
    const bool moved = cache.begin_decode_step(seqs, ctx + 4 * steps + 4);
    if (moved || !exec) {
      if (exec) CQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
      for (std::size_t l = 0; l < layers; ++l) cache.plan_step_attention(l, int(Hq));
      cudaGraph_t g;
      CQ_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      for (std::size_t l = 0; l < layers; ++l) {
        cache.append_step(l, {rows.data(), rows.data(), B, H * D, D});
        cache.attend_step(l, in);
      }
      CQ_CUDA_CHECK(cudaStreamEndCapture(stream, &g));
      CQ_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
      CQ_CUDA_CHECK(cudaGraphDestroy(g));
    }
    CQ_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  };
  graph_step();  // warm-up and capture
  CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  t = Clock::now();
  for (std::size_t s = 0; s < steps; ++s) {
    graph_step();
    CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  const double graph_sync = since(t);
  t = Clock::now();
  for (std::size_t s = 0; s < steps; ++s) graph_step();
  CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  const double graph_queued = since(t);
  CQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
  // Attention alone, queued.
  for (std::size_t l = 0; l < layers; ++l) cache.attend(l, seqs, in);
  CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  t = Clock::now();
  for (std::size_t s = 0; s < steps; ++s)
    for (std::size_t l = 0; l < layers; ++l) cache.attend(l, seqs, in);
  CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  const double attend_only = since(t);
  std::printf("batch %zu, %zu/%zu heads, context %zu, CQ-%zuc8b, %zu layers, %zu steps: per layer and step, "
              "host append %.1f us, host attend %.1f us; synchronised per layer %.1f us; queued %.1f us "
              "(host inside the calls when queued: append %.1f, attend %.1f); CUDA graph step: synchronised per step "
              "%.1f us, queued %.1f us per layer; attend alone, queued: %.1f us per layer (%s keys)\n",
              B, Hq, H, ctx, C, layers, steps, ha, ht, latency / calls, throughput / calls, host_append / calls,
              host_attend / calls, graph_sync / calls, graph_queued / calls, attend_only / calls,
              pre_rope ? "pre-RoPE" : "post-RoPE");
  CQ_CUDA_CHECK(cudaStreamDestroy(stream));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "cq_cuda_cache_bench: %s\n", e.what());
  return 1;
}
