// Selection step 1: scores in key order, and each chunk sorted by score (bitonic sort in
// shared memory, one block per chunk).
#include <cmath>

#include "selection/selection_kernels.cuh"

namespace sparsek {

__global__ void __launch_bounds__(kSortThreads)
    sort_key_chunks_kernel(SparseKSelectParams p, SelectionLayout l, SelectionBuffers w) {
  constexpr int kChunk = SelectionTiles::kKeyChunk;
  static_assert(kSortThreads == kChunk, "one thread per key of the chunk");
  __shared__ float s_u[kChunk];
  __shared__ int32_t s_key[kChunk];
  const int t = threadIdx.x;
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kChunk + t;
  for (int64_t bh = blockIdx.y; bh < l.batch_heads; bh += gridDim.y) {
    const int64_t b = bh / p.heads_kv, h = bh % p.heads_kv;
    float u = -INFINITY;
    if (pos < p.seqlen_k) {
      u = p.scores[b * p.scores_batch_stride + pos * p.scores_row_stride +
                   h * p.scores_head_stride];
      if (isnan(u)) u = -INFINITY;
    }
    // The anchor kernel (a plain launch, after this grid has completed) sets them again.
    if (blockIdx.x == 0) {
      for (int64_t a = t; a < l.anchors; a += kSortThreads) w.anchor_ready[bh * l.anchors + a] = 0;
    }
    const int64_t out = bh * l.padded_keys() + pos;
    w.key_u[out] = u;
    __syncthreads();  // the previous (batch, head) is done with s_u
    s_u[t] = u;
    s_key[t] = pos < p.seqlen_k ? static_cast<int32_t>(pos) : -1;
    for (int size = 2; size <= kChunk; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        __syncthreads();
        const int partner = t ^ stride;
        if (partner > t) {
          const bool descending = (t & size) == 0;
          const float a = s_u[t], c = s_u[partner];
          if (descending ? a < c : a > c) {
            s_u[t] = c;
            s_u[partner] = a;
            const int32_t ka = s_key[t];
            s_key[t] = s_key[partner];
            s_key[partner] = ka;
          }
        }
      }
    }
    __syncthreads();
    w.sorted_u[out] = s_u[t];
    w.sorted_key[out] = s_key[t];
  }
}

}  // namespace sparsek
