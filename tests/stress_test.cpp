// KV-cache stress: a million appended tokens across many window flushes, random rollbacks and
// interleaved attention, checked against an fp32 shadow of the sequence: every position is still
// there (exact where full precision, the quantizer's own reconstruction where coded) and attention
// equals attention over that reconstruction. A fixed-capacity cache filled past capacity stays
// intact.
#include "attention_oracle.hpp"

using namespace cq;

namespace {

constexpr std::size_t D = 16, W = 24, S = 3, R = 40;

KVCacheConfig stress_config(std::size_t capacity = 0) {
  KVCacheConfig cfg;
  cfg.head_dim = D;
  cfg.spec = {{4, 6}, {4, 6}};
  cfg.window = W;
  cfg.sinks = S;
  cfg.max_rollback = R;
  cfg.capacity = capacity;
  return cfg;
}

// What the cache must hold at `pos` of a sequence of n tokens: the row itself inside the sinks and
// the window, else decode(encode(row)).
void expected_row(const Codebook& cb, const float* row, std::size_t pos, std::size_t n, float* out) {
  const bool exact = pos < S || pos + W >= n;
  if (exact) {
    std::copy_n(row, D, out);
    return;
  }
  PackedCodes c(cb.groups(), cb.bits(), 1);
  encode_rows(cb.view(), ConstMatrixView<float>(row, 1, D), c.view(), 0);
  decode_rows(cb.view(), c.view(), 0, MatrixView<float>(out, 1, D));
}

void check_positions(const KVCache<float>& cache, const std::vector<float>& k, const std::vector<float>& v) {
  const std::size_t n = cache.size();
  REQUIRE(k.size() == n * D);
  float got_k[D], got_v[D], want_k[D], want_v[D];
  for (std::size_t p = 0; p < n; ++p) {
    cache.read_token(0, 0, p, got_k, got_v);
    expected_row(cache.key_codebook(0, 0), k.data() + p * D, p, n, want_k);
    expected_row(cache.value_codebook(0, 0), v.data() + p * D, p, n, want_v);
    REQUIRE(std::equal(got_k, got_k + D, want_k));
    REQUIRE(std::equal(got_v, got_v + D, want_v));
  }
}

// Attention of 2 query heads over the shadow's reconstruction, in double.
std::vector<double> shadow_attention(const KVCache<float>& cache, const std::vector<float>& k, const std::vector<float>& v,
                                     const std::vector<float>& q) {
  const std::size_t n = cache.size();
  std::vector<double> out(2 * D, 0.0);
  std::vector<float> kr(n * D), vr(n * D);
  for (std::size_t p = 0; p < n; ++p) {
    expected_row(cache.key_codebook(0, 0), k.data() + p * D, p, n, kr.data() + p * D);
    expected_row(cache.value_codebook(0, 0), v.data() + p * D, p, n, vr.data() + p * D);
  }
  for (std::size_t h = 0; h < 2; ++h) {
    std::vector<double> s(n);
    double m = -1e300, z = 0.0;
    for (std::size_t p = 0; p < n; ++p) {
      double d = 0.0;
      for (std::size_t i = 0; i < D; ++i) d += double(q[h * D + i]) * kr[p * D + i];
      s[p] = d / 4.0;  // 1 / sqrt(16)
      m = std::max(m, s[p]);
    }
    for (auto& x : s) z += x = std::exp(x - m);
    for (std::size_t p = 0; p < n; ++p)
      for (std::size_t i = 0; i < D; ++i) out[h * D + i] += s[p] / z * vr[p * D + i];
  }
  return out;
}

}  // namespace

TEST_CASE("stress: a million appends with window flushes, rollbacks and attention against an fp32 shadow") {
  KVCache<float> cache(stress_config());
  cache.set_codebooks(0, 0, test::random_codebook(D, 4, 6, 1), test::random_codebook(D, 4, 6, 2));
  std::vector<float> k, v;  // the shadow: the sequence as appended
  cq::detail::Rng rng(99);
  std::size_t appended = 0, rollbacks = 0, refused = 0, attends = 0, checkpoints = 0;
  const std::size_t target = 1'000'000;
  std::size_t next_check = target / 4, next_attend = 1;
  while (appended < target) {
    const std::size_t n = 1 + rng.below(rng.below(4) == 0 ? 400 : 8);
    std::vector<float> nk(n * D), nv(n * D);
    for (std::size_t i = 0; i < n * D; ++i) {
      nk[i] = float(rng.normal());
      nv[i] = float(rng.normal());
    }
    cache.append(0, ConstMatrixView<float>(nk.data(), n, D), ConstMatrixView<float>(nv.data(), n, D));
    k.insert(k.end(), nk.begin(), nk.end());
    v.insert(v.end(), nv.begin(), nv.end());
    appended += n;
    if (rng.below(10) == 0) {
      // Speculative decoding: the draft just appended is partly rejected. Guaranteed to succeed.
      const std::size_t back = rng.below(std::min(R, n) + 1);
      cache.truncate(cache.size() - back);
      k.resize(cache.size() * D);
      v.resize(cache.size() * D);
      ++rollbacks;
    } else if (rng.below(50) == 0) {
      // A deeper rollback (up to max_rollback, regardless of the last append): succeeds while the
      // kept history reaches back, else throws and changes nothing.
      const std::size_t size = cache.size(), back = rng.below(std::min(R, size) + 1);
      const MemoryUsage before = cache.memory();
      try {
        cache.truncate(size - back);
        k.resize(cache.size() * D);
        v.resize(cache.size() * D);
        ++rollbacks;
      } catch (const Error& e) {
        REQUIRE(std::string(e.what()).find("cannot roll sequence 0 back") != std::string::npos);
        REQUIRE(cache.size() == size);
        REQUIRE(cache.memory().total() == before.total());
        ++refused;
      }
    }
    if (appended >= next_attend) {  // attention at growing lengths: 1, 2, 4, ... tokens
      std::vector<float> q(2 * D), out(2 * D);
      for (auto& x : q) x = float(rng.normal());
      cache.attend(0, ConstMatrixView<float>(q.data(), 1, 2 * D), MatrixView<float>(out.data(), 1, 2 * D));
      CAPTURE(cache.size());
      // float sums over up to a million zero-mean terms (the output is ~1/sqrt(n) of their size):
      // 1e-4 relative here, where the short-context tests hold 1e-5.
      REQUIRE(test::relative_error(out.data(), shadow_attention(cache, k, v, q)) < 1e-4);
      ++attends;
      next_attend = appended * 2;
    }
    if (appended >= next_check) {
      check_positions(cache, k, v);
      ++checkpoints;
      next_check += target / 4;
    }
  }
  check_positions(cache, k, v);
  MESSAGE("appended ", appended, " tokens, ", rollbacks, " rollbacks (", refused, " deep ones refused), ", attends,
          " attention checks, ", checkpoints + 1, " full position checks; final length ", cache.size());
  CHECK(rollbacks > 100);
  CHECK(cache.size() > target / 2);
}

TEST_CASE("stress: a fixed-capacity cache filled past capacity stays intact") {
  const std::size_t capacity = 100'000;
  KVCache<float> cache(stress_config(capacity));
  cache.set_codebooks(0, 0, test::random_codebook(D, 4, 6, 3), test::random_codebook(D, 4, 6, 4));
  std::vector<float> k, v;
  cq::detail::Rng rng(5);
  std::size_t refused = 0;
  while (refused < 20) {
    const std::size_t n = 1 + rng.below(300);
    std::vector<float> nk(n * D), nv(n * D);
    for (std::size_t i = 0; i < n * D; ++i) nk[i] = float(rng.normal()), nv[i] = float(rng.normal());
    const MemoryUsage before = cache.memory();
    const std::size_t size = cache.size();
    try {
      cache.append(0, ConstMatrixView<float>(nk.data(), n, D), ConstMatrixView<float>(nv.data(), n, D));
      k.insert(k.end(), nk.begin(), nk.end());
      v.insert(v.end(), nv.begin(), nv.end());
    } catch (const Error& e) {
      REQUIRE(size + n > capacity);
      REQUIRE(std::string(e.what()).find("the cache is full") != std::string::npos);
      REQUIRE(cache.size() == size);
      REQUIRE(cache.memory().total() == before.total());
      ++refused;
    }
  }
  CHECK(cache.size() <= capacity);
  CHECK(cache.size() > capacity - 300);
  check_positions(cache, k, v);
  std::vector<float> q(2 * D, 0.5f), out(2 * D);
  cache.attend(0, ConstMatrixView<float>(q.data(), 1, 2 * D), MatrixView<float>(out.data(), 1, 2 * D));
  CHECK(test::relative_error(out.data(), shadow_attention(cache, k, v, q)) < 1e-5);
}
