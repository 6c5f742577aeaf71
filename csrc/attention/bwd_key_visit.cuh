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
    return it < this->sparse_tiles();
  }
  // A tile of full keys (the first full_tiles() candidate tiles): gate 1 for every row of the
  // plan tile, so no pair of it is fractional.
  __device__ __forceinline__ bool is_full_tile(int it) const { return it < this->full_tiles(); }

  template <typename Params>
  __device__ __forceinline__ TileGate tile_gate(const Params& p, int it, int warp_row0,
                                                int lane) const {
    TileGate gate;
    gate.u = this->s_u(it);
    gate.key = this->s_key(it);
    gate.window = static_cast<int>(p.window);
    gate.lane = lane;
    gate.pos0 = warp_row0 + (lane >> 2) + static_cast<int>(p.seqlen_k - p.seqlen_q);
    const int local0 = warp_row0 % Cfg::kBlockM;
    const float* tau_rows = this->s_tau();
#pragma unroll
    for (int mt = 0; mt < Cfg::kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        gate.tau[mt][h] = tau_rows[local0 + mt * 16 + (lane >> 2) + 8 * h];
      }
    }
    return gate;
  }
};

}  // namespace sparsek
