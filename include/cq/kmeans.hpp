#pragma once
/// k-means for one group of one codebook: k-means++ (or random) initialisation, Lloyd iterations
/// with the backend's nearest-centroid search, optional non-negative per-point weights (Fisher-
/// weighted CQ), empty-cluster re-seeding, deterministic for a seed.
///
/// Objective: sum_i w_i |x_i - c_{a(i)}|^2 / (channels * sum_i w_i), i.e. the (weighted) mean
/// squared error per element. objective[t] is measured with the centroids after t updates, so
/// objective[0] is the initialisation and the last entry belongs to the returned centroids.
/// Lloyd steps never increase it: the update is the exact (weighted) mean, and an empty cluster is
/// re-seeded on a data point, which can only lower the next assignment's cost.

#include "cq/codebook.hpp"
#include "cq/concepts.hpp"
#include "cq/detail/aligned_buffer.hpp"
#include "cq/detail/checked.hpp"
#include "cq/detail/rng.hpp"
#include "cq/error.hpp"
#include "cq/views.hpp"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

namespace cq {

enum class KMeansInit : std::uint8_t { plus_plus, random };

inline const char* init_name(KMeansInit i) { return i == KMeansInit::plus_plus ? "kmeans++" : "random"; }

/// One Lloyd step's report, for progress callbacks.
struct KMeansProgress {
  std::size_t group;      // which group of the codebook
  unsigned iteration;     // updates done so far
  double objective;       // objective with the current centroids
};

struct KMeansOptions {
  unsigned iterations = 25;                 // Lloyd updates (at most; stops early at a fixed point)
  KMeansInit init = KMeansInit::plus_plus;
  std::uint64_t seed = 1234;
  /// Subsampling cap: at most this many training points per centroid (faiss's
  /// max_points_per_centroid); 0 disables subsampling.
  std::size_t max_points_per_centroid = 256;
  /// Called after every assignment step, from the thread fitting that group.
  std::function<void(const KMeansProgress&)> on_iteration;
};

struct KMeansResult {
  std::vector<double> objective;  // objective[t] after t updates (see top of file)
  unsigned iterations = 0;        // updates run
  std::size_t reseeded = 0;       // empty clusters re-seeded
};

namespace detail {

/// Exact distances of each point to its assigned centroid, and the weighted objective sum.
inline double assigned_distances(ConstMatrixView<float> pts, const float* weights, const float* centroids,
                                 const std::uint32_t* codes, float* dist, double& weight_sum) {
  const std::size_t C = pts.cols;
  double total = 0.0, wsum = 0.0;
  for (std::size_t i = 0; i < pts.rows; ++i) {
    const float* x = pts.row(i);
    const float* c = centroids + std::size_t{codes[i]} * C;
    double d = 0.0;
    for (std::size_t j = 0; j < C; ++j) {
      const double diff = double(x[j]) - double(c[j]);
      d += diff * diff;
    }
    dist[i] = static_cast<float>(d);
    const double w = weights ? weights[i] : 1.0;
    total += w * d;
    wsum += w;
  }
  weight_sum = wsum;
  return total;
}

/// k-means++: the first centroid drawn in proportion to weight, each next one in proportion to
/// weight x squared distance to the nearest centroid chosen so far.
inline void kmeans_plus_plus(ConstMatrixView<float> pts, const float* weights, std::size_t K, Rng& rng,
                             float* centroids) {
  const std::size_t n = pts.rows, C = pts.cols;
  // Transposed copy (C, n) so the distance update vectorises over points.
  AlignedBuffer<float> tr(C * n);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < C; ++j) tr[j * n + i] = pts(i, j);
  AlignedBuffer<float> best(n, std::numeric_limits<float>::infinity());
  AlignedBuffer<double> score(n);

  auto pick = [&](auto&& mass) -> std::size_t {
    double total = 0.0;
    for (std::size_t i = 0; i < n; ++i) total += score[i] = mass(i);
    if (!(total > 0.0)) return static_cast<std::size_t>(rng.below(n));  // all mass zero: any point
    const double r = rng.uniform() * total;
    double acc = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      acc += score[i];
      if (acc > r && score[i] > 0.0) return i;
    }
    for (std::size_t i = n; i-- > 0;)  // rounding left r just past the sum: take the last point with mass
      if (score[i] > 0.0) return i;
    return n - 1;
  };
  for (std::size_t k = 0; k < K; ++k) {
    const std::size_t chosen =
        k == 0 ? pick([&](std::size_t i) { return weights ? double(weights[i]) : 1.0; })
               : pick([&](std::size_t i) { return (weights ? double(weights[i]) : 1.0) * double(best[i]); });
    float* c = centroids + k * C;
    for (std::size_t j = 0; j < C; ++j) c[j] = pts(chosen, j);
    float* CQ_RESTRICT b = best.data();
    for (std::size_t i = 0; i < n; ++i) {
      float d = 0.0f;
      for (std::size_t j = 0; j < C; ++j) {
        const float diff = tr[j * n + i] - c[j];
        d += diff * diff;
      }
      b[i] = std::min(b[i], d);
    }
  }
}

inline void kmeans_random_init(ConstMatrixView<float> pts, std::size_t K, Rng& rng, float* centroids) {
  // K distinct points by a partial Fisher-Yates shuffle of the indices.
  std::vector<std::size_t> idx(pts.rows);
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  for (std::size_t k = 0; k < K; ++k) {
    std::swap(idx[k], idx[k + rng.below(pts.rows - k)]);
    for (std::size_t j = 0; j < pts.cols; ++j) centroids[k * pts.cols + j] = pts(idx[k], j);
  }
}

}  // namespace detail

/// Fits K = 2^bits centroids (bits in 1..16) to `pts` (n >= K, C) with optional weights (n,
/// non-negative, finite, not all zero; the caller validates them and the points' finiteness).
/// Writes (K, C) floats to `centroids`. The backend supplies the assignment step.
template <quantizer_backend Backend>
KMeansResult kmeans(ConstMatrixView<float> pts, const float* weights, std::size_t K, const KMeansOptions& opt,
                    std::size_t group, float* centroids) {
  const std::size_t n = pts.rows, C = pts.cols;
  int bits = 0;
  while (bits < 17 && (std::size_t{1} << bits) < K) ++bits;
  CQ_CHECK(bits >= 1 && bits <= 16 && (std::size_t{1} << bits) == K, "kmeans: K = ", K,
           " centroids is not 2^bits for bits in 1..16");
  CQ_CHECK(n >= K, "kmeans: ", n, " points are fewer than the ", K, " centroids");
  CQ_CHECK(C >= 1, "kmeans: points have no channels");
  CQ_CHECK(centroids != nullptr, "kmeans: centroids (output) is null");
  check_view(pts, "kmeans: points");
  detail::checked_mul(n, C, "kmeans: points x channels");
  detail::checked_mul(K, C, "kmeans: centroids x channels");
  detail::Rng rng(opt.seed, group);

  if (opt.init == KMeansInit::plus_plus) detail::kmeans_plus_plus(pts, weights, K, rng, centroids);
  else detail::kmeans_random_init(pts, K, rng, centroids);

  // A one-group codebook rebuilt after every update provides the norms and transposed tables.
  Codebook cb(C, C, bits);
  cb.set_group(0, centroids);

  KMeansResult res;
  std::vector<std::uint32_t> codes(n), prev(n);
  std::vector<float> dist(n);
  std::vector<double> sums(K * C), wsum(K);
  bool reseeded_last = false;
  for (unsigned it = 0;; ++it) {
    Backend::assign(cb.group(0), pts, codes.data());
    double weight_total = 0.0;
    const double obj = detail::assigned_distances(pts, weights, cb.group_data(0), codes.data(), dist.data(),
                                                  weight_total);
    res.objective.push_back(obj / (weight_total * double(C)));
    if (opt.on_iteration) opt.on_iteration({group, it, res.objective.back()});
    const bool fixed_point = it > 0 && !reseeded_last && codes == prev;
    if (it == opt.iterations || fixed_point) break;
    prev = codes;

    // Update: the weighted mean of each cluster, in double.
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(wsum.begin(), wsum.end(), 0.0);
    for (std::size_t i = 0; i < n; ++i) {
      const double w = weights ? weights[i] : 1.0;
      const float* x = pts.row(i);
      double* s = sums.data() + std::size_t{codes[i]} * C;
      for (std::size_t j = 0; j < C; ++j) s[j] += w * x[j];
      wsum[codes[i]] += w;
    }
    std::vector<float> next(cb.group_data(0), cb.group_data(0) + K * C);
    std::vector<std::size_t> empty;
    for (std::size_t k = 0; k < K; ++k) {
      if (wsum[k] > 0.0)
        for (std::size_t j = 0; j < C; ++j) next[k * C + j] = static_cast<float>(sums[k * C + j] / wsum[k]);
      else
        empty.push_back(k);
    }
    // Empty (or zero-weight) clusters: re-seed each on a distinct point with the largest weighted
    // error under the old centroids. Moving that point to its own centroid can only lower the
    // next objective, so monotonicity holds.
    reseeded_last = !empty.empty();
    if (!empty.empty()) {
      std::vector<std::size_t> order(n);
      std::iota(order.begin(), order.end(), std::size_t{0});
      auto err = [&](std::size_t i) { return (weights ? double(weights[i]) : 1.0) * double(dist[i]); };
      const std::size_t m = std::min(empty.size(), n);
      std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(m), order.end(),
                        [&](std::size_t a, std::size_t b) { return err(a) > err(b) || (err(a) == err(b) && a < b); });
      for (std::size_t e = 0; e < m; ++e)
        for (std::size_t j = 0; j < C; ++j) next[empty[e] * C + j] = pts(order[e], j);
      res.reseeded += m;
    }
    cb.set_group(0, next.data());
    res.iterations = it + 1;
  }
  std::copy(cb.group_data(0), cb.group_data(0) + K * C, centroids);
  return res;
}

}  // namespace cq
