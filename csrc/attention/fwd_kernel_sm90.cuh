// The attention forward kernel on Hopper tensor cores (wgmma): one CTA of two warpgroups per
// (128 query rows, query head, batch), each warpgroup owning 64 rows. Q stays in shared
// memory; K and V tiles are double-buffered, each copy (cp.async, gathered rows in SparseK)
// having a whole step to land. The two tile products are wgmma.mma_async over a warpgroup's
// 64 x 128 tile instead of per-warp mma.sync: S = Q K^T reads both operands from shared
// memory, O += P V takes P from registers and V from shared memory. The P V product of tile
// it - 1 runs in the tensor cores during tile it's softmax (FlashAttention-3's
// intra-warpgroup overlap), which is why V lags K by one step. One barrier a step.
//
// The key visit policies (key_visit.cuh, sparse_key_visit.cuh), the online softmax and the
// epilogue are the mma.sync kernel's: the wgmma accumulators have the register layout of a
// warp's m16n8 tiles (kMTiles = 1).
//
// Tile config: FwdSm90TileConfig (tile_config.h). Compiled into sm_90a code only; on other
// targets the kernel body is empty and the dispatcher never launches it (fwd_dispatch.cu).
#pragma once

#include <cstdint>

#include "attention/epilogue.cuh"
#include "attention/key_visit.cuh"
#include "attention/online_softmax.cuh"
#include "attention/params.h"
#include "attention/query_tile_block.cuh"
#include "attention/sm90_instructions.cuh"
#include "attention/sm90_tile_products.cuh"
#include "attention/smem_tile.cuh"
#include "attention/sparse_key_visit.cuh"

namespace sparsek {

// The tile products of one mainloop step on one warpgroup (sm90_tile_products.cuh), issued
// asynchronously: the caller commits, waits and fences (the kernel overlaps P V of one tile
// with the softmax of the next).
template <typename Cfg, typename Element>
struct Sm90TileProducts {
  // P as the A fragments of the k steps of P V (k step kk: keys [16 kk, 16 kk + 16)).
  using PFragments = uint32_t[Cfg::kKStepsPV][4];

  // S = Q K^T over the head dim. Overwrites s.
  __device__ __forceinline__ static void issue_scores(float (&s)[Cfg::kNTilesS][4],
                                                      const Element* sQ_rows,
                                                      const Element* sK) {
    sm90::issue_kmajor_product<Element, Cfg::kBlockN, Cfg::kKStepsQK,
                               Cfg::QLayout::kColumnBlockElems,
                               Cfg::KVLayout::kColumnBlockElems>(s, sQ_rows, sK);
  }

  __device__ __forceinline__ static void pack_p(PFragments& a,
                                                const float (&p)[Cfg::kNTilesS][4]) {
    sm90::pack_a_fragments<Element>(a, p);
  }

  // O += P V over the keys.
  __device__ __forceinline__ static void issue_pv(float (&acc_o)[Cfg::kNTilesO][4],
                                                  const PFragments& a, const Element* sV) {
    sm90::issue_register_a_product<Element, Cfg::kHeadDim, Cfg::kKStepsPV,
                                   Cfg::KVLayout::kColumnBlockElems>(acc_o, a, sV);
  }
};

template <typename Cfg, typename Element, typename KeyVisit>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocksPerSm)
    attention_fwd_sm90_kernel(const __grid_constant__ AttentionFwdParams p) {
#ifdef SPARSEK_SM90_KERNEL_BODY
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Round up to the 1024-byte alignment of the swizzle atoms (kSmemAlign bytes are reserved).
  const uint32_t raw_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((Cfg::kSmemAlign - raw_address % Cfg::kSmemAlign) %
                                    Cfg::kSmemAlign);
  // Q, then K stages 0 and 1, then V stages 0 and 1, then the key visit's own.
  Element* sQ = reinterpret_cast<Element*>(smem);
  Element* sK0 = sQ + Cfg::kSmemQElems;
  Element* sV0 = sK0 + Cfg::kKVStages * Cfg::kSmemKVElems;
  using Products = Sm90TileProducts<Cfg, Element>;

  const auto [head, batch, kv_head, warp, lane, row0, warp_row0, head_dim, q, k, v] =
      query_tile_block<Cfg, Element>(p);
  // This warpgroup's 64 rows of Q: whole 8-row atoms, so the descriptors stay aligned.
  const Element* sQ_rows = sQ + (warp / 4) * Cfg::kWarpgroupRows * Cfg::QLayout::kRowPitch;

  KeyVisit visit(p, row0, batch * p.heads_kv + kv_head,
                 sV0 + Cfg::kKVStages * Cfg::kSmemKVElems);
  OnlineSoftmax<1> softmax;
  float acc_o[1][Cfg::kNTilesO][4];
  float s[1][Cfg::kNTilesS][4];
#pragma unroll
  for (int dt = 0; dt < Cfg::kNTilesO; ++dt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_o[0][dt][r] = 0.f;
  }
#pragma unroll
  for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) s[0][nt][r] = 0.f;
  }
  const float scale_log2 = p.scale * 1.44269504088896340736f;

  const int num_tiles = visit.num_tiles();
  if (num_tiles > 0) {
    // Tile 0's keys (start() publishes them), Q and K(0); tile 1's keys.
    visit.start(p);
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, Cfg::kNThreads, typename Cfg::QLayout>(
        sQ, q, p.q_row_stride, row0, p.seqlen_q, head_dim);
    visit.load_keys(sK0, k, p.k_row_stride, 0, head_dim);
    sm80::cp_async_commit();
    visit.stash(1, visit.prefetch(p, 1));

    // Step it issues S(it) = Q K(it)^T together with O += P(it - 1) V(it - 1); the softmax of
    // tile it runs while the second product is still in the tensor cores, and the rescale of O
    // to tile it's running max waits for it (DeferredRescale). Copies: K(it + 1) and V(it)
    // start after step it's barrier and are waited on at step it + 1's, one whole step later.
    typename Products::PFragments p_prev;
    for (int it = 0; it < num_tiles; ++it) {
      // The key positions of tile it + 2 load from global memory during this step.
      const auto next = visit.prefetch(p, it + 2);
      // K(it) and V(it - 1) have landed and are published to the async proxy; every thread
      // is done with step it - 1, so S(it - 1)'s K stage and P(it - 2) V(it - 2)'s V stage
      // are free for K(it + 1) and V(it).
      sm80::cp_async_wait<0>();
      sm90::fence_async_shared();
      __syncthreads();
      const int stage = it & 1;
      if (it + 1 < num_tiles) {
        visit.load_keys(sK0 + (stage ^ 1) * Cfg::kSmemKVElems, k, p.k_row_stride, it + 1,
                        head_dim);
      }
      visit.load_keys(sV0 + stage * Cfg::kSmemKVElems, v, p.v_row_stride, it, head_dim);
      sm80::cp_async_commit();

      sm90::fence_registers(acc_o[0]);
      sm90::wgmma_fence();
      Products::issue_scores(s[0], sQ_rows, sK0 + stage * Cfg::kSmemKVElems);
      sm90::wgmma_commit();
      if (it > 0) {
        Products::issue_pv(acc_o[0], p_prev, sV0 + (stage ^ 1) * Cfg::kSmemKVElems);
        sm90::wgmma_commit();
        sm90::wgmma_wait<1>();
      } else {
        sm90::wgmma_wait<0>();
      }
      sm90::fence_registers(s[0]);
#pragma unroll
      for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) s[0][nt][r] *= scale_log2;
      }
      DeferredRescale<1> rescale;
      visit.mask_and_update(p, s, rescale, softmax, it, warp_row0, lane);
      sm90::wgmma_wait<0>();
      sm90::fence_registers(acc_o[0]);
      rescale.apply(acc_o);
      Products::pack_p(p_prev, s[0]);
      // Tile it + 2's slot held tile it - 1's keys, last read before this step's barrier.
      visit.stash(it + 2, next);
    }
    // The last tile's P V, once its V has landed in every thread's copies.
    sm80::cp_async_wait<0>();
    sm90::fence_async_shared();
    __syncthreads();
    sm90::fence_registers(acc_o[0]);
    sm90::wgmma_fence();
    Products::issue_pv(acc_o[0], p_prev, sV0 + ((num_tiles - 1) & 1) * Cfg::kSmemKVElems);
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_registers(acc_o[0]);
  }

  float inv_sum[1][2], lse[1][2];
  softmax.finalize(inv_sum, lse);
  Element* o = static_cast<Element*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
  float* lse_row0 = p.lse + (batch * p.heads_q + head) * p.seqlen_q;
  store_output<Cfg>(acc_o, inv_sum, lse, o, p.o_row_stride, lse_row0, warp_row0,
                    static_cast<int>(p.seqlen_q), head_dim, lane);
#endif
}

}  // namespace sparsek
