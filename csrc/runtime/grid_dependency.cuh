// Programmatic dependent launch (Hopper, sm_90+) and the flags that let a dependent grid start
// on part of its predecessor's results.
//
// A kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization
// (programmatic_launch_config below) may start once every block of the kernel before it on
// the stream has called launch_dependent_grids (or exited), i.e. once all of them are running:
// a block of the later grid that waits for a flag one of them sets cannot wait for a block that
// never starts. wait_for_prerequisite_grids waits until the grid before has completed and its
// writes are visible. Without the launch attribute (or before sm_90) both are no-ops and the
// grids run one after the other, as plain launches.
//
// Flags: a producer thread writes its results, then release_flag (st.release.gpu, which
// orders its own earlier writes before the flag); a consumer thread acquire-waits for the flag,
// then its block's barrier orders the others after it. Data another grid is still writing must
// be read past L1 (ld.global.cg): L1 is not coherent within a kernel, and a line read before
// the flag was set would stay stale.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparsek {

__device__ __forceinline__ void launch_dependent_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prerequisite_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void release_flag(int32_t* flag) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(flag), "r"(1) : "memory");
}

__device__ __forceinline__ int32_t acquire_load(const int32_t* flag) {
  int32_t value;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(value) : "l"(flag) : "memory");
  return value;
}

// Waits until *flag is set (by release_flag). Backs off to ~1 us between polls; a flag still
// unset after ~2^24 polls (tens of seconds) traps, so that a broken dependency shows up as a
// launch failure instead of a hang.
__device__ __forceinline__ void acquire_wait_flag(const int32_t* flag) {
  unsigned delay_ns = 32;
  for (uint32_t polls = 0; acquire_load(flag) == 0; ++polls) {
    if (polls == (1u << 24)) __trap();
    __nanosleep(delay_ns);
    if (delay_ns < 1024) delay_ns *= 2;
  }
}

}  // namespace sparsek

#ifndef __CUDACC_RTC__
namespace sparsek {

// A launch config for `kernel`'s cudaLaunchKernelEx on `stream`, programmatically dependent
// on the kernel before it where `dependent` (attributes: storage for its one attribute).
inline cudaLaunchConfig_t programmatic_launch_config(dim3 grid, dim3 block, size_t smem,
                                                     cudaStream_t stream, bool dependent,
                                                     cudaLaunchAttribute* attributes) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attributes;
  config.numAttrs = dependent ? 1 : 0;
  return config;
}

}  // namespace sparsek
#endif
