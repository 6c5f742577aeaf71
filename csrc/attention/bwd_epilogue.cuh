// Writing one warp's rows of a backward result (dq, dk or dv): float32 accumulators times a
// scale, in the input dtype. Rows are given per thread (the positions they go to, -1: none),
// so that the SparseK dk/dv kernel can scatter its gathered keys back to their positions.
#pragma once

#include <cstdint>

#include "attention/sm80_instructions.cuh"

namespace sparsek {

// acc[mt][dt] holds rows rows[mt][0] (lane / 4) and rows[mt][1] (lane / 4 + 8), dims
// dim0 + 8 dt + 2 (lane % 4) + {0, 1}; dims past head_dim are padding and not stored.
// write(row, col, x, y) takes each of the thread's pairs of dims with its row (-1: none,
// skipped) and first dim.
template <int kMTiles, int kNTilesO, typename Write>
__device__ __forceinline__ void for_each_row_pair(const float (&acc)[kMTiles][kNTilesO][4],
                                                  const int (&rows)[kMTiles][2], int dim0,
                                                  int head_dim, int lane, Write write) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (rows[mt][h] < 0) continue;
#pragma unroll
      for (int dt = 0; dt < kNTilesO; ++dt) {
        const int col = dim0 + dt * 8 + (lane & 3) * 2;
        if (col < head_dim) write(rows[mt][h], col, acc[mt][dt][2 * h], acc[mt][dt][2 * h + 1]);
      }
    }
  }
}

// The fragments times `scale`, stored in the input dtype.
template <int kMTiles, int kNTilesO, typename Element>
__device__ __forceinline__ void store_scaled_rows(const float (&acc)[kMTiles][kNTilesO][4],
                                                  float scale, Element* dst, int64_t row_stride,
                                                  const int (&rows)[kMTiles][2], int dim0,
                                                  int head_dim, int lane) {
  for_each_row_pair(acc, rows, dim0, head_dim, lane, [&](int row, int col, float x, float y) {
    *reinterpret_cast<uint32_t*>(dst + static_cast<int64_t>(row) * row_stride + col) =
        sm80::pack2<Element>(x * scale, y * scale);
  });
}

// The fragments added, unscaled, into float32 rows with atomics (two dims a float2
// reduction; sm_90): the row bands' dk and dv accumulators (bwd_kv_accumulator.h).
template <int kMTiles, int kNTilesO>
__device__ __forceinline__ void add_rows_atomic(const float (&acc)[kMTiles][kNTilesO][4],
                                                float* dst, int64_t row_stride,
                                                const int (&rows)[kMTiles][2], int dim0,
                                                int head_dim, int lane) {
  for_each_row_pair(acc, rows, dim0, head_dim, lane, [&](int row, int col, float x, float y) {
    atomicAdd(reinterpret_cast<float2*>(dst + static_cast<int64_t>(row) * row_stride + col),
              make_float2(x, y));
  });
}

}  // namespace sparsek
