#pragma once
/// Executors: how cq spreads independent work (k-means groups, attention heads) over threads.
/// The engine owns the policy: pass a cq::ThreadPool, its own Executor subclass wrapping the
/// engine's pool, or nothing (serial). cq never starts threads behind the caller's back.

#include <algorithm>
#include <atomic>
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

/// Runs fn(i) for i in [0, n), possibly concurrently, and returns when all are done. If any call
/// throws, the first exception is rethrown in the caller after all started calls finish.
class Executor {
 public:
  virtual ~Executor() = default;
  /// Threads that may run work at once (1 for serial).
  virtual std::size_t concurrency() const = 0;
  virtual void parallel_for(std::size_t n, FunctionRef<void(std::size_t)> fn) = 0;
};

class SerialExecutor final : public Executor {
 public:
  std::size_t concurrency() const override { return 1; }
  void parallel_for(std::size_t n, FunctionRef<void(std::size_t)> fn) override {
    for (std::size_t i = 0; i < n; ++i) fn(i);
  }
};

/// A fixed pool of worker threads; the calling thread works too, so ThreadPool(2) uses the caller
/// and one worker. parallel_for calls from several threads at once are serialised.
class ThreadPool final : public Executor {
 public:
  /// threads == 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(std::size_t threads = 0) {
    if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
    for (std::size_t i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  std::size_t concurrency() const override { return workers_.size() + 1; }

  void parallel_for(std::size_t n, FunctionRef<void(std::size_t)> fn) override {
    if (n == 0) return;
    if (n == 1 || workers_.empty()) {
      for (std::size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard serial(submit_mu_);
    Job job(fn, n);
    {
      std::lock_guard lock(mu_);
      job_ = &job;
      ++generation_;
    }
    wake_.notify_all();
    run(job);
    std::unique_lock lock(mu_);
    done_.wait(lock, [&] { return job.finished == job.n && job.active_workers == 0; });
    job_ = nullptr;
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    Job(FunctionRef<void(std::size_t)> f, std::size_t count) : fn(f), n(count) {}
    FunctionRef<void(std::size_t)> fn;
    std::size_t n;
    std::atomic<std::size_t> next{0};
    std::size_t finished = 0;        // guarded by mu_
    std::size_t active_workers = 0;  // guarded by mu_
    std::exception_ptr error;        // guarded by mu_
  };

  void run(Job& job) {
    std::size_t local_done = 0;
    std::exception_ptr err;
    for (std::size_t i; (i = job.next.fetch_add(1)) < job.n;) {
      try {
        job.fn(i);
      } catch (...) {
        if (!err) err = std::current_exception();
      }
      ++local_done;
    }
    std::lock_guard lock(mu_);
    job.finished += local_done;
    if (err && !job.error) job.error = err;
  }

  void worker_loop() {
    std::uint64_t seen = 0;
    for (;;) {
      Job* job;
      {
        std::unique_lock lock(mu_);
        wake_.wait(lock, [&] { return stop_ || (job_ != nullptr && generation_ != seen); });
        if (stop_) return;
        seen = generation_;
        job = job_;
        ++job->active_workers;
      }
      run(*job);
      {
        std::lock_guard lock(mu_);
        --job->active_workers;
      }
      done_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex submit_mu_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  Job* job_ = nullptr;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
};

/// Runs fn over [0, n) on `exec` if given, else serially.
inline void parallel_for(Executor* exec, std::size_t n, FunctionRef<void(std::size_t)> fn) {
  if (exec) exec->parallel_for(n, fn);
  else for (std::size_t i = 0; i < n; ++i) fn(i);
}

}  // namespace cq
