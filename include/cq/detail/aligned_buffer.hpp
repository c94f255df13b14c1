#pragma once
/// detail::AlignedBuffer<T>: a growable, cache-line-aligned array of trivially copyable T.
/// Used by every owner in cq so SIMD loads never straddle an allocation's start.

#include "cq/config.hpp"
#include "cq/detail/checked.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>

namespace cq::detail {

template <class T>
class AlignedBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "cq: AlignedBuffer holds trivially copyable types only");

 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t n, T fill = T{}) { resize(n, fill); }
  AlignedBuffer(const AlignedBuffer& o) { assign(o.data_, o.size_); }
  AlignedBuffer(AlignedBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)) {}
  AlignedBuffer& operator=(const AlignedBuffer& o) {
    if (this != &o) assign(o.data_, o.size_);
    return *this;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      capacity_ = std::exchange(o.capacity_, 0);
    }
    return *this;
  }
  ~AlignedBuffer() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }
  T* begin() { return data_; }
  T* end() { return data_ + size_; }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + size_; }

  /// Ensures capacity for n elements; contents are kept. Throws cq::Error when n elements' bytes do
  /// not fit std::size_t and std::bad_alloc when memory runs out; either way the buffer is unchanged.
  void reserve(std::size_t n) {
    if (n <= capacity_) return;
    T* fresh = allocate(n);
    if (size_) std::memcpy(fresh, data_, size_ * sizeof(T));
    release_storage();
    data_ = fresh;
    capacity_ = n;
  }
  /// Resizes; new elements are set to `fill`. Growth is geometric so appends are amortised O(1).
  void resize(std::size_t n, T fill = T{}) {
    if (n > capacity_) reserve(std::max(n, capacity_ + std::min(capacity_ / 2, max_elements() - capacity_)));
    if (n > size_) std::fill(data_ + size_, data_ + n, fill);
    size_ = n;
  }
  /// Resizes without setting new elements (the caller writes them before reading: a buffer that
  /// is cleared piece by piece where it is used need not be cleared twice).
  void resize_for_overwrite(std::size_t n) {
    if (n > capacity_) reserve(std::max(n, capacity_ + std::min(capacity_ / 2, max_elements() - capacity_)));
    size_ = n;
  }
  void clear() { size_ = 0; }
  void assign(const T* src, std::size_t n) {
    if (n > capacity_) {
      T* fresh = allocate(n);
      release_storage();
      data_ = fresh;
      capacity_ = n;
    }
    if (n) std::memcpy(data_, src, n * sizeof(T));
    size_ = n;
  }
  /// Bytes of storage held (capacity, not size): what memory accounting reports.
  std::size_t allocated_bytes() const { return capacity_ * sizeof(T); }

 private:
  /// The most elements whose byte count, rounded up to the alignment, fits std::size_t.
  static constexpr std::size_t max_elements() { return (SIZE_MAX - buffer_alignment) / sizeof(T); }
  static T* allocate(std::size_t n) {
    const std::size_t bytes = checked_mul(n, sizeof(T), "AlignedBuffer: elements x element size");
    checked_limit(bytes, SIZE_MAX - buffer_alignment, "AlignedBuffer: bytes");
    // Round the byte count up so the aligned operator new contract holds for every n.
    return static_cast<T*>(::operator new((bytes + buffer_alignment - 1) / buffer_alignment * buffer_alignment,
                                          std::align_val_t{buffer_alignment}));
  }
  void release_storage() {
    if (data_) ::operator delete(data_, std::align_val_t{buffer_alignment});
    data_ = nullptr;
  }
  void release() {
    release_storage();
    size_ = capacity_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace cq::detail
