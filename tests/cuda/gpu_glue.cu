#include "gpu_glue.hpp"

#include <cq/cuda/cuda.cuh>

namespace cq::gpu_test {

std::string device_name() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return {};
  }
  cudaDeviceProp prop{};
  CQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  return prop.name;
}

void encode(const Codebook& cb, const std::vector<float>& x, std::size_t rows, std::vector<std::uint8_t>& codes,
            std::size_t tokens, std::size_t first) {
  cuda::DeviceCodebook dcb(cb);
  cuda::DeviceBuffer<float> dx(x);
  cuda::DeviceBuffer<std::uint8_t> dc(codes);
  cuda::encode(dcb.view(), dx.data(), rows, cb.dim(), dc.data(), tokens, first);
  codes = dc.to_host();
}

std::vector<float> decode(const Codebook& cb, const std::vector<std::uint8_t>& codes, std::size_t tokens,
                          std::size_t first, std::size_t rows) {
  cuda::DeviceCodebook dcb(cb);
  cuda::DeviceBuffer<std::uint8_t> dc(codes);
  cuda::DeviceBuffer<float> out(rows * cb.dim());
  cuda::decode(dcb.view(), dc.data(), tokens, first, rows, out.data(), cb.dim());
  return out.to_host();
}

std::vector<float> attention(const std::vector<Codebook>& key_cb, const std::vector<Codebook>& value_cb,
                             const std::vector<Sequence>& batch, const std::vector<float>& q, int q_heads, int head_dim,
                             float scale, Kernel kernel, int* splits_used, bool misaligned) {
  const int kv_heads = static_cast<int>(key_cb.size());
  std::vector<cuda::DeviceCodebook> dk, dv;
  std::vector<CodebookView> kviews, vviews;
  for (int h = 0; h < kv_heads; ++h) {
    dk.emplace_back(key_cb[h]);
    dv.emplace_back(value_cb[h]);
  }
  for (int h = 0; h < kv_heads; ++h) {
    kviews.push_back(dk[h].view());
    vviews.push_back(dv[h].view());
  }
  // Misaligned: centroid tables one float, code buffers 4 bytes past the allocation's start.
  std::vector<cuda::DeviceBuffer<float>> shifted_centroids;
  if (misaligned)
    for (int h = 0; h < kv_heads; ++h)
      for (const auto& [cb, view] : {std::pair{&key_cb[h], &kviews[h]}, std::pair{&value_cb[h], &vviews[h]}}) {
        shifted_centroids.emplace_back(cb->size() + 1);
        shifted_centroids.back().upload(cb->data(), cb->size(), nullptr, 1);
        view->centroids = shifted_centroids.back().data() + 1;
      }
  const std::size_t shift = misaligned ? 4 : 0;
  auto device_codes = [&](const std::vector<std::uint8_t>& host) {
    cuda::DeviceBuffer<std::uint8_t> d(host.size() + shift);
    d.upload(host.data(), host.size(), nullptr, shift);
    return d;
  };
  std::vector<cuda::DeviceBuffer<std::uint8_t>> code_bufs;
  std::vector<cuda::DeviceBuffer<float>> dense_bufs;
  std::vector<cuda::DeviceKVCodes> codes;
  std::vector<cuda::DeviceSequence> seqs;
  int max_coded = 0, max_dense = 0;
  for (const Sequence& s : batch) {
    for (int h = 0; h < kv_heads; ++h) {
      code_bufs.push_back(device_codes(s.key_codes[h]));
      code_bufs.push_back(device_codes(s.value_codes[h]));
      codes.push_back({code_bufs[code_bufs.size() - 2].data() + shift, code_bufs.back().data() + shift});
    }
    dense_bufs.emplace_back(s.dense_keys);
    dense_bufs.emplace_back(s.dense_values);
    seqs.push_back({s.coded, s.dense, dense_bufs[dense_bufs.size() - 2].data(), dense_bufs.back().data()});
    max_coded = std::max(max_coded, int(s.coded));
    max_dense = std::max(max_dense, int(s.dense));
  }
  cuda::DeviceBuffer<CodebookView> dkv(kviews), dvv(vviews);
  cuda::DeviceBuffer<cuda::DeviceKVCodes> dcodes(codes);
  cuda::DeviceBuffer<cuda::DeviceSequence> dseqs(seqs);
  cuda::DeviceBuffer<float> dq(q), dout(q.size());
  cuda::AttentionBatch b;
  b.batch = int(batch.size());
  b.q_heads = q_heads;
  b.kv_heads = kv_heads;
  b.head_dim = head_dim;
  b.codes = dcodes.data();
  b.sequences = dseqs.data();
  b.key_codebooks = dkv.data();
  b.value_codebooks = dvv.data();
  b.q = dq.data();
  b.out = dout.data();
  b.scale = scale;
  cuda::FusedAttention fa;
  fa.set_kernel(kernel == Kernel::general      ? cuda::FusedAttention::Kernel::general
                : kernel == Kernel::byte_codes ? cuda::FusedAttention::Kernel::byte_codes
                                               : cuda::FusedAttention::Kernel::automatic);
  fa.run(b, {q_heads, kv_heads, head_dim, int(key_cb[0].channels()), key_cb[0].bits(), int(value_cb[0].channels()),
             value_cb[0].bits(), max_coded, max_dense});
  if (splits_used) *splits_used = fa.last_splits();
  return dout.to_host();
}

std::vector<Codebook> fit_batched(const std::vector<float>& x, const std::vector<float>* weights, int jobs, int n,
                                  int dim, int channels, int bits, int iterations, std::uint64_t seed,
                                  std::vector<double>* objectives) {
  cuda::DeviceBuffer<float> dx(x);
  cuda::DeviceBuffer<float> dw(weights ? weights->size() : 0);
  if (weights) dw.upload(weights->data(), weights->size());
  const int G = dim / channels, K = 1 << bits;
  cuda::DeviceBuffer<float> cents(std::size_t(jobs) * G * K * channels);
  cuda::DeviceBuffer<double> obj(std::size_t(jobs) * G * (iterations + 1));
  cuda::fit_codebooks_batched(dx.data(), weights ? dw.data() : nullptr, jobs, n, dim, channels, bits,
                              {iterations, seed}, cents.data(), obj.data());
  const std::vector<float> h = cents.to_host();
  if (objectives) *objectives = obj.to_host();
  std::vector<Codebook> out;
  for (int j = 0; j < jobs; ++j) {
    Codebook cb(std::size_t(dim), std::size_t(channels), bits);
    cb.set_all(h.data() + std::size_t(j) * G * K * channels);
    cb.info().method = "kmeans-cuda";
    out.push_back(std::move(cb));
  }
  return out;
}

}  // namespace cq::gpu_test
