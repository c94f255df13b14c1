#pragma once
// Allocation-failure injection, for tests of the strong exception guarantee ("a mutating call
// completes, or leaves the object exactly as it was").
//
// tests/alloc_failure.cpp replaces the global operator new and operator delete for the test
// executable — every form: plain, array, aligned (std::align_val_t), nothrow, sized delete — with
// versions that allocate through malloc / posix_memalign as usual, except that a thread-local
// countdown, when armed, makes the N-th allocation from now *on the arming thread* fail: the
// throwing forms throw std::bad_alloc, the nothrow forms return nullptr (no new_handler is
// called). It is inactive by default, so the rest of the test executable allocates normally, and
// allocations on other threads (a pool's workers) never fail. Under AddressSanitizer +
// UndefinedBehaviorSanitizer the replacements run as they are (ASan intercepts the malloc and free
// they call). ThreadSanitizer's runtime brings its own operator new and delete, linked whole, so a
// ThreadSanitizer build defines CQ_ALLOC_FAILURE_WRAP and wraps the allocation functions with the
// linker instead (see alloc_failure.cpp and tests/CMakeLists.txt; allocations made inside
// libstdc++.so then cannot be failed). Link alloc_failure.cpp into a test executable once, as
// cq_tests does, with those options under ThreadSanitizer.
//
// Use: sweep N = 1, 2, ... with for_each_allocation_failure, checking the object after each
// failure, until the call completes:
//
//   PackedCodes codes = ...;
//   const PackedCodes before = codes;
//   const std::size_t failures = cq::test::for_each_allocation_failure(
//       [&] { codes.append(more.data(), 100); },   // the call under test
//       [&] { CHECK(codes == before); });          // runs after each run that an injected failure broke
//   CHECK(failures >= 1);                          // the call did allocate: failures were injected
//   // here the call has completed once (the last run, which reached no armed failure)
//
// A run counts as broken by the injection when it throws (any exception type: a cq::Error that
// wraps the std::bad_alloc counts too) after the armed allocation failed. A run that throws with
// no failure injected is a real error: it is rethrown. Keep doctest assertions out of the call
// (they allocate); put them in the check, which runs with injection off.

#include <cstddef>
#include <exception>
#include <type_traits>

namespace cq::test {

/// Arms the switch: the n-th allocation from now on this thread fails (n >= 1); 0 disarms.
/// Re-arming clears allocation_failure_injected().
void fail_nth_allocation(std::size_t n);

/// Whether an armed failure has happened on this thread since the last fail_nth_allocation call.
bool allocation_failure_injected();

/// Runs `call` with the n-th allocation failing, for n = 1, 2, ..., until a run completes without
/// reaching the armed allocation; after each run the failure broke, runs `check()` — or
/// `check(std::exception_ptr)` with what the call threw, to test the exception too. Returns how
/// many runs were broken (0: the call made no allocation on this thread). Stops after `max_runs`
/// runs (a call that allocates without bound).
template <class Call, class Check>
std::size_t for_each_allocation_failure(Call&& call, Check&& check, std::size_t max_runs = 100000) {
  std::size_t broken = 0;
  for (std::size_t n = 1; n <= max_runs; ++n) {
    fail_nth_allocation(n);
    std::exception_ptr error;
    try {
      call();
    } catch (...) {
      error = std::current_exception();
    }
    const bool injected = allocation_failure_injected();
    fail_nth_allocation(0);
    if (!error) return broken;  // completed (if it swallowed the injected failure, it still completed)
    if (!injected) std::rethrow_exception(error);
    ++broken;
    if constexpr (std::is_invocable_v<Check&, std::exception_ptr>) check(error);
    else check();
  }
  return broken;
}

}  // namespace cq::test
