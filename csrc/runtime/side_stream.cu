#include "runtime/side_stream.h"

#include <unordered_map>

#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"
#include "runtime/scoped_device.h"
#include "sparsek_api.h"

namespace sparsek {
namespace {

struct SideStreamResources {
  cudaStream_t stream = nullptr;
  cudaEvent_t event = nullptr;
};

// This thread's side streams, by device. Never destroyed: a thread's exit can come after the
// CUDA runtime's own teardown (the main thread's, at process exit), where destroying them
// would call into it; the driver frees them with the context. Host threads that launch are
// few and long-lived (XLA's and torch's).
class ThreadSideStreams {
 public:
  // The current device's, created on first use (the callers run inside a ScopedDevice).
  std::string get(SideStreamResources*& resources) {
    int device = 0;
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
    SideStreamResources& r = by_device_[device];
    if (r.stream == nullptr) {
      // Non-blocking: the side stream must not wait for the legacy default stream. The
      // greatest priority: its kernels are a latency-bound chain that the caller's stream
      // waits for at the join, beside the caller's bandwidth-bound grids, which would
      // otherwise take the SMs as their blocks retire (side_stream.h).
      int least = 0, greatest = 0;
      SPARSEK_RETURN_IF_CUDA_ERROR(cudaDeviceGetStreamPriorityRange(&least, &greatest));
      SPARSEK_RETURN_IF_CUDA_ERROR(
          cudaStreamCreateWithPriority(&r.stream, cudaStreamNonBlocking, greatest));
    }
    if (r.event == nullptr) {
      SPARSEK_RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&r.event, cudaEventDisableTiming));
    }
    resources = &r;
    return {};
  }

 private:
  std::unordered_map<int, SideStreamResources> by_device_;
};

thread_local ThreadSideStreams& thread_side_streams = *new ThreadSideStreams;

// stream `waiter` runs what is issued to it next after everything issued to `before` so far.
std::string order_after(cudaStream_t waiter, cudaStream_t before, cudaEvent_t event) {
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaEventRecord(event, before));
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(waiter, event, 0));
  return {};
}

}  // namespace

int sparsek_side_stream() { return requested_side_stream(); }

std::string fork_side_stream(cudaStream_t main, cudaStream_t* side) {
  *side = main;
  const int setting = sparsek_side_stream();
  if (setting < 0) return "JAX_SPARSEK_SIDE_STREAM must be 0 or 1";
  if (setting == 0) return {};  // everything on the caller's stream
  SideStreamResources* resources = nullptr;
  if (std::string error = thread_side_streams.get(resources); !error.empty()) return error;
  if (std::string error = order_after(resources->stream, main, resources->event);
      !error.empty()) {
    return error;
  }
  *side = resources->stream;
  return {};
}

std::string join_side_stream(cudaStream_t main, cudaStream_t side) {
  if (side == main) return {};
  SideStreamResources* resources = nullptr;
  if (std::string error = thread_side_streams.get(resources); !error.empty()) return error;
  return order_after(main, side, resources->event);
}

std::string side_stream_fork(void* stream, int32_t device, void** side) {
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(device); !error.empty()) return error;
  cudaStream_t side_stream = nullptr;
  const std::string error = fork_side_stream(static_cast<cudaStream_t>(stream), &side_stream);
  *side = side_stream;
  return error;
}

std::string side_stream_join(void* stream, int32_t device, void* side) {
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(device); !error.empty()) return error;
  return join_side_stream(static_cast<cudaStream_t>(stream), static_cast<cudaStream_t>(side));
}

}  // namespace sparsek
