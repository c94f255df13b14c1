// cq::gpu_test::DeviceCache: the CUDA tests' handle on cq::cuda::PagedKVCache (cache_glue.hpp).

// cq's host headers bring Eigen's element types, whose defaulted __host__ __device__ members nvcc
// warns about (harmless; Eigen's code, not used on the device here).
#pragma nv_diag_suppress 20012
#include "cache_glue.hpp"

#include <cq/cuda/cuda.cuh>  // the umbrella, as in gpu_glue.cu (which says why)
#include <cq/element.hpp>
#pragma nv_diag_default 20012

#include <cstring>

namespace cq::gpu_test {

namespace {

std::vector<std::uint8_t> to_bytes(const std::vector<float>& x, DType t) {
  std::vector<std::uint8_t> b(x.size() * dtype_size(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (t == DType::f16) reinterpret_cast<half*>(b.data())[i] = half(x[i]);
    else if (t == DType::bf16) reinterpret_cast<bfloat16*>(b.data())[i] = bfloat16(x[i]);
    else reinterpret_cast<float*>(b.data())[i] = x[i];
  }
  return b;
}

std::vector<float> from_bytes(const std::vector<std::uint8_t>& b, DType t) {
  std::vector<float> x(b.size() / dtype_size(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (t == DType::f16) x[i] = float(reinterpret_cast<const half*>(b.data())[i]);
    else if (t == DType::bf16) x[i] = float(reinterpret_cast<const bfloat16*>(b.data())[i]);
    else x[i] = reinterpret_cast<const float*>(b.data())[i];
  }
  return x;
}

}  // namespace

template <class T>
struct DeviceCache<T>::Impl {
  cudaStream_t stream = nullptr;
  std::unique_ptr<cuda::PagedKVCache<T>> cache;
  Impl(const KVCodebooks& cb, const PagedCacheOptions& opt) {
    CQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    try {
      cache = std::make_unique<cuda::PagedKVCache<T>>(cb, opt, stream);
    } catch (...) {
      cudaStreamDestroy(stream);
      throw;
    }
  }
  ~Impl() {
    cache.reset();
    cudaStreamDestroy(stream);
  }
  void sync() const { CQ_CUDA_CHECK(cudaStreamSynchronize(stream)); }
};

template <class T>
DeviceCache<T>::DeviceCache(const KVCodebooks& codebooks, const PagedCacheOptions& opt)
    : impl_(std::make_unique<Impl>(codebooks, opt)) {}
template <class T>
DeviceCache<T>::~DeviceCache() = default;

template <class T>
SeqId DeviceCache<T>::add_sequence(std::size_t first_position) {
  return impl_->cache->add_sequence(first_position);
}
template <class T>
void DeviceCache<T>::free_sequence(SeqId s) {
  impl_->cache->free_sequence(s);
}
template <class T>
SeqId DeviceCache<T>::fork(SeqId s) {
  return impl_->cache->fork(s);
}
template <class T>
void DeviceCache<T>::truncate(SeqId s, std::size_t tokens) {
  impl_->cache->truncate(s, tokens);
}
template <class T>
void DeviceCache<T>::reserve(SeqId s, std::size_t tokens) {
  impl_->cache->reserve(s, tokens);
  impl_->sync();
}
template <class T>
std::size_t DeviceCache<T>::length(SeqId s, std::size_t layer) const {
  return impl_->cache->length(s, layer);
}

template <class T>
void DeviceCache<T>::append(std::size_t layer, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
                            const std::vector<T>& keys, const std::vector<T>& values, bool heads_outer) {
  using DT = cuda::device_element_t<T>;
  const KVCodebooks& cb = impl_->cache->codebooks();
  const std::size_t H = cb.kv_heads(), D = cb.head_dim(), rows = keys.size() / (H * D);
  CQ_CHECK(keys.size() == rows * H * D && values.size() == keys.size(), "gpu_test: keys and values are not rows x ",
           H * D);
  std::vector<T> k = keys, v = values;
  if (heads_outer)  // [rows][H][D] -> [H][rows][D]
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t h = 0; h < H; ++h)
        for (std::size_t d = 0; d < D; ++d) {
          k[(h * rows + r) * D + d] = keys[(r * H + h) * D + d];
          v[(h * rows + r) * D + d] = values[(r * H + h) * D + d];
        }
  cuda::DeviceBuffer<DT> dk(reinterpret_cast<const DT*>(k.data()), k.size(), impl_->stream),
      dv(reinterpret_cast<const DT*>(v.data()), v.size(), impl_->stream);
  cuda::DeviceRows<DT> r{dk.data(), dv.data(), rows, heads_outer ? D : H * D, heads_outer ? rows * D : D};
  impl_->cache->append(layer, seqs, indptr, r);
  impl_->sync();
}

template <class T>
std::vector<float> DeviceCache<T>::attend(std::size_t layer, std::span<const SeqId> seqs, int q_heads,
                                          const std::vector<float>& q, DType q_type, DType out_type,
                                          std::vector<float>* lse, std::span<const std::size_t> indptr,
                                          float soft_cap) {
  const std::vector<std::uint8_t> qb = to_bytes(q, q_type);
  const std::size_t rows = indptr.empty() ? seqs.size() : indptr.back();
  cuda::DeviceBuffer<std::uint8_t> dq(qb.data(), qb.size(), impl_->stream), dout(q.size() * dtype_size(out_type));
  cuda::DeviceBuffer<float> dlse(lse ? rows * std::size_t(q_heads) : 0);
  cuda::DecodeQueries in;
  in.q_heads = q_heads;
  in.q = dq.data(), in.q_type = q_type;
  in.out = dout.data(), in.out_type = out_type;
  in.lse = lse ? dlse.data() : nullptr;
  in.logits_soft_cap = soft_cap;
  if (indptr.empty()) impl_->cache->attend(layer, seqs, in);
  else impl_->cache->attend(layer, seqs, indptr, in);
  impl_->sync();
  if (lse) *lse = dlse.to_host(impl_->stream);
  return from_bytes(dout.to_host(impl_->stream), out_type);
}

template <class T>
std::vector<float> DeviceCache<T>::prefill(std::size_t layer, std::span<const SeqId> seqs,
                                           std::span<const std::size_t> indptr, int q_heads,
                                           const std::vector<float>& q, const std::vector<T>& keys,
                                           const std::vector<T>& values, std::vector<float>* lse, float soft_cap) {
  const DType type = dtype_of<T>;
  const std::vector<std::uint8_t> qb = to_bytes(q, type);
  const std::size_t rows = indptr.back();
  cuda::DeviceBuffer<std::uint8_t> dq(qb.data(), qb.size(), impl_->stream), dout(q.size() * dtype_size(type));
  cuda::DeviceBuffer<std::uint8_t> dk(reinterpret_cast<const std::uint8_t*>(keys.data()), keys.size() * sizeof(T),
                                      impl_->stream);
  cuda::DeviceBuffer<std::uint8_t> dv(reinterpret_cast<const std::uint8_t*>(values.data()), values.size() * sizeof(T),
                                      impl_->stream);
  cuda::DeviceBuffer<float> dlse(lse ? rows * std::size_t(q_heads) : 0);
  cuda::PrefillChunk in;
  in.q_heads = q_heads;
  in.q = dq.data(), in.k = dk.data(), in.v = dv.data(), in.out = dout.data();
  in.lse = lse ? dlse.data() : nullptr;
  in.logits_soft_cap = soft_cap;
  impl_->cache->attend_prefill(layer, seqs, indptr, in);
  impl_->sync();
  if (lse) *lse = dlse.to_host(impl_->stream);
  return from_bytes(dout.to_host(impl_->stream), type);
}

template <class T>
void DeviceCache<T>::set_prefill_workspace_limit(std::size_t bytes) {
  impl_->cache->set_prefill_workspace_limit(bytes);
}

template <class T>
std::vector<float> DeviceCache<T>::decode_steps(std::span<const SeqId> seqs, int q_heads, const std::vector<T>& keys,
                                                const std::vector<T>& values, const std::vector<float>& q,
                                                std::size_t steps, int mode, std::size_t max_context, int* captures) {
  using DT = cuda::device_element_t<T>;
  cuda::PagedKVCache<T>& cache = *impl_->cache;
  const cudaStream_t st = impl_->stream;
  const std::size_t B = seqs.size(), L = cache.codebooks().layers(), H = cache.codebooks().kv_heads(),
                    D = cache.codebooks().head_dim(), kw = H * D, qw = std::size_t(q_heads) * D;
  CQ_CHECK(keys.size() == steps * B * kw && values.size() == keys.size() && q.size() == steps * B * qw,
           "gpu_test: decode_steps inputs have the wrong sizes");
  // Fixed device buffers: a graph captures their addresses; each step's inputs are copied in.
  cuda::DeviceBuffer<DT> dk(B * kw), dv(B * kw);
  cuda::DeviceBuffer<float> dq(B * qw), dout(L * B * qw);
  std::vector<std::size_t> indptr(B + 1);
  for (std::size_t i = 0; i <= B; ++i) indptr[i] = i;
  std::vector<float> result;
  cudaGraphExec_t exec = nullptr;
  int captured = 0;
  auto in_of = [&](std::size_t l) {
    cuda::DecodeQueries in;
    in.q_heads = q_heads;
    in.q = dq.data();
    in.out = dout.data() + l * B * qw;
    return in;
  };
  const cuda::DeviceRows<DT> rows{dk.data(), dv.data(), B, kw, D};
  auto layers = [&] {
    for (std::size_t l = 0; l < L; ++l) {
      cache.append_step(l, rows);
      cache.attend_step(l, in_of(l));
    }
  };
  for (std::size_t t = 0; t < steps; ++t) {
    dk.upload(reinterpret_cast<const DT*>(keys.data()) + t * B * kw, B * kw, st);
    dv.upload(reinterpret_cast<const DT*>(values.data()) + t * B * kw, B * kw, st);
    dq.upload(q.data() + t * B * qw, B * qw, st);
    if (mode == 0) {
      for (std::size_t l = 0; l < L; ++l) {
        cache.append(l, seqs, indptr, rows);
        cache.attend(l, seqs, in_of(l));
      }
    } else {
      const bool moved = cache.begin_decode_step(seqs, max_context);
      if (mode == 1) {
        layers();
      } else {
        if (moved || !exec) {
          if (exec) CQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
          for (std::size_t l = 0; l < L; ++l) cache.plan_step_attention(l, q_heads);
          cudaGraph_t graph;
          CQ_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
          layers();
          CQ_CUDA_CHECK(cudaStreamEndCapture(st, &graph));
          CQ_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
          CQ_CUDA_CHECK(cudaGraphDestroy(graph));
          ++captured;
        }
        CQ_CUDA_CHECK(cudaGraphLaunch(exec, st));
      }
    }
    impl_->sync();
    const std::vector<float> out = dout.to_host(st);
    result.insert(result.end(), out.begin(), out.end());
    if (t == steps / 2) {  // attend() on a larger shape between steps: it must not disturb a graph
      std::vector<std::size_t> three(B + 1);
      for (std::size_t i = 0; i <= B; ++i) three[i] = 3 * i;
      cuda::DeviceBuffer<float> q3(3 * B * qw), o3(3 * B * qw);
      q3.fill_zero(st);
      cuda::DecodeQueries in;
      in.q_heads = q_heads;
      in.q = q3.data();
      in.out = o3.data();
      cache.attend(0, seqs, three, in);
      impl_->sync();
    }
  }
  if (exec) CQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
  if (captures) *captures = captured;
  return result;
}

template <class T>
std::vector<std::uint8_t> DeviceCache<T>::pool() const {
  const std::span<std::byte> p = impl_->cache->pool();
  std::vector<std::uint8_t> h(p.size());
  impl_->sync();
  if (!h.empty()) CQ_CUDA_CHECK(cudaMemcpy(h.data(), p.data(), p.size(), cudaMemcpyDeviceToHost));
  return h;
}

template class DeviceCache<float>;
template class DeviceCache<half>;
template class DeviceCache<bfloat16>;

}  // namespace cq::gpu_test
