// A backward-only ordering of the keys: within spans of key_span_width(S) key positions, the
// keys in kd order (KeyOrder::kKd, the default) or sorted by the last row that attends them
// (KeyOrder::kLastRow: descending, then by position), with each entry's score, position and
// last row.
//
// A key's last row is the later of the last row whose window band holds it (p(i) < j + W)
// and the last row whose tau lies below its score (tau never decreases down the rows): no
// row past it gives the key a gate above 0.
//
// Why: the dk/dv kernel (attention/bwd_query_visit.cuh) gives a CTA kBlockN consecutive
// entries of a sorted span and visits the rows from the first that reaches the entries'
// smallest position to the entries' latest last row (the first entry's). In the selection's
// 128-key chunks the top entries of a chunk score far above its other entries, so the top
// slice of every chunk visits nearly every later row. Sorted over wider spans, the entries of
// one slice end close together and its rows shrink to about the rows that attend its keys;
// the price is that a slice's keys spread over the whole span, so its rows start at the
// span's first keys. bench/sparsek_bwd_visit_model.py counts both effects (K = 2048,
// W = 512, kBlockN = kBlockM = 64): sorted by last row, 1024-key spans visit 1.15-1.28x the
// attended (key, row) pairs at 8k-32k but 1.35x / 1.73x at 128k (sigma 1 / 4), where
// 4096-key spans visit 1.21x / 1.33x; the best width grows with S (about S / 32: 2048 at
// 64k). key_span_width takes 1024 keys up to 48k, 2048 up to 96k, 4096 past that. The
// forward keeps the selection's chunks and plan (selection_params.h).
//
// kd order: sorting a span by last row keeps a slice's ends close but spreads its starts over
// the span. The kd order splits the span recursively into halves of whole slices
// (kKdLeaf entries), each node by the coordinate (position, or last row) of the larger extent,
// ascending; the leaves (the slices) are sorted by last row, descending, so that a slice's
// first entry still holds its latest last row. A slice's keys then lie close in both.
// bench/sparsek_bwd_visit_model.py (kd_order, the specification; kBlockN = 128, kBlockM = 64):
// 1.237 / 1.334x the attended pairs at 32k sigma 1 / 4 with 4096-key spans (last-row order
// at 1024: 1.37 / 1.41), 1.254 / 1.404x at 128k with 8192 (last-row at 4096: 1.35 / 1.50).
// kd_key_span_width takes 4096 keys up to 48k, 8192 past that. A node of two slices (a
// cluster pair of the dk/dv grid, in a whole span) splits by last row whatever the extents,
// so that both slices start on the same rows and walk them in step.
//
// The slice order (slice_order, kd only): the dk/dv grid's CTA ranks mapped to the kv head's
// kKdLeaf-entry slices sorted by their first 64-row tile (then last tile descending, then
// slice), so that the CTAs running together read the same Q, dO and dq tiles in L2: the
// kd slices of a span start on rows all over the span, where the last-row order's start at
// its first keys. bench/sparsek_bwd_l2_model.py (both changes): 21-26% fewer L2 misses than
// kd alone at 32k sigma 1. Last-row order: the identity.
//
// Layout: [batch_heads, key_span_stride(S)] with key_span_stride(S) = S rounded up to the
// widest span, whatever the width (so that the workspace does not depend on it); the first
// key_span_count(S, width) * width entries of a row are used, and those past S hold
// u = -inf, key = -1, last row -1. Memory: O(S) per (batch, kv head), no T-dependence.
#pragma once

#include <cstdint>

#include "runtime/workspace_align.h"

namespace sparsek {

struct KeySpans {
  static constexpr int kMinKeySpan = 1024;  // key positions per sorted span: 1024 to 8192
  static constexpr int kMaxKeySpan = 8192;
  static constexpr int kKdLeaf = 128;  // the fused dk/dv kernel's slice (kBlockN)
  static constexpr int kSortThreads = 1024;  // a bitonic network, kSpan / 1024 entries a thread
  // The slice order sorts up to this many slices a (batch, kv head) (S <= 2M keys; one
  // block's shared memory); past it the slices keep the identity order.
  static constexpr int kMaxOrderedSlices = 16384;
};

enum class KeyOrder { kLastRow = 1, kKd = 2 };

// The span width for S keys in last-row order (about S / 32, within 1024..4096).
inline int key_span_width(int64_t seqlen_k) {
  return seqlen_k <= 49152 ? 1024 : (seqlen_k <= 98304 ? 2048 : 4096);
}

// The span width for S keys in kd order.
inline int kd_key_span_width(int64_t seqlen_k) { return seqlen_k <= 49152 ? 4096 : 8192; }

inline bool valid_key_span_width(int64_t width) {
  return width == 1024 || width == 2048 || width == 4096 || width == 8192;
}

inline int64_t key_span_count(int64_t seqlen_k, int64_t width) {
  return (seqlen_k + width - 1) / width;
}

// Entries between two (batch, kv head) rows of the sort's results, for every width.
inline int64_t key_span_stride(int64_t seqlen_k) {
  return key_span_count(seqlen_k, KeySpans::kMaxKeySpan) * KeySpans::kMaxKeySpan;
}

struct SortKeySpansParams {
  // Scores in key order, -inf where NaN or -inf (the selection workspace's key_u):
  // [batch_heads, key_u_stride], read for positions below seqlen_k only.
  const float* key_u = nullptr;
  int64_t key_u_stride = 0;
  int64_t batch_heads = 0;  // B * Hkv
  int64_t seqlen_k = 0;
  // The selection's thresholds for the same scores, topk and window (sparsek_select):
  // [batch_heads, seqlen_q], non-decreasing along each row.
  const float* tau = nullptr;
  int64_t seqlen_q = 0;
  int64_t window = 0;  // W >= 0
  int32_t key_span = 0;  // the span width (valid_key_span_width; sparsek_key_span_width)
  KeyOrder order = KeyOrder::kKd;
  // Results, [batch_heads, key_span_stride(seqlen_k)] each.
  float* span_sorted_u = nullptr;
  int32_t* span_sorted_key = nullptr;
  int32_t* span_last_row = nullptr;
  // CTA rank -> slice, [batch_heads, key_span_stride(seqlen_k) / kKdLeaf] (the slice order
  // above; the first key_span_count(S, key_span) * key_span / kKdLeaf of a row); not written
  // where null.
  int32_t* slice_order = nullptr;
  int32_t device = -1;
};

// Where the result arrays (and the slice order) sit in a workspace of the sort's own (the launcher,
// sparsek_sort_key_spans, and sparsek_key_span_workspace_bytes are in sparsek_api.h).
struct KeySpanLayout {
  int64_t stride = 0;                    // key_span_stride(seqlen_k)
  int64_t span_sorted_u_offset = 0;      // bytes, multiples of 256
  int64_t span_sorted_key_offset = 0;
  int64_t span_last_row_offset = 0;
  int64_t slice_order_offset = 0;
  int64_t workspace_bytes = 0;

  static KeySpanLayout make(int64_t batch_heads, int64_t seqlen_k) {
    KeySpanLayout l;
    l.stride = key_span_stride(seqlen_k);
    const int64_t entries = batch_heads * l.stride;
    l.span_sorted_u_offset = 0;
    l.span_sorted_key_offset = align256(entries * 4);
    l.span_last_row_offset = l.span_sorted_key_offset + align256(entries * 4);
    l.slice_order_offset = l.span_last_row_offset + align256(entries * 4);
    l.workspace_bytes = l.slice_order_offset + align256(entries / KeySpans::kKdLeaf * 4);
    return l;
  }
};

}  // namespace sparsek
