// Fit, encode and decode throughput of CQ at D = 128 (2c8b, 4c8b, 8c8b), scalar reference vs the
// native SIMD backend, and faiss ProductQuantizer on the same data in the same run when faiss is
// found. One thread everywhere: run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1.
//
//   OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ./build/bench/cq_quantizer_bench

#include "bench_util.hpp"

#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <mutex>

#if CQ_HAVE_FAISS
#include <faiss/impl/ProductQuantizer.h>
#include <omp.h>
#endif

using namespace cq;
using cq::bench::head_dim;
using cq::bench::kv_rows;

namespace {

constexpr unsigned fit_iterations = 25;

ConstMatrixView<float> data_view() { return {bench::kv_data().data(), kv_rows, head_dim}; }

// One fitted codebook per configuration, shared by the encode/decode benchmarks.
template <std::size_t C, int Bits>
const Codebook& fitted() {
  static const Codebook cb = [] {
    Codebook c(head_dim, C, Bits);
    FitOptions o;
    o.iterations = fit_iterations;
    fit_codebook(c, data_view(), {}, o);
    return c;
  }();
  return cb;
}

template <class Backend, std::size_t C, int Bits>
void BM_Fit(benchmark::State& state) {
  FitOptions o;
  o.iterations = fit_iterations;
  for (auto _ : state) {
    Codebook cb(head_dim, C, Bits);
    fit_codebook<Backend>(cb, data_view(), {}, o);
    benchmark::DoNotOptimize(cb.data());
  }
  state.SetItemsProcessed(state.iterations() * kv_rows);
  state.counters["rows"] = kv_rows;
  state.counters["iters"] = fit_iterations;
}

template <class Backend, std::size_t C, int Bits>
void BM_Encode(benchmark::State& state) {
  const Codebook& cb = fitted<C, Bits>();
  PackedCodes codes(cb.groups(), Bits, kv_rows);
  for (auto _ : state) {
    encode_rows<Backend>(cb.view(), data_view(), codes.view(), 0);
    benchmark::DoNotOptimize(codes.data());
  }
  state.SetItemsProcessed(state.iterations() * kv_rows);
  state.SetBytesProcessed(state.iterations() * kv_rows * head_dim * sizeof(float));
}

template <class Backend, std::size_t C, int Bits>
void BM_Decode(benchmark::State& state) {
  const Codebook& cb = fitted<C, Bits>();
  PackedCodes codes(cb.groups(), Bits, kv_rows);
  encode_rows(cb.view(), data_view(), codes.view(), 0);
  std::vector<float> out(kv_rows * head_dim);
  for (auto _ : state) {
    Backend::decode(cb.view(), codes.view(), 0, MatrixView<float>(out.data(), kv_rows, head_dim));
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * kv_rows);
  state.SetBytesProcessed(state.iterations() * kv_rows * head_dim * sizeof(float));
}

#define CQ_CONFIGS(M, B) M(B, 2, 8) M(B, 4, 8) M(B, 8, 8)
#define CQ_REGISTER_ENCODE(B, C, Bits)                                                                 \
  BENCHMARK(BM_Encode<backend::B, C, Bits>)->Name("encode/" #C "c" #Bits "b/" #B)->Unit(benchmark::kMillisecond); \
  BENCHMARK(BM_Decode<backend::B, C, Bits>)->Name("decode/" #C "c" #Bits "b/" #B)->Unit(benchmark::kMillisecond);
#define CQ_REGISTER_FIT(B, C, Bits) \
  BENCHMARK(BM_Fit<backend::B, C, Bits>)->Name("fit/" #C "c" #Bits "b/" #B)->Unit(benchmark::kMillisecond)->Iterations(1);

CQ_CONFIGS(CQ_REGISTER_ENCODE, Scalar)
CQ_CONFIGS(CQ_REGISTER_ENCODE, Native)
CQ_CONFIGS(CQ_REGISTER_FIT, Native)
BENCHMARK(BM_Fit<backend::Scalar, 8, 8>)->Name("fit/8c8b/Scalar")->Unit(benchmark::kMillisecond)->Iterations(1);

#if CQ_HAVE_FAISS
// faiss ProductQuantizer with M = 128 / C sub-quantizers of 8 bits: the same model as CQ-Cc8b.
std::unique_ptr<faiss::ProductQuantizer> faiss_pq(std::size_t C) {
  auto pq = std::make_unique<faiss::ProductQuantizer>(head_dim, head_dim / C, 8);
  pq->cp.niter = fit_iterations;
  pq->cp.max_points_per_centroid = 256;
  return pq;
}
const faiss::ProductQuantizer& faiss_fitted(std::size_t C) {
  static std::map<std::size_t, std::unique_ptr<faiss::ProductQuantizer>> cache;
  auto& p = cache[C];
  if (!p) {
    p = faiss_pq(C);
    p->train(kv_rows, bench::kv_data().data());
  }
  return *p;
}

void BM_FaissTrain(benchmark::State& state) {
  const std::size_t C = static_cast<std::size_t>(state.range(0));
  for (auto _ : state) {
    auto pq = faiss_pq(C);
    pq->train(kv_rows, bench::kv_data().data());
    benchmark::DoNotOptimize(pq->centroids.data());
  }
  state.SetItemsProcessed(state.iterations() * kv_rows);
  state.counters["omp_threads"] = omp_get_max_threads();
}
void BM_FaissEncode(benchmark::State& state) {
  const auto& pq = faiss_fitted(static_cast<std::size_t>(state.range(0)));
  std::vector<std::uint8_t> codes(kv_rows * pq.code_size);
  for (auto _ : state) {
    pq.compute_codes(bench::kv_data().data(), codes.data(), kv_rows);
    benchmark::DoNotOptimize(codes.data());
  }
  state.SetItemsProcessed(state.iterations() * kv_rows);
  state.SetBytesProcessed(state.iterations() * kv_rows * head_dim * sizeof(float));
}
void BM_FaissDecode(benchmark::State& state) {
  const auto& pq = faiss_fitted(static_cast<std::size_t>(state.range(0)));
  std::vector<std::uint8_t> codes(kv_rows * pq.code_size);
  pq.compute_codes(bench::kv_data().data(), codes.data(), kv_rows);
  std::vector<float> out(kv_rows * head_dim);
  for (auto _ : state) {
    pq.decode(codes.data(), out.data(), kv_rows);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * kv_rows);
  state.SetBytesProcessed(state.iterations() * kv_rows * head_dim * sizeof(float));
}
BENCHMARK(BM_FaissEncode)->Name("encode/faiss_pq")->ArgName("C")->Arg(2)->Arg(4)->Arg(8)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FaissDecode)->Name("decode/faiss_pq")->ArgName("C")->Arg(2)->Arg(4)->Arg(8)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FaissTrain)->Name("fit/faiss_pq")->ArgName("C")->Arg(2)->Arg(4)->Arg(8)->Unit(benchmark::kMillisecond)->Iterations(1);
#endif

}  // namespace

BENCHMARK_MAIN();
