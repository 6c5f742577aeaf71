// Online softmax over the score fragments of mma m16n8 tiles, float32, base 2.
//
// A thread holds, for each of its m16 tiles, two rows (lane/4 and lane/4 + 8) and two
// adjacent columns per n8 tile; the four lanes of a quad share a row. Scores arrive
// multiplied by scale * log2(e) (or raw, through RawScoreSoftmax), hidden keys as -inf.
// Rows that have seen no key keep max -inf; they are computed against base 0 so that no
// -inf - -inf NaN appears.
#pragma once

#include <cmath>

namespace sparsek {

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The gate of the dense modes: every visible key weighs 1. A gate gives the weights of a
// thread's two adjacent columns of n8 tile nt in row half h (fragment entries 2h and 2h + 1),
// so that a gate read from shared memory takes one 8-byte load for both.
struct UnitGate {
  __device__ __forceinline__ float2 pair(int, int, int) const { return make_float2(1.f, 1.f); }
};

// How a tile's scores reach the exponent. PrescaledScores: the caller has multiplied them by
// scale * log2(e) (the mma.sync kernel). RawScores: they are the product's raw q.k, and the
// scale enters the exponent's FFMA, exp2(s * c - max * c), one instruction a score fewer than
// a multiply first (the Hopper kernel; c > 0, so that the raw scores' max is the scaled
// scores' max over c). Either way the running max is kept scaled (log2 domain).
struct PrescaledScores {
  static constexpr bool kPrescaled = true;
  static constexpr bool kLazyMax = false;
  __device__ __forceinline__ float exponent(float s, float base) const { return s - base; }
};

struct RawScores {
  static constexpr bool kPrescaled = false;
  // The exponent's base (the running max) moves only when a tile's max passes it by more
  // than kMaxSlack (log2 domain): OnlineSoftmax::update_rows.
  static constexpr bool kLazyMax = true;
  float scale_log2;  // c = scale * log2(e) > 0

  __device__ __forceinline__ float scaled(float raw) const { return raw * scale_log2; }
  __device__ __forceinline__ float exponent(float s, float base) const {
    return fmaf(s, scale_log2, -base);
  }
};

// How far (log2 domain) a lazy running max may lag a row's true max: the unnormalised
// probabilities exp2(s - max) then stay below 2^8, far inside fp16's and bf16's range, and
// the row's sum below 2^8 times its key count in float32.
constexpr float kMaxSlack = 8.f;

// The output accumulator's rescale factors of one update, per row (OnlineSoftmax::update's
// second form): exp2(previous max - new max), exactly 1 where the max stayed.
template <int kMTiles>
struct DeferredRescale {
  float correction[kMTiles][2];

  // The warp multiplies its accumulators only if one of its rows' factors is not 1: with a
  // lazy running max (RawScores) almost no tile after a row's first moves it, and the 64
  // multiplies a thread (D = 128) are a tenth of a tile's softmax.
  template <int kNTilesO>
  __device__ __forceinline__ void apply(float (&acc_o)[kMTiles][kNTilesO][4]) const {
    bool moved = false;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      moved |= correction[mt][0] != 1.f || correction[mt][1] != 1.f;
    }
    if (!__any_sync(0xffffffffu, moved)) return;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int dt = 0; dt < kNTilesO; ++dt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) acc_o[mt][dt][r] *= correction[mt][r >> 1];
      }
    }
  }
};

template <int kMTiles>
struct OnlineSoftmax {
  float row_max[kMTiles][2];  // running max of scaled scores (log2 domain)
  float row_sum[kMTiles][2];  // this lane's share of sum exp2(s - row_max)

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[mt][h] = -INFINITY;
        row_sum[mt][h] = 0.f;
      }
    }
  }

  // Turns the scores of one key tile into unnormalised probabilities in place, each
  // multiplied by its gate gate.pair(mt, nt, h) (SparseK; 1 in the dense modes), and rescales the
  // output accumulator to the new running max. Keys with gate 0 must arrive as -inf, so that
  // the running max is taken over the keys that count.
  template <int kNTilesS, int kNTilesO, typename Gate>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTilesS][4],
                                         float (&acc_o)[kMTiles][kNTilesO][4],
                                         const Gate& gate) {
    update_rows(s, gate, [&](int mt, int h, float correction) {
#pragma unroll
      for (int dt = 0; dt < kNTilesO; ++dt) {
        acc_o[mt][dt][2 * h] *= correction;
        acc_o[mt][dt][2 * h + 1] *= correction;
      }
    });
  }

  // The same, with the accumulator's rescale left to the caller: the Hopper kernel's
  // accumulator is still being written by the previous tile's P V product while this runs.
  template <int kNTilesS, typename Gate>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTilesS][4],
                                         DeferredRescale<kMTiles>& rescale, const Gate& gate) {
    update_rows(s, gate, [&](int mt, int h, float correction) {
      rescale.correction[mt][h] = correction;
    });
  }

  template <int kNTilesS, typename Gate, typename Rescale, typename Scaling = PrescaledScores>
  __device__ __forceinline__ void update_rows(float (&s)[kMTiles][kNTilesS][4], const Gate& gate,
                                              const Rescale& rescale,
                                              const Scaling& scaling = {}) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float new_max;
        if constexpr (Scaling::kPrescaled) {
          new_max = row_max[mt][h];
#pragma unroll
          for (int nt = 0; nt < kNTilesS; ++nt) {
            new_max = fmaxf(new_max, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
          }
          new_max = quad_max(new_max);
        } else {
          float tile_max = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kNTilesS; ++nt) {
            tile_max = fmaxf(tile_max, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
          }
          new_max = fmaxf(row_max[mt][h], scaling.scaled(quad_max(tile_max)));
        }
        float correction;
        if constexpr (Scaling::kLazyMax) {
          // The base stays unless the tile's max passes it by more than kMaxSlack (a row's
          // first keys always move it from -inf; a row with none keeps -inf and base 0).
          // Exact: the output and the sum are both taken against the same base, and the
          // LSE adds it back.
          if (new_max > row_max[mt][h] + kMaxSlack) {
            correction = fast_exp2(row_max[mt][h] - new_max);
            row_max[mt][h] = new_max;
          } else {
            correction = 1.f;
          }
        } else {
          const float base = new_max == -INFINITY ? 0.f : new_max;
          correction = fast_exp2(row_max[mt][h] - base);
          row_max[mt][h] = new_max;
        }
        const float base = row_max[mt][h] == -INFINITY ? 0.f : row_max[mt][h];
        float tile_sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
          const float2 m = gate.pair(mt, nt, h);
          const float p0 = fast_exp2(scaling.exponent(s[mt][nt][2 * h], base)) * m.x;
          const float p1 = fast_exp2(scaling.exponent(s[mt][nt][2 * h + 1], base)) * m.y;
          s[mt][nt][2 * h] = p0;
          s[mt][nt][2 * h + 1] = p1;
          tile_sum += p0 + p1;
        }
        row_sum[mt][h] = row_sum[mt][h] * correction + tile_sum;
        rescale(mt, h, correction);
      }
    }
  }

  // After the last tile: 1 / row sum (0 for a row that saw no key) and the natural-log
  // log-sum-exp of the scaled scores (-inf for such a row).
  __device__ __forceinline__ void finalize(float (&inv_sum)[kMTiles][2],
                                           float (&lse)[kMTiles][2]) const {
    constexpr float kLn2 = 0.693147180559945309f;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sum = quad_sum(row_sum[mt][h]);
        const bool seen = sum > 0.f;
        inv_sum[mt][h] = seen ? 1.f / sum : 0.f;
        lse[mt][h] = seen ? (row_max[mt][h] + __log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  }
};

// An OnlineSoftmax fed raw scores (RawScores): what the key visits call as their softmax in
// the Hopper kernel. The deferred-rescale form only (the Hopper accumulator's).
template <int kMTiles>
struct RawScoreSoftmax {
  OnlineSoftmax<kMTiles>& softmax;
  RawScores scaling;

  template <int kNTilesS, typename Gate>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTilesS][4],
                                         DeferredRescale<kMTiles>& rescale, const Gate& gate) {
    softmax.update_rows(
        s, gate, [&](int mt, int h, float correction) { rescale.correction[mt][h] = correction; },
        scaling);
  }
};

}  // namespace sparsek
