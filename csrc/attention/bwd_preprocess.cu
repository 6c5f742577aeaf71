// Delta_i = <dO_i, o_i> - dlse_i (SPARSEK.md "Gradients"; the dlse term is how the cotangent
// of the returned lse enters: d lse_i / d s_ij = P_ij). One warp per (batch, row, head): each
// lane takes 8 consecutive dims (head_dim <= 256 = 32 lanes x 8), float32 accumulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "attention/bwd_preprocess.h"
#include "runtime/cuda_check.h"

namespace sparsek {
namespace {

constexpr int kPreprocessWarps = 8;

template <typename Element>
__device__ __forceinline__ float2 to_float2(uint32_t packed);

template <>
__device__ __forceinline__ float2 to_float2<__half>(uint32_t packed) {
  return __half22float2(*reinterpret_cast<const __half2*>(&packed));
}

template <>
__device__ __forceinline__ float2 to_float2<__nv_bfloat16>(uint32_t packed) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
}

template <typename Element>
__global__ void __launch_bounds__(kPreprocessWarps * 32)
    bwd_preprocess_kernel(const __grid_constant__ AttentionBwdParams p, float* delta) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kPreprocessWarps;
  const int col = lane * 8;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kPreprocessWarps + threadIdx.x / 32;
       row < rows; row += warps) {
    // row enumerates (b, h, t) with t fastest: the delta writes of a warp pass are contiguous.
    const int64_t t = row % p.seqlen_q;
    const int64_t bh = row / p.seqlen_q;
    const int64_t h = bh % p.heads_q;
    const int64_t b = bh / p.heads_q;
    float sum = 0.f;
    if (col < p.head_dim) {
      const Element* o = static_cast<const Element*>(p.o) + b * p.o_batch_stride +
                         t * p.o_row_stride + h * p.o_head_stride + col;
      const Element* d_out = static_cast<const Element*>(p.d_out) + b * p.do_batch_stride +
                             t * p.do_row_stride + h * p.do_head_stride + col;
      const uint4 ov = *reinterpret_cast<const uint4*>(o);
      const uint4 dv = *reinterpret_cast<const uint4*>(d_out);
      const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w};
      const uint32_t dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = to_float2<Element>(ow[i]);
        const float2 c = to_float2<Element>(dw[i]);
        sum += a.x * c.x + a.y * c.y;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0) {
      // lse and d_lse are [B, Hq, T]: the same index as delta.
      delta[row] = sum - (p.d_lse != nullptr ? p.d_lse[row] : 0.f);
    }
  }
}

template <typename Element>
std::string launch(const AttentionBwdParams& p, float* delta, cudaStream_t stream) {
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  const int64_t blocks =
      std::min<int64_t>((rows + kPreprocessWarps - 1) / kPreprocessWarps, int64_t{1} << 20);
  bwd_preprocess_kernel<Element>
      <<<static_cast<unsigned>(blocks), kPreprocessWarps * 32, 0, stream>>>(p, delta);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace

std::string launch_bwd_preprocess(const AttentionBwdParams& p, float* delta,
                                  cudaStream_t stream) {
  if (p.dtype == DType::kBFloat16) return launch<__nv_bfloat16>(p, delta, stream);
  return launch<__half>(p, delta, stream);
}

}  // namespace sparsek
