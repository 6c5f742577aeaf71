// The order in which the attention grids start their CTAs. Each CTA owns one (tile, head,
// batch); the hardware starts CTAs in the order of their linear block index.
//
// Under a plain causal mask the CTAs of one head differ in work by up to the number of tiles
// (the last query tiles, and the first key tiles, see the most pairs). Launched head by head,
// the last head's longest CTAs start when the rest of the grid is nearly done and run on
// alone: in a list-scheduling model of 132 SMs that tail costs 6% of a causal grid at
// T = 8192 and 12% where a CTA loops over 4 query heads (GQA dk/dv). Tile-major order starts
// the longest tiles of every head first (longest processing time first): 0.2-0.3% left.
// Everywhere else a head's CTAs do about the same work, and head-major order keeps the CTAs
// that stream the same K and V (or Q and dO) in flight together.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

namespace sparsek {

struct CtaOrder {
  static constexpr int64_t kMaxGridYZ = 65535;

  // Whether a grid of `tiles` tiles a head should start tile-major (tiles then go in
  // gridDim.z, at most 65535).
  template <typename Params>
  static bool tile_major(const Params& p, int64_t tiles) {
    return p.is_causal && p.window == 0 && !p.sparsek && tiles <= kMaxGridYZ;
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

// SparseK grids are always head-major (CtaOrder::tile_major), which its kernels know at
// compile time: no branch there, and no register held for it.
template <bool kSparseK, typename Params>
__device__ __forceinline__ CtaCoords cta_coords(const Params& p) {
  if (!kSparseK && p.tile_major_grid) {
    return {static_cast<int>(blockIdx.z), static_cast<int>(gridDim.z),
            static_cast<int>(blockIdx.x), static_cast<int64_t>(blockIdx.y)};
  }
  return {static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x),
          static_cast<int>(blockIdx.y), static_cast<int64_t>(blockIdx.z)};
}
#endif

}  // namespace sparsek
