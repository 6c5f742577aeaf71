// XLA FFI glue: decodes JAX buffers into AttentionFwdParams and calls the launcher. Shape
// rules live in Python (jax_sparsek/_validation.py); these checks only guard the kernel.
#include "ffi/attention_ffi.h"

#include <string>

#include "sparsek_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Fills the dense part of the parameters from the buffers; an empty string when they fit.
std::string decode_attention(int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer>& o,
                             ffi::Result<ffi::Buffer<ffi::F32>>& lse, float scale,
                             int32_t is_causal, int64_t window, sparsek::AttentionFwdParams& p) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4) {
    return "q, k, v must be rank 4";
  }
  const ffi::DataType dtype = q.element_type();
  if ((dtype != ffi::DataType::F16 && dtype != ffi::DataType::BF16) ||
      k.element_type() != dtype || v.element_type() != dtype ||
      o->element_type() != dtype) {
    return "q, k, v, o must all be float16 or all bfloat16";
  }

  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.o = o->untyped_data();
  p.lse = lse->typed_data();
  p.batch = qd[0];
  p.seqlen_q = qd[1];
  p.heads_q = qd[2];
  p.head_dim = qd[3];
  p.seqlen_k = kd[1];
  p.heads_kv = kd[2];
  p.set_contiguous_strides();
  p.scale = scale;
  p.is_causal = is_causal != 0;
  p.window = window;
  p.dtype = dtype == ffi::DataType::F16 ? sparsek::DType::kFloat16 : sparsek::DType::kBFloat16;
  p.device = device;
  return {};
}

ffi::Error AttentionFwdImpl(void* stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> o,
                            ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale,
                            int32_t is_causal, int64_t window) {
  sparsek::AttentionFwdParams p;
  if (std::string error = decode_attention(device, q, k, v, o, lse, scale, is_causal, window, p);
      !error.empty()) {
    return ffi::Error::InvalidArgument("jax_sparsek_attention_fwd: " + error);
  }
  const std::string error = sparsek::attention_fwd(p, stream);
  if (!error.empty()) {
    return ffi::Error::Internal("jax_sparsek_attention_fwd: " + error);
  }
  return ffi::Error::Success();
}

}  // namespace

// The selection stage (attention_ffi.h).
std::string sparsek_ffi::run_selection(void* stream, int32_t device,
                                       ffi::Result<ffi::AnyBuffer>& workspace_buffer,
                                       const float* scores, int64_t batch, int64_t seqlen_q,
                                       int64_t seqlen_k, int64_t heads_kv, int64_t topk,
                                       int64_t window, float* tau,
                                       sparsek::SelectionLayout& layout, void*& workspace,
                                       bool thresholds_given) {
  sparsek::SparseKSelectParams s;
  s.scores = scores;
  s.scores_head_stride = 1;
  s.scores_row_stride = heads_kv;
  s.scores_batch_stride = seqlen_k * heads_kv;
  s.batch = batch;
  s.seqlen_q = seqlen_q;
  s.seqlen_k = seqlen_k;
  s.heads_kv = heads_kv;
  s.topk = topk;
  s.window = window;
  s.tau = tau;
  s.device = device;
  s.thresholds_given = thresholds_given;
  layout = sparsek::make_selection_layout(batch, seqlen_q, seqlen_k, heads_kv);
  if (static_cast<int64_t>(workspace_buffer->size_bytes()) < layout.workspace_bytes) {
    return "the workspace holds " + std::to_string(workspace_buffer->size_bytes()) + " bytes, " +
           std::to_string(layout.workspace_bytes) + " are needed";
  }
  s.workspace = workspace = workspace_buffer->untyped_data();
  return sparsek::sparsek_select(s, stream);
}

namespace {

// SparseK: the selection stage, then the attention kernel over its plan. The selection's
// workspace is the call's last result.
ffi::Error SparseKFwdImpl(void* stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::Buffer<ffi::F32> scores,
                          ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                          ffi::Result<ffi::Buffer<ffi::F32>> tau,
                          ffi::Result<ffi::AnyBuffer> workspace_buffer, float scale, int64_t topk,
                          int64_t window) {
  sparsek::AttentionFwdParams p;
  if (std::string error = decode_attention(device, q, k, v, o, lse, scale, 1, window, p);
      !error.empty()) {
    return ffi::Error::InvalidArgument("jax_sparsek_sparsek_fwd: " + error);
  }
  const auto sd = scores.dimensions();
  if (sd.size() != 3 || sd[0] != p.batch || sd[1] != p.seqlen_k || sd[2] != p.heads_kv) {
    return ffi::Error::InvalidArgument("jax_sparsek_sparsek_fwd: scores must be [B, S, Hkv]");
  }
  sparsek::SelectionLayout layout;
  void* workspace = nullptr;
  if (std::string error = sparsek_ffi::run_selection(stream, device, workspace_buffer, scores.typed_data(), p.batch,
                                        p.seqlen_q, p.seqlen_k, p.heads_kv, topk, window,
                                        tau->typed_data(), layout, workspace);
      !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_fwd: selection: " + error);
  }
  sparsek_ffi::use_selection(p, tau->typed_data(), layout, workspace);
  p.follows_selection = true;
  if (std::string error = sparsek::attention_fwd(p, stream); !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_fwd: attention: " + error);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_sparsek_attention_fwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("is_causal")
                                  .Attr<int64_t>("window"));

namespace {

// The selection stage alone (tau [B, Hkv, T] from scores [B, S, Hkv]): for timing it apart
// from the attention, and for looking at the thresholds.
ffi::Error SparseKSelectImpl(void* stream, int32_t device, ffi::Buffer<ffi::F32> scores,
                             ffi::Result<ffi::Buffer<ffi::F32>> tau,
                             ffi::Result<ffi::AnyBuffer> workspace_buffer, int64_t topk,
                             int64_t window) {
  const auto sd = scores.dimensions();
  const auto td = tau->dimensions();
  if (sd.size() != 3 || td.size() != 3 || td[0] != sd[0] || td[1] != sd[2]) {
    return ffi::Error::InvalidArgument(
        "jax_sparsek_sparsek_select: scores must be [B, S, Hkv] and tau [B, Hkv, T]");
  }
  sparsek::SelectionLayout layout;
  void* workspace = nullptr;
  if (std::string error = sparsek_ffi::run_selection(stream, device, workspace_buffer, scores.typed_data(), sd[0],
                                        td[2], sd[1], sd[2], topk, window, tau->typed_data(),
                                        layout, workspace);
      !error.empty()) {
    return ffi::Error::Internal("jax_sparsek_sparsek_select: " + error);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_sparsek_sparsek_select, SparseKSelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scores [B, S, Hkv]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // tau [B, Hkv, T]
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attr<int64_t>("topk")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_sparsek_sparsek_fwd, SparseKFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scores [B, S, Hkv]
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Ret<ffi::Buffer<ffi::F32>>()  // tau [B, Hkv, T]
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("topk")
                                  .Attr<int64_t>("window"));
