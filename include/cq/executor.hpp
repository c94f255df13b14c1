#pragma once
/// Executors: how cq spreads independent work (k-means groups, attention heads) over threads.
/// The engine owns the policy: pass a cq::ThreadPool, its own Executor subclass wrapping the
/// engine's pool, or nothing (serial). cq never starts threads behind the caller's back.

#include "cq/error.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace cq {

/// A non-owning reference to a callable (no allocation, unlike std::function).
template <class Sig>
class FunctionRef;

template <class R, class... Args>
class FunctionRef<R(Args...)> {
 public:
  template <class F>
    requires(!std::is_same_v<std::remove_cvref_t<F>, FunctionRef> && std::is_invocable_r_v<R, F&, Args...>)
  FunctionRef(F&& f)  // NOLINT(google-explicit-constructor)
      : obj_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* o, Args... a) -> R { return (*static_cast<std::remove_reference_t<F>*>(o))(std::forward<Args>(a)...); }) {}
  R operator()(Args... a) const { return call_(obj_, std::forward<Args>(a)...); }

 private:
  void* obj_;
  R (*call_)(void*, Args...);
};

/// Runs fn(i) for i in [0, n), possibly concurrently, and returns when all are done.
///
/// The contract cq relies on, which an engine's own executor must keep:
///  - parallel_for calls fn(i) once for every i in [0, n) (unless one throws, below) and returns
///    only after every call it started has returned. Calls may run on any threads, the caller's
///    included, in any order; running them all inline on the caller is a valid executor.
///  - While it waits, the calling thread may run other work submitted to the executor, such as
///    the tasks of other parallel_for calls (work-stealing pools do). So a caller must not keep
///    per-thread state (thread_local scratch) in use across parallel_for: a task run on the same
///    thread in the meantime may use, resize or free it. Per-call state lives in the caller's
///    frame, per-task state in the task.
///  - fn may itself call parallel_for, on this executor or another, and this must not deadlock
///    (a pool can run such a nested call inline, or help with its tasks while waiting).
///  - If calls throw, parallel_for rethrows one of those exceptions to the caller once every
///    started call has returned; items not yet started may then be skipped.
///  - concurrency() only sizes work splits; cq's results never depend on it or on the schedule.
class Executor {
 public:
  virtual ~Executor() = default;
  /// Threads that may run work at once (1 for serial).
  virtual std::size_t concurrency() const = 0;
  virtual void parallel_for(std::size_t n, FunctionRef<void(std::size_t)> fn) = 0;
};

/// A fixed pool of worker threads; the calling thread works too, so ThreadPool(2) uses the caller
/// and one worker. One parallel_for runs on the pool at a time. A call that finds the pool busy
/// runs inline on its own thread instead of waiting: a call nested in one of the pool's tasks
/// (which would otherwise wait for the very workers running it), a call from a task of another
/// executor that this pool's tasks wait on, or another thread's independent call.
///
/// Idle workers spin for a short while (`spin` microseconds, default 200) before sleeping, and the
/// caller spins while waiting for them: attention calls are tens of microseconds long and come
/// back to back, so a futex wake-up per call would cost as much as the work itself.
class ThreadPool final : public Executor {
 public:
  /// threads == 0 means std::thread::hardware_concurrency(). If a worker cannot be started, the
  /// workers already started are stopped and joined and cq::Error names the thread count and the
  /// system's error.
  explicit ThreadPool(std::size_t threads = 0, std::chrono::microseconds spin = std::chrono::microseconds(200))
      : spin_(spin) {
    if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
    try {
      workers_.reserve(threads - 1);
      for (std::size_t i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
    } catch (const std::exception& e) {
      const std::size_t started = workers_.size();
      stop_and_join();
      detail::fail("ThreadPool(", threads, "): starting worker thread ", started + 1, " of ", threads - 1,
                   " failed: ", e.what());
    }
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() override { stop_and_join(); }

  std::size_t concurrency() const override { return workers_.size() + 1; }

  void parallel_for(std::size_t n, FunctionRef<void(std::size_t)> fn) override {
    if (n == 0) return;
    // Inline: one item, no workers, or a call from inside this pool's own work (its workers, or
    // the caller of the call in flight running its items); checked before the lock, which that
    // caller holds.
    if (n == 1 || workers_.empty() || this_thread_pool == this) return run_inline(n, fn);
    std::unique_lock serial(submit_mu_, std::try_to_lock);
    if (!serial.owns_lock()) return run_inline(n, fn);  // busy with another thread's call
    const InPool in_pool(this);
    Job job(fn, n);
    {
      std::lock_guard lock(mu_);
      job_ = &job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    run(job);
    {
      std::lock_guard lock(mu_);
      job_ = nullptr;  // no worker joins from here on; those that joined are counted in `active`
    }
    auto finished = [&] {
      return job.done.load(std::memory_order_acquire) == job.n && job.active.load(std::memory_order_acquire) == 0;
    };
    if (!spin_until(finished)) {
      std::unique_lock lock(mu_);
      done_.wait(lock, finished);
    }
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    Job(FunctionRef<void(std::size_t)> f, std::size_t count) : fn(f), n(count) {}
    FunctionRef<void(std::size_t)> fn;
    std::size_t n;
    std::atomic<std::size_t> next{0};
    std::atomic<std::size_t> done{0};
    std::atomic<std::size_t> active{0};  // workers inside run()
    std::exception_ptr error;            // guarded by mu_
  };

  /// The pool whose work this thread is doing: its workers always, a caller during its call.
  static inline thread_local const ThreadPool* this_thread_pool = nullptr;
  struct InPool {
    explicit InPool(const ThreadPool* p) : prev(std::exchange(this_thread_pool, p)) {}
    ~InPool() { this_thread_pool = prev; }
    InPool(const InPool&) = delete;
    InPool& operator=(const InPool&) = delete;
    const ThreadPool* prev;
  };

  static void run_inline(std::size_t n, FunctionRef<void(std::size_t)> fn) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
  }

  void stop_and_join() noexcept {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& w : workers_)
      if (w.joinable()) w.join();
  }

  template <class Pred>
  bool spin_until(Pred pred) const {
    const auto deadline = std::chrono::steady_clock::now() + spin_;
    for (unsigned i = 0;; ++i) {
      if (pred()) return true;
      if ((i & 63) == 63 && std::chrono::steady_clock::now() >= deadline) return false;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }

  void run(Job& job) {
    std::exception_ptr err;
    std::size_t mine = 0;
    for (std::size_t i; (i = job.next.fetch_add(1, std::memory_order_relaxed)) < job.n;) {
      try {
        job.fn(i);
      } catch (...) {
        if (!err) err = std::current_exception();
      }
      ++mine;
    }
    if (err) {
      std::lock_guard lock(mu_);
      if (!job.error) job.error = err;
    }
    job.done.fetch_add(mine, std::memory_order_acq_rel);
  }

  void worker_loop() {
    this_thread_pool = this;
    // Generation 0 is the pool's state at construction, before any job or stop: starting from
    // there (not from whatever the counter holds when this thread first runs) means a worker that
    // starts late still sees every later job and the stop.
    std::uint64_t seen = 0;
    for (;;) {
      if (!spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; })) {
        std::unique_lock lock(mu_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      Job* job;
      {
        std::lock_guard lock(mu_);
        if (stop_) return;
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
        if (job == nullptr) continue;  // that job has already been handed out and closed
        job->active.fetch_add(1, std::memory_order_acq_rel);
      }
      run(*job);
      {
        std::lock_guard lock(mu_);  // pairs with the caller's condition-variable wait
        job->active.fetch_sub(1, std::memory_order_acq_rel);
      }
      done_.notify_all();
    }
  }

  std::chrono::microseconds spin_;
  std::vector<std::thread> workers_;
  std::mutex submit_mu_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  Job* job_ = nullptr;
  std::atomic<std::uint64_t> generation_{0};
  bool stop_ = false;
};

/// Runs fn over [0, n) on `exec` if given, else serially.
inline void parallel_for(Executor* exec, std::size_t n, FunctionRef<void(std::size_t)> fn) {
  if (exec) exec->parallel_for(n, fn);
  else for (std::size_t i = 0; i < n; ++i) fn(i);
}

}  // namespace cq
