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

namespace sparsek {

// The whole block solves one prefix u[0, n) read from global memory (-inf entries are not in
// the domain). Used for the anchor rows, and as the fallback of a query tile whose bracket
// holds too many breakpoints. Each pass evaluates f at kPoints points of the bracket at once
// (one read of the prefix), narrowing it kPoints + 1 times. Returns -inf when at most K
// keys are finite. scratch: kNThreads / 32 * kPoints doubles.
template <int kNThreads>
__device__ float solve_threshold_block(const float* u, int64_t n, int64_t topk,
                                       double* scratch) {
  constexpr int kPoints = 15;
  constexpr int kPasses = 3;         // narrow the bracket 16^3 times...
  constexpr int kNewtonPasses = 12;  // ...then Newton steps, usually 2 or 3
  double count[1] = {0.0};
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += kNThreads) {
    const float v = u[j];
    if (v > -INFINITY) {
      count[0] += 1.0;
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
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
    for (int64_t j = threadIdx.x; j < n; j += kNThreads) {
      const float v = u[j];
#pragma unroll
      for (int e = 0; e < kPoints; ++e) part[e] += __saturatef(v - x[e]);
    }
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
    for (int64_t j = threadIdx.x; j < n; j += kNThreads) {
      const float v = u[j];
      if (v >= x + 1.f) {
        sums[0] += 1.0;
      } else if (v > x) {
        sums[1] += 1.0;
        sums[2] += static_cast<double>(v) - static_cast<double>(x);
      }
    }
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
    const float next = (t > lo && t < hi && pass % 4 != 3) ? t : 0.5f * (lo + hi);
    if (next == x || !(next > lo && next < hi)) break;
    x = next;
  }
  evaluate(x, sums);
  if (sums[1] <= 0.0) return x;
  return static_cast<float>(x + (sums[0] - k) / sums[1]);
}

// What a query tile's rows share: the keys of the tile's common domain, classified against
// the bracket [lo, hi] that holds every row's tau. Keys at or below lo weigh 0 for every tau
// in the bracket, keys at or above hi + 1 weigh 1, keys in [hi, lo + 1] weigh u - tau; only
// the others ("breakpoint keys") need to be looked at one by one.
struct BracketSummary {
  double ones = 0.0;
  double linear = 0.0;      // how many weigh u - tau
  double linear_sum = 0.0;  // their sum of u
};

// One warp solves one row: the summary, plus the breakpoint keys and the row's own extra keys
// listed in shared memory (either list may hold keys at or below lo: they weigh 0). The
// listed keys' sums are in fixed point (2^-40), so their order in the lists does not matter.
__device__ __forceinline__ float solve_threshold_warp(const BracketSummary& s,
                                                      const float* listed_a, int count_a,
                                                      const float* listed_b, int count_b,
                                                      float lo, float hi, int64_t topk,
                                                      int lane) {
  constexpr double kFixed = 1099511627776.0;  // 2^40
  const double k = static_cast<double>(topk);
  // f(x) and |F| at x (for x inside [lo, hi], every "linear" key of the summary is in F).
  auto evaluate = [&](float x, double& f, double& frac) {
    int ones = 0, fractional = 0;
    long long rel = 0;  // sum_F (u - x), fixed point
    for (int j = lane; j < count_a + count_b; j += 32) {
      const float v = j < count_a ? listed_a[j] : listed_b[j - count_a];
      if (v >= x + 1.f) {
        ++ones;
      } else if (v > x) {
        ++fractional;
        rel += __double2ll_rn((static_cast<double>(v) - static_cast<double>(x)) * kFixed);
      }
    }
    ones = warp_sum(ones);
    fractional = warp_sum(fractional);
    rel = warp_sum(rel);
    f = s.ones + ones + (s.linear_sum - s.linear * static_cast<double>(x)) +
        static_cast<double>(rel) / kFixed;
    frac = s.linear + fractional;
  };
  float x = 0.5f * (lo + hi);
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
    // Every fourth step bisects, so that the bracket shrinks whatever the steps do.
    const float next = (t > lo && t < hi && iter % 4 != 3) ? t : 0.5f * (lo + hi);
    if (next == x || !(next > lo && next < hi)) break;
    x = next;
  }
  evaluate(x, f, frac);
  if (frac <= 0.0) return x;
  return static_cast<float>(x + (f - k) / frac);
}

}  // namespace sparsek
