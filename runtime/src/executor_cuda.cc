// cosched's dispatch loop on CUDA: the plan's streams become CUDA streams.
//
// One host thread launches every kernel in issue order. TVM's CUDA kernels launch on the calling
// thread's current stream, so the launcher sets it (TVMFFIEnvSetStream) before each kernel. A kernel
// that another stream waits on records a reusable event (created once, timing disabled) after it;
// the waiter's stream waits on that event on the GPU. The only host synchronisation is at the end of
// a run, when the main stream has joined every stream. With timings, start/end events around each
// kernel give GPU timestamps relative to the run's entry event.

#include <cuda_runtime.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <memory>
#include <string>
#include <vector>

#include "plan.h"

namespace ffi = tvm::ffi;

#define COSCHED_CUDA_CHECK(expr)                                                         \
  do {                                                                                   \
    cudaError_t err__ = (expr);                                                          \
    if (err__ != cudaSuccess) {                                                          \
      TVM_FFI_THROW(RuntimeError) << #expr << " failed: " << cudaGetErrorString(err__); \
    }                                                                                    \
  } while (0)

namespace cosched {

class CudaExecutor {
 public:
  CudaExecutor(Plan plan, int device) : plan_(std::move(plan)), device_(device), stream_of_(plan_.StreamOf()) {
    COSCHED_CUDA_CHECK(cudaSetDevice(device_));
    COSCHED_CUDA_CHECK(cudaStreamCreateWithFlags(&main_, cudaStreamNonBlocking));
    streams_.resize(plan_.stream_calls.size());
    exits_.resize(streams_.size());
    for (size_t s = 0; s < streams_.size(); ++s) {
      COSCHED_CUDA_CHECK(cudaStreamCreateWithFlags(&streams_[s], cudaStreamNonBlocking));
      COSCHED_CUDA_CHECK(cudaEventCreateWithFlags(&exits_[s], cudaEventDisableTiming));
    }
    COSCHED_CUDA_CHECK(cudaEventCreate(&entry_));  // with timing: the trace's time origin
    done_.assign(plan_.kernels.size(), nullptr);
    for (const auto& waits : plan_.waits) {
      for (int64_t w : waits) {
        if (done_[w] == nullptr) COSCHED_CUDA_CHECK(cudaEventCreateWithFlags(&done_[w], cudaEventDisableTiming));
      }
    }
  }

  ~CudaExecutor() {
    cudaSetDevice(device_);
    cudaStreamSynchronize(main_);
    for (auto e : done_) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    for (auto e : starts_) cudaEventDestroy(e);
    for (auto e : ends_) cudaEventDestroy(e);
    for (auto e : exits_) cudaEventDestroy(e);
    cudaEventDestroy(entry_);
    for (auto s : streams_) cudaStreamDestroy(s);
    cudaStreamDestroy(main_);
  }

  void Run(ffi::Array<ffi::Tensor> tensors, ffi::Optional<ffi::Tensor> timings) {
    COSCHED_CUDA_CHECK(cudaSetDevice(device_));
    const bool timed = timings.has_value();
    if (timed && starts_.empty()) {
      starts_.resize(plan_.kernels.size());
      ends_.resize(plan_.kernels.size());
      for (size_t i = 0; i < starts_.size(); ++i) {
        COSCHED_CUDA_CHECK(cudaEventCreate(&starts_[i]));
        COSCHED_CUDA_CHECK(cudaEventCreate(&ends_[i]));
      }
    }
    // Every stream starts after the caller's earlier work on the main stream (e.g. input copies).
    COSCHED_CUDA_CHECK(cudaEventRecord(entry_, main_));
    for (auto s : streams_) COSCHED_CUDA_CHECK(cudaStreamWaitEvent(s, entry_, 0));
    TVMFFIStreamHandle original = TVMFFIEnvGetStream(kDLCUDA, device_);
    std::vector<ffi::AnyView> args;
    try {
      for (size_t call = 0; call < plan_.kernels.size(); ++call) {
        cudaStream_t stream = streams_[stream_of_[call]];
        for (int64_t w : plan_.waits[call]) COSCHED_CUDA_CHECK(cudaStreamWaitEvent(stream, done_[w], 0));
        TVM_FFI_CHECK_SAFE_CALL(TVMFFIEnvSetStream(kDLCUDA, device_, stream, nullptr));
        if (timed) COSCHED_CUDA_CHECK(cudaEventRecord(starts_[call], stream));
        const auto& slots = plan_.args[call];
        args.resize(slots.size());
        for (size_t i = 0; i < slots.size(); ++i) args[i] = tensors[slots[i]];
        ffi::Any rv;
        plan_.kernels[call].CallPacked(args.data(), static_cast<int32_t>(args.size()), &rv);
        if (timed) COSCHED_CUDA_CHECK(cudaEventRecord(ends_[call], stream));
        if (done_[call] != nullptr) COSCHED_CUDA_CHECK(cudaEventRecord(done_[call], stream));
      }
    } catch (...) {
      TVMFFIEnvSetStream(kDLCUDA, device_, original, nullptr);
      cudaDeviceSynchronize();
      throw;
    }
    TVM_FFI_CHECK_SAFE_CALL(TVMFFIEnvSetStream(kDLCUDA, device_, original, nullptr));
    // Join: the main stream waits for every stream; then one host synchronisation for the run.
    for (size_t s = 0; s < streams_.size(); ++s) {
      COSCHED_CUDA_CHECK(cudaEventRecord(exits_[s], streams_[s]));
      COSCHED_CUDA_CHECK(cudaStreamWaitEvent(main_, exits_[s], 0));
    }
    COSCHED_CUDA_CHECK(cudaStreamSynchronize(main_));
    if (timed) {
      auto* out = static_cast<int64_t*>(timings.value().data_ptr());
      for (size_t call = 0; call < plan_.kernels.size(); ++call) {
        float start_ms = 0, end_ms = 0;
        COSCHED_CUDA_CHECK(cudaEventElapsedTime(&start_ms, entry_, starts_[call]));
        COSCHED_CUDA_CHECK(cudaEventElapsedTime(&end_ms, entry_, ends_[call]));
        out[2 * call] = static_cast<int64_t>(start_ms * 1e6);
        out[2 * call + 1] = static_cast<int64_t>(end_ms * 1e6);
      }
    }
  }

 private:
  Plan plan_;
  int device_;
  std::vector<int64_t> stream_of_;
  cudaStream_t main_ = nullptr;
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> done_;  // per call that another stream waits on, else null
  std::vector<cudaEvent_t> exits_;
  std::vector<cudaEvent_t> starts_, ends_;
  cudaEvent_t entry_ = nullptr;
};

// Device memory for the workspace, params and inputs/outputs.
struct CudaAlloc {
  void AllocData(DLTensor* tensor) {
    size_t size = ffi::GetDataSize(*tensor);
    COSCHED_CUDA_CHECK(cudaSetDevice(tensor->device.device_id));
    COSCHED_CUDA_CHECK(cudaMalloc(&tensor->data, size == 0 ? 1 : size));
  }
  void FreeData(DLTensor* tensor) { cudaFree(tensor->data); }
};

// A tensor over another tensor's memory (planned storage shared by several buffers).
struct ViewAlloc {
  ffi::Tensor base;
  void AllocData(DLTensor* tensor) { tensor->data = base.data_ptr(); }
  void FreeData(DLTensor*) {}
};

ffi::Tensor CudaEmpty(ffi::Shape shape, DLDataType dtype, int device) {
  return ffi::Tensor::FromNDAlloc(CudaAlloc(), shape, dtype, DLDevice{kDLCUDA, device});
}

ffi::Tensor CudaView(ffi::Tensor base, ffi::Shape shape, DLDataType dtype) {
  DLDevice device = base.GetDLTensorPtr()->device;
  return ffi::Tensor::FromNDAlloc(ViewAlloc{base}, shape, dtype, device);
}

// Synchronous copy between host and device memory (the runtime copies inputs in and outputs out).
void CudaCopy(ffi::Tensor dst, ffi::Tensor src) {
  size_t size = ffi::GetDataSize(*dst.GetDLTensorPtr());
  TVM_FFI_ICHECK_EQ(size, ffi::GetDataSize(*src.GetDLTensorPtr()));
  COSCHED_CUDA_CHECK(cudaMemcpy(dst.data_ptr(), src.data_ptr(), size, cudaMemcpyDefault));
}

int64_t CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

ffi::Function CreateCudaExecutor(ffi::Array<ffi::Function> kernels, ffi::Array<ffi::Array<int64_t>> args,
                                 ffi::Array<ffi::Array<int64_t>> waits,
                                 ffi::Array<ffi::Array<int64_t>> stream_calls, ffi::Array<int64_t> threads,
                                 int64_t device) {
  auto exec = std::make_shared<CudaExecutor>(MakePlan(kernels, args, waits, stream_calls, threads, 1),
                                             static_cast<int>(device));
  return ffi::Function::FromTyped(
      [exec](ffi::Array<ffi::Tensor> tensors, ffi::Optional<ffi::Tensor> timings) {
        exec->Run(std::move(tensors), std::move(timings));
      });
}

}  // namespace cosched

TVM_FFI_DLL_EXPORT_TYPED_FUNC(create_cuda_executor, cosched::CreateCudaExecutor);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_empty, cosched::CudaEmpty);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_view, cosched::CudaView);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_copy, cosched::CudaCopy);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cuda_device_count, cosched::CudaDeviceCount);
