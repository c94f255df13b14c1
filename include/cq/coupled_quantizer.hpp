#pragma once
/// CoupledQuantizer<C, Bits, T, Backend>: the public face of CQ for one KV head (K or V).
///
/// Each vector of `dim` channels is cut into dim / C groups of C contiguous channels; each group
/// is stored as a Bits-bit index into its own codebook of 2^Bits centroids. Bits per channel is
/// Bits / C: CQ-8c8b is 1 bit per channel, 16x smaller than fp16.

#include "cq/backend/native.hpp"
#include "cq/codebook.hpp"
#include "cq/concepts.hpp"
#include "cq/element.hpp"
#include "cq/packed_codes.hpp"
#include "cq/quantizer.hpp"
#include "cq/views.hpp"

#include <utility>
#include <vector>

namespace cq {

template <std::size_t C, int Bits, element_type T = float, quantizer_backend Backend = backend::Native>
class CoupledQuantizer {
  static_assert(C >= 1, "cq: CoupledQuantizer needs C >= 1 channels per group");
  static_assert(Bits >= 1 && Bits <= 16, "cq: CoupledQuantizer needs 1 <= Bits <= 16 bits per code");

 public:
  static constexpr std::size_t channels = C;
  static constexpr int bits = Bits;
  static constexpr std::size_t num_centroids = std::size_t{1} << Bits;
  static constexpr double bits_per_channel = double(Bits) / double(C);
  using value_type = T;
  using backend_type = Backend;

  /// An unfitted quantizer for vectors of `dim` channels (dim % C == 0).
  explicit CoupledQuantizer(std::size_t dim) : codebook_(dim, C, Bits) {}
  /// A quantizer around an existing (e.g. loaded) codebook, whose shape must match C and Bits.
  explicit CoupledQuantizer(Codebook cb) {
    CQ_CHECK(cb.channels() == C && cb.bits() == Bits, "CoupledQuantizer<", C, ", ", Bits,
             ">: codebook has channels = ", cb.channels(), ", bits = ", cb.bits());
    codebook_ = std::move(cb);
  }

  std::size_t dim() const { return codebook_.dim(); }
  std::size_t groups() const { return codebook_.groups(); }
  const Codebook& codebook() const { return codebook_; }
  /// True once fitted or given a fitted/loaded codebook.
  bool fitted() const { return codebook_.info().method != "none"; }

  /// Fits the codebooks on calibration rows x (n, dim) by k-means.
  FitReport fit(ConstMatrixView<T> x, const FitOptions& opt = {}) {
    return fit_codebook<Backend>(codebook_, x, ConstMatrixView<float>{}, opt);
  }
  /// Fisher-weighted fit: weights (n, groups), non-negative (see fisher_weights()).
  FitReport fit(ConstMatrixView<T> x, ConstMatrixView<float> weights, const FitOptions& opt = {}) {
    CQ_CHECK(weights.data != nullptr, "fit: weights view is empty (use fit(x) for an unweighted fit)");
    return fit_codebook<Backend>(codebook_, x, weights, opt);
  }

  /// Codes of rows x (n, dim).
  PackedCodes encode(ConstMatrixView<T> x) const {
    require_fitted("encode");
    PackedCodes codes(groups(), Bits, x.rows);
    encode_rows<Backend>(codebook_.view(), x, codes.view(), 0);
    return codes;
  }
  /// Appends the codes of rows x to `codes`; on error (bad input, out of memory) `codes` is
  /// unchanged: everything is checked and the room reserved before the codes grow.
  void encode_append(ConstMatrixView<T> x, PackedCodes& codes) const {
    require_fitted("encode_append");
    CQ_CHECK(codes.groups() == groups() && codes.bits() == Bits, "encode_append: codes are ", codes.groups(),
             " groups x ", codes.bits(), " bits, expected ", groups(), " x ", Bits);
    CQ_CHECK(x.cols == dim(), "encode_append: x has ", x.cols, " columns, expected dim ", dim());
    check_view(x, "encode_append: x");
    const std::size_t first = codes.size();
    codes.reserve(detail::checked_add(first, x.rows, "encode_append: size + rows"));
    codes.resize(first + x.rows);  // within the reserved room: cannot fail
    try {
      encode_rows<Backend>(codebook_.view(), x, codes.view(), first);
    } catch (...) {
      codes.resize(first);  // shrinking never allocates
      throw;
    }
  }
  /// Writes the codes of rows x into tokens [first, first + n) of an engine-owned view.
  void encode(ConstMatrixView<T> x, PackedCodesView out, std::size_t first = 0) const {
    require_fitted("encode");
    encode_rows<Backend>(codebook_.view(), x, out, first);
  }

  /// Reconstructs tokens [first, first + out.rows) into out (rows, dim).
  void decode(ConstPackedCodesView codes, MatrixView<T> out, std::size_t first = 0) const {
    decode_rows<Backend>(codebook_.view(), codes, first, out);
  }
  /// Reconstructs every token, row-major (tokens, dim).
  std::vector<T> decode(const PackedCodes& codes) const {
    std::vector<T> out(detail::checked_mul(codes.size(), dim(), "decode: tokens x dim"));
    decode(codes.view(), MatrixView<T>(out.data(), codes.size(), dim()), 0);
    return out;
  }

 private:
  void require_fitted(const char* what) const {
    CQ_CHECK(fitted(), what, ": the quantizer has no fitted codebook yet (call fit or load one)");
  }
  Codebook codebook_;
};

/// The configurations of the paper's tables.
template <element_type T = float, quantizer_backend B = backend::Native>
using CQ2c8b = CoupledQuantizer<2, 8, T, B>;
template <element_type T = float, quantizer_backend B = backend::Native>
using CQ4c8b = CoupledQuantizer<4, 8, T, B>;
template <element_type T = float, quantizer_backend B = backend::Native>
using CQ8c8b = CoupledQuantizer<8, 8, T, B>;
template <element_type T = float, quantizer_backend B = backend::Native>
using CQ8c10b = CoupledQuantizer<8, 10, T, B>;

}  // namespace cq
