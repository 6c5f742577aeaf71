// The backward's dq kernel: one CTA per (query tile, query head, batch), visiting exactly the
// key tiles the forward visited (bwd_key_visit.cuh). Per key tile, for the warp's rows:
//   S = Q K^T, dP = dO V^T                          (scores_qk)
//   P = m exp(s - lse), dS = P (dP - Delta)         (float32, base 2)
//   dq += dS K                                      (accumulate_pv)
// and in SparseK mode the row sums of g = exp(s - lse)(dP - Delta) over F_i and |F_i|, whose
// quotient (the mean of g over F_i) the dk/dv kernel subtracts for du. Q and dO stay in
// shared memory; K and V one tile each, V(it + 1) loading during dS K(it).
//
// A row with lse = -inf (no key of gate > 0) gets P = 0 and g = 0: the exponential is only
// taken where the gate is positive and lse finite (exp(s - lse) <= 1 / m there).
#pragma once

#include <cstdint>

#include "attention/bwd_epilogue.cuh"
#include "attention/bwd_key_visit.cuh"
#include "attention/bwd_params.h"
#include "attention/cta_order.h"
#include "attention/online_softmax.cuh"
#include "attention/smem_tile.cuh"
#include "attention/tile_mma.cuh"

namespace sparsek {

constexpr float kLog2e = 1.44269504088896340736f;

// delta, mean: [B, Hq, T] of this launch's batches (mean: SparseK only).
template <typename Cfg, typename Element, typename KeyVisit>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocksPerSm)
    attention_bwd_dq_kernel(const __grid_constant__ AttentionBwdParams p,
                            const float* __restrict__ delta, float* __restrict__ mean) {
  extern __shared__ __align__(128) unsigned char smem[];
  Element* sQ = reinterpret_cast<Element*>(smem);
  Element* sdO = sQ + Cfg::kSmemQElems;
  Element* sK = sdO + Cfg::kSmemQElems;
  Element* sV = sK + Cfg::kSmemKVElems;

  // Reverse order, as the forward: under causal masking the last tiles carry the most keys.
  const CtaCoords cta = cta_coords<KeyVisit::kGridOrder>(p);
  const int m_block = cta.tiles - 1 - cta.rank;
  const int head = cta.head;
  const int64_t batch = cta.batch;
  const int kv_head = head / static_cast<int>(p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = m_block * Cfg::kBlockM;
  const int warp_row0 = row0 + warp * Cfg::kWarpRows;
  const int head_dim = static_cast<int>(p.head_dim);
  const int seqlen_q = static_cast<int>(p.seqlen_q);

  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride +
                     head * p.q_head_stride;
  const Element* d_out = static_cast<const Element*>(p.d_out) + batch * p.do_batch_stride +
                         head * p.do_head_stride;
  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride +
                     kv_head * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride +
                     kv_head * p.v_head_stride;

  KeyVisit visit(p, row0, batch * p.heads_kv + kv_head, sV + Cfg::kSmemKVElems);

  // The thread's rows: lse in the log2 domain (-inf past T: P = 0 there) and Delta.
  const int64_t rows_base = (batch * p.heads_q + head) * p.seqlen_q;
  float lse2[Cfg::kMTiles][2], row_delta[Cfg::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + mt * 16 + (lane >> 2) + 8 * h;
      const bool valid = row < seqlen_q;
      lse2[mt][h] = valid ? p.lse[rows_base + row] * kLog2e : -INFINITY;
      row_delta[mt][h] = valid ? delta[rows_base + row] : 0.f;
    }
  }

  float acc_dq[Cfg::kMTiles][Cfg::kNTilesO][4];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < Cfg::kNTilesO; ++dt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc_dq[mt][dt][r] = 0.f;
    }
  }
  // SparseK: this lane's share of sum_{j in F_i} g_ij and |F_i|.
  float sum_g[Cfg::kMTiles][2], count[Cfg::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) sum_g[mt][h] = count[mt][h] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;

  const int num_tiles = visit.num_tiles();
  if (num_tiles > 0) {
    visit.start(p);
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, Cfg::kNThreads>(sQ, q, p.q_row_stride, row0,
                                                                 p.seqlen_q, head_dim);
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, Cfg::kNThreads>(sdO, d_out, p.do_row_stride,
                                                                 row0, p.seqlen_q, head_dim);
    visit.load_keys(sK, k, p.k_row_stride, 0, head_dim);
    visit.load_keys(sV, v, p.v_row_stride, 0, head_dim);
    sm80::cp_async_commit();

    for (int it = 0; it < num_tiles; ++it) {
      // The key positions of tile it + 1 (SparseK) load while tile it is computed.
      const auto next = visit.prefetch(p, it + 1);
      // K(it) and V(it) have landed.
      sm80::cp_async_wait<0>();
      __syncthreads();

      float s[Cfg::kMTiles][Cfg::kNTilesS][4];
      float dp[Cfg::kMTiles][Cfg::kNTilesS][4];
      scores_qk<Cfg>(s, sQ, sK, warp, lane);
      scores_qk<Cfg>(dp, sdO, sV, warp, lane);

      const auto gate = visit.tile_gate(p, it, warp_row0, lane);
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int h = r >> 1;
            float m;
            bool fractional;
            gate(mt, nt, r, m, fractional);
            const bool live = m > 0.f && lse2[mt][h] > -INFINITY;
            // Scale before subtracting: a negative scale must not meet a hidden -inf.
            const float e = live ? fast_exp2(s[mt][nt][r] * scale_log2 - lse2[mt][h]) : 0.f;
            const float diff = dp[mt][nt][r] - row_delta[mt][h];
            s[mt][nt][r] = m * e * diff;  // dS
            if (KeyVisit::kSparseK && fractional) {
              sum_g[mt][h] += e * diff;
              count[mt][h] += 1.f;
            }
          }
        }
      }
      // Tile it + 1's key slot was last read while tile it - 1 was computed.
      visit.stash(it + 1, next);

      // Every warp is done with V(it), and tile it + 1's keys are stashed.
      __syncthreads();
      if (it + 1 < num_tiles) {
        visit.load_keys(sV, v, p.v_row_stride, it + 1, head_dim);
        sm80::cp_async_commit();
      }
      accumulate_pv<Cfg>(acc_dq, s, sK, lane);
      // Every warp is done with K(it).
      __syncthreads();
      if (it + 1 < num_tiles) {
        visit.load_keys(sK, k, p.k_row_stride, it + 1, head_dim);
        sm80::cp_async_commit();
      }
    }
  }

  int rows[Cfg::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + mt * 16 + (lane >> 2) + 8 * h;
      rows[mt][h] = row < seqlen_q ? row : -1;
    }
  }
  // dq is contiguous [B, T, Hq, D].
  Element* dq = static_cast<Element*>(p.dq) +
                (batch * p.seqlen_q * p.heads_q + head) * p.head_dim;
  store_scaled_rows(acc_dq, p.scale, dq, p.heads_q * p.head_dim, rows, 0, head_dim, lane);

  if constexpr (KeyVisit::kSparseK) {
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float total = quad_sum(sum_g[mt][h]);
        const float n = quad_sum(count[mt][h]);
        if ((lane & 3) == 0 && rows[mt][h] >= 0) {
          mean[rows_base + rows[mt][h]] = n > 0.f ? total / n : 0.f;
        }
      }
    }
  }
}

}  // namespace sparsek
