// Which keys a query tile visits, and which keys each of its rows sees: the dense modes.
//
// A key-visit policy is what the mainloop (fwd_kernel.cuh) asks, tile by tile, for
//   num_tiles()                    how many key tiles of kBlockN keys the query tile visits;
//   load_keys(smem, gmem, ..., it) the copy of the K or V rows of tile `it`;
//   prefetch(it) / stash(it, ...)  (SparseK) fetching tile it's key positions a step early;
//   load_keys_by                   the copy by a producer warpgroup (fwd_kernel_sm90.cuh),
//                                  and, where kStashesKeySlots (SparseK), key_base /
//                                  prefetch_row / stash_row: the fetch of one key row;
//   mask_and_update(...)           hiding the keys a row does not see, weighing the others,
//                                  and the online-softmax update.
// The dense modes are a contiguous range of key tiles: full, causal (keys j <= p(i)) and the
// causal sliding window (p(i) - W < j <= p(i)), with bottom-right alignment
// p(i) = i + S - T. The SparseK policy is sparse_key_visit.cuh.
#pragma once

#include <cstddef>
#include <cstdint>

#include "attention/cta_order.h"
#include "attention/online_softmax.cuh"
#include "attention/params.h"
#include "attention/smem_tile.cuh"

namespace sparsek {

// Which (row, key) pairs the dense modes show. Shared by the forward's key visit and the
// backward's (bwd_key_visit.cuh, bwd_query_visit.cuh); Params is the forward's or the
// backward's parameter struct (same field names).
struct DenseVisibility {
  int seqlen_k;
  int row_offset;  // S - T: row i sits at position i + row_offset
  int window;      // 0: none
  bool causal;

  template <typename Params>
  __device__ __forceinline__ explicit DenseVisibility(const Params& p)
      : seqlen_k(static_cast<int>(p.seqlen_k)),
        row_offset(static_cast<int>(p.seqlen_k - p.seqlen_q)),
        window(static_cast<int>(p.window)),
        causal(p.is_causal || p.window > 0) {}

  __device__ __forceinline__ bool visible(int row, int key) const {
    const int pos = row + row_offset;
    return key < seqlen_k && (!causal || key <= pos) && (window == 0 || key > pos - window);
  }
};

template <typename Cfg>
struct DenseKeyVisit : DenseVisibility {
  static constexpr int kBlockM = Cfg::kBlockM;
  static constexpr int kBlockN = Cfg::kBlockN;
  struct Prefetch {};

  int row_lo, row_hi;        // first and last valid query row of the tile
  int tile_begin, tile_end;  // key tiles [tile_begin, tile_end), visited last to first

  template <typename Params>
  static size_t smem_bytes(const Params&) { return 0; }

  template <typename Params>
  __device__ __forceinline__ DenseKeyVisit(const Params& p, int row0, int64_t, void*)
      : DenseVisibility(p),
        row_lo(row0),
        row_hi(min(row0 + kBlockM, static_cast<int>(p.seqlen_q)) - 1) {
    int key_end = seqlen_k;  // one past the last key any row sees
    if (causal) key_end = min(key_end, row_hi + row_offset + 1);
    int key_begin = 0;
    if (window > 0) key_begin = max(0, row_lo + row_offset - window + 1);
    if (key_end <= key_begin) {
      tile_begin = tile_end = 0;
    } else {
      tile_begin = key_begin / kBlockN;
      tile_end = (key_end + kBlockN - 1) / kBlockN;
    }
  }

  __device__ __forceinline__ int num_tiles() const { return tile_end - tile_begin; }
  template <typename Params>
  __device__ __forceinline__ void start(const Params&) {}
  template <typename Params>
  __device__ __forceinline__ Prefetch prefetch(const Params&, int) const {
    return {};
  }
  __device__ __forceinline__ void stash(int, const Prefetch&) {}

  // Under causal masking the last key tiles are the ones that need masks: visiting them
  // first starts the running max from the diagonal.
  __device__ __forceinline__ int key_tile(int it) const { return tile_end - 1 - it; }

  template <typename Element>
  __device__ __forceinline__ void load_keys(Element* tile, const Element* gmem,
                                            int64_t row_stride, int it, int head_dim) const {
    load_tile_async<kBlockN, Cfg::kHeadDim, Cfg::kNThreads, typename KVTileLayout<Cfg>::type>(
        tile, gmem, row_stride, int64_t{key_tile(it)} * kBlockN, seqlen_k, head_dim);
  }

  // The Hopper kernel's producer warpgroup (fwd_kernel_sm90.cuh): key positions need no
  // fetching, and the copy is made by kThreads threads of which this is `thread`.
  static constexpr bool kStashesKeySlots = false;
  // The mode the backward kernels compile for (their visits derive from this one).
  static constexpr bool kSparseK = false;
  // The grid's CTA order follows the mask (cta_order.h).
  static constexpr GridOrder kGridOrder = GridOrder::kByFlag;
  template <int kThreads, typename Element>
  __device__ __forceinline__ void load_keys_by(int thread, Element* tile, const Element* gmem,
                                               int64_t row_stride, int it,
                                               int head_dim) const {
    load_tile_async_by<kBlockN, Cfg::kHeadDim, kThreads, typename KVTileLayout<Cfg>::type>(
        thread, tile, gmem, row_stride, int64_t{key_tile(it)} * kBlockN, seqlen_k, head_dim);
  }

  // True when some key of tile n is hidden from some row of the query tile.
  __device__ __forceinline__ bool tile_needs_mask(int n) const {
    const int first_key = n * kBlockN;
    const int last_key = first_key + kBlockN - 1;
    return last_key >= seqlen_k || (causal && last_key > row_lo + row_offset) ||
           (window > 0 && first_key <= row_hi + row_offset - window);
  }

  template <typename Softmax, typename Scores, typename Acc>
  __device__ __forceinline__ void mask_and_update(const AttentionFwdParams&, Scores& s,
                                                  Acc& acc_o, Softmax& softmax, int it,
                                                  int warp_row0, int lane) const {
    const int n = key_tile(it);
    if (tile_needs_mask(n)) {
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int row = warp_row0 + mt * 16 + (lane >> 2) + 8 * (r >> 1);
            const int key = n * kBlockN + nt * 8 + (lane & 3) * 2 + (r & 1);
            if (!visible(row, key)) s[mt][nt][r] = -INFINITY;
          }
        }
      }
    }
    softmax.update(s, acc_o, UnitGate{});
  }
};

}  // namespace sparsek
