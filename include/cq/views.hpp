#pragma once
/// Non-owning row-major matrix views over memory an engine owns: {pointer, rows, cols, stride}.
/// Views are trivially copyable and cheap to pass by value; owners expose `.view()`.

#include "cq/config.hpp"
#include "cq/error.hpp"

#include <cstddef>
#include <type_traits>

namespace cq {

/// A row-major matrix view. Layout: element (r, c) lives at data[r * stride + c], stride >= cols.
/// T may be const-qualified (use ConstMatrixView<T> for read-only arguments).
template <class T>
struct MatrixView {
  T* data = nullptr;
  std::size_t rows = 0;
  std::size_t cols = 0;
  std::size_t stride = 0;  // elements between consecutive rows

  constexpr MatrixView() = default;
  CQ_HOST_DEVICE constexpr MatrixView(T* d, std::size_t r, std::size_t c, std::size_t s)
      : data(d), rows(r), cols(c), stride(s) {}
  /// A densely packed matrix (stride == cols).
  CQ_HOST_DEVICE constexpr MatrixView(T* d, std::size_t r, std::size_t c)
      : data(d), rows(r), cols(c), stride(c) {}

  /// Implicit conversion from a mutable view to a const view.
  template <class U>
    requires(std::is_same_v<T, const U>)
  CQ_HOST_DEVICE constexpr MatrixView(const MatrixView<U>& o)  // NOLINT(google-explicit-constructor)
      : data(o.data), rows(o.rows), cols(o.cols), stride(o.stride) {}

  CQ_HOST_DEVICE constexpr T& operator()(std::size_t r, std::size_t c) const {
    return data[r * stride + c];
  }
  CQ_HOST_DEVICE constexpr T* row(std::size_t r) const { return data + r * stride; }
  CQ_HOST_DEVICE constexpr bool empty() const { return rows == 0 || cols == 0; }

  /// Rows [first, first + count).
  constexpr MatrixView middle_rows(std::size_t first, std::size_t count) const {
    CQ_ASSERT(first + count <= rows);
    return {data + first * stride, count, cols, stride};
  }
  /// Columns [first, first + count) of every row.
  constexpr MatrixView middle_cols(std::size_t first, std::size_t count) const {
    CQ_ASSERT(first + count <= cols);
    return {data + first, rows, count, stride};
  }
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

/// Checks a view is well-formed (stride >= cols, non-null when non-empty); throws naming `what`.
template <class T>
void check_view(const MatrixView<T>& v, const char* what) {
  CQ_CHECK(v.stride >= v.cols, what, ": stride ", v.stride, " is smaller than cols ", v.cols);
  CQ_CHECK(v.data != nullptr || v.rows == 0 || v.cols == 0, what, ": null data for a ",
           v.rows, " x ", v.cols, " view");
}

}  // namespace cq
