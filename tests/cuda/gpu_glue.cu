// cq's host headers (KVHeadView) bring Eigen's element types, whose defaulted __host__ __device__
// members nvcc warns about (harmless; Eigen's code, not used on the device here).
#pragma nv_diag_suppress 20012
#include "gpu_glue.hpp"

#include <cq/attention/problem.hpp>
// The umbrella, as in cache_glue.cu: two units of one program that include every CUDA header, so
// the build fails to link if a header defines a kernel or function that is not a template or inline
// (cuda.cuh says why).
#include <cq/cuda/cuda.cuh>
#pragma nv_diag_default 20012

#include <algorithm>
#include <cstring>
#include <iterator>
#include <utility>

namespace cq::gpu_test {

std::string device_name() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return {};
  }
  cudaDeviceProp prop{};
  CQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  return prop.name;
}

void encode(const Codebook& cb, const std::vector<float>& x, std::size_t rows, std::vector<std::uint8_t>& codes,
            std::size_t tokens, std::size_t first) {
  cuda::DeviceCodebook dcb(cb);
  cuda::DeviceBuffer<float> dx(x);
  cuda::DeviceBuffer<std::uint8_t> dc(codes);
  cuda::encode(dcb.view(), dx.data(), rows, cb.dim(), dc.data(), tokens, first);
  codes = dc.to_host();
}

std::vector<float> decode(const Codebook& cb, const std::vector<std::uint8_t>& codes, std::size_t tokens,
                          std::size_t first, std::size_t rows) {
  cuda::DeviceCodebook dcb(cb);
  cuda::DeviceBuffer<std::uint8_t> dc(codes);
  cuda::DeviceBuffer<float> out(rows * cb.dim());
  cuda::decode(dcb.view(), dc.data(), tokens, first, rows, out.data(), cb.dim());
  return out.to_host();
}

namespace {

/// The rows and slots of a PagedEncodeInput on the device (T: float, __half or __nv_bfloat16).
template <class T>
struct DeviceRows {
  cuda::DeviceBuffer<T> keys, values;
  cuda::DeviceBuffer<std::int64_t> slots;
  cuda::SlotRows<T> view;
  explicit DeviceRows(const PagedEncodeInput& in)
      : keys(static_cast<const T*>(in.keys), in.elements), values(static_cast<const T*>(in.values), in.elements),
        slots(in.slots), view{keys.data(), values.data(), in.rows, in.row_stride, in.head_stride, slots.data()} {}
};

/// f.template operator()<T>() for the input's element type.
template <class F>
std::vector<std::uint8_t> with_element(const PagedEncodeInput& in, F&& f) {
  if (in.element_bytes == 4) return f.template operator()<float>();
  CQ_CHECK(in.element_bytes == 2, "gpu_test: elements of ", in.element_bytes, " bytes");
  return in.bf16 ? f.template operator()<__nv_bfloat16>() : f.template operator()<__half>();
}

}  // namespace

std::vector<std::uint8_t> encode_into_pages(const std::vector<std::uint8_t>& pool, const CodePageLayout& layout,
                                            const PagedEncodeInput& in) {
  return with_element(in, [&]<class T>() {
    const std::size_t H = in.key_codebooks.size();
    CQ_CHECK(H == layout.kv_heads && in.value_codebooks.size() == H && H > 0, "gpu_test: codebooks for ", H,
             " heads, layout of ", layout.kv_heads);
    std::vector<cuda::DeviceCodebook> dcb;
    std::vector<cuda::DeviceCodebookView> kv, vv;
    for (std::size_t h = 0; h < H; ++h) {
      dcb.emplace_back(*in.key_codebooks[h]);
      kv.push_back(dcb.back().view());
      dcb.emplace_back(*in.value_codebooks[h]);
      vv.push_back(dcb.back().view());
    }
    cuda::DeviceBuffer<cuda::DeviceCodebookView> dkv(kv), dvv(vv);
    DeviceRows<T> rows(in);
    cuda::DeviceBuffer<std::uint8_t> dpool(pool);
    cuda::PagedEncode<T> p;
    static_cast<cuda::SlotRows<T>&>(p) = rows.view;
    p.key_codebooks = dkv.data();
    p.value_codebooks = dvv.data();
    p.head_dim = int(in.key_codebooks[0]->dim());
    p.key_channels = int(in.key_codebooks[0]->channels());
    p.key_bits = in.key_codebooks[0]->bits();
    p.value_channels = int(in.value_codebooks[0]->channels());
    p.value_bits = in.value_codebooks[0]->bits();
    p.pool = dpool.data();
    p.layout = layout;
    p.pages = pool.size() / layout.page_bytes();
    cuda::encode_into_pages(p);
    return dpool.to_host();
  });
}

std::vector<std::uint8_t> write_full_rows(const std::vector<std::uint8_t>& pool, const FullPageLayout& layout,
                                          const PagedEncodeInput& in) {
  return with_element(in, [&]<class T>() {
    DeviceRows<T> rows(in);
    cuda::DeviceBuffer<std::uint8_t> dpool(pool);
    cuda::PagedRowWrite<T> p;
    static_cast<cuda::SlotRows<T>&>(p) = rows.view;
    p.pool = reinterpret_cast<T*>(dpool.data());
    p.layout = layout;
    p.pages = pool.size() / layout.page_bytes();
    cuda::write_full_rows(p);
    return dpool.to_host();
  });
}

namespace {

/// Everything an AttentionBatch built from host head views points to, in device memory.
struct DeviceBatch {
  std::vector<cuda::DeviceCodebook> key_codebooks, value_codebooks;
  std::vector<cuda::DeviceBuffer<float>> shifted_centroids;  // misaligned copies
  cuda::DeviceBuffer<cuda::DeviceCodebookView> key_views, value_views;
  std::vector<cuda::DeviceBuffer<std::uint8_t>> code_buffers;  // contiguous codes, or the code pools
  cuda::DeviceBuffer<std::uint32_t> page_tables;
  std::vector<cuda::DeviceBuffer<float>> full_rows;
  cuda::DeviceBuffer<std::uint8_t> full_pool;       // full_pages: the cache's full-precision pool
  cuda::DeviceBuffer<std::uint32_t> full_tables;    // full_pages: sink and recent page tables
  cuda::DeviceBuffer<cuda::DeviceKVCodes> codes;
  cuda::DeviceBuffer<cuda::DeviceSequence> sequences;
  cuda::DeviceBuffer<cuda::DeviceRope> rope;        // keys before RoPE: the views' RoPE
  cuda::AttentionBatch batch;  // q and out left for the caller
  cuda::AttentionShape shape;
};

/// What the last token of each sequence reads, checked against its views.
template <class T>
std::vector<VisibleTokens> visible_parts(const HostBatchOf<T>& hb) {
  CQ_CHECK(!hb.lengths.empty() && !hb.views.empty() && hb.views.size() % hb.lengths.size() == 0,
           "gpu_test: ", hb.views.size(), " head views for ", hb.lengths.size(), " sequences");
  const std::size_t H = hb.views.size() / hb.lengths.size();
  std::vector<VisibleTokens> vis;
  for (std::size_t s = 0; s < hb.lengths.size(); ++s) {
    CQ_CHECK(hb.lengths[s] >= 1, "gpu_test: sequence ", s, " is empty (no last token to attend from)");
    for (std::size_t h = 0; h < H; ++h) {
      const KVHeadView<T>& v = hb.views[s * H + h];
      cq::detail::check_head_view(v, "gpu_test");
      CQ_CHECK(v.rope == hb.views[0].rope, "gpu_test: the views of one batch must share one RoPE (or none)");
      CQ_CHECK(v.key_codebook.centroids == hb.views[h].key_codebook.centroids &&
                   v.value_codebook.centroids == hb.views[h].value_codebook.centroids,
               "gpu_test: the sequences of KV head ", h, " do not share its codebooks");
      const VisibleTokens t = cq::detail::check_visible(v, hb.lengths[s] - 1, "gpu_test");
      if (h == 0) vis.push_back(t);
    }
  }
  return vis;
}

template <class T>
cuda::AttentionShape shape_of(const HostBatchOf<T>& hb, const std::vector<VisibleTokens>& vis) {
  const KVHeadView<T>& v = hb.views[0];
  cuda::AttentionShape s;
  s.batch = int(hb.lengths.size());
  s.q_heads = hb.q_heads;
  s.kv_heads = int(hb.views.size() / hb.lengths.size());
  s.head_dim = int(v.head_dim);
  s.key_channels = int(v.key_codebook.channels);
  s.key_bits = v.key_codebook.bits;
  s.value_channels = int(v.value_codebook.channels);
  s.value_bits = v.value_codebook.bits;
  if (v.rope) s.rope_dim = int(v.rope->rotary_dim()), s.rope_style = v.rope->config().style;
  for (const VisibleTokens& t : vis) {
    s.max_coded = std::max(s.max_coded, int(t.coded()));
    s.max_full = std::max(s.max_full, int(t.full()));
  }
  return s;
}

/// The one way the tests build a device batch: the codebooks of each KV head; per sequence and
/// head the codes its last token reads, copied page by page into a contiguous buffer (the packed
/// layout of a page is that of its tokens) or, with `pages`, read in the CPU cache's pool (copied
/// to the device as it is) through the sequence's page table; and its sinks and window as
/// [kv_head][full][D] float rows or, with `full_pages`, read in the CPU cache's full-precision pool
/// (copied to the device as it is) through the sequence's sink and recent page tables.
template <class T>
DeviceBatch device_batch(const HostBatchOf<T>& hb, gpu_test::DeviceCodes how) {
  const bool misaligned = how.misaligned;
  const std::vector<VisibleTokens> vis = visible_parts(hb);
  DeviceBatch d;
  d.shape = shape_of(hb, vis);
  const std::size_t B = hb.lengths.size(), H = std::size_t(d.shape.kv_heads), D = std::size_t(d.shape.head_dim);
  std::vector<cuda::DeviceCodebookView> key_views, value_views;
  for (std::size_t h = 0; h < H; ++h) {
    d.key_codebooks.emplace_back(hb.views[h].key_codebook);
    d.value_codebooks.emplace_back(hb.views[h].value_codebook);
    key_views.push_back(d.key_codebooks.back().view());
    value_views.push_back(d.value_codebooks.back().view());
  }
  if (misaligned)  // centroid tables one float past the allocation's start
    for (std::size_t h = 0; h < H; ++h)
      for (auto [cb, view] : {std::pair{&hb.views[h].key_codebook, &key_views[h]},
                              std::pair{&hb.views[h].value_codebook, &value_views[h]}}) {
        const std::size_t n = cb->groups * cb->num_centroids() * cb->channels;
        d.shifted_centroids.emplace_back(n + 1);
        d.shifted_centroids.back().upload(cb->centroids, n, nullptr, 1);
        view->centroids = d.shifted_centroids.back().data() + 1;
      }
  d.key_views = cuda::DeviceBuffer<cuda::DeviceCodebookView>(key_views);
  d.value_views = cuda::DeviceBuffer<cuda::DeviceCodebookView>(value_views);

  const std::size_t shift = misaligned ? 4 : 0;  // code buffers 4 bytes past the allocation's start
  auto device_codes = [&](const PagedCodesView& c, std::size_t coded) {
    cuda::DeviceBuffer<std::uint8_t> buf(packed_code_bytes(coded, c.groups, c.bits) + shift);
    for (std::size_t i = 0; i * c.page_tokens < coded; ++i) {
      const std::size_t first = i * c.page_tokens, n = std::min(c.page_tokens, coded - first);
      buf.upload(c.page(i).data, packed_code_bytes(n, c.groups, c.bits), nullptr,
                 shift + packed_code_bytes(first, c.groups, c.bits));
    }
    return buf;
  };
  // Pages: each pool the views read, copied up to the end of the last run they read, and the
  // sequences' page tables (keys and values share one, as in PagedKVCache).
  std::vector<const std::uint8_t*> pools;
  std::vector<std::size_t> table_at;  // [sequence x kv_head]: the view's page table in page_tables
  if (how.pages) {
    std::vector<std::size_t> pool_bytes;
    std::vector<std::uint32_t> tables;
    for (std::size_t i = 0; i < hb.views.size(); ++i) {
      const KVHeadView<T>& v = hb.views[i];
      CQ_CHECK(v.key_codes.pool == v.value_codes.pool && v.key_codes.pages == v.value_codes.pages &&
                   v.key_codes.page_bytes == v.value_codes.page_bytes && v.key_codes.page_tokens == v.value_codes.page_tokens,
               "gpu_test: keys and values of a head view must share the pool and page table");
      const std::size_t k = std::size_t(std::find(pools.begin(), pools.end(), v.key_codes.pool) - pools.begin());
      if (k == pools.size()) pools.push_back(v.key_codes.pool), pool_bytes.push_back(0);
      table_at.push_back(tables.size());
      for (const PagedCodesView* c : {&v.key_codes, &v.value_codes})
        for (std::size_t pg = 0; pg < c->num_pages(); ++pg) {
          const ConstPackedCodesView run = c->page(pg);
          const std::size_t end = std::size_t(run.data - c->pool) + packed_code_bytes(c->page_tokens, c->groups, c->bits);
          pool_bytes[k] = std::max(pool_bytes[k], end);
        }
      tables.insert(tables.end(), v.key_codes.pages, v.key_codes.pages + v.key_codes.num_pages());
    }
    for (std::size_t k = 0; k < pools.size(); ++k) {
      d.code_buffers.emplace_back(pool_bytes[k] + shift);
      d.code_buffers.back().upload(pools[k], pool_bytes[k], nullptr, shift);
    }
    tables.push_back(0);  // never empty
    d.page_tables = cuda::DeviceBuffer<std::uint32_t>(tables);
  }
  // Full-precision pages: the one pool every view reads, copied up to its last page used, and
  // each sequence's sink and recent tables (KV heads share them, as in PagedKVCache).
  std::vector<std::size_t> sink_at, recent_at;  // [sequence]: offsets in full_tables
  if (how.full_pages) {
    const PagedRowsView<T>& r0 = hb.views[0].recent_keys;
    const std::size_t F = r0.page_rows, stride = r0.page_stride;
    std::vector<std::uint32_t> tables;
    std::uint32_t last_page = 0;
    for (std::size_t s = 0; s < B; ++s) {
      const KVHeadView<T>& v = hb.views[s * H];
      for (std::size_t h = 0; h < H; ++h) {
        const KVHeadView<T>& w = hb.views[s * H + h];
        for (const PagedRowsView<T>* r : {&w.sink_keys, &w.sink_values, &w.recent_keys, &w.recent_values})
          CQ_CHECK(r->pool == r0.pool && r->page_rows == F && r->page_stride == stride && r->row_stride == D,
                   "gpu_test: the views' rows are not in one full-precision pool");
        CQ_CHECK(w.sink_keys.offset == h * 2 * F * D && w.sink_values.offset == (h * 2 + 1) * F * D &&
                     w.recent_keys.offset == h * 2 * F * D && w.recent_values.offset == (h * 2 + 1) * F * D,
                 "gpu_test: KV head ", h, "'s rows are not where FullPageLayout puts them");
      }
      for (const PagedRowsView<T>* r : {&v.sink_keys, &v.recent_keys}) {
        (r == &v.sink_keys ? sink_at : recent_at).push_back(tables.size());
        const std::size_t n = (r->rows + F - 1) / F;
        for (std::size_t i = 0; i < n; ++i) last_page = std::max(last_page, r->pages[i]);
        tables.insert(tables.end(), r->pages, r->pages + n);
      }
    }
    tables.push_back(0);  // never empty
    d.full_tables = cuda::DeviceBuffer<std::uint32_t>(tables);
    const std::size_t bytes = (std::size_t(last_page) + 1) * stride * sizeof(T);
    d.full_pool = cuda::DeviceBuffer<std::uint8_t>(bytes);
    d.full_pool.upload(reinterpret_cast<const std::uint8_t*>(r0.pool), bytes);
    d.batch.full_pages = {d.full_pool.data(), dtype_of<T>, std::uint32_t(F), stride * sizeof(T)};
  }
  std::vector<cuda::DeviceKVCodes> codes;
  std::vector<cuda::DeviceSequence> sequences;
  for (std::size_t s = 0; s < B; ++s) {
    const VisibleTokens& t = vis[s];
    const std::size_t full = t.full();
    std::vector<float> keys(H * full * D), values(H * full * D);  // [kv_head][full][D]
    for (std::size_t h = 0; h < H; ++h) {
      const KVHeadView<T>& v = hb.views[s * H + h];
      // Coded tokens are code indices 0 .. coded - 1 (position sinks + i).
      if (how.pages && !(how.mixed && s % 2 == 1)) {
        const std::size_t k = std::size_t(std::find(pools.begin(), pools.end(), v.key_codes.pool) - pools.begin());
        std::uint8_t* pool = d.code_buffers[k].data() + shift;
        cuda::DeviceKVCodes c;
        c.key_codes = pool + v.key_codes.offset;
        c.value_codes = pool + v.value_codes.offset;
        c.pages = d.page_tables.data() + table_at[s * H + h];
        CQ_CHECK(d.batch.page_tokens == 0 || d.batch.page_tokens == int(v.key_codes.page_tokens),
                 "gpu_test: a batch's pages must all hold the same number of tokens");
        d.batch.page_tokens = int(v.key_codes.page_tokens);
        c.page_bytes = v.key_codes.page_bytes;
        codes.push_back(c);
      } else {
        d.code_buffers.push_back(device_codes(v.key_codes, t.coded()));
        d.code_buffers.push_back(device_codes(v.value_codes, t.coded()));
        codes.push_back({d.code_buffers[d.code_buffers.size() - 2].data() + shift, d.code_buffers.back().data() + shift});
      }
      for (std::size_t j = 0; j < full && !how.full_pages; ++j) {  // the sinks, then the window
        const std::size_t pos = j < t.sink_end ? j : t.window_begin + (j - t.sink_end);
        const T* k = j < t.sink_end ? v.sink_keys.at(pos) : v.recent_keys.at(pos);
        const T* x = j < t.sink_end ? v.sink_values.at(pos) : v.recent_values.at(pos);
        for (std::size_t i = 0; i < D; ++i) {
          keys[(h * full + j) * D + i] = to_float(k[i]);
          values[(h * full + j) * D + i] = to_float(x[i]);
        }
      }
    }
    cuda::DeviceSequence seq{std::uint32_t(t.coded()), std::uint32_t(full)};
    seq.sinks = std::uint32_t(t.sink_end);  // where the window's rows start (positions of pre-RoPE keys)
    seq.position = hb.views[s * H].position_offset;
    if (how.full_pages) {
      const KVHeadView<T>& v = hb.views[s * H];
      seq.sink_pages = d.full_tables.data() + sink_at[s];
      seq.recent_pages = d.full_tables.data() + recent_at[s];
      seq.recent_row = std::uint32_t(t.window_begin - v.recent_keys.first);
    } else {
      d.full_rows.emplace_back(keys);
      d.full_rows.emplace_back(values);
      seq.full_keys = d.full_rows[d.full_rows.size() - 2].data();
      seq.full_values = d.full_rows.back().data();
    }
    sequences.push_back(seq);
  }
  d.codes = cuda::DeviceBuffer<cuda::DeviceKVCodes>(codes);
  d.sequences = cuda::DeviceBuffer<cuda::DeviceSequence>(sequences);
  cuda::AttentionBatch& b = d.batch;
  b.batch = d.shape.batch;
  b.q_heads = d.shape.q_heads;
  b.kv_heads = d.shape.kv_heads;
  b.head_dim = d.shape.head_dim;
  b.codes = d.codes.data();
  b.sequences = d.sequences.data();
  b.key_codebooks = d.key_views.data();
  b.value_codebooks = d.value_views.data();
  if (how.claimed_page_tokens) b.page_tokens = how.claimed_page_tokens;
  if (const Rope* r = hb.views[0].rope) {
    const cuda::DeviceRope host = cuda::make_device_rope(*r);
    d.rope = cuda::DeviceBuffer<cuda::DeviceRope>(&host, 1);
    b.rope = d.rope.data();
  }
  return d;
}

}  // namespace

template <class T>
bool kernel_serves(Kernel kernel, const HostBatchOf<T>& batch) {
  const cuda::AttentionShape shape = shape_of(batch, visible_parts(batch));
  const bool rope = shape.rope_dim > 0;  // keys before RoPE: only the grouped-rows kernel rotates
  if (kernel == Kernel::general) return !rope;
  const cuda::DeviceLimits dev = cuda::DeviceLimits::current();
  if (kernel == Kernel::automatic) return !rope || cuda::detail::grouped_rows_apply(shape, dev);
  return kernel == Kernel::lane_tables ? !rope && cuda::detail::lane_tables_apply(shape, dev)
                                       : cuda::detail::grouped_rows_apply(shape, dev);
}

namespace {

/// Host bytes of `x` as elements of `t` (f32, f16, bf16; rounded to nearest), and back.
std::vector<std::uint8_t> to_bytes(const std::vector<float>& x, DType t) {
  std::vector<std::uint8_t> b(x.size() * dtype_size(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (t == DType::f32) std::memcpy(b.data() + 4 * i, &x[i], 4);
    else {
      const std::uint16_t u = t == DType::f16 ? Eigen::numext::bit_cast<std::uint16_t>(half(x[i]))
                                              : Eigen::numext::bit_cast<std::uint16_t>(bfloat16(x[i]));
      std::memcpy(b.data() + 2 * i, &u, 2);
    }
  }
  return b;
}
std::vector<float> from_bytes(const std::vector<std::uint8_t>& b, DType t) {
  std::vector<float> x(b.size() / dtype_size(t));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (t == DType::f32) std::memcpy(&x[i], b.data() + 4 * i, 4);
    else {
      std::uint16_t u;
      std::memcpy(&u, b.data() + 2 * i, 2);
      x[i] = t == DType::f16 ? float(Eigen::numext::bit_cast<half>(u)) : float(Eigen::numext::bit_cast<bfloat16>(u));
    }
  }
  return x;
}

}  // namespace

template <class T>
std::vector<float> attention(const HostBatchOf<T>& hb, const std::vector<float>& q, Scoring scoring, Kernel kernel,
                             DeviceCodes codes, PlanUsed* used, Precision precision) {
  DeviceBatch d = device_batch(hb, codes);
  CQ_CHECK(q.size() == std::size_t(d.shape.batch) * d.shape.q_heads * d.shape.head_dim, "gpu_test: q has ", q.size(),
           " floats for ", d.shape.batch, " sequences of ", d.shape.q_heads, " heads of ", d.shape.head_dim);
  cuda::DeviceBuffer<std::uint8_t> dq(to_bytes(q, precision.q)), dout(q.size() * dtype_size(precision.out));
  cuda::DeviceBuffer<float> dlse(std::size_t(d.shape.batch) * d.shape.q_heads);
  d.batch.q = dq.data();
  d.batch.q_type = precision.q;
  d.batch.out = dout.data();
  d.batch.out_type = precision.out;
  d.batch.lse = precision.lse ? dlse.data() : nullptr;
  d.batch.scale = scoring.scale;
  d.batch.logits_soft_cap = scoring.soft_cap;
  cuda::FusedAttention fa;
  fa.set_kernel(kernel == Kernel::general        ? cuda::AttentionKernel::general
                : kernel == Kernel::lane_tables  ? cuda::AttentionKernel::lane_tables
                : kernel == Kernel::grouped_rows ? cuda::AttentionKernel::grouped_rows
                                                 : cuda::AttentionKernel::automatic);
  if (codes.max_split_tokens) fa.set_max_split_tokens(codes.max_split_tokens);
  const cuda::AttentionPlan plan = fa.plan(d.shape);
  fa.run(d.batch, plan);
  if (used) {
    used->splits = plan.splits;
    used->page_mode.clear();
    if (plan.kernel == cuda::AttentionKernel::lane_tables) {
      constexpr const char* names[] = {"contiguous", "paged", "round_pages", "pair_pages"};
      static_assert(std::size(names) == cuda::detail::page_modes);
      used->page_mode = names[int(plan.lane_tables.page_mode(d.batch))];
    }
  }
  if (precision.lse) *precision.lse = dlse.to_host();
  return from_bytes(dout.to_host(), precision.out);
}

template <class T>
GraphStep append_attend_graph(const HostBatchOf<T>& hb, const std::vector<float>& q, float scale, Kernel kernel,
                              const std::vector<T>& keys, const std::vector<T>& values,
                              const std::vector<std::int64_t>& code_slots, const std::vector<std::int64_t>& full_slots,
                              int replays) {
  using DT = cuda::device_element_t<T>;
  static_assert(sizeof(DT) == sizeof(T));
  DeviceBatch d = device_batch(hb, DeviceCodes{.pages = true, .full_pages = true});
  const std::size_t B = hb.lengths.size(), H = std::size_t(d.shape.kv_heads), D = std::size_t(d.shape.head_dim);
  CQ_CHECK(code_slots.size() == B && full_slots.size() == B && keys.size() == B * H * D && values.size() == keys.size(),
           "gpu_test: one new row per sequence");
  CQ_CHECK(d.code_buffers.size() == 1, "gpu_test: one code pool");
  const KVHeadView<T>& v0 = hb.views[0];
  const std::size_t P = v0.key_codes.page_tokens, F = v0.recent_keys.page_rows;
  const CodePageLayout cl{P, H, packed_code_bytes(block_tokens, v0.key_codebook.groups, v0.key_codebook.bits),
                          packed_code_bytes(block_tokens, v0.value_codebook.groups, v0.value_codebook.bits)};
  const FullPageLayout fl{F, H, D, sizeof(T)};
  CQ_CHECK(cl.page_bytes() == v0.key_codes.page_bytes && fl.page_elements() == v0.recent_keys.page_stride,
           "gpu_test: the pools' layouts are not the cache's");
  cuda::DeviceBuffer<std::uint8_t>& code_pool = d.code_buffers[0];
  // The rows' codes flipped and full rows overwritten, so the step must write them.
  std::vector<std::uint8_t> codes = code_pool.to_host(), full = d.full_pool.to_host();
  for (std::size_t r = 0; r < B; ++r)
    for (std::size_t h = 0; h < H; ++h) {
      if (code_slots[r] >= 0) {
        const std::size_t page = std::size_t(code_slots[r]) / P, t = std::size_t(code_slots[r]) % P;
        for (bool value : {false, true}) {
          const CodebookView& cb = value ? v0.value_codebook : v0.key_codebook;
          const PackedCodesView c(codes.data() + page * cl.page_bytes() + (value ? cl.value_offset(h) : cl.key_offset(h)),
                                  P, cb.groups, cb.bits);
          for (std::size_t g = 0; g < cb.groups; ++g) c.set(t, g, c.get(t, g) ^ ((1u << cb.bits) - 1));
        }
      }
      const std::size_t page = std::size_t(full_slots[r]) / F, row = std::size_t(full_slots[r]) % F;
      for (std::size_t off : {fl.key_offset(h), fl.value_offset(h)})
        std::memset(full.data() + (page * fl.page_elements() + off + row * D) * sizeof(T), 0x5A, D * sizeof(T));
    }
  code_pool.upload(codes.data(), codes.size());
  d.full_pool.upload(full.data(), full.size());

  cudaStream_t stream;
  CQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cuda::DeviceBuffer<DT> dk(reinterpret_cast<const DT*>(keys.data()), keys.size()),
      dv(reinterpret_cast<const DT*>(values.data()), values.size());
  cuda::DeviceBuffer<std::int64_t> dcs(code_slots), dfs(full_slots);
  const cuda::SlotRows<DT> rows{dk.data(), dv.data(), B, H * D, D, nullptr};  // [sequence][kv_heads][D]
  cuda::PagedEncode<DT> pe;
  static_cast<cuda::SlotRows<DT>&>(pe) = rows;
  pe.slots = dcs.data();
  pe.key_codebooks = d.key_views.data(), pe.value_codebooks = d.value_views.data();
  pe.head_dim = int(D);
  pe.key_channels = int(v0.key_codebook.channels), pe.key_bits = v0.key_codebook.bits;
  pe.value_channels = int(v0.value_codebook.channels), pe.value_bits = v0.value_codebook.bits;
  pe.pool = code_pool.data(), pe.layout = cl, pe.pages = code_pool.size() / cl.page_bytes();
  cuda::PagedRowWrite<DT> pw;
  static_cast<cuda::SlotRows<DT>&>(pw) = rows;
  pw.slots = dfs.data();
  pw.pool = reinterpret_cast<DT*>(d.full_pool.data()), pw.layout = fl, pw.pages = d.full_pool.size() / fl.page_bytes();
  cuda::DeviceBuffer<float> dq(q), dout(q.size());
  d.batch.q = dq.data();
  d.batch.out = dout.data();
  d.batch.scale = scale;
  cuda::FusedAttention fa;
  fa.set_kernel(kernel == Kernel::general ? cuda::AttentionKernel::general : cuda::AttentionKernel::automatic);
  const cuda::AttentionPlan plan = fa.plan(d.shape);  // plans (and the workspace) before any capture
  auto step = [&] {
    cuda::encode_into_pages(pe, stream);
    cuda::write_full_rows(pw, stream);
    fa.run(d.batch, plan, stream);
  };
  step();
  CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  GraphStep result;
  result.out = dout.to_host();
  const std::vector<std::uint8_t> codes0 = code_pool.to_host(), full0 = d.full_pool.to_host();
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CQ_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  step();
  CQ_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  CQ_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < replays; ++i) {
    CQ_CUDA_CHECK(cudaMemsetAsync(dout.data(), 0xFF, dout.size() * sizeof(float), stream));
    CQ_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    CQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> out = dout.to_host();
    const bool same_out = std::memcmp(out.data(), result.out.data(), out.size() * sizeof(float)) == 0;
    if (!same_out || code_pool.to_host() != codes0 || d.full_pool.to_host() != full0) ++result.differing_replays;
  }
  CQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
  CQ_CUDA_CHECK(cudaGraphDestroy(graph));
  CQ_CUDA_CHECK(cudaStreamDestroy(stream));
  return result;
}

#define CQ_GPU_TEST_INSTANTIATE(T)                                                                                  \
  template bool kernel_serves<T>(Kernel, const HostBatchOf<T>&);                                                    \
  template std::vector<float> attention<T>(const HostBatchOf<T>&, const std::vector<float>&, Scoring, Kernel,       \
                                           DeviceCodes, PlanUsed*, Precision);                                      \
  template GraphStep append_attend_graph<T>(const HostBatchOf<T>&, const std::vector<float>&, float, Kernel,        \
                                            const std::vector<T>&, const std::vector<T>&,                           \
                                            const std::vector<std::int64_t>&, const std::vector<std::int64_t>&, int);
CQ_GPU_TEST_INSTANTIATE(float)
CQ_GPU_TEST_INSTANTIATE(half)
CQ_GPU_TEST_INSTANTIATE(bfloat16)
#undef CQ_GPU_TEST_INSTANTIATE

std::vector<Codebook> fit_batched(const std::vector<float>& x, const std::vector<float>* weights, int jobs, int n,
                                  int dim, int channels, int bits, int iterations, std::uint64_t seed,
                                  std::vector<double>* objectives) {
  cuda::DeviceBuffer<float> dx(x);
  cuda::DeviceBuffer<float> dw(weights ? weights->size() : 0);
  if (weights) dw.upload(weights->data(), weights->size());
  const int G = dim / channels, K = 1 << bits;
  cuda::DeviceBuffer<float> cents(std::size_t(jobs) * G * K * channels);
  cuda::DeviceBuffer<double> obj(std::size_t(jobs) * G * (iterations + 1));
  cuda::fit_codebooks_batched(dx.data(), weights ? dw.data() : nullptr, jobs, n, dim, channels, bits,
                              {iterations, seed}, cents.data(), obj.data());
  const std::vector<float> h = cents.to_host();
  if (objectives) *objectives = obj.to_host();
  std::vector<Codebook> out;
  for (int j = 0; j < jobs; ++j) {
    Codebook cb(std::size_t(dim), std::size_t(channels), bits);
    cb.set_all(h.data() + std::size_t(j) * G * K * channels);
    cb.info().method = "kmeans-cuda";
    out.push_back(std::move(cb));
  }
  return out;
}

}  // namespace cq::gpu_test
