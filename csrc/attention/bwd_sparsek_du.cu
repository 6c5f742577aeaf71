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

// One block a (batch, kv head), kScanThreads rows a pass: |F_i| by an integer prefix of the
// edges, the group's means sum_h row_sums[h, i] / |F_i|, and their float64 exclusive prefix
// P[0, T] (P[0] = 0). Fixed order: the same result run to run for the same row_sums.
__global__ void __launch_bounds__(kScanThreads)
    mean_prefix_kernel(const __grid_constant__ AttentionBwdParams p, const float* row_sums,
                       const int32_t* row_edges, double* mean_prefix) {
  __shared__ int s_counts[kScanThreads / 32];
  __shared__ double s_means[kScanThreads / 32];
  const int64_t bh = blockIdx.x;
  const int64_t batch = bh / p.heads_kv;
  const int64_t kv_head = bh % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  const int32_t* edges = row_edges + bh * (p.seqlen_q + 1);
  double* prefix = mean_prefix + bh * (p.seqlen_q + 1);
  const float* sums = row_sums + (batch * p.heads_q + kv_head * group) * p.seqlen_q;
  int count_before = 0;
  double mean_before = 0.0;
  for (int64_t row0 = 0; row0 < p.seqlen_q; row0 += kScanThreads) {
    const int64_t row = row0 + threadIdx.x;
    const bool valid = row < p.seqlen_q;
    const int edge = valid ? edges[row] : 0;
    int count_total = 0;
    const int count =
        count_before + block_exclusive_scan<kScanThreads>(edge, count_total, s_counts) + edge;
    double mean = 0.0;
    if (valid && count > 0) {
      double group_sum = 0.0;
      for (int64_t h = 0; h < group; ++h) group_sum += sums[h * p.seqlen_q + row];
      mean = group_sum / count;
    }
    double mean_total = 0.0;
    const double before =
        mean_before + block_exclusive_scan<kScanThreads>(mean, mean_total, s_means);
    if (valid) prefix[row] = before;
    count_before += count_total;
    mean_before += mean_total;
  }
  if (threadIdx.x == 0) prefix[p.seqlen_q] = mean_before;
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

std::string sparsek_du_subtract_means(const AttentionBwdParams& p, const float* row_sums,
                                      const int32_t* row_edges, double* mean_prefix,
                                      cudaStream_t stream) {
  mean_prefix_kernel<<<static_cast<unsigned>(p.batch * p.heads_kv), kScanThreads, 0, stream>>>(
      p, row_sums, row_edges, mean_prefix);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  subtract_means_kernel<<<key_grid(p), kKeyThreads, 0, stream>>>(p, mean_prefix);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace sparsek
