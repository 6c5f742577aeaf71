// The order in which the attention grids start their CTAs. Each CTA owns one (tile, head,
// batch); the hardware starts CTAs in the order of their linear block index.
//
// Where the CTAs of one head differ widely in work, launching head by head starts the last
// head's longest CTAs when the rest of the grid is nearly done, and they run on alone.
// Tile-major order (tiles slowest) starts the longest tile of every head first (longest
// processing time first). In a list-scheduling model of 132 SMs (bench/cta_order_model.py):
//  - plain causal grids (the last query tiles and the first key tiles see the most pairs):
//    the tail costs 6-7% at T = 2048-8192 and 12% where a dk/dv CTA loops over 4 query heads
//    (GQA); tile-major within each batch leaves 0.2-1.6%;
//  - the SparseK dk/dv grid (bwd_query_visit.cuh): a CTA takes one slice of a sorted span,
//    and the first slices of the first spans visit nearly every row while the others
//    visit a few hundred: the tail costs 5-11% at S = 32k and 2-4% at 128k, tile-major (spans
//    in key order) under 0.5%.
// Everywhere else a head's CTAs do about the same work, and head-major order keeps the CTAs
// that stream the same K and V (or Q and dO) in flight together.
//
// What tile-major costs: the CTAs of one kv head in flight at once fall from about a wave
// to about SMs / Hkv (the CTAs in flight belong to one batch or two), and each such group
// reads the head's K and V (Q and dO) from HBM on its own. A forward CTA reads 1 byte of K/V
// per 128 FLOPs (128-row tiles), 3.5 TB/s at 450 TFLOP/s, so it relies on those reads hitting
// L2: plain causal grids go tile-major only where at least 4 CTAs share each kv head
// (4 * Hkv <= SMs; 0.9 TB/s from HBM at most), and one batch at a time (ordering all batches
// together would leave one CTA a kv head at B * Hkv >= SMs). The SparseK dk/dv grid reads 1
// byte of Q/dO per ~320 FLOPs and goes tile-major always.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparsek {

// How a kernel finds its grid's order: from the params' flag (dense grids, where it depends on
// the mask), or fixed at compile time (SparseK grids), which costs no branch and no register.
enum class GridOrder { kByFlag, kHeadMajor, kTileMajor };

struct CtaOrder {
  static constexpr int64_t kMaxGridYZ = 65535;
  static constexpr int64_t kMinCtasPerKvHead = 4;

  // A launch's grid: head-major (tiles, heads, batch), or tile-major (heads, tiles, batch):
  // the linear block index runs over one batch's heads, then its tiles, then the batches, so
  // each batch is a section that starts its longest tiles first, and the CTAs in flight
  // belong to one or two batches (Hkv kv heads each).
  struct Grid {
    dim3 dims;
    bool tile_major;
  };

  // The forward's and dq's grids (`heads` = Hq) and the dense dk/dv grid (`heads` = Hkv) of
  // one launch (p.batch batches, at most 65535): tile-major under a plain causal mask when a
  // batch's kv heads keep kMinCtasPerKvHead CTAs each in flight (kMinCtasPerKvHead * Hkv <=
  // SMs; tiles then go in gridDim.y, at most 65535).
  template <typename Params>
  static Grid make(const Params& p, int64_t tiles, int64_t heads, int sms) {
    const bool plain_causal = p.is_causal && p.window == 0 && !p.sparsek;
    const bool tile_major =
        plain_causal && tiles <= kMaxGridYZ && kMinCtasPerKvHead * p.heads_kv <= sms;
    return make_grid(tile_major, tiles, heads, p.batch);
  }

  // The SparseK dk/dv grid (tiles in gridDim.y when tile-major: at most 65535). The span
  // orders go tile-major. Row bands run the CTA list (band_list_coords below) unless
  // JAX_SPARSEK_BWD_GRID asks for this grid; head-major order there keeps the CTAs in flight
  // on one kv head's rows of two or three bands (its query heads' Q, dO and dq tiles: ~8 MB
  // a 2048-row band at D = 128 and four query heads, against the eight kv heads' ~64 MB
  // tile-major), as the list does.
  template <typename Params>
  static Grid make_sparsek_key_grid(const Params& p, int64_t tiles, bool tile_major) {
    return make_grid(tile_major && tiles <= kMaxGridYZ, tiles, p.heads_kv, p.batch);
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

 private:
  static Grid make_grid(bool tile_major, int64_t tiles, int64_t heads, int64_t batch) {
    const unsigned t = static_cast<unsigned>(tiles), h = static_cast<unsigned>(heads),
                   b = static_cast<unsigned>(batch);
    return {tile_major ? dim3(h, t, b) : dim3(t, h, b), tile_major};
  }
};

#ifdef __CUDACC__
// This CTA's place in a grid made by CtaOrder.
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
    return {static_cast<int>(blockIdx.y), static_cast<int>(gridDim.y),
            static_cast<int>(blockIdx.x), static_cast<int64_t>(blockIdx.z)};
  }
  return {static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x),
          static_cast<int>(blockIdx.y), static_cast<int64_t>(blockIdx.z)};
}

// The row bands' CTA list (p.band_ctas: selection/sort_key_spans.h, BandCtas; a 1-D grid):
// this CTA's entry, bh * slices_stride + rank, as coordinates. False for a CTA at or past the
// list's length, which has nothing to do.
template <typename Params>
__device__ __forceinline__ bool band_list_coords(const Params& p, int64_t slices_stride,
                                                 CtaCoords& cta) {
  if (static_cast<int64_t>(blockIdx.x) >= p.band_ctas[0]) return false;
  const int64_t entry = p.band_ctas[1 + blockIdx.x];
  const int64_t bh = entry / slices_stride;
  cta = {static_cast<int>(entry - bh * slices_stride), static_cast<int>(slices_stride),
         static_cast<int>(bh % p.heads_kv), bh / p.heads_kv};
  return true;
}
#endif

}  // namespace sparsek
