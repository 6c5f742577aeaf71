// XLA FFI glue of the backward: decodes JAX buffers into AttentionBwdParams and calls the
// launcher. Shape rules live in Python (jax_sparsek/_backward_primitive.py); these checks only
// guard the kernels.
#include <string>

#include "ffi/attention_ffi.h"
#include "sparsek_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Fills the parameters from the buffers; an empty string when they fit.
std::string decode_backward(int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::AnyBuffer o, ffi::Buffer<ffi::F32> lse,
                            ffi::AnyBuffer d_out, ffi::Buffer<ffi::F32> d_lse,
                            ffi::Result<ffi::AnyBuffer>& dq, ffi::Result<ffi::AnyBuffer>& dk,
                            ffi::Result<ffi::AnyBuffer>& dv, float scale,
                            sparsek::AttentionBwdParams& p) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4 ||
      o.dimensions().size() != 4 || d_out.dimensions().size() != 4) {
    return "q, k, v, o, d_out must be rank 4";
  }
  const ffi::DataType dtype = q.element_type();
  if (dtype != ffi::DataType::F16 && dtype != ffi::DataType::BF16) {
    return "q must be float16 or bfloat16";
  }
  for (ffi::DataType t : {k.element_type(), v.element_type(), o.element_type(),
                          d_out.element_type(), dq->element_type(), dk->element_type(),
                          dv->element_type()}) {
    if (t != dtype) return "q, k, v, o, d_out, dq, dk, dv must share one dtype";
  }
  const auto ld = lse.dimensions();
  if (ld.size() != 3 || ld[0] != qd[0] || ld[1] != qd[2] || ld[2] != qd[1] ||
      d_lse.dimensions().size() != 3 || d_lse.element_count() != lse.element_count()) {
    return "lse and d_lse must be [B, Hq, T]";
  }
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.o = o.untyped_data();
  p.d_out = d_out.untyped_data();
  p.lse = lse.typed_data();
  p.d_lse = d_lse.typed_data();
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.batch = qd[0];
  p.seqlen_q = qd[1];
  p.heads_q = qd[2];
  p.head_dim = qd[3];
  p.seqlen_k = kd[1];
  p.heads_kv = kd[2];
  p.set_contiguous_strides();
  p.scale = scale;
  p.dtype = dtype == ffi::DataType::F16 ? sparsek::DType::kFloat16 : sparsek::DType::kBFloat16;
  p.device = device;
  return {};
}

std::string check_workspace(ffi::Result<ffi::AnyBuffer>& buffer, int64_t needed) {
  if (static_cast<int64_t>(buffer->size_bytes()) < needed) {
    return "the workspace holds " + std::to_string(buffer->size_bytes()) + " bytes, " +
           std::to_string(needed) + " are needed";
  }
  return {};
}

ffi::Error AttentionBwdImpl(void* stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::AnyBuffer o, ffi::Buffer<ffi::F32> lse,
                            ffi::AnyBuffer d_out, ffi::Buffer<ffi::F32> d_lse,
                            ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                            ffi::Result<ffi::AnyBuffer> dv,
                            ffi::Result<ffi::AnyBuffer> workspace, float scale,
                            int32_t is_causal, int64_t window) {
  sparsek::AttentionBwdParams p;
  if (std::string error =
          decode_backward(device, q, k, v, o, lse, d_out, d_lse, dq, dk, dv, scale, p);
      !error.empty()) {
    return ffi::Error::InvalidArgument("jax_sparsek_attention_bwd: " + error);
  }
  p.is_causal = is_causal != 0;
  p.window = window;
  // The lowering reserved attention_bwd_workspace_bytes (with the dq accumulator where the
  // dk/dv kernel adds dq); the kernels run with the minimum.
  const int64_t needed = sparsek::attention_bwd_min_workspace_bytes(
      p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim, false);
  if (std::string error = check_workspace(workspace, needed); !error.empty()) {
    return ffi::Error::InvalidArgument("jax_sparsek_attention_bwd: " + error);
  }
  p.workspace = workspace->untyped_data();
  p.workspace_bytes = static_cast<int64_t>(workspace->size_bytes());
  if (std::string error = sparsek::attention_bwd(p, stream); !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_attention_bwd: " + error);
  }
  return ffi::Error::Success();
}

// SparseK: the forward's tau, the selection's first step (the scores in key order and the
// sorted chunks), the span sort of the dk/dv kernel's key order, then the backward kernels.
// The selection and the span sort run on a side stream (sparsek_api.h, side_stream_fork; the
// device's greatest priority) beside attention_bwd_prepare's Delta and zeroed accumulators,
// which read neither.
// Where dq has a kernel of its own (the deterministic path), which walks the forward's plan,
// the whole selection runs again (it is deterministic: the same tau and plan) into the
// workspace's own tau. The workspace result holds the selection's buffers, then the span
// sort's, then that tau, then the backward's own, each at a 256-byte boundary.
ffi::Error SparseKBwdImpl(void* stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::Buffer<ffi::F32> scores,
                          ffi::Buffer<ffi::F32> tau, ffi::AnyBuffer o,
                          ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer d_out,
                          ffi::Buffer<ffi::F32> d_lse, ffi::Result<ffi::AnyBuffer> dq,
                          ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                          ffi::Result<ffi::Buffer<ffi::F32>> du,
                          ffi::Result<ffi::AnyBuffer> workspace, float scale, int64_t topk,
                          int64_t window) {
  sparsek::AttentionBwdParams p;
  if (std::string error =
          decode_backward(device, q, k, v, o, lse, d_out, d_lse, dq, dk, dv, scale, p);
      !error.empty()) {
    return ffi::Error::InvalidArgument("jax_sparsek_sparsek_bwd: " + error);
  }
  const auto sd = scores.dimensions();
  const auto ud = du->dimensions();
  if (sd.size() != 3 || sd[0] != p.batch || sd[1] != p.seqlen_k || sd[2] != p.heads_kv ||
      ud.size() != 3 || ud[0] != sd[0] || ud[1] != sd[1] || ud[2] != sd[2]) {
    return ffi::Error::InvalidArgument(
        "jax_sparsek_sparsek_bwd: scores and du must be [B, S, Hkv]");
  }
  const auto td = tau.dimensions();
  if (td.size() != 3 || td[0] != p.batch || td[1] != p.heads_kv || td[2] != p.seqlen_q) {
    return ffi::Error::InvalidArgument("jax_sparsek_sparsek_bwd: tau must be [B, Hkv, T]");
  }
  const sparsek::SparseKBwdWorkspaceLayout whole = sparsek::sparsek_bwd_workspace_layout(
      p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim);
  const sparsek::KeySpanLayout span_layout =
      sparsek::KeySpanLayout::make(p.batch * p.heads_kv, p.seqlen_q, p.seqlen_k);
  if (std::string error = check_workspace(workspace, whole.min_bytes); !error.empty()) {
    return ffi::Error::InvalidArgument("jax_sparsek_sparsek_bwd: " + error);
  }
  char* workspace_base = static_cast<char*>(workspace->untyped_data());
  p.is_causal = true;
  p.window = window;
  p.sparsek = true;
  p.workspace = workspace_base + whole.own_offset;
  p.workspace_bytes = static_cast<int64_t>(workspace->size_bytes()) - whole.own_offset;
  bool reads_plan = true;
  if (std::string error = sparsek::attention_bwd_reads_plan(p, reads_plan); !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_bwd: " + error);
  }
  float* selection_tau = reinterpret_cast<float*>(workspace_base + whole.tau_offset);
  // The rows' thresholds every kernel below reads: the forward's, or the selection's again.
  const float* row_tau = reads_plan ? selection_tau : tau.typed_data();
  if (sparsek::sparsek_side_stream() < 0) {
    return ffi::Error::InvalidArgument(
        "jax_sparsek_sparsek_bwd: JAX_SPARSEK_SIDE_STREAM must be 0 or 1");
  }
  void* side = stream;
  if (std::string error = sparsek::side_stream_fork(stream, device, &side); !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_bwd: " + error);
  }
  // The key order, read before attention_bwd_prepare: with row bands it zeroes the dk, dv
  // and du accumulators the dk/dv kernel adds into.
  const int order = sparsek::sparsek_key_order(/*dq_fused=*/!reads_plan, p.seqlen_q);
  if (order < 0) {
    return ffi::Error::InvalidArgument(
        "jax_sparsek_sparsek_bwd: JAX_SPARSEK_KEY_ORDER must be bands, kd or last-row");
  }
  // A bad band height is an error in every order, as a bad span width is.
  int band_rows = sparsek::sparsek_key_band_rows(p.seqlen_q);
  if (band_rows < 0) {
    return ffi::Error::InvalidArgument(
        "jax_sparsek_sparsek_bwd: JAX_SPARSEK_KEY_BAND_ROWS must be a power of two in [1024, "
        "32768], at least half the default " +
        std::to_string(sparsek::KeyBands::rows(p.seqlen_q)) + " for T = " +
        std::to_string(p.seqlen_q) + ", in at most 32 bands");
  }
  if (order != static_cast<int>(sparsek::KeyOrder::kBands)) band_rows = 0;
  p.key_band_rows = band_rows;
  p.du = du->typed_data();
  sparsek::SelectionLayout layout;
  void* selection_workspace = nullptr;
  if (std::string error = sparsek_ffi::run_selection(
          side, device, workspace, scores.typed_data(), p.batch, p.seqlen_q, p.seqlen_k,
          p.heads_kv, topk, window, reads_plan ? selection_tau : nullptr, layout,
          selection_workspace, /*thresholds_given=*/!reads_plan);
      !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_bwd: selection: " + error);
  }
  char* span_workspace = workspace_base + whole.span_offset;
  sparsek::SortKeySpansParams spans;
  spans.key_u = sparsek::selection_buffers(layout, selection_workspace).key_u;
  spans.key_u_stride = layout.padded_keys();
  spans.batch_heads = layout.batch_heads;
  spans.seqlen_k = p.seqlen_k;
  spans.span_sorted_u =
      reinterpret_cast<float*>(span_workspace + span_layout.span_sorted_u_offset);
  spans.span_sorted_key =
      reinterpret_cast<int32_t*>(span_workspace + span_layout.span_sorted_key_offset);
  spans.span_last_row =
      reinterpret_cast<int32_t*>(span_workspace + span_layout.span_last_row_offset);
  const int slice_order = sparsek::sparsek_slice_order();
  if (slice_order < 0) {
    return ffi::Error::InvalidArgument(
        "jax_sparsek_sparsek_bwd: JAX_SPARSEK_SLICE_ORDER must be start or spans");
  }
  spans.slice_order =
      slice_order ? reinterpret_cast<int32_t*>(span_workspace + span_layout.slice_order_offset)
                  : nullptr;
  spans.visiting_slices =
      slice_order
          ? reinterpret_cast<int32_t*>(span_workspace + span_layout.visiting_slices_offset)
          : nullptr;
  spans.slice_min_key =
      slice_order ? reinterpret_cast<int32_t*>(span_workspace + span_layout.slice_min_key_offset)
                  : nullptr;
  // Row bands: the dk/dv grid's CTA list (needs the slice order's counts).
  spans.band_ctas =
      slice_order && order == static_cast<int>(sparsek::KeyOrder::kBands) &&
              sparsek::BandCtas::fits(p.batch * p.heads_kv, span_layout.stride)
          ? reinterpret_cast<int32_t*>(span_workspace + span_layout.band_ctas_offset)
          : nullptr;
  spans.tau = row_tau;
  spans.seqlen_q = p.seqlen_q;
  spans.window = window;
  spans.device = device;
  spans.order = static_cast<sparsek::KeyOrder>(order);
  spans.stride = span_layout.stride;
  spans.band_rows = band_rows;
  spans.key_last_row =
      reinterpret_cast<int32_t*>(span_workspace + span_layout.key_last_row_offset);
  spans.key_span = sparsek::sparsek_key_span_width(p.seqlen_k, order);
  if (spans.key_span < 0) {
    return ffi::Error::InvalidArgument(
        "jax_sparsek_sparsek_bwd: JAX_SPARSEK_KEY_SPAN must be 1024, 2048, 4096 or 8192");
  }
  if (std::string error = sparsek::sparsek_sort_key_spans(spans, side); !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_bwd: span sort: " + error);
  }
  // Delta and the zeroed accumulators on the caller's stream, issued after the side stream's
  // chain so that its first kernels start first.
  if (std::string error = sparsek::attention_bwd_prepare(p, stream); !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_bwd: " + error);
  }
  if (std::string error = sparsek::side_stream_join(stream, device, side); !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_bwd: " + error);
  }
  sparsek_ffi::use_selection(p, row_tau, layout, selection_workspace);
  p.span_sorted_u = spans.span_sorted_u;
  p.span_sorted_key = spans.span_sorted_key;
  p.span_last_row = spans.span_last_row;
  p.slice_order = spans.slice_order;
  p.visiting_slices = spans.visiting_slices;
  p.band_ctas = spans.band_ctas;
  p.key_span = spans.key_span;
  p.key_span_stride = span_layout.stride;
  if (std::string error = sparsek::attention_bwd_finish(p, stream); !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_bwd: " + error);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_sparsek_attention_bwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse [B, Hq, T]
                                  .Arg<ffi::AnyBuffer>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_lse [B, Hq, T]
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("is_causal")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_sparsek_sparsek_bwd, SparseKBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scores [B, S, Hkv]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tau [B, Hkv, T] (forward's)
                                  .Arg<ffi::AnyBuffer>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse [B, Hq, T]
                                  .Arg<ffi::AnyBuffer>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_lse [B, Hq, T]
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::Buffer<ffi::F32>>()  // du [B, S, Hkv]
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("topk")
                                  .Attr<int64_t>("window"));
