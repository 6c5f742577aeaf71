// The backward's dq kernel on Hopper tensor cores (wgmma): one CTA of two warpgroups per (128
// query rows, query head, batch), each warpgroup owning 64 rows, visiting exactly the key
// tiles the forward visited (bwd_key_visit.cuh). Per tile of 64 keys, for the warpgroup's
// rows (sm90_tile_products.cuh):
//   S = Q K^T, dP = dO V^T          both operands from shared memory, issued together
//   P = m exp(s - lse), dS = P (dP - Delta)
//   dq += dS K                      dS from registers
// and the SparseK row sums of g over F_i and |F_i|, as the mma.sync kernel
// (bwd_dq_kernel.cuh), whose per-element code this is with one m16 tile a warp. S and dP are
// two commit groups: in the dense modes P's exponentials run while dP is in the tensor cores
// and tiles every row of which sees every key skip the gates (SparseK waits for both and
// computes each gate once). Q and dO
// stay in shared memory; K and V tile it + 1's copy (gathered rows in SparseK) has all of step
// it to land. dq += dS K(it) runs on through the next step's barrier and score products: K
// has three stages (the one being read by it, by S(it + 1), and the one loading), V two. One
// barrier a step.
//
// Tile config: BwdDqSm90TileConfig (bwd_tile_config.h). Compiled into sm_90a code only; on
// other targets the body is empty and the dispatcher never launches it (bwd_dispatch.cu).
#pragma once

#include <cstdint>

#include "attention/bwd_dq_kernel.cuh"
#include "attention/bwd_epilogue.cuh"
#include "attention/bwd_key_visit.cuh"
#include "attention/bwd_params.h"
#include "attention/cta_order.h"
#include "attention/online_softmax.cuh"
#include "attention/sm90_instructions.cuh"
#include "attention/sm90_tile_products.cuh"
#include "attention/smem_tile.cuh"

namespace sparsek {

// delta, mean: [B, Hq, T] of this launch's batches (mean: SparseK only).
template <typename Cfg, typename Element, typename KeyVisit>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocksPerSm)
    attention_bwd_dq_sm90_kernel(const __grid_constant__ AttentionBwdParams p,
                                 const float* __restrict__ delta, float* __restrict__ mean) {
#ifdef SPARSEK_SM90_KERNEL_BODY
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Round up to the 1024-byte alignment of the swizzle atoms (kSmemAlign bytes are reserved).
  const uint32_t raw_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((Cfg::kSmemAlign - raw_address % Cfg::kSmemAlign) %
                                    Cfg::kSmemAlign);
  // Q, dO, K stages, V stages, then the key visit's own.
  Element* sQ = reinterpret_cast<Element*>(smem);
  Element* sdO = sQ + Cfg::kSmemQElems;
  Element* sK0 = sdO + Cfg::kSmemQElems;
  Element* sV0 = sK0 + Cfg::kKStages * Cfg::kSmemKVElems;
  using QBlock = typename Cfg::QLayout;
  using KVBlock = typename Cfg::KVLayout;

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
  // This warpgroup's 64 rows of Q and dO: whole 8-row atoms, so the descriptors stay aligned.
  const int wg_rows = (warp / 4) * Cfg::kWarpgroupRows * QBlock::kRowPitch;
  const Element* sQ_rows = sQ + wg_rows;
  const Element* sdO_rows = sdO + wg_rows;

  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride +
                     head * p.q_head_stride;
  const Element* d_out = static_cast<const Element*>(p.d_out) + batch * p.do_batch_stride +
                         head * p.do_head_stride;
  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride +
                     kv_head * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride +
                     kv_head * p.v_head_stride;

  KeyVisit visit(p, row0, batch * p.heads_kv + kv_head,
                 sV0 + Cfg::kVStages * Cfg::kSmemKVElems);

  // The thread's rows: lse in the log2 domain (-inf past T: P = 0 there) and Delta.
  const int64_t rows_base = (batch * p.heads_q + head) * p.seqlen_q;
  float lse2[Cfg::kMTiles][2], row_delta[Cfg::kMTiles][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + (lane >> 2) + 8 * h;
    const bool valid = row < seqlen_q;
    lse2[0][h] = valid ? p.lse[rows_base + row] * kLog2e : -INFINITY;
    row_delta[0][h] = valid ? delta[rows_base + row] : 0.f;
  }

  float acc_dq[Cfg::kMTiles][Cfg::kNTilesO][4];
#pragma unroll
  for (int dt = 0; dt < Cfg::kNTilesO; ++dt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_dq[0][dt][r] = 0.f;
  }
  // SparseK: this lane's share of sum_{j in F_i} g_ij and |F_i|.
  float sum_g[Cfg::kMTiles][2] = {{0.f, 0.f}}, count[Cfg::kMTiles][2] = {{0.f, 0.f}};
  const float scale_log2 = p.scale * kLog2e;

  const int num_tiles = visit.num_tiles();
  if (num_tiles > 0) {
    // Tile 0's keys (start() publishes them), Q, dO, K(0) and V(0); tile 1's keys.
    visit.start(p);
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, Cfg::kNThreads, QBlock>(
        sQ, q, p.q_row_stride, row0, p.seqlen_q, head_dim);
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, Cfg::kNThreads, QBlock>(
        sdO, d_out, p.do_row_stride, row0, p.seqlen_q, head_dim);
    visit.load_keys(sK0, k, p.k_row_stride, 0, head_dim);
    visit.load_keys(sV0, v, p.v_row_stride, 0, head_dim);
    sm80::cp_async_commit();
    visit.stash(1, visit.prefetch(p, 1));

    // dS as the A fragments of dq += dS K. Outside the loop: the product reads them while it
    // runs, on into the next step, so their registers must not be reused before its wait.
    uint32_t ds[Cfg::kKStepsPV][4];
    for (int it = 0; it < num_tiles; ++it) {
      // The key positions of tile it + 2 load from global memory during this step.
      const auto next = visit.prefetch(p, it + 2);
      // K(it) and V(it) have landed and are published to the async proxy; every thread is
      // done with step it - 1's scores. Stages: dq += dS K(it - 1) may still be running
      // (K stage (it - 1) % 3); dq(it - 2) and dP(it - 1) were waited on during step it - 1,
      // so K stage (it + 1) % 3 and V stage (it + 1) % 2 are free for tile it + 1.
      sm80::cp_async_wait<0>();
      sm90::fence_async_shared();
      __syncthreads();
      const Element* sK = sK0 + (it % Cfg::kKStages) * Cfg::kSmemKVElems;
      const Element* sV = sV0 + (it % Cfg::kVStages) * Cfg::kSmemKVElems;
      if (it + 1 < num_tiles) {
        visit.load_keys(sK0 + ((it + 1) % Cfg::kKStages) * Cfg::kSmemKVElems, k,
                        p.k_row_stride, it + 1, head_dim);
        visit.load_keys(sV0 + ((it + 1) % Cfg::kVStages) * Cfg::kSmemKVElems, v,
                        p.v_row_stride, it + 1, head_dim);
        sm80::cp_async_commit();
      }

      // S and dP are outputs only (issue_kmajor_product's kOutputOnly), in two commit groups.
      float s[Cfg::kMTiles][Cfg::kNTilesS][4];
      float dp[Cfg::kMTiles][Cfg::kNTilesS][4];
      sm90::wgmma_fence();
      sm90::issue_kmajor_product<Element, Cfg::kBlockN, Cfg::kKStepsQK,
                                 QBlock::kColumnBlockElems, KVBlock::kColumnBlockElems, true>(
          s[0], sQ_rows, sK);
      sm90::wgmma_commit();
      sm90::issue_kmajor_product<Element, Cfg::kBlockN, Cfg::kKStepsQK,
                                 QBlock::kColumnBlockElems, KVBlock::kColumnBlockElems, true>(
          dp[0], sdO_rows, sV);
      sm90::wgmma_commit();
      const auto gate = [&] {
        if constexpr (KeyVisit::kSparseK) {
          return visit.range_tile_gate(p, it, warp_row0, lane);
        } else {
          return visit.tile_gate(p, it, warp_row0, lane);
        }
      }();
      // Groups in flight: dq(it - 1), S(it), dP(it); they complete in that order.
      if constexpr (KeyVisit::kSparseK) {
        // SparseK: P = m exp(s - lse), dS = P (dP - Delta) and g = exp(s - lse)(dP - Delta)
        // over F_i in one pass once both products are in: the gate is computed once.
        sm90::wgmma_wait<0>();
        sm90::fence_registers(s[0]);
        sm90::fence_registers(dp[0]);
        // gate_of(nt, r, m, fractional): the gate of element r of tile nt.
        auto sparse_pass = [&](auto gate_of) {
#pragma unroll
          for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int h = r >> 1;
              float m;
              bool fractional;
              gate_of(nt, r, m, fractional);
              const bool live = m > 0.f && lse2[0][h] > -INFINITY;
              // Scale before subtracting: a negative scale must not meet a hidden -inf.
              const float e = live ? fast_exp2(s[0][nt][r] * scale_log2 - lse2[0][h]) : 0.f;
              const float diff = dp[0][nt][r] - row_delta[0][h];
              s[0][nt][r] = m * e * diff;  // dS
              if (fractional) {
                sum_g[0][h] += e * diff;
                count[0][h] += 1.f;
              }
            }
          }
        };
        // Tiles of full keys, and range tiles every row of the warp sees whole, skip the gate;
        // the other tiles of planned candidates (most of a row's keys) skip the positions, and
        // the rest of the range takes them from offsets.
        if (visit.is_full_tile(it) || (!visit.is_candidate_tile(it) && gate.seen_whole)) {
          sparse_pass([&](int, int, float& m, bool& fractional) {
            m = 1.f;
            fractional = false;
          });
        } else if (visit.is_candidate_tile(it)) {
          sparse_pass([&](int nt, int r, float& m, bool& fractional) {
            gate.candidate(0, nt, r, m, fractional);
          });
        } else if (gate.in_band) {
          // Range tiles: the gate from the keys' offsets to the rows' positions.
          sparse_pass([&](int nt, int r, float& m, bool& fractional) {
            gate.band(0, nt, r, m, fractional);
          });
        } else {
          sparse_pass([&](int nt, int r, float& m, bool& fractional) {
            gate.range(0, nt, r, m, fractional);
          });
        }
      } else {
        // Dense modes: P while dP is still in the tensor cores, then dS. Tiles every row of
        // which sees every key (most of them) skip the gates.
        sm90::wgmma_wait<1>();
        sm90::fence_registers(s[0]);
        if (gate.needs_mask) {
#pragma unroll
          for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int h = r >> 1;
              float m;
              bool fractional;
              gate(0, nt, r, m, fractional);
              const bool live = m > 0.f && lse2[0][h] > -INFINITY;
              s[0][nt][r] = live ? fast_exp2(s[0][nt][r] * scale_log2 - lse2[0][h]) : 0.f;
            }
          }
        } else {
          // lse = -inf (rows past T, or that see no key): P = 0.
#pragma unroll
          for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int h = r >> 1;
              s[0][nt][r] = lse2[0][h] > -INFINITY
                                ? fast_exp2(s[0][nt][r] * scale_log2 - lse2[0][h])
                                : 0.f;
            }
          }
        }
        sm90::wgmma_wait<0>();
        sm90::fence_registers(dp[0]);
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) s[0][nt][r] *= dp[0][nt][r] - row_delta[0][r >> 1];
        }
      }
      // Tile it + 2's slot held tile it - 1's keys, last read before this step's barrier.
      visit.stash(it + 2, next);

      sm90::pack_a_fragments<Element>(ds, s[0]);
      sm90::wgmma_fence();
      sm90::issue_register_a_product<Element, Cfg::kHeadDim, Cfg::kKStepsPV,
                                     KVBlock::kColumnBlockElems>(acc_dq[0], ds, sK);
      sm90::wgmma_commit();
      // Left running into the next step (K(it)'s stage is not reloaded until step it + 2).
    }
    sm90::wgmma_wait<0>();
    sm90::fence_registers(acc_dq[0]);
  }

  int rows[Cfg::kMTiles][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + (lane >> 2) + 8 * h;
    rows[0][h] = row < seqlen_q ? row : -1;
  }
  // dq is contiguous [B, T, Hq, D].
  Element* dq = static_cast<Element*>(p.dq) +
                (batch * p.seqlen_q * p.heads_q + head) * p.head_dim;
  store_scaled_rows(acc_dq, p.scale, dq, p.heads_q * p.head_dim, rows, 0, head_dim, lane);

  if constexpr (KeyVisit::kSparseK) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float total = quad_sum(sum_g[0][h]);
      const float n = quad_sum(count[0][h]);
      if ((lane & 3) == 0 && rows[0][h] >= 0) {
        mean[rows_base + rows[0][h]] = n > 0.f ? total / n : 0.f;
      }
    }
  }
#endif
}

}  // namespace sparsek
