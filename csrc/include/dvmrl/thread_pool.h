// A small private thread pool for the CPU kernels.
//
// The core does not use OpenMP: PyTorch wheels bundle their own OpenMP
// runtime, and a second runtime in the same process oversubscribes the
// cores. Idle workers sleep on a condition variable instead of spinning, so
// kernel speed does not depend on OMP_WAIT_POLICY or on PyTorch's threads.
//
// Determinism contract: callers split work into blocks whose boundaries do
// not depend on the thread count, and reduce per-block partial results in
// block order afterwards. Which thread runs a block then never changes a
// result bit.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dvmrl {

class ThreadPool {
 public:
  // The process-wide pool, created on first use with default_num_threads().
  // It is never destroyed, so process exit does not wait for its workers.
  // A child of fork() gets a new pool with the parent's thread count, whose
  // workers start at its first parallel job.
  static ThreadPool& instance();

  // Number of threads that run blocks, the calling thread included (>= 1).
  int num_threads() const;
  // Resize the pool; n < 1 raises std::invalid_argument.
  void set_num_threads(int n);

  // Run fn(block) for every block in [0, n_blocks) and block until all are
  // done. The calling thread works too. Calls from inside a block run
  // serially. The first exception thrown by fn is rethrown here.
  void run(int64_t n_blocks, const std::function<void(int64_t)>& fn);

  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

 private:
  explicit ThreadPool(int n);
  static void replace_after_fork();
  void start_workers(int n_workers);
  void stop_workers();
  void worker_loop();
  void work_on_current_job();

  // Thread count set by the constructor or set_num_threads, the caller
  // included; atomic so that num_threads() needs no lock.
  std::atomic<int> threads_{1};
  int pending_workers_ = 0;  // workers to start at the next job (after fork)
  std::vector<std::thread> workers_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::mutex run_mutex_;  // one job at a time

  // Current job, guarded by mutex_ except for the atomic-free counters that
  // are only touched under the lock.
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t n_blocks_ = 0;
  int64_t next_block_ = 0;
  int64_t blocks_done_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

// OMP_NUM_THREADS when it is a positive integer (at most 1024), else the
// cores this process may run on (sched_getaffinity); at least 1.
int default_num_threads();

// Convenience: split [0, n) into blocks of `block_size` items (the last may
// be shorter) and call fn(begin, end, block_index) for each. Runs serially
// when n <= serial_threshold or the pool has one thread.
void parallel_for(int64_t n, int64_t block_size, int64_t serial_threshold,
                  const std::function<void(int64_t, int64_t, int64_t)>& fn);

inline int64_t num_blocks(int64_t n, int64_t block_size) {
  return n <= 0 ? 0 : (n + block_size - 1) / block_size;
}

}  // namespace dvmrl
