// Tile sizes of the two backward kernels (bwd_dq_kernel.cuh, bwd_dkdv_kernel.cuh), in one
// place. Like the forward, a kernel is compiled for a padded head dim (64, 128 or 256); any
// head dim that is a multiple of 8 runs on the smallest one that holds it, with the extra
// columns zero-filled on load and never stored.
//
// Both kernels drive the forward's tile products (tile_mma.cuh), which only read the names
// below: a warp owns kWarpRows rows (kMTiles m16 tiles) of an "A" operand, the "B" operand
// has kNTilesS n8 tiles, and the second product accumulates kNTilesO n8 tiles of dims.
#pragma once

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
  static_assert(KeySpans::kKeySpan % kBlockN == 0,
                "a SparseK key tile is a slice of one sorted key span");
};

template <int kHeadDim>
struct BwdTileSizes;

// D <= 128: 4 warps of 16 rows (dq) or 16 keys (dk/dv). dk/dv keep 2 * D / 8 * 4
// accumulators a thread (128 at D = 128) next to the S^T and dP^T blocks: at D = 128 those
// take 32 query rows a step (64 spill registers). The SparseK dk/dv tile is 64 entries of a
// sorted key span: smaller tiles have lower top scores and so fewer rows to visit. D = 256:
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

}  // namespace sparsek
