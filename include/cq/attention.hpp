#pragma once
/// Attention directly on CQ codes, on the CPU: the entry points.
///
/// What a query sees is attention/problem.hpp; what it reads, attention/head_view.hpp; the kernel
/// for one KV head, attention/cpu_kernel.hpp; how work is split over threads,
/// attention/cpu_plan.hpp; the online softmax and its merge, attention/softmax_state.hpp. The
/// caches call attend_items with their batch; an engine with views of its own calls attend_head.

#include "cq/attention/cpu_kernel.hpp"
#include "cq/attention/cpu_plan.hpp"
#include "cq/attention/head_view.hpp"
#include "cq/attention/problem.hpp"
#include "cq/attention/softmax_state.hpp"
#include "cq/backend/native.hpp"
#include "cq/cache/layout.hpp"
#include "cq/concepts.hpp"
#include "cq/detail/aligned_buffer.hpp"
#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/executor.hpp"

#include <algorithm>
#include <cstddef>
#include <span>
#include <vector>

namespace cq {

/// One unit of attention: `heads` query heads (q: heads x head_dim floats, contiguous) that share
/// the KV head `kv`, at position `pos`; writes out (heads x head_dim).
template <element_type T>
struct AttentionItem {
  const KVHeadView<T>* kv = nullptr;
  const float* q = nullptr;
  std::size_t heads = 1;
  std::size_t pos = 0;
  float* out = nullptr;
};

/// Runs every item, spread over `exec` (items first; long coded ranges also in pieces, see
/// attention/cpu_plan.hpp; `pieces` > 0 asks for that many per item). `scoring`: the scale (0
/// means 1 / sqrt(head_dim)) and an optional logit soft cap. Each item's view must have passed
/// detail::check_head_view. Throws cq::Error when a view does not hold what its position reads, or
/// when the scale or the soft cap is not finite (or the cap negative).
template <attention_backend Backend = backend::Native, element_type T>
void attend_items(std::span<const AttentionItem<T>> items, Scoring scoring, AttentionMethod method = AttentionMethod::fused,
                  Executor* exec = nullptr, std::size_t pieces = 0) {
  const float cap = detail::check_soft_cap(scoring.soft_cap, "attend");
  if (items.empty()) return;
  // One kernel object per item, and per max_group_heads query heads of a larger GQA group.
  using Kernel = detail::HeadAttention<Backend, T>;
  std::vector<Kernel> heads;
  std::vector<float*> outs;
  for (const AttentionItem<T>& it : items)
    for (std::size_t h0 = 0; h0 < it.heads; h0 += Kernel::max_group_heads) {
      const std::size_t n = std::min(Kernel::max_group_heads, it.heads - h0), D = it.kv->head_dim;
      heads.emplace_back(*it.kv, it.q + h0 * D, n, it.pos, detail::resolve_scale(scoring.scale, D, "attend"), cap,
                         method);
      outs.push_back(it.out + h0 * D);
    }
  std::vector<std::size_t> coded(heads.size());
  for (std::size_t i = 0; i < heads.size(); ++i) coded[i] = heads[i].coded_tokens();
  const detail::AttentionPlan plan =
      detail::plan_attention(coded.data(), heads.size(), exec ? exec->concurrency() : 1, exec ? pieces : 1);
  // Partial states of every unit live in this call's buffers (never in thread-local scratch: an
  // executor may run other work on this thread while it waits), each unit's accumulators and
  // softmax states on cache lines of their own: units run on different threads, and a line two
  // of them share is written by both for every block of tokens (false sharing slowed two pieces
  // running at once far more than two processes do).
  constexpr std::size_t line_floats = buffer_alignment / sizeof(float);  // buffer_alignment: a cache line
  constexpr std::size_t line_states = std::max<std::size_t>(1, buffer_alignment / sizeof(detail::HeadState));
  std::vector<std::size_t> offset(plan.units() + 1, 0), state_at(plan.units() + 1, 0);
  for (std::size_t i = 0; i < heads.size(); ++i)
    for (std::size_t u = plan.first[i]; u < plan.first[i + 1]; ++u) {
      offset[u + 1] = offset[u] + round_up(heads[i].layout().floats(), line_floats);
      state_at[u + 1] = state_at[u] + round_up(heads[i].heads(), line_states);
    }
  // Not cleared here: every unit's run (all of them, empty ranges too) clears its own floats
  // before any merge reads them, and nothing reads the padding between units.
  detail::AlignedBuffer<float> floats;
  floats.resize_for_overwrite(offset.back());
  detail::AlignedBuffer<detail::HeadState> states(state_at.back());
  std::vector<std::size_t> item_of(plan.units());
  for (std::size_t i = 0; i < heads.size(); ++i)
    for (std::size_t u = plan.first[i]; u < plan.first[i + 1]; ++u) item_of[u] = i;
  parallel_for(exec, plan.units(), [&](std::size_t u) {
    const std::size_t i = item_of[u];
    heads[i].run(plan.begin[u], plan.end[u], u == plan.first[i], floats.data() + offset[u], states.data() + state_at[u]);
  });
  parallel_for(exec, heads.size(), [&](std::size_t i) {
    const std::size_t u = plan.first[i];
    heads[i].merge(floats.data() + offset[u], offset[u + 1] - offset[u], states.data() + state_at[u],
                   state_at[u + 1] - state_at[u], plan.pieces(i));
    heads[i].finish(states.data() + state_at[u], outs[i]);
  });
}

/// Attention of `heads` query heads (q: heads x head_dim, contiguous) at position `pos` over one
/// KV head's cache; writes out (heads x head_dim). `scoring`: the scale (0: 1 / sqrt(head_dim)),
/// or {scale, soft cap}. With an executor and `parts` > 1 the coded range is split into up to that
/// many pieces computed in parallel and merged. Throws cq::Error when the view is inconsistent or
/// does not hold what the position reads, or on a scale or soft cap attend_items refuses.
template <attention_backend Backend = backend::Native, element_type T>
void attend_head(const KVHeadView<T>& kv, const float* q, std::size_t heads, std::size_t pos, Scoring scoring, float* out,
                 AttentionMethod method = AttentionMethod::fused, Executor* exec = nullptr, std::size_t parts = 1) {
  detail::check_head_view(kv, "attend_head");
  CQ_CHECK(q != nullptr && out != nullptr, "attend_head: q and out must not be null");
  const AttentionItem<T> item{&kv, q, heads, pos, out};
  attend_items<Backend, T>(std::span<const AttentionItem<T>>(&item, 1), scoring, method, exec, parts);
}

}  // namespace cq
