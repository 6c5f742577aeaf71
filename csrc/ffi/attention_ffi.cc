// XLA FFI glue: decodes JAX buffers into AttentionFwdParams and calls the launcher. Shape
// rules live in Python (jax_sparsek/_validation.py); these checks only guard the kernel.
#include "ffi/attention_ffi.h"

#include <string>

#include "sparsek_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error AttentionFwdImpl(void* stream, int32_t device, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> o,
                            ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale,
                            int32_t is_causal, int64_t window) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("jax_sparsek_attention_fwd: q, k, v must be rank 4");
  }
  const ffi::DataType dtype = q.element_type();
  if ((dtype != ffi::DataType::F16 && dtype != ffi::DataType::BF16) ||
      k.element_type() != dtype || v.element_type() != dtype ||
      o->element_type() != dtype) {
    return ffi::Error::InvalidArgument(
        "jax_sparsek_attention_fwd: q, k, v, o must all be float16 or all bfloat16");
  }

  sparsek::AttentionFwdParams p;
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

  const std::string error = sparsek::attention_fwd(p, stream);
  if (!error.empty()) {
    return ffi::Error::Internal("jax_sparsek_attention_fwd: " + error);
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
