#pragma once
/// Cache lines brought in ahead of the loops that read them: the CPU attention's value pass fetches
/// the next step's code runs a few lines at a time (LinePrefetch), and a piece reads the codebooks
/// it will read at random in order first (touch_lines).
///
/// Why spread, and why at all: a step's codes are two runs of a page (the key run, the value run;
/// cache/layout.hpp), and on the machine measured (Zen 5) the hardware prefetchers do not bring
/// them in ahead of the loop that reads them once they have left the caches (codes of other heads
/// and layers push them out between calls), so every line is a miss the loop waits for.
/// Prefetching the next step's lines all at once at a step's start helps nothing: most of the
/// requests find the miss buffers full and are dropped. A few per 32-token block, over the whole
/// step, keep the buffers busy without overflowing them (docs/design/cpu-attention.md, session 22).

#include "cq/config.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace cq::detail {

/// Up to two runs of cache lines (a null run is skipped), each issued a share per step() -- its
/// lines spread evenly over `steps` calls -- and whatever is left by finish().
class LinePrefetch {
 public:
  LinePrefetch() = default;
  LinePrefetch(const std::uint8_t* a, std::size_t a_bytes, const std::uint8_t* b, std::size_t b_bytes,
               std::size_t steps) noexcept
      : runs_{a, b}, lines_{lines(a_bytes), lines(b_bytes)} {
    for (int r = 0; r < 2; ++r) per_step_[r] = steps ? (lines_[r] + steps - 1) / steps : lines_[r];
  }

  void step() noexcept {
    for (int r = 0; r < 2; ++r) issue(r, std::min(lines_[r], issued_[r] + per_step_[r]));
  }
  void finish() noexcept {
    for (int r = 0; r < 2; ++r) issue(r, lines_[r]);
  }
  /// Lines of run r issued so far.
  std::size_t issued(int r) const noexcept { return issued_[r]; }

 private:
  static constexpr std::size_t lines(std::size_t bytes) { return (bytes + buffer_alignment - 1) / buffer_alignment; }
  void issue(int r, std::size_t end) noexcept {
    if (!runs_[r]) return;
    for (; issued_[r] < end; ++issued_[r]) __builtin_prefetch(runs_[r] + issued_[r] * buffer_alignment, 0, 3);
  }

  const std::uint8_t* runs_[2] = {nullptr, nullptr};
  std::size_t lines_[2] = {0, 0}, per_step_[2] = {0, 0}, issued_[2] = {0, 0};
};

/// Reads one byte of every cache line of [p, p + bytes), in order, and waits for them: for a
/// table that a loop is about to read at random (a codebook), when it may have left the caches.
/// In-order demand loads are what the hardware prefetchers stream in at full rate; the random
/// misses they replace are waited for a few at a time, and a burst of software prefetches would be
/// dropped. Costs one L1 or L2 hit per line when the table is still cached.
inline void touch_lines(const void* p, std::size_t bytes) noexcept {
  const auto* c = static_cast<const volatile unsigned char*>(p);
  unsigned sum = 0;
  for (std::size_t i = 0; i < bytes; i += buffer_alignment) sum += c[i];
  asm volatile("" ::"r"(sum));
}

}  // namespace cq::detail
