#pragma once
// A test-only work-stealing executor: the scheduling that engines' pools (TBB, folly, Taskflow,
// a llama.cpp-style pool) have and cq::ThreadPool does not. parallel_for queues its items as tasks
// on one shared queue; workers run tasks from it; and the calling thread, until its own items are
// done, runs whatever task is queued first — often a task of *another* parallel_for call, nested
// or from another thread. So a thread inside parallel_for runs unrelated work in the meantime,
// which is what Executor's contract (executor.hpp) warns callers about. Nested calls make
// progress because every waiting thread helps. Simple over fast: one mutex guards everything, so
// it is clean under ThreadSanitizer.

#include <cq/executor.hpp>

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace cq::test {

class WorkStealingExecutor final : public Executor {
 public:
  /// `threads` threads run work: the caller and threads - 1 workers.
  explicit WorkStealingExecutor(std::size_t threads) {
    for (std::size_t i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  WorkStealingExecutor(const WorkStealingExecutor&) = delete;
  WorkStealingExecutor& operator=(const WorkStealingExecutor&) = delete;
  ~WorkStealingExecutor() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }

  std::size_t concurrency() const override { return workers_.size() + 1; }

  void parallel_for(std::size_t n, FunctionRef<void(std::size_t)> fn) override {
    if (n == 0) return;
    Call call{fn, n, nullptr};
    std::unique_lock lock(mu_);
    for (std::size_t i = 0; i < n; ++i) queue_.push_back({&call, i});
    cv_.notify_all();
    // Help until this call's items are done: run the oldest queued task, whichever call it is of.
    while (call.remaining > 0) {
      if (queue_.empty()) {
        cv_.wait(lock);
        continue;
      }
      const Task t = queue_.front();
      queue_.pop_front();
      if (t.call != &call) ++stolen_;
      run(t, lock);
    }
    if (call.error) std::rethrow_exception(call.error);
  }

  /// Tasks that a caller waiting in parallel_for ran for another call.
  std::size_t stolen() const {
    std::lock_guard lock(mu_);
    return stolen_;
  }

 private:
  struct Call {
    FunctionRef<void(std::size_t)> fn;
    std::size_t remaining;      // guarded by mu_
    std::exception_ptr error;   // guarded by mu_
  };
  struct Task {
    Call* call;
    std::size_t index;
  };
  // Runs t with the lock released; `lock` is held on entry and on return.
  void run(const Task& t, std::unique_lock<std::mutex>& lock) {
    lock.unlock();
    std::exception_ptr err;
    try {
      t.call->fn(t.index);
    } catch (...) {
      err = std::current_exception();
    }
    lock.lock();
    if (err && !t.call->error) t.call->error = err;
    // The caller may return (and destroy *t.call) once it sees 0; it can only look under mu_,
    // which this thread holds until it no longer touches the call.
    if (--t.call->remaining == 0) cv_.notify_all();
  }

  void work() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      const Task t = queue_.front();
      queue_.pop_front();
      run(t, lock);
    }
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  std::vector<std::thread> workers_;
  std::size_t stolen_ = 0;
  bool stop_ = false;
};

}  // namespace cq::test
