// Plain parameters of one attention forward call. No framework types: the XLA FFI handler and
// the torch layer both fill this struct and hand it to attention_fwd() with a stream.
#pragma once

#include <cstdint>

namespace sparsek {

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1 };

struct AttentionFwdParams {
  // q [B, T, Hq, D], k and v [B, S, Hkv, D], o [B, T, Hq, D]: strides in elements, the
  // head dim contiguous. lse is [B, Hq, T] float32, contiguous.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;

  int64_t batch = 0;
  int64_t seqlen_q = 0;  // T
  int64_t seqlen_k = 0;  // S
  int64_t heads_q = 0;   // Hq
  int64_t heads_kv = 0;  // Hkv, divides Hq
  int64_t head_dim = 0;  // D, a multiple of 8, at most 256

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;

  float scale = 1.0f;     // s_ij = scale * <q_i, k_j>
  bool is_causal = false; // keys j <= p(i) = i + S - T
  int64_t window = 0;     // > 0: causal sliding window, p(i) - window < j <= p(i)
  DType dtype = DType::kFloat16;
  int32_t device = -1;    // CUDA device ordinal of the buffers; -1: the current device

  // SparseK mode: the selection stage's results (selection/selection_params.h), read by the
  // attention kernel instead of the dense masks. Always causal; `window` is W.
  bool sparsek = false;
  const float* tau = nullptr;           // [B, Hkv, T]
  const float* key_u = nullptr;         // [B * Hkv, key_chunks * kKeyChunk]
  const float* sorted_u = nullptr;      // same layout, each chunk sorted
  const int32_t* sorted_key = nullptr;  // same layout
  const int32_t* plan = nullptr;        // [B * Hkv, query tiles, plan_row_entries(key_chunks)]
  int64_t key_chunks = 0;
  // The launch right before this call's on the stream is sparsek_select's last (the FFI
  // handler runs them back to back): on sm_90 the Hopper kernel may then start while that
  // grid finishes, reading only q, k and the scores in key order before it waits for the
  // grid (runtime/grid_dependency.cuh). Leave false where anything else may run in between.
  bool follows_selection = false;

  // Set by the launcher, not by callers: the grid's CTA order (cta_order.h), and how many
  // query heads of one kv group a CTA of the Hopper SparseK forward takes in turn (its grid
  // rows are groups of them; fwd_kernel_sm90.cuh). 1 everywhere else.
  bool tile_major_grid = false;
  int32_t heads_per_cta = 1;

  // Fills the strides of contiguous [B, T, H, D] tensors.
  void set_contiguous_strides() {
    q_head_stride = head_dim;
    q_row_stride = heads_q * head_dim;
    q_batch_stride = seqlen_q * q_row_stride;
    k_head_stride = v_head_stride = head_dim;
    k_row_stride = v_row_stride = heads_kv * head_dim;
    k_batch_stride = v_batch_stride = seqlen_k * k_row_stride;
    o_head_stride = q_head_stride;
    o_row_stride = q_row_stride;
    o_batch_stride = q_batch_stride;
  }
};

}  // namespace sparsek
