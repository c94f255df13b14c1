#pragma once
/// The contracts a CPU backend fulfils: quantizer operations and attention operations. A backend
/// is a type with static member functions doing the hot work on memory it understands; a type
/// missing one fails here, at compile time, with the concept's name in the message. One
/// conformance suite per contract tests every backend against backend::Scalar (tests/conformance).

#include "cq/codebook.hpp"
#include "cq/detail/line_prefetch.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"
#include "cq/rope.hpp"
#include "cq/views.hpp"

#include <concepts>
#include <cstdint>
#include <string_view>

namespace cq {

/// What every quantizer backend provides, for each element type T:
///  - `name`: a short name for benchmarks and messages;
///  - `assign(group_codebook, points (n, channels), codes)`: nearest centroid per point (the
///    encoder and the k-means assignment step);
///  - `decode(codebook, codes, first_token, out (rows, dim))`: codes back to vectors.
template <class B, class T>
concept quantizer_backend_for =
    element_type<T> &&
    requires(const GroupCodebookView& g, const CodebookView& cb, ConstMatrixView<T> in, MatrixView<T> out,
             ConstPackedCodesView codes, std::uint32_t* idx, std::size_t first) {
      { B::name } -> std::convertible_to<std::string_view>;
      B::assign(g, in, idx);
      B::decode(cb, codes, first, out);
    };

template <class B>
concept quantizer_backend =
    quantizer_backend_for<B, float> && quantizer_backend_for<B, half> && quantizer_backend_for<B, bfloat16>;

/// What every attention backend provides (conventions: backend/scalar_attention.hpp). Code
/// ranges start at a multiple of 32 tokens.
///  - `score_lut(cb, q, scale, lut, stride)`: lut[g * stride + j] = scale * q_g . centroid[g][j];
///  - `score_codes(lut, stride, codes, first, n, scores)`: scores[i] = sum_g lut[g][code(first + i, g)];
///  - `add_histogram(codes, first, n, p, hist, stride)`: hist[g][code(first + i, g)] += p[i];
///  - `accumulate_centroids(cb, codes, first, n, p, acc, pf)`: acc += sum_i p[i] * centroid of token
///    i; `pf` (a detail::LinePrefetch*, may be null): cache lines to issue a share of per block;
///  - `combine_centroids(cb, hist, stride, out)`: out += sum_j hist[g][j] * centroid[g][j];
///  - `prefers_value_histogram(cb)`: which value path the fused method takes;
///  - `max_of`, `exp_sum` (x[i] = exp(x[i] - shift), returns the sum), `scale`, `soft_cap`
///    (x[i] = cap tanh(x[i] / cap)), and `dot` / `axpy` of float queries with float, fp16 or bf16 rows;
///  - the grouped forms for the query heads of a GQA group, heads innermost: `score_lut_heads`,
///    `score_codes_heads`, `add_histogram_heads`, `combine_centroids_heads`, `score_rows_heads`, `max_lanes`,
///    `exp_sum_lanes`;
///  - pre-RoPE keys: `score_rope_codes` (keys rotated by a step table, dotted with queries turned
///    back to their anchors), `rope_rows` (the rotated keys as rows) and `rope_code_heads` (how
///    many heads the first serves at once before the second pays).
template <class B, class T>
concept attention_ops_for =
    element_type<T> && requires(const CodebookView& cb, ConstPackedCodesView codes, const float* cq, float* f,
                                const T* row, std::size_t n, float x) {
      { B::dot(cq, row, n) } -> std::convertible_to<float>;
      B::axpy(x, row, f, n);
    };

template <class B>
concept attention_backend =
    attention_ops_for<B, float> && attention_ops_for<B, half> && attention_ops_for<B, bfloat16> &&
    requires(const CodebookView& cb, ConstPackedCodesView codes, const float* cq, float* f, std::size_t n, float x,
             MatrixView<float> out, const RopeSteps& rs, detail::LinePrefetch* pf) {
      B::score_lut(cb, cq, x, f, n);
      B::score_codes(cq, n, codes, n, n, f);
      B::add_histogram(codes, n, n, cq, f, n);
      B::accumulate_centroids(cb, codes, n, n, cq, f, pf);
      B::combine_centroids(cb, cq, n, f);
      { B::prefers_value_histogram(cb) } -> std::convertible_to<bool>;
      { B::max_of(cq, n) } -> std::convertible_to<float>;
      { B::exp_sum(f, n, x) } -> std::convertible_to<float>;
      B::scale(f, n, x);
      B::soft_cap(f, n, x);
      B::decode(cb, codes, n, out);
      B::score_lut_heads(cb, cq, n, n, x, f);
      B::score_codes_heads(cq, n, n, codes, n, n, f);
      B::add_histogram_heads(codes, n, n, cq, n, n, f);
      B::combine_centroids_heads(cb, cq, n, n, f, n);
      B::score_rows_heads(cq, n, cq, n, n, f);
      B::max_lanes(cq, n, n, f);
      B::exp_sum_lanes(f, n, n, cq, f);
      B::score_rope_codes(cb, codes, n, n, rs, cq, n, f, n);
      B::rope_rows(cb, codes, n, n, rs, f);
      { B::rope_code_heads(cb, rs) } -> std::convertible_to<std::size_t>;
    };

}  // namespace cq
