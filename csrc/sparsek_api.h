// The exported interface of the jax_sparsek_kernels shared library. Framework glue (XLA FFI,
// nanobind, torch) includes only this header.
#pragma once

#include <string>
#include <vector>

#include "attention/bwd_params.h"
#include "attention/params.h"
#include "selection/selection_params.h"
#include "selection/sort_key_spans.h"

#define SPARSEK_API __attribute__((visibility("default")))

namespace sparsek {

// Launches the attention forward on `stream` (a cudaStream_t). Returns an empty string on
// success, otherwise a message naming the check or CUDA call that failed.
SPARSEK_API std::string attention_fwd(const AttentionFwdParams& params, void* stream);

// Which forward kernel attention_fwd runs for this head dim on the current device:
// "sm90_wgmma" (Hopper, built for sm_90a, 64 < head_dim <= 128) or "mma_sync" (every other
// case, and wherever JAX_SPARSEK_FORWARD_KERNEL=mma_sync). Throws std::runtime_error without
// a usable device.
SPARSEK_API std::string forward_kernel_name(int64_t head_dim);

// The same for the backward's dq and dk/dv kernels (JAX_SPARSEK_BACKWARD_KERNEL=mma_sync
// forces "mma_sync").
SPARSEK_API std::string backward_kernel_name(int64_t head_dim);

// How the backward computes dq for this head dim and mode on the current device:
// "dkdv_atomic" (the Hopper backward: the dk/dv kernel adds dS K into a float32 accumulator
// with atomics, and in SparseK mode the rows' sums of g that du's means come from; the order
// of the additions varies from run to run) or "dq_kernel" (a kernel of its own, bitwise
// reproducible: the mma.sync kernels, and wherever JAX_SPARSEK_DETERMINISTIC_BACKWARD=1).
// The same in both modes. Throws std::runtime_error without a usable device.
SPARSEK_API std::string backward_dq_name(int64_t head_dim, bool sparsek);

// The SparseK selection stage (selection/selection_params.h): tau for every row and the
// per-query-tile visit plan, on `stream`. Run it before attention_fwd in SparseK mode.
SPARSEK_API std::string sparsek_select(const SparseKSelectParams& params, void* stream);

// Bytes of device workspace sparsek_select needs (256-byte aligned).
SPARSEK_API int64_t sparsek_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                            int64_t heads_kv);

// The SparseK backward's span sort (selection/sort_key_spans.h): the keys ordered within spans
// of params.key_span keys (params.order: kd, or by the last row that attends them), and the
// slice order where params.slice_order is set, for the dk/dv kernel. Run it
// after sparsek_select (whose scores and tau it reads) and before attention_bwd in SparseK
// mode.
SPARSEK_API std::string sparsek_sort_key_spans(const SortKeySpansParams& params, void* stream);

// The order of the backward's keys for T rows (KeyOrder's value: 1 last-row, 2 kd, 3 bands):
// JAX_SPARSEK_KEY_ORDER where set (read at every call; -1 if it is not "bands", "kd" or
// "last-row"), else bands. Bands need the dk/dv kernel that adds dq (dq_fused:
// attention_bwd_reads_plan false) and T <= 2^20 (KeyBands::kMaxBands of the default
// height); without them, unset and "bands" give kd.
SPARSEK_API int sparsek_key_order(bool dq_fused, int64_t seqlen_q);

// The height of the backward's row bands for T rows: JAX_SPARSEK_KEY_BAND_ROWS where set
// (read at every call; -1 where it is not KeyBands::valid_rows for T), else KeyBands::rows(T),
// or 0 where T needs more than KeyBands::kMaxBands bands of it (T > 2^20: the kd order then).
SPARSEK_API int sparsek_key_band_rows(int64_t seqlen_q);

// Whether the backward's dk/dv CTAs take the span sort's slice order (sort_key_spans.h):
// JAX_SPARSEK_SLICE_ORDER where set (read at every call; "start" 1, "spans" 0, anything else
// -1), else 1.
SPARSEK_API int sparsek_slice_order();

// The span width for S keys in key order `key_order` (sparsek_key_order's value): -1 where
// JAX_SPARSEK_KEY_SPAN (read at every call) is set to anything but 1024, 2048, 4096 or 8192;
// with bands KeyBands::kSpan; otherwise the variable's width where set, else key_span_width(S)
// in last-row order and kd_key_span_width(S) in kd order (selection/sort_key_spans.h).
SPARSEK_API int sparsek_key_span_width(int64_t seqlen_k, int key_order);

// Bytes of device workspace sparsek_sort_key_spans writes (KeySpanLayout, 256-byte aligned;
// the same for every order, span width and band height).
SPARSEK_API int64_t sparsek_key_span_workspace_bytes(int64_t batch, int64_t seqlen_q,
                                                     int64_t seqlen_k, int64_t heads_kv);

// Launches the attention backward on `stream`: dq, dk, dv (and du in SparseK mode, after
// sparsek_select and sparsek_sort_key_spans have filled their buffers for the same scores).
// Deterministic where backward_dq_name says "dq_kernel"; with "dkdv_atomic", dq's float32
// sums (and in SparseK mode du's row sums) are added in a varying order, and with row bands
// (params.key_band_rows, SparseK) so are dk's, dv's and du's over the bands (the dense modes'
// dk and dv are always deterministic).
// Returns an empty string on success, otherwise a message naming what failed.
SPARSEK_API std::string attention_bwd(const AttentionBwdParams& params, void* stream);

// attention_bwd in two parts on `stream`, for a caller that runs other work beside the first:
// attention_bwd_prepare poisons the outputs (where asked), computes Delta and zeroes the dq
// accumulator and du's row sums: bandwidth-bound passes over o and dO that read neither the
// selection's buffers nor the span sort's (those pointers may still be unset). Then
// attention_bwd_finish runs the rest, on the same stream or one ordered after it and after
// the selection and the span sort. The SparseK FFI handler sorts on a side stream meanwhile
// (runtime/side_stream.h).
SPARSEK_API std::string attention_bwd_prepare(const AttentionBwdParams& params, void* stream);
SPARSEK_API std::string attention_bwd_finish(const AttentionBwdParams& params, void* stream);

// A second stream of the calling thread on `device` that runs after everything issued to
// `stream` so far (*side; `stream` itself where JAX_SPARSEK_SIDE_STREAM=0), and the join that
// orders what is issued to `stream` next after everything issued to `side`
// (runtime/side_stream.h).
// JAX_SPARSEK_SIDE_STREAM as read now: 1 (the default) overlaps, 0 does not, -1 when the
// variable holds anything but 0 or 1.
SPARSEK_API int sparsek_side_stream();
SPARSEK_API std::string side_stream_fork(void* stream, int32_t device, void** side);
SPARSEK_API std::string side_stream_join(void* stream, int32_t device, void* side);

// Whether attention_bwd with these parameters (workspace included) reads the selection's
// plan and sorted chunks: where dq has a kernel of its own (backward_dq_name "dq_kernel", or
// a workspace with no room for the accumulator). The dk/dv kernel that adds dq reads only tau,
// the scores in key order and the span sort's buffers, so there sparsek_select can run with
// thresholds_given (the forward's tau). Returns an error message where the device query fails.
SPARSEK_API std::string attention_bwd_reads_plan(const AttentionBwdParams& params,
                                                 bool& reads_plan);

// Bytes of device workspace to give attention_bwd (AttentionBwdParams::workspace): with the
// float32 dq accumulator where backward_dq_name says "dkdv_atomic".
SPARSEK_API int64_t attention_bwd_workspace_bytes(int64_t batch, int64_t seqlen_q,
                                                  int64_t seqlen_k, int64_t heads_q,
                                                  int64_t heads_kv, int64_t head_dim,
                                                  bool sparsek);
// The least it runs with (no accumulator: dq then has its own kernel).
SPARSEK_API int64_t attention_bwd_min_workspace_bytes(int64_t batch, int64_t seqlen_q,
                                                      int64_t seqlen_k, int64_t heads_q,
                                                      int64_t heads_kv, int64_t head_dim,
                                                      bool sparsek);

// The whole workspace of a SparseK backward call (selection, span sort, backward): the
// selection's buffers (sparsek_workspace_bytes) at 0, the span sort's at span_offset, a tau
// for a selection run again (where attention_bwd_reads_plan) at tau_offset, attention_bwd's
// own at own_offset, each at a 256-byte boundary. bytes: with attention_bwd_workspace_bytes
// (what to reserve); min_bytes: with attention_bwd_min_workspace_bytes (the least accepted).
struct SparseKBwdWorkspaceLayout {
  int64_t span_offset = 0;
  int64_t tau_offset = 0;
  int64_t own_offset = 0;
  int64_t bytes = 0;
  int64_t min_bytes = 0;
};
SPARSEK_API SparseKBwdWorkspaceLayout sparsek_bwd_workspace_layout(
    int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t heads_q, int64_t heads_kv,
    int64_t head_dim);

// "sm_90" for the current device; throws std::runtime_error when there is no CUDA device.
SPARSEK_API std::string current_device_arch();

// The targets compiled into this library, e.g. {"sm_80", "sm_90a"}.
SPARSEK_API std::vector<std::string> compiled_archs();

SPARSEK_API std::string library_version();

// How the library was compiled: nvcc version and whether --use_fast_math was on.
struct BuildOptions {
  std::string cuda_compiler_version;
  bool fast_math = false;
};
SPARSEK_API BuildOptions build_options();

}  // namespace sparsek
