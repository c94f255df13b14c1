#pragma once
/// The grouped (GQA) attention primitives of the SIMD backend: the L query heads of a GQA group
/// in the lanes of one vector (L = 2, 4, 8 or 16; GCC/Clang vector types, so one source serves
/// SSE, AVX2 and AVX-512). Contracts: backend/scalar_attention.hpp.
///
/// Why heads in lanes: per coded token the work is then one table row per key group and one
/// histogram update per value group *for the whole group of heads* — a contiguous L-float load or
/// read-modify-write — instead of one lookup and one update per head. fp16 attention reads each
/// KV head once for all its query heads; so does this.

#include "cq/backend/avx512_group_tables.hpp"
#include "cq/backend/scalar_attention.hpp"
#include "cq/codebook.hpp"
#include "cq/detail/bit_packing.hpp"
#include "cq/detail/simd_isa.hpp"
#include "cq/packed_codes.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

// 16-lane vectors pass between these inline helpers also when only AVX2 is enabled (two registers
// each); GCC notes that such a vector's ABI would differ under AVX-512. That matters only when
// translation units built for different instruction sets share these inline functions, which a
// header-only SIMD library rules out anyway (one instruction set per program; see the README).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace cq::backend {

/// N floats as one GCC/Clang vector. (Spelled as explicit specialisations: GCC drops
/// `vector_size` on an alias whose size depends on a template parameter.)
template <int N>
struct FloatVec;
template <>
struct FloatVec<1> {
  typedef float type;
};
template <>
struct FloatVec<2> {
  typedef float type __attribute__((vector_size(8)));
};
template <>
struct FloatVec<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct FloatVec<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct FloatVec<16> {
  typedef float type __attribute__((vector_size(64)));
};

namespace detail_group {

template <int N>
using V = typename FloatVec<N>::type;

template <int N>
CQ_ALWAYS_INLINE V<N> load(const float* p) {
  V<N> v;
  std::memcpy(&v, p, sizeof(V<N>));
  return v;
}
template <int N>
CQ_ALWAYS_INLINE void store(float* p, V<N> v) {
  std::memcpy(p, &v, sizeof(V<N>));
}

/// C lane vectors: on the stack for the usual group widths (C <= 16), on the heap beyond.
template <int N>
class LaneRows {
 public:
  explicit LaneRows(std::size_t C) {
    if (C > 16) heap_.reset(new V<N>[C]);
  }
  V<N>& operator[](std::size_t c) { return heap_ ? heap_[c] : local_[c]; }

 private:
  V<N> local_[16];
  std::unique_ptr<V<N>[]> heap_;
};

/// Calls f.template operator()<L>() for L in {2, 4, 8, 16}.
template <class F>
void with_lanes(std::size_t L, F&& f) {
  switch (L) {
    case 2: return f.template operator()<2>();
    case 4: return f.template operator()<4>();
    case 8: return f.template operator()<8>();
    default: return f.template operator()<16>();
  }
}

/// The codes of group g for the 32 tokens of `block`, widened (8-bit codes are read in place).
struct BlockCodes {
  std::uint32_t unpacked[block_tokens];
  const std::uint8_t* bytes = nullptr;
  CQ_ALWAYS_INLINE void load(const ConstPackedCodesView& codes, std::size_t block, std::size_t g) {
    if (codes.bits == 8) {
      bytes = codes.chunk(block, g);
    } else {
      bytes = nullptr;
      cq::detail::unpack_chunk(codes.chunk(block, g), codes.bits, unpacked);
    }
  }
  CQ_ALWAYS_INLINE std::uint32_t operator[](std::size_t t) const { return bytes ? bytes[t] : unpacked[t]; }
};

}  // namespace detail_group

template <class Isa>
struct SimdGroupOps {
  static constexpr std::size_t B = block_tokens;

  static void score_lut_heads(const CodebookView& cb, const float* q, std::size_t heads, std::size_t L, float scale,
                              float* lut) {
    detail_group::with_lanes(L, [&]<int N>() {
#if CQ_HAVE_AVX512
      if constexpr (Isa::width == 16 && avx512_group_tables::serves(N))
        if (avx512_group_tables::serves_lut(N, cb.channels)) return avx512_group_tables::lut<N>(cb, q, heads, scale, lut);
#endif
      lut_lanes<N>(cb, q, heads, scale, lut);
    });
  }

  static void score_codes_heads(const float* lut, std::size_t K, std::size_t L, ConstPackedCodesView codes,
                                std::size_t first, std::size_t n, float* scores) {
    detail_group::with_lanes(L, [&]<int N>() { score_lanes<N>(lut, K, codes, first, n, scores); });
  }

  static void add_histogram_heads(ConstPackedCodesView codes, std::size_t first, std::size_t n, const float* w,
                                  std::size_t K, std::size_t L, float* hist) {
    detail_group::with_lanes(L, [&]<int N>() { histogram_lanes<N>(codes, first, n, w, K, hist); });
  }

  static void combine_centroids_heads(const CodebookView& cb, const float* hist, std::size_t L, std::size_t heads,
                                      float* out, std::size_t out_stride) {
    detail_group::with_lanes(L, [&]<int N>() {
#if CQ_HAVE_AVX512
      if constexpr (Isa::width == 16 && avx512_group_tables::serves(N))
        if (cb.channels == 8) return avx512_group_tables::combine<N>(cb, hist, heads, out, out_stride);
#endif
      combine_lanes<N>(cb, hist, heads, out, out_stride);
    });
  }

  static void score_rows_heads(const float* qt, std::size_t L, const float* rows, std::size_t n, std::size_t dim,
                               float* scores) {
    detail_group::with_lanes(L, [&]<int N>() {
      using namespace detail_group;
      // R rows at a time share each query lane vector: R accumulator chains keep both FMA pipes
      // busy (four chains wait on the FMA latency); a 16-lane vector is two registers under AVX2.
      constexpr std::size_t R = sizeof(V<N>) <= 32 ? 8 : 4;
      std::size_t i = 0;
      for (; i + R <= n; i += R) {
        V<N> a[R];
        for (std::size_t r = 0; r < R; ++r) a[r] = V<N>{};
        const float* r0 = rows + i * dim;
        for (std::size_t d = 0; d < dim; ++d) {
          V<N> qv = load<N>(qt + d * N);
          if constexpr (sizeof(V<N>) == 16 || sizeof(V<N>) == 32)  // SSE/AVX registers (clang has none for 8 bytes)
            __asm__("" : "+x"(qv));                                // loaded once, not folded into each FMA
          for (std::size_t r = 0; r < R; ++r) a[r] += qv * r0[r * dim + d];
        }
        for (std::size_t r = 0; r < R; ++r) store<N>(scores + (i + r) * N, a[r]);
      }
      for (; i < n; ++i) {
        V<N> a{};
        for (std::size_t d = 0; d < dim; ++d) a += load<N>(qt + d * N) * rows[i * dim + d];
        store<N>(scores + i * N, a);
      }
    });
  }

  static void max_lanes(const float* x, std::size_t n, std::size_t L, float* m) {
    detail_group::with_lanes(L, [&]<int N>() {
      using namespace detail_group;
      // Four independent chains: one would wait on the max latency per token.
      const V<N> lowest = V<N>{} - std::numeric_limits<float>::infinity();
      V<N> v[4] = {lowest, lowest, lowest, lowest};
      std::size_t i = 0;
      for (; i + 4 <= n; i += 4)
        for (std::size_t r = 0; r < 4; ++r) {
          const V<N> x_i = load<N>(x + (i + r) * N);
          v[r] = x_i > v[r] ? x_i : v[r];
        }
      for (; i < n; ++i) {
        const V<N> x_i = load<N>(x + i * N);
        v[0] = x_i > v[0] ? x_i : v[0];
      }
      for (std::size_t r = 1; r < 4; ++r) v[0] = v[r] > v[0] ? v[r] : v[0];
      store<N>(m, v[0]);
    });
  }

  /// Whole vectors of the ISA over the flat (n, L) array, the shift repeating every L lanes: one
  /// vector per step when L <= width (the shift pattern is the same in every vector), two when a
  /// 16-lane group spans two vectors (AVX2); the sums stay in registers.
  static void exp_sum_lanes(float* x, std::size_t n, std::size_t L, const float* shift, float* sum) {
    using vf = typename Isa::vf;
    constexpr std::size_t W = Isa::width;
    CQ_ASSERT(L <= 16 && (L & (L - 1)) == 0);
    const std::size_t total = n * L, lane = L - 1;  // k % L as k & lane (no division)
    alignas(64) float pattern[2 * W];               // the shift over two vectors
    for (std::size_t k = 0; k < 2 * W; ++k) pattern[k] = shift[k & lane];
    const vf p0 = Isa::load(pattern), p1 = Isa::load(pattern + W);
    vf acc0 = Isa::zero(), acc1 = Isa::zero();
    std::size_t k = 0;
    // Two vectors per step; in the second the shift is p1 (L > W) or p0 again (L <= W).
    const vf q1 = L > W ? p1 : p0;
    for (; k + 2 * W <= total; k += 2 * W) {
      const vf e0 = Isa::exp(Isa::sub(Isa::load(x + k), p0));
      const vf e1 = Isa::exp(Isa::sub(Isa::load(x + k + W), q1));
      Isa::store(x + k, e0);
      Isa::store(x + k + W, e1);
      acc0 = Isa::add(acc0, e0);
      acc1 = Isa::add(acc1, e1);
    }
    if (k + W <= total) {  // (L <= W only: with L = 2W the total is a multiple of 2W)
      const vf e0 = Isa::exp(Isa::sub(Isa::load(x + k), p0));
      Isa::store(x + k, e0);
      acc0 = Isa::add(acc0, e0);
      k += W;
    }
    if (L <= W) acc0 = Isa::add(acc0, acc1), acc1 = Isa::zero();
    alignas(64) float lanes[2 * W];
    Isa::store(lanes, acc0);
    Isa::store(lanes + W, acc1);
    for (std::size_t j = 0; j < 2 * W; ++j) sum[j & lane] += lanes[j];
    for (; k < total; ++k) sum[k & lane] += x[k] = std::exp(x[k] - shift[k & lane]);  // the last partial vector
  }

 private:
  // lut (g, j) = scale * (q_h[g] . centroid[g][j]) for every head h in the lanes: the queries
  // transposed to (dim, N), then C multiply-adds of a lane vector per centroid, J centroids at a
  // time (one centroid's C multiply-adds are a dependent chain: alone, the build waits on the FMA
  // latency, which made it the largest fixed cost of a grouped item at 4K tokens; eight chains
  // cover the latency of both FMA pipes where there are registers for them, i.e. AVX-512).
  template <int N>
  static void lut_lanes(const CodebookView& cb, const float* q, std::size_t heads, float scale, float* lut) {
    using namespace detail_group;
    const std::size_t D = cb.dim(), C = cb.channels, K = cb.padded_centroids, KC = cb.num_centroids();
    LaneRows<N> qv(C);  // the group's slice of q, transposed: qv[c][h]
    for (std::size_t g = 0; g < cb.groups; ++g) {
      for (std::size_t c = 0; c < C; ++c) {
        alignas(64) float lane[N] = {};
        for (std::size_t h = 0; h < heads; ++h) lane[h] = scale * q[h * D + g * C + c];
        qv[c] = load<N>(lane);
      }
      const float* cent = cb.centroids + g * KC * C;
      float* row = lut + g * K * N;
      constexpr std::size_t J = Isa::width >= 16 ? 8 : 4;
      std::size_t j = 0;
      for (; j + J <= KC; j += J) {
        V<N> acc[J];
        for (auto& a : acc) a = V<N>{};
        for (std::size_t c = 0; c < C; ++c) {
          const V<N> qc = qv[c];
          for (std::size_t r = 0; r < J; ++r) acc[r] += qc * cent[(j + r) * C + c];
        }
        for (std::size_t r = 0; r < J; ++r) store<N>(row + (j + r) * N, acc[r]);
      }
      for (; j < KC; ++j) {
        V<N> acc = V<N>{};
        for (std::size_t c = 0; c < C; ++c) acc += qv[c] * cent[j * C + c];
        store<N>(row + j * N, acc);
      }
      std::fill(row + KC * N, row + K * N, 0.0f);
    }
  }

  // Scores of T tokens at a time in registers; per key group, each token adds its code's row.
  template <int N>
  static void score_lanes(const float* lut, std::size_t K, ConstPackedCodesView codes, std::size_t first,
                          std::size_t n, float* scores) {
    using namespace detail_group;
    CQ_ASSERT(first % B == 0);
    constexpr std::size_t T = N <= 8 ? 8 : 4;
    alignas(64) float tmp[B * N];
    alignas(64) std::uint32_t idx[64][B];
    const std::size_t G = codes.groups;
    for (std::size_t done = 0; done < n; done += B) {
      const std::size_t block = (first + done) / B, take = std::min(B, n - done);
      float* dst = take == B ? scores + done * N : tmp;
      // Groups [g0, g0 + gn) into T tokens' accumulators at a time, kept in registers; the row
      // pointer steps per group. Sums carry over in dst from one call to the next, so every token
      // adds its groups in order either way.
      auto scan = [&](std::size_t g0, std::size_t gn, auto code_at) {
        for (std::size_t t0 = 0; t0 < B; t0 += T) {
          V<N> acc[T];
          for (std::size_t t = 0; t < T; ++t) acc[t] = g0 == 0 ? V<N>{} : load<N>(dst + (t0 + t) * N);
          const float* row = lut + g0 * K * N;
          for (std::size_t g = 0; g < gn; ++g, row += K * N)
            for (std::size_t t = 0; t < T; ++t) acc[t] += load<N>(row + std::size_t(code_at(g, t0 + t)) * N);
          for (std::size_t t = 0; t < T; ++t) store<N>(dst + (t0 + t) * N, acc[t]);
        }
      };
      if (codes.bits == 8) {  // read in place
        const std::uint8_t* c = codes.chunk(block, 0);
        scan(0, G, [c](std::size_t g, std::size_t t) { return c[g * B + t]; });
      } else {  // unpacked once per block, 64 groups at a time
        for (std::size_t g0 = 0; g0 < G; g0 += 64) {
          const std::size_t gn = std::min<std::size_t>(64, G - g0);
          for (std::size_t g = 0; g < gn; ++g) cq::detail::unpack_chunk(codes.chunk(block, g0 + g), codes.bits, idx[g]);
          scan(g0, gn, [&idx](std::size_t g, std::size_t t) { return idx[g][t]; });
        }
      }
      if (take < B) std::copy_n(tmp, take * N, scores + done * N);
    }
  }

  // Token-major, group-minor: consecutive updates hit different entries (no store-forwarding
  // chains through one entry).
  template <int N>
  static void histogram_lanes(ConstPackedCodesView codes, std::size_t first, std::size_t n, const float* w,
                              std::size_t K, float* hist) {
    using namespace detail_group;
    CQ_ASSERT(first % B == 0);
    const std::size_t G = codes.groups;
    for (std::size_t done = 0; done < n; done += B) {
      const std::size_t block = (first + done) / B, take = std::min(B, n - done);
      if (codes.bits == 8) {
        const std::uint8_t* base = codes.chunk(block, 0);
        for (std::size_t t = 0; t < take; ++t) {
          const V<N> wt = load<N>(w + (done + t) * N);
          const std::uint8_t* c = base + t;
          float* h = hist;
#pragma GCC unroll 16
          for (std::size_t g = 0; g < G; ++g, c += B, h += K * N) {
            float* e = h + std::size_t(*c) * N;
            store<N>(e, load<N>(e) + wt);
          }
        }
        continue;
      }
      for (std::size_t g = 0; g < G; ++g) {
        BlockCodes bc;
        bc.load(codes, block, g);
        for (std::size_t t = 0; t < take; ++t) {
          float* e = hist + (g * K + bc[t]) * N;
          store<N>(e, load<N>(e) + load<N>(w + (done + t) * N));
        }
      }
    }
  }

  // out[h][g * C + c] += sum_j hist(g, j)[h] * centroid[g][j][c]: per group, C lane vectors.
  template <int N>
  static void combine_lanes(const CodebookView& cb, const float* hist, std::size_t heads, float* out,
                            std::size_t out_stride) {
    using namespace detail_group;
    const std::size_t C = cb.channels, K = cb.padded_centroids, KC = cb.num_centroids();
    // The usual group widths with the C accumulators in registers (a run-time C keeps them on the
    // stack, a load and a store per multiply-add); the same sums in the same order either way.
    // `width` is C, as a compile-time constant where it can be.
    auto run = [&](auto& acc, auto width) {
      for (std::size_t g = 0; g < cb.groups; ++g) {
        for (std::size_t c = 0; c < width; ++c) acc[c] = V<N>{};
        const float* cent = cb.centroids + g * KC * width;
        const float* h = hist + g * K * N;
        for (std::size_t j = 0; j < KC; ++j) {
          const V<N> hv = load<N>(h + j * N);
          for (std::size_t c = 0; c < width; ++c) acc[c] += hv * cent[j * width + c];
        }
        for (std::size_t c = 0; c < width; ++c)
          for (std::size_t hd = 0; hd < heads; ++hd) out[hd * out_stride + g * width + c] += acc[c][hd];
      }
    };
    auto fixed = [&]<std::size_t Cc>() {
      V<N> acc[Cc];
      run(acc, std::integral_constant<std::size_t, Cc>{});
    };
    if (N <= 8) {
      if (C == 8) return fixed.template operator()<8>();
      if (C == 4) return fixed.template operator()<4>();
      if (C == 2) return fixed.template operator()<2>();
    }
    LaneRows<N> acc(C);
    run(acc, C);
  }
};

}  // namespace cq::backend

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
