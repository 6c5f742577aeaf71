// The two tile products of the mainloop on mma.sync m16n8k16, one warp's rows at a time:
//   S = Q K^T      (A = Q from shared memory, B = K rows read as columns)
//   O += P V       (A = P from the score registers, B = V through ldmatrix.trans)
// Fragment layouts follow the PTX ISA for m16n8k16: lane = 4 * g + t holds rows g and g + 8,
// columns 2t and 2t + 1 of each n8 tile.
//
// Shared-memory addresses: each lane computes one swizzled base offset per operand; the k step
// (16 dims = 2 chunks) is then an XOR of the base with a constant and the m/n tile an added
// constant (see smem_tile.cuh), which keeps addresses out of the register budget.
#pragma once

#include <cstdint>

#include "attention/smem_tile.cuh"
#include "attention/sm80_instructions.cuh"

namespace sparsek {

template <typename Cfg, typename Element>
__device__ __forceinline__ void scores_qk(float (&s)[Cfg::kMTiles][Cfg::kNTilesS][4],
                                          const Element* sQ, const Element* sK, int warp,
                                          int lane) {
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) s[mt][nt][r] = 0.f;
    }
  }
  constexpr int kD = Cfg::kHeadDim;
  // Q matrices: rows 0-7 / 8-15 of the m16 tile, dims 0-7 / 8-15 of the k step.
  const int q_base = swizzled_offset<kD>(warp * Cfg::kWarpRows + (lane & 15), lane >> 4);
  // K matrices: (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), ...
  // i.e. b0, b1 of n8 tile 2np, then b0, b1 of n8 tile 2np + 1.
  const int k_base = swizzled_offset<kD>((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
#pragma unroll
  for (int ks = 0; ks < Cfg::kKStepsQK; ++ks) {
    uint32_t a[Cfg::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
      sm80::ldmatrix_x4(a[mt], sQ + (swizzle_step(q_base + mt * 16 * kD, ks)));
    }
#pragma unroll
    for (int np = 0; np < Cfg::kNTilesS / 2; ++np) {
      uint32_t b[4];
      sm80::ldmatrix_x4(b, sK + swizzle_step(k_base + np * 16 * kD, ks));
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
        sm80::mma_16x8x16<Element>(s[mt][2 * np], a[mt], b[0], b[1]);
        sm80::mma_16x8x16<Element>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Accumulates the dim tiles [2 * dim_pair0, 2 * dim_pair0 + Cfg::kNTilesO) of the product
// (dim_pair0 > 0: a warp that owns only part of the head dim, as the backward's D = 256 dk/dv).
template <typename Cfg, typename Element>
__device__ __forceinline__ void accumulate_pv(float (&acc_o)[Cfg::kMTiles][Cfg::kNTilesO][4],
                                              const float (&p)[Cfg::kMTiles][Cfg::kNTilesS][4],
                                              const Element* sV, int lane,
                                              int dim_pair0 = 0) {
  constexpr int kD = Cfg::kHeadDim;
  // Transposed V matrices: (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7,
  // dims 8-15), (keys 8-15, dims 8-15): b0, b1 of dim tile 2dp, then of 2dp + 1.
  const int v_base = swizzled_offset<kD>(lane & 15, lane >> 4);
#pragma unroll
  for (int kk = 0; kk < Cfg::kKStepsPV; ++kk) {
    // The accumulator layout of n8 tiles 2kk and 2kk + 1 is the A layout of k step kk.
    uint32_t a[Cfg::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
      a[mt][0] = sm80::pack2<Element>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      a[mt][1] = sm80::pack2<Element>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      a[mt][2] = sm80::pack2<Element>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      a[mt][3] = sm80::pack2<Element>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < Cfg::kNTilesO / 2; ++dp) {
      uint32_t b[4];
      sm80::ldmatrix_x4_trans(b, sV + swizzle_step(v_base + kk * 16 * kD, dp + dim_pair0));
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
        sm80::mma_16x8x16<Element>(acc_o[mt][2 * dp], a[mt], b[0], b[1]);
        sm80::mma_16x8x16<Element>(acc_o[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

}  // namespace sparsek
