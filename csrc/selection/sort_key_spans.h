// A backward-only ordering of the keys: the scores sorted within spans of kKeySpan key
// positions (descending, ties by key position), with each entry's key position.
//
// Why: the dk/dv kernel (attention/bwd_query_visit.cuh) gives a CTA kBlockN consecutive
// entries of a sorted run of keys and visits every row up to the last one whose tau is below
// the entries' top score. In the selection's 128-key chunks the top entries of a chunk score
// far above its other entries, so the top slice of every chunk visits nearly every later row.
// Sorted over wider spans, the entries of one slice score close together and its rows shrink
// to about the rows that select its keys; the price is that a slice's keys spread over the
// whole span, so its rows start at the span's first keys. bench/sparsek_bwd_visit_model.py
// counts both effects: at K = 2048, W = 512, kBlockN = 64, spans of 1024 keys visit 0.48-0.62x the
// (key, row) pairs of 128-key chunks at 32k and 0.19-0.23x at 128k (1.3-2.0x the attended
// pairs), and stay within 5% of them at 8k; wider spans lose more at their start than they
// gain. The forward keeps the selection's chunks and plan (selection_params.h).
//
// Layout: [batch_heads, key_span_count(S) * kKeySpan]; entries past S hold u = -inf, key = -1.
// Memory: O(S) per (batch, kv head), no T-dependence.
#pragma once

#include <cstdint>

#include "runtime/workspace_align.h"

namespace sparsek {

struct KeySpans {
  static constexpr int kKeySpan = 1024;  // key positions per sorted span
  static constexpr int kSortThreads = kKeySpan;  // one thread per entry (bitonic network)
};

inline int64_t key_span_count(int64_t seqlen_k) {
  return (seqlen_k + KeySpans::kKeySpan - 1) / KeySpans::kKeySpan;
}

struct SortKeySpansParams {
  // Scores in key order, -inf where NaN or -inf (the selection workspace's key_u):
  // [batch_heads, key_u_stride], read for positions below seqlen_k only.
  const float* key_u = nullptr;
  int64_t key_u_stride = 0;
  int64_t batch_heads = 0;  // B * Hkv
  int64_t seqlen_k = 0;
  // Results, [batch_heads, key_span_count(seqlen_k) * kKeySpan] each.
  float* span_sorted_u = nullptr;
  int32_t* span_sorted_key = nullptr;
  int32_t device = -1;
};

// Where the two result arrays sit in a workspace of the sort's own (the launcher,
// sparsek_sort_key_spans, and sparsek_key_span_workspace_bytes are in sparsek_api.h).
struct KeySpanLayout {
  int64_t spans = 0;                     // key_span_count(seqlen_k)
  int64_t span_sorted_u_offset = 0;      // bytes, multiples of 256
  int64_t span_sorted_key_offset = 0;
  int64_t workspace_bytes = 0;

  int64_t padded_keys() const { return spans * KeySpans::kKeySpan; }

  static KeySpanLayout make(int64_t batch_heads, int64_t seqlen_k) {
    KeySpanLayout l;
    l.spans = key_span_count(seqlen_k);
    const int64_t entries = batch_heads * l.padded_keys();
    l.span_sorted_u_offset = 0;
    l.span_sorted_key_offset = align256(entries * 4);
    l.workspace_bytes = l.span_sorted_key_offset + align256(entries * 4);
    return l;
  }
};

}  // namespace sparsek
