// The three kernels of the selection stage, in launch order. Each block loops over the
// (batch, kv head) pairs given to its grid row, so any B * Hkv fits the grid.
#pragma once

#include "selection/selection_params.h"

namespace sparsek {

// 1. Per chunk of kKeyChunk keys: the scores copied in key order (contiguous per kv head),
//    and sorted, descending, with their key positions. NaN scores count as -inf. The first
//    chunk's blocks also clear the anchors' ready flags.
__global__ void sort_key_chunks_kernel(SparseKSelectParams p, SelectionLayout l,
                                       SelectionBuffers w);

// 2. The exact tau of every anchor row (rows kAnchorEvery query tiles apart, and T - 1),
//    each from its whole prefix, then its ready flag.
__global__ void anchor_thresholds_kernel(SparseKSelectParams p, SelectionLayout l,
                                         SelectionBuffers w);

// 3. Per query tile: the exact tau of each of its rows, bracketed by the anchors around the
//    tile, and the tile's visit plan.
//    tile_major: blockIdx.x is the (batch, kv head), blockIdx.y the tile; otherwise blockIdx.x
//    is the tile and the (batch, kv head) pairs stride over blockIdx.y.
__global__ void tile_thresholds_and_plan_kernel(SparseKSelectParams p, SelectionLayout l,
                                                SelectionBuffers w, bool tile_major);

constexpr int kSortThreads = SelectionTiles::kKeyChunk;
// Anchors are few (T / 2048 + 2 a kv head: about one block an SM), so the anchor kernel
// takes as long as its slowest block, one pass over the longest prefix after another: more
// threads a block read it faster (512 x the solver's ~80 registers still fit an SM).
constexpr int kAnchorThreads = 512;
constexpr int kTileThreads = 256;
constexpr int kTileBreakpointCapacity = 4096;
// Keys still listed once a tile's bracket is narrowed to its own rows (tens in practice;
// past this the tile keeps the anchors' bracket).
constexpr int kTileRelistCapacity = 1024;

}  // namespace sparsek

namespace sparsek {

// Dynamic shared memory of tile_thresholds_and_plan_kernel, in bytes from its start. The
// growth summary (threshold_solve.cuh) is used before the plan's chunk counts, so they share
// the last region.
struct TilePlanSmem {
  static constexpr int kTile = SelectionTiles::kQueryTile;
  static constexpr size_t kScratch = 0;  // (kTileThreads / 32) * 15 doubles
  static constexpr size_t kPrefix = kScratch + (kTileThreads / 32) * 15 * sizeof(double);
  static constexpr size_t kBreakpoints = kPrefix + (kTileBreakpointCapacity + 1) * sizeof(double);
  static constexpr size_t kRelisted = kBreakpoints + kTileBreakpointCapacity * sizeof(float);
  static constexpr size_t kGrowth = kRelisted + kTileRelistCapacity * sizeof(float);
  static constexpr size_t kTau = kGrowth + kTile * sizeof(float);
  static constexpr size_t kCounters = kTau + kTile * sizeof(float);  // 16 ints
  static constexpr size_t kShared = kCounters + 16 * sizeof(int);
  // Growth summary: linear_sum doubles, then finite, ones, linear and listed ints, each
  // kTile + 1, then the listed keys (kTile floats).
  static constexpr size_t kGrowthSummaryBytes =
      (kTile + 1) * (sizeof(double) + 4 * sizeof(int)) + kTile * sizeof(float);
  static_assert(kShared % alignof(double) == 0, "the growth summary starts with doubles");

  static size_t bytes(int64_t chunks) {
    // The chunk counts: gated, and full and sure where the plan lists them.
    const size_t plan = static_cast<size_t>(chunks) * sizeof(int) * plan_listed_sums(chunks);
    return kShared + (plan > kGrowthSummaryBytes ? plan : kGrowthSummaryBytes);
  }
};

}  // namespace sparsek
