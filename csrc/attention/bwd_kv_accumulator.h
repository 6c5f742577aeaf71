// The float32 dk and dv accumulators of the SparseK backward in row bands
// (selection/sort_key_spans.h, KeyOrder::kBands): a key reached by rows of several bands has a
// piece in each, taken by different dk/dv CTAs, which add their dk, dv (and du) into these
// with atomics (bwd_dkdv_kernel_sm90.cuh). Zeroed before that kernel (bwd_preprocess.h, with
// du, which it adds its first term into), then converted: dk = scale * its accumulator, dv =
// its accumulator, in p.dtype. Layout: [B, S, Hkv, D] float32
// each, as dk and dv (D the head dim, unpadded).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention/bwd_params.h"

namespace sparsek {

struct KvAccumulator {
  static int64_t elems(int64_t batch, int64_t seqlen_k, int64_t heads_kv, int64_t head_dim) {
    return batch * seqlen_k * heads_kv * head_dim;
  }
};

// dk and dv from p.dk_accum and p.dv_accum.
std::string store_kv_from_accumulators(const AttentionBwdParams& p, cudaStream_t stream);

}  // namespace sparsek
