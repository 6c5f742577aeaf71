// Zeroing the dense Hopper backward's float32 dq accumulator and converting it into dq
// (bwd_dq_accumulator.h). Each thread of the conversion writes 8 consecutive dims of one row
// (a 16-byte store; the head dim is a multiple of 8): n8 tile j of its warpgroup half, whose
// pairs sit in the float4s of 4 consecutive threads of the register order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "attention/bwd_dq_accumulator.h"
#include "attention/sm80_instructions.cuh"
#include "runtime/cuda_check.h"

namespace sparsek {
namespace {

using Tiles = DqAccumulatorTiles;
constexpr int kConvertThreads = 256;

template <typename Element>
__global__ void __launch_bounds__(kConvertThreads)
    store_dq_kernel(const float* __restrict__ accum, uint4* __restrict__ dq, int64_t seqlen_q,
                    int64_t heads_q, int64_t head_dim, int64_t groups, float scale) {
  const int64_t groups_per_row = head_dim / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kConvertThreads;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x; g < groups;
       g += stride) {
    // g enumerates (b, t, h, dim group): dq's own order, so the stores are contiguous.
    const int dim0 = static_cast<int>(g % groups_per_row) * 8;
    const int64_t bth = g / groups_per_row;
    const int64_t h = bth % heads_q;
    const int64_t bt = bth / heads_q;
    const int64_t t = bt % seqlen_q;
    const int64_t b = bt / seqlen_q;
    const int row = static_cast<int>(t % Tiles::kRows);
    const float* half =
        accum + ((b * heads_q + h) * Tiles::row_blocks(seqlen_q) + t / Tiles::kRows) *
                    Tiles::kTileFloats +
        (dim0 / 64) * Tiles::kHalfFloats;
    const int j = (dim0 % 64) / 8;
    // The row's thread group: warp row / 16, lanes 4 ((row % 16) % 8) + q; float pair 2 (row
    // % 16 / 8) of each lane's float4.
    const int thread0 = (row / 16) * 32 + (row % 8) * 4;
    const int pair = ((row % 16) / 8) * 2;
    uint32_t packed[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 v =
          *reinterpret_cast<const float2*>(half + (j * 128 + thread0 + q) * 4 + pair);
      packed[q] = sm80::pack2<Element>(v.x * scale, v.y * scale);
    }
    dq[g] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

template <typename Element>
std::string launch_store(const AttentionBwdParams& p, const float* dq_accum,
                         cudaStream_t stream) {
  const int64_t groups = p.batch * p.seqlen_q * p.heads_q * (p.head_dim / 8);
  if (groups == 0) return {};
  const int64_t blocks =
      std::min<int64_t>((groups + kConvertThreads - 1) / kConvertThreads, int64_t{1} << 16);
  store_dq_kernel<Element><<<static_cast<unsigned>(blocks), kConvertThreads, 0, stream>>>(
      dq_accum, static_cast<uint4*>(p.dq), p.seqlen_q, p.heads_q, p.head_dim, groups,
      p.scale);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace

std::string zero_dq_accumulator(const AttentionBwdParams& p, float* dq_accum,
                                cudaStream_t stream) {
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(
      dq_accum, 0, Tiles::elems(p.batch, p.seqlen_q, p.heads_q) * sizeof(float), stream));
  return {};
}

std::string store_dq_from_accumulator(const AttentionBwdParams& p, const float* dq_accum,
                                      cudaStream_t stream) {
  if (p.dtype == DType::kBFloat16) return launch_store<__nv_bfloat16>(p, dq_accum, stream);
  return launch_store<__half>(p, dq_accum, stream);
}

}  // namespace sparsek
