// The toy transformer's decode with every weight on the GPU: embeddings, RMSNorm, RoPE and SwiGLU as
// small kernels, the projections by cuBLAS (fp32), attention through cq's device paged cache
// (append, then decode attention, per layer, the way an engine calls it) or through fp16 rows and a
// plain decode-attention kernel, the baseline. One sequence per held-out window, all windows in one
// batch, one token per step.

// cq's host headers bring Eigen's element types, whose defaulted __host__ __device__ members nvcc
// warns about (harmless; Eigen's code, not used on the device here).
#pragma nv_diag_suppress 20012
#include "gpu_decode.hpp"

#include <cq/cuda/cache/paged_kv_cache.cuh>
#include <cq/cuda/error.cuh>
#include <cq/cuda/memory.cuh>
#pragma nv_diag_default 20012

#include <cublas_v2.h>
#include <cuda_fp16.h>

#include <chrono>
#include <cmath>
#include <numeric>

namespace toy::gpu {

namespace {

using cq::cuda::DeviceBuffer;

#define TOY_CUBLAS(call)                                                                                      \
  do {                                                                                                       \
    const cublasStatus_t toy_status = (call);                                                                \
    CQ_CHECK(toy_status == CUBLAS_STATUS_SUCCESS, "cuBLAS: ", #call, " failed (status ", int(toy_status), ")"); \
  } while (0)

/// Block-wide reduction of one value per thread (blockDim.x a multiple of 32, at most 1024);
/// `identity` is op's neutral element (0 for a sum, -inf for a max).
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? scratch[threadIdx.x] : identity;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) scratch[0] = v;
  }
  __syncthreads();
  const T r = scratch[0];
  __syncthreads();
  return r;
}

__global__ void embed_kernel(const int* tokens, const float* table, float* x, int dim) {
  const std::size_t b = blockIdx.x;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) x[b * dim + i] = table[std::size_t(tokens[b]) * dim + i];
}

/// y = x * w / sqrt(mean(x^2) + eps) for row blockIdx.x, as the CPU model computes it.
__global__ void rms_norm_kernel(const float* x, const float* w, float* y, int dim, float eps) {
  __shared__ float scratch[32];
  const float* r = x + std::size_t(blockIdx.x) * dim;
  float s = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) s += r[i] * r[i];
  s = block_reduce(s, [](float a, float b) { return a + b; }, 0.0f, scratch);
  const float inv = 1.0f / sqrtf(s / float(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) y[std::size_t(blockIdx.x) * dim + i] = r[i] * w[i] * inv;
}

/// rotate_half RoPE of head blockIdx.y of row blockIdx.x at position pos (x: rows of heads x D).
__global__ void rope_kernel(float* x, int heads, int D, const float* cos, const float* sin, int pos) {
  const int half_d = D / 2;
  float* v = x + (std::size_t(blockIdx.x) * heads + blockIdx.y) * D;
  for (int i = threadIdx.x; i < half_d; i += blockDim.x) {
    const float c = cos[pos * half_d + i], s = sin[pos * half_d + i], a = v[i], b = v[i + half_d];
    v[i] = a * c - b * s;
    v[i + half_d] = b * c + a * s;
  }
}

/// g = silu(g) * u.
__global__ void silu_mul_kernel(float* g, const float* u, std::size_t n) {
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) {
    const float z = g[i];
    g[i] = z / (1.0f + expf(-z)) * u[i];
  }
}

/// nll[b] += -log softmax(logits[b])[targets[b]], in double as the CPU's next_token_nll.
__global__ void nll_kernel(const float* logits, const int* targets, int vocab, double* nll) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const float* r = logits + std::size_t(blockIdx.x) * vocab;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, r[i]);
  m = block_reduce(m, [](float a, float b) { return fmaxf(a, b); }, -INFINITY, fscratch);
  double z = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += exp(double(r[i] - m));
  z = block_reduce(z, [](double a, double b) { return a + b; }, 0.0, dscratch);
  if (threadIdx.x == 0) nll[blockIdx.x] += log(z) + double(m) - double(r[targets[blockIdx.x]]);
}

/// The fp16 baseline's cache write: row b's key and value of every KV head into position pos of
/// [B][kv_heads][max_len][D] half arrays.
__global__ void fp16_append_kernel(const float* k, const float* v, __half* K, __half* V, int kv_heads, int D,
                                   int max_len, int pos) {
  const std::size_t b = blockIdx.x, h = blockIdx.y;
  const std::size_t dst = ((b * kv_heads + h) * max_len + pos) * D, src = (b * kv_heads + h) * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    K[dst + i] = __float2half_rn(k[src + i]);
    V[dst + i] = __float2half_rn(v[src + i]);
  }
}

/// The fp16 baseline's decode attention (head_dim 128): block (sequence, KV head), 4 warps taking
/// every 4th token, a lane 4 channels of each row; each warp keeps an online softmax per query
/// head of the group, merged through shared memory at the end.
template <int G>
__global__ void fp16_attention_kernel(const float* q, const __half* K, const __half* V, float* out, int kv_heads,
                                      int max_len, int len, float scale) {
  constexpr int D = 128, W = 4;
  __shared__ float sm[W][G], sl[W][G], sacc[W][G][D];
  const int b = blockIdx.x, kvh = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q_heads = kv_heads * G;
  float qv[G][4], m[G], l[G], acc[G][4];
  for (int g = 0; g < G; ++g) {
    const float* qr = q + (std::size_t(b) * q_heads + kvh * G + g) * D + lane * 4;
    for (int c = 0; c < 4; ++c) qv[g][c] = qr[c] * scale, acc[g][c] = 0.0f;
    m[g] = -INFINITY, l[g] = 0.0f;
  }
  const std::size_t base = (std::size_t(b) * kv_heads + kvh) * max_len * D + lane * 4;
  for (int t = warp; t < len; t += W) {
    const uint2 kw = *reinterpret_cast<const uint2*>(K + base + std::size_t(t) * D);
    const uint2 vw = *reinterpret_cast<const uint2*>(V + base + std::size_t(t) * D);
    const float2 k01 = __half22float2(*reinterpret_cast<const __half2*>(&kw.x)),
                 k23 = __half22float2(*reinterpret_cast<const __half2*>(&kw.y));
    const float2 v01 = __half22float2(*reinterpret_cast<const __half2*>(&vw.x)),
                 v23 = __half22float2(*reinterpret_cast<const __half2*>(&vw.y));
    const float k4[4] = {k01.x, k01.y, k23.x, k23.y}, v4[4] = {v01.x, v01.y, v23.x, v23.y};
    for (int g = 0; g < G; ++g) {
      float s = qv[g][0] * k4[0] + qv[g][1] * k4[1] + qv[g][2] * k4[2] + qv[g][3] * k4[3];
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      const float mn = fmaxf(m[g], s), corr = expf(m[g] - mn), p = expf(s - mn);
      l[g] = l[g] * corr + p;
      for (int c = 0; c < 4; ++c) acc[g][c] = acc[g][c] * corr + p * v4[c];
      m[g] = mn;
    }
  }
  for (int g = 0; g < G; ++g) {
    if (lane == 0) sm[warp][g] = m[g], sl[warp][g] = l[g];
    for (int c = 0; c < 4; ++c) sacc[warp][g][lane * 4 + c] = acc[g][c];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    float M = -INFINITY;
    for (int w = 0; w < W; ++w) M = fmaxf(M, sm[w][g]);
    float L = 0.0f, o = 0.0f;
    for (int w = 0; w < W; ++w) {
      const float f = sm[w][g] == -INFINITY ? 0.0f : expf(sm[w][g] - M);
      L += sl[w][g] * f;
      o += sacc[w][g][d] * f;
    }
    out[(std::size_t(b) * q_heads + kvh * G + g) * D + d] = o / L;
  }
}

/// y (B, out) = x (B, in) W^T (+ y when accumulate), W row-major (out, in): in cuBLAS's
/// column-major terms y^T = W x^T with W seen as the (in x out) matrix W^T.
void linear(cublasHandle_t h, const float* x, const DeviceBuffer<float>& W, float* y, int B, int in, int out,
            bool accumulate) {
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  TOY_CUBLAS(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, out, B, in, &alpha, W.data(), in, x, in, &beta, y, out));
}

/// The decode's stream and cuBLAS handle, released on every exit.
struct Context {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  Context() {
    CQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
      cudaStreamDestroy(stream);
      CQ_CHECK(false, "cuBLAS: cublasCreate failed");
    }
  }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  ~Context() {
    cublasDestroy(blas);
    cudaStreamDestroy(stream);
  }
};

struct DeviceLayer {
  DeviceBuffer<float> attn_norm, ffn_norm, wq, wk, wv, wo, w1, w2, w3;
};

}  // namespace

Result decode(const Weights& w, const std::vector<std::vector<int>>& windows, const CacheChoice& choice) {
  const int B = int(windows.size());
  CQ_CHECK(B >= 1, "toy gpu decode: no windows");
  const int T = int(windows[0].size());
  for (const auto& win : windows)
    CQ_CHECK(int(win.size()) == T && T >= 2 && T <= w.max_len, "toy gpu decode: windows must have one length in 2..",
             w.max_len);
  const int D = w.head_dim, H = w.kv_heads, Hq = w.heads, G = Hq / H, dim = w.dim, F = w.ffn_hidden;
  CQ_CHECK(D == 128 && (G == 1 || G == 2 || G == 4 || G == 8), "toy gpu decode: the fp16 baseline kernel serves ",
           "head_dim 128 and GQA groups of 1, 2, 4 or 8");
  const int qw = Hq * D, kvw = H * D;

  const Context ctx;
  cudaStream_t stream = ctx.stream;
  cublasHandle_t blas = ctx.blas;
  TOY_CUBLAS(cublasSetStream(blas, stream));

  Result result;
  {
    const DeviceBuffer<float> embed(w.embed), norm(w.norm), output(w.output), cos(w.rope_cos), sin(w.rope_sin);
    std::vector<DeviceLayer> layers;
    for (const Weights::Layer& L : w.layer)
      layers.push_back({DeviceBuffer<float>(L.attn_norm), DeviceBuffer<float>(L.ffn_norm), DeviceBuffer<float>(L.wq),
                        DeviceBuffer<float>(L.wk), DeviceBuffer<float>(L.wv), DeviceBuffer<float>(L.wo),
                        DeviceBuffer<float>(L.w1), DeviceBuffer<float>(L.w2), DeviceBuffer<float>(L.w3)});
    std::vector<int> tokens(std::size_t(T) * B);  // [step][sequence]
    for (int t = 0; t < T; ++t)
      for (int b = 0; b < B; ++b) tokens[std::size_t(t) * B + b] = windows[std::size_t(b)][std::size_t(t)];
    const DeviceBuffer<int> d_tokens(tokens);
    DeviceBuffer<float> x(std::size_t(B) * dim), a(std::size_t(B) * dim), q(std::size_t(B) * qw), k(std::size_t(B) * kvw),
        v(std::size_t(B) * kvw), attn(std::size_t(B) * qw), gate(std::size_t(B) * F), up(std::size_t(B) * F),
        logits(std::size_t(B) * w.vocab);
    DeviceBuffer<double> nll{std::size_t(B)};
    nll.fill_zero(stream);
    CQ_CUDA_CHECK(cudaDeviceSynchronize());  // the uploads above ran on the legacy stream

    // The cache: cq's device paged cache, or fp16 rows.
    std::unique_ptr<cq::cuda::PagedKVCache<float>> cache;
    std::vector<cq::SeqId> seqs;
    std::vector<std::size_t> indptr(std::size_t(B) + 1);
    std::iota(indptr.begin(), indptr.end(), std::size_t{0});
    DeviceBuffer<__half> K, V;
    if (choice.codebooks) {
      cq::PagedCacheOptions o;
      o.page_tokens = 64;
      o.full_page_rows = 16;
      o.window = choice.window;
      o.pre_rope_keys = choice.pre_rope;
      o.rope.theta = w.rope_theta;  // as the CPU path's cache (caches.hpp)
      const cq::MemoryPlan plan(*choice.codebooks, o, sizeof(float));
      cache = std::make_unique<cq::cuda::PagedKVCache<float>>(*choice.codebooks, plan.pool_for(std::size_t(B), std::size_t(T)),
                                                               stream);
      for (int b = 0; b < B; ++b) seqs.push_back(cache->add_sequence());
    } else {
      K = DeviceBuffer<__half>(std::size_t(w.layers) * B * H * w.max_len * D);  // [layer][B][H][max_len][D]
      V = DeviceBuffer<__half>(std::size_t(w.layers) * B * H * w.max_len * D);
    }
    const float scale = 1.0f / std::sqrt(float(D));
    auto attention = [&](int l, int pos) {
      if (cache) {
        cache->append(std::size_t(l), seqs, indptr,
                      cq::cuda::DeviceRows<float>{k.data(), v.data(), std::size_t(B), std::size_t(kvw), std::size_t(D)});
        cq::cuda::DecodeQueries in;
        in.q_heads = Hq;
        in.q = q.data();
        in.out = attn.data();
        cache->attend(std::size_t(l), seqs, in);
        return;
      }
      const std::size_t layer_at = std::size_t(l) * B * H * w.max_len * D;
      __half *Kl = K.data() + layer_at, *Vl = V.data() + layer_at;
      fp16_append_kernel<<<dim3(unsigned(B), unsigned(H)), 128, 0, stream>>>(k.data(), v.data(), Kl, Vl, H, D, w.max_len,
                                                                            pos);
      const dim3 grid{unsigned(B), unsigned(H)};
      auto run = [&](auto kernel) { kernel<<<grid, 128, 0, stream>>>(q.data(), Kl, Vl, attn.data(), H, w.max_len, pos + 1, scale); };
      if (G == 1) run(fp16_attention_kernel<1>);
      if (G == 2) run(fp16_attention_kernel<2>);
      if (G == 4) run(fp16_attention_kernel<4>);
      if (G == 8) run(fp16_attention_kernel<8>);
    };

    CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto t0 = std::chrono::steady_clock::now();
    for (int pos = 0; pos < T; ++pos) {
      embed_kernel<<<unsigned(B), 256, 0, stream>>>(d_tokens.data() + std::size_t(pos) * B, embed.data(), x.data(), dim);
      for (int l = 0; l < w.layers; ++l) {
        const DeviceLayer& L = layers[std::size_t(l)];
        rms_norm_kernel<<<unsigned(B), 256, 0, stream>>>(x.data(), L.attn_norm.data(), a.data(), dim, w.norm_eps);
        linear(blas, a.data(), L.wq, q.data(), B, dim, qw, false);
        linear(blas, a.data(), L.wk, k.data(), B, dim, kvw, false);
        linear(blas, a.data(), L.wv, v.data(), B, dim, kvw, false);
        rope_kernel<<<dim3(unsigned(B), unsigned(Hq)), 64, 0, stream>>>(q.data(), Hq, D, cos.data(), sin.data(), pos);
        if (!(cache && choice.pre_rope))  // pre-RoPE keys: the cache rotates them inside attention
          rope_kernel<<<dim3(unsigned(B), unsigned(H)), 64, 0, stream>>>(k.data(), H, D, cos.data(), sin.data(), pos);
        attention(l, pos);
        linear(blas, attn.data(), L.wo, x.data(), B, qw, dim, true);
        rms_norm_kernel<<<unsigned(B), 256, 0, stream>>>(x.data(), L.ffn_norm.data(), a.data(), dim, w.norm_eps);
        linear(blas, a.data(), L.w1, gate.data(), B, dim, F, false);
        linear(blas, a.data(), L.w3, up.data(), B, dim, F, false);
        silu_mul_kernel<<<unsigned((std::size_t(B) * F + 255) / 256), 256, 0, stream>>>(gate.data(), up.data(), std::size_t(B) * F);
        linear(blas, gate.data(), L.w2, x.data(), B, F, dim, true);
      }
      rms_norm_kernel<<<unsigned(B), 256, 0, stream>>>(x.data(), norm.data(), a.data(), dim, w.norm_eps);
      linear(blas, a.data(), output, logits.data(), B, dim, w.vocab, false);
      if (pos + 1 < T)
        nll_kernel<<<unsigned(B), 256, 0, stream>>>(logits.data(), d_tokens.data() + std::size_t(pos + 1) * B, w.vocab,
                                                    nll.data());
      CQ_CUDA_CHECK(cudaGetLastError());
    }
    CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.tokens = std::size_t(B) * std::size_t(T);
    result.nll = nll.to_host(stream);
    result.kv_bytes = cache ? cache->memory().codes_in_use + cache->memory().full_in_use
                            : std::size_t(B) * w.layers * 2 * kvw * T * sizeof(__half);
  }
  return result;
}

}  // namespace toy::gpu
