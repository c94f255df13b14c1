// Host-side half of the CUDA benchmark library: CPU fits and MSEs with cq's CPU backend, for the
// "GPU calibration matches the CPU fit" check of bench.py.
#include <cq/cq.hpp>

extern "C" {

/// MSE of x (n x dim) reconstructed with the given centroids ([groups][2^bits][C]).
double cqb_cpu_mse(const float* x, int n, int dim, int C, int bits, const float* centroids) {
  cq::Codebook cb(std::size_t(dim), std::size_t(C), bits);
  cb.set_all(centroids);
  const cq::ConstMatrixView<float> xv(x, std::size_t(n), std::size_t(dim));
  cq::PackedCodes codes(cb.groups(), bits, std::size_t(n));
  cq::encode_rows(cb.view(), xv, codes.view(), 0);
  std::vector<float> back(std::size_t(n) * dim);
  cq::decode_rows(cb.view(), codes.view(), 0, cq::MatrixView<float>(back.data(), std::size_t(n), std::size_t(dim)));
  return cq::mse(xv, cq::ConstMatrixView<float>(back.data(), std::size_t(n), std::size_t(dim)));
}

/// The CPU fit of the same rows (all of them, `iterations` Lloyd steps, all cores); returns its MSE.
double cqb_cpu_fit_mse(const float* x, int n, int dim, int C, int bits, int iterations) {
  cq::Codebook cb(std::size_t(dim), std::size_t(C), bits);
  cq::ThreadPool pool;
  cq::FitOptions o;
  o.iterations = unsigned(iterations);
  o.max_points_per_centroid = 0;
  o.executor = &pool;
  cq::fit_codebook(cb, cq::ConstMatrixView<float>(x, std::size_t(n), std::size_t(dim)), {}, o);
  return cqb_cpu_mse(x, n, dim, C, bits, cb.data());
}

}  // extern "C"
