// Writing one warp's rows of a backward result (dq, dk or dv): float32 accumulators times a
// scale, in the input dtype. Rows are given per thread (the positions they go to, -1: none),
// so that the SparseK dk/dv kernel can scatter its gathered keys back to their positions.
#pragma once

#include <cstdint>

#include "attention/sm80_instructions.cuh"

namespace sparsek {

// acc[mt][dt] holds rows rows[mt][0] (lane / 4) and rows[mt][1] (lane / 4 + 8), dims
// dim0 + 8 dt + 2 (lane % 4) + {0, 1}; dims past head_dim are padding and not stored.
template <int kMTiles, int kNTilesO, typename Element>
__device__ __forceinline__ void store_scaled_rows(const float (&acc)[kMTiles][kNTilesO][4],
                                                  float scale, Element* dst, int64_t row_stride,
                                                  const int (&rows)[kMTiles][2], int dim0,
                                                  int head_dim, int lane) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (rows[mt][h] < 0) continue;
      Element* row = dst + static_cast<int64_t>(rows[mt][h]) * row_stride;
#pragma unroll
      for (int dt = 0; dt < kNTilesO; ++dt) {
        const int col = dim0 + dt * 8 + (lane & 3) * 2;
        if (col < head_dim) {
          *reinterpret_cast<uint32_t*>(row + col) = sm80::pack2<Element>(
              acc[mt][dt][2 * h] * scale, acc[mt][dt][2 * h + 1] * scale);
        }
      }
    }
  }
}

}  // namespace sparsek
