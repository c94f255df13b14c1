#pragma once
/// PageSet: a fixed number of equally sized pages for every layer, with reference counts (pages
/// are shared between sequences after a fork) and a free list. All its memory is taken once, at
/// construction, from the engine's std::pmr::memory_resource or from a buffer the engine hands
/// over; taking and releasing pages never allocates. The page bytes may be device memory: then a
/// PageMemory says how pages are zeroed and copied, and the set never touches them itself.

#include "cq/cache/layout.hpp"
#include "cq/detail/checked.hpp"
#include "cq/error.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory_resource>
#include <new>
#include <span>
#include <algorithm>
#include <utility>

namespace cq {

/// How a PageSet writes page bytes: zeroing a page it hands out, copying a shared page into a fresh
/// one before a write (copy-on-write). Without one, the bytes are host memory (memset, memcpy). A
/// cache whose pages live in device memory queues both for its stream instead
/// (cuda/cache/paged_kv_cache.cuh). Called from commits, which cannot fail: must not throw.
class PageMemory {
 public:
  virtual void zero(std::byte* page, std::size_t bytes) noexcept = 0;
  virtual void copy(std::byte* to, const std::byte* from, std::size_t bytes) noexcept = 0;

 protected:
  ~PageMemory() = default;
};

class PageSet {
 public:
  PageSet() = default;
  /// `pages` pages of layer_bytes[l] bytes for every layer l (each a multiple of 64). The page
  /// bytes come from `external` when it is given (it must hold bytes_for() bytes, 64-byte
  /// aligned; the engine keeps it alive), else from `mem`; the bookkeeping always from `mem`.
  /// `page_memory` (optional, kept by reference) writes the page bytes: given for device memory,
  /// which must then be `external`.
  PageSet(std::span<const std::size_t> layer_bytes, std::size_t pages, std::pmr::memory_resource* mem,
          std::span<std::byte> external = {}, const char* what = "pages", PageMemory* page_memory = nullptr)
      : mem_(mem ? mem : std::pmr::get_default_resource()), what_(what), page_memory_(page_memory) {
    CQ_CHECK(!page_memory || !external.empty() || pages == 0, what_,
             ": pages written through a PageMemory must be in a buffer the caller supplies");
    CQ_CHECK(pages < UINT32_MAX, what_, ": ", pages, " pages exceed the 32-bit page ids");
    const std::size_t bytes = bytes_for(layer_bytes, pages, what_);
    if (!external.empty() || pages == 0) {
      CQ_CHECK(external.size() >= bytes, what_, ": the engine's buffer holds ", external.size(), " bytes, ", pages,
               " pages need ", bytes);
      CQ_CHECK(reinterpret_cast<std::uintptr_t>(external.data()) % page_alignment == 0, what_,
               ": the engine's buffer is not ", page_alignment, "-byte aligned");
      data_ = external.data();
    } else {
      try {
        data_ = static_cast<std::byte*>(mem_->allocate(bytes, page_alignment));
      } catch (const std::bad_alloc&) {
        cq::detail::fail(what_, ": cannot allocate ", bytes, " bytes for ", pages, " pages");
      }
      owned_bytes_ = bytes;
    }
    layers_ = layer_bytes.size();
    pages_ = pages;
    try {
      book_ = static_cast<std::size_t*>(mem_->allocate(book_bytes(), alignof(std::size_t)));
    } catch (...) {
      release_storage();
      throw;
    }
    std::copy(layer_bytes.begin(), layer_bytes.end(), book_);
    refs_ = reinterpret_cast<std::uint32_t*>(book_ + layers_);
    free_ = refs_ + pages;
    for (std::size_t i = 0; i < pages; ++i) {
      refs_[i] = 0;
      free_[i] = static_cast<std::uint32_t>(pages - 1 - i);  // hands out page 0 first
    }
    free_count_ = pages;
  }
  PageSet(const PageSet&) = delete;
  PageSet& operator=(const PageSet&) = delete;
  PageSet(PageSet&& o) noexcept { swap(o); }
  PageSet& operator=(PageSet&& o) noexcept {
    if (this != &o) {
      PageSet tmp(std::move(o));
      swap(tmp);
    }
    return *this;
  }
  ~PageSet() { release_storage(); }

  /// Bytes of page storage `pages` pages of every layer need.
  static std::size_t bytes_for(std::span<const std::size_t> layer_bytes, std::size_t pages, const char* what) {
    std::size_t per_page = 0;
    for (std::size_t b : layer_bytes) per_page = detail::checked_add(per_page, b, what);
    return detail::checked_mul(per_page, pages, what);
  }

  std::size_t pages() const { return pages_; }
  std::size_t free_pages() const { return free_count_; }
  std::size_t used_pages() const { return pages_ - free_count_; }
  /// Bytes of one page id over all layers.
  std::size_t page_bytes() const {
    std::size_t b = 0;
    for (std::size_t l = 0; l < layers_; ++l) b += book_[l];
    return b;
  }
  std::size_t layer_bytes(std::size_t layer) const { return book_[layer]; }
  /// Bytes of page storage taken from the memory resource (0 when the engine supplied it).
  std::size_t owned_page_bytes() const { return owned_bytes_; }
  /// Bytes this set took from its memory resource (page storage unless external, and bookkeeping).
  std::size_t allocated_bytes() const { return owned_bytes_ + (book_ ? book_bytes() : 0); }
  /// Layer l's page 0; page p starts p * layer_bytes(l) further.
  std::byte* layer_base(std::size_t layer) const {
    std::size_t off = 0;
    for (std::size_t l = 0; l < layer; ++l) off += book_[l] * pages_;
    return data_ + off;
  }
  std::byte* page(std::size_t layer, std::uint32_t id) const { return layer_base(layer) + id * book_[layer]; }

  /// A free page, zeroed in every layer, held once. Requires free_pages() > 0.
  std::uint32_t take() {
    CQ_ASSERT(free_count_ > 0);
    const std::uint32_t id = free_[--free_count_];
    refs_[id] = 1;
    for (std::size_t l = 0; l < layers_; ++l) {
      if (page_memory_) page_memory_->zero(page(l, id), book_[l]);
      else std::memset(page(l, id), 0, book_[l]);
    }
    return id;
  }
  /// A free page holding a copy of every layer's bytes of page `from`, held once (copy-on-write).
  /// Requires free_pages() > 0.
  std::uint32_t take_copy(std::uint32_t from) {
    CQ_ASSERT(free_count_ > 0);
    const std::uint32_t id = free_[--free_count_];
    refs_[id] = 1;
    for (std::size_t l = 0; l < layers_; ++l) {
      if (page_memory_) page_memory_->copy(page(l, id), page(l, from), book_[l]);
      else std::memcpy(page(l, id), page(l, from), book_[l]);
    }
    return id;
  }
  void retain(std::uint32_t id) { ++refs_[id]; }
  void release(std::uint32_t id) {
    CQ_ASSERT(refs_[id] > 0);
    if (--refs_[id] == 0) free_[free_count_++] = id;
  }
  std::uint32_t refs(std::uint32_t id) const { return refs_[id]; }

  /// More pages, keeping every page's id and contents (pool memory only; strong guarantee).
  void grow(std::size_t pages) {
    if (pages <= pages_) return;
    CQ_CHECK(!page_memory_, what_, ": pages written through a PageMemory (device memory) cannot grow");
    CQ_CHECK(owned_bytes_ > 0 || pages_ == 0, what_, ": an engine-supplied buffer cannot grow");
    PageSet bigger(std::span<const std::size_t>(book_, layers_), pages, mem_, {}, what_);
    for (std::size_t l = 0; l < layers_; ++l)
      if (pages_) std::memcpy(bigger.layer_base(l), layer_base(l), pages_ * book_[l]);
    std::memcpy(bigger.refs_, refs_, pages_ * sizeof(std::uint32_t));
    // Free list: this set's free pages, then the new ones (handed out lowest first).
    bigger.free_count_ = 0;
    for (std::size_t i = pages; i-- > pages_;) bigger.free_[bigger.free_count_++] = static_cast<std::uint32_t>(i);
    for (std::size_t i = 0; i < free_count_; ++i) bigger.free_[bigger.free_count_++] = free_[i];
    swap(bigger);
  }

 private:
  void swap(PageSet& o) noexcept {
    std::swap(mem_, o.mem_);
    std::swap(what_, o.what_);
    std::swap(page_memory_, o.page_memory_);
    std::swap(layers_, o.layers_);
    std::swap(book_, o.book_);
    std::swap(data_, o.data_);
    std::swap(owned_bytes_, o.owned_bytes_);
    std::swap(refs_, o.refs_);
    std::swap(free_, o.free_);
    std::swap(pages_, o.pages_);
    std::swap(free_count_, o.free_count_);
  }
  void release_storage() noexcept {
    if (owned_bytes_) mem_->deallocate(data_, owned_bytes_, page_alignment);
    if (book_) mem_->deallocate(book_, book_bytes(), alignof(std::size_t));
    data_ = nullptr;
    book_ = nullptr;
    refs_ = free_ = nullptr;
    owned_bytes_ = pages_ = free_count_ = 0;
  }

  // Bookkeeping, one allocation: layer bytes (layers), then refs and free ids (pages each).
  std::size_t book_bytes() const { return layers_ * sizeof(std::size_t) + pages_ * 2 * sizeof(std::uint32_t); }

  std::pmr::memory_resource* mem_ = nullptr;
  const char* what_ = "pages";
  PageMemory* page_memory_ = nullptr;  // nullptr: host bytes
  std::size_t layers_ = 0;
  std::size_t* book_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t owned_bytes_ = 0;
  std::uint32_t* refs_ = nullptr;  // (pages)
  std::uint32_t* free_ = nullptr;  // (pages): free page ids, free_count_ of them
  std::size_t pages_ = 0, free_count_ = 0;
};

}  // namespace cq
