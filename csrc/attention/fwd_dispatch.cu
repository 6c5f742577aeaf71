// attention_fwd(): checks the parameters, then picks the kernel for the dtype and head dim.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention/check_problem.h"
#include "attention/hopper_kernels.h"
#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"
#include "runtime/scoped_device.h"
#include "sparsek_api.h"

namespace sparsek {

template <int kHeadDim, typename Element>
std::string run_attention_fwd(const AttentionFwdParams& p, cudaStream_t stream);
template <int kHeadDim, typename Element>
std::string run_attention_fwd_sm90(const AttentionFwdParams& p, cudaStream_t stream);

namespace {

std::string check_params(const AttentionFwdParams& p) {
  if (!p.q || !p.k || !p.v || !p.o || !p.lse) return "a q, k, v, o or lse pointer is null";
  if (std::string error = check_problem(p); !error.empty()) return error;
  // 16-byte cp.async copies: every row start must be 16-byte aligned.
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.o)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
      return "q, k, v and o must be 16-byte aligned";
    }
  }
  for (int64_t stride : {p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.k_batch_stride,
                         p.k_row_stride, p.k_head_stride, p.v_batch_stride, p.v_row_stride,
                         p.v_head_stride, p.o_batch_stride, p.o_row_stride, p.o_head_stride}) {
    if (stride % 8 != 0) return "batch, row and head strides must be multiples of 8 elements";
  }
  return {};
}

bool is_contiguous(const AttentionFwdParams& p) {
  return p.o_head_stride == p.head_dim && p.o_row_stride == p.heads_q * p.head_dim &&
         p.o_batch_stride == p.seqlen_q * p.o_row_stride;
}

// Fills O and LSE with NaN bytes so that tests can tell an element the kernel did not write.
std::string poison_outputs(const AttentionFwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  if (is_contiguous(p)) {
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.o, 0xFF, rows * p.head_dim * 2, stream));
  }
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p.lse, 0xFF, rows * sizeof(float), stream));
  return {};
}

// The Hopper kernel, unless JAX_SPARSEK_FORWARD_KERNEL=mma_sync asks for the other one.
std::string hopper_kernel_runs(int64_t head_dim, bool& runs) {
  runs = false;
  if (mma_sync_forward_requested()) return {};
  return hopper_kernels_run(head_dim, runs);
}

template <typename Element>
std::string dispatch_head_dim(const AttentionFwdParams& p, cudaStream_t stream) {
  bool hopper = false;
  if (std::string error = hopper_kernel_runs(p.head_dim, hopper); !error.empty()) return error;
  // The Hopper kernel puts the scale into the exponent's FFMA and takes the row max of the
  // raw scores, which needs scale > 0; the mma.sync kernel scales first and takes any.
  if (hopper && p.scale > 0.f) return run_attention_fwd_sm90<128, Element>(p, stream);
  if (p.head_dim <= 64) return run_attention_fwd<64, Element>(p, stream);
  if (p.head_dim <= 128) return run_attention_fwd<128, Element>(p, stream);
  return run_attention_fwd<256, Element>(p, stream);
}

}  // namespace

std::string forward_kernel_name(int64_t head_dim) {
  bool hopper = false;
  const std::string error = hopper_kernel_runs(head_dim, hopper);
  return kernel_name(error, hopper);
}

std::string attention_fwd(const AttentionFwdParams& p, void* stream_ptr) {
  if (std::string error = check_params(p); !error.empty()) return error;
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(p.device); !error.empty()) return error;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  // (With p.follows_selection the poison's memsets come between the selection and the
  // kernel: the kernel, launched as dependent, then waits for them, which a plain launch
  // after the selection's grid does anyway; it writes nothing before that wait.)
  if (poison_outputs_requested()) {
    if (std::string error = poison_outputs(p, stream); !error.empty()) return error;
  }
  switch (p.dtype) {
    case DType::kFloat16:
      return dispatch_head_dim<__half>(p, stream);
    case DType::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(p, stream);
  }
  return "unsupported dtype";
}

}  // namespace sparsek
