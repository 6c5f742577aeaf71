// The backward's span sort (sort_key_spans.h): one block per span of key positions and
// (batch, kv head), bitonic networks in shared memory. Every order is total (last row
// descending, then position ascending; the kd order's keys end in the position), so the
// result is unique whatever a network does with ties: deterministic across runs and devices.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "attention/cta_order.h"  // CtaOrder::sm_count
#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"
#include "runtime/scoped_device.h"
#include "selection/block_reduce.cuh"
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

// The last rows that attend keys key[e] scored u[e] (sort_key_spans.h); -1 where none. kCount
// binary searches in lockstep, so that their loads are in flight together: the search's
// length depends only on T (a lower bound over a halving range), and a thread's searches
// would otherwise wait out ~15 dependent L2 loads one after the other. Rows and keys are below
// 2^30 (check_params).
template <int kCount>
__device__ __forceinline__ void last_attending_rows(const SortKeySpansParams& p,
                                                    const float* tau, const int (&key)[kCount],
                                                    const float (&u)[kCount],
                                                    int (&last)[kCount]) {
  const int rows = static_cast<int>(p.seqlen_q);
  // base[e]: the first row of the range that holds the count of rows with tau_i < u[e] (tau
  // never decreases, and -inf < any finite u; u = -inf counts no row).
  int base[kCount];
#pragma unroll
  for (int e = 0; e < kCount; ++e) base[e] = 0;
  for (int n = rows; n > 1; n -= n / 2) {
    const int half = n / 2;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      base[e] = tau[base[e] + half] < u[e] ? base[e] + half : base[e];
    }
  }
#pragma unroll
  for (int e = 0; e < kCount; ++e) {
    int lo = base[e] + (tau[base[e]] < u[e] ? 1 : 0) - 1;  // the last row with tau_i < u
    // The window band: rows with key <= p(i) < key + W, p(i) = i + S - T (W < 2^31 rows past
    // the key make no difference past the last row).
    if (p.window > 0) {
      const int64_t window_last =
          int64_t{key[e]} + p.window - 1 - (p.seqlen_k - p.seqlen_q);
      lo = static_cast<int>(max(int64_t{lo}, min(window_last, int64_t{rows - 1})));
    }
    last[e] = lo;
  }
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
  extern __shared__ SpanEntry s_entry[];  // [kSpan]
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
        int last[1];
        last_attending_rows<1>(p, p.tau + bh * p.seqlen_q, {static_cast<int>(pos)}, {entry.u},
                               last);
        entry.last_row = last[0];
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

// Row bands (sort_key_spans.h): each key's last row, once, [batch_heads, seqlen_k].
__global__ void __launch_bounds__(KeySpans::kSortThreads)
    key_last_rows_kernel(SortKeySpansParams p) {
  const int64_t key = static_cast<int64_t>(blockIdx.x) * KeySpans::kSortThreads + threadIdx.x;
  if (key >= p.seqlen_k) return;
  for (int64_t bh = blockIdx.y; bh < p.batch_heads; bh += gridDim.y) {
    int last[1];
    last_attending_rows<1>(p, p.tau + bh * p.seqlen_q, {static_cast<int>(key)},
                           {p.key_u[bh * p.key_u_stride + key]}, last);
    p.key_last_row[bh * p.seqlen_k + key] = last[0];
  }
}

// Row bands: one block a band and (batch, kv head) lists the band's pieces in position order,
// at the band's offset: every key some row of the band attends (its last row at or past the
// band's first row and its own first row, its position within the band's reach), with its
// last row clipped to the band's; then padding (key -1, last row -1) to the band's capacity.
__global__ void __launch_bounds__(KeySpans::kSortThreads)
    band_pieces_kernel(SortKeySpansParams p) {
  constexpr int kThreads = KeySpans::kSortThreads;
  __shared__ int s_scan[kThreads / 32];
  const int64_t band = blockIdx.x;
  const int64_t rows = p.band_rows;
  const int64_t offset = p.seqlen_k - p.seqlen_q;
  const int64_t row0 = band * rows;
  const int64_t row_end = min(p.seqlen_q, row0 + rows) - 1;  // the band's last row
  const int64_t reach = min(p.seqlen_k, row_end + offset + 1);  // keys its rows can see
  const int64_t band_begin = KeyBands::offset(band, p.seqlen_q, p.seqlen_k, rows);
  const int64_t capacity = KeyBands::capacity(band, p.seqlen_q, p.seqlen_k, rows);
  for (int64_t bh = blockIdx.y; bh < p.batch_heads; bh += gridDim.y) {
    const int64_t out0 = bh * p.stride + band_begin;
    int64_t count = 0;
    for (int64_t key0 = 0; key0 < reach; key0 += kThreads) {
      const int64_t key = key0 + threadIdx.x;
      int last = -1;
      bool keep = false;
      if (key < reach) {
        last = p.key_last_row[bh * p.seqlen_k + key];
        const int64_t first_row = max(int64_t{0}, key - offset);
        keep = last >= row0 && last >= first_row;
      }
      int total = 0;
      const int index = block_exclusive_scan<kThreads>(keep ? 1 : 0, total, s_scan);
      if (keep) {
        p.span_sorted_key[out0 + count + index] = static_cast<int32_t>(key);
        p.span_last_row[out0 + count + index] =
            static_cast<int32_t>(min(int64_t{last}, row_end));
      }
      count += total;
    }
    for (int64_t i = count + threadIdx.x; i < capacity; i += kThreads) {
      p.span_sorted_key[out0 + i] = -1;
      p.span_last_row[out0 + i] = -1;
      p.span_sorted_u[out0 + i] = -INFINITY;
    }
  }
}

// kd order (sort_key_spans.h; bench/sparsek_bwd_visit_model.py's kd_order with span = kSpan
// is the specification). The tree is the whole kSpan-entry span's, cut at the span's n
// entries: the node at `depth` is an aligned run of kSpan >> depth entries, and it splits
// into its halves; the entries past n are padding, last in every run. A node holding at most
// kKdLeaf of the n entries is a leaf (it then lies in its first slice); one of more than
// kKdLeaf and at most 2 kKdLeaf is a pair, which splits by last row; a node whose entries
// all fit its first half splits into that half alone. Why aligned runs: every depth then
// sorts only its runs (308 bitonic passes at 4096 entries), where halves of whole slices of a
// ragged span (a band's second span) cut nodes anywhere and sorted the whole span at every
// depth (6 x 78 passes); the model's visited pairs are the same within 0.3% (bench/NOTES.md).

// An entry's sort key at one depth: the value (the coordinate the node splits by, or for
// leaves the last row descending), then the span position (ties by position, and the entry
// itself); padding has the largest value. Row bands' coordinates are rows within the band
// (below KeyBands::kMaxRows), so 20 bits of value and 12 of position (kSpan 4096) fit 32
// bits, which halve a pass's shuffles and take one min or max an exchange; whole-sequence
// spans (rows below 2^30, up to 8192 positions) take 64.
template <bool kBands>
struct KdSortKey {
  using Key = std::conditional_t<kBands, uint32_t, uint64_t>;
  static constexpr int kPosBits = kBands ? 12 : 13;
  static constexpr int kValueBits = kBands ? 20 : 31;
  static constexpr Key kPosMask = (Key{1} << kPosBits) - 1;
  static constexpr uint32_t kPadding = (uint32_t{1} << kValueBits) - 1;  // the largest value
  static constexpr uint32_t kLeafValueMax = kPadding - 1;  // leaves: this - (row + 1)

  static __device__ __forceinline__ Key make(uint32_t value, int pos) {
    return (Key{value} << kPosBits) | static_cast<Key>(pos);
  }
  static __device__ __forceinline__ int pos(Key key) { return static_cast<int>(key & kPosMask); }
};

// Sorts every run of `run` entries of a span of kThreads x kPer entries ascending (run a power
// of two, at most the span), the entries in registers: thread t holds entries kPer t + j in
// v[j]. The passes below `run` are a bitonic network's (runs of `size` alternate direction);
// the last merge takes every run ascending. A pass exchanges entry i with i ^ stride: within
// the thread for strides below kPer, between the lanes of a warp (shuffles) below 32 kPer,
// and through `exchange` (kThreads x kPer entries of shared memory, a barrier on either side)
// above: 15 of the 78 passes of a whole 4096-entry sort, where every pass of a sort in shared
// memory cost a barrier of the 1024 threads and a round trip (bench/NOTES.md). For strides of
// kPer or more, whether an entry keeps the smaller of its pair depends on the thread alone.
template <int kPer, int kThreads, typename Key>
__device__ __forceinline__ void bitonic_sort_runs_ascending(Key (&v)[kPer], Key* exchange,
                                                            int run) {
  const int t = threadIdx.x;
  // Whether entry i's run of `size` is merged ascending (every run of the last merge).
  auto ascending = [&](int i, int size) { return size == run || (i & size) == 0; };
  // Entry i keeps the smaller of the pair where it is the lower one of an ascending run or
  // the upper one of a descending run.
  auto keeps_min = [&](int i, int size, int stride) {
    return ((i & stride) == 0) == ascending(i, size);
  };
  for (int size = 2; size <= run; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      if (stride >= 32 * kPer) {
        const bool take_min = keeps_min(kPer * t, size, stride);
        __syncthreads();  // every thread is done reading the previous pass's exchange
#pragma unroll
        for (int j = 0; j < kPer; ++j) exchange[kPer * t + j] = v[j];
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const Key other = exchange[(kPer * t + j) ^ stride];
          v[j] = take_min ? min(v[j], other) : max(v[j], other);
        }
      } else if (stride >= kPer) {
        const bool take_min = keeps_min(kPer * t, size, stride);
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const Key other = __shfl_xor_sync(0xffffffffu, v[j], stride / kPer);
          v[j] = take_min ? min(v[j], other) : max(v[j], other);
        }
      } else {
        // Within the thread: the stride as a constant, so that v stays in registers.
#pragma unroll
        for (int local = kPer / 2; local > 0; local /= 2) {
          if (stride != local) continue;
#pragma unroll
          for (int j = 0; j < kPer; ++j) {
            if ((j & local) == 0) {
              const bool up = ascending(kPer * t + j, size);
              const Key a = v[j], b = v[j + local];
              v[j] = up ? min(a, b) : max(a, b);
              v[j + local] = up ? max(a, b) : min(a, b);
            }
          }
        }
      }
    }
  }
}

constexpr int log2_of(int x) { return x <= 1 ? 0 : 1 + log2_of(x / 2); }

// sort_key_spans_kd_kernel's dynamic shared memory: the exchange [kSpan] of sort keys and each
// position's last row [kSpan]; with bands also its first row and key [kSpan each].
template <int kSpan, bool kBands>
constexpr size_t kd_sort_smem_bytes() {
  return kSpan * (sizeof(typename KdSortKey<kBands>::Key) + (kBands ? 3 : 1) * sizeof(int));
}

// One block per span of kSpan key positions and (batch, kv head): at each depth of the tree
// the splitting nodes' extents (shared-memory atomics), then one sort of each node's run by
// (coordinate of the node's larger extent, position); at the last depth every node is a leaf
// and the sort is by (last row descending, position). A depth whose only node with entries
// fits in its first half (n at most half a run) is skipped: the next depth sorts the same
// entries again. The entries stay in registers, kPer consecutive ones a thread. Shared
// memory: kd_sort_smem_bytes (96 KB at 8192).
//
// kBands (row bands): the span is kSpan entries of a band's list (band_pieces_kernel: its
// pieces first, in position order, then padding), sorted in place; an entry's first
// coordinate is its first row within the band (max of the key's first row and the band's),
// not its place in the span, and its last row is the list's (clipped to the band); the sort
// keys count both from the band's first row.
template <int kSpan, bool kBands>
__global__ void __launch_bounds__(KeySpans::kSortThreads)
    sort_key_spans_kd_kernel(SortKeySpansParams p, int64_t span_stride) {
  using SortKey = KdSortKey<kBands>;
  using Key = typename SortKey::Key;
  constexpr int kThreads = KeySpans::kSortThreads;
  constexpr int kPer = kSpan / kThreads;
  constexpr int kNodes = kSpan / KeySpans::kKdLeaf;
  constexpr int kDepth = log2_of(kNodes);
  // Lanes whose entries lie in one kKdLeaf-aligned block, and so in one node.
  constexpr int kGroupLanes = KeySpans::kKdLeaf / kPer < 32 ? KeySpans::kKdLeaf / kPer : 32;
  static_assert(kSpan % kThreads == 0 && KeySpans::kKdLeaf % kPer == 0,
                "whole entries a thread, inside one kKdLeaf block");
  static_assert((kSpan & (kSpan - 1)) == 0, "a bitonic network sorts a power of two");
  static_assert(kSpan <= (1 << SortKey::kPosBits), "the sort key's field holds a position");
  static_assert(!kBands || KeyBands::kMaxRows + 1 < SortKey::kLeafValueMax,
                "the sort key's field holds a row within a band");
  // One raw buffer for every instantiation (an extern array's type must agree across them).
  extern __shared__ __align__(16) unsigned char s_kd_raw[];
  Key* s_exchange = reinterpret_cast<Key*>(s_kd_raw);        // [kSpan]
  int* s_last = reinterpret_cast<int*>(s_exchange + kSpan);  // [kSpan], by position
  int* s_start = s_last + kSpan;  // [kSpan], by position (kBands: first row in the band)
  int* s_key = s_start + kSpan;   // [kSpan], by position (kBands: the key)
  __shared__ int s_lo[2][kNodes], s_hi[2][kNodes];            // extents: position, last row
  __shared__ int s_pieces;                                     // kBands: the span's pieces
  const int t = threadIdx.x;
  const int lane = t % 32;
  const int first = kPer * t;  // the thread's first entry
  const int64_t span_begin = static_cast<int64_t>(blockIdx.x) * kSpan;
  int n = static_cast<int>(min(int64_t{kSpan}, p.seqlen_k - span_begin));
  int64_t band_row0 = 0;
  if constexpr (kBands) {
    int64_t band_begin = 0;
    band_row0 = KeyBands::band_of(span_begin, p.seqlen_q, p.seqlen_k, p.band_rows, band_begin) *
                p.band_rows;
  }
  // An entry's first coordinate: its place in the span (position order), or with bands its
  // first row within the band.
  auto start_of = [&](int pos) { return kBands ? s_start[pos] : pos; };
  // The rows the sort keys count from: the band's first (a piece's rows lie in its band).
  const int row_base = static_cast<int>(band_row0);
  for (int64_t bh = blockIdx.y; bh < p.batch_heads; bh += gridDim.y) {
    __syncthreads();  // the previous (batch, head) is done with the buffers
    int key[kPer], last[kPer];
    if constexpr (kBands) {
      // The band's pieces lead its list: n counts them.
      const int64_t entry0 = bh * span_stride + span_begin + first;
      int pieces = 0;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        key[j] = p.span_sorted_key[entry0 + j];
        last[j] = p.span_last_row[entry0 + j];
        pieces += key[j] >= 0 ? 1 : 0;
      }
      if (t == 0) s_pieces = 0;
      __syncthreads();
      if (pieces > 0) atomicAdd(&s_pieces, pieces);
      __syncthreads();
      n = s_pieces;
      if (n == 0) {  // padding only (written by band_pieces_kernel)
        if (p.slice_min_key && t < kNodes) {
          p.slice_min_key[bh * (span_stride / KeySpans::kKdLeaf) +
                          span_begin / KeySpans::kKdLeaf + t] = INT_MAX;
        }
        continue;
      }
    } else {
      float u[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int i = first + j;
        key[j] = static_cast<int>(span_begin) + min(i, n - 1);
        u[j] = i < n ? p.key_u[bh * p.key_u_stride + key[j]] : -INFINITY;
      }
      last_attending_rows<kPer>(p, p.tau + bh * p.seqlen_q, key, u, last);
    }
    Key v[kPer];  // entry first + j's sort key; its position in the low bits
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      s_last[first + j] = first + j < n ? last[j] : -1;
      if constexpr (kBands) {
        s_key[first + j] = key[j];
        s_start[first + j] = static_cast<int>(
            max(band_row0, max(int64_t{0}, int64_t{key[j]} - (p.seqlen_k - p.seqlen_q))));
      }
      v[j] = static_cast<Key>(first + j);  // position order before the first sort
    }
    for (int depth = 0; depth <= kDepth; ++depth) {
      const int run = kSpan >> depth;  // the nodes at this depth
      if (depth < kDepth && 2 * n <= run) continue;  // node 0 splits into its first half
      __syncthreads();  // s_last written; the previous depth's extents read
      // The thread's entries lie in one node, and the node's entries below n are the real ones.
      const int node = first / run;
      const int real = min(run, n - node * run);
      const bool leaf = real <= KeySpans::kKdLeaf;
      const bool pair = !leaf && real <= 2 * KeySpans::kKdLeaf;
      if (depth < kDepth) {
        if (t < kNodes) {
          s_lo[0][t] = s_lo[1][t] = INT_MAX;
          s_hi[0][t] = s_hi[1][t] = INT_MIN;
        }
        __syncthreads();
        // The thread's, then its lane group's extents, added in by one lane (every entry's
        // atomics on the same four words would serialize).
        int ext[4] = {INT_MAX, INT_MIN, INT_MAX, INT_MIN};  // position lo, hi; row lo, hi
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          if (first + j < n && !leaf && !pair) {
            const int pos = SortKey::pos(v[j]);
            const int row = s_last[pos];
            ext[0] = min(ext[0], start_of(pos));
            ext[1] = max(ext[1], start_of(pos));
            ext[2] = min(ext[2], row);
            ext[3] = max(ext[3], row);
          }
        }
#pragma unroll
        for (int offset = kGroupLanes / 2; offset > 0; offset /= 2) {
          ext[0] = min(ext[0], __shfl_xor_sync(0xffffffffu, ext[0], offset));
          ext[1] = max(ext[1], __shfl_xor_sync(0xffffffffu, ext[1], offset));
          ext[2] = min(ext[2], __shfl_xor_sync(0xffffffffu, ext[2], offset));
          ext[3] = max(ext[3], __shfl_xor_sync(0xffffffffu, ext[3], offset));
        }
        if (lane % kGroupLanes == 0 && ext[0] != INT_MAX) {
          atomicMin(&s_lo[0][node], ext[0]);
          atomicMax(&s_hi[0][node], ext[1]);
          atomicMin(&s_lo[1][node], ext[2]);
          atomicMax(&s_hi[1][node], ext[3]);
        }
        __syncthreads();
      }
      const bool by_position =
          depth < kDepth && !leaf && !pair &&
          s_hi[0][node] - s_lo[0][node] >= s_hi[1][node] - s_lo[1][node];
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int pos = SortKey::pos(v[j]);
        if (first + j >= n) {
          v[j] = SortKey::make(SortKey::kPadding, pos);
        } else {
          const uint32_t row = static_cast<uint32_t>(s_last[pos] + 1 - row_base);  // >= 0
          const uint32_t value = leaf          ? SortKey::kLeafValueMax - row
                                 : by_position ? static_cast<uint32_t>(start_of(pos) - row_base)
                                               : row;
          v[j] = SortKey::make(value, pos);
        }
      }
      // The entries of a node lie in its run (the previous depth's sort made them
      // contiguous), the real ones first.
      bitonic_sort_runs_ascending<kPer, kThreads>(v, s_exchange, run);
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int pos = SortKey::pos(v[j]);
      const int64_t out = bh * span_stride + span_begin + first + j;
      const bool valid = pos < n;
      const int64_t key = kBands ? s_key[pos] : span_begin + pos;
      p.span_sorted_u[out] = valid ? p.key_u[bh * p.key_u_stride + key] : -INFINITY;
      p.span_sorted_key[out] = valid ? static_cast<int32_t>(key) : -1;
      p.span_last_row[out] = valid ? s_last[pos] : -1;
    }
    if (p.slice_min_key) {
      // Each slice's (leaf's) smallest key, for the slice order: the lanes of a leaf reduce
      // theirs, then one lane a group adds it into s_lo[0] (free since the last depth).
      __syncthreads();
      if (t < kNodes) s_lo[0][t] = INT_MAX;
      __syncthreads();
      int min_key = INT_MAX;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int pos = SortKey::pos(v[j]);
        const int key = kBands ? s_key[pos] : static_cast<int>(span_begin) + pos;
        if (pos < n) min_key = min(min_key, key);
      }
#pragma unroll
      for (int offset = kGroupLanes / 2; offset > 0; offset /= 2) {
        min_key = min(min_key, __shfl_xor_sync(0xffffffffu, min_key, offset));
      }
      if (lane % kGroupLanes == 0 && min_key != INT_MAX) {
        atomicMin(&s_lo[0][first / KeySpans::kKdLeaf], min_key);
      }
      __syncthreads();
      if (t < kNodes) {
        p.slice_min_key[bh * (span_stride / KeySpans::kKdLeaf) +
                        span_begin / KeySpans::kKdLeaf + t] = s_lo[0][t];
      }
    }
  }
}

// The dk/dv kernel's row tile (kBlockM): the slice order and the CTA list count in it.
constexpr int kRowTile = 64;

// The rows a slice of (batch, kv head) bh visits in the dk/dv kernel: from the first row that
// reaches its smallest key (the kd sort's slice_min_key; max(0, key - (S - T)); with row
// bands no earlier than its band's first row) to its first entry's last row; visits: whether
// that holds a row.
struct SliceRows {
  int64_t first;
  int64_t last;
  bool visits;
};
__device__ __forceinline__ SliceRows slice_rows(const SortKeySpansParams& p,
                                                int64_t span_stride, int64_t bh, int slice) {
  constexpr int kLeaf = KeySpans::kKdLeaf;
  const int min_key = p.slice_min_key[bh * (span_stride / kLeaf) + slice];
  SliceRows rows;
  rows.first = max(int64_t{0}, int64_t{min_key} - (p.seqlen_k - p.seqlen_q));
  if (p.band_rows > 0) {
    int64_t band_begin = 0;
    rows.first = max(rows.first, KeyBands::band_of(int64_t{slice} * kLeaf, p.seqlen_q,
                                                   p.seqlen_k, p.band_rows, band_begin) *
                                     p.band_rows);
  }
  rows.last = p.span_last_row[bh * span_stride + int64_t{slice} * kLeaf];
  rows.visits = min_key != INT_MAX && rows.last >= rows.first;
  return rows;
}

// The slice order (sort_key_spans.h): one block a (batch, kv head). Each thread takes a slice
// at a time: its rows (slice_rows: two loads, where reducing a slice's 128 keys took a warp
// 3 dependent loads a slice, 330 us at 32k for 2304 slices a head) give its first and last
// 64-row tiles; then one bitonic sort of the keys (first tile | last tile, descending |
// slice; 20 bits each, tiles clamped) in shared memory. Slices that visit no row (padding, or
// keys no row attends) go last. by_start false (last-row order): the identity.
struct SliceOrderKey {
  static constexpr int kBits = 20;
  static constexpr uint64_t kFieldMax = (uint64_t{1} << kBits) - 1;
  static __device__ __forceinline__ uint64_t field(int64_t x) {
    return static_cast<uint64_t>(min(max(x, int64_t{0}), static_cast<int64_t>(kFieldMax - 1)));
  }
};

__global__ void __launch_bounds__(KeySpans::kSortThreads)
    order_slices_kernel(SortKeySpansParams p, int64_t span_stride, int slices, int run,
                        bool by_start) {
  extern __shared__ uint64_t s_order[];  // [run], a power of two >= slices (by_start only)
  const int64_t slices_stride = span_stride / KeySpans::kKdLeaf;
  for (int64_t bh = blockIdx.x; bh < p.batch_heads; bh += gridDim.x) {
    if (!by_start) {
      for (int rank = threadIdx.x; rank < slices; rank += blockDim.x) {
        p.slice_order[bh * slices_stride + rank] = rank;
      }
      if (p.visiting_slices && threadIdx.x == 0) p.visiting_slices[bh] = slices;
      continue;
    }
    __syncthreads();  // the previous (batch, head) is done with s_order
    for (int slice = threadIdx.x; slice < run; slice += blockDim.x) {
      uint64_t key = ~uint64_t{0};  // past the slices: last
      if (slice < slices) {
        const SliceRows rows = slice_rows(p, span_stride, bh, slice);
        const uint64_t first_field = rows.visits ? SliceOrderKey::field(rows.first / kRowTile)
                                                 : SliceOrderKey::kFieldMax;
        const uint64_t last_field =
            rows.visits ? SliceOrderKey::kFieldMax - 1 - SliceOrderKey::field(rows.last / kRowTile)
                        : 0;
        key = (first_field << (2 * SliceOrderKey::kBits)) |
              (last_field << SliceOrderKey::kBits) | static_cast<uint64_t>(slice);
      }
      s_order[slice] = key;
    }
    block_sort<KeySpans::kSortThreads>(s_order, run,
                                       [](uint64_t a, uint64_t b) { return a < b; });
    int visiting = 0;  // the slices that visit rows lead the order
    for (int rank0 = 0; rank0 < slices; rank0 += blockDim.x) {
      const int rank = rank0 + static_cast<int>(threadIdx.x);
      const bool visits = rank < slices && (s_order[rank] >> (2 * SliceOrderKey::kBits)) !=
                                               SliceOrderKey::kFieldMax;
      visiting += __syncthreads_count(visits);
      if (rank < slices) {
        p.slice_order[bh * slices_stride + rank] =
            static_cast<int32_t>(s_order[rank] & SliceOrderKey::kFieldMax);
      }
    }
    if (p.visiting_slices && threadIdx.x == 0) p.visiting_slices[bh] = visiting;
  }
}

// The row bands' CTA list (BandCtas, sort_key_spans.h), one block: band_ctas[0] the count,
// then every (batch, kv head)'s visiting ranks of the slice order, head by head (a chunk of
// kSortThreads heads' counts scanned at a time; each entry finds its head by a binary search
// of the chunk's offsets); then the last `tail` entries re-sorted by row tiles descending,
// ties in list order (a bitonic sort of `run` >= tail keys in shared memory). An entry is
// also its slice's place in the slice order (bh * slices_stride + rank).
__global__ void __launch_bounds__(KeySpans::kSortThreads)
    order_band_ctas_kernel(SortKeySpansParams p, int64_t span_stride, int slices, int tail,
                           int run) {
  constexpr int kThreads = KeySpans::kSortThreads;
  extern __shared__ uint64_t s_tail[];  // [run] sort keys, then [run] entries
  int32_t* s_entry = reinterpret_cast<int32_t*>(s_tail + run);
  __shared__ int s_scan[kThreads / 32];
  __shared__ int s_begin[kThreads + 1];  // the chunk's heads' first entries, then its end
  const int64_t slices_stride = span_stride / KeySpans::kKdLeaf;
  int32_t* list = p.band_ctas + 1;
  int written = 0;  // entries of the chunks before
  for (int64_t bh0 = 0; bh0 < p.batch_heads; bh0 += kThreads) {
    const int64_t bh = bh0 + threadIdx.x;
    const int count = bh < p.batch_heads ? min(p.visiting_slices[bh], slices) : 0;
    int total = 0;
    const int before = block_exclusive_scan<kThreads>(count, total, s_scan);
    s_begin[threadIdx.x] = written + before;
    if (threadIdx.x == 0) s_begin[kThreads] = written + total;
    __syncthreads();
    for (int i = written + static_cast<int>(threadIdx.x); i < written + total; i += kThreads) {
      int lo = 0, hi = kThreads;  // the last head whose first entry is at or before i
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (s_begin[mid] <= i) lo = mid; else hi = mid;
      }
      list[i] = static_cast<int32_t>((bh0 + lo) * slices_stride + (i - s_begin[lo]));
    }
    written += total;
    __syncthreads();  // s_begin is rewritten by the next chunk
  }
  if (threadIdx.x == 0) p.band_ctas[0] = written;
  const int n = min(tail, written);
  if (n <= 1) return;
  const int first = written - n;
  __syncthreads();  // the list's entries, written by other threads, are visible to the block
  for (int j = threadIdx.x; j < run; j += kThreads) {
    uint64_t key = ~uint64_t{0};  // past the tail: last
    int32_t entry = -1;
    if (j < n) {
      entry = list[first + j];  // also the entry's place in the slice order
      const SliceRows rows =
          slice_rows(p, span_stride, entry / slices_stride, p.slice_order[entry]);
      const int64_t tiles = rows.visits ? rows.last / kRowTile - rows.first / kRowTile + 1 : 0;
      key = (static_cast<uint64_t>(int64_t{0x7fffffff} - tiles) << 32) |
            static_cast<uint64_t>(j);
    }
    s_tail[j] = key;
    s_entry[j] = entry;
  }
  block_sort<kThreads>(s_tail, run, [](uint64_t a, uint64_t b) { return a < b; });
  for (int j = threadIdx.x; j < n; j += kThreads) {
    list[first + j] = s_entry[s_tail[j] & 0xffffffffu];
  }
}

// Launches kernel<kSpan> with `smem` bytes of dynamic shared memory (over 48 KB: opted in).
template <typename Kernel>
std::string launch_span_sort(Kernel kernel, size_t smem, dim3 grid, const SortKeySpansParams& p,
                             int64_t stride, cudaStream_t stream) {
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, KeySpans::kSortThreads, smem, stream>>>(p, stride);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

template <int kSpan>
std::string launch_span_sort_of_width(const SortKeySpansParams& p, dim3 grid, int64_t stride,
                                      cudaStream_t stream) {
  if (p.order == KeyOrder::kKd) {
    return launch_span_sort(sort_key_spans_kd_kernel<kSpan, false>,
                            kd_sort_smem_bytes<kSpan, false>(), grid, p, stride, stream);
  }
  return launch_span_sort(sort_key_spans_kernel<kSpan>, kSpan * sizeof(SpanEntry), grid, p,
                          stride, stream);
}

// Row bands: each key's last row, the bands' piece lists, then the kd sort of every
// KeyBands::kSpan entries of them in place.
std::string launch_band_sort(const SortKeySpansParams& p, cudaStream_t stream) {
  const unsigned heads = static_cast<unsigned>(std::min<int64_t>(p.batch_heads, 65535));
  key_last_rows_kernel<<<dim3(static_cast<unsigned>((p.seqlen_k + KeySpans::kSortThreads - 1) /
                                                    KeySpans::kSortThreads),
                              heads),
                         KeySpans::kSortThreads, 0, stream>>>(p);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  band_pieces_kernel<<<dim3(static_cast<unsigned>(KeyBands::count(p.seqlen_q, p.band_rows)),
                            heads),
                       KeySpans::kSortThreads, 0, stream>>>(p);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  constexpr int kSpan = KeyBands::kSpan;
  const dim3 grid(
      static_cast<unsigned>(KeyBands::stride(p.seqlen_q, p.seqlen_k, p.band_rows) / kSpan),
      heads);
  return launch_span_sort(sort_key_spans_kd_kernel<kSpan, true>,
                          kd_sort_smem_bytes<kSpan, true>(), grid, p, p.stride, stream);
}

std::string check_params(const SortKeySpansParams& p) {
  if (!p.key_u || !p.tau || !p.span_sorted_u || !p.span_sorted_key || !p.span_last_row) {
    return "a key_u, tau, span_sorted_u, span_sorted_key or span_last_row pointer is null";
  }
  if (p.batch_heads <= 0 || p.seqlen_k <= 0 || p.seqlen_q <= 0) {
    return "batch_heads, seqlen_q and seqlen_k must be positive";
  }
  if (p.window < 0) return "window must be >= 0";
  if (!valid_key_span_width(p.key_span)) return "key_span must be 1024, 2048, 4096 or 8192";
  if (p.order != KeyOrder::kKd && p.order != KeyOrder::kLastRow && p.order != KeyOrder::kBands) {
    return "order must be KeyOrder::kKd, kLastRow or kBands";
  }
  if (p.key_u_stride < p.seqlen_k) return "key_u_stride must be at least seqlen_k";
  if (p.seqlen_k > (int64_t{1} << 30) || p.seqlen_q > (int64_t{1} << 30)) {
    return "seqlen_q and seqlen_k must be below 2^30";
  }
  if (p.stride < key_span_stride(p.seqlen_k)) {
    return "stride must be at least key_span_stride(seqlen_k) (KeySpanLayout)";
  }
  if (p.slice_order && p.order != KeyOrder::kLastRow && !p.slice_min_key) {
    return "the slice order of the kd orders needs the slice_min_key buffer";
  }
  if (p.band_ctas) {
    if (!BandCtas::fits(p.batch_heads, p.stride)) {
      return "the row bands' CTA list needs batch_heads * stride / 128 below 2^31";
    }
    if (p.tail_ctas > BandCtas::kMaxTail) {
      return "tail_ctas must be at most " + std::to_string(BandCtas::kMaxTail);
    }
  }
  if (p.order == KeyOrder::kBands) {
    if (!KeyBands::valid_rows(p.band_rows, p.seqlen_q)) {
      return "band_rows must be a power of two in [1024, 32768], at least half of "
             "KeyBands::rows(seqlen_q) = " + std::to_string(KeyBands::rows(p.seqlen_q)) +
             ", in at most 32 bands; got " + std::to_string(p.band_rows);
    }
    if (!p.key_last_row) return "row bands need the key_last_row buffer";
    if (p.stride < KeyBands::stride(p.seqlen_q, p.seqlen_k, p.band_rows)) {
      return "stride is smaller than the row bands' (KeySpanLayout)";
    }
  }
  return {};
}

}  // namespace

int sparsek_slice_order() { return requested_slice_order(); }

int sparsek_key_order(bool dq_fused, int64_t seqlen_q) {
  const int requested = requested_key_order();
  if (requested < 0) return requested;
  const int bands = static_cast<int>(KeyOrder::kBands);
  if (requested == 0 || requested == bands) {
    // Bands need the dk/dv kernel that adds dq (its atomics), and a T that the default height
    // cuts into at most kMaxBands bands; otherwise kd.
    const bool fits = KeyBands::valid_rows(KeyBands::rows(seqlen_q), seqlen_q);
    return dq_fused && fits ? bands : static_cast<int>(KeyOrder::kKd);
  }
  return requested;
}

int sparsek_key_band_rows(int64_t seqlen_q) {
  const int requested = requested_key_band_rows();
  if (requested < 0) return requested;
  if (requested == 0) {  // the default height, where T fits in kMaxBands bands of it
    const int rows = KeyBands::rows(seqlen_q);
    return KeyBands::valid_rows(rows, seqlen_q) ? rows : 0;
  }
  return KeyBands::valid_rows(requested, seqlen_q) ? requested : -1;
}

int sparsek_key_span_width(int64_t seqlen_k, int key_order) {
  const int requested = requested_key_span();  // a bad value is an error in every order
  if (requested < 0) return requested;
  if (key_order == static_cast<int>(KeyOrder::kBands)) return KeyBands::kSpan;
  if (requested != 0) return requested;
  return key_order == static_cast<int>(KeyOrder::kLastRow) ? key_span_width(seqlen_k)
                                                           : kd_key_span_width(seqlen_k);
}

int64_t sparsek_key_span_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                         int64_t heads_kv) {
  return KeySpanLayout::make(batch * heads_kv, seqlen_q, seqlen_k).workspace_bytes;
}

std::string sparsek_sort_key_spans(const SortKeySpansParams& p, void* stream_ptr) {
  if (std::string error = check_params(p); !error.empty()) return error;
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(p.device); !error.empty()) return error;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t stride = p.stride;
  if (poison_outputs_requested()) {
    const size_t bytes = static_cast<size_t>(p.batch_heads * stride) * 4;
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.span_sorted_u, 0xFF, bytes, stream));
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.span_sorted_key, 0xFF, bytes, stream));
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.span_last_row, 0xFF, bytes, stream));
    if (p.slice_order) {
      SPARSEK_RETURN_IF_CUDA_ERROR(
          cudaMemsetAsync(p.slice_order, 0xFF, bytes / KeySpans::kKdLeaf, stream));
    }
    if (p.slice_min_key) {
      SPARSEK_RETURN_IF_CUDA_ERROR(
          cudaMemsetAsync(p.slice_min_key, 0xFF, bytes / KeySpans::kKdLeaf, stream));
    }
    if (p.band_ctas) {
      SPARSEK_RETURN_IF_CUDA_ERROR(
          cudaMemsetAsync(p.band_ctas, 0xFF, bytes / KeySpans::kKdLeaf + 4, stream));
    }
  }
  const dim3 grid(static_cast<unsigned>(key_span_count(p.seqlen_k, p.key_span)),
                  static_cast<unsigned>(std::min<int64_t>(p.batch_heads, 65535)));
  std::string error;
  if (p.order == KeyOrder::kBands) {
    error = launch_band_sort(p, stream);
  } else {
    switch (p.key_span) {
      case 1024:
        error = launch_span_sort_of_width<1024>(p, grid, stride, stream);
        break;
      case 2048:
        error = launch_span_sort_of_width<2048>(p, grid, stride, stream);
        break;
      case 4096:
        error = launch_span_sort_of_width<4096>(p, grid, stride, stream);
        break;
      default:
        error = launch_span_sort_of_width<8192>(p, grid, stride, stream);
        break;
    }
  }
  if (!error.empty() || !p.slice_order) return error;
  const int64_t used = p.order == KeyOrder::kBands
                           ? KeyBands::stride(p.seqlen_q, p.seqlen_k, p.band_rows)
                           : key_span_count(p.seqlen_k, p.key_span) * p.key_span;
  const int slices = static_cast<int>(used / KeySpans::kKdLeaf);
  const bool by_start = p.order != KeyOrder::kLastRow && slices <= KeySpans::kMaxOrderedSlices;
  int run = 0;  // the identity sorts nothing
  if (by_start) {
    for (run = 1; run < slices; run <<= 1) {
    }
  }
  const size_t smem = static_cast<size_t>(run) * sizeof(uint64_t);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(
      order_slices_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  order_slices_kernel<<<static_cast<unsigned>(std::min<int64_t>(p.batch_heads, 65535)),
                        KeySpans::kSortThreads, smem, stream>>>(p, stride, slices, run,
                                                                by_start);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  if (p.order != KeyOrder::kBands || !p.band_ctas || !p.visiting_slices) return {};
  // The row bands' CTA list: its last `tail` entries longest first.
  int tail = p.tail_ctas;
  if (tail < 0) {
    int sms = 0;  // of the params' device, current here
    SPARSEK_RETURN_IF_CUDA_ERROR(CtaOrder::sm_count(&sms));
    tail = BandCtas::tail(sms);
  }
  int tail_run = 1;
  while (tail_run < tail) tail_run <<= 1;
  order_band_ctas_kernel<<<1, KeySpans::kSortThreads,
                           static_cast<size_t>(tail_run) * (sizeof(uint64_t) + sizeof(int32_t)),
                           stream>>>(p, stride, slices, tail, tail_run);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace sparsek
