// Replacement global operator new / delete with a thread-local "fail the N-th allocation" switch
// (see alloc_failure.hpp). Every replaceable form is defined, so no allocation bypasses the
// switch and every deallocation matches its allocation (all go through malloc / free).
#include "alloc_failure.hpp"

#include <cstdlib>
#include <new>

namespace {

// Trivially initialised thread-locals: reading them in operator new never allocates.
thread_local std::size_t countdown = 0;  // 0: disarmed; else allocations left until the failing one
thread_local bool injected = false;

bool fail_now() noexcept {
  if (countdown == 0 || --countdown != 0) return false;
  injected = true;
  return true;
}

[[maybe_unused]] void* allocate(std::size_t size, std::size_t alignment) noexcept {
  if (fail_now()) return nullptr;
  if (size == 0) size = 1;
  if (alignment <= alignof(std::max_align_t)) return std::malloc(size);
  void* p = nullptr;
  return posix_memalign(&p, alignment, size) == 0 ? p : nullptr;
}

[[maybe_unused]] void* allocate_or_throw(std::size_t size, std::size_t alignment) {
  void* p = allocate(size, alignment);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

}  // namespace

namespace cq::test {

void fail_nth_allocation(std::size_t n) {
  countdown = n;
  injected = false;
}

bool allocation_failure_injected() { return injected; }

}  // namespace cq::test

#if defined(CQ_ALLOC_FAILURE_WRAP)
// ThreadSanitizer's runtime defines every replaceable operator new and delete itself and is linked
// whole, so they cannot be replaced. Under it the build wraps the allocation functions instead
// (-Wl,--wrap=<mangled name>, tests/CMakeLists.txt): calls from the test executable's own code
// reach these wrappers, which fail when armed and otherwise call the runtime's (__real_...), and
// every deallocation stays the runtime's. Calls made inside libstdc++.so (e.g. std::string's
// out-of-line members) are not wrapped, so fewer allocations can be failed there.
extern "C" {
void* __real__Znwm(std::size_t);
void* __real__Znam(std::size_t);
void* __real__ZnwmSt11align_val_t(std::size_t, std::align_val_t);
void* __real__ZnamSt11align_val_t(std::size_t, std::align_val_t);
void* __real__ZnwmRKSt9nothrow_t(std::size_t, const std::nothrow_t&) noexcept;
void* __real__ZnamRKSt9nothrow_t(std::size_t, const std::nothrow_t&) noexcept;
void* __real__ZnwmSt11align_val_tRKSt9nothrow_t(std::size_t, std::align_val_t, const std::nothrow_t&) noexcept;
void* __real__ZnamSt11align_val_tRKSt9nothrow_t(std::size_t, std::align_val_t, const std::nothrow_t&) noexcept;

void* __wrap__Znwm(std::size_t n) {
  if (fail_now()) throw std::bad_alloc();
  return __real__Znwm(n);
}
void* __wrap__Znam(std::size_t n) {
  if (fail_now()) throw std::bad_alloc();
  return __real__Znam(n);
}
void* __wrap__ZnwmSt11align_val_t(std::size_t n, std::align_val_t a) {
  if (fail_now()) throw std::bad_alloc();
  return __real__ZnwmSt11align_val_t(n, a);
}
void* __wrap__ZnamSt11align_val_t(std::size_t n, std::align_val_t a) {
  if (fail_now()) throw std::bad_alloc();
  return __real__ZnamSt11align_val_t(n, a);
}
void* __wrap__ZnwmRKSt9nothrow_t(std::size_t n, const std::nothrow_t& t) noexcept {
  return fail_now() ? nullptr : __real__ZnwmRKSt9nothrow_t(n, t);
}
void* __wrap__ZnamRKSt9nothrow_t(std::size_t n, const std::nothrow_t& t) noexcept {
  return fail_now() ? nullptr : __real__ZnamRKSt9nothrow_t(n, t);
}
void* __wrap__ZnwmSt11align_val_tRKSt9nothrow_t(std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept {
  return fail_now() ? nullptr : __real__ZnwmSt11align_val_tRKSt9nothrow_t(n, a, t);
}
void* __wrap__ZnamSt11align_val_tRKSt9nothrow_t(std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept {
  return fail_now() ? nullptr : __real__ZnamSt11align_val_tRKSt9nothrow_t(n, a, t);
}
}  // extern "C"

#else

void* operator new(std::size_t n) { return allocate_or_throw(n, 0); }
void* operator new[](std::size_t n) { return allocate_or_throw(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return allocate_or_throw(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return allocate_or_throw(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate(n, 0); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate(n, 0); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate(n, static_cast<std::size_t>(a));
}

void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

#endif
