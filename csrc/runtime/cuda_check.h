// Turning CUDA runtime errors into messages that name the failed call.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

namespace sparsek {

inline std::string cuda_error_message(cudaError_t status, const char* what) {
  return std::string(what) + " failed: " + cudaGetErrorName(status) + " (" +
         cudaGetErrorString(status) + ")";
}

}  // namespace sparsek

// For functions returning std::string (empty = success).
#define SPARSEK_RETURN_IF_CUDA_ERROR(call)                                  \
  do {                                                                      \
    cudaError_t sparsek_status_ = (call);                                   \
    if (sparsek_status_ != cudaSuccess) {                                   \
      return ::sparsek::cuda_error_message(sparsek_status_, #call);          \
    }                                                                       \
  } while (0)
