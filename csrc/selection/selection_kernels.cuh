// The three kernels of the selection stage, in launch order. Each block loops over the
// (batch, kv head) pairs given to its grid row, so any B * Hkv fits the grid.
#pragma once

#include "selection/selection_params.h"

namespace sparsek {

// 1. Per chunk of kKeyChunk keys: the scores copied in key order (contiguous per kv head),
//    and sorted, descending, with their key positions. NaN scores count as -inf.
__global__ void sort_key_chunks_kernel(SparseKSelectParams p, SelectionLayout l,
                                       SelectionBuffers w);

// 2. The exact tau of every anchor row (rows kAnchorEvery query tiles apart, and T - 1),
//    each from its whole prefix.
__global__ void anchor_thresholds_kernel(SparseKSelectParams p, SelectionLayout l,
                                         SelectionBuffers w);

// 3. Per query tile: the exact tau of each of its rows, bracketed by the anchors around the
//    tile, and the tile's visit plan.
__global__ void tile_thresholds_and_plan_kernel(SparseKSelectParams p, SelectionLayout l,
                                                SelectionBuffers w);

constexpr int kSortThreads = SelectionTiles::kKeyChunk;
constexpr int kAnchorThreads = 256;
constexpr int kTileThreads = 256;
constexpr int kTileBreakpointCapacity = 4096;

}  // namespace sparsek

namespace sparsek {

// Dynamic shared memory of tile_thresholds_and_plan_kernel.
inline size_t tile_plan_smem_bytes(int64_t chunks) {
  return ((kTileThreads / 32) * 15 + kTileBreakpointCapacity + 1) * sizeof(double) +
         (kTileBreakpointCapacity + 2 * SelectionTiles::kQueryTile) * sizeof(float) +
         16 * sizeof(int) + static_cast<size_t>(chunks) * sizeof(int);
}

}  // namespace sparsek
