#pragma once
/// Chunked prefill on CQ codes, on the GPU: the rows of a chunk of new tokens (many per sequence)
/// attend over their sequences' cached tokens (codes, sinks, window: an AttentionBatch whose
/// sequence b is the cache state the chunk follows) and over the chunk's own keys and values,
/// causally, in the model's dtype (fp16 or bf16). The chunk itself is read as the engine has it,
/// in full precision, as FlashAttention's prefill does; the engine appends it to the cache
/// afterwards. Kernels: attention/prefill/kernel.cuh (tensor cores, 256 query rows x 128-token
/// tiles of the coded rows decoded once into the workspace, or 64-token tiles decoded in shared
/// memory when that workspace would pass the object's limit).
///
///   PrefillAttention pa;
///   const PrefillPlan plan = pa.plan(shape, DType::f16);  // once per shape; allocates the workspace
///   pa.run(prefix, rows, max_rows, plan, stream);          // launches only
///
/// Served: head_dim 128, 8-bit codes of 2, 4 or 8 channels (the same for keys and values),
/// q_heads a multiple of kv_heads; keys after RoPE, or before it (the CQ paper's configuration:
/// AttentionBatch::rope, the sequences' positions): then the cached keys and the chunk's are
/// rotated in the kernels, the chunk's rows at the positions after their sequence's cached tokens
/// (DeviceSequence::position + coded + full), and the queries come rotated, as in decode. Code
/// runs must be 16-byte aligned (cudaMalloc'd buffers and PagedKVCache's pages are).

#include "cq/cuda/attention/grouped_rows/kernel.cuh"
#include "cq/cuda/attention/params.cuh"
#include "cq/cuda/attention/plan_base.cuh"
#include "cq/cuda/attention/prefill/kernel.cuh"
#include "cq/cuda/error.cuh"
#include "cq/cuda/memory.cuh"
#include "cq/error.hpp"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace cq::cuda {

/// A prefill launch, made once per shape by PrefillAttention::plan.
struct PrefillPlan {
  AttentionShape shape;
  DType type = DType::f16;  // of q, k, v and out
  /// Whether the coded rows are decoded into the workspace first (else per tile in shared memory),
  /// and how many tokens of each (sequence, KV head) it holds: shape.max_coded rounded up to 64.
  bool decoded = false;
  int decoded_cap = 0;
  void (*kernel)(AttentionBatch, PrefillRows, const unsigned char*, const __half*, int) = nullptr;
  void (*decode)(AttentionBatch, const unsigned char*, __half*, int) = nullptr;
  /// Bytes of the workspace the plan runs with: the half codebooks, then the decoded rows.
  std::size_t workspace_bytes() const {
    return codebook_bytes() + std::size_t(2) * shape.batch * shape.kv_heads * std::size_t(decoded_cap) *
                                  detail::PrefillConfig::head_dim * sizeof(__half);
  }
  std::size_t codebook_bytes() const { return std::size_t(shape.kv_heads) * detail::HalfCodebooks::bytes; }
};

class PrefillAttention {
 public:
  /// Checks that the prefill kernel serves `s` (batch, heads, head_dim and code configuration;
  /// max_full is not used) in dtype `type`, lets the kernel use its shared memory, and sizes this
  /// object's workspace: the half codebooks (128 KiB a KV head) and, when it stays within
  /// workspace_limit(), every sequence's coded rows decoded, 512 bytes per token and KV head up to
  /// s.max_coded (rounded up to 64), which must bound every sequence's coded tokens at run time
  /// (coded tokens past it are left out of the attention). Throws cq::Error naming what is not
  /// served.
  PrefillPlan plan(const AttentionShape& s, DType type) {
    CQ_CHECK(s.batch >= 1 && s.batch <= 65535, "cuda prefill: batch ", s.batch, " (needs 1 to 65535)");
    CQ_CHECK(s.kv_heads >= 1 && s.kv_heads <= 65535 && s.q_heads % s.kv_heads == 0 && s.q_heads >= s.kv_heads,
             "cuda prefill: q_heads ", s.q_heads, " must be a positive multiple of kv_heads ", s.kv_heads);
    CQ_CHECK(s.head_dim == detail::PrefillConfig::head_dim, "cuda prefill: head_dim ", s.head_dim,
             " (the prefill kernel serves 128)");
    CQ_CHECK(s.key_bits == 8 && s.value_bits == 8 && served_channels(s.key_channels) &&
                 s.value_channels == s.key_channels,
             "cuda prefill: codes of ", s.key_bits, " bits x ", s.key_channels, " channels (keys) and ", s.value_bits,
             " x ", s.value_channels, " (values); the prefill kernel serves 8-bit codes of 2, 4 or 8 channels, the "
             "same for keys and values");
    CQ_CHECK(s.rope_dim >= 0 && s.rope_dim <= s.head_dim && s.rope_dim % 2 == 0 &&
                 (s.rope_dim == 0 || s.rope_style == RopeStyle::interleaved || s.rope_dim == s.head_dim),
             "cuda prefill: rope_dim ", s.rope_dim, " (0, or an even count up to head_dim; rotate_half: head_dim)");
    CQ_CHECK(type == DType::f16 || type == DType::bf16, "cuda prefill: dtype ", dtype_name(type),
             " (F16 or BF16: the model's dtype)");
    CQ_CHECK(s.max_coded >= 0 && s.max_coded <= 0x7fffffc0, "cuda prefill: max_coded ", s.max_coded, " out of range");
    PrefillPlan p;
    p.shape = s;
    p.type = type;
    const std::size_t cap = std::size_t(s.max_coded + 63) / 64 * 64,
                      per_token = std::size_t(2) * s.batch * s.kv_heads * detail::PrefillConfig::head_dim * sizeof(__half);
    p.decoded = limit_ >= p.codebook_bytes() && (limit_ - p.codebook_bytes()) / per_token >= cap;
    p.decoded_cap = p.decoded ? int(cap) : 0;
    CQ_CHECK(p.decoded || s.rope_dim == 0, "cuda prefill: keys coded before RoPE are rotated as the coded rows are "
             "decoded into the workspace, whose ", per_token, " bytes a token for up to ", cap, " tokens pass the "
             "workspace limit of ", limit_, " bytes (set_workspace_limit)");
    p.kernel = pick(s.key_channels, type, p.decoded);
    p.decode = s.key_channels == 2 ? detail::prefill_decode_kernel<2, 2>
             : s.key_channels == 4 ? detail::prefill_decode_kernel<4, 4>
                                   : detail::prefill_decode_kernel<8, 8>;
    detail::allow_shared(reinterpret_cast<const void*>(p.kernel), detail::PrefillConfig::shared(p.decoded), true);
    if (workspace_.size() < p.workspace_bytes()) workspace_ = DeviceBuffer<unsigned char>(p.workspace_bytes());
    return p;
  }

  /// Plans decode the coded rows into the workspace (fast: once per run, not once per block of
  /// query rows) while that workspace stays within `bytes` (default 512 MiB: a batch of 8 KV heads
  /// and 128K coded tokens in all), else per tile in shared memory. Applies to later plans.
  void set_workspace_limit(std::size_t bytes) { limit_ = bytes; }
  std::size_t workspace_limit() const { return limit_; }

  /// Runs `plan` on `prefix` (its codes, sequences, codebooks, full_pages, page_tokens and scale;
  /// q, out and lse unused) and the chunk `rows` (device memory; `max_rows`: the most rows of any
  /// sequence, for the grid). Launches only. Throws cq::Error, launching nothing, if the batch is
  /// not the plan's shape, a pointer is unset, rows.q_heads differs from the plan's, a row stride
  /// is shorter than a row or q/k/v rows are not 16-byte aligned (strides multiples of 8, q, k
  /// and v 16-byte aligned), out rows not 4-byte aligned, or max_rows x the group size is not in
  /// 1..2^31 - 257.
  void run(const AttentionBatch& prefix, const PrefillRows& rows, int max_rows, const PrefillPlan& plan,
           cudaStream_t stream = nullptr) {
    check(prefix, rows, max_rows, plan);
    const AttentionShape& s = plan.shape;
    const std::size_t G = std::size_t(s.q_heads / s.kv_heads);
    const std::size_t block_rows = std::size_t(detail::PrefillConfig::rows);
    const dim3 grid(unsigned((std::size_t(max_rows) * G + block_rows - 1) / block_rows),
                    unsigned(s.kv_heads), unsigned(s.batch));
    detail::half_codebooks_kernel<><<<dim3(64, 2, unsigned(s.kv_heads)), 256, 0, stream>>>(
        prefix, s.key_channels, s.value_channels, workspace_.data(),
        s.rope_dim > 0 && s.rope_style == RopeStyle::rotate_half);  // a rotation pair's groups share a scale
    CQ_CUDA_CHECK_LAUNCH(half_codebooks_kernel);
    __half* decoded = reinterpret_cast<__half*>(workspace_.data() + plan.codebook_bytes());
    if (plan.decoded_cap > 0) {
      plan.decode<<<dim3(unsigned(plan.decoded_cap / 64), unsigned(s.kv_heads), unsigned(s.batch)), 256, 0, stream>>>(
          prefix, workspace_.data(), decoded, plan.decoded_cap);
      CQ_CUDA_CHECK_LAUNCH(prefill_decode_kernel);
    }
    plan.kernel<<<grid, detail::PrefillConfig::threads, detail::PrefillConfig::shared(plan.decoded), stream>>>(
        prefix, rows, workspace_.data(), decoded, plan.decoded_cap);
    CQ_CUDA_CHECK_LAUNCH(prefill_kernel);
  }

  /// The checks of run, without launching.
  void check(const AttentionBatch& prefix, const PrefillRows& rows, int max_rows, const PrefillPlan& plan) const {
    const AttentionShape& s = plan.shape;
    CQ_CHECK(plan.kernel != nullptr && workspace_.size() >= plan.workspace_bytes(),
             "cuda prefill: the plan was not made by this object");
    CQ_CHECK(prefix.batch == s.batch && prefix.kv_heads == s.kv_heads && prefix.head_dim == s.head_dim,
             "cuda prefill: the batch (", prefix.batch, " sequences, ", prefix.kv_heads, " KV heads, head_dim ",
             prefix.head_dim, ") is not the plan's (", s.batch, ", ", s.kv_heads, ", ", s.head_dim, ")");
    CQ_CHECK(rows.q_heads == s.q_heads, "cuda prefill: rows.q_heads ", rows.q_heads, " is not the plan's ", s.q_heads);
    CQ_CHECK(valid_page_tokens(prefix.page_tokens), "cuda prefill: page_tokens ", prefix.page_tokens,
             " must be 0 or a power of two from 32 on");
    // (The kernel keeps scores unscaled until the exponent: a negative scale would flip their maximum.)
    CQ_CHECK(std::isfinite(prefix.scale) && prefix.scale >= 0.0f, "cuda prefill: scale ", prefix.scale,
             " must be finite and >= 0 (0: 1 / sqrt(head_dim))");
    cq::detail::check_soft_cap(prefix.logits_soft_cap, "cuda prefill");
    CQ_CHECK((prefix.rope != nullptr) == (s.rope_dim > 0), "cuda prefill: AttentionBatch::rope must be set exactly "
             "when the plan's shape has keys before RoPE (rope_dim ", s.rope_dim, ")");
    CQ_CHECK(rows.indptr && rows.q && rows.k && rows.v && rows.out, "cuda prefill: indptr, q, k, v and out must be set");
    const std::size_t D = std::size_t(s.head_dim);
    CQ_CHECK(rows.q_stride >= std::size_t(s.q_heads) * D && rows.out_stride >= std::size_t(s.q_heads) * D &&
                 rows.kv_stride >= std::size_t(s.kv_heads) * D,
             "cuda prefill: row strides (q ", rows.q_stride, ", k/v ", rows.kv_stride, ", out ", rows.out_stride,
             " elements) shorter than a row");
    const auto addr = [](const void* x) { return reinterpret_cast<std::uintptr_t>(x); };
    CQ_CHECK(rows.kv_stride % 8 == 0 && ((addr(rows.k) | addr(rows.v)) & 15u) == 0,
             "cuda prefill: k and v rows must be 16-byte aligned (kv_stride ", rows.kv_stride, ", k ", rows.k, ", v ",
             rows.v, ")");
    CQ_CHECK(rows.q_stride % 8 == 0 && (addr(rows.q) & 15u) == 0,
             "cuda prefill: q rows must be 16-byte aligned (q_stride ", rows.q_stride, ", q ", rows.q, ")");
    CQ_CHECK(rows.out_stride % 2 == 0 && (addr(rows.out) & 3u) == 0, "cuda prefill: out rows must be 4-byte aligned");
    const std::size_t G = std::size_t(s.q_heads / s.kv_heads);
    CQ_CHECK(max_rows >= 1 && std::size_t(max_rows) * G <= 0x7fffffffu - 256u,
             "cuda prefill: max_rows ", max_rows, " out of range");
  }

 private:
  static bool served_channels(int c) { return c == 2 || c == 4 || c == 8; }

  using Kernel = void (*)(AttentionBatch, PrefillRows, const unsigned char*, const __half*, int);
  template <class E, bool Decoded>
  static Kernel pick_typed(int c) {
    if (c == 2) return detail::prefill_kernel<2, 2, E, Decoded>;
    if (c == 4) return detail::prefill_kernel<4, 4, E, Decoded>;
    return detail::prefill_kernel<8, 8, E, Decoded>;
  }
  static Kernel pick(int c, DType t, bool decoded) {
    if (t == DType::bf16) return decoded ? pick_typed<__nv_bfloat16, true>(c) : pick_typed<__nv_bfloat16, false>(c);
    return decoded ? pick_typed<__half, true>(c) : pick_typed<__half, false>(c);
  }

  DeviceBuffer<unsigned char> workspace_;
  std::size_t limit_ = std::size_t(512) << 20;
};

}  // namespace cq::cuda
