// Reconstruction MSE of CQ against faiss ProductQuantizer (the same model: M = D / C sub-quantizers
// of 8 bits) trained with the same iterations and sample cap, and against the KIVI-style INT
// baseline at equal (or, at 1 bit, higher) bits per channel. Data: 32768 x 128 KV-like rows.
//
//   ./build/bench/cq_vs_faiss            prints a markdown table
//   ./build/bench/cq_vs_faiss --check    also exits non-zero unless CQ is within 2% of faiss and
//                                        below INT at equal bits (run by ctest when faiss exists)

#include "bench_util.hpp"

#include <faiss/impl/ProductQuantizer.h>

#include <chrono>
#include <cstdio>
#include <cstring>

using namespace cq;
using cq::bench::head_dim;
using cq::bench::kv_rows;

namespace {

constexpr unsigned iterations = 25;
constexpr int max_points_per_centroid = 256;

ConstMatrixView<float> data_view() { return {bench::kv_data().data(), kv_rows, head_dim}; }

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

struct Row {
  std::size_t C;
  double cq_mse, faiss_mse, cq_s, faiss_s;
};

Row compare(std::size_t C) {
  Row row{C, 0, 0, 0, 0};
  auto t = std::chrono::steady_clock::now();
  Codebook cb(head_dim, C, 8);
  FitOptions o;
  o.iterations = iterations;
  o.max_points_per_centroid = max_points_per_centroid;
  fit_codebook(cb, data_view(), {}, o);
  row.cq_s = seconds_since(t);
  PackedCodes codes(cb.groups(), 8, kv_rows);
  encode_rows(cb.view(), data_view(), codes.view(), 0);
  std::vector<float> dec(kv_rows * head_dim);
  decode_rows(cb.view(), codes.view(), 0, MatrixView<float>(dec.data(), kv_rows, head_dim));
  row.cq_mse = mse(data_view(), ConstMatrixView<float>(dec.data(), kv_rows, head_dim));

  t = std::chrono::steady_clock::now();
  faiss::ProductQuantizer pq(head_dim, head_dim / C, 8);
  pq.cp.niter = iterations;
  pq.cp.max_points_per_centroid = max_points_per_centroid;
  pq.train(kv_rows, bench::kv_data().data());
  row.faiss_s = seconds_since(t);
  std::vector<std::uint8_t> fc(kv_rows * pq.code_size);
  pq.compute_codes(bench::kv_data().data(), fc.data(), kv_rows);
  pq.decode(fc.data(), dec.data(), kv_rows);
  row.faiss_mse = mse(data_view(), ConstMatrixView<float>(dec.data(), kv_rows, head_dim));
  return row;
}

double int_mse(UniformQuantizer<float> q) {
  std::vector<float> dec(kv_rows * head_dim);
  q.decode(q.encode(data_view()), MatrixView<float>(dec.data(), kv_rows, head_dim));
  return mse(data_view(), ConstMatrixView<float>(dec.data(), kv_rows, head_dim));
}

}  // namespace

int main(int argc, char** argv) {
  const bool check = argc > 1 && std::strcmp(argv[1], "--check") == 0;
  double var = 0.0, mean = 0.0;
  for (float v : bench::kv_data()) mean += v;
  mean /= double(bench::kv_data().size());
  for (float v : bench::kv_data()) var += (v - mean) * (v - mean);
  var /= double(bench::kv_data().size());

  std::printf("data: %zu x %zu synthetic KV-like rows (seed 42), variance %.4f; %u iterations, "
              "max %d points per centroid\n\n",
              kv_rows, head_dim, var, iterations, max_points_per_centroid);
  std::printf("| config | bits/ch | CQ MSE | faiss PQ MSE | CQ / faiss | INT baseline | INT bits/ch | INT MSE (K / V) | CQ fit s | faiss train s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  bool ok = true;
  struct IntCfg {
    int bits;
    std::size_t group;
  };
  for (auto [C, icfg] : {std::pair{std::size_t{2}, IntCfg{3, 32}}, std::pair{std::size_t{4}, IntCfg{1, 32}},
                         std::pair{std::size_t{8}, IntCfg{1, 128}}}) {
    const Row r = compare(C);
    const double k = int_mse(UniformQuantizer<float>::keys(head_dim, icfg.bits, icfg.group));
    const double v = int_mse(UniformQuantizer<float>::values(head_dim, icfg.bits, icfg.group));
    const double int_bits = icfg.bits + 32.0 / double(icfg.group);
    std::printf("| CQ-%zuc8b | %.2f | %.5f | %.5f | %.4f | INT%d-g%zu | %.2f | %.4f / %.4f | %.2f | %.2f |\n", C,
                8.0 / double(C), r.cq_mse, r.faiss_mse, r.cq_mse / r.faiss_mse, icfg.bits, icfg.group, int_bits, k, v,
                r.cq_s, r.faiss_s);
    if (r.cq_mse > 1.02 * r.faiss_mse) {
      std::printf("FAIL: CQ-%zuc8b MSE is more than 2%% above faiss\n", C);
      ok = false;
    }
    if (!(r.cq_mse < 0.5 * std::min(k, v))) {
      std::printf("FAIL: CQ-%zuc8b is not well below the INT baseline\n", C);
      ok = false;
    }
  }
  return check && !ok ? 1 : 0;
}
