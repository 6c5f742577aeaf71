// XLA FFI handlers exported to Python as capsules.
#pragma once

#include <cstdint>
#include <string>

#include "sparsek_api.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

extern "C" XLA_FFI_Error* jax_sparsek_attention_fwd(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* jax_sparsek_sparsek_fwd(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* jax_sparsek_sparsek_select(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* jax_sparsek_attention_bwd(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* jax_sparsek_sparsek_bwd(XLA_FFI_CallFrame* call_frame);

namespace sparsek_ffi {

// Runs the SparseK selection stage on contiguous float32 scores [B, S, Hkv] into tau
// [B, Hkv, T] and the workspace buffer (a result buffer of the custom call, at least
// sparsek_workspace_bytes): XLA's FFI scratch allocator is not available to every XLA GPU
// runtime configuration. Returns the layout and the workspace pointer for the attention.
// thresholds_given: tau already holds the thresholds (SparseKSelectParams::thresholds_given);
// only the scores' copy in key order and the sorted chunks are made, tau is not written.
std::string run_selection(void* stream, int32_t device,
                          xla::ffi::Result<xla::ffi::AnyBuffer>& workspace_buffer,
                          const float* scores, int64_t batch, int64_t seqlen_q,
                          int64_t seqlen_k, int64_t heads_kv, int64_t topk, int64_t window,
                          float* tau, sparsek::SelectionLayout& layout, void*& workspace,
                          bool thresholds_given = false);

// Points the SparseK fields of forward or backward parameters at the selection's results.
template <typename Params>
void use_selection(Params& p, const float* tau, const sparsek::SelectionLayout& layout,
                   void* workspace) {
  const sparsek::SelectionBuffers w = sparsek::selection_buffers(layout, workspace);
  p.sparsek = true;
  p.tau = tau;
  p.key_u = w.key_u;
  p.sorted_u = w.sorted_u;
  p.sorted_key = w.sorted_key;
  p.plan = w.plan;
  p.key_chunks = layout.chunks;
}

}  // namespace sparsek_ffi
