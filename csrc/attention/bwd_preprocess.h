// Step 1 of the backward: Delta_i = <dO_i, o_i> - dlse_i for every row and query head, into
// the workspace (bwd_workspace.h), and the float32 accumulators the dk/dv kernel adds into
// set to zero. Both later kernels read Delta.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention/bwd_params.h"

namespace sparsek {

// Float buffers to set to zero: at most kMax (more is an error of launch_bwd_preprocess, not
// a buffer left unzeroed), each 4-byte aligned.
struct BwdZeroRanges {
  static constexpr int kMax = 6;
  float* ptr[kMax] = {};
  int64_t count[kMax] = {};  // floats
  int n = 0;
  bool overflowed = false;

  void add(float* buffer, int64_t floats) {
    if (buffer == nullptr || floats <= 0) return;
    if (n == kMax) {
      overflowed = true;
      return;
    }
    ptr[n] = buffer;
    count[n] = floats;
    ++n;
  }
};

// delta: [B, Hq, T] float32. zeros: the buffers to zero before the dk/dv kernel. By default
// one kernel computes Delta and writes the zeros (JAX_SPARSEK_BWD_PREPARE=fused);
// JAX_SPARSEK_BWD_PREPARE=separate (read at every call; benchmarks compare both) computes
// Delta one row a thread and zeroes each buffer with cudaMemsetAsync, as before the fused
// kernel.
std::string launch_bwd_preprocess(const AttentionBwdParams& p, float* delta,
                                  const BwdZeroRanges& zeros, cudaStream_t stream);

}  // namespace sparsek
