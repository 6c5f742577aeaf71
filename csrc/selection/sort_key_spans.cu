// The backward's span sort (sort_key_spans.h): one block per span of kKeySpan key positions
// and (batch, kv head), a bitonic network in shared memory. The order is total (score
// descending, then position ascending), so the result is unique whatever the network does
// with equal scores: deterministic across runs and devices.
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

// Whether entry (u_a, a) comes before entry (u_b, b): higher score first, then lower position.
// Padding (-inf, positions past S) lands after every real key, -inf-scored keys included.
__device__ __forceinline__ bool comes_before(float u_a, int32_t a, float u_b, int32_t b) {
  return u_a > u_b || (u_a == u_b && a < b);
}

__global__ void __launch_bounds__(KeySpans::kSortThreads)
    sort_key_spans_kernel(SortKeySpansParams p, int64_t padded_keys) {
  constexpr int kSpan = KeySpans::kKeySpan;
  static_assert(KeySpans::kSortThreads == kSpan, "one thread per entry of the span");
  static_assert((kSpan & (kSpan - 1)) == 0, "a bitonic network sorts a power of two");
  __shared__ float s_u[kSpan];
  __shared__ int32_t s_pos[kSpan];  // position within the span
  const int t = threadIdx.x;
  const int64_t span_begin = static_cast<int64_t>(blockIdx.x) * kSpan;
  const int64_t pos = span_begin + t;
  for (int64_t bh = blockIdx.y; bh < p.batch_heads; bh += gridDim.y) {
    __syncthreads();  // the previous (batch, head) is done with s_u and s_pos
    s_u[t] = pos < p.seqlen_k ? p.key_u[bh * p.key_u_stride + pos] : -INFINITY;
    s_pos[t] = t;
    // Runs of `size` entries alternate direction until the last pass sorts the whole span.
    for (int size = 2; size <= kSpan; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        __syncthreads();
        const int partner = t ^ stride;
        if (partner > t) {
          const bool final_order = (t & size) == 0;  // always true on the last pass
          const float u_t = s_u[t], u_p = s_u[partner];
          const int32_t pos_t = s_pos[t], pos_p = s_pos[partner];
          const bool partner_first = comes_before(u_p, pos_p, u_t, pos_t);
          if (final_order == partner_first) {
            s_u[t] = u_p;
            s_u[partner] = u_t;
            s_pos[t] = pos_p;
            s_pos[partner] = pos_t;
          }
        }
      }
    }
    __syncthreads();
    const int64_t key = span_begin + s_pos[t];
    const int64_t out = bh * padded_keys + pos;
    p.span_sorted_u[out] = s_u[t];
    p.span_sorted_key[out] = key < p.seqlen_k ? static_cast<int32_t>(key) : -1;
  }
}

std::string check_params(const SortKeySpansParams& p) {
  if (!p.key_u || !p.span_sorted_u || !p.span_sorted_key) {
    return "a key_u, span_sorted_u or span_sorted_key pointer is null";
  }
  if (p.batch_heads <= 0 || p.seqlen_k <= 0) return "batch_heads and seqlen_k must be positive";
  if (p.key_u_stride < p.seqlen_k) return "key_u_stride must be at least seqlen_k";
  if (p.seqlen_k > (int64_t{1} << 30)) return "seqlen_k must be below 2^30";
  return {};
}

}  // namespace

int64_t sparsek_key_span_workspace_bytes(int64_t batch, int64_t seqlen_k, int64_t heads_kv) {
  return KeySpanLayout::make(batch * heads_kv, seqlen_k).workspace_bytes;
}

std::string sparsek_sort_key_spans(const SortKeySpansParams& p, void* stream_ptr) {
  if (std::string error = check_params(p); !error.empty()) return error;
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(p.device); !error.empty()) return error;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t spans = key_span_count(p.seqlen_k);
  const int64_t padded_keys = spans * KeySpans::kKeySpan;
  if (poison_outputs_requested()) {
    const size_t bytes = static_cast<size_t>(p.batch_heads * padded_keys) * 4;
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.span_sorted_u, 0xFF, bytes, stream));
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.span_sorted_key, 0xFF, bytes, stream));
  }
  const unsigned grid_y = static_cast<unsigned>(std::min<int64_t>(p.batch_heads, 65535));
  sort_key_spans_kernel<<<dim3(static_cast<unsigned>(spans), grid_y), KeySpans::kSortThreads, 0,
                          stream>>>(p, padded_keys);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace sparsek
