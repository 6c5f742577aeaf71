// The second term of du when dq is fused into dk/dv (bwd_sparsek_du.h): each key's interval
// of fractional rows, the rows' |F_i| and float64 prefix of means, and the subtraction.
#include "attention/bwd_sparsek_du.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "runtime/cuda_check.h"
#include "selection/block_reduce.cuh"
#include "selection/selection_params.h"

namespace sparsek {
namespace {

constexpr int kKeyThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int64_t kMaxGridY = 65535;

struct FractionalRows {
  int lo = 0, hi = 0;  // [lo, hi): empty when lo == hi
};

// The rows i with key in F_i (bwd_sparsek_du.h): tau is the (batch, kv head)'s [T] thresholds.
// first row of the sparse domain: p(i) - W >= key, p(i) = i + S - T. The predicates are the
// gate's: clip(u - tau) < 1 iff the float u - tau < 1, and > 0 iff u > tau.
__device__ __forceinline__ FractionalRows fractional_rows(const AttentionBwdParams& p,
                                                          const float* tau, int key, float u) {
  FractionalRows rows;
  const int64_t first = max(int64_t{0}, int64_t{key} + p.window - (p.seqlen_k - p.seqlen_q));
  const int n = static_cast<int>(p.seqlen_q);
  if (!(u > -INFINITY) || first >= n) return rows;
  // The first row in [from, n) whose tau satisfies `holds` (n: none); it holds from there on.
  auto first_row = [&](int from, auto holds) {
    int lo = from, hi = n;
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (holds(tau[mid])) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    return lo;
  };
  rows.lo = first_row(static_cast<int>(first), [u](float t) { return u - t < 1.f; });
  rows.hi = first_row(rows.lo, [u](float t) { return !(u > t); });
  return rows;
}

// Calls visit(bh, key, rows) for the thread's key in every (batch, kv head) bh of its
// gridDim.y stride whose interval is not empty (one thread a key).
template <typename Visit>
__device__ __forceinline__ void for_each_key_interval(const AttentionBwdParams& p,
                                                      Visit&& visit) {
  const int64_t key = static_cast<int64_t>(blockIdx.x) * kKeyThreads + threadIdx.x;
  if (key >= p.seqlen_k) return;
  const int64_t padded = p.key_chunks * SelectionTiles::kKeyChunk;
  for (int64_t bh = blockIdx.y; bh < p.batch * p.heads_kv; bh += gridDim.y) {
    const FractionalRows rows = fractional_rows(p, p.tau + bh * p.seqlen_q,
                                                static_cast<int>(key), p.key_u[bh * padded + key]);
    if (rows.lo < rows.hi) visit(bh, key, rows);
  }
}

__global__ void __launch_bounds__(kKeyThreads)
    count_fractional_rows_kernel(const __grid_constant__ AttentionBwdParams p,
                                 int32_t* row_edges) {
  for_each_key_interval(p, [&](int64_t bh, int64_t, const FractionalRows& rows) {
    int32_t* edges = row_edges + bh * (p.seqlen_q + 1);
    atomicAdd(edges + rows.lo, 1);
    atomicAdd(edges + rows.hi, -1);
  });
}

// The segment scan (bwd_sparsek_du.h): CTA (segment, bh) takes rows [segment kScanThreads,
// + kScanThreads) of the (batch, kv head) bh, one a thread; gridDim.y strides over bh.
static_assert(kScanThreads == MeanPrefixSegments::kRows, "one row a thread of a segment");

struct SegmentRows {
  int64_t bh, segments, segment, row;
  bool valid;
};

template <typename Visit>
__device__ __forceinline__ void for_each_segment(const AttentionBwdParams& p, Visit&& visit) {
  SegmentRows at;
  at.segments = gridDim.x;  // MeanPrefixSegments::count(T)
  at.segment = blockIdx.x;
  at.row = at.segment * kScanThreads + threadIdx.x;
  at.valid = at.row < p.seqlen_q;
  for (at.bh = blockIdx.y; at.bh < p.batch * p.heads_kv; at.bh += gridDim.y) visit(at);
}

// The sum of totals[0, count) over the block, in a fixed order (thread t takes t, t +
// kScanThreads, ...).
template <typename T>
__device__ __forceinline__ T sum_of_first(const T* totals, int64_t count, T* scratch) {
  T x[1] = {0};
  for (int64_t i = threadIdx.x; i < count; i += kScanThreads) x[0] += totals[i];
  block_sum<kScanThreads>(x, scratch);
  return x[0];
}

// Pass 1: each segment's sum of row edges.
__global__ void __launch_bounds__(kScanThreads)
    segment_count_totals_kernel(const __grid_constant__ AttentionBwdParams p,
                                const int32_t* row_edges, int32_t* count_totals) {
  __shared__ int s_scratch[kScanThreads / 32];
  for_each_segment(p, [&](const SegmentRows& at) {
    int x[1] = {at.valid ? row_edges[at.bh * (p.seqlen_q + 1) + at.row] : 0};
    block_sum<kScanThreads>(x, s_scratch);
    if (threadIdx.x == 0) count_totals[at.bh * at.segments + at.segment] = x[0];
  });
}

// Pass 2: each row's |F_i| (the edges of the segments before, and of its rows up to it) and
// the group's mean sum_h row_sums[h, i] / |F_i|, written where its prefix goes; each
// segment's sum of means.
__global__ void __launch_bounds__(kScanThreads)
    segment_means_kernel(const __grid_constant__ AttentionBwdParams p, const float* row_sums,
                         const int32_t* row_edges, const int32_t* count_totals,
                         double* mean_prefix, double* mean_totals) {
  __shared__ int s_counts[kScanThreads / 32];
  __shared__ double s_means[kScanThreads / 32];
  const int64_t group = p.heads_q / p.heads_kv;
  for_each_segment(p, [&](const SegmentRows& at) {
    const int count_before =
        sum_of_first(count_totals + at.bh * at.segments, at.segment, s_counts);
    const int edge = at.valid ? row_edges[at.bh * (p.seqlen_q + 1) + at.row] : 0;
    int unused = 0;
    const int count =
        count_before + block_exclusive_scan<kScanThreads>(edge, unused, s_counts) + edge;
    double mean[1] = {0.0};
    if (at.valid && count > 0) {
      const int64_t batch = at.bh / p.heads_kv;
      const int64_t kv_head = at.bh % p.heads_kv;
      const float* sums = row_sums + (batch * p.heads_q + kv_head * group) * p.seqlen_q;
      double group_sum = 0.0;
      for (int64_t h = 0; h < group; ++h) group_sum += sums[h * p.seqlen_q + at.row];
      mean[0] = group_sum / count;
    }
    if (at.valid) mean_prefix[at.bh * (p.seqlen_q + 1) + at.row] = mean[0];
    block_sum<kScanThreads>(mean, s_means);
    if (threadIdx.x == 0) mean_totals[at.bh * at.segments + at.segment] = mean[0];
  });
}

// Pass 3: the exclusive prefix of the means in place, P[0] = 0; the last segment also writes
// P[T], the sum of every row's mean.
__global__ void __launch_bounds__(kScanThreads)
    segment_prefix_kernel(const __grid_constant__ AttentionBwdParams p,
                          const double* mean_totals, double* mean_prefix) {
  __shared__ double s_means[kScanThreads / 32];
  for_each_segment(p, [&](const SegmentRows& at) {
    double* prefix = mean_prefix + at.bh * (p.seqlen_q + 1);
    const double before = sum_of_first(mean_totals + at.bh * at.segments, at.segment, s_means);
    const double mean = at.valid ? prefix[at.row] : 0.0;
    double total = 0.0;
    const double exclusive = before + block_exclusive_scan<kScanThreads>(mean, total, s_means);
    if (at.valid) prefix[at.row] = exclusive;
    if (at.segment + 1 == at.segments && threadIdx.x == 0) prefix[p.seqlen_q] = before + total;
  });
}

__global__ void __launch_bounds__(kKeyThreads)
    subtract_means_kernel(const __grid_constant__ AttentionBwdParams p,
                          const double* mean_prefix) {
  for_each_key_interval(p, [&](int64_t bh, int64_t key, const FractionalRows& rows) {
    const double* prefix = mean_prefix + bh * (p.seqlen_q + 1);
    const int64_t batch = bh / p.heads_kv;
    const int64_t kv_head = bh % p.heads_kv;
    p.du[(batch * p.seqlen_k + key) * p.heads_kv + kv_head] -=
        static_cast<float>(prefix[rows.hi] - prefix[rows.lo]);
  });
}

dim3 key_grid(const AttentionBwdParams& p) {
  return dim3(static_cast<unsigned>((p.seqlen_k + kKeyThreads - 1) / kKeyThreads),
              static_cast<unsigned>(std::min(p.batch * p.heads_kv, kMaxGridY)));
}

}  // namespace

std::string sparsek_du_count_fractional_rows(const AttentionBwdParams& p, int32_t* row_edges,
                                             cudaStream_t stream) {
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(
      row_edges, 0, p.batch * p.heads_kv * (p.seqlen_q + 1) * sizeof(int32_t), stream));
  count_fractional_rows_kernel<<<key_grid(p), kKeyThreads, 0, stream>>>(p, row_edges);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

std::string sparsek_du_subtract_means(const AttentionBwdParams& p, const BwdRowBuffers& rows,
                                      cudaStream_t stream) {
  const dim3 segment_grid(static_cast<unsigned>(MeanPrefixSegments::count(p.seqlen_q)),
                          static_cast<unsigned>(std::min(p.batch * p.heads_kv, kMaxGridY)));
  segment_count_totals_kernel<<<segment_grid, kScanThreads, 0, stream>>>(
      p, rows.row_edges, rows.segment_count_totals);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  segment_means_kernel<<<segment_grid, kScanThreads, 0, stream>>>(
      p, rows.mean, rows.row_edges, rows.segment_count_totals, rows.mean_prefix,
      rows.segment_mean_totals);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  segment_prefix_kernel<<<segment_grid, kScanThreads, 0, stream>>>(
      p, rows.segment_mean_totals, rows.mean_prefix);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  subtract_means_kernel<<<key_grid(p), kKeyThreads, 0, stream>>>(p, rows.mean_prefix);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace sparsek
