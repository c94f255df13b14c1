#pragma once
/// The runtime-configured core of CQ: fit a Codebook on calibration rows, encode rows to packed
/// codes, decode codes to rows. CoupledQuantizer<C, Bits, T, Backend> (coupled_quantizer.hpp) is
/// the typed face over these functions; engines whose configuration is only known at run time
/// (a KV cache whose layers differ) call them directly.

#include "cq/backend/native.hpp"
#include "cq/codebook.hpp"
#include "cq/concepts.hpp"
#include "cq/detail/checked.hpp"
#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/executor.hpp"
#include "cq/kmeans.hpp"
#include "cq/packed_codes.hpp"
#include "cq/views.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <vector>

namespace cq {

struct FitOptions : KMeansOptions {
  /// Groups are independent k-means problems; with an executor they are fitted in parallel.
  /// Results do not depend on the executor or its thread count.
  Executor* executor = nullptr;
};

struct FitReport {
  /// Combined objective (weighted MSE per element over all groups) after t updates; groups that
  /// reached a fixed point early hold their last value.
  std::vector<double> objective;
  std::vector<double> group_objective;  // final objective of each group
  unsigned iterations = 0;              // most updates any group ran
  std::size_t rows_used = 0;            // calibration rows after subsampling
  std::size_t reseeded = 0;             // empty clusters re-seeded, all groups
  double seconds = 0.0;
  double final_objective() const { return objective.empty() ? 0.0 : objective.back(); }
};

namespace detail {

template <element_type T>
void check_finite_rows(ConstMatrixView<T> x, const char* what) {
  for (std::size_t r = 0; r < x.rows; ++r)
    for (std::size_t c = 0; c < x.cols; ++c) {
      const float v = to_float(x(r, c));
      CQ_CHECK(std::isfinite(v), what, "(", r, ", ", c, ") = ", v, " is not finite");
    }
}

/// Rows a fit trains on: all of them, or a seeded sample without replacement when there are more
/// than max_points_per_centroid * K. The same rows serve every group.
inline std::vector<std::size_t> training_rows(std::size_t n, std::size_t K, const KMeansOptions& opt) {
  std::vector<std::size_t> rows(n);
  std::iota(rows.begin(), rows.end(), std::size_t{0});
  const std::size_t cap = opt.max_points_per_centroid;
  if (cap == 0 || n / K < cap || (n / K == cap && n % K == 0)) return rows;  // n <= cap * K, without overflow
  const std::size_t m = cap * K;
  Rng rng(opt.seed, ~std::uint64_t{0});
  for (std::size_t i = 0; i < m; ++i) std::swap(rows[i], rows[i + rng.below(n - i)]);
  rows.resize(m);
  std::sort(rows.begin(), rows.end());  // keep memory order for the gathers
  return rows;
}

}  // namespace detail

/// Fits every group's centroids of `cb` (whose shape is kept) on calibration rows x (n, dim).
/// weights: empty, or (n, groups) non-negative per-row weights per group (Fisher-weighted CQ:
/// the sum of the row's squared loss gradients over the group's channels). On any error `cb` is
/// left unchanged.
template <quantizer_backend Backend = backend::Native, element_type T>
FitReport fit_codebook(Codebook& cb, ConstMatrixView<T> x, ConstMatrixView<float> weights = {},
                       const FitOptions& opt = {}) {
  const auto start = std::chrono::steady_clock::now();
  CQ_CHECK(!cb.empty(), "fit: the codebook has no shape (construct it with dim, channels, bits)");
  check_view(x, "fit: x");
  const std::size_t G = cb.groups(), C = cb.channels(), K = cb.num_centroids();
  CQ_CHECK(x.cols == cb.dim(), "fit: x has ", x.cols, " columns but the codebook's dim is ", cb.dim());
  CQ_CHECK(x.rows >= K, "fit: ", x.rows, " calibration rows are fewer than the ", K, " centroids (bits = ",
           cb.bits(), ")");
  CQ_CHECK(opt.iterations >= 1, "fit: iterations must be >= 1, got ", opt.iterations);
  detail::check_finite_rows(x, "fit: x");
  const bool weighted = weights.data != nullptr;
  if (weighted) {
    check_view(weights, "fit: weights");
    CQ_CHECK(weights.rows == x.rows && weights.cols == G, "fit: weights are ", weights.rows, " x ", weights.cols,
             " but must be rows x groups = ", x.rows, " x ", G);
    for (std::size_t r = 0; r < weights.rows; ++r)
      for (std::size_t g = 0; g < G; ++g) {
        const float w = weights(r, g);
        CQ_CHECK(std::isfinite(w) && w >= 0.0f, "fit: weights(", r, ", ", g, ") = ", w,
                 " must be finite and non-negative");
      }
  }

  const std::vector<std::size_t> rows = detail::training_rows(x.rows, K, opt);
  const std::size_t m = rows.size();
  detail::checked_mul(m, C, "fit: training rows x channels");
  if (weighted)
    for (std::size_t g = 0; g < G; ++g) {
      double s = 0.0;
      for (std::size_t r : rows) s += weights(r, g);
      CQ_CHECK(s > 0.0, "fit: weights of group ", g, " sum to zero over the training rows");
    }

  std::vector<float> centroids(cb.size());
  std::vector<KMeansResult> results(G);
  std::vector<double> group_weight(G, double(m));
  parallel_for(opt.executor, G, [&](std::size_t g) {
    detail::AlignedBuffer<float> pts(m * C);
    std::vector<float> w(weighted ? m : 0);
    for (std::size_t i = 0; i < m; ++i) {
      for (std::size_t j = 0; j < C; ++j) pts[i * C + j] = to_float(x(rows[i], g * C + j));
      if (weighted) w[i] = weights(rows[i], g);
    }
    if (weighted) group_weight[g] = std::accumulate(w.begin(), w.end(), 0.0);
    results[g] = kmeans<Backend>(ConstMatrixView<float>(pts.data(), m, C), weighted ? w.data() : nullptr, K, opt, g,
                                 centroids.data() + g * K * C);
  });

  FitReport rep;
  rep.rows_used = m;
  std::size_t longest = 0;
  for (auto& r : results) {
    longest = std::max(longest, r.objective.size());
    rep.iterations = std::max(rep.iterations, r.iterations);
    rep.reseeded += r.reseeded;
    rep.group_objective.push_back(r.objective.back());
  }
  const double wtotal = std::accumulate(group_weight.begin(), group_weight.end(), 0.0);
  rep.objective.assign(longest, 0.0);
  for (std::size_t t = 0; t < longest; ++t)
    for (std::size_t g = 0; g < G; ++g) {
      const auto& o = results[g].objective;
      rep.objective[t] += o[std::min(t, o.size() - 1)] * group_weight[g] / wtotal;
    }

  Codebook fitted(cb.dim(), C, cb.bits());
  fitted.set_all(centroids.data());
  fitted.info() = FitInfo{weighted ? "fisher-kmeans" : "kmeans", init_name(opt.init), std::string(dtype_name(dtype_of<T>)),
                          rep.iterations, m, opt.seed, rep.final_objective()};
  cb = std::move(fitted);
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return rep;
}

/// Encodes rows x (n, dim) into tokens [first, first + n) of `out`.
template <quantizer_backend Backend = backend::Native, element_type T>
void encode_rows(const CodebookView& cb, ConstMatrixView<T> x, PackedCodesView out, std::size_t first) {
  CQ_CHECK(x.cols == cb.dim(), "encode: x has ", x.cols, " columns but the codebook's dim is ", cb.dim());
  CQ_CHECK(out.groups == cb.groups && out.bits == cb.bits, "encode: codes are ", out.groups, " groups x ",
           out.bits, " bits but the codebook has ", cb.groups, " groups x ", cb.bits, " bits");
  CQ_CHECK(detail::checked_add(first, x.rows, "encode: first + rows") <= out.tokens, "encode: rows [", first, ", ",
           first + x.rows, ") do not fit in codes of ", out.tokens, " tokens");
  check_view(x, "encode: x");
  detail::for_each_chunk_run(first, x.rows, [&](std::size_t r, std::size_t t, std::size_t take, bool) {
    std::uint32_t codes[block_tokens];
    const ConstMatrixView<T> rows = x.middle_rows(r, take);
    for (std::size_t g = 0; g < cb.groups; ++g) {
      Backend::assign(cb.group(g), rows.middle_cols(g * cb.channels, cb.channels), codes);
      detail::store_group_codes(out, g, t, take, codes);
    }
  });
}

/// Decodes tokens [first, first + out.rows) of `codes` into out (rows, dim).
template <quantizer_backend Backend = backend::Native, element_type T>
void decode_rows(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, MatrixView<T> out) {
  CQ_CHECK(out.cols == cb.dim(), "decode: out has ", out.cols, " columns but the codebook's dim is ", cb.dim());
  CQ_CHECK(codes.groups == cb.groups && codes.bits == cb.bits, "decode: codes are ", codes.groups, " groups x ",
           codes.bits, " bits but the codebook has ", cb.groups, " groups x ", cb.bits, " bits");
  CQ_CHECK(detail::checked_add(first, out.rows, "decode: first + rows") <= codes.tokens, "decode: tokens [", first,
           ", ", first + out.rows, ") exceed the ", codes.tokens, " coded tokens");
  check_view(out, "decode: out");
  Backend::decode(cb, codes, first, out);
}

/// Per-row, per-group Fisher weights from squared gradients g2 (n, dim): the sum of each group's
/// squared gradients, as (n, dim / channels) row-major.
inline std::vector<float> fisher_weights(ConstMatrixView<float> grad_sq, std::size_t channels) {
  CQ_CHECK(channels >= 1 && grad_sq.cols % channels == 0, "fisher_weights: dim ", grad_sq.cols,
           " is not a multiple of channels ", channels);
  const std::size_t G = grad_sq.cols / channels;
  std::vector<float> w(detail::checked_mul(grad_sq.rows, G, "fisher_weights: rows x groups"), 0.0f);
  for (std::size_t r = 0; r < grad_sq.rows; ++r)
    for (std::size_t g = 0; g < G; ++g) {
      double s = 0.0;
      for (std::size_t j = 0; j < channels; ++j) s += grad_sq(r, g * channels + j);
      w[r * G + g] = static_cast<float>(s);
    }
  return w;
}

/// Mean squared error per element between two equally shaped matrices, in double.
template <element_type T, element_type U>
double mse(ConstMatrixView<T> a, ConstMatrixView<U> b) {
  CQ_CHECK(a.rows == b.rows && a.cols == b.cols, "mse: shapes ", a.rows, " x ", a.cols, " and ", b.rows, " x ",
           b.cols, " differ");
  double s = 0.0;
  for (std::size_t r = 0; r < a.rows; ++r)
    for (std::size_t c = 0; c < a.cols; ++c) {
      const double d = double(to_float(a(r, c))) - double(to_float(b(r, c)));
      s += d * d;
    }
  return a.rows != 0 && a.cols != 0 ? s / double(a.rows * a.cols) : 0.0;
}

}  // namespace cq
