// A backward-only ordering of the keys: within spans of key_span_width(S) key positions, the
// keys in kd order (KeyOrder::kKd) or sorted by the last row that attends them
// (KeyOrder::kLastRow: descending, then by position), with each entry's score, position and
// last row; or the pieces of the keys in row bands (KeyOrder::kBands, the default, below).
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
// the span. The kd order splits the span recursively into halves (each node an aligned run
// of the whole span's places, cut at its keys; the leaves kKdLeaf entries), each node by the
// coordinate (position, or last row) of the larger extent, ascending; the leaves (the slices)
// are sorted by last row, descending, so that a slice's first entry still holds its latest
// last row. A slice's keys then lie close in both.
// bench/sparsek_bwd_visit_model.py (kd_order, the specification; kBlockN = 128, kBlockM = 64):
// 1.237 / 1.334x the attended pairs at 32k sigma 1 / 4 with 4096-key spans (last-row order
// at 1024: 1.37 / 1.41), 1.254 / 1.404x at 128k with 8192 (last-row at 4096: 1.35 / 1.50).
// kd_key_span_width takes 4096 keys up to 48k, 8192 past that. A node of two slices (a
// cluster pair of the dk/dv grid) splits by last row whatever the extents,
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
// u = -inf, key = -1, last row -1.
//
// Row bands (KeyOrder::kBands, the default where the dk/dv kernel adds dq): the rows are cut
// into bands of KeyBands::rows(T) (a power of two, at least 2048, about T / 16), and each
// key's rows [its first row, its last row] into one piece a band they meet. A band's pieces
// (every key that some row of the band attends: the band's own keys and the keys carried in
// from earlier bands) are listed in position order, then kd-ordered in spans of
// KeyBands::kSpan entries over (first row in the band, last row in the band); each
// kKdLeaf-entry slice visits only its band's rows. Why: a kd slice of the whole sequence
// must hold 128 keys whose (first row, last row) points spread in both coordinates, so its
// rows run from the earliest start to the latest end; cut at band edges, the keys carried
// through a band share both ends (the band's), and only the keys that start or end inside it
// spread. bench/sparsek_bwd_visit_model.py (--bands): 1.08x the attended pairs at 32k sigma
// 1 with 2048-row bands (kd: 1.24x), 1.12x at 128k with 8192 (kd: 1.31x). Measured
// (bench/NOTES.md, eighteenth session): the SparseK backward -15% at 32k, -19 to -23% at
// 128k; 1024-row bands at 32k +6-7% (more CTAs, each with its fixed costs), 4096 within 1%.
// The price: a key reached by several bands is in several CTAs, so dk, dv and du are added
// (float32 atomics into the backward's workspace, then converted), and the layout holds each
// band's capacity (every key up to its last row's position, rounded up to kSpan entries:
// about S (C + 1) / 2 entries for C bands), of which the dk/dv grid's CTAs past a band's
// pieces leave at once (the slice order counts those that visit rows).
//
// The bands' CTA list (band_ctas): the dk/dv grid's CTAs in one list over every (batch, kv
// head): the slices that visit rows, head by head in the slice order; the grid's CTAs past
// them leave at once. Why: a head-major grid of each band's capacity launches about two empty
// CTAs a visiting one (2304 ranks a kv head for 762 visiting slices at 32k sigma 1), each a
// launch and a load, between the heads' work; listed last, they run in the tail, where SMs
// wait anyway. And the last BandCtas::tail(SMs) entries (four waves) go longest first (row
// tiles descending, then list order): a head's slices run from a band's full rows to a few
// tiles, and a head-major grid ends on whatever its last head's last band holds.
// bench/cta_order_model.py --bands (list scheduling on 132 SMs; a CTA's fixed costs 2 steps,
// an empty CTA 0.3), makespan over the visiting work: 1.020 / 1.029 head-major at 32k sigma
// 1 / 4, 1.082 / 1.104 at 8k, 1.014 / 1.025 at 128k; the list 1.006 / 1.010, 1.006 / 1.014,
// 1.006 / 1.009 (the whole list longest first gains at most 0.3% more, but the CTAs in flight
// would then mix every head's rows in L2; tile-major, which mixes them too, 1.011 / 1.011).
//
// Memory: O(S) per (batch, kv head) in the span orders; O(S C) with bands (C <= 32).
#pragma once

#include <cstdint>

#include "runtime/workspace_align.h"
#include "selection/selection_params.h"  // SPARSEK_HOST_DEVICE

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

enum class KeyOrder { kLastRow = 1, kKd = 2, kBands = 3 };

// The row bands of KeyOrder::kBands. Band b holds rows [b rows, min(T, (b + 1) rows)); its
// pieces are listed at offset(b) of a (batch, kv head) row of the sort's results, in
// capacity(b) entries: every key position that a row of the band can reach (p(i) = i + S - T),
// rounded up to kSpan. Host and device code (the dk/dv visit finds its band by the offsets).
struct KeyBands {
  static constexpr int kSpan = 4096;      // entries a kd span of a band's pieces
  static constexpr int kMinRows = 1024;   // the least band height JAX_SPARSEK_KEY_BAND_ROWS takes
  static constexpr int kMaxRows = 32768;
  static constexpr int kMaxBands = 32;

  // The default band height for T rows: a power of two, at least 2048, about T / 16.
  static inline int rows(int64_t seqlen_q) {
    int r = 2048;
    while (r < kMaxRows && int64_t{r} * 16 < seqlen_q) r *= 2;
    return r;
  }
  // Whether a band height (the default's or JAX_SPARSEK_KEY_BAND_ROWS) is allowed for T rows:
  // a power of two in [kMinRows, kMaxRows], at least half the default (the workspace holds
  // that many bands' capacity).
  static inline bool valid_rows(int64_t band_rows, int64_t seqlen_q) {
    if (band_rows < kMinRows || band_rows > kMaxRows || (band_rows & (band_rows - 1)) != 0) {
      return false;
    }
    return 2 * band_rows >= rows(seqlen_q) && count(seqlen_q, band_rows) <= kMaxBands;
  }
  SPARSEK_HOST_DEVICE static inline int64_t count(int64_t seqlen_q, int64_t band_rows) {
    return (seqlen_q + band_rows - 1) / band_rows;
  }
  SPARSEK_HOST_DEVICE static inline int64_t capacity(int64_t band, int64_t seqlen_q,
                                                     int64_t seqlen_k, int64_t band_rows) {
    const int64_t last_row = (band + 1) * band_rows < seqlen_q ? (band + 1) * band_rows - 1
                                                               : seqlen_q - 1;
    const int64_t keys = last_row + (seqlen_k - seqlen_q) + 1 < seqlen_k
                             ? last_row + (seqlen_k - seqlen_q) + 1
                             : seqlen_k;
    return (keys + kSpan - 1) / kSpan * kSpan;
  }
  // Band `band`'s first entry in a (batch, kv head) row of the results (the capacities of the
  // bands before it).
  SPARSEK_HOST_DEVICE static inline int64_t offset(int64_t band, int64_t seqlen_q,
                                                   int64_t seqlen_k, int64_t band_rows) {
    int64_t total = 0;
    for (int64_t b = 0; b < band; ++b) total += capacity(b, seqlen_q, seqlen_k, band_rows);
    return total;
  }
  // Entries of all bands (a (batch, kv head) row of the results).
  SPARSEK_HOST_DEVICE static inline int64_t stride(int64_t seqlen_q, int64_t seqlen_k,
                                                   int64_t band_rows) {
    return offset(count(seqlen_q, band_rows), seqlen_q, seqlen_k, band_rows);
  }
  // The band of entry `entry` of a row (below stride), and its first entry.
  SPARSEK_HOST_DEVICE static inline int64_t band_of(int64_t entry, int64_t seqlen_q,
                                                    int64_t seqlen_k, int64_t band_rows,
                                                    int64_t& band_begin) {
    band_begin = 0;
    int64_t b = 0;
    for (;; ++b) {
      const int64_t cap = capacity(b, seqlen_q, seqlen_k, band_rows);
      if (entry < band_begin + cap || b + 1 >= count(seqlen_q, band_rows)) break;
      band_begin += cap;
    }
    return b;
  }
  // The widest row any allowed band height needs (the workspace's): half the default height.
  static inline int64_t max_stride(int64_t seqlen_q, int64_t seqlen_k) {
    const int64_t least = rows(seqlen_q) / 2 < kMinRows ? kMinRows : rows(seqlen_q) / 2;
    int64_t widest = 0;
    for (int64_t r = least; r <= kMaxRows; r *= 2) {
      if (count(seqlen_q, r) > kMaxBands) continue;
      const int64_t s = stride(seqlen_q, seqlen_k, r);
      widest = s > widest ? s : widest;
    }
    return widest;
  }
};

// The row bands' CTA list (band_ctas above): its length, then an entry a visiting slice,
// bh * (stride / kKdLeaf) + rank for the slice at `rank` of the slice order of (batch, kv
// head) bh; the dk/dv grid's CTAs at or past the length leave at once. The list and its
// entries stay below 2^31 (fits).
struct BandCtas {
  static constexpr int kTailWaves = 4;      // waves of CTAs at the list's end, longest first
  static constexpr int kMaxTail = 2048;     // a block's sort in shared memory
  // The CTAs sorted longest first at the list's end for `sms` SMs (one dk/dv CTA an SM).
  static inline int tail(int sms) {
    const int64_t n = int64_t{kTailWaves} * sms;
    return static_cast<int>(n < kMaxTail ? n : kMaxTail);
  }
  // Whether a list of batch_heads rows of `stride` entries fits int32 entries and a 1-D grid.
  static inline bool fits(int64_t batch_heads, int64_t stride) {
    return batch_heads * (stride / KeySpans::kKdLeaf) <= int64_t{0x7fffffff};
  }
};

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
  // KeyOrder::kBands: the band height (KeyBands::valid_rows; sparsek_key_band_rows), and
  // each key's last row [batch_heads, seqlen_k] (the layout's key_last_row: written, then read).
  int32_t band_rows = 0;
  int32_t* key_last_row = nullptr;
  // Results, [batch_heads, stride] each: stride = KeySpanLayout::make(...).stride.
  int64_t stride = 0;
  float* span_sorted_u = nullptr;
  int32_t* span_sorted_key = nullptr;
  int32_t* span_last_row = nullptr;
  // CTA rank -> slice, [batch_heads, stride / kKdLeaf] (the slice order above; the first
  // key_span_count(S, key_span) * key_span / kKdLeaf of a row, or with bands
  // KeyBands::stride / kKdLeaf); not written where null.
  int32_t* slice_order = nullptr;
  // With the slice order by first row: how many of a (batch, kv head)'s slices visit rows
  // (they come first in it), [batch_heads]; not written where null.
  int32_t* visiting_slices = nullptr;
  // Each kKdLeaf-entry slice's smallest key position (INT_MAX for padding only),
  // [batch_heads, stride / kKdLeaf]: written by the kd sort, read by the slice order (which
  // needs it in the kd orders), so that a slice's rows take one load instead of its 128 keys.
  int32_t* slice_min_key = nullptr;
  // Row bands with the slice order by first row and visiting_slices: the dk/dv grid's CTA
  // list (BandCtas), [1 + batch_heads * (stride / kKdLeaf)]: its length, then its entries;
  // not written where null. tail_ctas:
  // how many CTAs at its end go longest first (at most BandCtas::kMaxTail; -1: BandCtas::tail
  // of the device's SMs).
  int32_t* band_ctas = nullptr;
  int32_t tail_ctas = -1;
  int32_t device = -1;
};

// Where the result arrays (and the slice order) sit in a workspace of the sort's own (the launcher,
// sparsek_sort_key_spans, and sparsek_key_span_workspace_bytes are in sparsek_api.h).
struct KeySpanLayout {
  int64_t stride = 0;                    // entries a (batch, kv head): every order's
  int64_t span_sorted_u_offset = 0;      // bytes, multiples of 256
  int64_t span_sorted_key_offset = 0;
  int64_t span_last_row_offset = 0;
  int64_t slice_order_offset = 0;
  int64_t key_last_row_offset = 0;       // [batch_heads, seqlen_k] (bands)
  int64_t visiting_slices_offset = 0;    // [batch_heads] (the slice order's count)
  int64_t slice_min_key_offset = 0;      // [batch_heads * stride / kKdLeaf] (kd orders)
  int64_t band_ctas_offset = 0;          // [1 + batch_heads * stride / kKdLeaf] (bands)
  int64_t workspace_bytes = 0;

  // The widest of key_span_stride(S) and the bands' (KeyBands::max_stride), so that the
  // workspace does not depend on the order or the width.
  static KeySpanLayout make(int64_t batch_heads, int64_t seqlen_q, int64_t seqlen_k) {
    KeySpanLayout l;
    const int64_t spans = key_span_stride(seqlen_k);
    const int64_t bands = KeyBands::max_stride(seqlen_q, seqlen_k);
    l.stride = spans > bands ? spans : bands;
    const int64_t entries = batch_heads * l.stride;
    l.span_sorted_u_offset = 0;
    l.span_sorted_key_offset = align256(entries * 4);
    l.span_last_row_offset = l.span_sorted_key_offset + align256(entries * 4);
    l.slice_order_offset = l.span_last_row_offset + align256(entries * 4);
    l.key_last_row_offset =
        l.slice_order_offset + align256(entries / KeySpans::kKdLeaf * 4);
    l.visiting_slices_offset = l.key_last_row_offset + align256(batch_heads * seqlen_k * 4);
    l.slice_min_key_offset = l.visiting_slices_offset + align256(batch_heads * 4);
    l.band_ctas_offset = l.slice_min_key_offset + align256(entries / KeySpans::kKdLeaf * 4);
    l.workspace_bytes = l.band_ctas_offset + align256((1 + entries / KeySpans::kKdLeaf) * 4);
    return l;
  }
};

}  // namespace sparsek
