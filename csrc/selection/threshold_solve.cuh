// Solving sum_j clip(u_j - tau, 0, 1) = K for tau (SPARSEK.md, "Gates").
//
// f(tau) = sum_j clip(u_j - tau, 0, 1) is continuous, non-increasing and piecewise linear,
// with breakpoints at every u_j and u_j - 1. At a point x, with O the keys at or above x + 1
// and F those strictly between x and x + 1, f(x) = |O| + sum_F (u - x), and the linear piece
// through x crosses K at t = x + (f(x) - K) / |F| (the reference's closing step,
// tau = (sum_F u - (K - |O|)) / |F|). Both solvers keep a bracket [lo, hi] with
// f(lo) >= K >= f(hi) and take Newton steps x -> t on it, falling back to bisection when a
// step leaves the bracket; once x and the root share a piece, t is exact (a key on the
// boundary of F changes nothing: moving it in or out of F leaves t as it is).
// Sums are taken in a fixed order (or in fixed point), so results do not vary run to run.
#pragma once

#include <cmath>
#include <cstdint>

#include "selection/block_reduce.cuh"
#include "selection/selection_params.h"

namespace sparsek {

// Calls visit(v) for each score u[j], j < n, that this thread owns, in a fixed order: the
// prefix is read as float4 (u is 16-byte aligned), four loads in flight a thread, since a
// pass over a long prefix is bound by the loads' latency, not by the work per key.
template <int kNThreads, typename Visit>
__device__ __forceinline__ void for_each_prefix_key(const float* u, int64_t n, Visit&& visit) {
  const float4* u4 = reinterpret_cast<const float4*>(u);
  const int64_t n4 = n / 4;
  int64_t q = threadIdx.x;
  for (; q + 3 * kNThreads < n4; q += 4 * kNThreads) {
    float4 v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = u4[q + e * kNThreads];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      visit(v[e].x);
      visit(v[e].y);
      visit(v[e].z);
      visit(v[e].w);
    }
  }
  for (; q < n4; q += kNThreads) {
    const float4 v = u4[q];
    visit(v.x);
    visit(v.y);
    visit(v.z);
    visit(v.w);
  }
  const int64_t j = 4 * n4 + threadIdx.x;
  if (j < n) visit(u[j]);
}

// The whole block solves one prefix u[0, n) read from global memory (-inf entries are not in
// the domain). Used for the anchor rows, and as the fallback of a query tile whose bracket
// holds too many breakpoints. Each pass evaluates f at kPoints points of the bracket at once
// (one read of the prefix), narrowing it kPoints + 1 times. Returns -inf when at most K
// keys are finite. scratch: kNThreads / 32 * kPoints doubles.
// Not inlined: the tile kernel calls it only on its rare paths, and inlined its 15-point
// arrays would take registers from the common one.
template <int kNThreads>
__device__ __noinline__ float solve_threshold_block(const float* u, int64_t n, int64_t topk,
                                                    double* scratch) {
  constexpr int kPoints = 15;
  constexpr int kPasses = 3;         // narrow the bracket 16^3 times...
  constexpr int kNewtonPasses = 12;  // ...then Newton steps, usually 2 or 3
  double count[1] = {0.0};
  float lo = INFINITY, hi = -INFINITY;
  for_each_prefix_key<kNThreads>(u, n, [&](float v) {
    if (v > -INFINITY) {
      count[0] += 1.0;
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  });
  block_sum<kNThreads, 1>(count, scratch);
  if (count[0] <= static_cast<double>(topk)) return -INFINITY;
  block_min_max<kNThreads>(lo, hi, reinterpret_cast<float*>(scratch));
  lo -= 1.f;  // f(min - 1) = |domain| > K, f(max) = 0 < K

  for (int pass = 0; pass < kPasses; ++pass) {
    const float step = (hi - lo) / (kPoints + 1);
    if (!(step > 0.f)) break;
    float x[kPoints];
    float part[kPoints];
#pragma unroll
    for (int e = 0; e < kPoints; ++e) {
      x[e] = lo + step * static_cast<float>(e + 1);
      part[e] = 0.f;
    }
    for_each_prefix_key<kNThreads>(u, n, [&](float v) {
#pragma unroll
      for (int e = 0; e < kPoints; ++e) part[e] += __saturatef(v - x[e]);
    });
    double f[kPoints];
#pragma unroll
    for (int e = 0; e < kPoints; ++e) f[e] = part[e];
    block_sum<kNThreads, kPoints>(f, scratch);
    float new_lo = lo, new_hi = hi;
#pragma unroll
    for (int e = 0; e < kPoints; ++e) {
      if (new_hi != hi) continue;
      if (f[e] > static_cast<double>(topk)) {
        new_lo = x[e];
      } else {
        new_hi = x[e];
      }
    }
    if (new_lo == lo && new_hi == hi) break;
    lo = new_lo;
    hi = new_hi;
  }

  // f, |F| and sum_F (u - x) at x, over the whole prefix.
  auto evaluate = [&](float x, double (&sums)[3]) {
    sums[0] = sums[1] = sums[2] = 0.0;
    for_each_prefix_key<kNThreads>(u, n, [&](float v) {
      if (v >= x + 1.f) {
        sums[0] += 1.0;
      } else if (v > x) {
        sums[1] += 1.0;
        sums[2] += static_cast<double>(v) - static_cast<double>(x);
      }
    });
    block_sum<kNThreads, 3>(sums, scratch);
    sums[0] += sums[2];  // f(x)
  };
  const double k = static_cast<double>(topk);
  float x = 0.5f * (lo + hi);
  double sums[3];
  for (int pass = 0; pass < kNewtonPasses; ++pass) {
    evaluate(x, sums);
    if (sums[0] > k) {
      lo = x;
    } else {
      hi = x;
    }
    if (sums[0] == k) break;
    const float t = sums[1] > 0.0 ? static_cast<float>(x + (sums[0] - k) / sums[1]) : x;
    // Converged to float precision (f is flat where no key is fractional: no step there).
    if (sums[1] > 0.0 && t == x) break;
    const float next = (t > lo && t < hi && pass % 4 != 3) ? t : 0.5f * (lo + hi);
    if (next == x || !(next > lo && next < hi)) break;
    x = next;
  }
  evaluate(x, sums);
  if (sums[1] <= 0.0) return x;
  return static_cast<float>(x + (sums[0] - k) / sums[1]);
}

// How a key weighs for every tau in the bracket [lo, hi] that holds every row's tau of a
// query tile: not in the domain (-inf), 0 (at or below lo), 1 (at or above hi + 1), u - tau
// (in [hi, lo + 1]), or depending on where tau lies: a "breakpoint key", listed one by one.
enum class BracketWeight { kNone, kZero, kOne, kLinear, kListed };

__device__ __forceinline__ BracketWeight bracket_weight(float v, float lo, float hi) {
  if (!(v > -INFINITY)) return BracketWeight::kNone;
  if (v <= lo) return BracketWeight::kZero;
  if (v >= hi + 1.f) return BracketWeight::kOne;
  if (v >= hi && v <= lo + 1.f) return BracketWeight::kLinear;
  return BracketWeight::kListed;
}

// The keys of a query tile's common domain that weigh a constant over the whole bracket:
// how many weigh 1, how many u - tau, and the latter's sum of u.
struct BracketSums {
  double ones = 0.0;
  double linear = 0.0;
  double linear_sum = 0.0;
};

// What a query tile's rows share: the keys of the tile's common domain, summed by their
// bracket weight. The breakpoint keys are kept sorted, descending, with prefix sums, so
// that their part of f at any x costs two binary searches instead of a pass over them.
struct BracketSummary {
  BracketSums sums;
  const float* breakpoints = nullptr;  // [count], descending
  const double* prefix = nullptr;      // [count + 1]: prefix[i] = sum of breakpoints[0, i)
  int count = 0;

  // How many breakpoints are > x (or >= x).
  __device__ __forceinline__ int count_above(float x, bool inclusive) const {
    int lo = 0, hi = count;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      const float v = breakpoints[mid];
      if (v > x || (inclusive && v == x)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  }
};

// The keys the tile's rows add past its first row's domain (fewer than kQueryTile; row r
// sees the first own(r) of them), by the same bracket weights: prefix counts and sums over
// the first j keys, so that a row's share is a lookup, and the breakpoint keys in key order
// (row r sees the first listed[own(r)] of them).
struct GrowthSummary {
  static constexpr int kMaxKeys = SelectionTiles::kQueryTile;
  // [kMaxKeys + 1] each: over the first j keys.
  double* linear_sum;
  int* finite;
  int* ones;
  int* linear;
  int* listed;
  float* listed_u;  // [kMaxKeys]

  // One warp classifies the `count` keys `u` (4 a lane, so count <= 128) and fills the
  // prefixes in key order.
  __device__ __forceinline__ void build_warp(const float* u, int count, float lo, float hi,
                                             int lane) const {
    static_assert(kMaxKeys <= 4 * 32, "one warp, four keys a lane");
    BracketWeight weight[4];
    float v[4];
    int n_finite = 0, n_ones = 0, n_linear = 0, n_listed = 0;
    double sum = 0.0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = 4 * lane + e;
      v[e] = j < count ? u[j] : -INFINITY;
      weight[e] = bracket_weight(v[e], lo, hi);
      n_finite += weight[e] != BracketWeight::kNone;
      n_ones += weight[e] == BracketWeight::kOne;
      n_linear += weight[e] == BracketWeight::kLinear;
      n_listed += weight[e] == BracketWeight::kListed;
      if (weight[e] == BracketWeight::kLinear) sum += v[e];
    }
    // Exclusive prefixes of the lanes before this one, then this lane's keys in order.
    n_finite = warp_inclusive_scan(n_finite) - n_finite;
    n_ones = warp_inclusive_scan(n_ones) - n_ones;
    n_linear = warp_inclusive_scan(n_linear) - n_linear;
    n_listed = warp_inclusive_scan(n_listed) - n_listed;
    sum = warp_inclusive_scan(sum) - sum;
    if (lane == 0) {
      linear_sum[0] = 0.0;
      finite[0] = ones[0] = linear[0] = listed[0] = 0;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = 4 * lane + e;
      n_finite += weight[e] != BracketWeight::kNone;
      n_ones += weight[e] == BracketWeight::kOne;
      if (weight[e] == BracketWeight::kLinear) {
        ++n_linear;
        sum += v[e];
      }
      if (weight[e] == BracketWeight::kListed) listed_u[n_listed++] = v[e];
      if (j < count) {
        linear_sum[j + 1] = sum;
        finite[j + 1] = n_finite;
        ones[j + 1] = n_ones;
        linear[j + 1] = n_linear;
        listed[j + 1] = n_listed;
      }
    }
  }
};

// One thread solves one row from the tile's summary and the first `own` keys of the growth
// summary, starting from `start` (an estimate inside the bracket; Newton lands in a few
// steps, since f is close to linear at the scale of the bracket).
__device__ __forceinline__ float solve_threshold_row(const BracketSummary& s,
                                                     const GrowthSummary& g, int own, float lo,
                                                     float hi, float start, int64_t topk) {
  const double k = static_cast<double>(topk);
  const double ones_fixed = s.sums.ones + g.ones[own];
  const double linear_fixed = s.sums.linear + g.linear[own];
  const double linear_sum_fixed = s.sums.linear_sum + g.linear_sum[own];
  const int listed_own = g.listed[own];
  // f(x) and |F| at x (for x inside [lo, hi], every "linear" key is in F).
  auto evaluate = [&](float x, double& f, double& frac) {
    const float x1 = x + 1.f;
    int ones = s.count_above(x1, true);
    const int above = s.count_above(x, false);
    int fractional = above - ones;
    double sum = s.prefix[above] - s.prefix[ones];
    for (int a = 0; a < listed_own; ++a) {
      const float v = g.listed_u[a];
      if (v >= x1) {
        ++ones;
      } else if (v > x) {
        ++fractional;
        sum += v;
      }
    }
    frac = linear_fixed + fractional;
    f = ones_fixed + ones + (linear_sum_fixed + sum) - frac * static_cast<double>(x);
  };
  float x = (start >= lo && start < hi) ? start : 0.5f * (lo + hi);
  double f = 0.0, frac = 0.0;
  for (int iter = 0; iter < 64; ++iter) {
    evaluate(x, f, frac);
    if (f > k) {
      lo = x;
    } else {
      hi = x;
    }
    if (f == k) break;
    const float t = frac > 0.0 ? static_cast<float>(x + (f - k) / frac) : x;
    // Converged to float precision (t then equals lo or hi: without this test the bracket
    // check below would bisect on, to no purpose, until the bracket collapses). Where no key
    // is fractional f is flat, and there is no step to take.
    if (frac > 0.0 && t == x) break;
    // Past 8 steps every fourth one bisects, so that the bracket shrinks whatever the
    // Newton steps do.
    const float next = (t > lo && t < hi && (iter < 8 || iter % 4 != 3)) ? t : 0.5f * (lo + hi);
    if (next == x || !(next > lo && next < hi)) break;
    x = next;
  }
  evaluate(x, f, frac);
  if (frac <= 0.0) return x;
  return static_cast<float>(x + (f - k) / frac);
}

}  // namespace sparsek
