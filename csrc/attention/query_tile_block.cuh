// Where a CTA of the forward's query-tile grid sits, and the slices of Q, K and V it reads:
// one CTA per (query tile, query head, batch), or per (query tile, group of query heads, batch)
// where the Hopper SparseK forward chains heads, started in the order of cta_order.h, in both
// forward kernels (fwd_kernel.cuh, fwd_kernel_sm90.cuh). Kernels unpack it with a structured
// binding:
//   const auto [head, batch, kv_head, warp, lane, row0, warp_row0, head_dim, q, k, v] =
//       query_tile_block<Cfg, Element, KeyVisit::kGridOrder>(p);
#pragma once

#include <cstdint>

#include "attention/cta_order.h"
#include "attention/params.h"

namespace sparsek {

template <typename Element>
struct QueryTileBlock {
  int head;
  int64_t batch;
  int kv_head;    // the kv head of this query head's group
  int warp;
  int lane;
  int row0;       // the tile's first query row
  int warp_row0;  // the warp's first query row
  int head_dim;
  const Element* q;  // row 0 of this (batch, query head); rows q_row_stride apart
  const Element* k;  // row 0 of this (batch, kv head)
  const Element* v;
};

// heads_per_cta: query heads the CTA takes in turn (a CTA of the Hopper SparseK forward may
// chain those of one kv group); its grid row is a group of them, and `head` is the first.
template <typename Cfg, typename Element, GridOrder kOrder>
__device__ __forceinline__ QueryTileBlock<Element> query_tile_block(const AttentionFwdParams& p,
                                                                    int heads_per_cta = 1) {
  QueryTileBlock<Element> b;
  // Query tiles in reverse order: under causal masking the last tiles carry the most keys,
  // and starting them first shortens the tail of the grid (cta_order.h).
  const CtaCoords cta = cta_coords<kOrder>(p);
  const int m_block = cta.tiles - 1 - cta.rank;
  b.head = cta.head * heads_per_cta;
  b.batch = cta.batch;
  b.kv_head = b.head / static_cast<int>(p.heads_q / p.heads_kv);
  b.warp = threadIdx.x / 32;
  b.lane = threadIdx.x % 32;
  b.row0 = m_block * Cfg::kBlockM;
  b.warp_row0 = b.row0 + b.warp * Cfg::kWarpRows;
  b.head_dim = static_cast<int>(p.head_dim);
  b.q = static_cast<const Element*>(p.q) + b.batch * p.q_batch_stride + b.head * p.q_head_stride;
  b.k = static_cast<const Element*>(p.k) + b.batch * p.k_batch_stride +
        b.kv_head * p.k_head_stride;
  b.v = static_cast<const Element*>(p.v) + b.batch * p.v_batch_stride +
        b.kv_head * p.v_head_stride;
  return b;
}

}  // namespace sparsek
