#pragma once
/// What FusedAttention reads of a device cache's sequences, built on the host: per query row its
/// visible tokens (checked against the rows the cache keeps), then one upload segment of records --
/// per (row, KV head) the code runs (DeviceKVCodes), per row its record (DeviceSequence), then the
/// sequences' page tables, which a sequence's rows share. Used by cuda::PagedKVCache's attend and
/// by its graph-capturable decode step.

#include "cq/attention/problem.hpp"
#include "cq/cache/layout.hpp"
#include "cq/cache/sequence_table.hpp"
#include "cq/cuda/attention/params.cuh"
#include "cq/error.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace cq::cuda::detail {

/// The query rows of a call: row r of seqs[i] (indptr[i] <= r < indptr[i + 1]) at position
/// length - rows + (r - indptr[i]) of `layer`. With `prefix` (prefill: one row per sequence), the
/// row stands for the token after the sequence's last and sees every cached token (none when the
/// sequence is empty).
struct QueryRows {
  std::vector<VisibleTokens> vis;  // per row
  std::size_t table_entries = 1;   // page-table entries of the segment, one spare first
  int max_coded = 0, max_full = 0;

  QueryRows(const SequenceTable& table, std::size_t layer, std::span<const SeqId> seqs,
            std::span<const std::size_t> indptr, const char* what, bool prefix = false) {
    const std::size_t S = table.options().sinks, W = table.options().window;
    vis.resize(indptr.back());
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const SequenceTable::Sequence& q = table.at(seqs[i], what);
      const std::size_t n = q.length[layer], rows = indptr[i + 1] - indptr[i];
      CQ_ASSERT(!prefix || rows == 1);
      CQ_CHECK(prefix || rows <= n, what, ": ", rows, " query rows but sequence ", seqs[i], " holds ", n,
               " tokens in layer ", layer);
      for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r) {
        if (prefix && n == 0) {
          vis[r] = VisibleTokens{};
          continue;
        }
        const std::size_t pos = prefix ? n - 1 : n - rows + (r - indptr[i]);
        vis[r] = visible_tokens(pos, S, W);
        CQ_CHECK(vis[r].window() == 0 || vis[r].window_begin >= q.recent_first, what, ": the window of position ",
                 pos, " of sequence ", seqs[i], " starts at ", vis[r].window_begin,
                 " but full precision is kept from ", q.recent_first, " (raise max_rollback to attend this far back)");
        CQ_CHECK(vis[r].coded() <= 0x7fffffffu && vis[r].full() <= 0x7fffffffu, what, ": sequence ", seqs[i],
                 " is too long for the kernels (", n, " tokens)");
        max_coded = std::max(max_coded, int(vis[r].coded()));
        max_full = std::max(max_full, int(vis[r].full()));
      }
      table_entries += q.code.size() + q.sink.size() + q.recent.size();
    }
  }

  /// Bytes of an upload segment of `rows` rows, `kv_heads` KV heads and `table_entries` page-table
  /// entries (a multiple of 8).
  static std::size_t segment_bytes(std::size_t rows, std::size_t kv_heads, std::size_t table_entries) {
    const std::size_t b =
        rows * (kv_heads * sizeof(DeviceKVCodes) + sizeof(DeviceSequence)) + table_entries * sizeof(std::uint32_t);
    return (b + 7) / 8 * 8;
  }
  /// Bytes of these rows' segment.
  std::size_t segment_bytes(std::size_t kv_heads) const { return segment_bytes(vis.size(), kv_heads, table_entries); }

  /// Writes the segment at `blob` (host), which the device will see at `dev`, for the code pool
  /// of the layer at `code_base` (device); sets batch.codes and batch.sequences.
  void write_segment(const SequenceTable& table, std::span<const SeqId> seqs, std::span<const std::size_t> indptr,
                     std::size_t kv_heads, const CodePageLayout& cl, const std::uint8_t* code_base,
                     unsigned char* blob, const unsigned char* dev, AttentionBatch& batch) const {
    const std::size_t R = vis.size(), H = kv_heads;
    const std::size_t seqs_at = R * H * sizeof(DeviceKVCodes), tables_at = seqs_at + R * sizeof(DeviceSequence);
    auto* codes = reinterpret_cast<DeviceKVCodes*>(blob);
    auto* sequences = reinterpret_cast<DeviceSequence*>(blob + seqs_at);
    auto* tables = reinterpret_cast<std::uint32_t*>(blob + tables_at);
    const auto* dev_tables = reinterpret_cast<const std::uint32_t*>(dev + tables_at);
    tables[0] = 0;
    std::size_t used = 1;  // tables[0]: the spare entry empty tables point at
    auto put_table = [&](const std::pmr::vector<std::uint32_t>& t) {
      if (t.empty()) return dev_tables;
      std::copy(t.begin(), t.end(), tables + used);
      const std::uint32_t* at = dev_tables + used;
      used += t.size();
      return at;
    };
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const SequenceTable::Sequence& q = table.at(seqs[i], "attend");
      const std::uint32_t* code_table = put_table(q.code);
      const std::uint32_t* sink_table = put_table(q.sink);
      const std::uint32_t* recent_table = put_table(q.recent);
      for (std::size_t r = indptr[i]; r < indptr[i + 1]; ++r) {
        for (std::size_t h = 0; h < H; ++h) {
          DeviceKVCodes& c = codes[r * H + h];
          c.key_codes = code_base + cl.key_offset(h);
          c.value_codes = code_base + cl.value_offset(h);
          c.pages = code_table;
          c.page_bytes = cl.page_bytes();
        }
        DeviceSequence& s = sequences[r];
        s = DeviceSequence{};
        s.coded = std::uint32_t(vis[r].coded());
        s.full = std::uint32_t(vis[r].full());
        s.sink_pages = sink_table;
        s.recent_pages = recent_table;
        s.sinks = std::uint32_t(vis[r].sink_end);
        s.recent_row = vis[r].window() > 0 ? std::uint32_t(vis[r].window_begin - q.recent_first) : 0;
        s.position = q.position_offset;
      }
    }
    batch.codes = reinterpret_cast<const DeviceKVCodes*>(dev);
    batch.sequences = reinterpret_cast<const DeviceSequence*>(dev + seqs_at);
  }
};

}  // namespace cq::cuda::detail
