// The float32 dq accumulator of the dense Hopper backward, whose dk/dv kernel adds each
// step's dS K into it (bwd_dkdv_kernel_sm90.cuh, Cfg::kFuseDq): zeroed before that kernel
// (bwd_preprocess.h), then scaled and converted into dq.
//
// Layout: one tile of kRows query rows x kDims dims per (batch, query head, row block), the
// tiles in that order; a tile is two halves of kDims / 2 dims (one per warpgroup), each in
// the warpgroup's register order: float4 (j * 128 + thread) holds accumulator block j of the
// warpgroup's thread `thread` (its m64n64 tile: n8 tile j, rows 16 (thread / 32) +
// (thread % 32) / 4 + {0, 8}, dims 8 j + 2 (thread % 4) + {0, 1}). A step's addition is then
// 16 KB of consecutive float4s a warpgroup, added by fully coalesced 16-byte atomics.
// Rows past T and dims past the head dim are padding (they receive zeros).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention/bwd_params.h"

namespace sparsek {

struct DqAccumulatorTiles {
  static constexpr int kRows = 64;
  static constexpr int kDims = 128;
  static constexpr int kHalfFloats = kRows * kDims / 2;  // one warpgroup's half
  static constexpr int kTileFloats = kRows * kDims;

  __host__ __device__ static int64_t row_blocks(int64_t seqlen_q) {
    return (seqlen_q + kRows - 1) / kRows;
  }
  __host__ __device__ static int64_t elems(int64_t batch, int64_t seqlen_q, int64_t heads_q) {
    return batch * heads_q * row_blocks(seqlen_q) * kTileFloats;
  }
};

// dq = scale * the accumulator, in p.dtype (p.dq is contiguous [B, T, Hq, D]).
std::string store_dq_from_accumulator(const AttentionBwdParams& p, const float* dq_accum,
                                      cudaStream_t stream);

}  // namespace sparsek
