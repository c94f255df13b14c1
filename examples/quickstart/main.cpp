// cq quickstart: fit CQ codebooks on KV-cache-like data, encode, decode, and compare the
// reconstruction error and the bits per channel with the KIVI-style INT baseline.
//
//   ./build/examples/cq_quickstart

#include <cq/cq.hpp>

#include <cstdio>
#include <filesystem>

int main() {
  constexpr std::size_t rows = 8192, dim = 128;  // 8192 tokens of one 128-dim KV head
  const std::vector<float> keys = cq::synthetic_kv(rows, dim);
  const cq::ConstMatrixView<float> x(keys.data(), rows, dim);

  std::printf("cq %s quickstart: %zu synthetic KV rows of dim %zu (native backend: %s)\n\n", cq::version_string, rows,
              dim, cq::simd_isa_name());
  std::printf("%-10s %8s %12s %10s   %-12s %8s %12s\n", "config", "bits/ch", "bytes/token", "MSE", "INT baseline",
              "bits/ch", "MSE (K, V)");

  auto int_mse = [&](cq::UniformQuantizer<float> q) {
    std::vector<float> out(rows * dim);
    q.decode(q.encode(x), cq::MatrixView<float>(out.data(), rows, dim));
    return cq::mse(x, cq::ConstMatrixView<float>(out.data(), rows, dim));
  };
  auto run = [&]<std::size_t C, int Bits>(int int_bits, std::size_t int_group) {
    cq::CoupledQuantizer<C, Bits> q(dim);
    cq::FitOptions opt;
    opt.iterations = 15;
    q.fit(x, opt);                                  // k-means per group of C channels
    const cq::PackedCodes codes = q.encode(x);       // Bits-bit codes, packed
    const std::vector<float> back = q.decode(codes);  // centroids back
    const double err = cq::mse(x, cq::ConstMatrixView<float>(back.data(), rows, dim));
    const double k = int_mse(cq::UniformQuantizer<float>::keys(dim, int_bits, int_group));
    const double v = int_mse(cq::UniformQuantizer<float>::values(dim, int_bits, int_group));
    char name[32], iname[32];
    std::snprintf(name, sizeof name, "CQ-%zuc%db", C, Bits);
    std::snprintf(iname, sizeof iname, "INT%d-g%zu", int_bits, int_group);
    std::printf("%-10s %8.2f %12zu %10.5f   %-12s %8.2f %6.3f, %.3f\n", name, q.bits_per_channel,
                codes.size_bytes() / rows, err, iname, int_bits + 32.0 / double(int_group), k, v);
    return q;
  };
  run.operator()<2, 8>(3, 32);
  run.operator()<4, 8>(1, 32);
  auto q = run.operator()<8, 8>(1, 128);

  // Codebooks are plain safetensors files: save once after calibration, load in the engine.
  const auto path = std::filesystem::temp_directory_path() / "cq_quickstart_8c8b.safetensors";
  cq::io::save_codebook(path, q.codebook());
  cq::CoupledQuantizer<8, 8> loaded(cq::io::load_codebook(path));
  const bool same = loaded.encode(x) == q.encode(x);
  std::printf("\nsaved and reloaded the CQ-8c8b codebook (%zu bytes): codes %s\n",
              static_cast<std::size_t>(std::filesystem::file_size(path)), same ? "identical" : "DIFFER");
  std::filesystem::remove(path);
  std::printf("fp16 would take %zu bytes per token; CQ-8c8b takes %zu (%.0fx smaller)\n", dim * 2,
              q.encode(x.middle_rows(0, 32)).size_bytes() / 32, double(dim * 2) / double(dim / 8));
  return same ? 0 : 1;
}
