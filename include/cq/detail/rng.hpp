#pragma once
/// detail::Rng: a small, portable, seedable generator (xoshiro256** seeded by SplitMix64).
/// std:: distributions are implementation-defined, so cq draws its own numbers: a seed gives the
/// same codebook with every compiler and standard library.

#include "cq/config.hpp"

#include <cmath>
#include <cstdint>

namespace cq::detail {

/// SplitMix64's increment (2^64 / golden ratio): the generator's state advances by it per draw.
inline constexpr std::uint64_t splitmix64_step = 0x9e3779b97f4a7c15ULL;

/// SplitMix64's output for `state`: a pure mixing function, so host and device code (seeding,
/// per-thread hashes in kernels) share one definition. The n-th draw of a SplitMix64 generator
/// seeded with s is splitmix64(s + n * splitmix64_step), n = 0, 1, ...
CQ_HOST_DEVICE constexpr std::uint64_t splitmix64(std::uint64_t state) {
  std::uint64_t z = state + splitmix64_step;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

class Rng {
 public:
  explicit Rng(std::uint64_t seed, std::uint64_t stream = 0) {
    std::uint64_t sm = seed ^ (stream * 0xd1b54a32d192ed03ULL + 0x8bb84b93962eacc9ULL);
    for (auto& w : s_) {
      w = splitmix64(sm);
      sm += splitmix64_step;
    }
  }
  std::uint64_t next() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Uniform integer in [0, n), n > 0, without modulo bias.
  std::uint64_t below(std::uint64_t n) {
    const std::uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    std::uint64_t x;
    do x = next(); while (x >= limit);
    return x % n;
  }
  /// Standard normal (Box-Muller; one value per call, simple over fast).
  double normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t s_[4];
};

}  // namespace cq::detail
