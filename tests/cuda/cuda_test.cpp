// CUDA backend tests, run on the H200 (built everywhere nvcc exists; without a device they report
// that and fail, so they are not part of the default ctest run: see tests/CMakeLists.txt).
// The CPU is the oracle: codes identical (ties aside), decode bit-identical, attention within 1e-3
// relative error of the double-precision oracle over the shared attention cases
// (tests/conformance/attention_cases.hpp) through both kernels, batched k-means MSE matching the
// CPU fit. CQ_CUDA_TEST_QUICK (set for the compute-sanitizer runs) keeps every 12th grid shape and
// skips the long contexts.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "../conformance/attention_cases.hpp"
#include "gpu_glue.hpp"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

using namespace cq;

namespace {

void require_device() {
  const std::string name = gpu_test::device_name();
  REQUIRE_MESSAGE(!name.empty(), "no CUDA device");
  static bool shown = false;
  if (!shown) MESSAGE("device: ", name);
  shown = true;
}

bool quick() { return std::getenv("CQ_CUDA_TEST_QUICK") != nullptr; }

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

namespace {

/// Rows for the slot-mapped writes: row r's keys and values (kin[r], vin[r]: H x D elements) laid
/// out as [rows][H][D], or [H][rows][D] with heads_outer, into kb / vb, and the input naming them
/// with `slots` (codebooks left to the caller).
template <element_type T>
gpu_test::PagedEncodeInput slot_rows(const std::vector<const T*>& kin, const std::vector<const T*>& vin, std::size_t H,
                                     std::size_t D, bool heads_outer, const std::vector<std::int64_t>& slots,
                                     std::vector<T>& kb, std::vector<T>& vb) {
  const std::size_t rows = slots.size(), width = H * D;
  kb.assign(rows * width, T(0.0f));
  vb.assign(rows * width, T(0.0f));
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t h = 0; h < H; ++h)
      for (std::size_t d = 0; d < D; ++d) {
        const std::size_t at = heads_outer ? (h * rows + r) * D + d : r * width + h * D + d;
        kb[at] = kin[r][h * D + d];
        vb[at] = vin[r][h * D + d];
      }
  gpu_test::PagedEncodeInput in;
  in.keys = kb.data();
  in.values = vb.data();
  in.element_bytes = sizeof(T);
  in.bf16 = std::same_as<T, bfloat16>;
  in.rows = rows;
  in.row_stride = heads_outer ? D : width;
  in.head_stride = heads_outer ? rows * D : D;
  in.elements = kb.size();
  in.slots = slots;
  return in;
}

/// One configuration of the paged-encode test: a CPU cache of three sequences (sinks 4, window 8,
/// appended in uneven chunks), then every coded row encoded on the GPU into a copy of its code pool
/// whose codes at those rows were all flipped beforehand. The GPU's pool must be the CPU's, byte
/// for byte, once ties (a code the CPU did not pick that is as near) are set to the CPU's choice.
template <element_type T>
void check_paged_encode(std::size_t D, std::size_t C, int bits, std::size_t P, bool heads_outer, std::size_t rows_per_call,
                        std::uint64_t seed) {
  constexpr std::size_t H = 4, sinks = 4;
  KVCodebooks codebooks(1, H, D, std::vector<LayerSpec>{{{C, bits}, {C, bits}}}, KeyRope::post);
  for (std::size_t h = 0; h < H; ++h)
    codebooks.set(0, h, test::random_codebook(D, C, bits, seed + 2 * h), test::random_codebook(D, C, bits, seed + 2 * h + 1));
  PagedCacheOptions o;
  o.page_tokens = P;
  o.full_page_rows = 16;
  o.window = 8;
  o.sinks = sinks;
  o.max_sequences = 3;
  const std::vector<std::size_t> lengths = {3, 150, 333};
  const MemoryPlan plan(codebooks, o, sizeof(T));
  PagedKVCache<T> cache(codebooks, plan.pool_for(lengths.size(), 333, 41));
  const std::size_t width = H * D;
  std::vector<std::vector<T>> keys, values;
  std::vector<SeqId> seqs;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    const SeqId s = cache.add_sequence();
    seqs.push_back(s);
    keys.push_back(test::convert<T>(test::random_normal(lengths[i] * width, seed + 10 + i)));
    values.push_back(test::convert<T>(test::random_normal(lengths[i] * width, seed + 20 + i)));
    for (std::size_t t = 0; t < lengths[i];) {
      const std::size_t take = std::min<std::size_t>(lengths[i] - t, 1 + (t * 7 + seed) % 41);
      cache.append(0, s, ConstMatrixView<T>(keys[i].data() + t * width, take, width),
                   ConstMatrixView<T>(values[i].data() + t * width, take, width));
      t += take;
    }
  }
  const KVHeadView<T> v0 = cache.head_view(0, seqs[0], 0);
  const CodePageLayout layout{P, H, packed_code_bytes(block_tokens, D / C, bits), packed_code_bytes(block_tokens, D / C, bits)};
  REQUIRE(layout.page_bytes() == v0.key_codes.page_bytes);
  std::vector<std::uint8_t> cpu(v0.key_codes.pool, v0.key_codes.pool + cache.memory().codes);
  const std::size_t pages = cpu.size() / layout.page_bytes();
  // The batch: every coded row (token slots from the sequences' page tables), two padding rows
  // (slot -1) and one past the pool (skipped), in [rows][H][D] or [H][rows][D].
  std::vector<std::int64_t> slots;
  std::vector<const T*> kin, vin;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    const PagedCodesView c = cache.head_view(0, seqs[i], 0).key_codes;  // its page table lives in the cache
    for (std::size_t t = sinks; t < lengths[i]; ++t) {
      slots.push_back(std::int64_t(c.pages[(t - sinks) / P]) * std::int64_t(P) + std::int64_t((t - sinks) % P));
      kin.push_back(keys[i].data() + t * width);
      vin.push_back(values[i].data() + t * width);
    }
  }
  const std::size_t coded = slots.size();
  for (std::int64_t extra : {std::int64_t(-1), std::int64_t(pages * P), std::int64_t(-1)}) {
    slots.push_back(extra);
    kin.push_back(keys[2].data());
    vin.push_back(values[2].data());
  }
  const std::size_t rows = slots.size();
  std::vector<T> kb, vb;
  gpu_test::PagedEncodeInput in = slot_rows(kin, vin, H, D, heads_outer, slots, kb, vb);
  auto code_view = [&](std::uint8_t* pool, std::int64_t slot, std::size_t h, bool value) {
    const std::size_t page = std::size_t(slot) / P;
    return PackedCodesView(pool + page * layout.page_bytes() + (value ? layout.value_offset(h) : layout.key_offset(h)), P,
                           D / C, bits);
  };
  std::vector<std::uint8_t> start = cpu;  // every code the batch writes, flipped
  const std::uint32_t all = (1u << bits) - 1;
  for (std::size_t r = 0; r < coded; ++r)
    for (std::size_t h = 0; h < H; ++h)
      for (bool value : {false, true}) {
        const PackedCodesView c = code_view(start.data(), slots[r], h, value);
        for (std::size_t g = 0; g < D / C; ++g) c.set(std::size_t(slots[r]) % P, g, c.get(std::size_t(slots[r]) % P, g) ^ all);
      }
  for (std::size_t h = 0; h < H; ++h) {
    in.key_codebooks.push_back(&codebooks.key(0, h));
    in.value_codebooks.push_back(&codebooks.value(0, h));
  }
  // In one call, or in calls of rows_per_call rows, each over the previous call's pool.
  std::vector<std::uint8_t> got = start;
  for (std::size_t r0 = 0; r0 < rows; r0 += rows_per_call) {
    gpu_test::PagedEncodeInput part = in;
    part.rows = std::min(rows_per_call, rows - r0);
    part.keys = kb.data() + r0 * in.row_stride;
    part.values = vb.data() + r0 * in.row_stride;
    part.elements = kb.size() - r0 * in.row_stride;
    part.slots.assign(slots.begin() + std::ptrdiff_t(r0), slots.begin() + std::ptrdiff_t(r0 + part.rows));
    got = gpu_test::encode_into_pages(got, layout, part);
  }
  REQUIRE(got.size() == cpu.size());
  std::size_t ties = 0;
  for (std::size_t r = 0; r < coded; ++r)
    for (std::size_t h = 0; h < H; ++h)
      for (bool value : {false, true}) {
        const PackedCodesView g_codes = code_view(got.data(), slots[r], h, value);
        const PackedCodesView c_codes = code_view(cpu.data(), slots[r], h, value);
        const Codebook& cb = value ? codebooks.value(0, h) : codebooks.key(0, h);
        std::vector<float> x(D);
        for (std::size_t d = 0; d < D; ++d) x[d] = float((value ? vin : kin)[r][h * D + d]);
        const std::size_t t = std::size_t(slots[r]) % P;
        for (std::size_t g = 0; g < D / C; ++g)
          if (g_codes.get(t, g) != c_codes.get(t, g)) {
            ++ties;
            REQUIRE(test::is_nearest(cb, x.data(), g, g_codes.get(t, g)));
            g_codes.set(t, g, c_codes.get(t, g));
          }
      }
  CAPTURE(D);
  CAPTURE(C);
  CAPTURE(bits);
  CAPTURE(heads_outer);
  CAPTURE(rows_per_call);
  CHECK(ties <= 2 + coded * H * 2 * (D / C) / 1000);
  CHECK(got == cpu);  // every written code is the CPU's; nothing else changed (padding, out of range)
}

}  // namespace

TEST_CASE("cuda encode into pages: the CPU cache's code pool, byte for byte (ties aside), from fp32, fp16 and bf16 rows") {
  require_device();
  std::uint64_t seed = 300;
  for (const auto& [D, C, bits, P] : {std::tuple<std::size_t, std::size_t, int, std::size_t>{128, 8, 8, 64},
                                      {128, 4, 8, 32},
                                      {128, 2, 8, 64},
                                      {128, 2, 4, 256},
                                      {64, 1, 3, 64}})
    for (bool heads_outer : {false, true})
      for (std::size_t per_call : {std::size_t(1000), std::size_t(61)}) {  // one call, or a decode step's worth per call
        check_paged_encode<float>(D, C, bits, P, heads_outer, per_call, ++seed);
        check_paged_encode<half>(D, C, bits, P, heads_outer, per_call, ++seed);
        check_paged_encode<bfloat16>(D, C, bits, P, heads_outer, per_call, ++seed);
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

// A case's sequences as the GPU serves them (those with a token: an empty sequence has no query)
// and their queries, in the order of the case's query rows.

template <class T = float>
struct GpuCaseOf {
  gpu_test::HostBatchOf<T> batch;
  std::vector<float> q;  // [sequence][q_heads][D]
};

template <class T>
GpuCaseOf<T> gpu_case(const test::AttentionCase& c, const test::CaseCache<T>& cc) {
  REQUIRE(c.queries == 1);
  GpuCaseOf<T> g;
  g.batch.q_heads = int(cc.q_heads);
  const std::size_t qw = cc.q_heads * c.D;
  for (std::size_t i = 0; i < cc.seqs.size(); ++i) {
    if (cc.indptr[i + 1] == cc.indptr[i]) continue;
    for (std::size_t h = 0; h < c.kv_heads; ++h) g.batch.views.push_back(cc.cache->head_view(0, cc.seqs[i], h));
    g.batch.lengths.push_back(cc.cache->length(cc.seqs[i]));
    g.q.insert(g.q.end(), cc.q.begin() + std::ptrdiff_t(cc.indptr[i] * qw), cc.q.begin() + std::ptrdiff_t(cc.indptr[i + 1] * qw));
  }
  return g;
}

std::vector<float> gpu_attention(const test::AttentionCase& c, const GpuCaseOf<>& g, gpu_test::Kernel kernel,
                                 gpu_test::DeviceCodes codes = {}, gpu_test::PlanUsed* used = nullptr) {
  return gpu_test::attention(g.batch, g.q, {1.0f / std::sqrt(float(c.D)), c.soft_cap}, kernel, codes, used);
}

// Codes in contiguous buffers, in the CPU cache's pages read through page tables, and both in one
// batch (every other sequence contiguous: AttentionBatch allows it; the kernels' paged
// instantiations then meet entries without a page table).
constexpr gpu_test::DeviceCodes storages[] = {{.pages = false}, {.pages = true}, {.pages = true, .mixed = true}};

// The double oracle of every output of a built case, in the order the GPU writes them.
template <class Built>
std::vector<double> batch_oracle(const test::AttentionCase& c, const Built& cc) {
  std::vector<double> ref;
  const std::size_t qw = cc.q_heads * c.D;
  for (std::size_t i = 0; i < cc.seqs.size(); ++i)
    for (std::size_t row = cc.indptr[i]; row < cc.indptr[i + 1]; ++row)
      for (std::size_t h = 0; h < c.kv_heads; ++h) {
        const auto r = test::oracle_attend(cc.cache->head_view(0, cc.seqs[i], h), cc.q.data() + row * qw + h * c.group * c.D,
                                           c.group, cc.cache->length(cc.seqs[i]) - 1, 1.0f / std::sqrt(float(c.D)),
                                           c.soft_cap);
        ref.insert(ref.end(), r.begin(), r.end());
      }
  return ref;
}

// ||GPU - oracle|| / ||oracle|| over every output of a case (the special tests' measure).
double batch_error(const test::AttentionCase& c, gpu_test::Kernel kernel, gpu_test::DeviceCodes codes = {},
                   gpu_test::PlanUsed* used = nullptr) {
  const auto cc = test::build_case<float>(c);
  const std::vector<float> got = gpu_attention(c, gpu_case(c, cc), kernel, codes, used);
  const std::vector<double> ref = batch_oracle(c, cc);
  REQUIRE(ref.size() == got.size());
  return test::relative_error(got.data(), ref);
}

// The lane-tables kernel on a one-sequence case: the error against the oracle, divided by the norm
// of the output and by the norm of the weighted sums of |values| (the oracle over the same keys
// with each value centroid replaced by its magnitude).
std::pair<double, double> half_sum_error(const test::AttentionCase& c) {
  const auto cc = test::build_case<float>(c);
  REQUIRE(cc.seqs.size() == 1);
  const auto g = gpu_case(c, cc);
  const std::vector<float> got = gpu_attention(c, g, gpu_test::Kernel::lane_tables);
  const std::size_t n = cc.cache->length(cc.seqs[0]);
  const float scale = 1.0f / std::sqrt(float(c.D));
  double err = 0.0, norm = 0.0, abs_norm = 0.0;
  for (std::size_t h = 0; h < c.kv_heads; ++h) {
    const KVHeadView<float> view = cc.cache->head_view(0, cc.seqs[0], h);
    const CodebookView& vc = view.value_codebook;
    std::vector<float> cent(vc.centroids, vc.centroids + vc.groups * vc.num_centroids() * vc.channels);
    std::vector<float> trans(vc.transposed, vc.transposed + vc.groups * vc.channels * vc.padded_centroids);
    for (float& x : cent) x = std::fabs(x);
    for (float& x : trans) x = std::fabs(x);
    KVHeadView<float> abs_view = view;
    abs_view.value_codebook.centroids = cent.data();
    abs_view.value_codebook.transposed = trans.data();
    const float* q = cc.q.data() + h * c.group * c.D;
    const auto ref = test::oracle_attend(view, q, c.group, n - 1, scale);
    const auto abs_ref = test::oracle_attend(abs_view, q, c.group, n - 1, scale);
    const float* out = got.data() + h * c.group * c.D;
    for (std::size_t i = 0; i < ref.size(); ++i) {
      err += (double(out[i]) - ref[i]) * (double(out[i]) - ref[i]);
      norm += ref[i] * ref[i];
      abs_norm += abs_ref[i] * abs_ref[i];
    }
  }
  return {std::sqrt(err / norm), std::sqrt(err / abs_norm)};
}

constexpr gpu_test::Kernel both_kernels[] = {gpu_test::Kernel::general, gpu_test::Kernel::lane_tables};
// With the grouped-rows kernel (half-precision operands: kept out of the exactness tests below).
constexpr gpu_test::Kernel all_kernels[] = {gpu_test::Kernel::general, gpu_test::Kernel::lane_tables,
                                            gpu_test::Kernel::grouped_rows};

// One sequence of `n` coded tokens that all carry code 0 (keys and values), after `sinks` (0 or
// 1) full-precision sink rows, no window: the synthetic batches of the fixed-point tests.
KVHeadView<float> zero_code_view(const Codebook& kcb, const Codebook& vcb, const std::vector<std::uint8_t>& codes,
                                 std::size_t n, const std::vector<float>* sink_key, const std::vector<float>* sink_value) {
  KVHeadView<float> v;
  v.head_dim = kcb.dim();
  v.key_codebook = kcb.view();
  v.value_codebook = vcb.view();
  v.key_codes = PagedCodesView::contiguous(ConstPackedCodesView(codes.data(), n, kcb.groups(), kcb.bits()));
  v.value_codes = PagedCodesView::contiguous(ConstPackedCodesView(codes.data(), n, vcb.groups(), vcb.bits()));
  if (sink_key) {
    v.sink_keys = PagedRowsView<float>::contiguous(ConstMatrixView<float>(sink_key->data(), 1, v.head_dim), 0);
    v.sink_values = PagedRowsView<float>::contiguous(ConstMatrixView<float>(sink_value->data(), 1, v.head_dim), 0);
    v.sinks = 1;
  }
  return v;
}

}  // namespace

TEST_CASE("cuda fused attention matches the oracle over the shared attention cases, every kernel, contiguous and paged codes") {
  require_device();
  double worst = 0.0, worst_grouped = 0.0;
  std::size_t run = 0;
  std::size_t rope_runs = 0;
  for (const test::AttentionCase& c : test::attention_cases(quick() ? 12 : 1)) {
    // One query per sequence here (several: the paged cache's tests); keys before RoPE go to the
    // grouped-rows kernel only (kernel_serves).
    if (c.queries > 1) continue;
    const auto cc = test::build_case<float>(c);
    const auto g = gpu_case(c, cc);
    // Every case through the general kernel; those with 8-bit codes in 16, 32 or 64 groups (what
    // the plan admits) also through the lane-tables kernel, and those at head_dim 128 with 2, 4
    // or 8 channels and groups of up to 16 heads through the grouped-rows kernel. Each with its
    // codes copied into contiguous buffers, read in the cache's own pages (the case's page size),
    // and both in one batch.
    for (gpu_test::Kernel kernel : all_kernels)
      for (gpu_test::DeviceCodes codes : storages) {
        if (!gpu_test::kernel_serves(kernel, g.batch)) continue;
        CAPTURE(c.name());
        CAPTURE(int(kernel));
        CAPTURE(codes.pages);
        CAPTURE(codes.mixed);
        const double e = test::check_against_oracle(c, cc, gpu_attention(c, g, kernel, codes), 1e-3);
        double& w = kernel == gpu_test::Kernel::grouped_rows ? worst_grouped : worst;
        w = std::max(w, e);
        ++run;
        rope_runs += c.rope ? 1 : 0;
      }
  }
  MESSAGE(run, " case x kernel x storage runs (", rope_runs, " with keys before RoPE); largest relative error ", worst,
          " (grouped-rows kernel: ", worst_grouped, ")");
  CHECK(rope_runs > 0);
  if (!quick()) {
    // A long context across many splits, every kernel, in pages of 32, 64 and 256 tokens.
    const test::AttentionCase long_case = test::AttentionCase::of(128, 8, 8, 32, 4, 4, {40000, 7000}).with_seed(999);
    for (gpu_test::Kernel kernel : all_kernels)
      for (std::size_t page : {32u, 64u, 256u})
        for (gpu_test::DeviceCodes codes : storages) {
          if (!codes.pages && page != 64) continue;
          CAPTURE(int(kernel));
          CAPTURE(page);
          CAPTURE(codes.pages);
          CAPTURE(codes.mixed);
          CHECK(batch_error(long_case.with_pages(page), kernel, codes) < 1e-3);
        }
    // 2c8b in pages across splits: the lane-tables kernel's value-rows mode, which reads its page
    // ids from the split's copy in shared memory (a split's first page is not page 0).
    const test::AttentionCase long_rows = test::AttentionCase::of(128, 2, 8, 32, 4, 4, {40000, 7000}).with_seed(997);
    for (std::size_t page : {32u, 64u, 256u}) {
      CAPTURE(page);
      gpu_test::PlanUsed used;
      CHECK(batch_error(long_rows.with_pages(page), gpu_test::Kernel::lane_tables, {.pages = true}, &used) < 1e-3);
      CHECK(used.splits > 1);
      CHECK(used.page_mode == "paged");  // value-rows mode has no round or pair pages
    }
    // The long case with keys before RoPE (LLaMA-3's RoPE), rotated by the grouped-rows kernel.
    const RopeConfig llama = gpu_test::llama3_rope();
    for (gpu_test::DeviceCodes codes : storages) {
      CAPTURE(codes.pages);
      CHECK(batch_error(long_case.with_rope(llama), gpu_test::Kernel::grouped_rows, codes) < 1e-3);
    }
    // Near-uniform attention over many tokens at 2c8b: the output is close to the codebook mean,
    // where the value-rows mode's half precision shows first. Its products of weights and centroids
    // in half carry an error bounded by the unit roundoff times sum_i w_i |v_i|, which is larger than
    // |sum_i w_i v_i| the more the centroids cancel; so the error is measured against that sum (the
    // oracle over the same keys with |centroids| as values), the forward bound of a half-precision
    // weighted sum, and reported against the output's own norm too.
    const auto [e_out, e_abs] = half_sum_error(test::AttentionCase::of(128, 2, 8, 0, 0, 1, {70000}).with_seed(998));
    MESSAGE("70000 tokens, 2c8b, lane-tables kernel: error / ||out|| ", e_out, ", error / ||sum w |v| || ", e_abs);
    // The kernel adds the rounding's mean back (prologue.cuh), so what is left is well under one
    // half-precision unit roundoff (2^-11): an eighth of it is the bound.
    CHECK(e_abs < 0x1p-14);
  }
}

TEST_CASE("cuda fused attention: split lengths fixed by the caller, in and out of step with round and pair pages") {
  require_device();
  // Split lengths fixed by the caller (set_max_split_tokens: a power of two) or the plan's own (0),
  // in pages of 32, 64 and 256. The plan spreads the 624 blocks of 32 coded tokens evenly over
  // ceil(coded / cap) splits: cap 512 -> 39 splits of 16 blocks, a multiple of a warp's round (4
  // blocks at 8c8b, 2 at 4c8b), so pages of a round or more take the round-pages instantiation
  // and, at 8c8b, pages of half a round the pair-pages one; 2048 -> 10 splits of 63 blocks and
  // 4096 -> 5 of 125: odd, the per-block paged path. The plan's own splits are a multiple of a
  // round. One case and oracle per page size, the caps on the same codes; the test also asserts
  // which instantiation the plan picked, so a plan that stopped picking one would show here.
  for (std::size_t C : {8u, 4u})
    for (std::size_t page : {32u, 64u, 256u}) {
      const test::AttentionCase c =
          test::AttentionCase::of(128, C, 8, 32, 4, 4, {20000, 3000}).with_seed(995).with_pages(page);
      const auto cc = test::build_case<float>(c);
      const auto g = gpu_case(c, cc);
      const std::vector<double> ref = batch_oracle(c, cc);
      const std::size_t round_tokens = C == 8 ? 128 : 64;
      for (int cap : {0, 512, 2048, 4096}) {
        CAPTURE(C);
        CAPTURE(page);
        CAPTURE(cap);
        gpu_test::PlanUsed used;
        const std::vector<float> got =
            gpu_attention(c, g, gpu_test::Kernel::lane_tables, {.pages = true, .max_split_tokens = cap}, &used);
        REQUIRE(got.size() == ref.size());
        CHECK(test::relative_error(got.data(), ref) < 1e-3);
        if (cap) CHECK(used.splits == (cap == 512 ? 39 : cap == 2048 ? 10 : 5));
        const bool in_step = cap == 0 || cap == 512;
        const char* mode = !in_step || page < 64 ? "paged" : page >= round_tokens ? "round_pages" : "pair_pages";
        CHECK(used.page_mode == mode);
      }
    }
}

TEST_CASE("cuda fused attention: code buffers, code pools and centroid tables off 16-byte alignment match the oracle") {
  // Engines may hand over codes and codebooks at any 4-byte-aligned address; the kernels then take
  // their 4-byte-load paths (codes) and scalar centroid rows (tables and product).
  require_device();
  for (const auto& [D, C] : {std::pair<std::size_t, std::size_t>{128, 8}, {128, 4}, {128, 2}, {64, 1}})
    for (gpu_test::Kernel kernel : all_kernels) {
      const test::AttentionCase c = test::AttentionCase::of(D, C, 8, 32, 4, 4, {1 + C, 300, 2500}).with_seed(77 + C);
      if (!gpu_test::kernel_serves(kernel, gpu_case(c, test::build_case<float>(c)).batch)) continue;
      CAPTURE(D);
      CAPTURE(C);
      CAPTURE(int(kernel));
      CHECK(batch_error(c, kernel, {.pages = false, .misaligned = true}) < 1e-3);
      CHECK(batch_error(c, kernel, {.pages = true, .misaligned = true}) < 1e-3);
    }
}

TEST_CASE("cuda fused attention: pages of a size the kernels cannot address are refused") {
  // Page addresses are a shift and a mask (params.cuh): pages must be a power of two of tokens
  // from 32 on; a batch claiming 96 or 16 is refused before anything launches.
  require_device();
  const test::AttentionCase c = test::AttentionCase::of(128, 8, 8, 0, 0, 1, {500}).with_seed(5).with_pages(64);
  const auto cc = test::build_case<float>(c);
  const auto g = gpu_case(c, cc);
  for (int claimed : {96, 16, -64})
    for (gpu_test::Kernel kernel : all_kernels) {
      if (!gpu_test::kernel_serves(kernel, g.batch)) continue;
      CAPTURE(claimed);
      CAPTURE(int(kernel));
      CHECK_THROWS_WITH_AS(gpu_attention(c, g, kernel, {.pages = true, .claimed_page_tokens = claimed}),
                           doctest::Contains("page_tokens"), cq::Error);
    }
}

TEST_CASE("cuda fused attention: value codebooks far outside half precision's range match the oracle") {
  // The 2c8b value-rows mode keeps centroids as half pairs, scaled per group by a power of two:
  // values near 1e6 would overflow half (65504) and values near 1e-6 would fall into its
  // subnormals (steps of 6e-8) without that scale.
  require_device();
  for (float value_scale : {1e6f, 1e-6f})
    for (std::size_t C : {2u, 8u}) {
      CAPTURE(value_scale);
      CAPTURE(C);
      test::AttentionCase c = test::AttentionCase::of(128, C, 8, 32, 4, 4, {37, 300, 2500}).with_seed(55 + C);
      c.value_scale = value_scale;
      CHECK(batch_error(c, gpu_test::Kernel::lane_tables) < 1e-3);
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
    for (gpu_test::Kernel kernel : both_kernels) {
      const std::size_t D = 128, n = 40000;
      const Codebook kcb = test::random_codebook(D, C, 8, 11), vcb = test::random_codebook(D, C, 8, 12);
      const std::vector<std::uint8_t> codes(packed_code_bytes(n, D / C, 8), 0);
      const std::vector<float> sink_key = test::random_normal(D, 13), sink_value = test::random_normal(D, 14);
      const double scale = 1.0 / std::sqrt(double(D));
      double sink_dot = 0.0, coded_dot = 0.0;  // k . k and k . centroid(code 0)
      for (std::size_t d = 0; d < D; ++d) {
        sink_dot += double(sink_key[d]) * sink_key[d];
        coded_dot += double(sink_key[d]) * kcb.centroid(d / C, 0, d % C);
      }
      REQUIRE(sink_dot > coded_dot);
      const double lambda = 13.4 / (scale * (sink_dot - coded_dot));
      std::vector<float> q(D);
      for (std::size_t d = 0; d < D; ++d) q[d] = float(lambda * sink_key[d]);
      double s_sink = 0.0, s_coded = 0.0;  // the scores of the float query, in double
      for (std::size_t d = 0; d < D; ++d) {
        s_sink += scale * double(q[d]) * sink_key[d];
        s_coded += scale * double(q[d]) * kcb.centroid(d / C, 0, d % C);
      }
      const double w = double(n) * std::exp(s_coded - s_sink);  // the coded tokens' total weight
      std::vector<double> expected(D);
      for (std::size_t d = 0; d < D; ++d)
        expected[d] = (sink_value[d] + w * vcb.centroid(d / C, 0, d % C)) / (1.0 + w);
      constexpr int batch = 8, q_heads = 32;
      gpu_test::HostBatch hb;
      hb.q_heads = q_heads;
      hb.views.assign(batch, zero_code_view(kcb, vcb, codes, n, &sink_key, &sink_value));
      hb.lengths.assign(batch, n + 1);
      std::vector<float> qs;
      std::vector<double> all_expected;
      for (int i = 0; i < batch * q_heads; ++i) {
        qs.insert(qs.end(), q.begin(), q.end());
        all_expected.insert(all_expected.end(), expected.begin(), expected.end());
      }
      const std::vector<float> got = gpu_test::attention(hb, qs, float(scale), kernel);
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
  for (gpu_test::Kernel kernel : both_kernels)
    for (std::size_t C : {8u, 4u}) {
      const std::size_t D = 128, n = 40000;
      const Codebook kcb = test::random_codebook(D, C, 8, 1), vcb = test::random_codebook(D, C, 8, 2);
      const std::vector<std::uint8_t> codes(packed_code_bytes(n, D / C, 8), 0);
      gpu_test::HostBatch hb;
      hb.q_heads = 1;
      hb.views = {zero_code_view(kcb, vcb, codes, n, nullptr, nullptr)};
      hb.lengths = {n};
      const auto q = test::random_normal(D, 3);
      const std::vector<float> got = gpu_test::attention(hb, q, 0.0f, kernel);
      for (std::size_t d = 0; d < D; ++d) {
        CAPTURE(d);
        CAPTURE(int(kernel));
        CHECK(got[d] == doctest::Approx(vcb.centroid(d / C, 0, d % C)).epsilon(1e-5));
      }
    }
}

namespace {

// Rounds x to the nearest value of dtype t (what the GPU reads of a query of that dtype).
std::vector<float> rounded(std::vector<float> x, DType t) {
  for (float& v : x) v = t == DType::f16 ? float(half(v)) : t == DType::bf16 ? float(bfloat16(v)) : v;
  return x;
}

// log sum_p exp(scale q . k_p) over every position p < n of sequence s, head h, with the keys as
// attention sees them (PagedKVCache::read_token), in double: the reference log-sum-exp (of the
// soft-capped logits when soft_cap > 0).
template <class T>
double reference_lse(const PagedKVCache<T>& cache, SeqId s, std::size_t h, const float* q, std::size_t D, float scale,
                     float soft_cap) {
  const std::size_t n = cache.length(s);
  std::vector<float> k(D), v(D);
  std::vector<double> sc(n);
  double m = -std::numeric_limits<double>::infinity();
  for (std::size_t p = 0; p < n; ++p) {
    cache.read_token(0, s, h, p, k.data(), v.data());
    double dot = 0.0;
    for (std::size_t d = 0; d < D; ++d) dot += double(q[d]) * k[d];
    sc[p] = scale * dot;
    if (soft_cap > 0.0f) sc[p] = soft_cap * std::tanh(sc[p] / soft_cap);
    m = std::max(m, sc[p]);
  }
  double sum = 0.0;
  for (double x : sc) sum += std::exp(x - m);
  return m + std::log(sum);
}

// One precision setting over a sample of the shared cases in a cache of element type T: rows in
// the cache's own full-precision pages, codes in its code pages, q in dtype qt; outputs in float
// within 1e-3 of the oracle (the cache's rows and the rounded q), the log-sum-exp within 1e-3 of
// the reference, and outputs in dtype ot equal to the float outputs rounded (to one unit of ot).
template <class T>
void check_precision(DType qt, DType ot, std::size_t every, double& worst, double& worst_lse, std::size_t& runs) {
  for (const test::AttentionCase& c : test::attention_cases(every)) {
    if (c.rope || c.queries > 1) continue;
    auto cc = test::build_case<T>(c);
    cc.q = rounded(cc.q, qt);
    const auto g = gpu_case(c, cc);
    const float scale = 1.0f / std::sqrt(float(c.D));
    const Scoring scoring{scale, c.soft_cap};
    for (gpu_test::Kernel kernel : all_kernels) {
      if (!gpu_test::kernel_serves(kernel, g.batch)) continue;
      CAPTURE(c.name());
      CAPTURE(int(kernel));
      CAPTURE(dtype_name(qt));
      CAPTURE(dtype_name(ot));
      const gpu_test::DeviceCodes how{.pages = true, .full_pages = true};
      std::vector<float> lse;
      const std::vector<float> out = gpu_test::attention(g.batch, g.q, scoring, kernel, how, nullptr, {qt, DType::f32, &lse});
      worst = std::max(worst, test::check_against_oracle(c, cc, out, 1e-3));
      // Log-sum-exp: GPU rows are the sequences with a query, in order.
      std::size_t row = 0;
      for (std::size_t i = 0; i < cc.seqs.size(); ++i) {
        if (cc.indptr[i + 1] == cc.indptr[i]) continue;
        for (std::size_t hq = 0; hq < cc.q_heads; ++hq) {
          const double ref = reference_lse(*cc.cache, cc.seqs[i], hq / c.group, g.q.data() + (row * cc.q_heads + hq) * c.D,
                                           c.D, scale, c.soft_cap);
          const double e = std::fabs(double(lse[row * cc.q_heads + hq]) - ref);
          CHECK(e < 1e-3);
          worst_lse = std::max(worst_lse, e);
        }
        ++row;
      }
      if (ot != DType::f32) {
        const std::vector<float> low = gpu_test::attention(g.batch, g.q, scoring, kernel, how, nullptr, {qt, ot, nullptr});
        const float unit = ot == DType::f16 ? 0x1p-10f : 0x1p-7f;  // one unit in the last place, relative
        std::size_t off = 0;
        for (std::size_t i = 0; i < out.size(); ++i)
          if (!(std::fabs(low[i] - out[i]) <= unit * std::fabs(out[i]) + 1e-7f)) ++off;
        CHECK(off == 0);
      }
      ++runs;
    }
  }
}

// A decode step's full-precision rows written on the device into a copy of the CPU cache's pool
// whose held rows were overwritten first: the CPU's pool again, byte for byte.
template <class T>
void check_full_rows_write(std::uint64_t seed, bool heads_outer) {
  const test::AttentionCase c = test::AttentionCase::of(128, 8, 8, 32, 4, 4, {300, 45, 1}).with_seed(seed);
  const auto cc = test::build_case<T>(c);
  const std::size_t H = c.kv_heads, D = c.D;
  const KVHeadView<T> v0 = cc.cache->head_view(0, cc.seqs[0], 0);
  const std::size_t F = v0.recent_keys.page_rows;
  const FullPageLayout layout{F, H, D, sizeof(T)};
  REQUIRE(layout.page_elements() == v0.recent_keys.page_stride);
  const auto* base = reinterpret_cast<const std::uint8_t*>(v0.recent_keys.pool);
  const std::vector<std::uint8_t> cpu(base, base + cc.cache->memory().full);
  std::vector<std::int64_t> slots;
  std::vector<std::vector<T>> rows_k, rows_v;  // [row][H * D], gathered from the views
  for (SeqId s : cc.seqs) {
    const KVHeadView<T> v = cc.cache->head_view(0, s, 0);
    auto add = [&](const PagedRowsView<T>& kv, bool sink, std::size_t pos) {
      const std::size_t i = pos - kv.first;
      slots.push_back(std::int64_t(kv.pages[i / F]) * std::int64_t(F) + std::int64_t(i % F));
      std::vector<T> k(H * D), x(H * D);
      for (std::size_t h = 0; h < H; ++h) {
        const KVHeadView<T> w = cc.cache->head_view(0, s, h);
        std::copy_n((sink ? w.sink_keys : w.recent_keys).at(pos), D, k.begin() + std::ptrdiff_t(h * D));
        std::copy_n((sink ? w.sink_values : w.recent_values).at(pos), D, x.begin() + std::ptrdiff_t(h * D));
      }
      rows_k.push_back(std::move(k));
      rows_v.push_back(std::move(x));
    };
    for (std::size_t p = 0; p < v.sink_keys.rows; ++p) add(v.sink_keys, true, p);
    for (std::size_t p = v.recent_keys.first; p < v.recent_keys.first + v.recent_keys.rows; ++p)
      add(v.recent_keys, false, p);
  }
  const std::size_t held = slots.size(), pages = cpu.size() / layout.page_bytes();
  for (std::int64_t extra : {std::int64_t(-1), std::int64_t(pages * F)}) {  // padding, past the pool
    slots.push_back(extra);
    rows_k.push_back(std::vector<T>(H * D, T(7.0f)));
    rows_v.push_back(std::vector<T>(H * D, T(7.0f)));
  }
  std::vector<const T*> kin, vin;
  for (std::size_t r = 0; r < slots.size(); ++r) kin.push_back(rows_k[r].data()), vin.push_back(rows_v[r].data());
  std::vector<T> kb, vb;
  const gpu_test::PagedEncodeInput in = slot_rows(kin, vin, H, D, heads_outer, slots, kb, vb);
  std::vector<std::uint8_t> start = cpu;  // every held row overwritten
  for (std::size_t r = 0; r < held; ++r)
    for (std::size_t h = 0; h < H; ++h)
      for (std::size_t off : {layout.key_offset(h), layout.value_offset(h)}) {
        const std::size_t page = std::size_t(slots[r]) / F, row = std::size_t(slots[r]) % F;
        std::memset(start.data() + (page * layout.page_elements() + off + row * D) * sizeof(T), 0x5A, D * sizeof(T));
      }
  REQUIRE(start != cpu);
  CHECK(gpu_test::write_full_rows(start, layout, in) == cpu);
}

}  // namespace

TEST_CASE("cuda write_full_rows: the CPU cache's full-precision pool, byte for byte, fp32, fp16 and bf16") {
  require_device();
  for (bool heads_outer : {false, true}) {
    check_full_rows_write<float>(401, heads_outer);
    check_full_rows_write<half>(402, heads_outer);
    check_full_rows_write<bfloat16>(403, heads_outer);
  }
}

TEST_CASE("cuda fused attention on the CPU cache's own pages: rows in fp16/bf16/fp32 pages, queries and outputs in the model's dtype, log-sum-exp") {
  require_device();
  double worst = 0.0, worst_lse = 0.0;
  std::size_t runs = 0;
  const std::size_t every = quick() ? 24 : 4;
  check_precision<half>(DType::f16, DType::f16, every, worst, worst_lse, runs);
  check_precision<bfloat16>(DType::bf16, DType::bf16, every, worst, worst_lse, runs);
  check_precision<float>(DType::f16, DType::f16, every, worst, worst_lse, runs);
  check_precision<half>(DType::bf16, DType::f32, every * 3, worst, worst_lse, runs);
  check_precision<float>(DType::f32, DType::bf16, every * 3, worst, worst_lse, runs);
  MESSAGE(runs, " case x kernel x precision runs on the cache's pages; largest relative error ", worst,
          ", largest log-sum-exp error ", worst_lse);
  CHECK(runs > 0);
}

TEST_CASE("cuda decode step (append + attention) captured in a CUDA graph: 100 replays equal the eager run") {
  require_device();
  for (gpu_test::Kernel kernel : {gpu_test::Kernel::automatic, gpu_test::Kernel::general}) {
    // A sink-only sequence (its newest row is a sink: no code), short and long ones, GQA 4.
    const test::AttentionCase c = test::AttentionCase::of(128, 8, 8, 32, 4, 4, {300, 45, 2, 2100}).with_seed(77);
    const auto cc = test::build_case<half>(c);
    const auto g = gpu_case(c, cc);
    const std::size_t H = c.kv_heads, D = c.D, S = c.sinks;
    std::vector<half> keys, values;
    std::vector<std::int64_t> code_slots, full_slots;
    for (SeqId s : cc.seqs) {  // each sequence's newest row, from where the cache holds it
      const std::size_t p = cc.cache->length(s) - 1;
      for (std::size_t h = 0; h < H; ++h) {
        const KVHeadView<half> v = cc.cache->head_view(0, s, h);
        const bool sink = p < S;
        const half* k = sink ? v.sink_keys.at(p) : v.recent_keys.at(p);
        const half* x = sink ? v.sink_values.at(p) : v.recent_values.at(p);
        keys.insert(keys.end(), k, k + D);
        values.insert(values.end(), x, x + D);
        if (h > 0) continue;
        const PagedRowsView<half>& r = sink ? v.sink_keys : v.recent_keys;
        const std::size_t i = p - r.first, F = r.page_rows, P = v.key_codes.page_tokens;
        full_slots.push_back(std::int64_t(r.pages[i / F]) * std::int64_t(F) + std::int64_t(i % F));
        code_slots.push_back(sink ? -1 : std::int64_t(v.key_codes.pages[(p - S) / P]) * std::int64_t(P) + std::int64_t((p - S) % P));
      }
    }
    const gpu_test::GraphStep step = gpu_test::append_attend_graph(g.batch, g.q, 1.0f / std::sqrt(float(D)), kernel, keys,
                                                                   values, code_slots, full_slots, 100);
    CAPTURE(int(kernel));
    test::check_against_oracle(c, cc, step.out, 1e-3);
    CHECK(step.differing_replays == 0);
  }
}

TEST_CASE("cuda batched k-means: MSE matches the CPU fit, objective never increases") {
  require_device();
  const bool small = quick();  // smaller under compute-sanitizer
  const int jobs = small ? 1 : 3, n = small ? 600 : 4000, dim = 32, C = 4, bits = small ? 4 : 6, iters = small ? 4 : 20;
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
