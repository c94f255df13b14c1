#pragma once
/// backend::Simd<Isa> — the vectorised CPU backend, written once over the ISA traits of
/// detail/simd_isa.hpp. backend::Avx512 and backend::Avx2 exist when the translation unit is
/// compiled for them (-mavx512f... / -mavx2 -mfma); backend::Native (native.hpp) picks the widest.
///
/// assign: the GEMM-style nearest-centroid search |c|^2 - 2 x.c (|x|^2 is the same for every
/// centroid), vectorised across centroids using the codebook's transposed table, several points
/// in flight when the codebook is small so the FMA pipes stay busy.

#include "cq/backend/scalar.hpp"
#include "cq/backend/simd_attention.hpp"
#include "cq/codebook.hpp"
#include "cq/detail/centroid_copy.hpp"
#include "cq/detail/simd_isa.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"
#include "cq/views.hpp"

#include <cstring>
#include <limits>
#include <string_view>

namespace cq::backend {

namespace detail_simd {

/// NR registers of centroids per chunk, P points at a time.
template <class Isa, int NR, int P, element_type T>
void assign_points(const GroupCodebookView& cb, ConstMatrixView<T> pts, std::size_t first, std::uint32_t* codes) {
  using vf = typename Isa::vf;
  using vi = typename Isa::vi;
  constexpr int W = Isa::width;
  constexpr std::uint32_t chunk = NR * W;
  const std::uint32_t C = cb.channels;
  const std::uint32_t padded = cb.padded_centroids;
  vf minv[P];
  vi mini[P];
  for (int p = 0; p < P; ++p) {
    minv[p] = Isa::set1(std::numeric_limits<float>::infinity());
    mini[p] = Isa::set1i(0);
  }
  for (std::uint32_t k0 = 0; k0 < padded; k0 += chunk) {
    vf acc[P][NR];
    for (int r = 0; r < NR; ++r) {
      const vf n = Isa::load(cb.norms + k0 + r * W);
      for (int p = 0; p < P; ++p) acc[p][r] = n;
    }
    for (std::uint32_t c = 0; c < C; ++c) {
      const float* col = cb.transposed + std::size_t{c} * padded + k0;
      vf xb[P];
      for (int p = 0; p < P; ++p) xb[p] = Isa::set1(-2.0f * to_float(pts(first + p, c)));
      for (int r = 0; r < NR; ++r) {
        const vf cv = Isa::load(col + r * W);
        for (int p = 0; p < P; ++p) acc[p][r] = Isa::fmadd(xb[p], cv, acc[p][r]);
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
    constexpr int W = Isa::width;
    // Register budget: NR * (P + 1) + small change must stay within the register file
    // (32 zmm for AVX-512, 16 ymm for AVX2).
    constexpr int max_nr = W == 16 ? 16 : 8;
    const std::uint32_t regs = cb.padded_centroids / W;  // >= 1 since padded >= 16 >= W
    if (regs >= static_cast<std::uint32_t>(max_nr)) return assign_all<Isa, max_nr, 1>(cb, points, codes);
    if constexpr (W == 16) {
      switch (regs) {
        case 1: return assign_all<Isa, 1, 8>(cb, points, codes);
        case 2: return assign_all<Isa, 2, 4>(cb, points, codes);
        case 4: return assign_all<Isa, 4, 2>(cb, points, codes);
        case 8: return assign_all<Isa, 8, 1>(cb, points, codes);
        default: break;
      }
    } else {
      switch (regs) {
        case 2: return assign_all<Isa, 2, 4>(cb, points, codes);
        case 4: return assign_all<Isa, 4, 2>(cb, points, codes);
        default: break;
      }
    }
    // padded is a multiple of 16 and a power of two times 16 for 2^bits centroids, so every case
    // is covered above; keep a correct fallback for any other padding.
    return assign_all<Isa, 1, 1>(cb, points, codes);
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
