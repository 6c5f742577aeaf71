// Plain parameters of one attention backward call (SPARSEK.md, "Gradients"). No framework
// types: the XLA FFI handler fills this struct and hands it to attention_bwd() with a stream.
#pragma once

#include <cstdint>

#include "attention/params.h"

namespace sparsek {

struct AttentionBwdParams {
  // Inputs. q, d_out, o [B, T, Hq, D]; k, v [B, S, Hkv, D]: strides in elements, the head dim
  // contiguous. lse and d_lse [B, Hq, T] float32, contiguous; d_lse may be null (zero).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;
  const void* d_out = nullptr;
  const float* lse = nullptr;
  const float* d_lse = nullptr;

  // Results, contiguous, in the input dtype: dq [B, T, Hq, D], dk and dv [B, S, Hkv, D].
  // SparseK mode: du [B, S, Hkv] float32 (the gradient of the scores).
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* du = nullptr;

  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;

  float scale = 1.0f;
  bool is_causal = false;
  int64_t window = 0;
  DType dtype = DType::kFloat16;
  int32_t device = -1;

  // SparseK mode: the selection stage's results for the same scores, topk and window
  // (selection/selection_params.h), exactly as the forward reads them. Always causal.
  bool sparsek = false;
  const float* tau = nullptr;           // [B, Hkv, T]
  const float* key_u = nullptr;         // [B * Hkv, key_chunks * kKeyChunk]
  const float* sorted_u = nullptr;      // same layout, each chunk sorted descending
  const int32_t* sorted_key = nullptr;  // same layout
  // [B * Hkv, ceil(T / kQueryTile), plan_row_entries(key_chunks)]
  const int32_t* plan = nullptr;
  int64_t key_chunks = 0;
  // The dk/dv kernel's key order (selection/sort_key_spans.h, sparsek_sort_key_spans):
  // [B * Hkv, key_span_stride], each span of key_span key positions in kd or last-row order
  // (each slice's first entry its latest last row), with score, position and last row; padding
  // entries u = -inf, key = -1, last row -1. With row bands, the bands' pieces (last rows
  // clipped to the band).
  const float* span_sorted_u = nullptr;
  const int32_t* span_sorted_key = nullptr;
  const int32_t* span_last_row = nullptr;
  // The fused kernel's CTA rank -> kKdLeaf-entry slice, [B * Hkv, key_span_stride /
  // kKdLeaf] (sort_key_spans.h's slice order); null: rank order. Read by 128-entry tiles only.
  const int32_t* slice_order = nullptr;
  // With slice_order: how many of a (batch, kv head)'s ranks take slices that visit rows,
  // [B * Hkv] (sort_key_spans.h); with row bands the CTAs past it leave at once. May be null.
  const int32_t* visiting_slices = nullptr;
  // Row bands: the dk/dv grid's CTA list (sort_key_spans.h, BandCtas: its length, then
  // bh * (key_span_stride / kKdLeaf) + rank a CTA), which the launcher runs as one 1-D grid
  // unless JAX_SPARSEK_BWD_GRID asks for the tiles or heads grid. May be null.
  const int32_t* band_ctas = nullptr;
  int64_t key_span = 0;         // the span width (1024, 2048, 4096 or 8192)
  int64_t key_span_stride = 0;  // KeySpanLayout::make(B * Hkv, T, S).stride
  // Row bands (sort_key_spans.h, KeyOrder::kBands): the band height, 0 for spans. The entries
  // are then each band's pieces (KeyBands), slices of kKdLeaf entries, and a key reached by
  // several bands is in several CTAs: the dk/dv kernel adds dk, dv and du with atomics (only
  // the Hopper kernel that adds dq takes bands).
  int64_t key_band_rows = 0;
  // Set by the launcher from the workspace where key_band_rows > 0 (bwd_kv_accumulator.h).
  float* dk_accum = nullptr;
  float* dv_accum = nullptr;

  // Set by the launcher, not by callers: the grids' CTA order (cta_order.h); whether the
  // SparseK dk/dv kernel that adds dq skips a warpgroup's work on the steps whose rows see
  // none of its keys (JAX_SPARSEK_BWD_SKIP_HALVES, on by default).
  bool tile_major_grid = false;
  bool skip_idle_halves = false;
  // Set by the launcher: the warp-specialized dk/dv kernel's producer fences its copies for
  // the async proxy (JAX_SPARSEK_BWD_PRODUCER_FENCE, on by default).
  bool producer_fences = false;

  // workspace_bytes (at least attention_bwd_min_workspace_bytes(...); 0 means that many) of
  // device memory, 256-byte aligned, for the backward's own intermediates (row sums such as
  // Delta, and where it fits the dq accumulator of the dense Hopper backward:
  // attention_bwd_workspace_bytes(...)).
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;

  // Fills the strides of contiguous [B, T, H, D] tensors.
  void set_contiguous_strides() {
    q_head_stride = o_head_stride = do_head_stride = head_dim;
    q_row_stride = o_row_stride = do_row_stride = heads_q * head_dim;
    q_batch_stride = o_batch_stride = do_batch_stride = seqlen_q * q_row_stride;
    k_head_stride = v_head_stride = head_dim;
    k_row_stride = v_row_stride = heads_kv * head_dim;
    k_batch_stride = v_batch_stride = seqlen_k * k_row_stride;
  }
};

}  // namespace sparsek
