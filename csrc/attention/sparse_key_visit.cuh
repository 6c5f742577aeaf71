// The SparseK key-visit policy (see key_visit.cuh for the interface): the keys the selection
// stage planned for this query tile (selection/selection_params.h), gathered, and each
// (row, key) weighed by its gate m_ij (SPARSEK.md, "Gates").
//
// A query tile visits two kinds of key tiles:
//   1. the candidates of the whole chunks of its first row's sparse domain: for chunk c, the
//      first full_c + sure_c + gated_c keys of the chunk sorted by score (the plan holds the
//      prefix sums of the three). Every row of the tile has all those keys in its sparse
//      domain, so their gate is clip(u_j - tau_i, 0, 1), nothing else. The full keys of every
//      chunk come first: their gate is 1 for every row of the tile, so whole tiles of them
//      take the dense update (no gate, no mask); then the sure ones, whose gate is above 0
//      for every row, so that whole tiles of them (and of full ones) are weighed but never
//      hidden; then the gated ones;
//   2. the contiguous range from the end of those chunks to the last row's position: the
//      rest of the domain, the keys later rows add to it, and the window band. Those keys
//      get the full gate: 0 past p(i), 1 inside the window, else clip(u_j - tau_i, 0, 1).
// By default in that order; where Cfg::kRangeTilesFirst (the Hopper forward) the range comes
// first: its first tile's keys are positions the CTA knows from its row alone, so the copy of
// K(0) can start before the plan has been read (fwd_kernel_sm90.cuh).
// Key positions and scores of a later tile are fetched while tile it is computed, into a
// slot of shared memory (kSlots below).
//
// The CTA's rows may be a part of a plan tile (kBlockM dividing kQueryTile, as the backward's
// dq kernel): the plan of the enclosing tile lists a superset of what the part needs. The
// member templates take the forward's or the backward's parameter struct (same field names).
// The grid is head-major (cta_order.h), as key_base() reads it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "attention/cta_order.h"
#include "attention/online_softmax.cuh"
#include "attention/params.h"
#include "attention/smem_tile.cuh"
#include "attention/sparsek_gate.cuh"
#include "selection/selection_params.h"

namespace sparsek {

// How many tiles' key positions are in shared memory at once: Cfg::kKeySlots where the tile
// config names it, else 2.
template <typename Cfg, typename = void>
struct KeySlots {
  static constexpr int value = 2;
};
template <typename Cfg>
struct KeySlots<Cfg, std::void_t<decltype(Cfg::kKeySlots)>> {
  static constexpr int value = Cfg::kKeySlots;
};

// Whether the gate multiplies the probability after the exponential (Cfg::kGateAfterExp, the
// Hopper kernel) or enters the score as log2 of it before (default).
template <typename Cfg, typename = void>
struct GateAfterExp {
  static constexpr bool value = false;
};
template <typename Cfg>
struct GateAfterExp<Cfg, std::void_t<decltype(Cfg::kGateAfterExp)>> {
  static constexpr bool value = Cfg::kGateAfterExp;
};

// Whether the contiguous range's tiles come before the candidates' (Cfg::kRangeTilesFirst)
// or after them (default).
template <typename Cfg, typename = void>
struct RangeTilesFirst {
  static constexpr bool value = false;
};
template <typename Cfg>
struct RangeTilesFirst<Cfg, std::void_t<decltype(Cfg::kRangeTilesFirst)>> {
  static constexpr bool value = Cfg::kRangeTilesFirst;
};

// The constructor that leaves the plan in global memory (copy_plan, a barrier and
// read_plan_counts follow it).
struct DeferPlanCopy {};

template <typename Cfg>
struct SparseKKeyVisit {
  static constexpr int kBlockM = Cfg::kBlockM;
  static constexpr int kBlockN = Cfg::kBlockN;
  static constexpr int kChunk = SelectionTiles::kKeyChunk;
  static constexpr int kPlanTile = SelectionTiles::kQueryTile;
  static constexpr bool kRangeFirst = RangeTilesFirst<Cfg>::value;
  static_assert(kPlanTile % kBlockM == 0, "the plan is made per kQueryTile rows");

  struct Prefetch {
    int key;
    float u;
  };

  // Shared memory past the Q, K and V tiles, from `smem`: u [kSlots][kBlockN] and key
  // [kSlots][kBlockN] of the key tiles in flight (key -1: padding), tau [kBlockM] of the query
  // rows (+inf past T), and the plan row's gated prefix sums [chunks + 1], then its full ones
  // [chunks + 1] and its sure ones [chunks + 1] where the plan lists them
  // (plan_lists_full_keys, plan_lists_sure_keys). Only what the
  // mainloop needs stays in registers; the rest is re-read from the kernel parameters.
  // kSlots: 2 where K/V tiles load one step ahead of their use (fwd_kernel.cuh), 3 where they
  // load a whole tile ahead (the Hopper dq kernel: tile it + 2's keys are stashed while tile
  // it is computed), 4 where a producer warpgroup stashes tile it + 2's while the consumers
  // read tile it's and tile it + 1's K rows are gathered from its own (fwd_kernel_sm90.cuh).
  static constexpr int kSlots = KeySlots<Cfg>::value;
  static constexpr int kKeyOffset = kSlots * kBlockN;
  static constexpr int kTauOffset = 2 * kSlots * kBlockN;
  static constexpr int kPlanOffset = 2 * kSlots * kBlockN + kBlockM;
  float* smem;
  int chunks;          // whole chunks in the first row's domain
  int candidates;      // keys listed by the plan
  int full_keys;       // of which full (listed first)
  int unmasked_keys;   // full and sure (listed next): never hidden from a row
  int tail_begin, tail_len;

  __device__ __forceinline__ static int slot(int it) {
    return static_cast<int>(static_cast<unsigned>(it) % kSlots);
  }
  __device__ __forceinline__ float* s_u(int it) const { return smem + slot(it) * kBlockN; }
  __device__ __forceinline__ int* s_key(int it) const {
    return reinterpret_cast<int*>(smem + kKeyOffset) + slot(it) * kBlockN;
  }
  __device__ __forceinline__ float* s_tau() const { return smem + kTauOffset; }
  __device__ __forceinline__ int* s_gated_plan() const {
    return reinterpret_cast<int*>(smem + kPlanOffset);
  }
  __device__ __forceinline__ int* s_full_plan() const { return s_gated_plan() + chunks + 1; }
  __device__ __forceinline__ int* s_sure_plan() const { return s_full_plan() + chunks + 1; }
  __device__ __forceinline__ int sparse_tiles() const {
    return (candidates + kBlockN - 1) / kBlockN;
  }
  __device__ __forceinline__ int range_tiles() const {
    return (tail_len + kBlockN - 1) / kBlockN;
  }
  // Tile `it` of the visit: one of the range's (range_tile(it) of them) or a candidates' one
  // (candidate_tile(it) of them), by the order (kRangeFirst).
  __device__ __forceinline__ bool is_range_tile(int it) const {
    return kRangeFirst ? it < range_tiles() : it >= sparse_tiles();
  }
  __device__ __forceinline__ int range_tile(int it) const {
    return kRangeFirst ? it : it - sparse_tiles();
  }
  __device__ __forceinline__ int candidate_tile(int it) const {
    return kRangeFirst ? it - range_tiles() : it;
  }
  // Candidate tiles of full keys only: the first full_tiles() of them.
  __device__ __forceinline__ int full_tiles() const { return full_keys / kBlockN; }
  // Candidate tiles of full and sure keys only (no padding): the first unmasked_tiles().
  __device__ __forceinline__ int unmasked_tiles() const { return unmasked_keys / kBlockN; }
  template <typename Params>
  __device__ __forceinline__ static int64_t key_base(const Params& p) {
    const CtaCoords cta = cta_coords<kGridOrder>(p);
    const int64_t batch_head =
        cta.batch * p.heads_kv + cta.head / static_cast<int>(p.heads_q / p.heads_kv);
    return key_base(p, batch_head);
  }
  // The same from the CTA's batch * Hkv + kv head (a CTA that chains query heads, whose grid
  // row is a group of them: fwd_kernel_sm90.cuh).
  template <typename Params>
  __device__ __forceinline__ static int64_t key_base(const Params& p, int64_t batch_head) {
    return batch_head * p.key_chunks * kChunk;
  }

  // Shared memory past the Q, K and V tiles.
  template <typename Params>
  static size_t smem_bytes(const Params& p) {
    const size_t plan_entries =
        (static_cast<size_t>(p.key_chunks) + 1) * plan_listed_sums(p.key_chunks);
    return (plan_entries + kSlots * kBlockN) * sizeof(int) +
           (kSlots * kBlockN + kBlockM) * sizeof(float);
  }

  // The visit of the query tile whose first row is row0: copies the plan row and the rows'
  // thresholds into shared memory (every thread of the CTA takes part) and reads the plan's
  // counts after a __syncthreads.
  template <typename Params>
  __device__ __forceinline__ SparseKKeyVisit(const Params& p, int row0, int64_t batch_head,
                                             void* smem_begin)
      : SparseKKeyVisit(p, row0, batch_head, smem_begin, DeferPlanCopy{}) {
    copy_plan(p, row0, batch_head);
    __syncthreads();
    read_plan_counts(p);
  }

  // Only the tile's geometry (chunks and the range): no memory is read, so a kernel can start
  // copies that need no plan (the range's first tile, Q) before the plan's loads.
  template <typename Params>
  __device__ __forceinline__ SparseKKeyVisit(const Params& p, int row0, int64_t,
                                             void* smem_begin, DeferPlanCopy)
      : smem(static_cast<float*>(smem_begin)) {
    const int seqlen_q = static_cast<int>(p.seqlen_q);
    const int seqlen_k = static_cast<int>(p.seqlen_k);
    const int row_hi = min(row0 + kBlockM, seqlen_q) - 1;
    // The plan's chunks are those of its tile's first row.
    const int tile = row0 / kPlanTile;
    const int domain = static_cast<int>(
        sparse_domain_end(int64_t{tile} * kPlanTile, seqlen_q, seqlen_k, p.window));
    chunks = domain / kChunk;
    tail_begin = chunks * kChunk;
    tail_len = max(0, row_hi + seqlen_k - seqlen_q - tail_begin + 1);
  }

  // The plan row's prefix sums and the rows' thresholds into shared memory, by every thread
  // of the CTA; read_plan_counts after a barrier.
  template <typename Params>
  __device__ __forceinline__ void copy_plan(const Params& p, int row0, int64_t batch_head) {
    const int tile = row0 / kPlanTile;
    const int32_t* plan =
        p.plan + (batch_head * ((p.seqlen_q + kPlanTile - 1) / kPlanTile) + tile) *
                     plan_row_entries(p.key_chunks);
    const bool lists_full = plan_lists_full_keys(p.key_chunks);
    const bool lists_sure = plan_lists_sure_keys(p.key_chunks);
    for (int i = threadIdx.x; i <= chunks; i += Cfg::kNThreads) {
      s_gated_plan()[i] = plan[i];
      if (lists_full) s_full_plan()[i] = plan[p.key_chunks + 1 + i];
      if (lists_sure) s_sure_plan()[i] = plan[2 * (p.key_chunks + 1) + i];
    }
    const float* tau = p.tau + batch_head * p.seqlen_q;
    const int seqlen_q = static_cast<int>(p.seqlen_q);
    for (int i = threadIdx.x; i < kBlockM; i += Cfg::kNThreads) {
      s_tau()[i] = row0 + i < seqlen_q ? tau[row0 + i] : INFINITY;
    }
  }

  template <typename Params>
  __device__ __forceinline__ void read_plan_counts(const Params& p) {
    full_keys = plan_lists_full_keys(p.key_chunks) ? s_full_plan()[chunks] : 0;
    unmasked_keys = full_keys + (plan_lists_sure_keys(p.key_chunks) ? s_sure_plan()[chunks] : 0);
    candidates = unmasked_keys + s_gated_plan()[chunks];
  }

  __device__ __forceinline__ int num_tiles() const {
    return sparse_tiles() + (tail_len + kBlockN - 1) / kBlockN;
  }

  // Thread t < kBlockN fetches the key of row t of key tile `it`. (The selection's pointers
  // and key_base are re-derived from the kernel parameters when needed rather than kept in
  // registers through the mainloop.)
  template <typename Params>
  __device__ __forceinline__ Prefetch prefetch(const Params& p, int it) const {
    const int t = threadIdx.x;
    if (t >= kBlockN) return Prefetch{-1, -INFINITY};
    return prefetch_row(p, it, t, key_base(p));
  }

  // Row t of key tile `it` (t < kBlockN): its position and score, or -1 and -inf for padding.
  // base: key_base(p), which a producer warpgroup computes once (it costs two integer
  // divisions).
  template <typename Params>
  __device__ __forceinline__ Prefetch prefetch_row(const Params& p, int it, int t,
                                                   int64_t base) const {
    Prefetch f{-1, -INFINITY};
    if (!is_range_tile(it)) {
      const int r = candidate_tile(it) * kBlockN + t;
      if (r < candidates) {
        // Entry `rank` of the full keys, of the sure ones (which follow each chunk's full keys
        // in the sorted chunk) or of the gated ones (which follow both).
        const int* plan = s_gated_plan();
        int rank = r - unmasked_keys;
        if (r < full_keys) {
          plan = s_full_plan();
          rank = r;
        } else if (r < unmasked_keys) {
          plan = s_sure_plan();
          rank = r - full_keys;
        }
        int lo = 0, hi = chunks;  // plan[lo] <= rank < plan[hi]
        while (hi - lo > 1) {
          const int mid = (lo + hi) >> 1;
          if (plan[mid] <= rank) {
            lo = mid;
          } else {
            hi = mid;
          }
        }
        int offset = rank - plan[lo];
        // Past the chunk's entries of the classes listed before. (No full or no sure keys at
        // all: their prefix sums may not be loaded, and every count of theirs is 0.)
        if (r >= full_keys && full_keys > 0) {
          offset += s_full_plan()[lo + 1] - s_full_plan()[lo];
        }
        if (r >= unmasked_keys && unmasked_keys > full_keys) {
          offset += s_sure_plan()[lo + 1] - s_sure_plan()[lo];
        }
        const int64_t entry = base + lo * kChunk + offset;
        f.key = p.sorted_key[entry];
        f.u = p.sorted_u[entry];
      }
    } else {
      const int q = range_tile(it) * kBlockN + t;
      if (q < tail_len) {
        f.key = tail_begin + q;
        f.u = p.key_u[base + f.key];
      }
    }
    return f;
  }

  __device__ __forceinline__ void stash(int it, const Prefetch& f) {
    if (static_cast<int>(threadIdx.x) < kBlockN) stash_row(it, threadIdx.x, f);
  }
  // Into the key slot of mainloop step `step` (the tile's own index unless the CTA chains
  // query heads).
  __device__ __forceinline__ void stash_row(int step, int t, const Prefetch& f) {
    s_key(step)[t] = f.key;
    s_u(step)[t] = f.u;
  }

  template <typename Params>
  __device__ __forceinline__ void start(const Params& p) {
    stash(0, prefetch(p, 0));
    __syncthreads();
  }

  template <typename Element>
  __device__ __forceinline__ void load_keys(Element* tile, const Element* gmem,
                                            int64_t row_stride, int it, int head_dim) const {
    load_rows_gathered_async<kBlockN, Cfg::kHeadDim, Cfg::kNThreads,
                             typename KVTileLayout<Cfg>::type>(tile, gmem, row_stride,
                                                               s_key(it), head_dim);
  }

  // The producer warpgroup's copy (fwd_kernel_sm90.cuh), from the positions its threads
  // stashed in a slot of shared memory (the gathers wait for each other's stashes).
  static constexpr bool kStashesKeySlots = true;
  // The mode the backward kernels compile for (SparseKKeyVisitBwd derives from this one).
  static constexpr bool kSparseK = true;
  // Query-tile grids of SparseK are head-major (cta_order.h).
  static constexpr GridOrder kGridOrder = GridOrder::kHeadMajor;
  // step: the mainloop step whose key slot holds the tile's positions (`it` itself, unless the
  // CTA chains query heads: fwd_kernel_sm90.cuh).
  template <int kThreads, typename Element>
  __device__ __forceinline__ void load_keys_by(int thread, Element* tile, const Element* gmem,
                                               int64_t row_stride, int it, int step,
                                               int head_dim) const {
    if (is_range_tile(it)) {
      load_range_tile_by<kThreads>(thread, tile, gmem, row_stride, it, head_dim);
      return;
    }
    load_rows_gathered_async_by<kBlockN, Cfg::kHeadDim, kThreads,
                                typename KVTileLayout<Cfg>::type>(thread, tile, gmem,
                                                                  row_stride, s_key(step),
                                                                  head_dim);
  }

  // A range tile's rows are consecutive positions: the producer copies them as a dense tile
  // (no positions read from shared memory; rows past the range zero-filled, as the padding
  // entries of its slot). With the range first (kRangeFirst) this lets tile 0's copy start
  // before the plan is read (range_tiles() needs only the CTA's rows).
  template <int kThreads, typename Element>
  __device__ __forceinline__ void load_range_tile_by(int thread, Element* tile,
                                                     const Element* gmem, int64_t row_stride,
                                                     int it, int head_dim) const {
    load_tile_async_by<kBlockN, Cfg::kHeadDim, kThreads, typename KVTileLayout<Cfg>::type>(
        thread, tile, gmem, row_stride, range_tile_key0(it), int64_t{tail_begin} + tail_len,
        head_dim);
  }

  // The scores of a thread's two adjacent columns of n8 tile nt of a key tile's u (shared
  // memory): one 8-byte load, re-issued at each use (asm volatile), so that no copy of a
  // tile's scores stays in registers through the softmax (cached, they spilled).
  __device__ __forceinline__ static float2 load_column_scores(const volatile float* u, int nt,
                                                              int lane) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n"
                 : "=f"(v.x), "=f"(v.y)
                 : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(
                       const_cast<const float*>(u) + nt * 8 + (lane & 3) * 2))));
    return v;
  }

  // clip(u - tau, 0, 1); -inf scores and -inf tau (the row takes its whole domain) come out
  // as 0 and 1: saturation turns the NaN of -inf - -inf into 0.
  struct ChunkGate {
    // Each use re-reads shared memory (volatile, and an asm volatile load for the pairs).
    // Gating after the exponential uses a key's score twice (the mask before the running max,
    // the weight after the exponential), and a cached copy of a tile's 32 scores per thread
    // would outlive the max: registers spilled.
    const volatile float* u;
    float tau[Cfg::kMTiles][2];
    int lane;
    __device__ __forceinline__ float operator()(int mt, int nt, int r) const {
      return __saturatef(u[nt * 8 + (lane & 3) * 2 + (r & 1)] - tau[mt][r >> 1]);
    }
    // The scores of the thread's two adjacent columns of n8 tile nt: one 8-byte load.
    __device__ __forceinline__ float2 column_scores(int nt) const {
      return load_column_scores(u, nt, lane);
    }
    __device__ __forceinline__ float2 pair(int mt, int nt, int h) const {
      const float2 v = column_scores(nt);
      return make_float2(__saturatef(v.x - tau[mt][h]), __saturatef(v.y - tau[mt][h]));
    }
    // Hides the keys of gate 0 (-inf), one load a column pair for all of the thread's rows.
    // u > tau is exactly clip(u - tau, 0, 1) > 0: without flush-to-zero the difference of
    // two distinct floats is never 0, and every comparison with a NaN-making pair (-inf
    // against -inf, anything against +inf) is false, as saturation gives 0 there.
    template <typename Scores>
    __device__ __forceinline__ void hide_outside(Scores& s) const {
#pragma unroll
      for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
        const float2 v = column_scores(nt);
#pragma unroll
        for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            if (!((r & 1 ? v.y : v.x) > tau[mt][r >> 1])) s[mt][nt][r] = -INFINITY;
          }
        }
      }
    }
  };

  // The full gate of a range pair from the key's position and score (sparsek_gate), folded
  // in as log2: the mma.sync kernel's range tiles.
  struct RangeGate {
    const float* u;
    const int* key;
    float tau[Cfg::kMTiles][2];
    int pos0;  // position of the thread's first row
    int window;
    int lane;
    __device__ __forceinline__ float operator()(int mt, int nt, int r) const {
      const int col = nt * 8 + (lane & 3) * 2 + (r & 1);
      return sparsek_gate(key[col], pos0 + mt * 16 + 8 * (r >> 1), window, &u[col],
                          tau[mt][r >> 1]);
    }
  };

  // The gate of a contiguous-range tile after the exponential (the Hopper kernel, on the
  // range tiles outside some row's window band: at W = 512 the first, where the domain's last
  // keys meet the band), from key - p(i) = future + d(e) (range_key_offset,
  // range_entry_offset): past the row's position (d > 0) the key is hidden, inside the band
  // (-W < d <= 0) it weighs 1, and in the sparse domain (d <= -W) clip(u - tau, 0, 1), as
  // ChunkGate. Two compares with immediates a pair instead of sparsek_gate's branches, and
  // no log2. Padding entries (u = -inf) lie past the CTA's last position, hidden as future
  // keys from every row that is stored.
  struct RangeGateAfterExp {
    ChunkGate chunk;  // the sparse-domain keys' gate (scores and the rows' tau)
    int future;   // range_key_offset: entry e's key - p(i) is future + d(e)
    int outside;  // future + W: entry e is in the sparse domain iff outside + d(e) <= 0
    __device__ __forceinline__ float2 pair(int mt, int nt, int h) const {
      const float2 m = chunk.pair(mt, nt, h);
      return make_float2(outside + range_entry_offset(mt, nt, 2 * h) <= 0 ? m.x : 1.f,
                         outside + range_entry_offset(mt, nt, 2 * h + 1) <= 0 ? m.y : 1.f);
    }
    template <typename Scores>
    __device__ __forceinline__ void hide_outside(Scores& s) const {
#pragma unroll
      for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
        const float2 v = chunk.column_scores(nt);
#pragma unroll
        for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int d = range_entry_offset(mt, nt, r);
            const bool hidden =
                future + d > 0 ||
                (outside + d <= 0 && !((r & 1 ? v.y : v.x) > chunk.tau[mt][r >> 1]));
            if (hidden) s[mt][nt][r] = -INFINITY;
          }
        }
      }
    }
  };

  // Two ways to weigh a pair by its gate m, both leaving keys with m = 0 out of the running
  // max (as -inf) and giving m * exp2(s - max):
  //  - log2(m) added to the (log2-domain) score before the softmax (gates of 1 add exactly
  //    0): one MUFU operation a pair on top of the exponential, but nothing of the gate stays
  //    alive through the softmax: the mma.sync kernel, 32 rows a warp, has no registers for it;
  //  - m multiplied after the exponential, recomputed from u (shared memory) and tau
  //    (registers) inside the softmax: a few ALU operations instead of the MUFU one, which
  //    halves the MUFU work a pair. The Hopper kernel (16 rows a warp: kGateAfterExp) does
  //    this everywhere: ChunkGate on the planned candidates, RangeGateAfterExp on the range
  //    tiles outside the band (their positions are consecutive, so the key's place relative
  //    to the row is a compare with an immediate). The mma.sync kernel takes RangeGate
  //    with log2 on the range.
  template <bool kAfterExp, typename Gate, typename Softmax, typename Scores, typename Acc>
  __device__ __forceinline__ static void gate_and_update(const Gate& gate, Scores& s, Acc& acc_o,
                                                         Softmax& softmax) {
    if constexpr (kAfterExp) {
      gate.hide_outside(s);
      softmax.update(s, acc_o, gate);
    } else {
#pragma unroll
      for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const float m = gate(mt, nt, r);
            s[mt][nt][r] = m > 0.f ? s[mt][nt][r] + __log2f(m) : -INFINITY;
          }
        }
      }
      softmax.update(s, acc_o, UnitGate{});
    }
  }

  // Whether every key of contiguous-range tile `it` lies within `window` of the last row of
  // the warp whose first row is warp_row0 (kWarpRows rows): then a key a row of the warp sees
  // is in its window band, so the gate is the causal mask alone (weight 1). Padding entries
  // (key -1: zero K and V rows) lie past the CTA's last position, so the causal mask hides
  // them from every row that is stored. Most of the range is such tiles: at W = 512 and
  // 128-key tiles, all but the first of its 5-6 for most warps. They take the dense update
  // instead of the gate, which branches on each pair and adds log2 of its weight. Only the
  // Hopper kernel (16 rows a warp) does this: in the mma.sync kernel the extra inlined update
  // made the SparseK instantiations spill 350-500 bytes more.
  // key0: the position of the tile's first key (range_tile_key0).
  template <typename Params>
  __device__ __forceinline__ static bool range_tile_in_band(const Params& p, int key0,
                                                            int warp_row0) {
    const int pos_last = warp_row0 + static_cast<int>(p.seqlen_k - p.seqlen_q) +
                         Cfg::kWarpRows - 1;
    return static_cast<int64_t>(key0) > int64_t{pos_last} - p.window;
  }

  // The position of the first key of contiguous-range tile `it` (is_range_tile(it)).
  __device__ __forceinline__ int range_tile_key0(int it) const {
    return tail_begin + range_tile(it) * kBlockN;
  }

  // A contiguous-range tile's keys are consecutive positions, so key - p(i) of a thread's
  // score entries is one per-thread offset (range_key_offset: its first entry's, the tile's
  // first key key0) plus a constant an entry (range_entry_offset: element r of the m16 x n8
  // fragment s[mt][nt], as the mma layout places it).
  template <typename Params>
  __device__ __forceinline__ static int range_key_offset(const Params& p, int key0,
                                                         int warp_row0, int lane) {
    return key0 + (lane & 3) * 2 - warp_row0 - (lane >> 2) -
           static_cast<int>(p.seqlen_k - p.seqlen_q);
  }
  __device__ __forceinline__ static constexpr int range_entry_offset(int mt, int nt, int r) {
    return nt * 8 + (r & 1) - mt * 16 - 8 * (r >> 1);
  }
  // future + W (future: range_key_offset): an entry e is in its row's sparse domain iff this
  // plus d(e) <= 0. A band of S keys or more holds every key before the position.
  template <typename Params>
  __device__ __forceinline__ static int range_domain_offset(const Params& p, int future) {
    return future + static_cast<int>(min(p.window, p.seqlen_k));
  }
  // Whether every row of the warp sees range tile key0 whole: its last key at or before the
  // warp's first row's position (then no key of it is past any row's, and within the band,
  // range_tile_in_band, every gate is 1).
  template <typename Params>
  __device__ __forceinline__ static bool range_tile_seen_whole(const Params& p, int key0,
                                                               int warp_row0) {
    return key0 + kBlockN - 1 <= warp_row0 + static_cast<int>(p.seqlen_k - p.seqlen_q);
  }

  // -inf for the keys past each row's position: key - pos > 0. Applied to every tile of the
  // band (also those every row sees): skipping it by a branch made the kernel spill.
  template <typename Params, typename Scores>
  __device__ __forceinline__ static void hide_future_keys(const Params& p, Scores& s, int key0,
                                                          int warp_row0, int lane) {
    const int offset = range_key_offset(p, key0, warp_row0, lane);
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < Cfg::kNTilesS; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          if (offset + range_entry_offset(mt, nt, r) > 0) s[mt][nt][r] = -INFINITY;
        }
      }
    }
  }

  // The thresholds of the thread's rows (local0: the warp's first row in the CTA).
  __device__ __forceinline__ void load_row_taus(float (&tau)[Cfg::kMTiles][2], int local0,
                                                int lane) const {
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) tau[mt][h] = s_tau()[local0 + mt * 16 + (lane >> 2) + 8 * h];
    }
  }

  // step: the mainloop step whose key slot holds the tile's scores (load_keys_by).
  __device__ __forceinline__ ChunkGate chunk_gate(int step, int local0, int lane) const {
    ChunkGate gate;
    gate.u = s_u(step);
    gate.lane = lane;
    load_row_taus(gate.tau, local0, lane);
    return gate;
  }

  template <typename Softmax, typename Scores, typename Acc>
  __device__ __forceinline__ void mask_and_update(const AttentionFwdParams& p, Scores& s,
                                                  Acc& acc_o, Softmax& softmax, int it,
                                                  int warp_row0, int lane) const {
    mask_and_update(p, s, acc_o, softmax, it, it, warp_row0, lane);
  }

  // Tile `it` of the visit, whose positions and scores are in the key slot of mainloop step
  // `step` (load_keys_by).
  template <typename Softmax, typename Scores, typename Acc>
  __device__ __forceinline__ void mask_and_update(const AttentionFwdParams& p, Scores& s,
                                                  Acc& acc_o, Softmax& softmax, int it,
                                                  int step, int warp_row0, int lane) const {
    const int local0 = warp_row0 % kBlockM;
    const int candidate = candidate_tile(it);
    if (!is_range_tile(it)) {
      if (GateAfterExp<Cfg>::value && candidate < full_tiles()) {
        // Every key's gate is 1 for every row of the tile (and no key is padding).
        softmax.update(s, acc_o, UnitGate{});
      } else if (GateAfterExp<Cfg>::value && candidate < unmasked_tiles()) {
        // Every key's gate is above 0 for every row (and no key is padding): weighed, not
        // hidden.
        softmax.update(s, acc_o, chunk_gate(step, local0, lane));
      } else {
        gate_and_update<GateAfterExp<Cfg>::value>(chunk_gate(step, local0, lane), s, acc_o,
                                                  softmax);
      }
    } else if (const int key0 = range_tile_key0(it);
               GateAfterExp<Cfg>::value && range_tile_in_band(p, key0, warp_row0)) {
      // Only a tile reaching past the warp's first row's position needs the causal mask: at
      // W = 512, the diagonal one of the band's four. (This branch spilled before r1 took
      // the log2-domain update out of the kernel.)
      if (!range_tile_seen_whole(p, key0, warp_row0)) {
        hide_future_keys(p, s, key0, warp_row0, lane);
      }
      softmax.update(s, acc_o, UnitGate{});
    } else if constexpr (GateAfterExp<Cfg>::value) {
      RangeGateAfterExp gate;
      gate.chunk = chunk_gate(step, local0, lane);
      gate.future = range_key_offset(p, key0, warp_row0, lane);
      gate.outside = range_domain_offset(p, gate.future);
      gate_and_update<true>(gate, s, acc_o, softmax);
    } else {
      RangeGate gate;
      gate.u = s_u(step);
      gate.key = s_key(step);
      gate.window = static_cast<int>(p.window);
      gate.lane = lane;
      gate.pos0 = warp_row0 + (lane >> 2) + static_cast<int>(p.seqlen_k - p.seqlen_q);
      load_row_taus(gate.tau, local0, lane);
      gate_and_update<false>(gate, s, acc_o, softmax);
    }
  }
};

}  // namespace sparsek
