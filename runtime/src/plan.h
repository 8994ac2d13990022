// The backend-neutral part of a schedule as the executors see it: kernels in issue order, the tensor
// slots each reads and writes, the calls each waits on, and the calls of each stream in stream order.
#ifndef COSCHED_PLAN_H_
#define COSCHED_PLAN_H_

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <vector>

namespace cosched {

struct Plan {
  std::vector<tvm::ffi::Function> kernels;          // per call, in issue order
  std::vector<std::vector<int64_t>> args;           // tensor slots per call
  std::vector<std::vector<int64_t>> waits;          // calls each call waits on
  std::vector<std::vector<int64_t>> stream_calls;   // calls of each stream, in stream order
  std::vector<int64_t> threads;                     // CPU: TVM pool size (cores) of each stream
  int64_t core_budget = 1;

  std::vector<int64_t> StreamOf() const {
    std::vector<int64_t> stream_of(kernels.size(), 0);
    for (size_t s = 0; s < stream_calls.size(); ++s) {
      for (int64_t c : stream_calls[s]) stream_of[c] = static_cast<int64_t>(s);
    }
    return stream_of;
  }
};

inline std::vector<std::vector<int64_t>> ToVectors(const tvm::ffi::Array<tvm::ffi::Array<int64_t>>& arrays) {
  std::vector<std::vector<int64_t>> out;
  out.reserve(arrays.size());
  for (const auto& a : arrays) out.emplace_back(a.begin(), a.end());
  return out;
}

inline Plan MakePlan(tvm::ffi::Array<tvm::ffi::Function> kernels, tvm::ffi::Array<tvm::ffi::Array<int64_t>> args,
                     tvm::ffi::Array<tvm::ffi::Array<int64_t>> waits,
                     tvm::ffi::Array<tvm::ffi::Array<int64_t>> stream_calls, tvm::ffi::Array<int64_t> threads,
                     int64_t core_budget) {
  Plan plan;
  plan.kernels.assign(kernels.begin(), kernels.end());
  plan.args = ToVectors(args);
  plan.waits = ToVectors(waits);
  plan.stream_calls = ToVectors(stream_calls);
  plan.threads.assign(threads.begin(), threads.end());
  plan.core_budget = core_budget;
  TVM_FFI_ICHECK_EQ(plan.args.size(), plan.kernels.size());
  TVM_FFI_ICHECK_EQ(plan.waits.size(), plan.kernels.size());
  TVM_FFI_ICHECK_EQ(plan.threads.size(), plan.stream_calls.size());
  return plan;
}

}  // namespace cosched

#endif  // COSCHED_PLAN_H_
