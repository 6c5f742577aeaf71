// Delta_i = <dO_i, o_i> - dlse_i (SPARSEK.md "Gradients"; the dlse term is how the cotangent
// of the returned lse enters: d lse_i / d s_ij = P_ij), and the accumulators set to zero.
//
// Delta: each thread takes 8 consecutive dims (one 16-byte load of o and of dO), a row
// (batch, row, head) the smallest power of two of lanes that covers its head dim, and the rows
// go in o's memory order (b, t, h): a warp reads 512 consecutive bytes of each at D = 128.
// Measured on gqa_t8192 (134 MB read): 125 us with one row a warp, rows t fastest (every warp
// 256 bytes, 8 KB apart, half the lanes idle).
//
// The fused kernel (the default) gives each block kRowsInFlight rows a thread, all loaded
// before any is summed, and a share of the zeros: one launch instead of Delta's and five
// memsets, and four rows' loads in flight a thread. That matters beside the SparseK
// backward's key sort (side stream), whose blocks of 1024 threads hold most SMs' thread slots
// while it runs: Delta then ran on the few slots left, one 32-byte load pair a thread, at
// 357 us against 162 alone (bench/NOTES.md, twenty-first session). The blocks stay short (64
// rows at D = 128), so the block scheduler still hands the work to whichever SMs free up.
#include "attention/bwd_preprocess.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"

namespace sparsek {
namespace {

constexpr int kPreprocessThreads = 256;
// Rows a thread loads before summing any, in the fused kernel.
constexpr int kFusedRowsInFlight = 4;
// A block's share of the zeros is at least this many 16-byte stores a thread, so that a
// problem with few rows and large accumulators (T = 1 against many keys) still takes enough
// blocks.
constexpr int64_t kZeroStoresPerThread = 16;

// The zeros in the kernel's terms: each buffer's 16-byte-aligned body as float4 chunks,
// numbered across the buffers, plus its unaligned head and tail (under four floats each).
struct ZeroChunks {
  float* ptr[BwdZeroRanges::kMax] = {};
  int head[BwdZeroRanges::kMax] = {};  // floats before the first 16-byte boundary
  int tail[BwdZeroRanges::kMax] = {};  // floats after the last whole chunk
  int64_t first_chunk[BwdZeroRanges::kMax + 1] = {};  // chunk numbers: prefix of the bodies
  int n = 0;
  int64_t per_block = 0;  // chunks a (virtual) block writes

  int64_t chunks() const { return first_chunk[n]; }
};

ZeroChunks make_zero_chunks(const BwdZeroRanges& ranges) {
  ZeroChunks z;
  z.n = ranges.n;
  for (int r = 0; r < ranges.n; ++r) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(ranges.ptr[r]);
    const int64_t head = std::min<int64_t>(ranges.count[r], ((16 - address % 16) % 16) / 4);
    const int64_t body = (ranges.count[r] - head) / 4;
    z.ptr[r] = ranges.ptr[r];
    z.head[r] = static_cast<int>(head);
    z.tail[r] = static_cast<int>(ranges.count[r] - head - 4 * body);
    z.first_chunk[r + 1] = z.first_chunk[r] + body;
  }
  return z;
}

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

// log2 of the lanes a row takes: the smallest power of two >= head_dim / 8 (head_dim <= 256:
// at most 32 lanes).
inline int row_lanes_log2_for(int64_t head_dim) {
  int log2 = 0;
  while ((int64_t{8} << log2) < head_dim) ++log2;
  return log2;
}

// Virtual block vb's share of the zeros: chunks [vb * per_block, (vb + 1) * per_block), a
// thread every kPreprocessThreads-th; block 0 also writes the heads and tails.
__device__ __forceinline__ void write_zero_share(const ZeroChunks& z, int64_t vb) {
  if (z.n == 0) return;
  const int64_t begin = vb * z.per_block;
  const int64_t end = std::min(begin + z.per_block, z.first_chunk[z.n]);
  int r = 0;
  for (int64_t c = begin + threadIdx.x; c < end; c += kPreprocessThreads) {
    while (c >= z.first_chunk[r + 1]) ++r;
    float4* body = reinterpret_cast<float4*>(z.ptr[r] + z.head[r]);
    body[c - z.first_chunk[r]] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (vb == 0 && threadIdx.x < 8 * z.n) {
    const int r0 = static_cast<int>(threadIdx.x) / 8;
    const int k = static_cast<int>(threadIdx.x) % 8;
    if (k < 4) {
      if (k < z.head[r0]) z.ptr[r0][k] = 0.f;
    } else if (k - 4 < z.tail[r0]) {
      const int64_t body_floats = 4 * (z.first_chunk[r0 + 1] - z.first_chunk[r0]);
      z.ptr[r0][z.head[r0] + body_floats + (k - 4)] = 0.f;
    }
  }
}

// Virtual block vb (of ceil(rows / block rows) or more, those past the rows only zero): rows
// vb * block_rows + r * slot_rows + threadIdx.x / row_lanes for r < kRowsInFlight. Every lane
// of a warp takes the same path, so the shuffles see the whole warp.
template <typename Element, int kRowsInFlight>
__global__ void __launch_bounds__(kPreprocessThreads)
    bwd_preprocess_kernel(const __grid_constant__ AttentionBwdParams p, float* delta,
                          int row_lanes_log2, int64_t virtual_blocks,
                          const __grid_constant__ ZeroChunks zeros) {
  const int row_lanes = 1 << row_lanes_log2;
  const int lane_in_row = static_cast<int>(threadIdx.x) & (row_lanes - 1);
  const int col = lane_in_row * 8;
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  const int64_t slot_rows = kPreprocessThreads >> row_lanes_log2;
  const int64_t block_rows = slot_rows * kRowsInFlight;
  for (int64_t vb = blockIdx.x; vb < virtual_blocks; vb += gridDim.x) {
    write_zero_share(zeros, vb);
    const int64_t first = vb * block_rows + (threadIdx.x >> row_lanes_log2);
    uint4 ov[kRowsInFlight], dv[kRowsInFlight];
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r) {
      const int64_t row = first + r * slot_rows;
      ov[r] = dv[r] = make_uint4(0u, 0u, 0u, 0u);
      if (row < rows && col < p.head_dim) {
        // row enumerates (b, t, h) with h fastest: o's and dO's own order.
        const int64_t h = row % p.heads_q;
        const int64_t bt = row / p.heads_q;
        const int64_t t = bt % p.seqlen_q;
        const int64_t b = bt / p.seqlen_q;
        const Element* o = static_cast<const Element*>(p.o) + b * p.o_batch_stride +
                           t * p.o_row_stride + h * p.o_head_stride + col;
        const Element* d_out = static_cast<const Element*>(p.d_out) + b * p.do_batch_stride +
                               t * p.do_row_stride + h * p.do_head_stride + col;
        ov[r] = *reinterpret_cast<const uint4*>(o);
        dv[r] = *reinterpret_cast<const uint4*>(d_out);
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r) {
      const int64_t row = first + r * slot_rows;
      const uint32_t ow[4] = {ov[r].x, ov[r].y, ov[r].z, ov[r].w};
      const uint32_t dw[4] = {dv[r].x, dv[r].y, dv[r].z, dv[r].w};
      float sum = 0.f;  // zeros past the rows and the head dim add nothing
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = to_float2<Element>(ow[i]);
        const float2 c = to_float2<Element>(dw[i]);
        sum += a.x * c.x + a.y * c.y;
      }
      for (int offset = row_lanes / 2; offset > 0; offset >>= 1) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      }
      if (row < rows && lane_in_row == 0) {
        // lse, d_lse and delta are [B, Hq, T].
        const int64_t h = row % p.heads_q;
        const int64_t bt = row / p.heads_q;
        const int64_t index = ((bt / p.seqlen_q) * p.heads_q + h) * p.seqlen_q + bt % p.seqlen_q;
        delta[index] = sum - (p.d_lse != nullptr ? p.d_lse[index] : 0.f);
      }
    }
  }
}

template <typename Element, int kRowsInFlight>
std::string launch(const AttentionBwdParams& p, float* delta, ZeroChunks zeros,
                   cudaStream_t stream) {
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  const int row_lanes_log2 = row_lanes_log2_for(p.head_dim);
  const int64_t block_rows = (kPreprocessThreads >> row_lanes_log2) * kRowsInFlight;
  const int64_t zero_blocks =
      (zeros.chunks() + kZeroStoresPerThread * kPreprocessThreads - 1) /
      (kZeroStoresPerThread * kPreprocessThreads);
  const int64_t virtual_blocks = std::max((rows + block_rows - 1) / block_rows, zero_blocks);
  if (virtual_blocks == 0) return {};
  zeros.per_block = (zeros.chunks() + virtual_blocks - 1) / virtual_blocks;
  const int64_t blocks = std::min<int64_t>(virtual_blocks, int64_t{1} << 20);
  bwd_preprocess_kernel<Element, kRowsInFlight>
      <<<static_cast<unsigned>(blocks), kPreprocessThreads, 0, stream>>>(
          p, delta, row_lanes_log2, virtual_blocks, zeros);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

template <typename Element>
std::string launch_for_setting(const AttentionBwdParams& p, float* delta,
                               const BwdZeroRanges& zeros, cudaStream_t stream) {
  const int fused = requested_bwd_prepare();
  if (fused < 0) return "JAX_SPARSEK_BWD_PREPARE must be fused or separate";
  if (fused == 1) {
    return launch<Element, kFusedRowsInFlight>(p, delta, make_zero_chunks(zeros), stream);
  }
  // As before the fused kernel: Delta one row a thread, then a memset a buffer.
  if (std::string error = launch<Element, 1>(p, delta, ZeroChunks{}, stream); !error.empty()) {
    return error;
  }
  for (int r = 0; r < zeros.n; ++r) {
    SPARSEK_RETURN_IF_CUDA_ERROR(
        cudaMemsetAsync(zeros.ptr[r], 0, static_cast<size_t>(zeros.count[r]) * 4, stream));
  }
  return {};
}

}  // namespace

std::string launch_bwd_preprocess(const AttentionBwdParams& p, float* delta,
                                  const BwdZeroRanges& zeros, cudaStream_t stream) {
  if (zeros.overflowed) return "more buffers to zero than BwdZeroRanges::kMax";
  for (int r = 0; r < zeros.n; ++r) {
    if (reinterpret_cast<uintptr_t>(zeros.ptr[r]) % 4 != 0) {
      return "the backward's accumulators must be 4-byte aligned";
    }
  }
  if (p.dtype == DType::kBFloat16) {
    return launch_for_setting<__nv_bfloat16>(p, delta, zeros, stream);
  }
  return launch_for_setting<__half>(p, delta, zeros, stream);
}

}  // namespace sparsek
