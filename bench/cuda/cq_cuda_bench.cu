// C API over cq's CUDA backend for bench/cuda/bench.py, which times cq and PyTorch's SDPA with the
// same CUDA events in one process. Everything here is device-side setup: synthetic KV-like data,
// codebooks fitted by cq's batched GPU k-means, codes from cq's GPU encoder.

#include <cq/cache/layout.hpp>
#include <cq/cuda/cuda.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace cq;

namespace {

thread_local std::string last_error;

__device__ inline float hash_normal(std::uint64_t a, std::uint64_t b) {
  using cq::detail::splitmix64;
  const std::uint64_t h = splitmix64(a * 0x100000001b3ULL ^ splitmix64(b));
  const float u1 = (float((h >> 40) & 0xFFFFFF) + 0.5f) / 16777216.0f, u2 = float(h & 0xFFFFFF) / 16777216.0f;
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

// KV-like rows for `jobs` independent heads: rank-16 correlated part, 4 outlier channels, noise.
__global__ void synthetic_kernel(float* x, std::size_t jobs, std::size_t n, int dim, std::uint64_t seed) {
  const std::size_t total = jobs * n * dim;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total; i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t j = i / (n * dim), r = (i / dim) % n;
    const int d = int(i % dim);
    float acc = 0.0f;
    for (int k = 0; k < 16; ++k)
      acc += hash_normal(seed + j * 7919 + 1, r * 16 + k) * hash_normal(seed + j * 104729 + 2, std::uint64_t(k) * 4096 + d) *
             rsqrtf(float(k + 1)) * 0.5f;
    const bool outlier = (d * 37 + int(j)) % dim < 4;
    x[i] = (outlier ? 8.0f * (d % 2 ? 1.0f : -1.0f) + 4.0f * acc : acc) + 0.1f * hash_normal(seed + j + 3, r * dim + d);
  }
}

void make_synthetic(float* x, std::size_t jobs, std::size_t n, int dim, std::uint64_t seed) {
  synthetic_kernel<<<4096, 256>>>(x, jobs, n, dim, seed);
  CQ_CUDA_CHECK_LAUNCH(synthetic_kernel);
}

Codebook to_host_codebook(const float* dev_centroids, int dim, int C, int bits) {
  std::vector<float> h(std::size_t(dim / C) * (std::size_t(1) << bits) * C);
  CQ_CUDA_CHECK(cudaMemcpy(h.data(), dev_centroids, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
  Codebook cb(std::size_t(dim), std::size_t(C), bits);
  cb.set_all(h.data());
  cb.info().method = "kmeans-cuda";
  return cb;
}

struct Handle {
  int batch, q_heads, kv_heads, ctx, C, bits, window;
  std::vector<cuda::DeviceCodebook> kcb, vcb;
  cuda::DeviceBuffer<cuda::DeviceCodebookView> kviews, vviews;
  std::vector<cuda::DeviceBuffer<std::uint8_t>> code_bufs;
  cuda::DeviceBuffer<float> full;
  cuda::DeviceBuffer<cuda::DeviceKVCodes> codes;
  std::vector<cuda::DeviceKVCodes> contiguous;         // each (sequence, KV head)'s own buffers
  std::vector<std::uint8_t> host_kcodes, host_vcodes;  // the one head's codes every buffer copies
  cuda::DeviceBuffer<std::uint8_t> pool;               // cqb_set_pages: the code pages
  cuda::DeviceBuffer<std::uint32_t> page_table;
  CodePageLayout page_layout{};           // cqb_set_pages: the pool's layout
  std::vector<std::uint32_t> page_ids;    // sequence s's pages: [s x page_ids.size() / batch, ...)
  std::vector<cuda::DeviceKVCodes> paged;  // cqb_set_pages: the descriptors of the pool built last
  int paged_tokens = 0, paged_in_order = -1;  // ... and its page size and order
  cuda::DeviceBuffer<cuda::DeviceSequence> seqs;
  cuda::DeviceBuffer<float> q, out;
  cuda::AttentionBatch batch_desc;
  cuda::AttentionShape shape;
  cuda::FusedAttention fa;
  cuda::AttentionPlan plan;
  long long bytes = 0;
  // cqb_prefill: a chunk of prefill_rows fp16 rows per sequence and its plan.
  int prefill_rows = 0;
  cuda::DeviceBuffer<__half> pq, pk, pv, pout;
  cuda::DeviceBuffer<std::uint32_t> pindptr;
  cuda::PrefillAttention pa;
  cuda::PrefillPlan pplan;
  cuda::PrefillRows prows;
  // cqb_set_prefill_rope: keys coded before RoPE for cqb_prefill (the decode calls stay post-RoPE).
  cuda::DeviceBuffer<cuda::DeviceRope> prope;
  RopeStyle prope_style = RopeStyle::rotate_half;
};

__global__ void to_half_kernel(const float* x, std::size_t n, __half* y) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    y[i] = __float2half_rn(x[i]);
}

cuda::DeviceBuffer<__half> synthetic_half(std::size_t jobs, std::size_t n, int dim, std::uint64_t seed) {
  cuda::DeviceBuffer<float> f(jobs * n * dim);
  make_synthetic(f.data(), jobs, n, dim, seed);
  cuda::DeviceBuffer<__half> h(f.size());
  to_half_kernel<<<1024, 256>>>(f.data(), f.size(), h.data());
  CQ_CUDA_CHECK_LAUNCH(to_half_kernel);
  return h;
}

}  // namespace

extern "C" {

const char* cqb_last_error() { return last_error.c_str(); }

/// A batch of `batch` sequences of `ctx` tokens (the last `window` in fp32), q_heads / kv_heads,
/// head_dim 128, CQ-<C>c<bits>b keys and values. Returns nullptr on error (see cqb_last_error).
void* cqb_create(int batch, int q_heads, int kv_heads, int ctx, int C, int bits, int window) try {
  constexpr int D = 128;
  auto h = std::make_unique<Handle>();
  h->batch = batch, h->q_heads = q_heads, h->kv_heads = kv_heads, h->ctx = ctx, h->C = C, h->bits = bits;
  h->window = window;
  const int coded = ctx - window;
  // One head's keys and values; codebooks fitted on them by the GPU k-means (10 iterations).
  cuda::DeviceBuffer<float> kv_rows(std::size_t(2) * coded * D);
  make_synthetic(kv_rows.data(), 2, std::size_t(coded), D, 42);
  const int G = D / C, K = 1 << bits;
  cuda::DeviceBuffer<float> cents(std::size_t(2) * G * K * C);
  const int fit_rows = std::min(coded, 16384);
  cuda::DeviceBuffer<float> fit_x(std::size_t(2) * fit_rows * D);
  for (int j = 0; j < 2; ++j)
    CQ_CUDA_CHECK(cudaMemcpy(fit_x.data() + std::size_t(j) * fit_rows * D, kv_rows.data() + std::size_t(j) * coded * D,
                             std::size_t(fit_rows) * D * sizeof(float), cudaMemcpyDeviceToDevice));
  cuda::fit_codebooks_batched(fit_x.data(), nullptr, 2, fit_rows, D, C, bits, {10, 1}, cents.data(), nullptr);
  const Codebook kc = to_host_codebook(cents.data(), D, C, bits);
  const Codebook vc = to_host_codebook(cents.data() + std::size_t(G) * K * C, D, C, bits);
  std::vector<cuda::DeviceCodebookView> key_views, value_views;
  for (int i = 0; i < kv_heads; ++i) {
    h->kcb.emplace_back(kc);
    h->vcb.emplace_back(vc);
  }
  for (int i = 0; i < kv_heads; ++i) {
    key_views.push_back(h->kcb[i].view());
    value_views.push_back(h->vcb[i].view());
  }
  h->kviews = cuda::DeviceBuffer<cuda::DeviceCodebookView>(key_views);
  h->vviews = cuda::DeviceBuffer<cuda::DeviceCodebookView>(value_views);
  // Encode once, then copy the codes to every (sequence, KV head): each has its own memory.
  const std::size_t code_bytes = packed_code_bytes(std::size_t(coded), std::size_t(G), bits);
  cuda::DeviceBuffer<std::uint8_t> kcodes(code_bytes), vcodes(code_bytes);
  cuda::encode(h->kcb[0].view(), kv_rows.data(), std::size_t(coded), D, kcodes.data(), std::size_t(coded), 0);
  cuda::encode(h->vcb[0].view(), kv_rows.data() + std::size_t(coded) * D, std::size_t(coded), D,
               vcodes.data(), std::size_t(coded), 0);
  std::vector<cuda::DeviceKVCodes> codes;
  for (int s = 0; s < batch; ++s)
    for (int i = 0; i < kv_heads; ++i) {
      h->code_bufs.emplace_back(code_bytes);
      CQ_CUDA_CHECK(cudaMemcpy(h->code_bufs.back().data(), kcodes.data(), code_bytes, cudaMemcpyDeviceToDevice));
      h->code_bufs.emplace_back(code_bytes);
      CQ_CUDA_CHECK(cudaMemcpy(h->code_bufs.back().data(), vcodes.data(), code_bytes, cudaMemcpyDeviceToDevice));
      codes.push_back({h->code_bufs[h->code_bufs.size() - 2].data(), h->code_bufs.back().data()});
    }
  h->codes = cuda::DeviceBuffer<cuda::DeviceKVCodes>(codes);
  h->contiguous = codes;
  h->host_kcodes = kcodes.to_host();
  h->host_vcodes = vcodes.to_host();
  // Window rows: [batch][2 (K, V)][kv_heads][window][D].
  const std::size_t per_seq = std::size_t(2) * kv_heads * window * D;
  h->full = cuda::DeviceBuffer<float>(std::max<std::size_t>(1, batch * per_seq));
  if (window > 0) make_synthetic(h->full.data(), std::size_t(batch) * 2 * kv_heads, std::size_t(window), D, 7);
  std::vector<cuda::DeviceSequence> seqs;
  for (int s = 0; s < batch; ++s) {
    const float* base = h->full.data() + s * per_seq;
    seqs.push_back({std::uint32_t(coded), std::uint32_t(window), base, base + std::size_t(kv_heads) * window * D});
  }
  h->seqs = cuda::DeviceBuffer<cuda::DeviceSequence>(seqs);
  h->q = cuda::DeviceBuffer<float>(std::size_t(batch) * q_heads * D);
  make_synthetic(h->q.data(), 1, std::size_t(batch) * q_heads, D, 9);
  h->out = cuda::DeviceBuffer<float>(std::size_t(batch) * q_heads * D);
  h->batch_desc = {};
  h->batch_desc.batch = batch, h->batch_desc.q_heads = q_heads, h->batch_desc.kv_heads = kv_heads;
  h->batch_desc.head_dim = D;
  h->batch_desc.codes = h->codes.data(), h->batch_desc.sequences = h->seqs.data();
  h->batch_desc.key_codebooks = h->kviews.data(), h->batch_desc.value_codebooks = h->vviews.data();
  h->batch_desc.q = h->q.data(), h->batch_desc.out = h->out.data();
  h->shape = {batch, q_heads, kv_heads, D, C, bits, C, bits, coded, window};
  h->plan = h->fa.plan(h->shape);
  // Bytes one call must read: codes (K and V), the window rows, q and out. Codebooks are read
  // once per block from L2 and not counted.
  h->bytes = (long long)(2 * code_bytes) * batch * kv_heads + (long long)(batch * per_seq * sizeof(float)) +
             2LL * batch * q_heads * D * sizeof(float);
  CQ_CUDA_CHECK(cudaDeviceSynchronize());
  return h.release();
} catch (const std::exception& e) {
  last_error = e.what();
  return nullptr;
}

/// Launches attention on `stream` (cudaStream_t as an integer). stages: cq::cuda::detail::AttentionStage
/// bits (31: all, the public FusedAttention::run; fewer: detail::run_stages, for the time split).
int cqb_run(void* handle, unsigned stages, std::uint64_t stream) try {
  auto* h = static_cast<Handle*>(handle);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  if (stages == cuda::detail::stage_all)
    h->fa.run(h->batch_desc, h->plan, s);
  else
    cuda::detail::run_stages(h->fa, h->batch_desc, h->plan, s, stages);
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}

/// The median time in ms of cuda::encode_into_pages of one new token per sequence (fp16 rows
/// [batch][kv_heads][128]: a decode step's keys and values) into the pages of cqb_set_pages (the
/// slot of each sequence's last coded token), over `reps` runs timed by events on `stream`. With
/// `with_rows`, each run also writes the same rows into a pool of fp16 full-precision pages (a
/// page of 16 rows per sequence: the window's newest row) by cuda::write_full_rows, as a decode
/// step appends a token to its window.
double cqb_append_ms(void* handle, int reps, std::uint64_t stream, int with_rows) try {
  auto* h = static_cast<Handle*>(handle);
  CQ_CHECK(!h->page_ids.empty(), "cqb_append_ms: call cqb_set_pages first");
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  constexpr int D = 128;
  const std::size_t B = std::size_t(h->batch), H = std::size_t(h->kv_heads), P = h->page_layout.page_tokens;
  const std::size_t last = std::size_t(h->ctx - h->window) - 1, per_seq = h->page_ids.size() / B;
  std::vector<std::int64_t> slots;
  for (std::size_t s = 0; s < B; ++s)
    slots.push_back(std::int64_t(h->page_ids[s * per_seq + last / P]) * std::int64_t(P) + std::int64_t(last % P));
  std::vector<__half> rows(B * H * D);
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = __float2half(float((i * 2654435761u) % 2001) / 1000.0f - 1.0f);
  cuda::DeviceBuffer<__half> keys(rows), values(rows);
  cuda::DeviceBuffer<std::int64_t> dslots(slots);
  cuda::PagedEncode<__half> p;
  p.keys = keys.data();
  p.values = values.data();
  p.rows = B;
  p.row_stride = H * D;
  p.head_stride = D;
  p.slots = dslots.data();
  p.key_codebooks = h->kviews.data();
  p.value_codebooks = h->vviews.data();
  p.head_dim = D;
  p.key_channels = p.value_channels = h->C;
  p.key_bits = p.value_bits = h->bits;
  p.pool = h->pool.data();
  p.layout = h->page_layout;
  p.pages = h->pool.size() / h->page_layout.page_bytes();
  cuda::PagedRowWrite<__half> w;
  static_cast<cuda::SlotRows<__half>&>(w) = p;
  w.layout = FullPageLayout{16, H, D, sizeof(__half)};
  w.pages = B;
  cuda::DeviceBuffer<__half> full_pool(B * w.layout.page_elements());
  std::vector<std::int64_t> row_slots;
  for (std::size_t s = 0; s < B; ++s) row_slots.push_back(std::int64_t(s * 16 + (s * 7) % 16));
  cuda::DeviceBuffer<std::int64_t> drow_slots(row_slots);
  w.pool = full_pool.data();
  w.slots = drow_slots.data();
  cudaEvent_t e0, e1;
  CQ_CUDA_CHECK(cudaEventCreate(&e0));
  CQ_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int r = 0; r < reps + 3; ++r) {  // 3 warm-up runs
    CQ_CUDA_CHECK(cudaEventRecord(e0, st));
    cuda::encode_into_pages(p, st);
    if (with_rows) cuda::write_full_rows(w, st);
    CQ_CUDA_CHECK(cudaEventRecord(e1, st));
    CQ_CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0.0f;
    CQ_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (r >= 3) ms.push_back(t);
  }
  CQ_CUDA_CHECK(cudaEventDestroy(e0));
  CQ_CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
} catch (const std::exception& e) {
  last_error = e.what();
  return -1.0;
}

/// Chunked prefill over the handle's context (its coded tokens and window rows): a chunk of `rows`
/// fp16 tokens per sequence (synthetic q, k, v), causal, through cuda::PrefillAttention on
/// `stream`. The chunk's buffers are made and the shape planned at the first call with `rows`.
int cqb_prefill(void* handle, int rows, std::uint64_t stream) try {
  auto* h = static_cast<Handle*>(handle);
  constexpr int D = 128;
  if (h->prefill_rows != rows) {
    const std::size_t R = std::size_t(h->batch) * rows;
    h->pq = synthetic_half(1, R * h->q_heads, D, 11);
    h->pk = synthetic_half(1, R * h->kv_heads, D, 12);
    h->pv = synthetic_half(1, R * h->kv_heads, D, 13);
    h->pout = cuda::DeviceBuffer<__half>(R * h->q_heads * D);
    std::vector<std::uint32_t> indptr(std::size_t(h->batch) + 1);
    for (std::size_t i = 0; i < indptr.size(); ++i) indptr[i] = std::uint32_t(i * rows);
    h->pindptr = cuda::DeviceBuffer<std::uint32_t>(indptr);
    cuda::AttentionShape shape = h->shape;
    if (h->prope.size() > 0) shape.rope_dim = D, shape.rope_style = h->prope_style;
    h->pplan = h->pa.plan(shape, DType::f16);
    cuda::PrefillRows& r = h->prows;
    r.indptr = h->pindptr.data();
    r.q = h->pq.data(), r.k = h->pk.data(), r.v = h->pv.data(), r.out = h->pout.data();
    r.q_stride = r.out_stride = std::size_t(h->q_heads) * D;
    r.kv_stride = std::size_t(h->kv_heads) * D;
    r.q_heads = h->q_heads;
    h->prefill_rows = rows;
    CQ_CUDA_CHECK(cudaDeviceSynchronize());
  }
  cuda::AttentionBatch prefix = h->batch_desc;
  prefix.rope = h->prope.size() > 0 ? h->prope.data() : nullptr;
  h->pa.run(prefix, h->prows, rows, h->pplan, reinterpret_cast<cudaStream_t>(stream));
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}

/// PrefillAttention::set_workspace_limit for the next cqb_prefill (which plans again); 0: the coded
/// rows decoded per tile in the kernel.
int cqb_set_prefill_workspace_limit(void* handle, std::uint64_t bytes) try {
  auto* h = static_cast<Handle*>(handle);
  h->pa.set_workspace_limit(bytes);
  h->prefill_rows = 0;
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}

/// Keys coded before RoPE for the next cqb_prefill (which plans again): RoPE with base `theta` over
/// all 128 channels, rotate_half (style 0) or interleaved pairs (1); theta <= 0: keys after RoPE.
int cqb_set_prefill_rope(void* handle, double theta, int style) try {
  auto* h = static_cast<Handle*>(handle);
  if (theta <= 0.0) {
    h->prope = cuda::DeviceBuffer<cuda::DeviceRope>();
  } else {
    RopeConfig rc;
    rc.theta = theta;
    rc.style = style == 1 ? RopeStyle::interleaved : RopeStyle::rotate_half;
    const cuda::DeviceRope d = cuda::make_device_rope(Rope(rc, 128));
    h->prope = cuda::DeviceBuffer<cuda::DeviceRope>(std::vector<cuda::DeviceRope>{d});
    h->prope_style = rc.style;
  }
  h->prefill_rows = 0;
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}

/// The prefill output of cqb_prefill (fp16, [batch x rows][q_heads][128]) as floats into `host`.
int cqb_prefill_output(void* handle, float* host) try {
  auto* h = static_cast<Handle*>(handle);
  const std::vector<__half> o = h->pout.to_host();
  for (std::size_t i = 0; i < o.size(); ++i) host[i] = __half2float(o[i]);
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}

long long cqb_bytes(void* handle) { return static_cast<Handle*>(handle)->bytes; }
int cqb_set_split_tokens(void* handle, int tokens) try {
  auto* h = static_cast<Handle*>(handle);
  h->fa.set_max_split_tokens(tokens);
  h->plan = h->fa.plan(h->shape);
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}
/// Moves the codes into pages of `page_tokens` tokens (a power of two, 32 or more) with the CPU cache's
/// layout (cache/layout.hpp: per page, every KV head's key run, then its value run), the pages of
/// all sequences shuffled over one pool (an engine's pool after some churn; `in_order`: each
/// sequence's pages consecutive instead), read through page tables; 0 goes back to each (sequence,
/// KV head)'s contiguous buffers. `in_order` 2: those contiguous buffers themselves read through an
/// identity page table (the paged code path over contiguous bytes; no pool, so not for
/// cqb_append_ms).
int cqb_set_pages(void* handle, int page_tokens, int in_order) try {
  auto* h = static_cast<Handle*>(handle);
  CQ_CHECK(cuda::valid_page_tokens(page_tokens), "cqb_set_pages: ", page_tokens, " is not a power of two from 32 on");
  h->batch_desc.page_tokens = page_tokens;
  const auto use = [&](const std::vector<cuda::DeviceKVCodes>& codes) {  // the batch's code descriptors
    h->codes.upload(codes.data(), codes.size());
    CQ_CUDA_CHECK(cudaDeviceSynchronize());
    return 0;
  };
  const auto keep = [&](const std::vector<cuda::DeviceKVCodes>& codes) {  // ... reused while the page size stays
    h->paged = codes, h->paged_tokens = page_tokens, h->paged_in_order = in_order;
    return use(codes);
  };
  if (page_tokens == 0) return use(h->contiguous);
  if (page_tokens == h->paged_tokens && in_order == h->paged_in_order) return use(h->paged);  // A/B rounds
  const std::size_t G = std::size_t(128 / h->C), coded = std::size_t(h->ctx - h->window), P = std::size_t(page_tokens);
  if (in_order == 2) {  // each (sequence, KV head)'s own buffers read as pages in order: the paged path, contiguous bytes
    const std::size_t per_seq = (coded + P - 1) / P;
    std::vector<std::uint32_t> ids(per_seq);
    std::iota(ids.begin(), ids.end(), 0u);
    h->page_table = cuda::DeviceBuffer<std::uint32_t>(ids);
    std::vector<cuda::DeviceKVCodes> codes = h->contiguous;
    for (cuda::DeviceKVCodes& c : codes) {
      c.pages = h->page_table.data();
      c.page_bytes = packed_code_bytes(P, G, h->bits);
    }
    return keep(codes);
  }
  const std::size_t block_bytes = packed_code_bytes(block_tokens, G, h->bits);
  const CodePageLayout cl{P, std::size_t(h->kv_heads), block_bytes, block_bytes};
  const std::size_t per_seq = (coded + P - 1) / P, pages = std::size_t(h->batch) * per_seq;
  std::vector<std::uint32_t> ids(pages);
  std::iota(ids.begin(), ids.end(), 0u);
  if (!in_order) std::shuffle(ids.begin(), ids.end(), std::mt19937(5));
  std::vector<std::uint8_t> pool(pages * cl.page_bytes(), 0);
  for (std::size_t p = 0; p < pages; ++p) {
    const std::size_t i = p % per_seq, first = i * P * G, n = std::min(P, coded - i * P);
    const std::size_t bytes = packed_code_bytes(n, G, h->bits);
    for (std::size_t kvh = 0; kvh < std::size_t(h->kv_heads); ++kvh) {
      std::memcpy(pool.data() + ids[p] * cl.page_bytes() + cl.key_offset(kvh), h->host_kcodes.data() + first, bytes);
      std::memcpy(pool.data() + ids[p] * cl.page_bytes() + cl.value_offset(kvh), h->host_vcodes.data() + first, bytes);
    }
  }
  h->pool = cuda::DeviceBuffer<std::uint8_t>(pool);
  h->page_table = cuda::DeviceBuffer<std::uint32_t>(ids);  // sequence s's pages: [s x per_seq, ...)
  h->page_layout = cl;
  h->page_ids = ids;
  std::vector<cuda::DeviceKVCodes> codes;
  for (std::size_t s = 0; s < std::size_t(h->batch); ++s)
    for (std::size_t kvh = 0; kvh < std::size_t(h->kv_heads); ++kvh) {
      cuda::DeviceKVCodes c;
      c.key_codes = h->pool.data() + cl.key_offset(kvh);
      c.value_codes = h->pool.data() + cl.value_offset(kvh);
      c.pages = h->page_table.data() + s * per_seq;
      c.page_bytes = cl.page_bytes();
      codes.push_back(c);
    }
  return keep(codes);
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}
/// 0: automatic, 1: the general kernel, 2: the lane-tables kernel, 3: the grouped-rows kernel (cq::cuda::AttentionKernel).
/// Logits soft-capped at `cap` (AttentionBatch::logits_soft_cap; 0: none) from the next run on.
int cqb_set_soft_cap(void* handle, float cap) try {
  cq::detail::check_soft_cap(cap, "cqb_set_soft_cap");
  static_cast<Handle*>(handle)->batch_desc.logits_soft_cap = cap;
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}

int cqb_set_kernel(void* handle, int kernel) try {
  CQ_CHECK(kernel >= 0 && kernel <= 3, "cqb_set_kernel: kernel ", kernel, " is not 0, 1, 2 or 3");
  auto* h = static_cast<Handle*>(handle);
  h->fa.set_kernel(static_cast<cuda::AttentionKernel>(kernel));
  h->plan = h->fa.plan(h->shape);
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}
int cqb_kernel(void* handle) { return int(static_cast<Handle*>(handle)->fa.last_kernel()); }
int cqb_splits(void* handle) { return static_cast<Handle*>(handle)->fa.last_splits(); }
int cqb_head_group(void* handle) { return static_cast<Handle*>(handle)->fa.last_head_group(); }
long long cqb_shared_bytes(void* handle) { return (long long)static_cast<Handle*>(handle)->fa.last_shared_bytes(); }
void cqb_destroy(void* handle) { delete static_cast<Handle*>(handle); }

/// Output of the last run, copied to host memory (batch * q_heads * 128 floats).
int cqb_output(void* handle, float* host) try {
  auto* h = static_cast<Handle*>(handle);
  CQ_CUDA_CHECK(cudaDeviceSynchronize());
  h->out.download(host, h->out.size());
  CQ_CUDA_CHECK(cudaDeviceSynchronize());
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}

/// Batched calibration benchmark: `jobs` heads of n x dim synthetic rows generated on the device,
/// every codebook fitted with `iterations` Lloyd steps. Writes the fit's wall time (seconds, CUDA
/// events, data generation excluded) and copies the data and codebooks of the first `keep` jobs
/// to host buffers (for the CPU comparison). Returns 0 on success.
int cqb_calibrate(int jobs, int n, int dim, int C, int bits, int iterations, int keep, float* host_x,
                  float* host_centroids, double* seconds) try {
  cuda::DeviceBuffer<float> x(std::size_t(jobs) * n * dim);
  make_synthetic(x.data(), std::size_t(jobs), std::size_t(n), dim, 1234);
  const int G = dim / C, K = 1 << bits;
  cuda::DeviceBuffer<float> cents(std::size_t(jobs) * G * K * C);
  cudaEvent_t a, b;
  CQ_CUDA_CHECK(cudaEventCreate(&a));
  CQ_CUDA_CHECK(cudaEventCreate(&b));
  CQ_CUDA_CHECK(cudaDeviceSynchronize());
  CQ_CUDA_CHECK(cudaEventRecord(a));
  cuda::fit_codebooks_batched(x.data(), nullptr, jobs, n, dim, C, bits, {iterations, 1234}, cents.data(), nullptr);
  CQ_CUDA_CHECK(cudaEventRecord(b));
  CQ_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CQ_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  *seconds = ms / 1000.0;
  x.download(host_x, std::size_t(keep) * n * dim);
  cents.download(host_centroids, std::size_t(keep) * G * K * C);
  CQ_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return 0;
} catch (const std::exception& e) {
  last_error = e.what();
  return 1;
}

}  // extern "C"
