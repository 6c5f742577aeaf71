// Makes a device current for a launch and gives the caller's device back afterwards (the
// caller, XLA or torch, shares the driver context and must not see it changed).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "runtime/cuda_check.h"

namespace sparsek {

class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

  std::string enter(int device) {
    if (device < 0) return {};
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetDevice(&previous_));
    if (previous_ != device) {
      SPARSEK_RETURN_IF_CUDA_ERROR(cudaSetDevice(device));
      switched_ = true;
    }
    return {};
  }
  ~ScopedDevice() {
    if (switched_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
  bool switched_ = false;
};

}  // namespace sparsek
