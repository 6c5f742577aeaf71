// Which key tiles a query tile visits, and which keys each of its rows sees.
//
// The mainloop asks this component for a range of key tiles and for each tile whether any
// key in it is hidden from any row (only those tiles pay for per-element masking). The dense
// modes are a contiguous range: full, causal (keys j <= p(i)) and the causal sliding window
// (p(i) - W < j <= p(i)), with bottom-right alignment p(i) = i + S - T.
#pragma once

#include <cstdint>

#include "attention/params.h"

namespace sparsek {

template <int kBlockM, int kBlockN>
struct DenseKeyVisit {
  int seqlen_k;
  int row_offset;  // S - T: row i sits at position i + row_offset
  int window;      // 0: none
  bool causal;
  int row_lo, row_hi;      // first and last valid query row of the tile
  int tile_begin, tile_end;  // key tiles [tile_begin, tile_end)

  __device__ __forceinline__ DenseKeyVisit(const AttentionFwdParams& p, int row0)
      : seqlen_k(static_cast<int>(p.seqlen_k)),
        row_offset(static_cast<int>(p.seqlen_k - p.seqlen_q)),
        window(static_cast<int>(p.window)),
        causal(p.is_causal || p.window > 0),
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

  __device__ __forceinline__ bool empty() const { return tile_end <= tile_begin; }

  // True when some key of tile n is hidden from some row of the query tile.
  __device__ __forceinline__ bool tile_needs_mask(int n) const {
    const int first_key = n * kBlockN;
    const int last_key = first_key + kBlockN - 1;
    return last_key >= seqlen_k || (causal && last_key > row_lo + row_offset) ||
           (window > 0 && first_key <= row_hi + row_offset - window);
  }

  __device__ __forceinline__ bool visible(int row, int key) const {
    const int pos = row + row_offset;
    return key < seqlen_k && (!causal || key <= pos) && (window == 0 || key > pos - window);
  }
};

}  // namespace sparsek
