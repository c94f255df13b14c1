// CUDA backend tests, run on the H200 (built everywhere nvcc exists; without a device they report
// that and fail, so they are not part of the default ctest run: see tests/CMakeLists.txt).
// The CPU backend is the oracle: codes identical (ties aside), decode bit-identical, attention
// within 1e-3 relative error over the CPU tests' shape grid, batched k-means MSE matching the CPU fit.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "../attention_oracle.hpp"
#include "gpu_glue.hpp"

#include <cstdlib>

using namespace cq;

namespace {

void require_device() {
  const std::string name = gpu_test::device_name();
  REQUIRE_MESSAGE(!name.empty(), "no CUDA device");
  static bool shown = false;
  if (!shown) MESSAGE("device: ", name);
  shown = true;
}

}  // namespace

TEST_CASE("cuda encode: codes equal the CPU reference (ties aside), partial chunks keep their neighbours") {
  require_device();
  std::uint64_t seed = 1;
  for (std::size_t C : {1u, 2u, 4u, 8u, 16u})
    for (int bits : {1, 3, 4, 8, 10, 12}) {
      const std::size_t dim = C * (C >= 8 ? 4 : 8), tokens = 200;
      const Codebook cb = test::random_codebook(dim, C, bits, ++seed);
      const auto x = test::random_normal(tokens * dim, ++seed);
      PackedCodes ref(cb.groups(), bits, tokens);
      encode_rows<backend::Scalar>(cb.view(), ConstMatrixView<float>(x.data(), tokens, dim), ref.view(), 0);
      // Encode in three unaligned pieces into a buffer pre-filled with other codes.
      PackedCodes base(cb.groups(), bits, tokens);
      for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t g = 0; g < cb.groups(); ++g) base.set(t, g, static_cast<std::uint32_t>((t * 7 + g) % (1u << bits)));
      std::vector<std::uint8_t> bytes(base.data(), base.data() + base.size_bytes());
      for (auto [first, n] : {std::pair<std::size_t, std::size_t>{0, 45}, {45, 100}, {145, 55}}) {
        const std::vector<float> part(x.begin() + std::ptrdiff_t(first * dim), x.begin() + std::ptrdiff_t((first + n) * dim));
        gpu_test::encode(cb, part, n, bytes, tokens, first);
      }
      const ConstPackedCodesView got(bytes.data(), tokens, cb.groups(), bits);
      std::size_t differ = 0;
      for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t g = 0; g < cb.groups(); ++g)
          if (got.get(t, g) != ref.get(t, g)) {
            ++differ;
            REQUIRE(test::is_nearest(cb, x.data() + t * dim, g, got.get(t, g)));
          }
      CAPTURE(C);
      CAPTURE(bits);
      CHECK(differ <= 2 + tokens * cb.groups() / 10);
      // Only [0, 200) was written: re-encode just tokens [10, 20) over a fresh base and check the rest.
      std::vector<std::uint8_t> b2(base.data(), base.data() + base.size_bytes());
      const std::vector<float> mid(x.begin() + std::ptrdiff_t(10 * dim), x.begin() + std::ptrdiff_t(20 * dim));
      gpu_test::encode(cb, mid, 10, b2, tokens, 10);
      const ConstPackedCodesView v2(b2.data(), tokens, cb.groups(), bits);
      for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t g = 0; g < cb.groups(); ++g)
          if (t < 10 || t >= 20) REQUIRE(v2.get(t, g) == base.get(t, g));
    }
}

TEST_CASE("cuda decode is bit-identical to the CPU decode") {
  require_device();
  for (int bits : {2, 4, 8, 11}) {
    const Codebook cb = test::random_codebook(64, 8, bits, 100 + bits);
    PackedCodes codes(8, bits, 77);
    cq::detail::Rng rng(5);
    for (std::size_t t = 0; t < 77; ++t)
      for (std::size_t g = 0; g < 8; ++g) codes.set(t, g, static_cast<std::uint32_t>(rng.below(1u << bits)));
    const std::vector<std::uint8_t> bytes(codes.data(), codes.data() + codes.size_bytes());
    std::vector<float> ref(40 * 64);
    backend::Scalar::decode(cb.view(), codes.view(), 33, MatrixView<float>(ref.data(), 40, 64));
    CHECK(gpu_test::decode(cb, bytes, 77, 33, 40) == ref);
  }
}

namespace {

// A batch of sequences of different lengths sharing per-head codebooks; GPU attention for the last
// token of each against the CPU cache's attention. value_scale multiplies the values and their
// codebooks (the output scales with them; the relative error should not).
double batch_error(std::size_t D, std::size_t C, int bits, std::size_t window, std::size_t sinks, std::size_t group,
                   const std::vector<std::size_t>& lengths, std::uint64_t seed,
                   gpu_test::Kernel kernel = gpu_test::Kernel::automatic, bool misaligned = false,
                   float value_scale = 1.0f) {
  KVCacheConfig cfg;
  cfg.head_dim = D;
  cfg.kv_heads = 2;
  cfg.spec = {{C, bits}, {C, bits}};
  cfg.window = window;
  cfg.sinks = sinks;
  cfg.max_rollback = 0;
  std::vector<Codebook> kcb, vcb;
  for (std::size_t h = 0; h < 2; ++h) {
    kcb.push_back(test::random_codebook(D, C, bits, seed + 10 * h));
    vcb.push_back(test::random_codebook(D, C, bits, seed + 10 * h + 5));
    if (value_scale != 1.0f) {
      std::vector<float> c(vcb.back().data(), vcb.back().data() + vcb.back().size());
      for (float& x : c) x *= value_scale;
      vcb.back().set_all(c.data());
    }
  }
  const int q_heads = int(2 * group);
  std::vector<gpu_test::Sequence> batch;
  std::vector<float> q, ref;
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    KVCache<float> cache(cfg);
    for (std::size_t h = 0; h < 2; ++h) cache.set_codebooks(0, h, kcb[h], vcb[h]);
    const std::size_t n = lengths[s], width = 2 * D;
    const auto k = test::random_normal(n * width, seed + 100 + s);
    auto v = test::random_normal(n * width, seed + 200 + s);
    for (float& x : v) x *= value_scale;
    cache.append(0, ConstMatrixView<float>(k.data(), n, width), ConstMatrixView<float>(v.data(), n, width));
    const auto qs = test::random_normal(std::size_t(q_heads) * D, seed + 300 + s);
    std::vector<float> out(qs.size());
    cache.attend(0, ConstMatrixView<float>(qs.data(), 1, qs.size()), MatrixView<float>(out.data(), 1, out.size()),
                 {.method = AttentionMethod::fused_histogram});
    q.insert(q.end(), qs.begin(), qs.end());
    ref.insert(ref.end(), out.begin(), out.end());
    gpu_test::Sequence seq;
    const std::size_t S = std::min(sinks, n), win_lo = std::max(sinks, n > window ? n - window : 0);
    seq.coded = static_cast<std::uint32_t>(win_lo > sinks ? win_lo - sinks : 0);
    seq.dense = static_cast<std::uint32_t>(S + (n - std::min(n, win_lo)));
    seq.dense_keys.resize(2 * seq.dense * D);
    seq.dense_values.resize(2 * seq.dense * D);
    for (std::size_t h = 0; h < 2; ++h) {
      const KVHeadView<float> hv = cache.head_view(0, h);
      seq.key_codes.emplace_back(hv.key_codes.data, hv.key_codes.data + hv.key_codes.size_bytes());
      seq.value_codes.emplace_back(hv.value_codes.data, hv.value_codes.data + hv.value_codes.size_bytes());
      for (std::size_t j = 0; j < seq.dense; ++j) {
        const std::size_t pos = j < S ? j : win_lo + (j - S);
        const float* kr = pos < S ? hv.sink_keys.row(pos) : hv.recent_keys.row(pos - hv.recent_first);
        const float* vr = pos < S ? hv.sink_values.row(pos) : hv.recent_values.row(pos - hv.recent_first);
        std::copy_n(kr, D, seq.dense_keys.begin() + std::ptrdiff_t((h * seq.dense + j) * D));
        std::copy_n(vr, D, seq.dense_values.begin() + std::ptrdiff_t((h * seq.dense + j) * D));
      }
    }
    batch.push_back(std::move(seq));
  }
  const std::vector<float> got =
      gpu_test::attention(kcb, vcb, batch, q, q_heads, int(D), 1.0f / std::sqrt(float(D)), kernel, nullptr, misaligned);
  std::vector<double> r(ref.begin(), ref.end());
  return test::relative_error(got.data(), r);
}

}  // namespace

TEST_CASE("cuda fused attention matches the CPU over the shape grid, batches of different lengths") {
  require_device();
  double worst = 0.0;
  // CQ_CUDA_TEST_QUICK (set for the compute-sanitizer runs) keeps every 12th shape of the grid.
  const bool quick = std::getenv("CQ_CUDA_TEST_QUICK") != nullptr;
  test::for_each_attention_shape([&](std::size_t D, std::size_t C, int bits, std::size_t window, std::size_t sinks,
                                     std::size_t group, std::uint64_t seed) {
    if (quick && seed % 12 != 0) return;
    const std::vector<std::size_t> lengths = {1 + seed % 40, 300 + seed % 97, 2500 + seed % 333};
    // Every shape through the general kernel; 8-bit shapes with 16/32/64 groups also through the
    // byte-code kernel.
    const bool bytes = bits == 8 && (D / C == 16 || D / C == 32 || D / C == 64);
    for (gpu_test::Kernel kernel : {gpu_test::Kernel::general, gpu_test::Kernel::byte_codes}) {
      if (kernel == gpu_test::Kernel::byte_codes && !bytes) continue;
      const double e = batch_error(D, C, bits, window, sinks, group, lengths, seed, kernel);
      CAPTURE(D);
      CAPTURE(C);
      CAPTURE(bits);
      CAPTURE(window);
      CAPTURE(sinks);
      CAPTURE(group);
      CAPTURE(int(kernel));
      CHECK(e < 1e-3);
      worst = std::max(worst, e);
    }
  });
  MESSAGE("largest relative error over the grid: ", worst);
  // A long context across many splits, both kernels.
  if (!quick) {
    CHECK(batch_error(128, 8, 8, 32, 4, 4, {40000, 7000}, 999, gpu_test::Kernel::general) < 1e-3);
    CHECK(batch_error(128, 8, 8, 32, 4, 4, {40000, 7000}, 999, gpu_test::Kernel::byte_codes) < 1e-3);
    // Near-uniform attention over many tokens at 2c8b: the output is close to the codebook mean,
    // where the value-rows mode's half precision shows first.
    const double e = batch_error(128, 2, 8, 0, 0, 1, {70000}, 998, gpu_test::Kernel::byte_codes);
    MESSAGE("70000 tokens, 2c8b, byte-code kernel: relative error ", e);
    CHECK(e < 1e-3);
  }
}

TEST_CASE("cuda fused attention: code buffers and centroid tables off 16-byte alignment match the CPU") {
  // Engines may hand over codes and codebooks at any 4-byte-aligned address; the kernels then take
  // their 4-byte-load paths (codes) and scalar centroid rows (tables and product).
  require_device();
  for (const auto& [D, C] : {std::pair<std::size_t, std::size_t>{128, 8}, {128, 4}, {128, 2}, {64, 1}})
    for (gpu_test::Kernel kernel : {gpu_test::Kernel::general, gpu_test::Kernel::byte_codes}) {
      CAPTURE(D);
      CAPTURE(C);
      CAPTURE(int(kernel));
      CHECK(batch_error(D, C, 8, 32, 4, 4, {1 + C, 300, 2500}, 77 + C, kernel, true) < 1e-3);
    }
}

TEST_CASE("cuda fused attention: value codebooks far outside half precision's range match the CPU") {
  // The 2c8b value-rows mode keeps centroids as half pairs, scaled per group by a power of two:
  // values near 1e6 would overflow half (65504) and values near 1e-6 would fall into its
  // subnormals (steps of 6e-8) without that scale.
  require_device();
  for (float value_scale : {1e6f, 1e-6f})
    for (std::size_t C : {2u, 8u}) {
      CAPTURE(value_scale);
      CAPTURE(C);
      CHECK(batch_error(128, C, 8, 32, 4, 4, {37, 300, 2500}, 55 + C, gpu_test::Kernel::byte_codes, false, value_scale) <
            1e-3);
    }
}

TEST_CASE("cuda fused attention: a dominant full-precision sink leaves the coded tokens' small weights accurate") {
  // One full-precision sink and 40000 coded tokens that all carry code 0 (keys and values). The
  // query is a multiple of the sink's key such that every coded token scores 13.4 below the sink:
  // each weighs e^-13.4 = 1.5e-6 of it (under half the fixed-point step of histograms taken
  // relative to the sink, 2^-18), together 6% of the output. Reference in double. A batch of 8
  // such sequences with 32 query heads (one KV head) keeps the splits long, as in serving; the
  // sink's split holds half the coded tokens or more.
  require_device();
  for (std::size_t C : {8u, 4u, 2u})
    for (gpu_test::Kernel kernel : {gpu_test::Kernel::general, gpu_test::Kernel::byte_codes}) {
      const std::size_t D = 128, n = 40000;
      const Codebook kcb = test::random_codebook(D, C, 8, 11), vcb = test::random_codebook(D, C, 8, 12);
      gpu_test::Sequence seq;
      seq.coded = std::uint32_t(n);
      seq.dense = 1;
      seq.key_codes.assign(1, std::vector<std::uint8_t>(packed_code_bytes(n, D / C, 8), 0));
      seq.value_codes = seq.key_codes;
      seq.dense_keys = test::random_normal(D, 13);
      seq.dense_values = test::random_normal(D, 14);
      const double scale = 1.0 / std::sqrt(double(D));
      double sink_dot = 0.0, coded_dot = 0.0;  // k . k and k . centroid(code 0)
      for (std::size_t d = 0; d < D; ++d) {
        sink_dot += double(seq.dense_keys[d]) * seq.dense_keys[d];
        coded_dot += double(seq.dense_keys[d]) * kcb.centroid(d / C, 0, d % C);
      }
      REQUIRE(sink_dot > coded_dot);
      const double lambda = 13.4 / (scale * (sink_dot - coded_dot));
      std::vector<float> q(D);
      for (std::size_t d = 0; d < D; ++d) q[d] = float(lambda * seq.dense_keys[d]);
      double s_sink = 0.0, s_coded = 0.0;  // the scores of the float query, in double
      for (std::size_t d = 0; d < D; ++d) {
        s_sink += scale * double(q[d]) * seq.dense_keys[d];
        s_coded += scale * double(q[d]) * kcb.centroid(d / C, 0, d % C);
      }
      const double w = double(n) * std::exp(s_coded - s_sink);  // the coded tokens' total weight
      std::vector<double> expected(D);
      for (std::size_t d = 0; d < D; ++d)
        expected[d] = (seq.dense_values[d] + w * vcb.centroid(d / C, 0, d % C)) / (1.0 + w);
      constexpr int batch = 8, q_heads = 32;
      std::vector<float> qs;
      std::vector<double> all_expected;
      for (int i = 0; i < batch * q_heads; ++i) {
        qs.insert(qs.end(), q.begin(), q.end());
        all_expected.insert(all_expected.end(), expected.begin(), expected.end());
      }
      const std::vector<float> got = gpu_test::attention({kcb}, {vcb}, std::vector<gpu_test::Sequence>(batch, seq), qs,
                                                         q_heads, int(D), float(scale), kernel);
      CAPTURE(C);
      CAPTURE(int(kernel));
      CHECK(test::relative_error(got.data(), all_expected) < 1e-3);
    }
}

TEST_CASE("cuda fused attention: equal weights on one code fill the fixed-point histograms without overflow") {
  // Every token has the same key and value codes, so every weight is exactly 1 and one histogram
  // entry per group collects all of them: the worst case of the fixed-point accumulation. The
  // output must be the value centroid of code 0, exactly up to rounding.
  require_device();
  for (gpu_test::Kernel kernel : {gpu_test::Kernel::general, gpu_test::Kernel::byte_codes})
    for (std::size_t C : {8u, 4u}) {
      const std::size_t D = 128, n = 40000;
      const Codebook kcb = test::random_codebook(D, C, 8, 1), vcb = test::random_codebook(D, C, 8, 2);
      gpu_test::Sequence seq;
      seq.coded = std::uint32_t(n);
      seq.key_codes.assign(1, std::vector<std::uint8_t>(packed_code_bytes(n, D / C, 8), 0));
      seq.value_codes = seq.key_codes;
      const auto q = test::random_normal(D, 3);
      const std::vector<float> got = gpu_test::attention({kcb}, {vcb}, {seq}, q, 1, int(D), 0.0f, kernel);
      for (std::size_t d = 0; d < D; ++d) {
        CAPTURE(d);
        CAPTURE(int(kernel));
        CHECK(got[d] == doctest::Approx(vcb.centroid(d / C, 0, d % C)).epsilon(1e-5));
      }
    }
}

TEST_CASE("cuda batched k-means: MSE matches the CPU fit, objective never increases") {
  require_device();
  const bool quick = std::getenv("CQ_CUDA_TEST_QUICK") != nullptr;  // smaller under compute-sanitizer
  const int jobs = quick ? 1 : 3, n = quick ? 600 : 4000, dim = 32, C = 4, bits = quick ? 4 : 6, iters = quick ? 4 : 20;
  std::vector<float> x;
  for (int j = 0; j < jobs; ++j) {
    const auto part = synthetic_kv(n, dim, {.seed = 40u + std::uint64_t(j)});
    x.insert(x.end(), part.begin(), part.end());
  }
  std::vector<double> obj;
  const auto gpu = gpu_test::fit_batched(x, nullptr, jobs, n, dim, C, bits, iters, 7, &obj);
  for (int j = 0; j < jobs; ++j) {
    const ConstMatrixView<float> xv(x.data() + std::size_t(j) * n * dim, n, dim);
    Codebook cpu(dim, C, bits);
    FitOptions o;
    o.iterations = iters;
    o.max_points_per_centroid = 0;
    fit_codebook(cpu, xv, {}, o);
    auto recon = [&](const Codebook& cb) {
      PackedCodes codes(cb.groups(), bits, n);
      encode_rows(cb.view(), xv, codes.view(), 0);
      std::vector<float> back(std::size_t(n) * dim);
      decode_rows(cb.view(), codes.view(), 0, MatrixView<float>(back.data(), n, dim));
      return mse(xv, ConstMatrixView<float>(back.data(), n, dim));
    };
    const double g = recon(gpu[j]), c = recon(cpu);
    MESSAGE("job ", j, ": GPU MSE ", g, ", CPU MSE ", c);
    CHECK(g < 1.03 * c);
    CHECK(g > 0.97 * c);
    for (int grp = 0; grp < dim / C; ++grp)
      for (int t = 1; t <= iters; ++t) {
        const double a = obj[(std::size_t(j) * (dim / C) + grp) * (iters + 1) + t - 1];
        const double b = obj[(std::size_t(j) * (dim / C) + grp) * (iters + 1) + t];
        CHECK(b <= a * (1.0 + 1e-5));
      }
  }
  // Fisher weights: the weighted fit lowers the weighted error, as on the CPU.
  std::vector<float> w(std::size_t(jobs) * n * (dim / C));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = (i / (dim / C)) % 2 ? 50.0f : 1.0f;
  const auto fisher = gpu_test::fit_batched(x, &w, jobs, n, dim, C, bits, iters, 7, &obj);
  CHECK(fisher[0].info().method == "kmeans-cuda");
}

TEST_CASE("cuda encode and batched k-means stay exact when the data sit far from the origin") {
  require_device();
  // Encode: rows and centroids of a CQ-8c8b fit shifted by the same constant; every code must be
  // the true nearest centroid (in double on the float inputs) and the error the un-shifted one.
  const test::GaussianFit& f = test::gaussian_fit();
  const std::size_t n = 1024, D = f.dim;
  double mse_at_zero = 0.0;
  for (double offset : {0.0, 1e3, 3e3, 1e4, 1e5}) {
    CAPTURE(offset);
    const Codebook cb = test::offset_codebook(f.cb, offset);
    std::vector<float> x(n * D);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(double(f.x[i]) + offset);
    PackedCodes got(cb.groups(), cb.bits(), n);
    std::vector<std::uint8_t> bytes(got.size_bytes(), 0);
    gpu_test::encode(cb, x, n, bytes, n, 0);
    std::copy(bytes.begin(), bytes.end(), got.data());
    std::size_t wrong = 0;
    for (std::size_t r = 0; r < n; ++r)
      for (std::size_t g = 0; g < cb.groups(); ++g) wrong += !test::is_nearest(cb, x.data() + r * D, g, got.get(r, g));
    CHECK(wrong == 0);
    const double err = test::reconstruction_mse(cb, got, x);
    if (offset == 0.0) mse_at_zero = err;
    CHECK(err == doctest::Approx(mse_at_zero).epsilon(1e-3));
  }
  // Batched k-means: job 1 is job 0 with channel 0 of every group moved to 1e4 (an outlier
  // channel); the shift changes no distance, so both fits end at the same objective (up to their
  // different random streams).
  const int jobs = 2, rows = 4096, dim = 32, C = 8, bits = 8, iters = 10;
  std::vector<float> x = test::random_normal(std::size_t(rows) * dim, 99);
  x.insert(x.end(), x.begin(), x.end());
  for (std::size_t i = 0; i < std::size_t(rows); ++i)
    for (int g = 0; g < dim / C; ++g) x[(std::size_t(rows) + i) * dim + std::size_t(g * C)] += 1e4f;
  std::vector<double> obj;
  gpu_test::fit_batched(x, nullptr, jobs, rows, dim, C, bits, iters, 7, &obj);
  auto final_objective = [&](int j) {
    double s = 0.0;
    for (int g = 0; g < dim / C; ++g) s += obj[(std::size_t(j) * (dim / C) + std::size_t(g)) * (iters + 1) + iters];
    return s / (dim / C);
  };
  MESSAGE("objective without / with the outlier channel: ", final_objective(0), " / ", final_objective(1));
  CHECK(final_objective(1) == doctest::Approx(final_objective(0)).epsilon(0.02));
}
