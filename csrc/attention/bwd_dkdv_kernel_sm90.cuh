// The backward's dk/dv kernel on Hopper tensor cores (wgmma): one CTA per (kBlockN keys, kv
// head, batch), each warpgroup owning 64 of the keys. It loops over the query rows that can
// see the tile's keys (bwd_query_visit.cuh), 64 rows a step, and at each over the query heads
// of the kv group, accumulating for the warpgroup's keys (sm90_tile_products.cuh):
//   S^T = K Q^T, dP^T = V dO^T      both operands from shared memory, issued together
//   P^T = m exp(s - lse), dS^T = P^T (dP^T - Delta)
//   dv += P^T dO, dk += dS^T Q      P^T and dS^T from registers
//   du_j += sum_i [j in F_i] (g_ij - mean_i)   (SparseK; mean_i from the dq kernel)
// as the mma.sync kernel (bwd_dkdv_kernel.cuh), whose per-element code this is with one m16
// tile a warp: each dk, dv and du element is written by exactly one CTA, without atomics.
// With Cfg::kFuseDq the kernel also computes dq, and the dq kernel does not run: dS goes to
// shared memory (stmatrix, transposed), and during the next step (once both warpgroups' dS
// of the step is in) each warpgroup issues dq = dS K for half the head dim over the CTA's 128
// keys and adds it into a float32 accumulator of 64-row tiles (bwd_dq_accumulator.h; its
// conversion scales it into dq) with coalesced 16-byte atomics. Row steps start at multiples
// of 64 (one tile each). The order of the additions varies from run to run:
// JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 keeps the dq kernel instead. In SparseK mode no means
// exist yet: this kernel writes du's first term
//   du_j = sum_i [j in F_i] g_ij
// and adds each row's sum of g over F_i (its share from the CTA's keys) into row_stats by
// one atomic a row and step; bwd_sparsek_du.h then subtracts the means.
//
// K and V stay in shared memory. Q, dO and the rows' lse, Delta, tau and mean are
// double-buffered: step + 1's copy has all of step `step` to land. The four products are
// three commit groups: in the dense modes the exponentials of P^T overlap dP^T's product and
// dS^T overlaps dv's, and blocks every row of which sees every key skip the gates; SparseK
// waits for both scores and computes each gate once. Without kFuseDq every thread copies and
// one CTA barrier a step publishes the copies. With it the kernel is warp-specialized
// (Cfg::kWarpSpecialized): a producer warpgroup makes the copies and hands each stage over
// by mbarriers (full: landed; empty: every consumer warp is done with the step). dS is
// double-buffered under mbarriers of its own, and the two consumer warpgroups ping-pong
// (Cfg::kPingPong): each issues its S^T and dP^T only when the other's are in, so that one's
// gates and exponentials run while the other's products are in the tensor cores.
//
// Tile config: BwdDkDvSm90TileConfig (bwd_tile_config.h). Compiled into sm_90a code only.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention/bwd_dq_accumulator.h"
#include "attention/bwd_dq_kernel.cuh"
#include "attention/bwd_epilogue.cuh"
#include "attention/bwd_params.h"
#include "attention/bwd_query_visit.cuh"
#include "attention/bwd_tile_config.h"
#include "attention/cta_order.h"
#include "attention/online_softmax.cuh"
#include "attention/sm90_instructions.cuh"
#include "attention/sm90_pipeline.cuh"
#include "attention/sm90_tile_products.cuh"
#include "attention/smem_tile.cuh"

namespace sparsek {

// The named barriers of the warp-specialized kernel's consumers (0 is __syncthreads):
// warpgroup w waits at kTurnBarrier0 + w for its turn to issue S^T and dP^T (Cfg::kPingPong).
constexpr int kTurnBarrier0 = 1;

// delta, row_stats: [B, Hq, T] of this launch's batches. row_stats (SparseK only): the dq
// kernel's means of g over F_i, read; with Cfg::kFuseDq the rows' sums of g over F_i, zeroed
// before and added to. dq_accum: the zeroed accumulator tiles of the same batches
// (Cfg::kFuseDq only).
template <typename Cfg, typename Element, typename QueryVisit>
__global__ void __launch_bounds__(Cfg::kNThreads, Cfg::kMinBlocksPerSm)
    attention_bwd_dkdv_sm90_kernel(const __grid_constant__ AttentionBwdParams p,
                                   const float* __restrict__ delta,
                                   float* __restrict__ row_stats,
                                   float* __restrict__ dq_accum) {
  static_assert(!Cfg::kFuseDq || Cfg::kSparseK == QueryVisit::kSparseK,
                "the fused kernel's shared memory is laid out for its mode");
  static_assert(!Cfg::kFuseDq || Cfg::kWarpSpecialized,
                "the fused kernel hands dS between its warpgroups by mbarriers");
  constexpr bool kSumRows = Cfg::kRowPartialsInSmem;  // SparseK with dq fused
  // SparseK with dq fused: steps whose rows see none of a warpgroup's keys skip its work
  // (p.skip_idle_halves).
  constexpr bool kSkipIdleHalves = kSumRows && Cfg::kPingPong;
#ifdef SPARSEK_SM90_KERNEL_BODY
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((Cfg::kSmemAlign - raw_address % Cfg::kSmemAlign) %
                                    Cfg::kSmemAlign);
  // K, V, Q stages, dO stages, dS (kFuseDq), the row partials (kSumRows), then per stage
  // the rows' lse (log2), Delta, tau and mean, then the query visit's own.
  using QBlock = typename Cfg::QLayout;
  using KVBlock = typename Cfg::KVLayout;
  Element* sK = reinterpret_cast<Element*>(smem);
  Element* sV = sK + Cfg::kSmemKVElems;
  Element* sQ0 = sV + Cfg::kSmemKVElems;
  Element* sdO0 = sQ0 + Cfg::kQStages * Cfg::kSmemQElems;
  Element* sdS = sdO0 + Cfg::kQStages * Cfg::kSmemQElems;
  float* s_row_partials = reinterpret_cast<float*>(sdS + Cfg::kSmemDsElems);
  float* s_rows0 = s_row_partials + Cfg::kSmemRowPartialsFloats;
  constexpr int kRowsStageFloats = Cfg::kRowVectors * Cfg::kBlockM;
  // kWarpSpecialized: K/V full, then Q full and Q empty per stage (Q, dO and the row vectors),
  // then dS full and dS empty per dS stage (dS and the row partials).
  uint64_t* barriers = reinterpret_cast<uint64_t*>(s_rows0 + Cfg::kQStages * kRowsStageFloats);
  uint64_t* kv_full = barriers;
  uint64_t* q_full = barriers + 1;
  uint64_t* q_empty = barriers + 1 + Cfg::kQStages;
  uint64_t* ds_full = barriers + 1 + 2 * Cfg::kQStages;
  uint64_t* ds_empty = ds_full + Cfg::kDsStages;
  constexpr bool kWs = Cfg::kWarpSpecialized;

  // Key tiles in order: under causal masking the first tiles see the most query rows. Row
  // bands: the CTA list's entry, where the launcher runs it (the CTAs past it leave).
  CtaCoords cta;
  if (QueryVisit::kSparseK && p.band_ctas) {
    if (!band_list_coords(p, p.key_span_stride / KeySpans::kKdLeaf, cta)) return;
  } else {
    cta = cta_coords<QueryVisit::kGridOrder>(p);
  }
  const int tile = cta.rank;
  const int kv_head = cta.head;
  const int64_t batch = cta.batch;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int head_dim = static_cast<int>(p.head_dim);
  const int seqlen_q = static_cast<int>(p.seqlen_q);
  const int64_t batch_head = batch * p.heads_kv + kv_head;
  // This warpgroup's 64 keys of K and V. The warpgroup index is broadcast from lane 0 so that
  // the compiler knows it uniform: the products' descriptors then stay in uniform registers
  // instead of being moved there (R2UR) before every wgmma.
  const int wg = sm90::uniform_warp_index() / 4;
  const int wg_rows = wg * 64 * KVBlock::kRowPitch;
  const Element* sK_rows = sK + wg_rows;
  const Element* sV_rows = sV + wg_rows;

  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride +
                     kv_head * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride +
                     kv_head * p.v_head_stride;

  // Row bands on a grid of every band's capacity: the ranks past the slices that visit rows
  // (the slice order puts them last) add nothing to the zeroed accumulators: the CTA leaves
  // before any other load (the CTA list holds no such rank).
  if (QueryVisit::kSparseK && p.key_band_rows > 0 && p.visiting_slices && !p.band_ctas &&
      tile >= p.visiting_slices[batch_head]) {
    return;
  }
  const QueryVisit visit(p, tile, batch_head, barriers + Cfg::kNumBarriers);
  // Row bands: a slice past its band's pieces (or whose pieces meet no row) adds nothing to
  // the zeroed accumulators; the whole CTA leaves (uniform: the visit ends with a barrier).
  if (QueryVisit::kSparseK && p.key_band_rows > 0 && visit.num_rows == 0) return;
  // kFuseDq: steps aligned to the accumulator's tiles (the rows added in front see none of
  // the keys: their gates are 0).
  const int row_lo = Cfg::kFuseDq ? visit.row_lo - visit.row_lo % Cfg::kBlockM : visit.row_lo;
  const int row_tiles =
      visit.num_rows > 0
          ? (visit.num_rows + (visit.row_lo - row_lo) + Cfg::kBlockM - 1) / Cfg::kBlockM
          : 0;
  const int steps = group * row_tiles;

  // The thread's keys h = 0, 1: rows lane / 4 and lane / 4 + 8 of the warp's 16. Their
  // positions and scores are asked of the visit where they are used (SparseK: its shared
  // memory; dense: arithmetic) rather than held in registers across the loop, which the fused
  // SparseK pass could not afford without spilling.
  auto thread_key = [&](int h) { return warp * Cfg::kWarpRows + (lane >> 2) + 8 * h; };

  float acc_dk[Cfg::kMTiles][Cfg::kNTilesO][4];
  float acc_dv[Cfg::kMTiles][Cfg::kNTilesO][4];
#pragma unroll
  for (int dt = 0; dt < Cfg::kNTilesO; ++dt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_dk[0][dt][r] = acc_dv[0][dt][r] = 0.f;
  }
  float du[Cfg::kMTiles][2] = {{0.f, 0.f}};  // this lane's share of du of its keys

  const float scale_log2 = p.scale * kLog2e;

  // Step `step` is query head kv_head * group + step % group, rows row_lo + (step / group)
  // kBlockM and on: the query heads of a group innermost, so that CTAs that start at the same
  // row (the slices of one sorted span in SparseK, neighbouring key tiles in the dense modes)
  // stay on the same rows of the same heads and may share Q, dO and dq tiles in L2. Measured
  // against heads outermost in one call (bench/NOTES.md, v2): within the noise for SparseK,
  // 3-5% faster on the dense causal and GQA configs. The loops walk the steps with a cursor:
  // a division a step cost the consumers ~50 instructions and a reciprocal's latency at the
  // top of each.
  struct StepRows {
    int head;
    int row0;
  };
  const StepRows first_step{kv_head * group, row_lo};
  const int head_end = kv_head * group + group;
  auto next_step = [&](StepRows at) {
    if (++at.head == head_end) {
      at.head = first_step.head;
      at.row0 += Cfg::kBlockM;
    }
    return at;
  };
  // Q and dO rows of the step into stage `stage`, and its rows' lse (log2), Delta, tau and
  // mean (plain stores, visible after the next barrier). Rows past T: lse +inf (P = 0), tau
  // +inf (not in F).
  // kThreads threads copy, of which this is `thread` (all of them, or the producers).
  auto load_step = [&](StepRows at, int stage, auto threads, int thread) {
    constexpr int kThreads = decltype(threads)::value;
    const int head = at.head;
    const int row0 = at.row0;
    const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride +
                       head * p.q_head_stride;
    const Element* d_out = static_cast<const Element*>(p.d_out) + batch * p.do_batch_stride +
                           head * p.do_head_stride;
    if constexpr (kWs) {
      load_tile_async_by<Cfg::kBlockM, Cfg::kHeadDim, kThreads, QBlock>(
          thread, sQ0 + stage * Cfg::kSmemQElems, q, p.q_row_stride, row0, p.seqlen_q,
          head_dim);
      load_tile_async_by<Cfg::kBlockM, Cfg::kHeadDim, kThreads, QBlock>(
          thread, sdO0 + stage * Cfg::kSmemQElems, d_out, p.do_row_stride, row0, p.seqlen_q,
          head_dim);
    } else {
      load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, kThreads, QBlock>(
          sQ0 + stage * Cfg::kSmemQElems, q, p.q_row_stride, row0, p.seqlen_q, head_dim);
      load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, kThreads, QBlock>(
          sdO0 + stage * Cfg::kSmemQElems, d_out, p.do_row_stride, row0, p.seqlen_q,
          head_dim);
      sm80::cp_async_commit();
    }
    float* s_rows = s_rows0 + stage * kRowsStageFloats;
    const int64_t rows_base = (batch * p.heads_q + head) * p.seqlen_q;
    for (int i = thread; i < Cfg::kBlockM; i += kThreads) {
      const int row = row0 + i;
      const bool valid = row < seqlen_q;
      // lse +inf (rows past T, or that see no key) makes P^T = exp2(s - lse) 0 without a
      // test of its own.
      const float lse = valid ? p.lse[rows_base + row] : -INFINITY;
      s_rows[i] = lse > -INFINITY ? lse * kLog2e : INFINITY;
      s_rows[Cfg::kBlockM + i] = valid ? delta[rows_base + row] : 0.f;
      if constexpr (QueryVisit::kSparseK) {
        s_rows[2 * Cfg::kBlockM + i] = valid ? p.tau[batch_head * p.seqlen_q + row] : INFINITY;
        if constexpr (!kSumRows) {
          s_rows[3 * Cfg::kBlockM + i] = valid ? row_stats[rows_base + row] : 0.f;
        }
      }
    }
  };

  using AllThreads = std::integral_constant<int, Cfg::kNThreads>;
  if constexpr (kWs) {
    if (threadIdx.x == 0) {
      sm90::mbarrier_init(kv_full, Cfg::kNProducerThreads);
      for (int s = 0; s < Cfg::kQStages; ++s) {
        sm90::mbarrier_init(q_full + s, Cfg::kNProducerThreads);
        sm90::mbarrier_init(q_empty + s, Cfg::kNConsumerThreads / 32);
      }
      for (int s = 0; s < Cfg::kDsStages; ++s) {
        sm90::mbarrier_init(ds_full + s, Cfg::kNConsumerThreads);
        sm90::mbarrier_init(ds_empty + s, Cfg::kNConsumerThreads / 32);
      }
    }
    __syncthreads();
    if (sm90::uniform_warp_index() >= Cfg::kNWarps) {
      // The producer warpgroup: K and V, then step by step Q, dO and the row vectors into
      // stage step % kQStages once the consumers have released its previous step.
      sm90::release_registers<Cfg::kProducerRegisters>();
      using Producers = std::integral_constant<int, Cfg::kNProducerThreads>;
      const int thread = static_cast<int>(threadIdx.x) - Cfg::kNConsumerThreads;
      // p.producer_fences: each thread waits for its own copies (K and V one commit group,
      // each step's another), publishes them to the async proxy, then arrives: the
      // consumers' wgmma reads them with no fence of their own after the wait (a fence there
      // also waited for the consumer's dq atomics of the step before). Otherwise the thread
      // arrives as its copies land and every consumer fences after its wait.
      const bool fences = p.producer_fences;
      if (steps > 0) {
        visit.template load_keys_by<Producers::value>(thread, sK, k, p.k_row_stride, head_dim);
        visit.template load_keys_by<Producers::value>(thread, sV, v, p.v_row_stride, head_dim);
        if (fences) {
          sm80::cp_async_commit();
        } else {
          sm90::mbarrier_arrive_on_copies(kv_full);
          sm90::mbarrier_arrive(kv_full);
        }
      }
      StepRows at = first_step;
#pragma unroll 1
      for (int step = 0; step < steps; ++step) {
        const int stage = step % Cfg::kQStages;
        if (step >= Cfg::kQStages) {
          sm90::mbarrier_wait(q_empty + stage,
                              static_cast<uint32_t>(step / Cfg::kQStages - 1) & 1);
        }
        load_step(at, stage, Producers{}, thread);
        if (fences) {
          sm80::cp_async_commit();
          if (step == 0) {
            sm80::cp_async_wait<1>();  // K and V
            sm90::fence_async_shared();
            sm90::mbarrier_arrive(kv_full);
          }
          sm80::cp_async_wait<0>();
          sm90::fence_async_shared();
          sm90::mbarrier_arrive(q_full + stage);
        } else {
          sm90::mbarrier_arrive_on_copies(q_full + stage);
          sm90::mbarrier_arrive(q_full + stage);
        }
        at = next_step(at);
      }
      sm90::cp_async_wait_all();
      return;
    }
    sm90::claim_registers<Cfg::kConsumerRegisters>();
    if (steps > 0) {
      sm90::mbarrier_wait(kv_full, 0);
    }
  } else if (steps > 0) {
    visit.load_keys(sK, k, p.k_row_stride, head_dim);
    visit.load_keys(sV, v, p.v_row_stride, head_dim);
    load_step(first_step, 0, AllThreads{}, static_cast<int>(threadIdx.x));
  }

  // kFuseDq: dq of step `step` (rows `rows`) during step + 1, once every consumer warp has
  // stored its dS of the step (ds_full), so that neither warpgroup waits for the other's
  // pass. issue_dq: dq = dS K for this warpgroup's half of the head dim over the CTA's keys.
  auto issue_dq = [&](auto& acc_dq, int dq_step) {
    const int ds_stage = dq_step % Cfg::kDsStages;
    sm90::mbarrier_wait(ds_full + ds_stage,
                        static_cast<uint32_t>(dq_step / Cfg::kDsStages) & 1);
    sm90::wgmma_fence();
    sm90::issue_shared_a_product<Element, Cfg::kDqDims, Cfg::kKStepsDq,
                                 Cfg::DsLayout::kColumnBlockElems, KVBlock::kColumnBlockElems>(
        acc_dq, sdS + ds_stage * Cfg::kSmemDsStageElems, sK + wg * KVBlock::kColumnBlockElems);
    sm90::wgmma_commit();
  };
  // add_dq: the product (waited for) into the step's accumulator tile half (row0 is a
  // multiple of 64): acc_dq[j] is float4 j * 128 + the warpgroup's thread
  // (bwd_dq_accumulator.h), so a warp's accesses are 512 consecutive bytes. Rows past T and
  // dims past the head dim add zeros to the padding.
  auto add_dq = [&](const auto& acc_dq, StepRows rows) {
    float* dq_half =
        dq_accum +
        ((batch * p.heads_q + rows.head) * DqAccumulatorTiles::row_blocks(p.seqlen_q) +
         rows.row0 / DqAccumulatorTiles::kRows) *
            DqAccumulatorTiles::kTileFloats +
        wg * DqAccumulatorTiles::kHalfFloats;
    const int wg_thread = threadIdx.x % 128;
#pragma unroll
    for (int j = 0; j < Cfg::kDqDims / 8; ++j) {
      atomicAdd(reinterpret_cast<float4*>(dq_half) + j * 128 + wg_thread,
                make_float4(acc_dq[j][0], acc_dq[j][1], acc_dq[j][2], acc_dq[j][3]));
    }
  };
  // kSumRows, after issue_dq of the same step: the first warp of each warpgroup adds up the
  // shares of its 32 rows while dq and dk are in the tensor cores: one atomic a row that some
  // key of the CTA has in F_i.
  auto sum_row_partials = [&](StepRows rows, int rows_step) {
    if constexpr (kSumRows) {
      if (warp % 4 == 0) {
        const int r = wg * 32 + lane;
        const float4* shares = reinterpret_cast<const float4*>(
            s_row_partials +
            ((rows_step % Cfg::kDsStages) * Cfg::kBlockM + r) * Cfg::kRowPartialsPitch);
        float4 sum = shares[0];
#pragma unroll
        for (int j = 1; j < Cfg::kRowPartials / 4; ++j) {
          const float4 x = shares[j];
          sum.x += x.x;
          sum.y += x.y;
          sum.z += x.z;
          sum.w += x.w;
        }
        const float total = (sum.x + sum.y) + (sum.z + sum.w);
        if (total != 0.f && rows.row0 + r < seqlen_q) {
          atomicAdd(row_stats + (batch * p.heads_q + rows.head) * p.seqlen_q + rows.row0 + r,
                    total);
        }
      }
    }
  };
  // kPingPong: the scores of step `step` are issued (SparseK) or in (dense): the other
  // warpgroup's turn (its products queue behind this one's). Warpgroup 1's last turn is
  // handed to nobody: warpgroup 0 waits `steps` times and was let go once before the loop.
  auto hand_over_turn = [&](int step) {
    if constexpr (Cfg::kPingPong) {
      if (wg == 0 || step + 1 < steps) {
        sm90::named_barrier_arrive<Cfg::kNConsumerThreads>(kTurnBarrier0 + (wg ^ 1));
      }
    }
  };
  // kFuseDq: before the first write of step `step` into its dS stage (dS, row partials):
  // both warpgroups are done with the dq of the step that used it last.
  auto wait_ds_stage_free = [&](int step) {
    if constexpr (Cfg::kFuseDq) {
      if (step >= Cfg::kDsStages) {
        sm90::mbarrier_wait(ds_empty + step % Cfg::kDsStages,
                            static_cast<uint32_t>(step / Cfg::kDsStages - 1) & 1);
      }
    }
  };
  // kFuseDq: this thread's dS fragments of step `step` (query rows x the warp's 16 keys,
  // columns 16 warp of the stage) into its dS stage, published to the async proxy (wgmma);
  // the stage's full barrier completes with every consumer's dS and row partials of the step.
  auto publish_ds = [&](int step, const auto& ds) {
    const int ds_stage = step % Cfg::kDsStages;
    sm90::store_a_fragments_transposed<typename Cfg::DsLayout>(
        sdS + ds_stage * Cfg::kSmemDsStageElems, ds, warp * 16, lane);
    sm90::fence_async_shared();
    sm90::mbarrier_arrive(ds_full + ds_stage);
  };

  if constexpr (Cfg::kPingPong) {
    // Warpgroup 0 issues first: warpgroup 1 lets it go once before the loop.
    if (wg == 1 && steps > 0) {
      sm90::named_barrier_arrive<Cfg::kNConsumerThreads>(kTurnBarrier0);
    }
  }

  StepRows at = first_step;
  StepRows prev = first_step;  // step - 1's rows (kFuseDq: its dq is added during step)
  for (int step = 0; step < steps; ++step) {
    const int row0 = at.row0;
    const StepRows next = next_step(at);
    const int stage = step % Cfg::kQStages;
    if constexpr (kWs) {
      // Q(step), dO(step) and the rows' vectors have landed (the producers' cp.async and
      // plain stores); wgmma reads through the async proxy, to which the producers published
      // them (p.producer_fences) or this thread does.
      sm90::mbarrier_wait(q_full + stage, static_cast<uint32_t>(step / Cfg::kQStages) & 1);
      if (!p.producer_fences) sm90::fence_async_shared();
    } else {
      // Q(step), dO(step) (and K, V) have landed and are published to the async proxy; every
      // thread is done with step - 1 (its products were waited on), so its stage is free.
      sm80::cp_async_wait<0>();
      sm90::fence_async_shared();
      __syncthreads();
    }
    const Element* sQ = sQ0 + stage * Cfg::kSmemQElems;
    const Element* sdO = sdO0 + stage * Cfg::kSmemQElems;
    const float* s_lse2 = s_rows0 + stage * kRowsStageFloats;
    const float* s_delta = s_lse2 + Cfg::kBlockM;
    const float* s_tau = s_lse2 + 2 * Cfg::kBlockM;
    const float* s_mean = s_lse2 + 3 * Cfg::kBlockM;

    // S^T and dP^T are outputs only (issue_kmajor_product's kOutputOnly), in two commit
    // groups; the next step's Q and dO copies start behind them.
    float st[Cfg::kMTiles][Cfg::kNTilesS][4];
    float dpt[Cfg::kMTiles][Cfg::kNTilesS][4];
    if constexpr (Cfg::kPingPong) {
      sm90::named_barrier_sync<Cfg::kNConsumerThreads>(kTurnBarrier0 + wg);
    }
    if constexpr (kSkipIdleHalves) {
      // A step none of whose rows sees this warpgroup's keys (the visit's halves): P^T and
      // dS^T are 0 there, and du gains nothing. The warpgroup issues no product and computes
      // no gate; it writes the zeros that dq's dS and the row partials expect of it, issues
      // its half of the previous step's dq, and keeps every barrier of the step.
      if (p.skip_idle_halves && !visit.half_sees_rows(wg, row0, Cfg::kBlockM)) {
        hand_over_turn(step);
        wait_ds_stage_free(step);
        float* s_partials =
            s_row_partials + (step % Cfg::kDsStages) * Cfg::kBlockM * Cfg::kRowPartialsPitch;
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = nt * 8 + (lane & 3) * 2 + c;
            s_partials[col * Cfg::kRowPartialsPitch + warp * 8 + (lane >> 2)] = 0.f;
          }
        }
        const uint32_t zero_ds[Cfg::kKStepsPV][4] = {};
        publish_ds(step, zero_ds);
        if (step > 0) {
          float acc_dq[Cfg::kDqDims / 8][4];
          issue_dq(acc_dq, step - 1);
          sum_row_partials(prev, step - 1);
          sm90::wgmma_wait<0>();
          sm90::fence_registers(acc_dq);
          sm90::release_to_producer(ds_empty + (step - 1) % Cfg::kDsStages, lane);
          add_dq(acc_dq, prev);
        }
        sm90::release_to_producer(q_empty + stage, lane);
        prev = at;
        at = next;
        continue;
      }
    }
    sm90::wgmma_fence();
    sm90::issue_kmajor_product<Element, Cfg::kBlockM, Cfg::kKStepsQK,
                               KVBlock::kColumnBlockElems, QBlock::kColumnBlockElems, true>(
        st[0], sK_rows, sQ);
    sm90::wgmma_commit();
    sm90::issue_kmajor_product<Element, Cfg::kBlockM, Cfg::kKStepsQK,
                               KVBlock::kColumnBlockElems, QBlock::kColumnBlockElems, true>(
        dpt[0], sV_rows, sdO);
    sm90::wgmma_commit();
    // SparseK: the other warpgroup's turn once both products are issued (its S^T and dP^T
    // queue behind them; measured 0.7% faster at 32k sigma 1 than once they are in, the
    // same at sigma 4). The dense pass hands it over once S^T is in (below).
    if constexpr (QueryVisit::kSparseK) hand_over_turn(step);
    if constexpr (!kWs) {
      if (step + 1 < steps) {
        load_step(next, (step + 1) % Cfg::kQStages, AllThreads{},
                  static_cast<int>(threadIdx.x));
      }
    }

    // kSumRows: this step's row partials, [kBlockM rows][kRowPartialsPitch]; the thread's
    // two keys are share warp * 8 + lane / 4 of each row.
    [[maybe_unused]] float* s_partials =
        s_row_partials + (step % Cfg::kDsStages) * Cfg::kBlockM * Cfg::kRowPartialsPitch;
    // Element r of st[0][nt]: key row lane / 4 + 8 (r / 2) of the warp's 16, query column
    // 8 nt + 2 (lane % 4) + r % 2. The column's row data is read once for both key rows.
    if constexpr (QueryVisit::kSparseK) {
      // SparseK: P^T = m exp(s - lse), dS^T and du's g - mean (j in F_i) in one pass once
      // both products are in, so that the gate (most of the per-element work) is computed
      // once. kSumRows: du's g alone, and the row's share of its sum of g over F_i.
      sm90::wgmma_wait<0>();
      sm90::fence_registers(st[0]);
      sm90::fence_registers(dpt[0]);
      wait_ds_stage_free(step);  // the pass writes the row partials (kSumRows)
      // The rows' data of the thread's two columns of an n8 tile (adjacent floats: one 8-byte
      // load each), read one tile ahead: the row partials' stores in the pass keep the
      // compiler from moving a later shared-memory load above them (it cannot tell the
      // buffers apart), so loads made where used paid their whole latency, column by column.
      struct ColumnRows {
        float2 lse2, delta, tau, mean;
      };
      auto read_columns = [&](int nt) {
        const int col = nt * 8 + (lane & 3) * 2;
        ColumnRows rows;
        rows.lse2 = *reinterpret_cast<const float2*>(s_lse2 + col);
        rows.delta = *reinterpret_cast<const float2*>(s_delta + col);
        rows.tau = *reinterpret_cast<const float2*>(s_tau + col);
        if constexpr (!kSumRows) rows.mean = *reinterpret_cast<const float2*>(s_mean + col);
        return rows;
      };
      // gate_of(h, row, tau): m of the thread's key h and the row, from registers.
      auto sparse_pass = [&](auto gate_of) {
        ColumnRows next = read_columns(0);
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
          const ColumnRows rows = next;
          if (nt + 1 < Cfg::kNTilesS) next = read_columns(nt + 1);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = nt * 8 + (lane & 3) * 2 + c;
            const float lse2 = c == 0 ? rows.lse2.x : rows.lse2.y;
            const float row_delta = c == 0 ? rows.delta.x : rows.delta.y;
            const float tau = c == 0 ? rows.tau.x : rows.tau.y;
            // kSumRows: the column's share is g of the first key (or 0), plus g of the second
            // where fractional. Adds only where g counts, rather than a select, two adds an
            // element and an add of the 0 the share started from (0 + x is not folded): the
            // compiler fuses g into both adds, 40 instructions fewer a pass (14.76 -> 14.50
            // ms at 32k sigma 1, bench/NOTES.md, d2).
            [[maybe_unused]] float row_share;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = 2 * h + c;
              const float m = gate_of(h, row0 + col, tau);
              const float e = m > 0.f ? fast_exp2(st[0][nt][r] * scale_log2 - lse2) : 0.f;
              const float diff = dpt[0][nt][r] - row_delta;
              st[0][nt][r] = m * e;                 // P^T
              dpt[0][nt][r] = st[0][nt][r] * diff;  // dS^T
              const bool fractional = sparsek_fractional(m);
              if constexpr (kSumRows) {
                const float g = e * diff;
                if (h == 0) row_share = fractional ? g : 0.f;
                if (fractional) {
                  du[0][h] += g;
                  if (h == 1) row_share += g;
                }
              } else if (fractional) {
                du[0][h] += e * diff - (c == 0 ? rows.mean.x : rows.mean.y);
              }
            }
            if constexpr (kSumRows) {
              s_partials[col * Cfg::kRowPartialsPitch + warp * 8 + (lane >> 2)] = row_share;
            }
          }
        }
      };
      // The thread's keys' scores (and positions) in registers for the pass. Blocks whose
      // keys are all in every row's sparse domain (most, far from the diagonal) skip the
      // positions.
      const float key_u[2] = {visit.key_score(thread_key(0)), visit.key_score(thread_key(1))};
      if (visit.block_in_sparse_domain(row0)) {
        sparse_pass([&](int h, int, float tau) { return __saturatef(key_u[h] - tau); });
      } else {
        const int key_pos[2] = {visit.key_position(thread_key(0)),
                                visit.key_position(thread_key(1))};
        sparse_pass([&](int h, int row, float tau) {
          return visit.gate_of_held_key(key_pos[h], key_u[h], row, tau);
        });
      }
    } else {
      // Dense modes: P^T while dP^T is still in the tensor cores. Blocks every row of which
      // sees every key (most of them) skip the gates: the pass is instantiated twice under
      // one warp-uniform branch, since a test inside the unrolled loop compiled to a branch
      // around every element's gate (a third of the step's samples in the profile, most of
      // them waiting on instruction fetch after those branches).
      const bool masked = visit.template block_needs_mask<Cfg::kBlockM>(row0);
      sm90::wgmma_wait<1>();
      sm90::fence_registers(st[0]);
      hand_over_turn(step);
      // visible_of(h, row): whether the thread's key h is in the row's keys.
      auto exp_pass = [&](auto visible_of) {
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = nt * 8 + (lane & 3) * 2 + c;
            const float lse2 = s_lse2[col];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = 2 * h + c;
              const float e = fast_exp2(st[0][nt][r] * scale_log2 - lse2);
              st[0][nt][r] = visible_of(h, row0 + col) ? e : 0.f;
            }
          }
        }
      };
      if (masked) {
        exp_pass([&](int h, int row) {
          bool fractional;
          return visit.gate(visit.key_position(thread_key(h)), 0.f, row, 0.f, fractional) > 0.f;
        });
      } else {
        exp_pass([](int, int) { return true; });
      }
    }
    uint32_t pt[Cfg::kKStepsPV][4];
    sm90::pack_a_fragments<Element>(pt, st[0]);
    sm90::wgmma_fence();
    sm90::issue_register_a_product<Element, Cfg::kHeadDim, Cfg::kKStepsPV,
                                   QBlock::kColumnBlockElems>(acc_dv[0], pt, sdO);
    sm90::wgmma_commit();
    if constexpr (!QueryVisit::kSparseK) {
      // dS^T = P^T (dP^T - Delta) while dv += P^T dO is in the tensor cores.
      sm90::wgmma_wait<1>();
      sm90::fence_registers(dpt[0]);
#pragma unroll
      for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float row_delta = s_delta[nt * 8 + (lane & 3) * 2 + c];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = 2 * h + c;
            dpt[0][nt][r] = st[0][nt][r] * (dpt[0][nt][r] - row_delta);
          }
        }
      }
    }
    uint32_t dst[Cfg::kKStepsPV][4];
    sm90::pack_a_fragments<Element>(dst, dpt[0]);
    auto issue_dk = [&] {
      sm90::wgmma_fence();
      sm90::issue_register_a_product<Element, Cfg::kHeadDim, Cfg::kKStepsPV,
                                     QBlock::kColumnBlockElems>(acc_dk[0], dst, sQ);
      sm90::wgmma_commit();
    };
    if constexpr (Cfg::kFuseDq) {
      // dS (query rows x the CTA's keys) for dq = dS K, into this step's stage (publish_ds).
      // Then step - 1's dq (both warpgroups' dS of that step are in, in all but the first
      // steps of a ping-pong long since), issued before dk so that dk's product runs during
      // its atomics.
      if constexpr (!QueryVisit::kSparseK) wait_ds_stage_free(step);
      publish_ds(step, dst);
      if (step > 0) {
        float acc_dq[Cfg::kDqDims / 8][4];
        issue_dq(acc_dq, step - 1);
        issue_dk();
        sum_row_partials(prev, step - 1);
        sm90::wgmma_wait<1>();  // dv and dq; dk runs on during the atomics
        sm90::fence_registers(acc_dq);
        sm90::release_to_producer(ds_empty + (step - 1) % Cfg::kDsStages, lane);
        add_dq(acc_dq, prev);
      } else {
        issue_dk();
      }
      sm90::wgmma_wait<0>();
    } else {
      issue_dk();
      // Both products read Q and dO (stage), which step + 2's copies overwrite after step +
      // 1's barrier.
      sm90::wgmma_wait<0>();
    }
    // The step's Q, dO and row vectors are no longer read: their stage goes back.
    if constexpr (kWs) sm90::release_to_producer(q_empty + stage, lane);
    prev = at;
    at = next;
  }
  if constexpr (Cfg::kFuseDq) {
    // The last step's dq.
    if (steps > 0) {
      float acc_dq[Cfg::kDqDims / 8][4];
      issue_dq(acc_dq, steps - 1);
      sum_row_partials(prev, steps - 1);
      sm90::wgmma_wait<0>();
      sm90::fence_registers(acc_dq);
      add_dq(acc_dq, prev);
    }
  }
  sm90::fence_registers(acc_dv[0]);
  sm90::fence_registers(acc_dk[0]);
  sm80::cp_async_wait<0>();

  int key_pos[Cfg::kMTiles][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) key_pos[0][h] = visit.key_position(thread_key(h));
  // dk, dv are contiguous [B, S, Hkv, D].
  const int64_t out_offset = (batch * p.seqlen_k * p.heads_kv + kv_head) * p.head_dim;
  const int64_t out_row_stride = p.heads_kv * p.head_dim;
  // Row bands (SparseK with dq fused): a key's pieces in other bands add into the same
  // float32 accumulators (bwd_kv_accumulator.h, scaled and converted after the kernel).
  const bool add_up = QueryVisit::kSparseK && Cfg::kFuseDq && p.key_band_rows > 0;
  if (add_up) {
    add_rows_atomic(acc_dk, p.dk_accum + out_offset, out_row_stride, key_pos, 0, head_dim,
                    lane);
    add_rows_atomic(acc_dv, p.dv_accum + out_offset, out_row_stride, key_pos, 0, head_dim,
                    lane);
  } else {
    store_scaled_rows(acc_dk, p.scale, static_cast<Element*>(p.dk) + out_offset,
                      out_row_stride, key_pos, 0, head_dim, lane);
    store_scaled_rows(acc_dv, 1.f, static_cast<Element*>(p.dv) + out_offset, out_row_stride,
                      key_pos, 0, head_dim, lane);
  }

  if constexpr (QueryVisit::kSparseK) {
    // du [B, S, Hkv]: the four lanes of a quad share a key.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float total = quad_sum(du[0][h]);
      if ((lane & 3) == 0 && key_pos[0][h] >= 0) {
        float* du_key = p.du + (batch * p.seqlen_k + key_pos[0][h]) * p.heads_kv + kv_head;
        if (add_up) {
          if (total != 0.f) atomicAdd(du_key, total);
        } else {
          *du_key = total;
        }
      }
    }
  }
#endif
}

}  // namespace sparsek
