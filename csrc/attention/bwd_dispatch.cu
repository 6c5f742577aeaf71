// attention_bwd(): checks the parameters, computes Delta and zeroes the accumulators
// (bwd_preprocess.cu), then runs the dq and dk/dv kernels for the dtype, head dim and device
// (bwd_launch.cuh), all on the caller's stream; attention_bwd_prepare and attention_bwd_finish
// are its two parts, for a caller that overlaps other work with the first (the SparseK FFI
// handler's key sorts). The Hopper backward computes dq inside the dk/dv kernel (atomics into
// a float32 accumulator in the workspace; in SparseK mode du then takes a pass of its own,
// bwd_sparsek_du.h) unless JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 or the workspace has no room
// for it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention/bwd_kv_accumulator.h"
#include "attention/bwd_preprocess.h"
#include "attention/bwd_workspace.h"
#include "attention/check_problem.h"
#include "attention/hopper_kernels.h"
#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"
#include "runtime/scoped_device.h"
#include "runtime/workspace_align.h"
#include "selection/sort_key_spans.h"
#include "sparsek_api.h"

namespace sparsek {

template <int kHeadDim, typename Element>
std::string run_attention_bwd(const AttentionBwdParams& p, float* delta, float* mean,
                              cudaStream_t stream);
template <int kHeadDim, typename Element>
std::string run_attention_bwd_sm90(const AttentionBwdParams& p, const BwdRowBuffers& rows,
                                   cudaStream_t stream);

namespace {

// spans_sorted: the SparseK selection and span sort have run (attention_bwd_finish);
// attention_bwd_prepare reads none of their buffers.
std::string check_params(const AttentionBwdParams& p, bool spans_sorted) {
  if (!p.q || !p.k || !p.v || !p.o || !p.d_out || !p.lse) {
    return "a q, k, v, o, d_out or lse pointer is null";
  }
  if (!p.dq || !p.dk || !p.dv) return "a dq, dk or dv pointer is null";
  if (!p.workspace) return "the workspace pointer is null";
  if (p.workspace_bytes != 0 &&
      p.workspace_bytes <
          BwdWorkspaceLayout::make(p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv,
                                   p.head_dim, p.sparsek, false)
              .bytes) {
    return "the workspace is smaller than attention_bwd_min_workspace_bytes";
  }
  if (std::string error = check_problem(p, spans_sorted); !error.empty()) return error;
  if (p.sparsek && !p.du) return "SparseK mode needs the du pointer";
  if (p.sparsek && spans_sorted) {
    if (!p.span_sorted_u || !p.span_sorted_key || !p.span_last_row) {
      return "SparseK mode needs the span sort's span_sorted_u, span_sorted_key and "
             "span_last_row (sparsek_sort_key_spans)";
    }
    if (!valid_key_span_width(p.key_span)) return "key_span must be 1024, 2048, 4096 or 8192";
    if (p.key_span_stride !=
        KeySpanLayout::make(p.batch * p.heads_kv, p.seqlen_q, p.seqlen_k).stride) {
      return "key_span_stride does not match seqlen_q and seqlen_k (KeySpanLayout)";
    }
  }
  if (p.key_band_rows != 0) {
    if (!p.sparsek) return "key_band_rows is for SparseK mode";
    if (!KeyBands::valid_rows(p.key_band_rows, p.seqlen_q)) {
      return "key_band_rows must be a power of two in [1024, 32768], at least half of "
             "KeyBands::rows(seqlen_q), in at most 32 bands";
    }
    if (spans_sorted && p.key_span != KeyBands::kSpan) {
      return "row bands take key_span KeyBands::kSpan (4096)";
    }
  }
  // 16-byte cp.async copies and vector loads: every row start must be 16-byte aligned.
  for (const void* ptr : {p.q, p.k, p.v, p.o, p.d_out, static_cast<const void*>(p.dq),
                          static_cast<const void*>(p.dk), static_cast<const void*>(p.dv)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
      return "q, k, v, o, d_out, dq, dk and dv must be 16-byte aligned";
    }
  }
  if (reinterpret_cast<uintptr_t>(p.workspace) % 256 != 0) {
    return "the workspace must be 256-byte aligned";
  }
  for (int64_t stride :
       {p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.k_batch_stride, p.k_row_stride,
        p.k_head_stride, p.v_batch_stride, p.v_row_stride, p.v_head_stride, p.o_batch_stride,
        p.o_row_stride, p.o_head_stride, p.do_batch_stride, p.do_row_stride,
        p.do_head_stride}) {
    if (stride % 8 != 0) return "batch, row and head strides must be multiples of 8 elements";
  }
  return {};
}

// Fills dq, dk, dv (and du) with NaN bytes so that tests can tell an element the kernels did
// not write. All results are contiguous.
std::string poison_outputs(const AttentionBwdParams& p, cudaStream_t stream) {
  const int64_t q_elems = p.batch * p.seqlen_q * p.heads_q * p.head_dim;
  const int64_t kv_elems = p.batch * p.seqlen_k * p.heads_kv * p.head_dim;
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.dq, 0xFF, q_elems * 2, stream));
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.dk, 0xFF, kv_elems * 2, stream));
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.dv, 0xFF, kv_elems * 2, stream));
  if (p.sparsek) {
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(
        p.du, 0xFF, p.batch * p.seqlen_k * p.heads_kv * sizeof(float), stream));
  }
  return {};
}

// The Hopper kernels (hopper_kernels.h), unless JAX_SPARSEK_BACKWARD_KERNEL=mma_sync asks for
// the others.
std::string hopper_kernels_run_backward(int64_t head_dim, bool& runs) {
  runs = false;
  if (mma_sync_backward_requested()) return {};
  return hopper_kernels_run(head_dim, runs);
}

// Whether the dk/dv kernel adds dq with atomics: every mode on the Hopper kernels, unless
// JAX_SPARSEK_DETERMINISTIC_BACKWARD=1.
bool dq_in_dkdv_kernel(bool hopper) { return hopper && !deterministic_backward_requested(); }

std::string backward_adds_dq_atomically(int64_t head_dim, bool& atomic) {
  bool hopper = false;
  const std::string error = hopper_kernels_run_backward(head_dim, hopper);
  atomic = dq_in_dkdv_kernel(hopper);
  return error;
}

// hopper: hopper_kernels_run_backward's answer; rows.dq_accum: the workspace's accumulator
// when the dk/dv kernel adds dq, else null.
template <typename Element>
std::string dispatch_head_dim(const AttentionBwdParams& p, const BwdRowBuffers& rows,
                              bool hopper, cudaStream_t stream) {
  if (hopper) return run_attention_bwd_sm90<128, Element>(p, rows, stream);
  if (p.head_dim <= 64) return run_attention_bwd<64, Element>(p, rows.delta, rows.mean, stream);
  if (p.head_dim <= 128) {
    return run_attention_bwd<128, Element>(p, rows.delta, rows.mean, stream);
  }
  return run_attention_bwd<256, Element>(p, rows.delta, rows.mean, stream);
}

}  // namespace

std::string backward_kernel_name(int64_t head_dim) {
  bool hopper = false;
  const std::string error = hopper_kernels_run_backward(head_dim, hopper);
  return kernel_name(error, hopper);
}

std::string backward_dq_name(int64_t head_dim, bool sparsek) {
  (void)sparsek;  // both modes go the same way
  bool atomic = false;
  throw_if_error(backward_adds_dq_atomically(head_dim, atomic));
  return atomic ? "dkdv_atomic" : "dq_kernel";
}

int64_t attention_bwd_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                      int64_t heads_q, int64_t heads_kv, int64_t head_dim,
                                      bool sparsek) {
  // A failed device query reserves no accumulator: the call then takes the dq kernel.
  bool atomic = false;
  (void)backward_adds_dq_atomically(head_dim, atomic);
  return BwdWorkspaceLayout::make(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim,
                                  sparsek, atomic)
      .bytes;
}

int64_t attention_bwd_min_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                          int64_t heads_q, int64_t heads_kv, int64_t head_dim,
                                          bool sparsek) {
  return BwdWorkspaceLayout::make(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim,
                                  sparsek, false)
      .bytes;
}

SparseKBwdWorkspaceLayout sparsek_bwd_workspace_layout(int64_t batch, int64_t seqlen_q,
                                                       int64_t seqlen_k, int64_t heads_q,
                                                       int64_t heads_kv, int64_t head_dim) {
  SparseKBwdWorkspaceLayout l;
  l.span_offset = align256(sparsek_workspace_bytes(batch, seqlen_q, seqlen_k, heads_kv));
  l.tau_offset =
      l.span_offset + KeySpanLayout::make(batch * heads_kv, seqlen_q, seqlen_k).workspace_bytes;
  l.own_offset = l.tau_offset + align256(batch * heads_kv * seqlen_q * int64_t{4});
  l.bytes = l.own_offset + attention_bwd_workspace_bytes(batch, seqlen_q, seqlen_k, heads_q,
                                                         heads_kv, head_dim, true);
  l.min_bytes = l.own_offset + attention_bwd_min_workspace_bytes(
                                   batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, true);
  return l;
}

namespace {

// Whether this call's dk/dv kernel adds dq (atomic) and whether it runs on the Hopper kernels.
// A workspace reserved while JAX_SPARSEK_DETERMINISTIC_BACKWARD was set has no room for the
// accumulator: that call keeps the dq kernel.
std::string call_adds_dq_atomically(const AttentionBwdParams& p, bool& hopper, bool& atomic) {
  hopper = atomic = false;
  if (std::string error = hopper_kernels_run_backward(p.head_dim, hopper); !error.empty()) {
    return error;
  }
  atomic = dq_in_dkdv_kernel(hopper) &&
           p.workspace_bytes >= BwdWorkspaceLayout::make(p.batch, p.seqlen_q, p.seqlen_k,
                                                         p.heads_q, p.heads_kv, p.head_dim,
                                                         p.sparsek, true)
                                    .bytes;
  return {};
}

}  // namespace

std::string attention_bwd_reads_plan(const AttentionBwdParams& p, bool& reads_plan) {
  reads_plan = true;
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(p.device); !error.empty()) return error;
  bool hopper = false, atomic = false;
  if (std::string error = call_adds_dq_atomically(p, hopper, atomic); !error.empty()) {
    return error;
  }
  reads_plan = !atomic;
  return {};
}

namespace {

// One call's kernel choice and workspace buffers (both parts of attention_bwd take the same).
struct BwdCall {
  bool hopper = false;
  bool atomic = false;
  BwdRowBuffers rows;
  float* dk_accum = nullptr;  // row bands only
  float* dv_accum = nullptr;
};

std::string plan_call(const AttentionBwdParams& p, BwdCall& call) {
  if (std::string error = call_adds_dq_atomically(p, call.hopper, call.atomic);
      !error.empty()) {
    return error;
  }
  const BwdWorkspaceLayout layout =
      BwdWorkspaceLayout::make(p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv,
                               p.head_dim, p.sparsek, call.atomic);
  BwdRowBuffers& rows = call.rows;
  rows.delta = layout.delta(p.workspace);
  rows.mean = layout.mean(p.workspace, p.sparsek);
  if (call.atomic) {
    rows.dq_accum = layout.dq_accum(p.workspace);
    if (p.sparsek) {
      rows.row_edges = layout.row_edges(p.workspace);
      rows.mean_prefix = layout.mean_prefix(p.workspace);
      rows.segment_mean_totals = layout.segment_mean_totals(p.workspace);
      rows.segment_count_totals = layout.segment_count_totals(p.workspace);
    }
  }
  if (p.key_band_rows > 0) {
    if (!call.atomic || !p.sparsek) {
      return "row bands (key_band_rows) need the dk/dv kernel that adds dq "
             "(backward_dq_name 'dkdv_atomic' and its workspace)";
    }
    call.dk_accum = layout.dk_accum(p.workspace);
    call.dv_accum = layout.dv_accum(p.workspace);
  }
  return {};
}

// p with the call's dk and dv accumulators (row bands).
AttentionBwdParams with_accumulators(const AttentionBwdParams& p, const BwdCall& call) {
  AttentionBwdParams q = p;
  q.dk_accum = call.dk_accum;
  q.dv_accum = call.dv_accum;
  return q;
}

std::string check_call(const AttentionBwdParams& p, bool spans_sorted) {
  if (std::string error = check_params(p, spans_sorted); !error.empty()) return error;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return "unsupported dtype";
  return {};
}

}  // namespace

std::string attention_bwd_prepare(const AttentionBwdParams& p, void* stream_ptr) {
  if (std::string error = check_call(p, /*spans_sorted=*/false); !error.empty()) return error;
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(p.device); !error.empty()) return error;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (poison_outputs_requested()) {
    if (std::string error = poison_outputs(p, stream); !error.empty()) return error;
  }
  BwdCall call;
  if (std::string error = plan_call(p, call); !error.empty()) return error;
  // The buffers the dk/dv kernel adds into start at zero: with dq_accum the dq accumulator
  // (and in SparseK mode g's row sums), with row bands the dk, dv and du accumulators.
  BwdZeroRanges zeros;
  if (call.rows.dq_accum) {
    zeros.add(call.rows.dq_accum, DqAccumulatorTiles::elems(p.batch, p.seqlen_q, p.heads_q));
    if (p.sparsek) zeros.add(call.rows.mean, p.batch * p.heads_q * p.seqlen_q);
  }
  if (call.dk_accum) {
    const int64_t kv_elems = KvAccumulator::elems(p.batch, p.seqlen_k, p.heads_kv, p.head_dim);
    zeros.add(call.dk_accum, kv_elems);
    zeros.add(call.dv_accum, kv_elems);
    zeros.add(p.du, p.batch * p.seqlen_k * p.heads_kv);
  }
  return launch_bwd_preprocess(p, call.rows.delta, zeros, stream);
}

std::string attention_bwd_finish(const AttentionBwdParams& p, void* stream_ptr) {
  if (std::string error = check_call(p, /*spans_sorted=*/true); !error.empty()) return error;
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(p.device); !error.empty()) return error;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  BwdCall call;
  if (std::string error = plan_call(p, call); !error.empty()) return error;
  const AttentionBwdParams q = with_accumulators(p, call);
  if (p.dtype == DType::kBFloat16) {
    return dispatch_head_dim<__nv_bfloat16>(q, call.rows, call.hopper, stream);
  }
  return dispatch_head_dim<__half>(q, call.rows, call.hopper, stream);
}

std::string attention_bwd(const AttentionBwdParams& p, void* stream) {
  if (std::string error = check_call(p, /*spans_sorted=*/true); !error.empty()) return error;
  if (std::string error = attention_bwd_prepare(p, stream); !error.empty()) return error;
  return attention_bwd_finish(p, stream);
}

}  // namespace sparsek
