// Narrowing a query tile's bracket from the anchors' [lo, hi] to its own rows' taus.
//
// The anchors are kAnchorEvery query tiles apart, so their bracket holds ~16 tiles' worth of
// tau: a tile's breakpoint keys (threshold_solve.cuh) are ~16 times as many as its own rows'
// taus need, and sorting them was a third of the tile kernel. f_r(x) never decreases down
// the rows r at a fixed x (a later row's domain holds the earlier one's), so a point L with
// f_first(L) > K is below every row's tau and a point H with f_last(H) < K above every
// row's. Both come from Newton steps on the unsorted list, aimed a key's weight inside the
// tile's range (K + m for the first row, K - m for the last), and each evaluation is taken
// in fixed point, so that L and H (and hence the taus) do not vary run to run. Every point
// tried is tested: a bound is only ever moved to a point that passed, and a side that does
// not land keeps the anchor's bound. Then the listed keys are weighed again against [L, H]:
// most become 0, 1 or u - tau, and the few still listed (tens, not hundreds) are sorted.
#pragma once

#include <cmath>
#include <cstdint>

#include "selection/block_reduce.cuh"
#include "selection/threshold_solve.cuh"

namespace sparsek {

struct TileBracketInput {
  const float* listed = nullptr;  // [count], unsorted: the keys listed against [lo, hi]
  int count = 0;
  const float* growth_u = nullptr;  // [growth]: the keys only the later rows see
  int growth = 0;
  BracketSums sums;  // the common domain's, on [lo, hi]
  bool first_row_finite = false;  // the first row holds more than K keys
};

// Terms of f in fixed point: a key's u - x in (0, 1) times 2^40 (4096 + 128 keys stay
// below 2^53, so the sum is exact and its order does not matter).
constexpr double kBracketFixedScale = 1099511627776.0;  // 2^40

// One key's part of f at x: weight 1 (counted in the high word) or u - x in fixed point.
__device__ __forceinline__ void add_key_weight(float v, float x, int64_t& ones_and_fractional,
                                               int64_t& fixed) {
  if (v >= x + 1.f) {
    ones_and_fractional += int64_t{1} << 32;
  } else if (v > x) {
    ones_and_fractional += 1;
    fixed += __double2ll_rn((static_cast<double>(v) - static_cast<double>(x)) *
                            kBracketFixedScale);
  }
}

// f and |F| of the tile's first row at x[0] and of its last row at x[1], both in [lo, hi].
// scratch: kNThreads / 32 * 4 int64s. Ends with a barrier.
template <int kNThreads>
__device__ __forceinline__ void evaluate_first_and_last(const TileBracketInput& in,
                                                        const float (&x)[2], double (&f)[2],
                                                        double (&fractional)[2],
                                                        int64_t* scratch) {
  int64_t acc[4] = {0, 0, 0, 0};  // per row: ones << 32 | fractional, fixed-point sum
  for (int i = threadIdx.x; i < in.count; i += kNThreads) {
    const float v = in.listed[i];
    add_key_weight(v, x[0], acc[0], acc[1]);
    add_key_weight(v, x[1], acc[2], acc[3]);
  }
  for (int j = threadIdx.x; j < in.growth; j += kNThreads) {
    add_key_weight(in.growth_u[j], x[1], acc[2], acc[3]);
  }
  block_sum<kNThreads, 4>(acc, scratch);
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const double ones = static_cast<double>(acc[2 * s] >> 32);
    const double listed_fractional = static_cast<double>(acc[2 * s] & 0xffffffff);
    fractional[s] = in.sums.linear + listed_fractional;
    f[s] = in.sums.ones + ones +
           (in.sums.linear_sum - in.sums.linear * static_cast<double>(x[s])) +
           static_cast<double>(acc[2 * s + 1]) / kBracketFixedScale;
  }
}

// Returns [L, H] inside [lo, hi] holding every row's tau (L = lo where the first row has at
// most K keys). start[0], start[1]: estimates of the first and last rows' taus.
template <int kNThreads>
__device__ __forceinline__ void narrow_tile_bracket(const TileBracketInput& in, float lo,
                                                    float hi, const float (&start)[2],
                                                    int64_t topk, float& narrow_lo,
                                                    float& narrow_hi, int64_t* scratch) {
  constexpr int kSteps = 8;
  const double k = static_cast<double>(topk);
  // Aim a key's weight inside the tile's range (a quarter of K for tiny K), accept a point
  // up to three of those out, and count a point as past K only by more than any rounding
  // of the evaluation (< 4224 keys x 2^-24 in the float differences).
  const double aim = fmin(1.0, 0.25 * k);
  const double margin = 1e-3;
  const double target[2] = {k + aim, k - aim};
  float a[2] = {lo, lo}, b[2] = {hi, hi}, x[2];
  bool done[2] = {!in.first_row_finite, false};
  narrow_lo = lo;
  narrow_hi = hi;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    x[s] = (start[s] >= lo && start[s] < hi) ? start[s] : 0.5f * (lo + hi);
  }
  for (int step = 0; step < kSteps && !(done[0] && done[1]); ++step) {
    double f[2], fractional[2];
    evaluate_first_and_last<kNThreads>(in, x, f, fractional, scratch);
    if (!done[0] && f[0] > k + margin) {
      narrow_lo = fmaxf(narrow_lo, x[0]);
      done[0] = f[0] <= k + 3.0 * aim;
    }
    if (!done[1] && f[1] < k - margin) {
      narrow_hi = fminf(narrow_hi, x[1]);
      done[1] = f[1] >= k - 3.0 * aim;
    }
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (done[s]) continue;
      if (f[s] > target[s]) {
        a[s] = x[s];
      } else {
        b[s] = x[s];
      }
      const float t = fractional[s] > 0.0
                          ? static_cast<float>(x[s] + (f[s] - target[s]) / fractional[s])
                          : 0.5f * (a[s] + b[s]);
      const float next = (t > a[s] && t < b[s]) ? t : 0.5f * (a[s] + b[s]);
      if (next == x[s] || !(next > a[s] && next < b[s])) done[s] = true;  // no room left
      x[s] = next;
    }
  }
}

// The listed keys weighed again against the narrowed bracket [lo, hi]: the sums gain the
// keys that now weigh 1 or u - tau (their u - lo in fixed point, so that the sums stay the
// same run to run), and those still listed are copied to `relisted` (up to `capacity`;
// the count returned may be larger, and then nothing may be used). `counter`: a shared int
// set to 0 before a barrier that precedes this call. Ends with a barrier.
template <int kNThreads>
__device__ __forceinline__ int relist_keys(const float* listed, int count, float lo, float hi,
                                           float* relisted, int capacity, int* counter,
                                           BracketSums& sums, int64_t* scratch) {
  int64_t moved[3] = {0, 0, 0};  // ones, linear, linear keys' u - lo in fixed point
  for (int i = threadIdx.x; i < count; i += kNThreads) {
    const float v = listed[i];
    const BracketWeight weight = bracket_weight(v, lo, hi);
    if (weight == BracketWeight::kOne) {
      ++moved[0];
    } else if (weight == BracketWeight::kLinear) {
      ++moved[1];
      // u in [hi, lo + 1]: u - lo in [0, 1].
      moved[2] += __double2ll_rn((static_cast<double>(v) - static_cast<double>(lo)) *
                                 kBracketFixedScale);
    } else if (weight == BracketWeight::kListed) {
      const int slot = atomicAdd(counter, 1);
      if (slot < capacity) relisted[slot] = v;
    }
  }
  block_sum<kNThreads, 3>(moved, scratch);
  sums.ones += static_cast<double>(moved[0]);
  sums.linear += static_cast<double>(moved[1]);
  sums.linear_sum += static_cast<double>(moved[1]) * static_cast<double>(lo) +
                     static_cast<double>(moved[2]) / kBracketFixedScale;
  return *counter;
}

}  // namespace sparsek
