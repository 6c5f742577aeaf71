// Writing one warp's rows of O (normalised, in the input dtype) and of the float32 LSE.
#pragma once

#include <cstdint>

#include "attention/sm80_instructions.cuh"

namespace sparsek {

template <typename Cfg, typename Element>
__device__ __forceinline__ void store_output(const float (&acc_o)[Cfg::kMTiles][Cfg::kNTilesO][4],
                                             const float (&inv_sum)[Cfg::kMTiles][2],
                                             const float (&lse)[Cfg::kMTiles][2], Element* o,
                                             int64_t o_row_stride, float* lse_row0,
                                             int warp_row0, int seqlen_q, int head_dim,
                                             int lane) {
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + mt * 16 + (lane >> 2) + 8 * h;
      if (row >= seqlen_q) continue;
      Element* dst = o + static_cast<int64_t>(row) * o_row_stride;
#pragma unroll
      for (int dt = 0; dt < Cfg::kNTilesO; ++dt) {
        const int col = dt * 8 + (lane & 3) * 2;
        if (col < head_dim) {
          *reinterpret_cast<uint32_t*>(dst + col) = sm80::pack2<Element>(
              acc_o[mt][dt][2 * h] * inv_sum[mt][h], acc_o[mt][dt][2 * h + 1] * inv_sum[mt][h]);
        }
      }
      if ((lane & 3) == 0) lse_row0[row] = lse[mt][h];
    }
  }
}

}  // namespace sparsek
