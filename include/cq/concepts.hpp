#pragma once
/// The contract a quantizer backend fulfils. A backend is a type with static member functions
/// doing the hot work on memory it understands; a type missing one fails here, at compile time,
/// with this concept's name in the message.

#include "cq/codebook.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"
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

}  // namespace cq
