// Step 1 of the backward: Delta_i = <dO_i, o_i> - dlse_i for every row and query head, into
// the workspace (bwd_workspace.h). Both later kernels read it.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "attention/bwd_params.h"

namespace sparsek {

// delta: [B, Hq, T] float32.
std::string launch_bwd_preprocess(const AttentionBwdParams& p, float* delta,
                                  cudaStream_t stream);

}  // namespace sparsek
