// The strong exception guarantee: every mutating call either completes or leaves its object
// exactly as it was — under bad input, and under an allocation failure at any point (the
// allocation-failure harness fails the 1st, 2nd, ... allocation of the call in turn).
#include "alloc_failure.hpp"
#include "test_util.hpp"

#include <atomic>
#include <thread>

using namespace cq;

namespace {

std::vector<std::uint32_t> random_codes(std::size_t n, std::size_t groups, int bits, std::uint64_t seed) {
  cq::detail::Rng rng(seed);
  std::vector<std::uint32_t> c(n * groups);
  for (auto& v : c) v = static_cast<std::uint32_t>(rng.below(1u << bits));
  return c;
}

}  // namespace

TEST_CASE("allocation-failure harness: fails the n-th allocation of this thread only, then stops") {
  // No doctest assertion while armed: they allocate.
  test::fail_nth_allocation(2);
  // (Calls of the allocation functions, not new-expressions, which a compiler may elide.)
  void* a = ::operator new(16);  // the 1st allocation succeeds
  bool threw = false;
  try {
    ::operator delete(::operator new(16, std::align_val_t{64}), std::align_val_t{64});
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  const bool injected = test::allocation_failure_injected();
  void* b = ::operator new[](16);  // the countdown is spent
  test::fail_nth_allocation(1);
  void* nothrow = ::operator new(16, std::nothrow);
  test::fail_nth_allocation(0);
  CHECK(threw);
  CHECK(injected);
  CHECK(a != nullptr);
  CHECK(b != nullptr);
  CHECK(nothrow == nullptr);
  ::operator delete(a);
  ::operator delete[](b);

  // Another thread's allocations never fail.
  std::atomic<bool> go{false};
  void* other = nullptr;
  std::thread t([&] {
    while (!go.load()) std::this_thread::yield();
    other = ::operator new(16);
  });
  test::fail_nth_allocation(1);
  go = true;
  t.join();
  const bool injected_here = test::allocation_failure_injected();
  test::fail_nth_allocation(0);
  CHECK(!injected_here);
  REQUIRE(other != nullptr);
  ::operator delete(other);

  std::vector<int> v;
  const std::size_t broken = test::for_each_allocation_failure([&] { v.assign(100, 7); }, [&] { CHECK(v.empty()); });
  CHECK(broken == 1);
  CHECK(v.size() == 100);
}

TEST_CASE("PackedCodes: append, resize, truncate and assignment complete or change nothing") {
  for (int bits : {3, 8, 13}) {
    CAPTURE(bits);
    const std::size_t G = 5;
    const auto first = random_codes(40, G, bits, 1), more = random_codes(300, G, bits, 2);
    PackedCodes codes(G, bits);
    codes.append(first.data(), 40);
    const PackedCodes before = codes;

    std::size_t broken =
        test::for_each_allocation_failure([&] { codes.append(more.data(), 300); }, [&] { CHECK(codes == before); });
    CHECK(broken >= 1);
    PackedCodes expected(G, bits);
    expected.append(first.data(), 40);
    expected.append(more.data(), 300);
    CHECK(codes == expected);

    const PackedCodes grown = codes;
    broken = test::for_each_allocation_failure([&] { codes.resize(5000); }, [&] { CHECK(codes == grown); });
    CHECK(broken >= 1);
    CHECK(codes.size() == 5000);
    CHECK(codes.get(4999, G - 1) == 0);
    broken = test::for_each_allocation_failure([&] { codes.truncate(40); }, [] {});
    CHECK(broken == 0);  // shrinking never allocates
    CHECK(codes == before);

    // Copy-assignment used to take the shape first and the bytes last: a failed copy of the bytes
    // left a hybrid (the other's shape, these bytes).
    PackedCodes target(2, 16);
    target.append(random_codes(100, 2, 16, 3).data(), 100);
    const PackedCodes target_before = target;
    broken = test::for_each_allocation_failure([&] { target = expected; }, [&] { CHECK(target == target_before); });
    CHECK(broken >= 1);
    CHECK(target == expected);
  }
}

TEST_CASE("Codebook: set_group, set_all and assignment complete or change nothing") {
  Codebook cb = test::random_codebook(32, 4, 6, 11);
  const Codebook before = cb;
  const Codebook other = test::random_codebook(16, 8, 10, 12);
  std::vector<float> group(cb.num_centroids() * cb.channels(), 0.5f);
  group[17] = std::numeric_limits<float>::quiet_NaN();
  CQ_CHECK_THROWS_CONTAINING(cb.set_group(3, group.data()), "not finite");
  CHECK(cb == before);
  std::size_t broken = test::for_each_allocation_failure([&] { cb = other; }, [&] { CHECK(cb == before); });
  CHECK(broken >= 1);
  CHECK(cb == other);
  CHECK(cb.info().method == other.info().method);
  // The centroid tables are fixed-size: replacing centroids never allocates.
  group.assign(cb.num_centroids() * cb.channels(), 0.5f);
  group[17] = 0.25f;
  broken = test::for_each_allocation_failure([&] { cb.set_group(1, group.data()); }, [] {});
  CHECK(broken == 0);
  CHECK(cb.centroid(1, 2, 1) == 0.25f);  // flat index 17 = centroid 2, channel 1 (C = 8)
  std::vector<float> all(cb.size(), -1.0f);
  broken = test::for_each_allocation_failure([&] { cb.set_all(all.data()); }, [] {});
  CHECK(broken == 0);
  CHECK(cb.centroid(0, 0, 0) == -1.0f);
}

TEST_CASE("encode_append validates its input before growing the codes, and survives failed allocations") {
  const std::size_t D = 16, n = 200;
  const auto x = synthetic_kv(n, D, {.seed = 31});
  CoupledQuantizer<4, 5> q(D);
  q.fit(ConstMatrixView<float>(x.data(), n, D));
  PackedCodes codes(q.groups(), 5);
  q.encode_append(ConstMatrixView<float>(x.data(), 7, D), codes);
  const PackedCodes before = codes;
  // Bad views: the codes once grew by `rows` tokens before the view was checked.
  CQ_CHECK_THROWS_CONTAINING(q.encode_append(ConstMatrixView<float>(x.data(), 50, D, 4), codes),
                             "encode_append: x: stride 4 is smaller than cols 16");
  CHECK(codes == before);
  CQ_CHECK_THROWS_CONTAINING(q.encode_append(ConstMatrixView<float>(nullptr, 50, D), codes), "null data");
  CHECK(codes == before);
  const std::size_t broken = test::for_each_allocation_failure(
      [&] { q.encode_append(ConstMatrixView<float>(x.data() + 7 * D, n - 7, D), codes); },
      [&] { CHECK(codes == before); });
  CHECK(broken >= 1);
  CHECK(codes == q.encode(ConstMatrixView<float>(x.data(), n, D)));
}

TEST_CASE("fit: a failed refit at any allocation keeps the old codebook") {
  const std::size_t D = 8, n = 300;
  const auto x = synthetic_kv(n, D, {.seed = 41});
  const auto x2 = synthetic_kv(n, D, {.seed = 42});
  std::vector<float> w(n * 2, 1.0f);
  for (std::size_t i = 0; i < w.size(); i += 3) w[i] = 4.0f;
  FitOptions o;
  o.iterations = 3;
  CoupledQuantizer<4, 4> q(D);
  q.fit(ConstMatrixView<float>(x.data(), n, D), o);
  const Codebook before = q.codebook();
  const std::size_t broken = test::for_each_allocation_failure(
      [&] { q.fit(ConstMatrixView<float>(x2.data(), n, D), ConstMatrixView<float>(w.data(), n, 2), o); },
      [&] {
        CHECK(q.codebook() == before);
        CHECK(q.codebook().info().method == "kmeans");
      });
  CHECK(broken >= 10);
  CHECK(q.codebook().info().method == "fisher-kmeans");
  // fit_codebook on a bare Codebook, unweighted, likewise.
  Codebook cb = before;
  test::for_each_allocation_failure([&] { fit_codebook(cb, ConstMatrixView<float>(x2.data(), n, D), {}, o); },
                                    [&] { CHECK(cb == before); });
  CHECK(!(cb == before));
}
