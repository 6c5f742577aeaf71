#include "runtime/dependent_launch.h"

#include <cuda_runtime.h>

#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"

namespace sparsek {

std::string dependent_launch_allowed(bool* allowed) {
  *allowed = false;
  const int setting = requested_dependent_launch();
  if (setting < 0) return "JAX_SPARSEK_DEPENDENT_LAUNCH must be 0 or 1";
  if (setting == 0) return {};
  int device = 0, major = 0;
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
  SPARSEK_RETURN_IF_CUDA_ERROR(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  *allowed = major >= 9;
  return {};
}

}  // namespace sparsek
