#include "attention/hopper_kernels.h"

#include <cuda_runtime.h>

#include <stdexcept>

#include "runtime/build_config.h"
#include "runtime/cuda_check.h"

namespace sparsek {

std::string hopper_kernels_run(int64_t head_dim, bool& runs) {
  runs = false;
  if (!SPARSEK_HAVE_SM90A || head_dim <= 64 || head_dim > 128) return {};
  int device = 0, major = 0, minor = 0;
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
  SPARSEK_RETURN_IF_CUDA_ERROR(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  SPARSEK_RETURN_IF_CUDA_ERROR(
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  runs = major == 9 && minor == 0;
  return {};
}

void throw_if_error(const std::string& error) {
  if (!error.empty()) {
    cudaGetLastError();  // do not leave the error behind for the next launch check
    throw std::runtime_error(error);
  }
}

std::string kernel_name(const std::string& error, bool hopper) {
  throw_if_error(error);
  return hopper ? "sm90_wgmma" : "mma_sync";
}

}  // namespace sparsek
