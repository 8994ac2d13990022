// cosched's dispatch loop: runs a schedule's kernels on CPU streams.
//
// One persistent worker thread per stream runs that stream's kernels in order. A kernel starts once
// the kernels it waits on (on other streams) are done and a core of the budget is free; both waits
// block on a condition variable rather than spinning, so idle workers leave the cores to the busy
// ones. Cores are shared work-conservingly: a kernel runs on every free core up to its stream's cap,
// leaving one to each other stream that is ready, so a stream alone gets the whole budget. Each
// kernel's parallel loops run on the worker and the helper threads bound to its grant (below).
//
// The plan (plan.h) is backend-neutral: executor_cuda.cc runs the same plan with one launcher thread
// that puts each kernel on its CUDA stream and orders streams with events.

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "plan.h"

namespace ffi = tvm::ffi;

// TVM's C ABI for the parallel loops of compiled CPU kernels (tvm/runtime/c_backend_api.h), declared
// here so that the executor builds with tvm-ffi's headers alone.
extern "C" {
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
}

namespace cosched {

// Why the executor runs parallel loops itself: TVM gives every calling thread its own pool, so S
// streams on C cores keep S pools of C threads, and a pool's idle workers spin for ~100 ms, on the
// cores the other streams' kernels need (benchmarks/results/spin-streams-demo.txt: ~17,000
// involuntary context switches per breadth-first run of the demo mix). Here one set of C - 1
// helpers serves every stream: a kernel granted k cores runs on its stream's worker and the k - 1
// helpers bound to its grant; a helper spins (yielding) only while its core is its own (its grant,
// or a core nobody was granted) and then sleeps. A loop is cut into at least C tasks, taken by whichever
// thread is free, so a kernel granted one core gets help from a helper whose core went idle (its
// stream waiting on another's kernel) instead of leaving that core unused. Kernels with barriers
// between their parallel tasks keep TVM's pools (native.route_parallel_loops): here tasks may share
// a thread.

// How long a helper waits for the next loop (yielding) before it sleeps, counted in yields rather
// than time: on a shared VM a helper's vCPU is descheduled for milliseconds at a time, and a
// deadline in time sent it to sleep as soon as it ran again, so that every later loop paid a wake-up
// (~0.4 ms) or ran on fewer threads (SqueezeNet alone after an idle pause: 1.5x slower with 0.5 ms).
// About TVM's pool default (300000 yields, ~100 ms).
constexpr uint32_t kHelperSpinYields = 200000;

class HelperPool;

// One parallel loop. Tasks go to whichever thread is free first (the calling stream worker, the
// helpers it posted the loop to, idle helpers joining in), so a helper that is asleep or off its core
// when the loop starts delays nothing: the caller runs its tasks and takes the post back.
struct ParallelJob {
  FTVMParallelLambda f = nullptr;
  void* cdata = nullptr;
  TVMParallelGroupEnv env{};
  std::atomic<int> next{0};      // the next task nobody runs yet
  std::atomic<int> finished{0};  // helpers that took the loop and are done with it
  int joined = 0;                // idle helpers that took it (guarded by HelperPool::mu_)
  std::atomic<bool> failed{false};
  ffi::Optional<ffi::Error> error;  // a helper's error, raised again on the calling thread
  std::mutex error_mu;

  bool HasTasks() const { return next.load(std::memory_order_relaxed) < env.num_task; }

  // Runs tasks until none is left, or until `go_on` says to stop (checked before each task).
  template <typename F = bool (*)()>
  int RunTasks(F go_on = [] { return true; }) {
    int rc = 0;
    while (go_on()) {
      int t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= env.num_task) break;
      if (f(t, &env, cdata) != 0) rc = -1;
    }
    return rc;
  }

  // On a helper: runs tasks (while a core is idle, if it `joined`), keeps the first error, and lets
  // the caller go.
  void Help(const HelperPool* pool, bool joined);
};

// Whether this thread is running tasks of a parallel loop (a loop launched inside one runs inline).
thread_local bool tls_in_task = false;

class Helper;

// The helpers of one executor, the cores nobody holds, and the loops idle helpers may join.
class HelperPool {
 public:
  HelperPool(int64_t cores, size_t streams);
  ~HelperPool();

  int64_t cores() const { return cores_; }
  Helper* helper(size_t i) const { return helpers_[i].get(); }
  size_t size() const { return helpers_.size(); }
  void SetIdleCores(int64_t n) { idle_cores_.store(n, std::memory_order_relaxed); }
  bool CoresIdle() const { return idle_cores_.load(std::memory_order_relaxed) > 0; }

  // Lets idle helpers join `job` of `stream` (waking one if a core is idle) until Close.
  void Open(size_t stream, ParallelJob* job);
  // Returns how many idle helpers joined; none joins after this.
  int Close(size_t stream);
  // A loop with tasks left that an idle helper may join (counted in its `joined`), or null.
  ParallelJob* Join();

 private:
  int64_t cores_;
  std::atomic<int64_t> idle_cores_;
  std::atomic<int> open_count_{0};
  std::mutex mu_;
  std::vector<ParallelJob*> open_;  // per stream
  std::vector<std::unique_ptr<Helper>> helpers_;
};

class Helper {
 public:
  explicit Helper(HelperPool* pool) : pool_(pool) { thread_ = std::thread([this] { Loop(); }); }

  ~Helper() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
    }
    cv_.notify_one();
    thread_.join();
  }

  void Bind(bool bound) { bound_.store(bound, std::memory_order_relaxed); }
  bool Idle() const { return !bound_.load(std::memory_order_relaxed); }

  void Post(ParallelJob* job) {
    slot_.store(job, std::memory_order_seq_cst);
    Wake();
  }

  // Wakes the helper if it sleeps (to take a post or join a loop).
  void Wake() {
    poked_.store(true, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst)) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_one();
    }
  }

  // Takes back a post the helper has not picked up; false once it has (then it finishes with it).
  bool Retract(ParallelJob* job) { return slot_.compare_exchange_strong(job, nullptr, std::memory_order_acq_rel); }

 private:
  void Loop() {
    bool joined = false;
    while (ParallelJob* job = WaitForJob(&joined)) job->Help(pool_, joined);
  }

  ParallelJob* Take() {
    if (slot_.load(std::memory_order_relaxed) == nullptr) return nullptr;
    return slot_.exchange(nullptr, std::memory_order_acq_rel);
  }

  // Spins while the core is this helper's to use (its stream's grant, or one nobody was granted),
  // joining loops while it is idle, then sleeps; null once the executor stops.
  ParallelJob* WaitForJob(bool* joined) {
    *joined = false;
    while (true) {
      for (uint32_t i = 1;; ++i) {
        if (ParallelJob* job = Take()) return job;
        if ((i & 7) == 0) {
          if (stop_.load()) return nullptr;
          bool idle = Idle();
          bool cores_idle = pool_->CoresIdle();
          if (idle && cores_idle) {
            if (ParallelJob* job = pool_->Join()) {
              *joined = true;
              return job;
            }
          }
          if ((idle && !cores_idle) || i > kHelperSpinYields) break;
        }
        // Yield rather than pause: the pause loop of a spinning vCPU can make the hypervisor
        // deschedule it, and a yield lends the core to a thread waiting for it.
        std::this_thread::yield();
      }
      std::unique_lock<std::mutex> lock(mu_);
      sleeping_.store(true, std::memory_order_seq_cst);
      cv_.wait(lock, [&] { return stop_.load() || poked_.load(std::memory_order_seq_cst); });
      sleeping_.store(false, std::memory_order_relaxed);
      poked_.store(false, std::memory_order_relaxed);
      if (stop_.load()) return nullptr;
    }
  }

  HelperPool* pool_;
  std::atomic<ParallelJob*> slot_{nullptr};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> poked_{false};
  std::atomic<bool> bound_{false};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
};

HelperPool::HelperPool(int64_t cores, size_t streams) : cores_(cores), idle_cores_(cores), open_(streams, nullptr) {
  for (int64_t i = 1; i < cores; ++i) helpers_.push_back(std::make_unique<Helper>(this));
}

HelperPool::~HelperPool() = default;

void ParallelJob::Help(const HelperPool* pool, bool joined) {
  tls_in_task = true;
  // A helper that joined leaves once the idle core it used is granted: it would take it from a kernel.
  if (RunTasks([&] { return !joined || pool->CoresIdle(); }) != 0) {
    ffi::Error err = ffi::details::MoveFromSafeCallRaised();
    std::lock_guard<std::mutex> lock(error_mu);
    if (!failed.exchange(true)) error = std::move(err);
  }
  tls_in_task = false;
  finished.fetch_add(1, std::memory_order_release);
}

void HelperPool::Open(size_t stream, ParallelJob* job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    open_[stream] = job;
  }
  open_count_.fetch_add(1, std::memory_order_relaxed);
  if (CoresIdle()) {
    for (auto& h : helpers_) {
      if (h->Idle()) {
        h->Wake();
        break;
      }
    }
  }
}

int HelperPool::Close(size_t stream) {
  open_count_.fetch_sub(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(mu_);
  int joined = open_[stream]->joined;
  open_[stream] = nullptr;
  return joined;
}

ParallelJob* HelperPool::Join() {
  if (open_count_.load(std::memory_order_relaxed) == 0) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  for (ParallelJob* job : open_) {
    if (job != nullptr && job->HasTasks()) {
      ++job->joined;
      return job;
    }
  }
  return nullptr;
}

// What a stream worker's parallel loops run on: the pool, its stream, the helpers of its grant.
struct StreamThreads {
  HelperPool* pool = nullptr;
  size_t stream = 0;
  std::vector<Helper*> bound;  // changed by the stream's own worker only (Acquire/Release)
};

// The calling stream worker's threads; null on threads that are not ours.
thread_local const StreamThreads* tls_stream = nullptr;

template <typename F>
F TvmRuntimeFunction(const char* name) {
  // libtvm_runtime is loaded with RTLD_GLOBAL before any kernel library (native.load_tvm_runtime).
  return reinterpret_cast<F>(dlsym(RTLD_DEFAULT, name));
}

int LaunchOnHelpers(const StreamThreads& st, FTVMParallelLambda f, void* cdata, int num_task) {
  ParallelJob job;
  job.f = f;
  job.cdata = cdata;
  int threads = static_cast<int>(st.bound.size()) + 1;
  // Compiled kernels pass 0 ("one task per thread") and split their loop by env.num_task. A loop
  // granted fewer than all cores gets two tasks per core, so that helpers on cores that go idle
  // have tasks to join, and leave again soon when the core is granted.
  int64_t cores = st.pool->cores();
  job.env.num_task = num_task > 0 ? num_task : static_cast<int>(threads < cores ? 2 * cores : threads);
  int posted = std::min(threads, job.env.num_task) - 1;
  for (int i = 0; i < posted; ++i) st.bound[i]->Post(&job);
  bool open = job.env.num_task > threads && st.pool->size() > 0;
  if (open) st.pool->Open(st.stream, &job);
  tls_in_task = true;
  int rc = job.RunTasks();
  tls_in_task = false;
  int taken = open ? st.pool->Close(st.stream) : 0;
  for (int i = 0; i < posted; ++i) taken += st.bound[i]->Retract(&job) ? 0 : 1;
  // A helper still in a task may be waiting for this very core: yield it.
  while (job.finished.load(std::memory_order_acquire) != taken) std::this_thread::yield();
  if (job.failed.load()) {
    if (rc == 0) {
      if (job.error.has_value()) {
        ffi::details::SetSafeCallRaised(job.error.value());
      } else {
        TVMFFIErrorSetRaisedFromCStr("RuntimeError", "a parallel task of a kernel failed");
      }
    }
    return -1;
  }
  return rc;
}

}  // namespace cosched

// What compiled kernels call for a parallel loop once native.route_parallel_loops pointed their
// library at it. Off the executor's workers (another runtime sharing the library) it is TVM's own.
extern "C" TVM_FFI_DLL_EXPORT int cosched_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  if (cosched::tls_in_task) {
    // A loop inside a parallel task (TVM refuses these): run it on this thread.
    TVMParallelGroupEnv env{nullptr, 1};
    return flambda(0, &env, cdata);
  }
  if (cosched::tls_stream != nullptr) return cosched::LaunchOnHelpers(*cosched::tls_stream, flambda, cdata, num_task);
  static auto tvm_launch =
      cosched::TvmRuntimeFunction<int (*)(FTVMParallelLambda, void*, int)>("TVMBackendParallelLaunch");
  if (tvm_launch == nullptr) {
    TVMFFIErrorSetRaisedFromCStr("RuntimeError", "TVMBackendParallelLaunch not found: load libtvm_runtime first");
    return -1;
  }
  return tvm_launch(flambda, cdata, num_task);
}

namespace cosched {

class CpuExecutor {
 public:
  // `own_threads`: parallel loops run on the executor's helpers (kernels routed to
  // cosched_parallel_launch), else on each worker's TVM pool.
  CpuExecutor(Plan plan, bool own_threads)
      : plan_(std::move(plan)), done_(plan_.kernels.size(), 0), own_threads_(own_threads) {
    cores_free_ = plan_.core_budget;
    holding_.assign(plan_.stream_calls.size(), 0);
    next_.assign(plan_.stream_calls.size(), 0);
    streams_.resize(plan_.stream_calls.size());
    if (own_threads_) {
      pool_ = std::make_unique<HelperPool>(plan_.core_budget, plan_.stream_calls.size());
      for (size_t i = 0; i < pool_->size(); ++i) free_helpers_.push_back(pool_->helper(i));
      for (size_t s = 0; s < streams_.size(); ++s) streams_[s] = StreamThreads{pool_.get(), s, {}};
    }
    for (size_t s = 0; s < plan_.stream_calls.size(); ++s) {
      workers_.emplace_back([this, s] { WorkerLoop(s); });
    }
  }

  ~CpuExecutor() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }

  // Runs every stream once over `tensors`. `timings`, if given, is an int64 [num_calls, 2] tensor
  // that receives start/end nanoseconds (steady clock, relative to the run's start).
  void Run(ffi::Array<ffi::Tensor> tensors, ffi::Optional<ffi::Tensor> timings) {
    std::unique_lock<std::mutex> lock(mu_);
    tensors_ = &tensors;
    timings_ = timings.has_value() ? static_cast<int64_t*>(timings.value().data_ptr()) : nullptr;
    t0_ = std::chrono::steady_clock::now();
    error_.clear();
    std::fill(next_.begin(), next_.end(), 0);
    std::fill(holding_.begin(), holding_.end(), 0);
    running_ = static_cast<int>(workers_.size());
    ++generation_;
    cv_.notify_all();
    finished_.wait(lock, [this] { return running_ == 0; });
    tensors_ = nullptr;
    if (!error_.empty()) {
      std::string msg = error_;
      throw ffi::Error("RuntimeError", msg, "");
    }
  }

 private:
  void WorkerLoop(size_t stream) {
    auto config = ffi::Function::GetGlobal("runtime.config_threadpool");
    if (own_threads_) tls_stream = &streams_[stream];
    int64_t pool_size = 0;
    uint64_t seen = 0;
    std::vector<ffi::AnyView> args;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      for (int64_t call : plan_.stream_calls[stream]) {
        int64_t cores = Acquire(stream, call, seen);
        if (cores == 0) break;
        if (!own_threads_ && cores != pool_size && config.has_value()) {
          // Mode 1 ("big cores") with a count: this worker's TVM pool runs the kernel on `cores` threads.
          (*config)(1, static_cast<int>(cores));
          pool_size = cores;
        }
        const auto& slots = plan_.args[call];
        args.resize(slots.size());
        for (size_t i = 0; i < slots.size(); ++i) args[i] = (*tensors_)[slots[i]];
        int64_t start = Now();
        try {
          ffi::Any rv;
          plan_.kernels[call].CallPacked(args.data(), static_cast<int32_t>(args.size()), &rv);
        } catch (const std::exception& err) {
          Fail(call, err.what());
        }
        int64_t end = Now();
        if (timings_ != nullptr) {
          timings_[2 * call] = start;
          timings_[2 * call + 1] = end;
        }
        Release(stream, call, cores, seen);
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (--running_ == 0) finished_.notify_one();
    }
  }

  // Whether `call` may start in run `gen`: every call it waits on is done in this run.
  bool DepsDone(int64_t call, uint64_t gen) const {
    for (int64_t w : plan_.waits[call]) {
      if (done_[w] != gen) return false;
    }
    return true;
  }

  // Blocks until `call`'s waits are done in this run and a core is free; returns the cores granted
  // (0 once the run failed). Work-conserving: the kernel takes the free cores up to its stream's cap,
  // but leaves one to every other stream whose next kernel is ready and that holds none, so busy
  // streams co-run while a stream alone gets the whole budget.
  int64_t Acquire(size_t stream, int64_t call, uint64_t gen) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !error_.empty() || DepsDone(call, gen); });
    cv_.wait(lock, [&] { return !error_.empty() || cores_free_ >= 1; });
    if (!error_.empty()) return 0;
    int64_t others = 0;
    for (size_t s = 0; s < plan_.stream_calls.size(); ++s) {
      const auto& calls = plan_.stream_calls[s];
      if (s != stream && holding_[s] == 0 && next_[s] < calls.size() && DepsDone(calls[next_[s]], gen)) ++others;
    }
    int64_t cores = std::max<int64_t>(1, std::min(plan_.threads[stream], cores_free_ - others));
    cores_free_ -= cores;
    holding_[stream] = cores;
    if (own_threads_) {
      pool_->SetIdleCores(cores_free_);
      // Enough are free: the grants' helpers sum to at most the budget less one per holding stream.
      for (int64_t i = 1; i < cores; ++i) {
        free_helpers_.back()->Bind(true);
        streams_[stream].bound.push_back(free_helpers_.back());
        free_helpers_.pop_back();
      }
    }
    return cores;
  }

  void Release(size_t stream, int64_t call, int64_t cores, uint64_t gen) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cores_free_ += cores;
      holding_[stream] = 0;
      if (own_threads_) {
        pool_->SetIdleCores(cores_free_);
        for (Helper* h : streams_[stream].bound) {
          h->Bind(false);
          free_helpers_.push_back(h);
        }
        streams_[stream].bound.clear();
      }
      ++next_[stream];
      done_[call] = gen;
    }
    cv_.notify_all();
  }

  void Fail(int64_t call, const char* what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.empty()) error_ = "kernel call " + std::to_string(call) + " failed: " + what;
  }

  int64_t Now() const {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_)
        .count();
  }

  Plan plan_;
  std::vector<uint64_t> done_;  // generation in which each call last finished
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;  // workers: a new run, a finished dependency, a freed core
  // The caller waits apart from the workers: sharing cv_ woke it after every kernel, a context
  // switch on the cores the kernels run on (ShuffleNet, 2 cores: 2.8 us between kernels, 0.2 us
  // apart; benchmarks/results/executor-ab-shufflenet.txt).
  std::condition_variable finished_;
  uint64_t generation_ = 0;
  int running_ = 0;
  int64_t cores_free_ = 0;
  std::vector<int64_t> holding_;  // cores each stream's running kernel holds
  std::vector<size_t> next_;      // position of each stream's next kernel in this run
  bool stop_ = false;
  bool own_threads_;
  std::unique_ptr<HelperPool> pool_;  // runs parallel loops when own_threads_
  std::vector<Helper*> free_helpers_;  // helpers bound to no grant
  std::vector<StreamThreads> streams_;
  std::string error_;
  ffi::Array<ffi::Tensor>* tensors_ = nullptr;
  int64_t* timings_ = nullptr;
  std::chrono::steady_clock::time_point t0_;
};

// Returns run(tensors, timings); the executor (and its workers) lives as long as that function.
ffi::Function CreateCpuExecutor(ffi::Array<ffi::Function> kernels, ffi::Array<ffi::Array<int64_t>> args,
                                ffi::Array<ffi::Array<int64_t>> waits,
                                ffi::Array<ffi::Array<int64_t>> stream_calls, ffi::Array<int64_t> threads,
                                int64_t core_budget, bool own_threads) {
  auto exec = std::make_shared<CpuExecutor>(MakePlan(kernels, args, waits, stream_calls, threads, core_budget),
                                            own_threads);
  return ffi::Function::FromTyped(
      [exec](ffi::Array<ffi::Tensor> tensors, ffi::Optional<ffi::Tensor> timings) {
        exec->Run(std::move(tensors), std::move(timings));
      });
}

}  // namespace cosched

TVM_FFI_DLL_EXPORT_TYPED_FUNC(create_cpu_executor, cosched::CreateCpuExecutor);
