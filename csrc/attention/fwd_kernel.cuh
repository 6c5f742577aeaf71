// The attention forward kernel (FlashAttention-2 schedule on mma.sync): one CTA per
// (query tile, query head, batch). Q stays in shared memory; K and V tiles stream through one
// buffer each, the load of one overlapping the product with the other. Which key tiles are
// visited, and how each key is masked or gated, is the KeyVisit policy's (key_visit.cuh:
// the dense modes; sparse_key_visit.cuh: SparseK).
#pragma once

#include <cstdint>

#include "attention/epilogue.cuh"
#include "attention/key_visit.cuh"
#include "attention/sparse_key_visit.cuh"
#include "attention/online_softmax.cuh"
#include "attention/params.h"
#include "attention/query_tile_block.cuh"
#include "attention/smem_tile.cuh"
#include "attention/tile_mma.cuh"

namespace sparsek {

template <typename Cfg, typename Element, typename KeyVisit>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocksPerSm)
    attention_fwd_kernel(const __grid_constant__ AttentionFwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Element* sQ = reinterpret_cast<Element*>(smem);
  Element* sK = sQ + Cfg::kSmemQElems;
  Element* sV = sK + Cfg::kSmemKVElems;

  const auto [head, batch, kv_head, warp, lane, row0, warp_row0, head_dim, q, k, v] =
      query_tile_block<Cfg, Element, KeyVisit::kGridOrder>(p);

  KeyVisit visit(p, row0, batch * p.heads_kv + kv_head, sV + Cfg::kSmemKVElems);
  OnlineSoftmax<Cfg::kMTiles> softmax;
  float acc_o[Cfg::kMTiles][Cfg::kNTilesO][4];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < Cfg::kNTilesO; ++dt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc_o[mt][dt][r] = 0.f;
    }
  }
  const float scale_log2 = p.scale * 1.44269504088896340736f;

  const int num_tiles = visit.num_tiles();
  if (num_tiles > 0) {
    visit.start(p);
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, Cfg::kNThreads>(sQ, q, p.q_row_stride, row0,
                                                                 p.seqlen_q, head_dim);
    visit.load_keys(sK, k, p.k_row_stride, 0, head_dim);
    sm80::cp_async_commit();

    for (int it = 0; it < num_tiles; ++it) {
      // The key positions of tile it + 1 (SparseK) load while tile it is computed.
      const auto next = visit.prefetch(p, it + 1);
      // K(it) has landed, and every warp is done with V(it - 1): V(it) may overwrite it.
      sm80::cp_async_wait<0>();
      __syncthreads();
      visit.load_keys(sV, v, p.v_row_stride, it, head_dim);
      sm80::cp_async_commit();

      float s[Cfg::kMTiles][Cfg::kNTilesS][4];
      scores_qk<Cfg>(s, sQ, sK, warp, lane);
      // Scale before masking: a negative scale must not turn a hidden -inf into +inf.
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) s[mt][nt][r] *= scale_log2;
        }
      }
      visit.mask_and_update(p, s, acc_o, softmax, it, warp_row0, lane);
      // Tile it + 1's slot was last read while tile it - 1 was computed.
      visit.stash(it + 1, next);

      // V(it) has landed, and every warp is done with K(it): K(it + 1) may overwrite it.
      sm80::cp_async_wait<0>();
      __syncthreads();
      if (it + 1 < num_tiles) {
        visit.load_keys(sK, k, p.k_row_stride, it + 1, head_dim);
        sm80::cp_async_commit();
      }
      accumulate_pv<Cfg>(acc_o, s, sV, lane);
    }
  }

  float inv_sum[Cfg::kMTiles][2], lse[Cfg::kMTiles][2];
  softmax.finalize(inv_sum, lse);
  Element* o = static_cast<Element*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
  float* lse_row0 = p.lse + (batch * p.heads_q + head) * p.seqlen_q;
  store_output<Cfg>(acc_o, inv_sum, lse, o, p.o_row_stride, lse_row0, warp_row0,
                    static_cast<int>(p.seqlen_q), head_dim, lane);
}

}  // namespace sparsek
