#pragma once
// Shared helpers for cq's tests: seeded random data, planted clusters, brute-force references.

#include <cq/cq.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// Whether this test binary runs under a sanitizer (whose allocators abort on absurd requests).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CQ_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CQ_TEST_SANITIZED 1
#endif
#endif
#ifndef CQ_TEST_SANITIZED
#define CQ_TEST_SANITIZED 0
#endif

namespace cq::test {

/// Checks that `expr` throws cq::Error whose message contains `needle`.
#define CQ_CHECK_THROWS_CONTAINING(expr, needle) CHECK_THROWS_WITH_AS(expr, doctest::Contains(needle), ::cq::Error)

inline std::vector<float> random_normal(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  cq::detail::Rng rng(seed, 7);
  std::vector<float> v(n);
  for (auto& x : v) x = scale * float(rng.normal());
  return v;
}

template <element_type T>
std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(v[i]);
  return out;
}

/// `clusters` well-separated centres in `dim` dims, `per_cluster` points each with N(0, sigma^2)
/// noise; labels[i] is the true cluster of row i.
struct Planted {
  std::vector<float> points, centres;
  std::vector<std::uint32_t> labels;
};
inline Planted planted_clusters(std::size_t clusters, std::size_t per_cluster, std::size_t dim, float sigma,
                                std::uint64_t seed) {
  cq::detail::Rng rng(seed, 11);
  Planted p;
  p.centres.resize(clusters * dim);
  for (auto& c : p.centres) c = 20.0f * float(rng.uniform()) - 10.0f;
  // Shuffle the point order so clusters are interleaved.
  std::vector<std::uint32_t> order(clusters * per_cluster);
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<std::uint32_t>(i % clusters);
  for (std::size_t i = order.size(); i-- > 1;) std::swap(order[i], order[rng.below(i + 1)]);
  for (auto k : order) {
    p.labels.push_back(k);
    for (std::size_t d = 0; d < dim; ++d) p.points.push_back(p.centres[k * dim + d] + sigma * float(rng.normal()));
  }
  return p;
}

/// Squared distance of a group of x to centroid k of group g, in double.
template <element_type T>
double group_distance(const Codebook& cb, const T* x, std::size_t g, std::size_t k) {
  double d = 0.0;
  for (std::size_t j = 0; j < cb.channels(); ++j) {
    const double diff = double(to_float(x[g * cb.channels() + j])) - double(cb.centroid(g, k, j));
    d += diff * diff;
  }
  return d;
}

/// True when `code` is a nearest centroid of group g of x up to float rounding of the distances
/// themselves (ties aside): its distance, in double on the actual inputs, is within `rel_tol` of
/// the smallest one. The tolerance scales with the distances, not with |x|^2, so a search that
/// cancels digits at large magnitudes fails it; `abs_tol` only covers distances whose float
/// squares underflow.
template <element_type T>
bool is_nearest(const Codebook& cb, const T* x, std::size_t g, std::uint32_t code, double rel_tol = 1e-5,
                double abs_tol = 1e-30) {
  double best = std::numeric_limits<double>::infinity();
  for (std::size_t k = 0; k < cb.num_centroids(); ++k) best = std::min(best, group_distance(cb, x, g, k));
  return group_distance(cb, x, g, code) <= best * (1.0 + rel_tol) + abs_tol;
}

/// A random codebook (not fitted: conformance is about the kernels, not k-means).
inline Codebook random_codebook(std::size_t dim, std::size_t C, int bits, std::uint64_t seed) {
  Codebook cb(dim, C, bits);
  cb.set_all(random_normal(cb.size(), seed).data());
  cb.info().method = "random";
  return cb;
}

/// CQ-8c8b (D = 64) fitted on 4096 rows of N(0, 1), and those rows: the setting in which a
/// constant offset added to rows and centroids must not change which centroid is nearest.
struct GaussianFit {
  static constexpr std::size_t rows = 4096, dim = 64;
  std::vector<float> x = random_normal(rows * dim, 4242);
  Codebook cb{dim, 8, 8};
};
inline const GaussianFit& gaussian_fit() {
  static const GaussianFit f = [] {
    GaussianFit g;
    FitOptions o;
    o.iterations = 10;
    fit_codebook<backend::Native>(g.cb, ConstMatrixView<float>(g.x.data(), g.rows, g.dim), {}, o);
    return g;
  }();
  return f;
}

/// `cb` with `offset` added to every centroid (rounded to float once, as an engine would store it).
inline Codebook offset_codebook(const Codebook& cb, double offset) {
  std::vector<float> c(cb.data(), cb.data() + cb.size());
  for (float& v : c) v = static_cast<float>(double(v) + offset);
  Codebook out(cb.dim(), cb.channels(), cb.bits());
  out.set_all(c.data());
  out.info() = cb.info();
  return out;
}

/// Mean squared error per element of decode(codes) against x, in double.
inline double reconstruction_mse(const Codebook& cb, const PackedCodes& codes, const std::vector<float>& x) {
  std::vector<float> dec(codes.size() * cb.dim());
  backend::Scalar::decode(cb.view(), codes.view(), 0, MatrixView<float>(dec.data(), codes.size(), cb.dim()));
  return mse(ConstMatrixView<float>(x.data(), codes.size(), cb.dim()),
             ConstMatrixView<float>(dec.data(), codes.size(), cb.dim()));
}

}  // namespace cq::test
