// Which keys the backward's dq kernel visits, and the gate of each (row, key) pair it meets:
// the forward's key-visit policies (key_visit.cuh, sparse_key_visit.cuh), so that dq visits
// exactly the keys the forward visited, plus tile_gate(), which gives the backward what the
// forward folds into the softmax: the gate m_ij itself and whether j is in F_i (SparseK).
//
// A TileGate is built once per key tile and thread; gate(mt, nt, r, m, fractional) answers
// for the element r of the thread's score fragment s[mt][nt] (rows lane / 4 + 8 (r / 2),
// columns 2 (lane % 4) + r % 2 of the m16n8 tile).
#pragma once

#include <cstdint>

#include "attention/key_visit.cuh"
#include "attention/sparse_key_visit.cuh"
#include "attention/sparsek_gate.cuh"

namespace sparsek {

template <typename Cfg>
struct DenseKeyVisitBwd : DenseKeyVisit<Cfg> {
  using Base = DenseKeyVisit<Cfg>;
  using Base::Base;

  struct TileGate {
    DenseVisibility visibility;
    int row0;  // row of the thread's first element
    int key0;  // key of the thread's first element
    bool needs_mask;
    __device__ __forceinline__ void operator()(int mt, int nt, int r, float& m,
                                               bool& fractional) const {
      fractional = false;
      m = !needs_mask || visibility.visible(row0 + mt * 16 + 8 * (r >> 1), key0 + nt * 8 + (r & 1))
              ? 1.f
              : 0.f;
    }
  };

  template <typename Params>
  __device__ __forceinline__ TileGate tile_gate(const Params&, int it, int warp_row0,
                                                int lane) const {
    const int n = this->key_tile(it);
    return TileGate{*this, warp_row0 + (lane >> 2), n * Cfg::kBlockN + (lane & 3) * 2,
                    this->tile_needs_mask(n)};
  }
};

template <typename Cfg>
struct SparseKKeyVisitBwd : SparseKKeyVisit<Cfg> {
  using Base = SparseKKeyVisit<Cfg>;
  using Base::Base;

  // The gate of every visited key, chunk candidates and tail alike, from its position and
  // score (the chunk candidates always land in the sparse-domain branch).
  struct TileGate {
    const float* u;
    const int* key;
    float tau[Cfg::kMTiles][2];
    int pos0;  // position of the thread's first row
    int window;
    int lane;
    __device__ __forceinline__ void operator()(int mt, int nt, int r, float& m,
                                               bool& fractional) const {
      const int col = nt * 8 + (lane & 3) * 2 + (r & 1);
      m = sparsek_gate(key[col], pos0 + mt * 16 + 8 * (r >> 1), window, &u[col],
                       tau[mt][r >> 1]);
      fractional = sparsek_fractional(m);
    }
    // The same gate on a tile of planned candidates (is_candidate_tile), whose keys are in the
    // sparse domain of every row: clip(u - tau, 0, 1) without the positions (padding
    // entries, u = -inf, give 0 as in operator()).
    __device__ __forceinline__ void candidate(int mt, int nt, int r, float& m,
                                              bool& fractional) const {
      m = __saturatef(u[nt * 8 + (lane & 3) * 2 + (r & 1)] - tau[mt][r >> 1]);
      fractional = sparsek_fractional(m);
    }
  };

  __device__ __forceinline__ bool is_candidate_tile(int it) const {
    return !this->is_range_tile(it);
  }
  // A tile of full keys (the first full_tiles() candidate tiles): gate 1 for every row of the
  // plan tile, so no pair of it is fractional.
  __device__ __forceinline__ bool is_full_tile(int it) const {
    return is_candidate_tile(it) && this->candidate_tile(it) < this->full_tiles();
  }

  template <typename Params>
  __device__ __forceinline__ TileGate tile_gate(const Params& p, int it, int warp_row0,
                                                int lane) const {
    TileGate gate;
    gate.u = this->s_u(it);
    gate.key = this->s_key(it);
    gate.window = static_cast<int>(p.window);
    gate.lane = lane;
    gate.pos0 = warp_row0 + (lane >> 2) + static_cast<int>(p.seqlen_k - p.seqlen_q);
    this->load_row_taus(gate.tau, warp_row0 % Cfg::kBlockM, lane);
    return gate;
  }

  // The Hopper dq kernel's TileGate, which also gates contiguous-range tiles from key
  // offsets (Base::range_key_offset, as the forward's RangeGateAfterExp): the key's place
  // relative to the row is a compare with an immediate instead of sparsek_gate's position
  // load and branches. Padding entries lie past the CTA's last position: gate 0 for every
  // row that is stored.
  struct RangeTileGate : TileGate {
    int future;    // key - p(i) of the thread's first element (range_key_offset)
    int outside;   // range_domain_offset: in its row's sparse domain iff outside + d <= 0
    bool in_band;  // every key within W of the warp's last row (range_tile_in_band)
    bool seen_whole;  // in_band and range_tile_seen_whole: every gate is 1
    // A range tile in_band: the causal mask alone (a key a row sees is in its band).
    __device__ __forceinline__ void band(int mt, int nt, int r, float& m,
                                         bool& fractional) const {
      m = future + Base::range_entry_offset(mt, nt, r) > 0 ? 0.f : 1.f;
      fractional = false;
    }
    // Any other range tile: 0 past the row's position, 1 in its band, else clip(u - tau, 0, 1).
    __device__ __forceinline__ void range(int mt, int nt, int r, float& m,
                                          bool& fractional) const {
      const int d = Base::range_entry_offset(mt, nt, r);
      float domain_gate;
      this->candidate(mt, nt, r, domain_gate, fractional);
      m = future + d > 0 ? 0.f : (outside + d <= 0 ? domain_gate : 1.f);
      fractional = sparsek_fractional(m);
    }
  };

  template <typename Params>
  __device__ __forceinline__ RangeTileGate range_tile_gate(const Params& p, int it,
                                                           int warp_row0, int lane) const {
    RangeTileGate gate;
    static_cast<TileGate&>(gate) = tile_gate(p, it, warp_row0, lane);
    const int key0 = this->range_tile_key0(it);  // (meaningless on a tile of candidates)
    gate.future = Base::range_key_offset(p, key0, warp_row0, lane);
    gate.outside = Base::range_domain_offset(p, gate.future);
    gate.in_band = Base::range_tile_in_band(p, key0, warp_row0);
    gate.seen_whole = gate.in_band && Base::range_tile_seen_whole(p, key0, warp_row0);
    return gate;
  }
};

}  // namespace sparsek
