#include "test_util.hpp"

using namespace cq;

namespace {

// Fits one group (dim == channels) and returns the report.
template <class Backend = backend::Native>
FitReport fit_one(Codebook& cb, const std::vector<float>& pts, std::size_t n, const FitOptions& o,
                  const std::vector<float>* weights = nullptr) {
  ConstMatrixView<float> x(pts.data(), n, cb.dim());
  if (weights) return fit_codebook<Backend>(cb, x, ConstMatrixView<float>(weights->data(), n, cb.groups()), o);
  return fit_codebook<Backend>(cb, x, {}, o);
}

}  // namespace

TEST_CASE("k-means++ recovers planted clusters") {
  // (Random initialisation is not expected to: it almost surely seeds two centroids in one of the
  // 16 clusters, and Lloyd iterations cannot move them apart.)
  const std::size_t K = 16, per = 64, C = 4;
  for (std::uint64_t seed : {7u, 8u, 9u}) {
    const auto p = test::planted_clusters(K, per, C, 0.05f, 99 + seed);
    Codebook cb(C, C, 4);
    FitOptions o;
    o.iterations = 50;
    o.seed = seed;
    const FitReport rep = fit_one(cb, p.points, K * per, o);
    // Every planted centre has a centroid within a few sigma, so the objective is the noise level.
    for (std::size_t k = 0; k < K; ++k) {
      double best = 1e30;
      for (std::size_t j = 0; j < K; ++j) {
        double d = 0.0;
        for (std::size_t c = 0; c < C; ++c) d += std::pow(p.centres[k * C + c] - cb.centroid(0, j, c), 2);
        best = std::min(best, d);
      }
      CHECK(best < 0.01);
    }
    CHECK(rep.final_objective() == doctest::Approx(0.05 * 0.05).epsilon(0.15));
    // The partition equals the planted one: points sharing a label share a code, and vice versa.
    CoupledQuantizer<4, 4> q(cb);
    const PackedCodes codes = q.encode(ConstMatrixView<float>(p.points.data(), K * per, C));
    std::vector<int> code_of_label(K, -1);
    for (std::size_t i = 0; i < K * per; ++i) {
      int& c = code_of_label[p.labels[i]];
      if (c < 0) c = static_cast<int>(codes.get(i, 0));
      CHECK(c == static_cast<int>(codes.get(i, 0)));
    }
    std::sort(code_of_label.begin(), code_of_label.end());
    CHECK(std::unique(code_of_label.begin(), code_of_label.end()) == code_of_label.end());
  }
}

TEST_CASE("k-means objective never increases between iterations") {
  for (int bits : {2, 5, 8}) {
    for (std::size_t C : {1u, 3u, 8u}) {
      for (KMeansInit init : {KMeansInit::plus_plus, KMeansInit::random}) {
        const std::size_t n = 2000;
        const auto x = synthetic_kv(n, 2 * C, {.rank = 2, .seed = static_cast<std::uint64_t>(bits * 31 + C)});
        Codebook cb(2 * C, C, bits);
        FitOptions o;
        o.iterations = 30;
        o.init = init;
        const FitReport rep = fit_one(cb, x, n, o);
        REQUIRE(rep.objective.size() >= 2);
        for (std::size_t t = 1; t < rep.objective.size(); ++t)
          CHECK(rep.objective[t] <= rep.objective[t - 1] * (1.0 + 1e-9));
        CHECK(rep.objective.back() < rep.objective.front());
      }
    }
  }
}

TEST_CASE("weighted fit with equal weights equals the unweighted fit") {
  const std::size_t n = 1500, D = 16, C = 4;
  const auto x = synthetic_kv(n, D, {.seed = 5});
  std::vector<float> ones(n * (D / C), 1.0f);
  for (KMeansInit init : {KMeansInit::plus_plus, KMeansInit::random}) {
    FitOptions o;
    o.iterations = 20;
    o.init = init;
    Codebook a(D, C, 6), b(D, C, 6);
    const FitReport ra = fit_one(a, x, n, o);
    const FitReport rb = fit_one(b, x, n, o, &ones);
    CHECK(a == b);  // bit-identical centroids
    CHECK(ra.objective == rb.objective);
    CHECK(b.info().method == "fisher-kmeans");
    // Equal weights of another value give the same partition, hence (nearly) the same objective.
    std::vector<float> threes(n * (D / C), 3.0f);
    Codebook c(D, C, 6);
    const FitReport rc = fit_one(c, x, n, o, &threes);
    CHECK(rc.final_objective() == doctest::Approx(ra.final_objective()).epsilon(1e-4));
  }
}

TEST_CASE("Fisher weights steer centroids toward heavily weighted rows") {
  // Rows in one half-space matter 100x more; the weighted fit spends its centroids there and
  // reconstructs them, hence the weighted error, clearly better than the unweighted fit.
  const std::size_t n = 4000, D = 8, C = 8;
  const auto x = synthetic_kv(n, D, {.rank = 4, .seed = 8});
  std::vector<float> w(n);
  for (std::size_t i = 0; i < n; ++i) w[i] = x[i * D + 1] > x[i * D + 2] ? 100.0f : 1.0f;
  FitOptions o;
  o.iterations = 25;
  Codebook plain(D, C, 5), fisher(D, C, 5);
  fit_one(plain, x, n, o);
  fit_one(fisher, x, n, o, &w);
  auto weighted_error = [&](const Codebook& cb) {
    CoupledQuantizer<8, 5> q(cb);
    const auto codes = q.encode(ConstMatrixView<float>(x.data(), n, D));
    const auto dec = q.decode(codes);
    double num = 0, den = 0;
    for (std::size_t i = 0; i < n; ++i) {
      double e = 0;
      for (std::size_t d = 0; d < D; ++d) e += std::pow(double(x[i * D + d]) - dec[i * D + d], 2);
      num += w[i] * e;
      den += w[i];
    }
    return num / den;
  };
  CHECK(weighted_error(fisher) < 0.9 * weighted_error(plain));
}

TEST_CASE("empty clusters are re-seeded: duplicated points still give distinct useful centroids") {
  // 8 distinct points repeated; asking for 16 centroids forces empty clusters every iteration.
  std::vector<float> x;
  for (int rep = 0; rep < 50; ++rep)
    for (int k = 0; k < 8; ++k) x.insert(x.end(), {float(k), float(k * k % 5)});
  Codebook cb(2, 2, 4);
  FitOptions o;
  o.iterations = 10;
  o.init = KMeansInit::random;
  const FitReport rep = fit_one(cb, x, 400, o);
  CHECK(rep.final_objective() == doctest::Approx(0.0));
  for (std::size_t t = 1; t < rep.objective.size(); ++t) CHECK(rep.objective[t] <= rep.objective[t - 1] + 1e-12);
}

TEST_CASE("fits are reproducible for a seed and independent of the thread count") {
  const std::size_t n = 3000, D = 32;
  const auto x = synthetic_kv(n, D, {.seed = 17});
  FitOptions o;
  o.iterations = 8;
  o.seed = 2024;
  Codebook a(D, 4, 6), b(D, 4, 6), c(D, 4, 6);
  fit_one(a, x, n, o);
  ThreadPool pool(3);
  o.executor = &pool;
  fit_one(b, x, n, o);
  CHECK(a == b);
  o.seed = 2025;
  fit_one(c, x, n, o);
  CHECK(!(a == c));
}

TEST_CASE("subsampling caps training points per centroid and reports the rows used") {
  const std::size_t n = 5000, D = 8;
  const auto x = synthetic_kv(n, D, {.seed = 3});
  Codebook cb(D, 8, 4);  // 16 centroids
  FitOptions o;
  o.max_points_per_centroid = 39;
  const FitReport rep = fit_one(cb, x, n, o);
  CHECK(rep.rows_used == 16 * 39);
  CHECK(cb.info().calibration_rows == 16 * 39);
  o.max_points_per_centroid = 0;
  CHECK(fit_one(cb, x, n, o).rows_used == n);
}

TEST_CASE("per-iteration progress reaches the caller") {
  const auto x = synthetic_kv(600, 8, {.seed = 4});
  Codebook cb(8, 4, 4);
  FitOptions o;
  o.iterations = 5;
  std::vector<KMeansProgress> seen;
  std::mutex mu;
  o.on_iteration = [&](const KMeansProgress& p) {
    std::lock_guard lock(mu);
    seen.push_back(p);
  };
  const FitReport rep = fit_one(cb, x, 600, o);
  std::size_t group0 = 0;
  for (const auto& p : seen) group0 += p.group == 0;
  CHECK(group0 >= 2);
  CHECK(seen.size() >= 4);
  CHECK(rep.iterations <= 5);
}

TEST_CASE("one SplitMix64: the reference outputs, usable at compile time, and Rng streams unchanged") {
  // Outputs of the reference SplitMix64 generator seeded with 0: draw n is splitmix64(n * step).
  static_assert(detail::splitmix64(0) == 0xe220a8397b1dcdafULL);
  CHECK(detail::splitmix64(detail::splitmix64_step) == 0x6e789e6aa1b965f4ULL);
  // Rng seeds xoshiro256** from SplitMix64; these draws pin every seeded fit's random stream.
  detail::Rng r(1234, 5);
  CHECK(r.next() == 0x0e81321ca565f8b6ULL);
  CHECK(r.next() == 0xc024b3ae2ebb14ceULL);
  CHECK(r.next() == 0x188f03c7e3e3265aULL);
}
