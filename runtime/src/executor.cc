// cosched's dispatch loop: runs a schedule's kernels on CPU streams.
//
// One persistent worker thread per stream runs that stream's kernels in order. A kernel starts once
// the kernels it waits on (on other streams) are done and a core of the budget is free; both waits
// block on a condition variable rather than spinning, so idle workers leave the cores to the busy
// ones. Cores are shared work-conservingly: a kernel runs on every free core up to its stream's cap,
// leaving one to each other stream that is ready, so a stream alone gets the whole budget. Each
// worker resizes its own TVM thread pool (pools are per calling thread; resizing costs ~0.2 us).
//
// The plan (plan.h) is backend-neutral: executor_cuda.cc runs the same plan with one launcher thread
// that puts each kernel on its CUDA stream and orders streams with events.

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <algorithm>
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

namespace cosched {

class CpuExecutor {
 public:
  explicit CpuExecutor(Plan plan) : plan_(std::move(plan)), done_(plan_.kernels.size(), 0) {
    cores_free_ = plan_.core_budget;
    holding_.assign(plan_.stream_calls.size(), 0);
    next_.assign(plan_.stream_calls.size(), 0);
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
        if (cores != pool_size && config.has_value()) {
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
    return cores;
  }

  void Release(size_t stream, int64_t call, int64_t cores, uint64_t gen) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cores_free_ += cores;
      holding_[stream] = 0;
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
  std::string error_;
  ffi::Array<ffi::Tensor>* tensors_ = nullptr;
  int64_t* timings_ = nullptr;
  std::chrono::steady_clock::time_point t0_;
};

// Returns run(tensors, timings); the executor (and its workers) lives as long as that function.
ffi::Function CreateCpuExecutor(ffi::Array<ffi::Function> kernels, ffi::Array<ffi::Array<int64_t>> args,
                                ffi::Array<ffi::Array<int64_t>> waits,
                                ffi::Array<ffi::Array<int64_t>> stream_calls, ffi::Array<int64_t> threads,
                                int64_t core_budget) {
  auto exec = std::make_shared<CpuExecutor>(MakePlan(kernels, args, waits, stream_calls, threads, core_budget));
  return ffi::Function::FromTyped(
      [exec](ffi::Array<ffi::Tensor> tensors, ffi::Optional<ffi::Tensor> timings) {
        exec->Run(std::move(tensors), std::move(timings));
      });
}

}  // namespace cosched

TVM_FFI_DLL_EXPORT_TYPED_FUNC(create_cpu_executor, cosched::CreateCpuExecutor);
