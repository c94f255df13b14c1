#pragma once
/// The lane-tables kernel: fused decode attention for 8-bit codes with 16, 32 or 64 key and value
/// groups (CQ-2c8b, 4c8b, 8c8b at D = 128), lane-private tables (layout.cuh says why).
///
/// The grid is (query heads per KV head, splits, sequences x KV heads), one 512-thread block per
/// multiprocessor (two planes, 128 KiB). A block runs the prologue (full-precision tokens, the
/// head's score tables, value rows), the main loop over its split's coded tokens (mainloop.cuh),
/// then the epilogue (epilogue.cuh): the histogram x codebook product and, with one split, the
/// output; otherwise its partial state for combine_kernel (flash-decoding).
///
/// Template flag Capped: the logits soft-capped (AttentionBatch::logits_soft_cap); the plan holds
/// both instantiations so that a batch without a cap runs a main loop without one
/// (softmax_state.hpp, SoftCap).
///
/// Template argument Pages (PageMode, layout.cuh): how the codes are found; the launch picks the
/// instantiation (LaneTablesLaunch::pick). For contiguous codes the page table is a constant
/// nullptr and every paged branch folds away, so the paged paths' instructions and registers
/// neither slow the contiguous kernel nor move its code generation (they did while both shared
/// one instantiation: docs/design/cuda-attention.md, "Paged codes").
///
/// Value-rows mode (template flag Rows; 2-channel value groups at D = 128, i.e. CQ-2c8b values):
/// the lanes' histogram columns hold the value centroids instead (a half pair per word, scaled per
/// group by a power of two), and the value lanes sum weight x centroid in registers: runs of four
/// tokens in half precision (HFMA2), then float. A lookup is one wavefront where an atomic was
/// two; there is no fixed point, so no limit on tokens per split, no histogram zeroing, rescale
/// pass or product. Each warp keeps its own running reference, so rounds need no block barrier;
/// the warps' sums meet at the end. The half rounding's mean per channel is added back then
/// (stage_value_rows).
///
/// The coded tokens' running reference starts at their own maximum; the full-precision tokens
/// (sinks, window) meet them in float at the end, so a dominant sink cannot push the coded
/// weights below the fixed point's resolution.

#include "cq/cuda/attention/lane_tables/epilogue.cuh"
#include "cq/cuda/attention/lane_tables/layout.cuh"
#include "cq/cuda/attention/lane_tables/mainloop.cuh"
#include "cq/cuda/attention/lane_tables/prologue.cuh"
#include "cq/cuda/attention/params.cuh"

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

namespace cq::cuda::detail {

template <int GK, int GV, bool Rows, bool Capped, PageMode Pages>
__global__ void __launch_bounds__(LaneTablesConfig<GK, GV>::threads, 1)
    lane_tables_kernel(AttentionBatch p, LaneTablesLayout L, float* __restrict__ partial, unsigned stages) {
  static_assert(!Rows || GV == 64, "value-rows mode: 2-channel value groups at D = 128");
  static_assert(!Rows || Pages == PageMode::contiguous || Pages == PageMode::paged,
                "round and pair pages: histogram mode only");
  using KL = LaneMap<GK>;
  using VL = LaneMap<GV>;
  using Cfg = LaneTablesConfig<GK, GV, Pages>;
  constexpr int R = Cfg::round, threads = Cfg::threads, warps = Cfg::warps;
  // Shared memory: the planes, then the small buffers (lane_tables_small_words).
  extern __shared__ __align__(16) unsigned char lane_tables_smem[];
  float* tab = reinterpret_cast<float*>(lane_tables_smem);                                    // the planes
  auto* round_barrier = reinterpret_cast<unsigned long long*>(lane_tables_smem + L.small_at);  // 16 bytes
  unsigned* wbuf = reinterpret_cast<unsigned*>(lane_tables_smem + L.small_at + 16);           // [warps][2][R * 32]
  float* red = reinterpret_cast<float*>(wbuf + warps * 2 * R * 32);                           // [4][warps]
  float* full_score = red + 4 * warps;                                                        // [full_cap]
  float* product = full_score + L.full_cap;                                                   // [threads / D][D]
  float* code_part = product + threads / L.head_dim * L.head_dim;                             // [D]
  float* stage = code_part + L.head_dim;                                  // [256][stage_groups + 1]
  float* q_shared = stage + 256 * (Cfg::stage_groups + 1);                // [D]
  float* vmean = q_shared + L.head_dim;                                   // [D] value-rows mode
  float* vunscale = vmean + L.head_dim;                                   // [D / 2] value-rows mode
  auto* page_ids = reinterpret_cast<std::uint32_t*>(vunscale + L.head_dim);  // [lane_tables_page_cap] value-rows mode
  // The table addresses' immediate offset assumes this (the host checks the reserved size).
  if (unsigned(__cvta_generic_to_shared(tab)) != unsigned(lane_tables_shared_base)) __trap();

  // What this block serves: query head blockIdx.x of KV head kvh of sequence b, split blockIdx.y.
  const int group = p.q_heads / p.kv_heads;
  const int split = blockIdx.y, b = blockIdx.z / p.kv_heads, kvh = blockIdx.z % p.kv_heads;
  const int hq = kvh * group + blockIdx.x, bh = b * p.q_heads + hq;
  const int D = L.head_dim, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const DeviceSequence seq = p.sequences[b];
  const DeviceKVCodes codes = p.codes[b * p.kv_heads + kvh];
  const int c0 = split * L.split_tokens;
  const int n = max(0, min(int(seq.coded), c0 + L.split_tokens) - c0), nblocks = (n + 31) / 32;
  const float scale = p.scale != 0.0f ? p.scale : rsqrtf(float(D));
  const int nfull = split == 0 ? int(seq.full) : 0;
  // Contiguous codes: the page table is a constant nullptr, every paged branch folds away.
  const auto run = [](CodeRun r) {
    if constexpr (Pages == PageMode::contiguous) r.pages = nullptr;
    return r;
  };
  const CodeRun key_run = run(codes.keys(p.page_shift())), value_run = run(codes.values(p.page_shift()));
  // The first round's codes head for L2 while the block builds its tables (pages looked up in
  // the page table itself: its copy below is not in yet).
  if (warp == 0 && n > 0) {
    const auto table = [&](int blk) { return key_run.page_of(blk); };
    if (stages & stage_scan) prefetch_code_blocks<KL, warps * R>(key_run, table, c0 / 32, 0, nblocks, lane);
    if (stages & stage_hist) prefetch_code_blocks<VL, warps * R>(value_run, table, c0 / 32, 0, nblocks, lane);
  }
  // Paged codes, value-rows mode: the split's page ids into shared memory by cp.async (no thread
  // waits on them before the main loop's barrier; PageLookup says why this mode only).
  const int first_page = (c0 / 32) >> p.page_shift();
  const unsigned page_ids_at = unsigned(__cvta_generic_to_shared(page_ids));
  const SplitPages split_pages{page_ids_at - 4u * unsigned(first_page), p.page_shift()};
  if (Rows && key_run.pages && n > 0) {
    const int count = ((c0 / 32 + nblocks - 1) >> split_pages.shift) - first_page + 1;
    if (count > lane_tables_page_cap) __trap();  // the plan keeps splits within the cap
    for (int i = tid; i < count; i += threads)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(page_ids_at + 4u * unsigned(i)),
                   "l"(key_run.pages + first_page + i)
                   : "memory");
  }

  // Prologue (prologue.cuh). The full-precision value rows' loads go out first: thread
  // (vpart, d) takes channel d of rows vpart, vpart + parts, ...
  const int parts = threads / D, vpart = tid / D, vd = tid % D;
  constexpr int vchunk = 8;  // value rows per thread and load batch
  float vfirst[vchunk] = {};
  if (nfull > 0) visit_full_rows(p, b, kvh, [&](const auto& rows) {
#pragma unroll
    for (int k = 0; k < vchunk; ++k) {
      const int j = vpart + k * parts;
      if (vpart < parts && j < nfull) vfirst[k] = rows.at(rows.value(j), vd);
    }
  });
  const bool full_scores = stages & stage_full;

  if constexpr (!Rows) for_each_hist_quad<VL, threads>(tab, tid, [](uint4& h) { h = make_uint4(0u, 0u, 0u, 0u); });
  for (int d = tid; d < D; d += threads) q_shared[d] = p.query(std::size_t(bh) * D + d);
  if (tid == 0) mbarrier_init(round_barrier, warps);
  __syncthreads();
  visit_full_rows(p, b, kvh, [&](const auto& rows) {
    const bool vec = rows.vec(D);
    const FullKeyRows<Cfg, std::decay_t<decltype(rows)>> load_full_keys{rows, D, lane, nfull, vec, full_scores};
    score_full_keys<Cfg>(load_full_keys, q_shared, full_score, red, scale, Capped ? p.logits_soft_cap : 0.0f, nfull,
                         warp, lane, D);
  });
  // This head's score tables (staged; copied into the lanes' columns after the next barrier).
  const bool tables = n > 0 && (stages & stage_lut);
  if (tables) stage_score_tables<Cfg>(p.key_codebooks[kvh].centroids, stage, q_shared, scale, D, tid);
  __syncthreads();
  float full_max = -FLT_MAX;
  visit_full_rows(p, b, kvh, [&](const auto& rows) {
    full_max = weigh_full_values<Cfg, vchunk>(vfirst, rows, vd, full_score, red, product, vpart, parts, nfull, tid);
  });
  if (tables) fill_columns<KL, threads, 0>(tab, stage, tid);
  asm volatile("cp.async.wait_all;" ::: "memory");  // this thread's page ids are in
  __syncthreads();
  const bool accumulate = stages & stage_hist;
  if constexpr (Rows)
    if (n > 0 && accumulate) value_rows_to_columns<Cfg>(p.value_codebooks[kvh].centroids, tab, stage, vmean, vunscale, tid);
  // The coded tokens' running reference starts at their own first maximum, not the full-precision
  // tokens' (the two parts meet in float at the end): a dominant sink would otherwise push every
  // coded weight below the fixed point's resolution (2^-17 of the reference).
  float ref = -FLT_MAX;

  // Main loop (mainloop.cuh), compiled for 16-byte and for 4-byte aligned code pointers (a
  // block-uniform choice). Per-lane constants of the addressing: the byte permute keeps bytes 0,
  // 2, 3 of `base` (plane offset | column * 4) and puts the code in byte 1. Key selectors carry the
  // token permutation's low two bits; the bits above are word swaps inside a load (kwords) and the
  // loads' order.
  const bool aligned = codes.aligned16();
  const bool scan = stages & stage_scan;
  int koff[KL::slots][KL::units], voff[VL::slots][VL::units];
  load_offsets<KL, true>(koff, lane);
  load_offsets<VL, false>(voff, lane);
  const unsigned kmask = KL::token_mask(lane), kwords = (kmask >> 2) % unsigned(KL::unit);
  unsigned ksel[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) ksel[k] = 0x7604u | ((unsigned(k) ^ (kmask & 3u)) << 4);
  const unsigned col = unsigned(lane) * 4;
  const LaneAddressing<Cfg> a{koff, voff, kwords, ksel, col};
  LaneWeight<Rows> wsum = 0;  // this lane's weights
  // Value-rows mode: the lane's share of the output, channels 2 g and 2 g + 1 of its slots' groups.
  float acc[VL::slots][2] = {};
  unsigned* my_weights = wbuf + warp * 2 * R * 32;  // two rounds' weights
  LaneTablesBlock k;
  k.split = split, k.b = b, k.kvh = kvh, k.bh = bh, k.D = D, k.tid = tid, k.warp = warp, k.lane = lane;
  k.codes = codes, k.n = n, k.nblocks = nblocks, k.scale = scale, k.nfull = nfull;
  k.key_run = key_run, k.value_run = value_run, k.first_block = c0 / 32, k.pages = split_pages;
  LaneTablesShared sh{tab, round_barrier, wbuf, red, full_score, product, code_part, stage, q_shared, vmean, vunscale};
  if (aligned)
    scan_split<Cfg, Rows, true, Capped>(L, k, sh, a, my_weights, scan, accumulate, p.logits_soft_cap, ref, wsum, acc);
  else
    scan_split<Cfg, Rows, false, Capped>(L, k, sh, a, my_weights, scan, accumulate, p.logits_soft_cap, ref, wsum, acc);

  // Epilogue (epilogue.cuh): out = (codes' part + full-precision part) / weight sum, each part
  // moved from its own reference to the larger one.
  publish_lane_sums<Cfg, Rows>(k, sh, ref, wsum, acc);
  __syncthreads();
  const PartsMerge mp = merge_parts<Cfg, Rows>(L, k, sh, ref, full_max);
  const DeviceCodebookView vcb = p.value_codebooks[kvh];
  const bool codes_part = n > 0 && (stages & stage_product);
  if (Rows && codes_part) {  // output channel d: the sums of every warp and token subset
    for (int d = tid; d < D; d += threads) {
      const int g = d / 2, i = VL::slot_of(g);
      float o = 0.0f;
      for (int w = 0; w < warps; ++w) {
        float ow = 0.0f;
#pragma unroll
        for (int sub = 0; sub < VL::subsets; ++sub) ow += stage[((w * VL::slots + i) * 32 + VL::lane_of(g, sub)) * 2 + d % 2];
        o = fmaf(warp_factor<Rows>(red, w, mp.coded_ref), ow, o);
      }
      // Back to the codebook's scale, plus the half rounding's mean.
      code_part[d] = accumulate ? fmaf(o, vunscale[g], mp.coded_weights * vmean[d]) : 0.0f;
    }
  } else if (codes_part) {
    hist_share<Cfg>(vcb.centroids, tab, code_part, L.unit, D, tid);
  }
  __syncthreads();
  write_out<Cfg>(p, k, sh, mp, parts, codes_part, partial);
}

}  // namespace cq::cuda::detail
