// Tile sizes of the two backward kernels (bwd_dq_kernel.cuh, bwd_dkdv_kernel.cuh), in one
// place. Like the forward, a kernel is compiled for a padded head dim (64, 128 or 256); any
// head dim that is a multiple of 8 runs on the smallest one that holds it, with the extra
// columns zero-filled on load and never stored.
//
// Both kernels drive the forward's tile products (tile_mma.cuh), which only read the names
// below: a warp owns kWarpRows rows (kMTiles m16 tiles) of an "A" operand, the "B" operand
// has kNTilesS n8 tiles, and the second product accumulates kNTilesO n8 tiles of dims.
#pragma once

#include "attention/bwd_dq_accumulator.h"
#include "attention/smem_tile.cuh"
#include "selection/selection_params.h"
#include "selection/sort_key_spans.h"

namespace sparsek {

// dq: one CTA per (kBlockM query rows, query head, batch); rows are query rows, the B operand
// is kBlockN keys. scores_qk gives S = Q K^T and dP = dO V^T; accumulate_pv gives dq += dS K.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kMinBlocksPerSm_>
struct BwdDqTileConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per CTA
  static constexpr int kBlockN = kBlockN_;  // keys per step
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;

  static constexpr int kWarpRows = kBlockM / kNWarps;
  static constexpr int kMTiles = kWarpRows / 16;
  static constexpr int kNTilesS = kBlockN / 8;
  static constexpr int kNTilesO = kHeadDim / 8;
  static constexpr int kKStepsQK = kHeadDim / 16;
  static constexpr int kKStepsPV = kBlockN / 16;

  // Q and dO stay for the whole CTA; K and V one tile each.
  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  static constexpr int kSmemKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemBytes = (2 * kSmemQElems + 2 * kSmemKVElems) * 2;

  static_assert(kWarpRows % 16 == 0 && kMTiles >= 1, "a warp owns whole m16 tiles");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 64 == 0, "tiles of 16 keys, 64 dims");
  static_assert(SelectionTiles::kQueryTile % kBlockM == 0,
                "a SparseK dq tile lies inside one plan tile");
};

// dk, dv (and du): one CTA per (kBlockN keys, kv head, batch); rows are keys, the B operand
// is kBlockM query rows. scores_qk gives S^T = K Q^T and dP^T = V dO^T; accumulate_pv gives
// dv += P^T dO and dk += dS^T Q. With kDimSplit = 2, two warps own the same keys and each
// accumulates half of the head dim (the D = 256 accumulators do not fit one warp's
// registers); both compute the whole S^T and dP^T.
template <int kHeadDim_, int kBlockN_, int kBlockM_, int kNWarps_, int kDimSplit_,
          int kMinBlocksPerSm_>
struct BwdDkDvTileConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kBlockM = kBlockM_;  // query rows per step
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kDimSplit = kDimSplit_;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static constexpr int kKeyWarps = kNWarps / kDimSplit;

  static constexpr int kWarpRows = kBlockN / kKeyWarps;  // keys per warp
  static constexpr int kMTiles = kWarpRows / 16;
  static constexpr int kNTilesS = kBlockM / 8;
  static constexpr int kNTilesO = kHeadDim / 8 / kDimSplit;  // dim tiles a warp accumulates
  static constexpr int kKStepsQK = kHeadDim / 16;
  static constexpr int kKStepsPV = kBlockM / 16;

  static constexpr int kSmemKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  // K, V, Q, dO, then per query row: lse (log2 domain), Delta, tau, mean of g over F_i.
  static constexpr int kRowVectors = 4;
  static constexpr int kSmemBytes =
      (2 * kSmemKVElems + 2 * kSmemQElems) * 2 + kRowVectors * kBlockM * 4;

  static_assert(kNWarps % kDimSplit == 0 && kNTilesO % 2 == 0, "whole dim-tile pairs a warp");
  static_assert(kWarpRows % 16 == 0 && kMTiles >= 1, "a warp owns whole m16 tiles of keys");
  static_assert(kBlockM % 16 == 0 && kHeadDim % 64 == 0, "tiles of 16 rows, 64 dims");
  static_assert(KeySpans::kMinKeySpan % kBlockN == 0,
                "a SparseK key tile is a slice of one sorted key span");
};

template <int kHeadDim>
struct BwdTileSizes;

// D <= 128: 4 warps of 16 rows (dq) or 16 keys (dk/dv). dk/dv keep 2 * D / 8 * 4
// accumulators a thread (128 at D = 128) next to the S^T and dP^T blocks: at D = 128 those
// take 32 query rows a step (64 spill registers). The SparseK dk/dv tile is 64 entries of a
// sorted key span: smaller tiles end closer together and so visit fewer rows. D = 256:
// 8 warps; dq takes 128 rows (its loads need 8 rows a pass) and 32 keys a step; dk/dv split
// the head dim between warp pairs. All instantiations compile without spills (sm_90a).
template <>
struct BwdTileSizes<64> {
  using Dq = BwdDqTileConfig<64, 64, 64, 4, 2>;
  using DkDv = BwdDkDvTileConfig<64, 64, 64, 4, 1, 2>;
};
template <>
struct BwdTileSizes<128> {
  using Dq = BwdDqTileConfig<128, 64, 64, 4, 2>;
  using DkDv = BwdDkDvTileConfig<128, 64, 32, 4, 1, 2>;
};
template <>
struct BwdTileSizes<256> {
  using Dq = BwdDqTileConfig<256, 128, 32, 8, 1>;
  using DkDv = BwdDkDvTileConfig<256, 64, 32, 8, 2, 1>;
};

// The Hopper (wgmma) backward kernels (bwd_dq_kernel_sm90.cuh, bwd_dkdv_kernel_sm90.cuh):
// warpgroups of 4 warps, each owning the 64 rows of one wgmma m64 tile (16 a warp, so the
// per-element code of the mma.sync kernels applies with kMTiles = 1); every product's other
// side is 64 wide (N = 64) or the head dim (N = kHeadDim = 128). Tiles are stored in the
// wgmma 128-byte-swizzle layout; field names are those of the mma.sync configs, which the
// shared key and query visits read.
//
// dq: 128 query rows (two warpgroups) share each tile of 64 keys; K and V load a whole step
// ahead, K in three stages so that dq += dS K of one tile runs on during the next one's score
// products. Accumulators a thread: dq 64, S and dP 32 each.
template <int kHeadDim_>
struct BwdDqSm90TileConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 64;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = 256;
  static constexpr int kMinBlocksPerSm = 1;
  static constexpr int kWarpgroupRows = 64;

  static constexpr int kWarpRows = 16;
  static constexpr int kMTiles = 1;
  static constexpr int kNTilesS = kBlockN / 8;
  static constexpr int kNTilesO = kHeadDim / 8;
  static constexpr int kKStepsQK = kHeadDim / 16;
  static constexpr int kKStepsPV = kBlockN / 16;
  // SparseK: key positions of tiles it, it + 1 (loading) and it + 2 (being fetched).
  static constexpr int kKeySlots = 3;

  using QLayout = Sw128Layout<kBlockM, kHeadDim>;
  using KVLayout = Sw128Layout<kBlockN, kHeadDim>;
  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  static constexpr int kSmemKVElems = kBlockN * kHeadDim;
  static constexpr int kKStages = 3;
  static constexpr int kVStages = 2;
  // wgmma's swizzle atoms need 1024-byte alignment: the kernel rounds the base up.
  static constexpr int kSmemAlign = 1024;
  // Q, dO, then K and V stages.
  static constexpr int kSmemBytes =
      (2 * kSmemQElems + (kKStages + kVStages) * kSmemKVElems) * 2 + kSmemAlign;

  static_assert(SelectionTiles::kQueryTile % kBlockM == 0,
                "a SparseK dq tile lies inside one plan tile");
};

// dk/dv: kWarpgroups x 64 keys a CTA, 64 query rows a step; Q, dO and the rows' lse, Delta,
// tau and mean are double-buffered and load a whole step ahead. Accumulators a thread: dk
// and dv 64 each, S^T and dP^T 32 each. Two warpgroups (128 keys, one CTA an SM) halve the Q
// and dO bytes per product: the dense modes. SparseK takes one warpgroup (64 entries of a
// sorted span: smaller tiles end closer together and visit fewer rows; two CTAs an SM).
// kFuseDq (dense modes, two warpgroups): the step's dS also goes to shared memory (the rows x
// the CTA's keys) and each warpgroup computes half the head dim of dq = dS K (32 more
// accumulators, live only once S^T and dP^T are dead) and adds it into the float32
// accumulator (bwd_dq_accumulator.h) by coalesced 16-byte atomics from registers; the dq
// kernel does not run. (Staging it in shared memory for one bulk asynchronous reduction a
// warpgroup, FA3's way, measured 6% slower end to end: bench/NOTES.md.)
// Measured (bench/NOTES.md, "Hopper backward kernels"): 128-row dq CTAs beat 64-row ones in
// every mode, and a third Q/dO stage (dv and dk running on into the next step) made ptxas
// serialize the products (C7515) and the kernel slower.
//
// kFuseDq is also warp-specialized (kWarpSpecialized): a producer warpgroup copies K and V
// once and each step's Q, dO and row vectors into the stages, handing them over through
// mbarriers, so that the consumers (the key warpgroups) neither issue copies nor stop at a
// CTA-wide barrier for them; it hands most of its registers to the consumers (40 + 2 x 232
// <= 512 a scheduler lane; 232 leave the consumers without spills, 24 spilled the producers).
// dS is then double-buffered, each buffer with a full and an empty mbarrier: a warpgroup
// computes step - 1's dq during step `step` (after its own dS of the step is stored), so the
// two warpgroups never wait for each other within a step, and they ping-pong (kPingPong): a
// named barrier hands the turn to issue S^T and dP^T from one to the other once its own are
// in, so that one warpgroup's pass runs while the other's products are in the tensor cores.
// (Before, both met at a named barrier for the step's dS and ran their passes at the same
// time, with the tensor cores idle: bench/NOTES.md, "Where the fused dk/dv kernels wait".)
// SparseK runs on the kFuseDq kernel too (kSparseK): without the dq kernel nothing computes
// the rows' means of g over F_i before dk/dv, so the kernel adds each row's sum of g over
// the CTA's keys into a float32 row vector (bwd_sparsek_du.h completes du from it). Each
// consumer thread stores its two keys' share of a row (one float a column) into a
// [kBlockM rows x kRowPartials] block, double-buffered like dS (and under its barriers); with
// that step's dq the first warp of each warpgroup adds up 32 rows' kRowPartials shares
// (float4 loads; the pitch of kRowPartials + 4 floats keeps both sides free of bank
// conflicts).
template <int kHeadDim_, int kWarpgroups_, bool kFuseDq_ = false, bool kSparseK_ = false>
struct BwdDkDvSm90TileConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr bool kFuseDq = kFuseDq_;
  static constexpr bool kSparseK = kSparseK_;  // laid out for SparseK (row partials)
  static constexpr bool kWarpSpecialized = kFuseDq;
  static constexpr bool kPingPong = kFuseDq;
  static constexpr int kBlockN = 64 * kWarpgroups;  // keys per CTA
  static constexpr int kBlockM = 64;                // query rows per step
  static constexpr int kNWarps = 4 * kWarpgroups;   // the key (consumer) warps
  static constexpr int kNConsumerThreads = kNWarps * 32;
  static constexpr int kNProducerThreads = kWarpSpecialized ? 128 : 0;
  static constexpr int kNThreads = kNConsumerThreads + kNProducerThreads;
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
  static constexpr int kMinBlocksPerSm = kWarpgroups == 1 ? 2 : 1;
  static constexpr int kDimSplit = 1;
  static constexpr int kKeyWarps = kNWarps;

  static constexpr int kWarpRows = 16;  // keys per warp
  static constexpr int kMTiles = 1;
  static constexpr int kNTilesS = kBlockM / 8;
  static constexpr int kNTilesO = kHeadDim / 8;
  static constexpr int kKStepsQK = kHeadDim / 16;
  static constexpr int kKStepsPV = kBlockM / 16;
  // dq = dS K: a warpgroup's share of the head dim, over all the CTA's keys.
  static constexpr int kDqDims = kHeadDim / kWarpgroups;
  static constexpr int kKStepsDq = kBlockN / 16;

  using KVLayout = Sw128Layout<kBlockN, kHeadDim>;
  using QLayout = Sw128Layout<kBlockM, kHeadDim>;
  using DsLayout = Sw128Layout<kBlockM, kBlockN>;  // dS: query rows x the CTA's keys
  static constexpr int kSmemKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  static constexpr int kDsStages = kWarpSpecialized ? 2 : 1;
  static constexpr int kSmemDsStageElems = kFuseDq ? kBlockM * kBlockN : 0;
  static constexpr int kSmemDsElems = kDsStages * kSmemDsStageElems;
  static constexpr int kQStages = 2;
  // kFuseDq and kSparseK: each row's sums of g over F_i, one a (warp, quad) of the CTA.
  static constexpr bool kRowPartialsInSmem = kFuseDq && kSparseK;
  static constexpr int kRowPartials = kNWarps * 8;
  static constexpr int kRowPartialsPitch = kRowPartials + 4;
  static constexpr int kSmemRowPartialsFloats =
      kRowPartialsInSmem ? kDsStages * kBlockM * kRowPartialsPitch : 0;
  // Per query row and stage: lse (log2 domain), Delta, tau, mean of g over F_i.
  static constexpr int kRowVectors = 4;
  // kWarpSpecialized: the mbarriers K/V full, Q full and empty per stage, dS full and empty
  // per dS stage.
  static constexpr int kNumBarriers = kWarpSpecialized ? 1 + 2 * kQStages + 2 * kDsStages : 0;
  static constexpr int kSmemAlign = 1024;
  // K, V, then Q and dO stages, then dS (kFuseDq), then the row partials (kFuseDq and
  // kSparseK), then the row vectors, then the mbarriers.
  static constexpr int kSmemBytes =
      (2 * kSmemKVElems + 2 * kQStages * kSmemQElems + kSmemDsElems) * 2 +
      (kSmemRowPartialsFloats + kQStages * kRowVectors * kBlockM) * 4 + kNumBarriers * 8 +
      kSmemAlign;

  static_assert(KeySpans::kMinKeySpan % kBlockN == 0,
                "a SparseK key tile is a slice of one sorted key span");
  static_assert(!kFuseDq || (kWarpgroups == 2 && kDqDims == 64 &&
                              kBlockM == DqAccumulatorTiles::kRows &&
                              kHeadDim == DqAccumulatorTiles::kDims),
                "dq = dS K is issued at N = 64 (half of D = 128 a warpgroup), into the "
                "accumulator's 64-row tiles");
};

template <int kHeadDim>
struct BwdSm90TileSizes {
  static_assert(kHeadDim == 128, "the Hopper backward covers 64 < D <= 128");
  using Dq = BwdDqSm90TileConfig<kHeadDim>;
  using DkDvDense = BwdDkDvSm90TileConfig<kHeadDim, 2>;
  using DkDvDenseFusedDq = BwdDkDvSm90TileConfig<kHeadDim, 2, true>;
  using DkDvSparseK = BwdDkDvSm90TileConfig<kHeadDim, 1>;
  using DkDvSparseKFusedDq = BwdDkDvSm90TileConfig<kHeadDim, 2, true, true>;
};

}  // namespace sparsek
