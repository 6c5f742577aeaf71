// The backward's dk/dv kernel: one CTA per (key tile, kv head, batch). It loops over the
// query heads of the kv group and, in each, over the query tiles that can see the tile's keys
// (bwd_query_visit.cuh), accumulating in registers, for the warp's keys:
//   S^T = K Q^T, dP^T = V dO^T                      (scores_qk, keys as rows)
//   P^T = m exp(s - lse), dS^T = P^T (dP^T - Delta)
//   dv += P^T dO, dk += dS^T Q                      (accumulate_pv)
//   du_j += sum_i [j in F_i] (g_ij - mean_i)        (SparseK; mean_i from the dq kernel)
// so each dk, dv and du element is written by exactly one CTA, without atomics: the result is
// deterministic. Runs after the dq kernel (it reads the means that kernel wrote).
//
// K and V stay in shared memory; Q(it + 1) loads during dv += P^T dO(it), dO(it + 1) during
// S^T(it + 1). The query rows' lse, Delta, tau and mean sit next to Q in shared memory.
#pragma once

#include <cstdint>

#include "attention/bwd_dq_kernel.cuh"
#include "attention/bwd_epilogue.cuh"
#include "attention/bwd_params.h"
#include "attention/bwd_query_visit.cuh"
#include "attention/cta_order.h"
#include "attention/online_softmax.cuh"
#include "attention/smem_tile.cuh"
#include "attention/tile_mma.cuh"

namespace sparsek {

// delta, mean: [B, Hq, T] of this launch's batches (mean: SparseK only).
template <typename Cfg, typename Element, typename QueryVisit>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocksPerSm)
    attention_bwd_dkdv_kernel(const __grid_constant__ AttentionBwdParams p,
                              const float* __restrict__ delta, const float* __restrict__ mean) {
  extern __shared__ __align__(128) unsigned char smem[];
  Element* sK = reinterpret_cast<Element*>(smem);
  Element* sV = sK + Cfg::kSmemKVElems;
  Element* sQ = sV + Cfg::kSmemKVElems;
  Element* sdO = sQ + Cfg::kSmemQElems;
  float* s_lse2 = reinterpret_cast<float*>(sdO + Cfg::kSmemQElems);
  float* s_delta = s_lse2 + Cfg::kBlockM;
  float* s_tau = s_delta + Cfg::kBlockM;
  float* s_mean = s_tau + Cfg::kBlockM;

  // Key tiles in order: under causal masking the first tiles see the most query rows.
  const CtaCoords cta = cta_coords<QueryVisit::kGridOrder>(p);
  const int tile = cta.rank;
  const int kv_head = cta.head;
  const int64_t batch = cta.batch;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Warps kDimSplit apart own the same keys; warp % kDimSplit picks the part of the dims.
  const int key_warp = warp / Cfg::kDimSplit;
  const int dim_pair0 = (warp % Cfg::kDimSplit) * (Cfg::kNTilesO / 2);
  const int head_dim = static_cast<int>(p.head_dim);
  const int seqlen_q = static_cast<int>(p.seqlen_q);
  const int64_t batch_head = batch * p.heads_kv + kv_head;

  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride +
                     kv_head * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride +
                     kv_head * p.v_head_stride;

  const QueryVisit visit(p, tile, batch_head, s_mean + Cfg::kBlockM);
  const int row_lo = visit.row_lo;
  const int row_tiles = (visit.num_rows + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const int steps = group * row_tiles;

  // The thread's keys: rows lane / 4 and lane / 4 + 8 of each m16 tile of the warp's keys.
  int key_pos[Cfg::kMTiles][2];
  float key_u[Cfg::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = key_warp * Cfg::kWarpRows + mt * 16 + (lane >> 2) + 8 * h;
      key_pos[mt][h] = visit.key_position(i);
      key_u[mt][h] = visit.key_score(i);
    }
  }

  float acc_dk[Cfg::kMTiles][Cfg::kNTilesO][4];
  float acc_dv[Cfg::kMTiles][Cfg::kNTilesO][4];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < Cfg::kNTilesO; ++dt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc_dk[mt][dt][r] = acc_dv[mt][dt][r] = 0.f;
    }
  }
  float du[Cfg::kMTiles][2];  // this lane's share of du of its keys
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) du[mt][0] = du[mt][1] = 0.f;

  const float scale_log2 = p.scale * kLog2e;

  // Step `step` is query head kv_head * group + step / row_tiles, rows row_lo +
  // (step % row_tiles) kBlockM and on.
  auto step_head = [&](int step) { return kv_head * group + step / row_tiles; };
  auto step_row0 = [&](int step) { return row_lo + (step % row_tiles) * Cfg::kBlockM; };
  // Q rows of the step, and its rows' lse (log2), Delta, tau and mean (plain stores, visible
  // after the next barrier). Rows past T: lse -inf (P = 0), tau +inf (not in F).
  auto load_q_and_rows = [&](int step) {
    const int head = step_head(step);
    const int row0 = step_row0(step);
    const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride +
                       head * p.q_head_stride;
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, Cfg::kNThreads>(sQ, q, p.q_row_stride, row0,
                                                                 p.seqlen_q, head_dim);
    sm80::cp_async_commit();
    const int64_t rows_base = (batch * p.heads_q + head) * p.seqlen_q;
    for (int i = threadIdx.x; i < Cfg::kBlockM; i += Cfg::kNThreads) {
      const int row = row0 + i;
      const bool valid = row < seqlen_q;
      s_lse2[i] = valid ? p.lse[rows_base + row] * kLog2e : -INFINITY;
      s_delta[i] = valid ? delta[rows_base + row] : 0.f;
      if constexpr (QueryVisit::kSparseK) {
        s_tau[i] = valid ? p.tau[batch_head * p.seqlen_q + row] : INFINITY;
        s_mean[i] = valid ? mean[rows_base + row] : 0.f;
      }
    }
  };
  auto load_d_out = [&](int step) {
    const Element* d_out = static_cast<const Element*>(p.d_out) + batch * p.do_batch_stride +
                           step_head(step) * p.do_head_stride;
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, Cfg::kNThreads>(
        sdO, d_out, p.do_row_stride, step_row0(step), p.seqlen_q, head_dim);
    sm80::cp_async_commit();
  };

  if (steps > 0) {
    visit.load_keys(sK, k, p.k_row_stride, head_dim);
    visit.load_keys(sV, v, p.v_row_stride, head_dim);
    sm80::cp_async_commit();
    load_q_and_rows(0);
    load_d_out(0);
  }

  for (int step = 0; step < steps; ++step) {
    const int row0 = step_row0(step);
    // Q(step) (and K, V) have landed; dO(step) may still be in flight.
    sm80::cp_async_wait<1>();
    __syncthreads();
    float st[Cfg::kMTiles][Cfg::kNTilesS][4];
    scores_qk<Cfg>(st, sK, sQ, key_warp, lane);
    sm80::cp_async_wait<0>();
    __syncthreads();
    float dpt[Cfg::kMTiles][Cfg::kNTilesS][4];
    scores_qk<Cfg>(dpt, sV, sdO, key_warp, lane);

    // Element r of st[mt][nt]: key row lane / 4 + 8 (r / 2) of m16 tile mt, query column
    // 8 nt + 2 (lane % 4) + r % 2. The column's row data is read once for both key rows.
#pragma unroll
    for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = nt * 8 + (lane & 3) * 2 + c;
        const int row = row0 + col;
        const float lse2 = s_lse2[col];
        const float row_delta = s_delta[col];
        const float tau = QueryVisit::kSparseK ? s_tau[col] : 0.f;
        const float row_mean = QueryVisit::kSparseK ? s_mean[col] : 0.f;
#pragma unroll
        for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = 2 * h + c;
            bool fractional;
            const float m = visit.gate(key_pos[mt][h], key_u[mt][h], row, tau, fractional);
            const bool live = m > 0.f && lse2 > -INFINITY;
            const float e = live ? fast_exp2(st[mt][nt][r] * scale_log2 - lse2) : 0.f;
            const float diff = dpt[mt][nt][r] - row_delta;
            st[mt][nt][r] = m * e;                 // P^T
            dpt[mt][nt][r] = st[mt][nt][r] * diff;  // dS^T
            if (QueryVisit::kSparseK && fractional) du[mt][h] += e * diff - row_mean;
          }
        }
      }
    }

    accumulate_pv<Cfg>(acc_dk, dpt, sQ, lane, dim_pair0);
    // Every warp is done with Q(step) and the row data: the next step's may overwrite them.
    __syncthreads();
    if (step + 1 < steps) load_q_and_rows(step + 1);
    accumulate_pv<Cfg>(acc_dv, st, sdO, lane, dim_pair0);
    // Every warp is done with dO(step).
    __syncthreads();
    if (step + 1 < steps) load_d_out(step + 1);
  }
  sm80::cp_async_wait<0>();

  int rows[Cfg::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[mt][h] = key_pos[mt][h];
  }
  // dk, dv are contiguous [B, S, Hkv, D].
  const int64_t out_offset = (batch * p.seqlen_k * p.heads_kv + kv_head) * p.head_dim;
  const int64_t out_row_stride = p.heads_kv * p.head_dim;
  store_scaled_rows(acc_dk, p.scale, static_cast<Element*>(p.dk) + out_offset, out_row_stride,
                    rows, dim_pair0 * 16, head_dim, lane);
  store_scaled_rows(acc_dv, 1.f, static_cast<Element*>(p.dv) + out_offset, out_row_stride, rows,
                    dim_pair0 * 16, head_dim, lane);

  if constexpr (QueryVisit::kSparseK) {
    // du [B, S, Hkv]: the four lanes of a quad share a key; one warp of each dim split writes.
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float total = quad_sum(du[mt][h]);
        if (dim_pair0 == 0 && (lane & 3) == 0 && rows[mt][h] >= 0) {
          p.du[(batch * p.seqlen_k + rows[mt][h]) * p.heads_kv + kv_head] = total;
        }
      }
    }
  }
}

}  // namespace sparsek
