// Warp and block reductions of the selection kernels. Every thread of the block gets the
// result; the block reductions end with a barrier, so the scratch can be reused at once.
#pragma once

#include <cmath>

namespace sparsek {

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_min(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fminf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// Sums kN values over the block (doubles, or integers where the order of a sum must not
// matter). scratch: kNThreads / 32 * kN values of shared memory.
template <int kNThreads, int kN, typename T>
__device__ __forceinline__ void block_sum(T (&x)[kN], T* scratch) {
  constexpr int kWarps = kNThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int e = 0; e < kN; ++e) {
    const T w = warp_sum(x[e]);
    if (lane == 0) scratch[warp * kN + e] = w;
  }
  __syncthreads();
#pragma unroll
  for (int e = 0; e < kN; ++e) {
    T total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[w * kN + e];
    x[e] = total;
  }
  __syncthreads();
}

// Minimum and maximum over the block. scratch: 2 * kNThreads / 32 floats.
template <int kNThreads>
__device__ __forceinline__ void block_min_max(float& lo, float& hi, float* scratch) {
  constexpr int kWarps = kNThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  lo = warp_min(lo);
  hi = warp_max(hi);
  if (lane == 0) {
    scratch[warp] = lo;
    scratch[kWarps + warp] = hi;
  }
  __syncthreads();
  lo = INFINITY;
  hi = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    lo = fminf(lo, scratch[w]);
    hi = fmaxf(hi, scratch[kWarps + w]);
  }
  __syncthreads();
}

}  // namespace sparsek

namespace sparsek {

// Inclusive prefix of one value per lane over the warp under `combine` (a fixed order, so
// that a double sum is the same run to run).
template <typename T, typename Combine>
__device__ __forceinline__ T warp_inclusive_scan(T x, Combine combine) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, x, offset);
    if (lane >= offset) x = combine(y, x);
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T x) {
  return warp_inclusive_scan(x, [](T a, T b) { return a + b; });
}

// Exclusive prefix sum of one value per thread over the block (in a fixed order, so that a
// double sum is the same run to run); also returns the block total.
// scratch: kNThreads / 32 values.
template <int kNThreads, typename T>
__device__ __forceinline__ T block_exclusive_scan(T x, T& total, T* scratch) {
  constexpr int kWarps = kNThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T inclusive = warp_inclusive_scan(x);
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  T before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const T s = scratch[w];
    if (w < warp) before += s;
    total += s;
  }
  __syncthreads();
  return before + inclusive - x;
}

// Sorts v[0, n) in shared memory, descending, for n <= kNThreads: thread i counts the
// entries that go before its own (greater, or equal at a lower index: the ranks are a
// permutation) and writes it there. One pass over the list and two barriers, where the
// network below takes log2(n) (log2(n) + 1) / 2 dependent steps. Ends with a barrier.
template <int kNThreads>
__device__ __forceinline__ void block_rank_sort_descending(float* v, int n) {
  const int i = threadIdx.x;
  const float own = i < n ? v[i] : 0.f;
  int rank = 0;
  if (i < n) {
#pragma unroll 8
    for (int j = 0; j < n; ++j) {
      const float other = v[j];
      rank += (other > own) | ((other == own) & (j < i));
    }
  }
  __syncthreads();
  if (i < n) v[rank] = own;
  __syncthreads();
}

// Sorts v[0, n) in shared memory so that before(v[i], v[i + 1]) (bitonic network; n a power
// of two; `before` a strict order). Starts and ends with a barrier. Thread t takes the pairs
// t, t + kNThreads, ...: in a step of stride <= 32 those pairs lie in the windows of 64
// entries that start at 64 * (t / 32 + k * kNThreads / 32), the same for every lane of a warp.
// So a step of stride <= 32 that follows another one waits at a warp barrier only (every step
// of sizes up to 64 but the very first, and the strides below 32 of larger sizes): 10 block
// barriers instead of 45 for 512 entries.
template <int kNThreads, typename T, typename Before>
__device__ __forceinline__ void block_sort(T* v, int n, Before before) {
  static_assert(kNThreads % 32 == 0, "whole warps");
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const int previous_stride = stride == size / 2 ? 1 : 2 * stride;
      if (size == 2 || stride > 32 || previous_stride > 32) {
        __syncthreads();
      } else {
        __syncwarp();
      }
      for (int i = threadIdx.x; i < n / 2; i += kNThreads) {
        // The i-th pair of this step: i with a zero bit inserted at `stride`.
        const int first = 2 * i - (i & (stride - 1));
        const int second = first + stride;
        const bool forward = (first & size) == 0;  // every run of the last merge
        const T a = v[first], b = v[second];
        if (forward ? before(b, a) : before(a, b)) {
          v[first] = b;
          v[second] = a;
        }
      }
    }
  }
  __syncthreads();
}

// block_sort, descending.
template <int kNThreads>
__device__ __forceinline__ void block_sort_descending(float* v, int n) {
  block_sort<kNThreads>(v, n, [](float a, float b) { return a > b; });
}

}  // namespace sparsek
