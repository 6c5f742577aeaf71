// Plain parameters of the SparseK selection stage (SPARSEK.md, "Gates"), and the layout of
// the workspace it shares with the attention kernel. No framework types.
//
// The selection turns the scores u [B, S, Hkv] into
//   - tau [B, Hkv, T]: every row's exact threshold (-inf when the row's sparse domain holds
//     at most K keys), and
//   - a visit plan per (batch, kv head, query tile of kQueryTile rows): keys are cut into
//     chunks of kKeyChunk positions, each chunk stored sorted by score (descending). For the
//     chunks that lie wholly inside the tile's first row's sparse domain, the candidates of
//     chunk c are the keys scoring above that row's tau: a prefix of the sorted chunk, and
//     every key any row of the tile selects from those chunks is among them (tau never
//     decreases down the rows). The prefix splits into three classes, by the tile's last
//     row's tau (which bounds every row's tau from above; float subtraction is monotone in
//     tau): its first full_c keys are "full" (u - tau >= 1: gate 1 for every row of the tile),
//     the next sure_c keys are "sure" (u > tau: a gate above 0 for every row, so no row
//     hides them), and the last gated_c keys may weigh 0 for some rows. The plan row holds
//     three exclusive prefix sums over the chunks: gated_c at [0, chunks], full_c at
//     [chunks + 1, 2 chunks + 1] and sure_c at [2 chunks + 2, 3 chunks + 2] (written only
//     where plan_lists_sure_keys; nothing reads it elsewhere). The attention
//     visits every chunk's full keys first (whole tiles of them skip the gate), then the sure
//     ones (whole tiles skip the mask), then the gated ones. The keys after the last whole
//     chunk, window band included, are visited as one contiguous range.
// Memory: O(S) for the sorted chunks and O(T * S / (kQueryTile * kKeyChunk)) for the plan.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SPARSEK_HOST_DEVICE __host__ __device__
#else
#define SPARSEK_HOST_DEVICE
#endif

namespace sparsek {

struct SelectionTiles {
  static constexpr int kQueryTile = 128;   // rows per query tile: the attention kBlockM
  static constexpr int kKeyChunk = 128;    // key positions per sorted chunk
  static constexpr int kAnchorEvery = 16;  // query tiles between two anchor thresholds
  static constexpr int kMaxChunks = 8192;  // the attention CTA keeps a plan row in smem
  // Up to these many chunks the plan separates the full keys, and the sure ones (the CTA
  // keeps the prefix sums it uses, no more shared memory than one of kMaxChunks + 1); past
  // them full_c, or sure_c, is 0 everywhere.
  static constexpr int kMaxChunksWithFullKeys = kMaxChunks / 2 - 1;
  static constexpr int kMaxChunksWithSureKeys = (kMaxChunks + 1) / 3 - 1;
};

// Whether the plan of a problem with `key_chunks` chunks lists full keys (full_c > 0).
SPARSEK_HOST_DEVICE inline bool plan_lists_full_keys(int64_t key_chunks) {
  return key_chunks <= SelectionTiles::kMaxChunksWithFullKeys;
}

// Whether it lists sure keys (sure_c > 0).
SPARSEK_HOST_DEVICE inline bool plan_lists_sure_keys(int64_t key_chunks) {
  return key_chunks <= SelectionTiles::kMaxChunksWithSureKeys;
}

// How many of a plan row's prefix sums a consumer reads: gated, then full and sure where
// listed.
SPARSEK_HOST_DEVICE inline int plan_listed_sums(int64_t key_chunks) {
  return 1 + (plan_lists_full_keys(key_chunks) ? 1 : 0) + (plan_lists_sure_keys(key_chunks) ? 1 : 0);
}

// Entries of one plan row (one query tile): the gated prefix sums, the full ones, the sure
// ones.
SPARSEK_HOST_DEVICE inline int64_t plan_row_entries(int64_t key_chunks) {
  return 3 * (key_chunks + 1);
}

// Sizes of the selection's buffers for one problem; offsets are in bytes from the start of
// the workspace, each a multiple of 256.
struct SelectionLayout {
  int64_t batch_heads = 0;  // B * Hkv
  int64_t chunks = 0;       // ceil(S / kKeyChunk)
  int64_t tiles = 0;        // ceil(T / kQueryTile)
  int64_t anchors = 0;      // rows 0, kAnchorEvery tiles apart, ..., and T - 1
  int64_t key_u_offset = 0, sorted_u_offset = 0, sorted_key_offset = 0;
  int64_t anchor_tau_offset = 0, plan_offset = 0, anchor_ready_offset = 0;
  int64_t workspace_bytes = 0;

  SPARSEK_HOST_DEVICE int64_t padded_keys() const { return chunks * SelectionTiles::kKeyChunk; }
  SPARSEK_HOST_DEVICE int64_t plan_row() const { return plan_row_entries(chunks); }
};

// Exported from the kernel library (the FFI and nanobind glue call it).
__attribute__((visibility("default"))) SelectionLayout make_selection_layout(
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads_kv);

struct SparseKSelectParams {
  const float* scores = nullptr;  // u [B, S, Hkv], float32, strides in elements
  int64_t scores_batch_stride = 0, scores_row_stride = 0, scores_head_stride = 0;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads_kv = 0;
  int64_t topk = 0;    // K >= 1
  int64_t window = 0;  // W >= 0
  float* tau = nullptr;     // [B, Hkv, T] result
  void* workspace = nullptr;  // make_selection_layout(...).workspace_bytes, 16-byte aligned
  int32_t device = -1;
  // The thresholds are known already (the backward, given the forward's tau): only step 1
  // runs (the scores in key order and the sorted chunks); tau (which may be null) and the
  // plan are not written.
  bool thresholds_given = false;
};

// Typed views of the workspace (what the kernels of both stages read and write).
struct SelectionBuffers {
  float* key_u;        // [B*Hkv, padded_keys] scores in key order, -inf past S
  float* sorted_u;     // [B*Hkv, padded_keys] each chunk sorted, descending
  int32_t* sorted_key; // [B*Hkv, padded_keys] key position of each sorted entry (-1: none)
  float* anchor_tau;   // [B*Hkv, anchors]
  int32_t* plan;       // [B*Hkv, tiles, plan_row_entries(chunks)]
  // [B*Hkv, anchors] set once anchor_tau's entry is written: the tile kernel starts while
  // the anchor kernel runs (runtime/grid_dependency.cuh) and waits for its two anchors.
  int32_t* anchor_ready;
};

inline SelectionBuffers selection_buffers(const SelectionLayout& l, void* workspace) {
  char* base = static_cast<char*>(workspace);
  return {reinterpret_cast<float*>(base + l.key_u_offset),
          reinterpret_cast<float*>(base + l.sorted_u_offset),
          reinterpret_cast<int32_t*>(base + l.sorted_key_offset),
          reinterpret_cast<float*>(base + l.anchor_tau_offset),
          reinterpret_cast<int32_t*>(base + l.plan_offset),
          reinterpret_cast<int32_t*>(base + l.anchor_ready_offset)};
}

// Row i's sparse domain is the key positions [0, sparse_domain_end(i)) (SPARSEK.md:
// j <= p(i) - W with p(i) = i + S - T), before removing -inf scores.
SPARSEK_HOST_DEVICE inline int64_t sparse_domain_end(int64_t row, int64_t seqlen_q,
                                                     int64_t seqlen_k, int64_t window) {
  const int64_t end = row + seqlen_k - seqlen_q - window + 1;
  return end < 0 ? 0 : (end > seqlen_k ? seqlen_k : end);
}

SPARSEK_HOST_DEVICE inline int64_t anchor_row(int64_t anchor, int64_t seqlen_q) {
  const int64_t row =
      anchor * SelectionTiles::kAnchorEvery * static_cast<int64_t>(SelectionTiles::kQueryTile);
  return row < seqlen_q - 1 ? row : seqlen_q - 1;
}

}  // namespace sparsek
