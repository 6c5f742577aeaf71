// The order in which the attention grids start their CTAs. Each CTA owns one (tile, head,
// batch); the hardware starts CTAs in the order of their linear block index.
//
// Where the CTAs of one head differ widely in work, launching head by head starts the last
// head's longest CTAs when the rest of the grid is nearly done, and they run on alone.
// Tile-major order (tiles slowest) starts the longest tile of every head first (longest
// processing time first). In a list-scheduling model of 132 SMs (bench/cta_order_model.py):
//  - plain causal grids (the last query tiles and the first key tiles see the most pairs):
//    the tail costs 6-7% at T = 2048-8192 and 12% where a dk/dv CTA loops over 4 query heads
//    (GQA); tile-major leaves 0.1-0.3%;
//  - the SparseK dk/dv grid (bwd_query_visit.cuh): a CTA takes one slice of a sorted span,
//    and the first slices of the first spans visit nearly every row while the others
//    visit a few hundred: the tail costs 5-11% at S = 32k and 2-4% at 128k, tile-major (spans
//    in key order) under 0.5%.
// Everywhere else a head's CTAs do about the same work, and head-major order keeps the CTAs
// that stream the same K and V (or Q and dO) in flight together.
//
// What tile-major costs: the CTAs of one kv head in flight at once fall from about a wave
// to SMs / (B * Hkv), and each such group reads the head's K and V (Q and dO) from HBM on its
// own. A forward CTA reads 1 byte of K/V per 128 FLOPs (128-row tiles), 3.5 TB/s at 450
// TFLOP/s, so it relies on those reads hitting L2: plain causal grids go tile-major only
// while at least 4 CTAs share each kv head (4 * B * Hkv <= SMs; 0.9 TB/s from HBM at most).
// The SparseK dk/dv grid reads 1 byte of Q/dO per ~320 FLOPs and goes tile-major always.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

namespace sparsek {

// How a kernel finds its grid's order: from the params' flag (dense grids, where it depends on
// the mask), or fixed at compile time (SparseK grids), which costs no branch and no register.
enum class GridOrder { kByFlag, kHeadMajor, kTileMajor };

struct CtaOrder {
  static constexpr int64_t kMaxGridYZ = 65535;
  static constexpr int64_t kMinCtasPerKvHead = 4;

  // Query-tile grids (forward, dq) and the dense dk/dv grid of one launch (p.batch batches):
  // tile-major under a plain causal mask when every kv head keeps kMinCtasPerKvHead CTAs in
  // flight (tiles then go in gridDim.z, at most 65535). SparseK query-tile grids: head-major.
  template <typename Params>
  static bool tile_major(const Params& p, int64_t tiles, int sms) {
    return p.is_causal && p.window == 0 && !p.sparsek && tiles <= kMaxGridYZ &&
           kMinCtasPerKvHead * p.batch * p.heads_kv <= sms;
  }
  // The dk/dv grid: SparseK's is always tile-major (GridOrder::kTileMajor in its visit; at
  // most 16384 tiles: SelectionTiles::kMaxChunks * 128 keys in slices of 64).
  template <typename Params>
  static bool key_grid_tile_major(const Params& p, int64_t tiles, int sms) {
    return p.sparsek || tile_major(p, tiles, sms);
  }

  // The current device's SM count (the launchers run on the params' device).
  static cudaError_t sm_count(int* sms) {
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status == cudaSuccess) {
      status = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
    }
    return status;
  }

#ifdef __CUDACC__
  // (tiles, heads, batch) head-major, or (heads, batch, tiles) tile-major; batch at most
  // 65535 (the launchers split larger batches).
  static dim3 grid(bool tile_major, int64_t tiles, int64_t heads, int64_t batch) {
    const unsigned t = static_cast<unsigned>(tiles), h = static_cast<unsigned>(heads),
                   b = static_cast<unsigned>(batch);
    return tile_major ? dim3(h, b, t) : dim3(t, h, b);
  }
#endif
};

#ifdef __CUDACC__
// This CTA's place in a grid made by CtaOrder::grid.
struct CtaCoords {
  int rank;     // 0 for the tile started first, up to tiles - 1
  int tiles;
  int head;
  int64_t batch;
};

template <GridOrder kOrder, typename Params>
__device__ __forceinline__ CtaCoords cta_coords(const Params& p) {
  const bool tile_major = kOrder == GridOrder::kTileMajor ||
                          (kOrder == GridOrder::kByFlag && p.tile_major_grid);
  if (tile_major) {
    return {static_cast<int>(blockIdx.z), static_cast<int>(gridDim.z),
            static_cast<int>(blockIdx.x), static_cast<int64_t>(blockIdx.y)};
  }
  return {static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x),
          static_cast<int>(blockIdx.y), static_cast<int64_t>(blockIdx.z)};
}
#endif

}  // namespace sparsek
