// Build and device information reported to Python.
#include <stdexcept>

#include "runtime/build_config.h"
#include "runtime/cuda_check.h"
#include "sparsek_api.h"

namespace sparsek {

std::string current_device_arch() {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  int major = 0, minor = 0;
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  }
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  }
  if (status != cudaSuccess) {
    cudaGetLastError();  // do not leave the error behind for the next launch check
    throw std::runtime_error("no usable CUDA device: " +
                             cuda_error_message(status, "cudaGetDevice"));
  }
  return "sm_" + std::to_string(major) + std::to_string(minor);
}

std::vector<std::string> compiled_archs() { return {SPARSEK_COMPILED_ARCHS}; }

std::string library_version() { return SPARSEK_VERSION; }

BuildOptions build_options() {
  BuildOptions options;
  options.cuda_compiler_version = SPARSEK_CUDA_COMPILER_VERSION;
  options.fast_math = SPARSEK_FAST_MATH != 0;
  return options;
}

}  // namespace sparsek
