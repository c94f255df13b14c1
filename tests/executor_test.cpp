// Executors that are not simple thread pools: nested parallel_for calls, a pool whose
// construction fails part-way, and a work-stealing executor whose waiting callers run other
// calls' tasks. Names contain "ThreadPool" or "thread" so tests/run.sh's ThreadSanitizer pass
// runs them.
#include "alloc_failure.hpp"
#include "test_util.hpp"
#include "work_stealing_executor.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>

#if defined(__unix__)
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

using namespace cq;

namespace {

// Runs f on its own thread; if it has not returned within `limit` (a deadlock), reports and ends
// the test run, which would otherwise hang.
template <class F>
void within(std::chrono::seconds limit, const char* what, F&& f) {
  std::packaged_task<void()> task(std::forward<F>(f));
  std::future<void> done = task.get_future();
  std::thread t(std::move(task));
  if (done.wait_for(limit) != std::future_status::ready) {
    std::fprintf(stderr, "FATAL: %s did not return within %lld s (deadlock)\n", what,
                 static_cast<long long>(limit.count()));
    std::_Exit(1);
  }
  t.join();
  done.get();
}

}  // namespace

TEST_CASE("ThreadPool: parallel_for nested in the pool's own tasks runs inline on the task's thread") {
  for (std::size_t threads : {2u, 3u}) {
    ThreadPool pool(threads);
    constexpr std::size_t A = 6, B = 5, C = 4;
    std::vector<std::atomic<int>> hits(A * B * C);
    std::vector<std::atomic<int>> off_thread(A);
    within(std::chrono::seconds(60), "nested ThreadPool::parallel_for", [&] {
      pool.parallel_for(A, [&](std::size_t i) {
        const auto me = std::this_thread::get_id();
        pool.parallel_for(B, [&](std::size_t j) {
          if (std::this_thread::get_id() != me) ++off_thread[i];
          pool.parallel_for(C, [&](std::size_t k) { ++hits[(i * B + j) * C + k]; });
        });
      });
    });
    for (auto& h : hits) REQUIRE(h == 1);
    for (auto& o : off_thread) CHECK(o == 0);
  }
}

TEST_CASE("ThreadPool: a worker that cannot start stops and joins the started ones and throws cq::Error") {
  // Fail each allocation of the constructor in turn (the worker vector, each thread's state):
  // workers already started once waited on a condition variable that unwinding destroyed.
  std::size_t broken = 0;
  std::vector<std::string> messages;
  within(std::chrono::seconds(60), "ThreadPool construction under allocation failures", [&] {
    broken = test::for_each_allocation_failure([] { ThreadPool pool(6); }, [&](std::exception_ptr e) {
      try {
        std::rethrow_exception(e);
      } catch (const Error& err) {
        messages.emplace_back(err.what());
      } catch (const std::exception& other) {
        messages.emplace_back(std::string("not a cq::Error: ") + other.what());
      }
    });
  });
  CHECK(broken >= 6);
  REQUIRE(messages.size() == broken);
  for (const auto& m : messages) {
    CAPTURE(m);
    CHECK(m.find("cq: ThreadPool(6): starting worker thread ") == 0);
    CHECK(m.find(" of 5 failed: ") != std::string::npos);
  }
  CHECK(messages.back().find("starting worker thread 5 of 5") != std::string::npos);
}

TEST_CASE("ThreadPool(100000) under an address-space limit throws cq::Error naming the count") {
#if CQ_TEST_SANITIZED || !defined(__unix__)  // CQ_TEST_SANITIZED: test_util.hpp
  MESSAGE("skipped: needs fork and an address-space limit, which sanitizers' shadow memory cannot live under");
#else
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    alarm(30);  // a hang ends the child by SIGALRM
    // The address space in use plus 512 MiB: room for a few dozen 8 MiB thread stacks.
    unsigned long pages = 0;
    if (std::FILE* f = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(f, "%lu", &pages) != 1) pages = 0;
      std::fclose(f);
    }
    const rlim_t limit = pages * static_cast<rlim_t>(sysconf(_SC_PAGESIZE)) + (rlim_t{512} << 20);
    const rlimit lim{limit, limit};
    if (pages == 0 || setrlimit(RLIMIT_AS, &lim) != 0) _exit(2);
    try {
      ThreadPool pool(100000);
      _exit(3);  // the limit did not bite
    } catch (const Error& e) {
      const std::string m = e.what();
      _exit(m.find("ThreadPool(100000): starting worker thread ") != std::string::npos ? 0 : 4);
    } catch (...) {
      _exit(5);
    }
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  INFO("child status ", status,
       " (exit 0: cq::Error; 3: no failure; 4: wrong message; 5: another exception; SIGALRM: hang)");
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
#endif
}

TEST_CASE("ThreadPool and a work-stealing executor nest in each other without deadlock") {
  ThreadPool pool(3);
  test::WorkStealingExecutor ws(3);
  constexpr std::size_t A = 8, B = 6, C = 4;
  std::vector<std::atomic<int>> first(A * B * C), second(A * B * C);
  within(std::chrono::seconds(120), "ThreadPool nested with a work-stealing executor", [&] {
    // Pool tasks wait on work-stealing calls whose tasks (on the executor's workers too) call
    // back into the busy pool...
    pool.parallel_for(A, [&](std::size_t i) {
      ws.parallel_for(B, [&](std::size_t j) {
        pool.parallel_for(C, [&](std::size_t k) { ++first[(i * B + j) * C + k]; });
      });
    });
    // ...and work-stealing tasks, on several threads at once, call the pool, whose tasks call
    // back into the work-stealing executor.
    ws.parallel_for(A, [&](std::size_t i) {
      pool.parallel_for(B, [&](std::size_t j) {
        ws.parallel_for(C, [&](std::size_t k) { ++second[(i * B + j) * C + k]; });
      });
    });
  });
  for (auto& h : first) REQUIRE(h == 1);
  for (auto& h : second) REQUIRE(h == 1);
}

TEST_CASE("fits are reproducible on a work-stealing executor, nested in its tasks or in a ThreadPool's") {
  const std::size_t n = 1500, D = 16;
  std::vector<std::vector<float>> xs;
  for (std::uint64_t s = 0; s < 4; ++s) xs.push_back(synthetic_kv(n, D, {.seed = 60 + s}));
  FitOptions o;
  o.iterations = 6;
  auto fit = [&](std::size_t i, Executor* exec) {
    Codebook cb(D, 4, 5);
    FitOptions oi = o;
    oi.executor = exec;
    fit_codebook(cb, ConstMatrixView<float>(xs[i].data(), n, D), {}, oi);
    return cb;
  };
  std::vector<Codebook> serial;
  for (std::size_t i = 0; i < xs.size(); ++i) serial.push_back(fit(i, nullptr));

  test::WorkStealingExecutor ws(3);
  ThreadPool pool(3);
  std::vector<Codebook> flat(xs.size()), nested(xs.size()), in_pool(xs.size());
  within(std::chrono::seconds(120), "fits on a work-stealing executor", [&] {
    for (std::size_t i = 0; i < xs.size(); ++i) flat[i] = fit(i, &ws);
    // Several fits at once, each spreading its groups over the same executor: waiting callers run
    // other fits' groups.
    ws.parallel_for(xs.size(), [&](std::size_t i) { nested[i] = fit(i, &ws); });
    pool.parallel_for(xs.size(), [&](std::size_t i) { in_pool[i] = fit(i, &pool); });
  });
  MESSAGE("tasks run by a waiting caller for another call: ", ws.stolen());
  for (std::size_t i = 0; i < xs.size(); ++i) {
    CHECK(flat[i] == serial[i]);
    CHECK(nested[i] == serial[i]);
    CHECK(in_pool[i] == serial[i]);
  }
}
