#include "dvmrl/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace dvmrl {

namespace {
// True on pool workers and on a caller while it runs a job, so nested
// parallel calls run serially instead of deadlocking.
thread_local bool in_parallel_region = false;

// Largest default thread count taken from OMP_NUM_THREADS. It equals the
// Python side's MAX_THREADS, far above the core count of any CPU.
constexpr long kMaxThreads = 1024;
}  // namespace

int default_num_threads() {
  // OMP_NUM_THREADS, as batch-system scripts set it for every threaded
  // library; OpenMP reads a list ("4,2") for nested levels, so the first
  // number counts. Blanks around it are accepted, as GNU OpenMP (libgomp)
  // accepts " 3 , 1". A value that is not a positive integer is ignored.
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    const char* rest = end;
    while (std::isspace(static_cast<unsigned char>(*rest))) ++rest;
    if (end != env && (*rest == '\0' || *rest == ',') && n > 0)
      return static_cast<int>(n < kMaxThreads ? n : kMaxThreads);
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

namespace {
// Never deleted: destroying it at exit would join workers, and in a child
// of fork() the inherited pool's workers do not exist.
ThreadPool* process_pool = nullptr;
std::once_flag process_pool_once;
}  // namespace

ThreadPool& ThreadPool::instance() {
  std::call_once(process_pool_once, [] {
    process_pool = new ThreadPool(default_num_threads());
    pthread_atfork(nullptr, nullptr, &ThreadPool::replace_after_fork);
  });
  return *process_pool;
}

// Runs in the child right after fork(), where only the forking thread
// exists. The inherited pool cannot be used or destroyed: its condition
// variables count waiters that are gone, its mutexes may be held by them,
// and its std::thread objects are joinable. So it is abandoned, and a new
// pool without threads takes over; its workers start at the first job,
// outside this handler.
void ThreadPool::replace_after_fork() {
  if (process_pool == nullptr) return;
  const int threads = process_pool->threads_.load();
  ThreadPool* pool = new ThreadPool(1);
  pool->threads_.store(threads);
  pool->pending_workers_ = threads - 1;
  process_pool = pool;
}

ThreadPool::ThreadPool(int n) {
  threads_.store(n);
  start_workers(n - 1);
}

ThreadPool::~ThreadPool() { stop_workers(); }

int ThreadPool::num_threads() const { return threads_.load(); }

void ThreadPool::set_num_threads(int n) {
  if (n < 1) {
    throw std::invalid_argument("set_num_threads(): expected n >= 1, got " +
                                std::to_string(n));
  }
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  stop_workers();
  pending_workers_ = 0;
  threads_.store(n);
  start_workers(n - 1);
}

void ThreadPool::start_workers(int n_workers) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = false;
  }
  for (int i = 0; i < n_workers; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::work_on_current_job() {
  // Claim blocks one at a time under the lock; blocks are coarse (many
  // compositions each), so the lock is not contended in practice.
  std::unique_lock<std::mutex> lock(mutex_);
  while (job_ != nullptr && next_block_ < n_blocks_) {
    int64_t block = next_block_++;
    const auto* job = job_;
    lock.unlock();
    try {
      (*job)(block);
    } catch (...) {
      lock.lock();
      if (!error_) error_ = std::current_exception();
      lock.unlock();
    }
    lock.lock();
    if (++blocks_done_ == n_blocks_) done_.notify_all();
  }
}

void ThreadPool::worker_loop() {
  in_parallel_region = true;
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || (job_ != nullptr && generation_ != seen); });
      if (stopping_) return;
      seen = generation_;
    }
    work_on_current_job();
  }
}

void ThreadPool::run(int64_t n_blocks, const std::function<void(int64_t)>& fn) {
  if (n_blocks <= 0) return;
  if (in_parallel_region || n_blocks == 1) {
    for (int64_t b = 0; b < n_blocks; ++b) fn(b);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  if (pending_workers_ > 0) {
    start_workers(pending_workers_);
    pending_workers_ = 0;
  }
  if (workers_.empty()) {
    for (int64_t b = 0; b < n_blocks; ++b) fn(b);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = &fn;
    n_blocks_ = n_blocks;
    next_block_ = 0;
    blocks_done_ = 0;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  in_parallel_region = true;
  work_on_current_job();
  in_parallel_region = false;
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return blocks_done_ == n_blocks_; });
    job_ = nullptr;
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

void parallel_for(int64_t n, int64_t block_size, int64_t serial_threshold,
                  const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (block_size < 1) block_size = 1;
  const int64_t blocks = num_blocks(n, block_size);
  auto body = [&](int64_t b) {
    int64_t begin = b * block_size;
    int64_t end = begin + block_size < n ? begin + block_size : n;
    fn(begin, end, b);
  };
  if (n <= serial_threshold || ThreadPool::instance().num_threads() == 1) {
    for (int64_t b = 0; b < blocks; ++b) body(b);
    return;
  }
  ThreadPool::instance().run(blocks, body);
}

}  // namespace dvmrl
