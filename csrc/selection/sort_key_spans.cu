// The backward's span sort (sort_key_spans.h): one block per span of key positions and
// (batch, kv head), a bitonic network in shared memory. The order is total (last row
// descending, then position ascending), so the result is unique whatever the network does
// with ties: deterministic across runs and devices.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"
#include "runtime/scoped_device.h"
#include "selection/sort_key_spans.h"
#include "sparsek_api.h"

namespace sparsek {

namespace {

struct SpanEntry {
  int32_t last_row;  // -1: no row attends the key; -2: padding past S
  float u;
  int32_t pos;       // position within the span
};

// Whether entry a comes before entry b. Padding lands after every real key. Keys that end
// on the same row (the top keys of a span all reach the last row) go in position order: a
// slice then holds neighbouring keys, and its rows start as late as they can.
__device__ __forceinline__ bool comes_before(const SpanEntry& a, const SpanEntry& b) {
  if (a.last_row != b.last_row) return a.last_row > b.last_row;
  return a.pos < b.pos;
}

// The last row that attends key `key` scored u (sort_key_spans.h); -1 if none. Rows and keys
// are below 2^30 (check_params).
__device__ __forceinline__ int last_attending_row(const SortKeySpansParams& p,
                                                  const float* tau, int key, float u) {
  const int rows = static_cast<int>(p.seqlen_q);
  // Last row i with tau_i < u (-1: none): tau never decreases, and -inf < any finite u.
  int lo = -1, hi = rows;  // tau[lo] < u <= tau[hi]
  if (u > -INFINITY) {
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      if (tau[mid] < u) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
  }
  // The window band: rows with key <= p(i) < key + W, p(i) = i + S - T (W < 2^31 rows past
  // the key make no difference past the last row).
  if (p.window > 0) {
    const int64_t window_last = int64_t{key} + p.window - 1 - (p.seqlen_k - p.seqlen_q);
    lo = static_cast<int>(max(int64_t{lo}, min(window_last, int64_t{rows - 1})));
  }
  return lo;
}

// One block per span of kSpan key positions and (batch, kv head): kSpan / kSortThreads
// entries a thread, compare-exchanged in the kSpan / 2 pairs (i, i + stride) of each pass of
// the bitonic network.
template <int kSpan>
__global__ void __launch_bounds__(KeySpans::kSortThreads)
    sort_key_spans_kernel(SortKeySpansParams p, int64_t span_stride) {
  constexpr int kThreads = KeySpans::kSortThreads;
  constexpr int kPerThread = kSpan / kThreads;
  static_assert(kSpan % kThreads == 0, "whole entries a thread");
  static_assert((kSpan & (kSpan - 1)) == 0, "a bitonic network sorts a power of two");
  __shared__ SpanEntry s_entry[kSpan];
  const int t = threadIdx.x;
  const int64_t span_begin = static_cast<int64_t>(blockIdx.x) * kSpan;
  for (int64_t bh = blockIdx.y; bh < p.batch_heads; bh += gridDim.y) {
    __syncthreads();  // the previous (batch, head) is done with s_entry
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int i = t + e * kThreads;
      const int64_t pos = span_begin + i;
      SpanEntry entry{-2, -INFINITY, i};
      if (pos < p.seqlen_k) {
        entry.u = p.key_u[bh * p.key_u_stride + pos];
        entry.last_row =
            last_attending_row(p, p.tau + bh * p.seqlen_q, static_cast<int>(pos), entry.u);
      }
      s_entry[i] = entry;
    }
    // Runs of `size` entries alternate direction until the last pass sorts the whole span.
    for (int size = 2; size <= kSpan; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        __syncthreads();
#pragma unroll
        for (int q = t; q < kSpan / 2; q += kThreads) {
          // Pair q of the pass: its lower entry i has bit `stride` clear.
          const int i = 2 * (q & ~(stride - 1)) + (q & (stride - 1));
          const int partner = i + stride;
          const bool final_order = (i & size) == 0;  // always true on the last pass
          const SpanEntry mine = s_entry[i], theirs = s_entry[partner];
          if (final_order == comes_before(theirs, mine)) {
            s_entry[i] = theirs;
            s_entry[partner] = mine;
          }
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int i = t + e * kThreads;
      const SpanEntry sorted = s_entry[i];
      const int64_t key = span_begin + sorted.pos;
      const int64_t out = bh * span_stride + span_begin + i;
      p.span_sorted_u[out] = sorted.u;
      p.span_sorted_key[out] = key < p.seqlen_k ? static_cast<int32_t>(key) : -1;
      p.span_last_row[out] = max(sorted.last_row, -1);
    }
  }
}

std::string check_params(const SortKeySpansParams& p) {
  if (!p.key_u || !p.tau || !p.span_sorted_u || !p.span_sorted_key || !p.span_last_row) {
    return "a key_u, tau, span_sorted_u, span_sorted_key or span_last_row pointer is null";
  }
  if (p.batch_heads <= 0 || p.seqlen_k <= 0 || p.seqlen_q <= 0) {
    return "batch_heads, seqlen_q and seqlen_k must be positive";
  }
  if (p.window < 0) return "window must be >= 0";
  if (!valid_key_span_width(p.key_span)) return "key_span must be 1024, 2048 or 4096";
  if (p.key_u_stride < p.seqlen_k) return "key_u_stride must be at least seqlen_k";
  if (p.seqlen_k > (int64_t{1} << 30) || p.seqlen_q > (int64_t{1} << 30)) {
    return "seqlen_q and seqlen_k must be below 2^30";
  }
  return {};
}

}  // namespace

int sparsek_key_span_width(int64_t seqlen_k) {
  const int requested = requested_key_span();
  return requested != 0 ? requested : key_span_width(seqlen_k);
}

int64_t sparsek_key_span_workspace_bytes(int64_t batch, int64_t seqlen_k, int64_t heads_kv) {
  return KeySpanLayout::make(batch * heads_kv, seqlen_k).workspace_bytes;
}

std::string sparsek_sort_key_spans(const SortKeySpansParams& p, void* stream_ptr) {
  if (std::string error = check_params(p); !error.empty()) return error;
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(p.device); !error.empty()) return error;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t stride = key_span_stride(p.seqlen_k);
  if (poison_outputs_requested()) {
    const size_t bytes = static_cast<size_t>(p.batch_heads * stride) * 4;
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.span_sorted_u, 0xFF, bytes, stream));
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.span_sorted_key, 0xFF, bytes, stream));
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.span_last_row, 0xFF, bytes, stream));
  }
  const dim3 grid(static_cast<unsigned>(key_span_count(p.seqlen_k, p.key_span)),
                  static_cast<unsigned>(std::min<int64_t>(p.batch_heads, 65535)));
  switch (p.key_span) {
    case 1024:
      sort_key_spans_kernel<1024><<<grid, KeySpans::kSortThreads, 0, stream>>>(p, stride);
      break;
    case 2048:
      sort_key_spans_kernel<2048><<<grid, KeySpans::kSortThreads, 0, stream>>>(p, stride);
      break;
    default:
      sort_key_spans_kernel<4096><<<grid, KeySpans::kSortThreads, 0, stream>>>(p, stride);
      break;
  }
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace sparsek
