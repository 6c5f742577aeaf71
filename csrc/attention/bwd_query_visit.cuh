// Which keys a dk/dv CTA owns, which query rows it must visit, and the gate of each
// (key, row) pair (bwd_dkdv_kernel.cuh). Rows outside [row_lo, row_lo + num_rows) give every
// key of the tile gate 0, so they contribute nothing to its dk, dv or du.
//
// A query-visit policy offers
//   smem_bytes(p)                  shared memory it needs past the kernel's tiles;
//   row_lo, num_rows               the query rows to visit (in every query head of the group);
//   load_keys(tile, gmem, ...)     the copy of the tile's K or V rows (load_keys_by: by a
//                                  producer warpgroup);
//   key_position(i), key_score(i)  the position (-1: none) and score of the tile's key i;
//   gate(key, u, row, tau, frac)   m_ij, and whether j is in F_i (SparseK).
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>

#include "attention/cta_order.h"
#include "attention/key_visit.cuh"
#include "attention/smem_tile.cuh"
#include "attention/sparsek_gate.cuh"
#include "selection/sort_key_spans.h"

namespace sparsek {

// The dense modes: key tile n is the contiguous keys [n kBlockN, (n + 1) kBlockN). Row i sees
// key j iff j <= p(i) (causal) and p(i) - W < j (window), p(i) = i + S - T, so the rows
// seeing some key of the tile run from the first key's diagonal to the last key's window end.
template <typename Cfg>
struct DenseQueryVisit {
  static constexpr bool kSparseK = false;
  static constexpr GridOrder kGridOrder = GridOrder::kByFlag;  // cta_order.h
  DenseVisibility visibility;
  int key0;
  int row_lo, num_rows;

  template <typename Params>
  static size_t smem_bytes(const Params&) {
    return 0;
  }

  template <typename Params>
  __device__ __forceinline__ DenseQueryVisit(const Params& p, int tile, int64_t, void*)
      : visibility(p), key0(tile * Cfg::kBlockN) {
    const int64_t offset = p.seqlen_k - p.seqlen_q;
    const int64_t last_key = min(int64_t{key0} + Cfg::kBlockN, p.seqlen_k) - 1;
    int64_t lo = 0, hi = p.seqlen_q - 1;
    if (visibility.causal) lo = max(lo, int64_t{key0} - offset);
    if (p.window > 0) hi = min(hi, last_key + p.window - 1 - offset);
    row_lo = static_cast<int>(lo);
    num_rows = static_cast<int>(max(int64_t{0}, hi - lo + 1));
  }

  template <typename Element>
  __device__ __forceinline__ void load_keys(Element* tile, const Element* gmem,
                                            int64_t row_stride, int head_dim) const {
    using Layout = typename KVTileLayout<Cfg>::type;
    load_tile_async<Cfg::kBlockN, Cfg::kHeadDim, Cfg::kNThreads, Layout>(
        tile, gmem, row_stride, key0, visibility.seqlen_k, head_dim);
  }
  // The same copy by kThreads threads of which this is `thread` (a producer warpgroup).
  template <int kThreads, typename Element>
  __device__ __forceinline__ void load_keys_by(int thread, Element* tile, const Element* gmem,
                                               int64_t row_stride, int head_dim) const {
    using Layout = typename KVTileLayout<Cfg>::type;
    load_tile_async_by<Cfg::kBlockN, Cfg::kHeadDim, kThreads, Layout>(
        thread, tile, gmem, row_stride, key0, visibility.seqlen_k, head_dim);
  }

  __device__ __forceinline__ int key_position(int i) const {
    return key0 + i < visibility.seqlen_k ? key0 + i : -1;
  }
  __device__ __forceinline__ float key_score(int) const { return 0.f; }

  __device__ __forceinline__ float gate(int key, float, int row, float, bool& fractional) const {
    fractional = false;
    return key >= 0 && visibility.visible(row, key) ? 1.f : 0.f;
  }

  // False when every row of [row0, row0 + kRows) sees every key of the tile (all gates 1; rows
  // past T are left to their lse of -inf): the kernel then skips gate() (the Hopper kernel).
  template <int kRows>
  __device__ __forceinline__ bool block_needs_mask(int row0) const {
    const int last_key = key0 + Cfg::kBlockN - 1;
    const int first_pos = row0 + visibility.row_offset;
    return last_key >= visibility.seqlen_k || (visibility.causal && last_key > first_pos) ||
           (visibility.window > 0 && key0 <= first_pos + kRows - 1 - visibility.window);
  }
};

// SparseK: key tile n is the entries [n kBlockN, (n + 1) kBlockN) of the backward's span sort
// (selection/sort_key_spans.h: spans of key_span key positions, each in kd order or sorted by
// the last row that attends a key, descending; a tile lies inside one span). Every key
// position appears in exactly one tile, so the tile's dk, dv and du are scattered to
// positions no other CTA writes. With row bands (p.key_band_rows) a tile is kBlockN pieces of
// one band's list, its rows within the band, and a key may be in a tile of each band that
// reaches it: the kernel then adds dk, dv and du (atomics).
// Contiguous key tiles would not do: nearly every block of keys holds a high-scoring key that
// many rows select, while the later entries of a sorted span are attended by few rows. Spans
// wider than the selection's 128-key chunks make a tile's last rows close, so its latest one
// (which bounds its rows) is close to what its other keys need.
//
// Rows that see some key of the tile: from the first row whose position reaches the tile's
// smallest key, to the latest last row of its keys (the sort's last row of its first entry:
// past it no row has a tile key in its window band or selects one from its sparse domain).
// A tile of padding entries only (key -1, past S) visits no row.
template <typename Cfg>
struct SparseKQueryVisit {
  static constexpr bool kSparseK = true;
  // Tile-major for the span orders (the top slices of the first spans visit nearly every
  // row, cta_order.h); with row bands the CTA list (band_list_coords) unless
  // JAX_SPARSEK_BWD_GRID asks for a grid: the launcher's flag.
  static constexpr GridOrder kGridOrder = GridOrder::kByFlag;
  static_assert(KeySpans::kMinKeySpan % Cfg::kBlockN == 0, "a key tile lies inside one span");

  // Shared memory: key [kBlockN], u [kBlockN], then 3 ints for the reductions.
  int* s_key;
  float* s_u;
  int window;
  int row_offset;
  int max_key;  // the tile's largest key position (-1: padding entries only)
  int row_lo, num_rows;
  // Each half's (kBlockN / 2 entries: a warpgroup's keys in the Hopper kernel) first row (its
  // smallest key's, clipped as row_lo) and last row (its first entry's: the sort puts a
  // slice's latest last rows first, so the second half's first entry holds its latest);
  // rows outside see none of the half's keys. A half of padding only: first > last.
  int half_first_row0, half_first_row1, half_last_row0, half_last_row1;

  template <typename Params>
  static size_t smem_bytes(const Params&) {
    return 2 * Cfg::kBlockN * sizeof(int) + 3 * sizeof(int);
  }

  template <typename Params>
  __device__ __forceinline__ SparseKQueryVisit(const Params& p, int tile, int64_t batch_head,
                                               void* smem_begin)
      : s_key(static_cast<int*>(smem_begin)),
        s_u(reinterpret_cast<float*>(s_key + Cfg::kBlockN)),
        window(static_cast<int>(p.window)),
        row_offset(static_cast<int>(p.seqlen_k - p.seqlen_q)) {
    int* s_bounds = s_key + 2 * Cfg::kBlockN;  // min key of each half, max key
    // The slice this CTA takes: the span sort's slice order where given (128-entry tiles).
    int slice = tile;
    if constexpr (Cfg::kBlockN == KeySpans::kKdLeaf) {
      if (p.slice_order) {
        slice = p.slice_order[batch_head * (p.key_span_stride / KeySpans::kKdLeaf) + tile];
      }
    }
    const int64_t entry0 =
        batch_head * p.key_span_stride + int64_t{slice} * Cfg::kBlockN;
    const int t = threadIdx.x;
    int key = -1;
    if (t < Cfg::kBlockN) {
      key = p.span_sorted_key[entry0 + t];
      s_key[t] = key;
      s_u[t] = p.span_sorted_u[entry0 + t];
    }
    constexpr int kHalf = Cfg::kBlockN / 2;
    if (t == 0) {
      s_bounds[0] = s_bounds[1] = INT_MAX;
      s_bounds[2] = -1;
    }
    __syncthreads();
    if (key >= 0) {
      atomicMin(&s_bounds[t / kHalf], key);
      atomicMax(&s_bounds[2], key);
    }
    const int64_t last_row = p.span_last_row[entry0];  // the tile's latest, at most T - 1
    const int64_t half_last = p.span_last_row[entry0 + kHalf];  // the second half's
    __syncthreads();
    const int64_t half_min_key[2] = {s_bounds[0], s_bounds[1]};
    const int64_t min_key = min(half_min_key[0], half_min_key[1]);
    max_key = s_bounds[2];
    half_first_row0 = half_first_row1 = 1;
    half_last_row0 = half_last_row1 = 0;
    if (max_key < 0) {  // a tile of padding entries only
      row_lo = 0;
      num_rows = 0;
      return;
    }
    const int64_t offset = p.seqlen_k - p.seqlen_q;
    // Row bands: the slice's pieces cover its band's rows only (the sort clipped their last
    // rows to the band's).
    int64_t band_row0 = 0;
    if (p.key_band_rows > 0) {
      int64_t band_begin = 0;
      band_row0 = KeyBands::band_of(int64_t{slice} * Cfg::kBlockN, p.seqlen_q, p.seqlen_k,
                                    p.key_band_rows, band_begin) *
                  p.key_band_rows;
    }
    const int64_t lo = max(max(int64_t{0}, min_key - offset), band_row0);
    row_lo = static_cast<int>(lo);
    num_rows = static_cast<int>(max(int64_t{0}, last_row - lo + 1));
    auto first_row_of = [&](int64_t key) {
      return static_cast<int>(max(max(int64_t{0}, key - offset), band_row0));
    };
    if (half_min_key[0] != INT_MAX) {
      half_first_row0 = first_row_of(half_min_key[0]);
      half_last_row0 = static_cast<int>(last_row);
    }
    if (half_min_key[1] != INT_MAX) {
      half_first_row1 = first_row_of(half_min_key[1]);
      half_last_row1 = static_cast<int>(half_last);
    }
  }

  // Whether any row of [row0, row0 + rows) sees a key of half h (a warpgroup's keys; scalar
  // members and selects, so that a runtime h indexes no local memory).
  __device__ __forceinline__ bool half_sees_rows(int h, int row0, int rows) const {
    const int first = h == 0 ? half_first_row0 : half_first_row1;
    const int last = h == 0 ? half_last_row0 : half_last_row1;
    return row0 + rows > first && row0 <= last;
  }

  template <typename Element>
  __device__ __forceinline__ void load_keys(Element* tile, const Element* gmem,
                                            int64_t row_stride, int head_dim) const {
    load_rows_gathered_async<Cfg::kBlockN, Cfg::kHeadDim, Cfg::kNThreads,
                             typename KVTileLayout<Cfg>::type>(tile, gmem, row_stride, s_key,
                                                               head_dim);
  }
  // The same gather by kThreads threads of which this is `thread` (a producer warpgroup).
  template <int kThreads, typename Element>
  __device__ __forceinline__ void load_keys_by(int thread, Element* tile, const Element* gmem,
                                               int64_t row_stride, int head_dim) const {
    load_rows_gathered_async_by<Cfg::kBlockN, Cfg::kHeadDim, kThreads,
                                typename KVTileLayout<Cfg>::type>(thread, tile, gmem,
                                                                  row_stride, s_key, head_dim);
  }

  __device__ __forceinline__ int key_position(int i) const { return s_key[i]; }
  __device__ __forceinline__ float key_score(int i) const { return s_u[i]; }

  __device__ __forceinline__ float gate(int key, float u, int row, float tau,
                                        bool& fractional) const {
    const float m = sparsek_gate(key, row + row_offset, window, &u, tau);
    fractional = sparsek_fractional(m);
    return m;
  }

  // gate()'s m for a key whose position and score the caller holds in registers, with
  // selects instead of branches (the Hopper kernel's pass: a branch a pair there kept the
  // compiler from issuing the next pairs' work early).
  __device__ __forceinline__ float gate_of_held_key(int key, float u, int row, float tau) const {
    return sparsek_gate_of_score(key, row + row_offset, window, u, tau);
  }

  // True when every key of the tile is in the sparse domain of every row from row0 on
  // (p(row0) - W at or past the largest key): gate() is then clip(u - tau, 0, 1), which
  // also gives the padding entries (u = -inf) their 0 (the Hopper kernel).
  __device__ __forceinline__ bool block_in_sparse_domain(int row0) const {
    return max_key <= row0 + row_offset - window;
  }
};

}  // namespace sparsek
