// The Hopper forward's epilogue: one warp's 16 rows of O (normalised, in the input dtype),
// staged in shared memory so that global memory sees whole rows, and the float32 LSE.
//
// Written straight from the accumulators (epilogue.cuh), a row's 16 bytes of one n8 tile
// were a 4-byte store a lane: 32 store instructions a thread, each touching 8 rows' partial
// sectors. Staged, the fragments go to shared memory by stmatrix (8 a thread), and each lane
// then copies 16-byte chunks, a warp two whole rows an instruction (8 a thread).
#pragma once

#include <cstdint>

#include "attention/sm80_instructions.cuh"
#include "attention/sm90_instructions.cuh"

namespace sparsek {

// stage: the CTA's Q tile (Cfg::QLayout), whose rows [local_row0, local_row0 + 16) are this
// warp's: the caller makes sure nothing reads or still writes them (the warpgroup's last S
// product has completed, and every consumer's Q copy has landed).
template <typename Cfg, typename Element>
__device__ __forceinline__ void store_output_staged(const float (&acc_o)[1][Cfg::kNTilesO][4],
                                                    const float (&inv_sum)[1][2],
                                                    const float (&lse)[1][2], Element* stage,
                                                    int local_row0, Element* o,
                                                    int64_t o_row_stride, float* lse_row0,
                                                    int warp_row0, int seqlen_q, int head_dim,
                                                    int lane) {
  using Layout = typename Cfg::QLayout;
  static_assert(Cfg::kWarpRows == 16 && Cfg::kNTilesO % 2 == 0, "16 rows, pairs of n8 tiles");
  // The tile was last read by wgmma (the async proxy); these writes are generic.
  sm90::fence_async_shared();
  // stmatrix x4 j: matrices (h, dt) = (0, 2j), (1, 2j), (0, 2j + 1), (1, 2j + 1), of rows
  // 8 h + (0..7) and the 8 columns of n8 tile dt; lane 8 m + i gives row i of matrix m.
  const int m = lane >> 3;
  const int stage_row = local_row0 + (lane & 7) + 8 * (m & 1);
#pragma unroll
  for (int j = 0; j < Cfg::kNTilesO / 2; ++j) {
    uint32_t r[4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      const int h = mi & 1;
      const int dt = 2 * j + (mi >> 1);
      r[mi] = sm80::pack2<Element>(acc_o[0][dt][2 * h] * inv_sum[0][h],
                                   acc_o[0][dt][2 * h + 1] * inv_sum[0][h]);
    }
    sm90::stmatrix_x4(sm80::smem_address(stage + Layout::offset(stage_row, 2 * j + (m >> 1))),
                      r);
  }
  __syncwarp();
  // 16-byte chunks: a lane chunk c of rows kRowsPerPass apart.
  constexpr int kChunks = Cfg::kHeadDim / 8;
  constexpr int kRowsPerPass = 32 / kChunks;
  static_assert(32 % kChunks == 0, "whole rows a pass");
  const int c = lane % kChunks;
#pragma unroll
  for (int i = 0; i < Cfg::kWarpRows / kRowsPerPass; ++i) {
    const int r = i * kRowsPerPass + lane / kChunks;
    const int row = warp_row0 + r;
    const uint4 v =
        *reinterpret_cast<const uint4*>(stage + Layout::offset(local_row0 + r, c));
    if (row < seqlen_q && c * 8 < head_dim) {
      *reinterpret_cast<uint4*>(o + static_cast<int64_t>(row) * o_row_stride + c * 8) = v;
    }
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + (lane >> 2) + 8 * h;
      if (row < seqlen_q) lse_row0[row] = lse[0][h];
    }
  }
}

}  // namespace sparsek
