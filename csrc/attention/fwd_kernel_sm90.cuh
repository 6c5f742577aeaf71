// The attention forward kernel on Hopper tensor cores (wgmma), warp-specialized: one CTA of
// three warpgroups per (128 query rows, query head, batch), or in SparseK per (128 query
// rows, p.heads_per_cta query heads of one kv group, batch), which it takes in turn.
//
// - The producer warpgroup (warps 8-11, with few registers: it hands the rest to the
//   consumers) copies K and V tiles into stages (two each: FwdSm90TileConfig) with cp.async
//   (in SparseK it also fetches each tile's key positions and scores into a slot of shared
//   memory, then gathers the rows; range tiles it copies whole), and signals each stage's
//   "full" mbarrier when its copies land. Consumers release a stage through its "empty"
//   mbarrier (one arrival a warp) once their products have read it. No barrier stops the
//   whole CTA inside the mainloop.
// - The consumer warpgroups (0 and 1, 64 query rows each; Q stays in shared memory) take
//   turns issuing their tile products, ordered by two named barriers (FlashAttention-3's
//   ping-pong): warpgroup 0 issues S(it) = Q K(it)^T and O += P(it - 1) V(it - 1), and once
//   its S is in lets warpgroup 1 issue its own; its softmax runs while the tensor cores work
//   on the other's products. Within a warpgroup, P(it - 1) V(it - 1) runs during tile it's
//   softmax, which is why V lags K by one step.
// The tile products are wgmma.mma_async over a warpgroup's 64 x 128 tile: S reads both
// operands from shared memory, P V takes P from registers and V from shared memory.
//
// The key visit policies (key_visit.cuh, sparse_key_visit.cuh) and the online softmax are
// the mma.sync kernel's: the wgmma accumulators have the register layout of a warp's m16n8
// tiles (kMTiles = 1). The epilogue stages O in the Q tile (epilogue_sm90.cuh).
//
// Tile config: FwdSm90TileConfig (tile_config.h). Compiled into sm_90a code only; on other
// targets the kernel body is empty and the dispatcher never launches it (fwd_dispatch.cu).
#pragma once

#include <cstdint>

#include "attention/epilogue_sm90.cuh"
#include "attention/key_visit.cuh"
#include "attention/online_softmax.cuh"
#include "attention/params.h"
#include "attention/query_tile_block.cuh"
#include "attention/sm90_instructions.cuh"
#include "attention/sm90_pipeline.cuh"
#include "attention/sm90_tile_products.cuh"
#include "attention/smem_tile.cuh"
#include "attention/sparse_key_visit.cuh"
#include "runtime/grid_dependency.cuh"

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

// The full and empty mbarriers of the K and V stages, in shared memory.
template <int kKStages, int kVStages>
struct KVStageBarriers {
  uint64_t* base;

  __device__ __forceinline__ uint64_t* k_full(int stage) const { return base + stage; }
  __device__ __forceinline__ uint64_t* k_empty(int stage) const {
    return base + kKStages + stage;
  }
  __device__ __forceinline__ uint64_t* v_full(int stage) const {
    return base + 2 * kKStages + stage;
  }
  __device__ __forceinline__ uint64_t* v_empty(int stage) const {
    return base + 2 * kKStages + kVStages + stage;
  }

  // Full: one arrival per producer thread (each also arrives when its copies land). Empty:
  // one per consumer warp.
  __device__ __forceinline__ void init(int producer_threads, int consumer_warps) const {
    for (int s = 0; s < kKStages; ++s) {
      sm90::mbarrier_init(k_full(s), producer_threads);
      sm90::mbarrier_init(k_empty(s), consumer_warps);
    }
    for (int s = 0; s < kVStages; ++s) {
      sm90::mbarrier_init(v_full(s), producer_threads);
      sm90::mbarrier_init(v_empty(s), consumer_warps);
    }
  }
};

template <typename Cfg>
using StageBarriers = KVStageBarriers<Cfg::kKStages, Cfg::kVStages>;

// Stage and phase of tile it in a ring of kStages buffers: where it goes, the parity of its
// full barrier's phase, and (it >= kStages) that of the empty barrier it waits on first.
template <int kStages>
struct StageOf {
  int stage;
  uint32_t full_parity;
  uint32_t reuse_parity;
  __device__ __forceinline__ explicit StageOf(int it)
      : stage(it % kStages),
        full_parity(static_cast<uint32_t>(it / kStages) & 1),
        reuse_parity(static_cast<uint32_t>(it / kStages - 1) & 1) {}
};

// Named barrier of the producer warpgroup (the consumers' are below).
constexpr int kProducerBarrier = 4;

// The producer warpgroup of the dense modes (thread `thread` of kProducers): for key tile it,
// K(it), then V(it), each into its ring's next stage once the consumers have released the
// stage's previous tile (K(it - 2)'s as soon as S(it - 2) is in).
template <typename Cfg, typename Element, typename KeyVisit>
__device__ __forceinline__ void produce_key_tiles(const AttentionFwdParams& p, KeyVisit& visit,
                                                  const StageBarriers<Cfg>& bars,
                                                  Element* sK0, Element* sV0, const Element* k,
                                                  const Element* v, int head_dim,
                                                  int num_tiles, int thread) {
  constexpr int kProducers = Cfg::kNProducerThreads;
#pragma unroll 1
  for (int it = 0; it < num_tiles; ++it) {
    const StageOf<Cfg::kKStages> ks(it);
    const StageOf<Cfg::kVStages> vs(it);
    if (it >= Cfg::kKStages) sm90::mbarrier_wait(bars.k_empty(ks.stage), ks.reuse_parity);
    visit.template load_keys_by<kProducers>(thread, sK0 + ks.stage * Cfg::kSmemKVElems, k,
                                            p.k_row_stride, it, head_dim);
    sm90::mbarrier_arrive_on_copies(bars.k_full(ks.stage));
    sm90::mbarrier_arrive(bars.k_full(ks.stage));
    if (it >= Cfg::kVStages) sm90::mbarrier_wait(bars.v_empty(vs.stage), vs.reuse_parity);
    visit.template load_keys_by<kProducers>(thread, sV0 + vs.stage * Cfg::kSmemKVElems, v,
                                            p.v_row_stride, it, head_dim);
    sm90::mbarrier_arrive_on_copies(bars.v_full(vs.stage));
    sm90::mbarrier_arrive(bars.v_full(vs.stage));
  }
  // The copies' arrivals are made on completion; let them land before the warps exit.
  sm90::cp_async_wait_all();
}

// The producer warpgroup of SparseK, whose K and V rows are gathered at positions it fetches
// itself: K runs a tile ahead of V (K(it + 1), then V(it)), since the consumers need K(it)
// one step before V(it) (P V lags S by a step). Issued in the dense order, K(it) would wait
// behind V(it - 1), whose stage frees only when the consumers finish step it - 2, and the
// consumers waited for K (5.5% of their time; 1-3% faster this way, bench/NOTES.md). In the
// dense modes the same order measured 1-3% slower, so they keep theirs.
// Key positions run two tiles ahead of V, in kVStages + 2 slots: once V(it - kVStages) is
// released the consumers' masks (which read a tile's slot before its P V product) are done
// with tiles it - kVStages + 1 and before, and tile it + 2's positions go into tile
// it - kVStages's slot; tile it + 3's are fetched from global memory while V(it)'s copies are
// issued. Before the first release (it < kVStages) the consumers may not have reached tile
// 0's mask, so tiles 2 .. kVStages + 1 need slots of their own: with two V stages and three
// slots tile 3 overwrote tile 0's positions before its mask read them (a T = 2500 GPU test
// caught it). A gather reads positions other warps stashed a step earlier: the producers'
// named barrier before each K gather orders the two.
// A CTA that chains `heads` query heads visits the same num_tiles tiles once a head, in one
// pipeline of heads * num_tiles steps: stages, phases and key slots count steps (step j
// visits tile j mod num_tiles), so the next head's first tiles are copied while the
// consumers finish the last head's.
// first_k_started: K(0)'s copy and tile 0's stash were made before the CTA's first barrier
// (start_first_range_tile below); the producer only arrives on K(0)'s stage.
template <typename Cfg, typename Element, typename KeyVisit>
__device__ __forceinline__ void produce_gathered_key_tiles(
    const AttentionFwdParams& p, KeyVisit& visit, const StageBarriers<Cfg>& bars,
    Element* sK0, Element* sV0, const Element* k, const Element* v, int head_dim,
    int num_tiles, int heads, int64_t batch_head, int thread, bool first_k_started) {
  constexpr int kProducers = Cfg::kNProducerThreads;
  static_assert(kProducers == Cfg::kBlockN, "a producer thread fetches one key row a tile");
  static_assert(Cfg::kKeySlots == Cfg::kVStages + 2,
                "tile it + 2 takes tile it - kVStages's slot, whose mask is done once "
                "V(it - kVStages) is released (tiles 2 .. kVStages + 1 take fresh ones)");
  const int64_t key_base = KeyVisit::key_base(p, batch_head);
  const int steps = num_tiles * heads;
  // The visit's tile of step j (heads is small: a few compares).
  auto tile_of = [num_tiles](int j) {
    while (j >= num_tiles) j -= num_tiles;
    return j;
  };
  // K(j) into its stage once K(j - kKStages) is released (after S(j - kKStages)).
  auto produce_k = [&](int j) {
    const StageOf<Cfg::kKStages> ks(j);
    if (j >= Cfg::kKStages) sm90::mbarrier_wait(bars.k_empty(ks.stage), ks.reuse_parity);
    sm90::named_barrier_sync<kProducers>(kProducerBarrier);
    visit.template load_keys_by<kProducers>(thread, sK0 + ks.stage * Cfg::kSmemKVElems, k,
                                            p.k_row_stride, tile_of(j), j, head_dim);
    sm90::mbarrier_arrive_on_copies(bars.k_full(ks.stage));
    sm90::mbarrier_arrive(bars.k_full(ks.stage));
  };
  if (!first_k_started) visit.stash_row(0, thread, visit.prefetch_row(p, 0, thread, key_base));
  if (steps > 1) {
    visit.stash_row(1, thread, visit.prefetch_row(p, tile_of(1), thread, key_base));
  }
  typename KeyVisit::Prefetch next{};
  if (steps > 2) next = visit.prefetch_row(p, tile_of(2), thread, key_base);
  if (first_k_started) {
    sm90::mbarrier_arrive_on_copies(bars.k_full(0));
    sm90::mbarrier_arrive(bars.k_full(0));
  } else {
    produce_k(0);
  }
#pragma unroll 1
  for (int it = 0; it < steps; ++it) {
    if (it + 1 < steps) produce_k(it + 1);
    const StageOf<Cfg::kVStages> vs(it);
    if (it >= Cfg::kVStages) sm90::mbarrier_wait(bars.v_empty(vs.stage), vs.reuse_parity);
    if (it + 2 < steps) {
      visit.stash_row(it + 2, thread, next);
      if (it + 3 < steps) next = visit.prefetch_row(p, tile_of(it + 3), thread, key_base);
    }
    visit.template load_keys_by<kProducers>(thread, sV0 + vs.stage * Cfg::kSmemKVElems, v,
                                            p.v_row_stride, tile_of(it), it, head_dim);
    sm90::mbarrier_arrive_on_copies(bars.v_full(vs.stage));
    sm90::mbarrier_arrive(bars.v_full(vs.stage));
  }
  sm90::cp_async_wait_all();
}

// SparseK with the range's tiles first (SparseKKeyVisit::kRangeFirst): tile 0 is the range's
// first, whose keys the CTA knows from its rows alone, so the producer starts K(0)'s copy and
// fetches its scores before the CTA waits for the plan's copy into shared memory. Before,
// the consumers' first product waited for three global round trips in a row (the plan, the
// positions it lists, the gathered rows), a CTA only ~24 key tiles long at 32k. Returns
// whether it started them (a range of no keys, as a one-row tile can have at W = 0, leaves
// tile 0 to the candidates). The stash is made after the copies are issued, so that its load
// overlaps them.
template <typename Cfg, typename Element, typename KeyVisit>
__device__ __forceinline__ bool start_first_range_tile(const AttentionFwdParams& p,
                                                       KeyVisit& visit, int64_t batch_head,
                                                       Element* sK0, const Element* k,
                                                       int head_dim, int thread) {
  if (!KeyVisit::kRangeFirst || visit.range_tiles() == 0) return false;
  const typename KeyVisit::Prefetch first =
      visit.prefetch_row(p, 0, thread, KeyVisit::key_base(p, batch_head));
  visit.template load_range_tile_by<Cfg::kNProducerThreads>(thread, sK0, k, p.k_row_stride, 0,
                                                             head_dim);
  visit.stash_row(0, thread, first);
  return true;
}

// The CTA's key visit, after the CTA's first barrier (which also publishes the stage
// barriers' init): in SparseK the producers first start the range's first tile
// (first_k_started), then every thread waits for the selection's grid and copies the plan.
template <typename Cfg, typename KeyVisit, typename Element>
__device__ __forceinline__ KeyVisit begin_key_visit(const AttentionFwdParams& p, int row0,
                                                    int64_t batch_head, void* visit_smem,
                                                    bool producer, Element* sK0,
                                                    const Element* k, int head_dim,
                                                    bool& first_k_started) {
  if constexpr (KeyVisit::kStashesKeySlots) {
    KeyVisit visit(p, row0, batch_head, visit_smem, DeferPlanCopy{});
    if (producer) {
      first_k_started = start_first_range_tile<Cfg>(
          p, visit, batch_head, sK0, k, head_dim,
          static_cast<int>(threadIdx.x) - Cfg::kNConsumerThreads);
    }
    // The selection's tile kernel may still run (a dependent launch, fwd_launch.cuh): the
    // copies above need only the scores in key order, the plan and tau need it done.
    wait_for_prerequisite_grids();
    visit.copy_plan(p, row0, batch_head);
    __syncthreads();
    visit.read_plan_counts(p);
    return visit;
  } else {
    KeyVisit visit(p, row0, batch_head, visit_smem);
    __syncthreads();
    return visit;
  }
}

// Named barriers of the consumers (0 is __syncthreads): Q has landed; warpgroup w's turn to
// issue its tile products.
constexpr int kQReadyBarrier = 1;
constexpr int kSchedulerBarrier0 = 2;

// The shared memory of the second Q buffer of a CTA that chains query heads (SparseK; the
// kernel below), which lies past the V stages, before the stage barriers, so that the dense
// layout does not move (Q tiles and stages are whole multiples of 1 KB, as wgmma's swizzle
// atoms need).
template <typename Cfg, typename Element>
__host__ __device__ constexpr size_t chained_q_bytes(int heads_per_cta) {
  return heads_per_cta > 1 ? size_t{Cfg::kSmemQElems} * sizeof(Element) : 0;
}

// Query head `head`'s output from the accumulators and the softmax it ended with, staged
// over this warp's rows of `stage`, a Q buffer no product reads any more.
template <typename Cfg, typename Element>
__device__ __forceinline__ void store_head_output(const AttentionFwdParams& p,
                                                  const float (&acc_o)[1][Cfg::kNTilesO][4],
                                                  const OnlineSoftmax<1>& softmax,
                                                  int64_t batch, int64_t head, Element* stage,
                                                  int warp_row0, int head_dim, int lane) {
  float inv_sum[1][2], lse[1][2];
  softmax.finalize(inv_sum, lse);
  Element* o = static_cast<Element*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
  float* lse_row0 = p.lse + (batch * p.heads_q + head) * p.seqlen_q;
  store_output_staged<Cfg>(acc_o, inv_sum, lse, stage, warp_row0 % Cfg::kBlockM, o,
                           p.o_row_stride, lse_row0, warp_row0, static_cast<int>(p.seqlen_q),
                           head_dim, lane);
}

template <typename Cfg, typename Element, typename KeyVisit>
__global__ void __launch_bounds__(Cfg::kNThreads, 1)
    attention_fwd_sm90_kernel(const __grid_constant__ AttentionFwdParams p) {
#ifdef SPARSEK_SM90_KERNEL_BODY
  constexpr int kConsumers = Cfg::kNConsumerThreads;
  // SparseK CTAs may take several query heads of one kv group in turn (p.heads_per_cta): the
  // visit (plan, tau, key positions) is the kv head's, so the producer runs one pipeline
  // through every head's tiles. Each consumer warpgroup ends a head with its last P V and the
  // head's stores, while warpgroup 0 may already issue the next head's products (warpgroup
  // 1's last turn of a head hands it over); each head's Q is copied a head ahead, into a
  // second buffer.
  constexpr bool kChainsHeads = KeyVisit::kStashesKeySlots;
  const int heads = kChainsHeads ? static_cast<int>(p.heads_per_cta) : 1;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((Cfg::kSmemAlign - raw_address % Cfg::kSmemAlign) %
                                    Cfg::kSmemAlign);
  // Q, K stages, V stages, (chained heads: a second Q), the stage barriers, then the key
  // visit's own.
  Element* sQ = reinterpret_cast<Element*>(smem);
  Element* sK0 = sQ + Cfg::kSmemQElems;
  Element* sV0 = sK0 + Cfg::kKStages * Cfg::kSmemKVElems;
  Element* sQ_second = sV0 + Cfg::kVStages * Cfg::kSmemKVElems;
  const StageBarriers<Cfg> bars{reinterpret_cast<uint64_t*>(
      reinterpret_cast<unsigned char*>(sQ_second) + chained_q_bytes<Cfg, Element>(heads))};
  using Products = Sm90TileProducts<Cfg, Element>;

  const auto [head0, batch, kv_head, warp, lane, row0, warp_row0, head_dim, q, k, v] =
      query_tile_block<Cfg, Element, KeyVisit::kGridOrder>(p, heads);
  if (threadIdx.x == 0) bars.init(Cfg::kNProducerThreads, kConsumers / 32);
  const int role_warp = sm90::uniform_warp_index();
  const bool producer = role_warp >= kConsumers / 32;
  const int64_t batch_head = batch * p.heads_kv + kv_head;
  void* visit_smem = bars.base + Cfg::kNumStageBarriers;
  // Copies that need neither the barriers' init nor the plan start before the CTA's first
  // barrier: Q (the consumers, who wait for it before their first product; with chained
  // heads also the second head's, each warp its own rows, in a group of its own) and, in
  // SparseK with the range first, K(0) (start_first_range_tile). The plan's own loads come
  // after them in each thread's program.
  if (!producer) {
    load_tile_async<Cfg::kBlockM, Cfg::kHeadDim, kConsumers, typename Cfg::QLayout>(
        sQ, q, p.q_row_stride, row0, p.seqlen_q, head_dim);
    sm80::cp_async_commit();
    if (kChainsHeads && heads > 1) {
      load_warp_rows_async<Cfg::kWarpRows, Cfg::kHeadDim, typename Cfg::QLayout>(
          sQ_second, warp_row0 % Cfg::kBlockM, q + p.q_head_stride, p.q_row_stride, warp_row0,
          p.seqlen_q, head_dim, lane);
      sm80::cp_async_commit();
    }
  }
  bool first_k_started = false;
  KeyVisit visit = begin_key_visit<Cfg, KeyVisit>(p, row0, batch_head, visit_smem, producer,
                                                  sK0, k, head_dim, first_k_started);
  const int num_tiles = visit.num_tiles();

  if (producer) {
    sm90::release_registers<Cfg::kProducerRegisters>();
    if (num_tiles > 0) {
      const int thread = static_cast<int>(threadIdx.x) - kConsumers;
      if constexpr (KeyVisit::kStashesKeySlots) {
        produce_gathered_key_tiles<Cfg>(p, visit, bars, sK0, sV0, k, v, head_dim, num_tiles,
                                        heads, batch_head, thread, first_k_started);
      } else {
        produce_key_tiles<Cfg>(p, visit, bars, sK0, sV0, k, v, head_dim, num_tiles, thread);
      }
    }
    return;
  }
  sm90::claim_registers<Cfg::kConsumerRegisters>();

  const int wg = role_warp / 4;
  // Head g's Q buffer (g even: sQ; odd: sQ_second), and this warpgroup's 64 rows of it:
  // whole 8-row atoms, so the descriptors stay aligned.
  auto q_buffer = [sQ, sQ_second](int g) { return kChainsHeads && (g & 1) ? sQ_second : sQ; };
  const int wg_row_offset = wg * Cfg::kWarpgroupRows * Cfg::QLayout::kRowPitch;
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
  // The scale goes into the exponent (online_softmax.cuh, RawScores); p.scale > 0 here
  // (fwd_dispatch.cu sends the other scales to the mma.sync kernel).
  RawScoreSoftmax<1> raw_softmax{softmax, RawScores{scale_log2}};

  if (num_tiles > 0) {
    // Q, whose copy the consumers started before the first barrier (a chained second head's
    // may still be in flight).
    if (kChainsHeads && heads > 1) {
      sm80::cp_async_wait<1>();
    } else {
      sm80::cp_async_wait<0>();
    }
    sm90::fence_async_shared();
    sm90::named_barrier_sync<kConsumers>(kQReadyBarrier);
    // Warpgroup 0 issues first.
    if (wg == 1) sm90::named_barrier_arrive<kConsumers>(kSchedulerBarrier0);
  } else {
    // Q's copies, unused: every consumer's lands before the epilogue stages O over them.
    sm80::cp_async_wait<0>();
    sm90::named_barrier_sync<kConsumers>(kQReadyBarrier);
  }

  // The CTA's mainloop steps: num_tiles a head, numbered across its heads (stages, phases and
  // key slots follow them; the visit's tiles repeat). The turns pass from head to head as
  // from step to step: warpgroup 1's last turn of a head lets warpgroup 0 start the next one
  // while it finishes its own.
  const int steps = num_tiles * heads;
  int chained_step = 0;  // (chained heads) the step of the head's next tile
  for (int g = 0; g < heads; ++g) {
    if (num_tiles > 0) {
      if (kChainsHeads && g > 0) {
        // Head g's Q, copied by this warp during head g - 2's end (g = 1: the CTA's start),
        // has landed; the turn's barrier below makes the warpgroup's four copies visible to
        // its products. Head g + 1's may still be in flight.
        if (g + 1 < heads) {
          sm80::cp_async_wait<1>();
        } else {
          sm80::cp_async_wait<0>();
        }
      }
      // This warpgroup's 64 rows of head g's Q: whole 8-row atoms, so the descriptors stay
      // aligned.
      const Element* sQ_rows = q_buffer(g) + wg_row_offset;
      typename Products::PFragments p_prev;
      for (int tile = 0; tile < num_tiles; ++tile) {
        // (A second counter only where heads chain: in the dense modes a register more in
        // the mainloop spilled.)
        const int it = kChainsHeads ? chained_step : tile;
        const StageOf<Cfg::kKStages> ks(it);
        const StageOf<Cfg::kVStages> prev_vs(it - 1);  // (tile > 0)
        const int stage = ks.stage;
        const int prev_stage = prev_vs.stage;
        sm90::mbarrier_wait(bars.k_full(stage), ks.full_parity);
        if (tile > 0) sm90::mbarrier_wait(bars.v_full(prev_stage), prev_vs.full_parity);
        // The copies were made by another thread in the generic proxy; wgmma reads through
        // the async proxy.
        sm90::fence_async_shared();

        sm90::named_barrier_sync<kConsumers>(kSchedulerBarrier0 + wg);
        sm90::fence_registers(acc_o[0]);
        sm90::wgmma_fence();
        Products::issue_scores(s[0], sQ_rows, sK0 + stage * Cfg::kSmemKVElems);
        sm90::wgmma_commit();
        if (tile > 0) {
          Products::issue_pv(acc_o[0], p_prev, sV0 + prev_stage * Cfg::kSmemKVElems);
          sm90::wgmma_commit();
        }
        if (tile > 0) {
          sm90::wgmma_wait<1>();
        } else {
          sm90::wgmma_wait<0>();
        }
        // S(it) is done: the other warpgroup's turn (its products queue behind this one's
        // P V). Warpgroup 1's last turn is handed to nobody: warpgroup 0 waits `steps`
        // times and was let go once before the loop.
        if (wg == 0 || it + 1 < steps) {
          sm90::named_barrier_arrive<kConsumers>(kSchedulerBarrier0 + (wg ^ 1));
        }
        sm90::fence_registers(s[0]);
        sm90::release_to_producer(bars.k_empty(stage), lane);
        DeferredRescale<1> rescale;
        if constexpr (kChainsHeads) {
          visit.mask_and_update(p, s, rescale, raw_softmax, tile, it, warp_row0, lane);
        } else {
          visit.mask_and_update(p, s, rescale, raw_softmax, it, warp_row0, lane);
        }
        if constexpr (kChainsHeads) {
          // A head's first tile: the accumulators still hold the last head's (stored)
          // output, which its rescale clears (0 times a finite sum). Cleared by moves after
          // the store instead, they made ptxas wait for every P V before the softmax that
          // should overlap it (it injects warpgroup waits where it cannot prove registers
          // free of wgmma).
          if (tile == 0) rescale.correction[0][0] = rescale.correction[0][1] = 0.f;
        }
        sm90::wgmma_wait<0>();
        sm90::fence_registers(acc_o[0]);
        if (tile > 0) sm90::release_to_producer(bars.v_empty(prev_stage), lane);
        rescale.apply(acc_o);
        Products::pack_p(p_prev, s[0]);
        if constexpr (kChainsHeads) ++chained_step;
      }
      // The head's last P V.
      const StageOf<Cfg::kVStages> last_vs((kChainsHeads ? chained_step : num_tiles) - 1);
      sm90::mbarrier_wait(bars.v_full(last_vs.stage), last_vs.full_parity);
      sm90::fence_async_shared();
      sm90::fence_registers(acc_o[0]);
      sm90::wgmma_fence();
      Products::issue_pv(acc_o[0], p_prev, sV0 + last_vs.stage * Cfg::kSmemKVElems);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_registers(acc_o[0]);
      if (kChainsHeads && g + 1 < heads) {
        sm90::release_to_producer(bars.v_empty(last_vs.stage), lane);
      }
    }
    // O is staged over this warp's own rows of head g's Q, which no product reads any more
    // (with no key tile, every head's rows are empty: O = 0, LSE = -inf).
    store_head_output<Cfg>(p, acc_o, softmax, batch, head0 + g, q_buffer(g), warp_row0,
                           head_dim, lane);
    if constexpr (kChainsHeads) {
      if (g + 1 < heads) {
        // Head g + 2's Q into the same rows, after every lane's read of the staged output.
        __syncwarp();
        if (num_tiles > 0 && g + 2 < heads) {
          load_warp_rows_async<Cfg::kWarpRows, Cfg::kHeadDim, typename Cfg::QLayout>(
              q_buffer(g), warp_row0 % Cfg::kBlockM, q + (g + 2) * p.q_head_stride,
              p.q_row_stride, warp_row0, p.seqlen_q, head_dim, lane);
          sm80::cp_async_commit();
        }
        // The accumulators are cleared by the next head's first rescale (in the mainloop).
        softmax = OnlineSoftmax<1>();
      }
    }
  }
#endif
}

}  // namespace sparsek
