#pragma once
/// How the CPU spreads attention over threads: the plan, made once per call. Work comes in items
/// (one query position of one sequence x one KV head, with its GQA query heads); an item whose
/// coded range is long is cut into pieces of whole 32-token blocks that run on different threads
/// and merge (flash-decoding). Items are spread first; pieces only when items alone leave threads
/// idle, and never shorter than min_piece_tokens (below that, merging costs more than it saves).

#include "cq/attention/cpu_kernel.hpp"
#include "cq/packed_codes.hpp"

#include <algorithm>
#include <cstddef>
#include <vector>

namespace cq::detail {

inline constexpr std::size_t min_piece_tokens = 2 * superblock;

/// The pieces of every item: item i's pieces are units [first[i], first[i + 1]), unit u covers
/// code indices [begin[u], end[u]) of its item; each item's first unit also takes its sinks and
/// window.
struct AttentionPlan {
  std::vector<std::size_t> first;  // (items + 1)
  std::vector<std::size_t> begin, end;  // (units)
  std::size_t units() const { return begin.size(); }
  std::size_t pieces(std::size_t item) const { return first[item + 1] - first[item]; }
};

/// Plans `items` items with coded lengths coded[i] over `threads` threads (1: no pieces). With
/// `pieces` > 0, every item is cut into that many pieces where its length allows.
inline AttentionPlan plan_attention(const std::size_t* coded, std::size_t items, std::size_t threads,
                                    std::size_t pieces_wanted = 0) {
  AttentionPlan plan;
  plan.first.reserve(items + 1);
  // Pieces per item: enough that every thread has work when items are fewer than threads.
  const std::size_t wanted =
      pieces_wanted ? pieces_wanted : items < threads ? (threads + items - 1) / items : 1;
  for (std::size_t i = 0; i < items; ++i) {
    plan.first.push_back(plan.begin.size());
    const std::size_t n = coded[i];
    const std::size_t pieces = std::clamp<std::size_t>(wanted, 1, std::max<std::size_t>(1, n / min_piece_tokens));
    const std::size_t per = (n / pieces + block_tokens - 1) / block_tokens * block_tokens;
    for (std::size_t p = 0; p < pieces; ++p) {
      plan.begin.push_back(std::min(n, p * per));
      plan.end.push_back(p + 1 == pieces ? n : std::min(n, (p + 1) * per));
    }
  }
  plan.first.push_back(plan.begin.size());
  return plan;
}

}  // namespace cq::detail
