// Synchronization between the warps of a warp-specialized Hopper CTA: mbarriers (shared-
// memory barriers with a phase bit, which a producer and its consumers use to hand buffers
// back and forth without stopping the whole CTA) and named barriers (hardware barriers over
// a subset of the CTA's warps, which order the consumer warpgroups' tensor-core work).
// Raw PTX, sm_90 only; the kernels that use it compile their bodies for sm_90a alone.
#pragma once

#include <cstdint>

namespace sparsek {
namespace sm90 {

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// One thread initializes; the CTA barrier after it publishes the initialization.
__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)),
               "r"(arrivals)
               : "memory");
}

// An arrival with release semantics: this thread's earlier shared-memory writes are visible
// to every thread that then waits on the completed phase.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
                   shared_address(barrier))
               : "memory");
}

// An arrival that happens when every cp.async this thread has issued so far has landed. The
// form without .noinc raises the pending count first, so the thread also arrives normally
// (mbarrier_arrive) and the barrier's count stays one per thread.
__device__ __forceinline__ void mbarrier_arrive_on_copies(uint64_t* barrier) {
  asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(shared_address(barrier))
               : "memory");
}

// Waits until the phase of parity `parity` has completed (acquire semantics).
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_AGAIN:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_AGAIN;\n}\n" ::"r"(shared_address(barrier)),
      "r"(parity)
      : "memory");
}

// A consumer warp hands a buffer back to its producer (the buffer's "empty" mbarrier counts
// one arrival a warp): every lane is done with it.
__device__ __forceinline__ void release_to_producer(uint64_t* empty, int lane) {
  __syncwarp();
  if (lane == 0) mbarrier_arrive(empty);
}

// Named barrier `id` (1-15; 0 is __syncthreads) over `threads` threads: sync waits for them
// all, arrive counts this warp's threads without waiting.
template <int kThreads>
__device__ __forceinline__ void named_barrier_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}
template <int kThreads>
__device__ __forceinline__ void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kThreads));
}

// Register reallocation between warpgroups (every thread of the warpgroup executes it): the
// producer gives registers back, the consumers take them, kRegisters a thread.
template <int kRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// The warp index, known to the compiler to be the same in every lane (a branch on it keeps
// the wgmma code on a non-divergent path).
__device__ __forceinline__ int uniform_warp_index() {
  return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 32, 0);
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

}  // namespace sm90
}  // namespace sparsek
