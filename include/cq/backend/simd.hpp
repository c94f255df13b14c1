#pragma once
/// backend::Simd<Isa> — the vectorised CPU backend, written once over the ISA traits of
/// detail/simd_isa.hpp. backend::Avx512 and backend::Avx2 exist when the translation unit is
/// compiled for them (-mavx512f... / -mavx2 -mfma); backend::Native (native.hpp) picks the widest.
///
/// assign: the nearest-centroid search by direct squared distances sum_c (x_c - c_kc)^2,
/// vectorised across centroids using the codebook's transposed table, several points in flight
/// when the codebook is small so the FMA pipes stay busy. Not the GEMM-style ranking
/// |c|^2 - 2 x.c: in float it cancels catastrophically once |x| and |c| are large next to the
/// distances between them (activations with a large common offset or an outlier channel), while
/// each term (x_c - c_kc) is rounded relative to itself, so the direct form ranks centroids within
/// float rounding of the distances at any magnitude.

#include "cq/backend/scalar.hpp"
#include "cq/backend/simd_attention.hpp"
#include "cq/codebook.hpp"
#include "cq/detail/centroid_copy.hpp"
#include "cq/detail/simd_isa.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"
#include "cq/views.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string_view>

namespace cq::backend {

namespace detail_simd {

/// 0 for the lanes of centroids [k, k + W) that exist (k < K), +inf for the padding lanes past the
/// last centroid of the transposed table, so padding never wins; an accumulator starts from it.
template <class Isa>
CQ_ALWAYS_INLINE typename Isa::vf padding_mask(std::uint32_t k, std::uint32_t K) {
  static_assert(Isa::width <= 16, "cq: padding_mask covers at most 16 lanes");
  constexpr float inf = std::numeric_limits<float>::infinity();
  alignas(64) static constexpr float lanes[32] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                  inf, inf, inf, inf, inf, inf, inf, inf,
                                                  inf, inf, inf, inf, inf, inf, inf, inf};
  const std::uint32_t valid = k >= K ? 0u : std::min<std::uint32_t>(K - k, Isa::width);
  return Isa::load(lanes + 16 - valid);
}

/// NR registers of centroids per chunk, P points at a time.
template <class Isa, int NR, int P, element_type T>
void assign_points(const GroupCodebookView& cb, ConstMatrixView<T> pts, std::size_t first, std::uint32_t* codes) {
  using vf = typename Isa::vf;
  using vi = typename Isa::vi;
  constexpr int W = Isa::width;
  constexpr std::uint32_t chunk = NR * W;
  const std::uint32_t C = cb.channels;
  const std::uint32_t padded = cb.padded_centroids;
  const std::uint32_t K = cb.num_centroids;
  vf minv[P];
  vi mini[P];
  for (int p = 0; p < P; ++p) {
    minv[p] = Isa::set1(std::numeric_limits<float>::infinity());
    mini[p] = Isa::set1i(0);
  }
  for (std::uint32_t k0 = 0; k0 < padded; k0 += chunk) {
    vf acc[P][NR];
    for (int r = 0; r < NR; ++r) {
      const vf m = padding_mask<Isa>(k0 + r * W, K);
      for (int p = 0; p < P; ++p) acc[p][r] = m;
    }
    for (std::uint32_t c = 0; c < C; ++c) {
      const float* col = cb.transposed + std::size_t{c} * padded + k0;
      vf xb[P];
      for (int p = 0; p < P; ++p) xb[p] = Isa::set1(to_float(pts(first + p, c)));
      for (int r = 0; r < NR; ++r) {
        const vf cv = Isa::load(col + r * W);
        for (int p = 0; p < P; ++p) {
          const vf d = Isa::sub(cv, xb[p]);
          acc[p][r] = Isa::fmadd(d, d, acc[p][r]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const vi idx = Isa::addi(Isa::iota(), Isa::set1i(static_cast<int>(k0 + r * W)));
      for (int p = 0; p < P; ++p) Isa::argmin_update(acc[p][r], idx, minv[p], mini[p]);
    }
  }
  for (int p = 0; p < P; ++p) codes[first + p] = Isa::argmin_reduce(minv[p], mini[p]);
}

template <class Isa, int NR, int P, element_type T>
void assign_all(const GroupCodebookView& cb, ConstMatrixView<T> pts, std::uint32_t* codes) {
  std::size_t i = 0;
  for (; i + P <= pts.rows; i += P) assign_points<Isa, NR, P>(cb, pts, i, codes);
  for (; i < pts.rows; ++i) assign_points<Isa, NR, 1>(cb, pts, i, codes);
}

}  // namespace detail_simd

template <class Isa>
struct Simd : SimdAttentionOps<Isa> {
  static constexpr std::string_view name = Isa::name;

  template <element_type T>
  static void assign(const GroupCodebookView& cb, ConstMatrixView<T> points, std::uint32_t* codes) {
    using namespace detail_simd;
    // Two centroid registers per chunk and several points in flight, so every centroid column
    // loaded feeds P differences and P FMAs: the kernel is then bound by arithmetic, not by
    // loads. NR * P accumulators, P broadcasts, the columns and a difference stay within the
    // register file (16 ymm for AVX2, 32 zmm for AVX-512).
    constexpr int P = Isa::width == 16 ? 8 : 4;
    const std::uint32_t regs = cb.padded_centroids / Isa::width;  // >= 1 since padded >= 16 >= width
    if (regs % 2 == 0) return assign_all<Isa, 2, P>(cb, points, codes);
    return assign_all<Isa, 1, P>(cb, points, codes);  // 16 centroids (or fewer) in one AVX-512 register
  }

  template <element_type T>
  static void decode(const CodebookView& cb, ConstPackedCodesView codes, std::size_t first, MatrixView<T> out) {
    const std::size_t C = cb.channels;
    cq::detail::for_each_chunk_run(first, out.rows, [&](std::size_t r, std::size_t t, std::size_t take, bool) {
      std::uint32_t tmp[block_tokens];
      for (std::size_t g = 0; g < cb.groups; ++g) {
        detail::load_group_codes(codes, g, t, take, tmp);
        const float* base = cb.centroids + g * cb.num_centroids() * C;
        for (std::size_t k = 0; k < take; ++k)
          cq::detail::put_centroid(base + tmp[k] * C, C, out.row(r + k) + g * C);
      }
    });
  }
};

#if CQ_HAVE_AVX512
using Avx512 = Simd<cq::detail::Avx512Isa>;
#endif
#if CQ_HAVE_AVX2
using Avx2 = Simd<cq::detail::Avx2Isa>;
#endif

}  // namespace cq::backend
