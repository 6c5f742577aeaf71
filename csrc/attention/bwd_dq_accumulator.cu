// Converting the Hopper backward's float32 dq accumulator into dq (bwd_dq_accumulator.h):
// one accumulator tile a CTA. It reads the 32 KB tile with coalesced 16-byte loads (each
// float4 is two dims of two rows, in the warpgroups' register order), scales and converts it
// into a row-major tile in shared memory, then writes each row's head dim to dq with 16-byte
// stores. Measured on gqa_t8192 (268 MB read, 67 MB written): 155 us with a thread a 16-byte
// store gathering its dims from four float4s, 2 KB apart between neighbouring threads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "attention/bwd_dq_accumulator.h"
#include "attention/sm80_instructions.cuh"
#include "runtime/cuda_check.h"

namespace sparsek {
namespace {

using Tiles = DqAccumulatorTiles;
constexpr int kConvertThreads = 256;
// The converted tile's row pitch in elements: 8 more than the tile's dims, so that the 8 rows
// a warp's float4s write (rows 16 w + lane / 4, 4 bytes a lane) fall in distinct banks.
constexpr int kTilePitch = Tiles::kDims + 8;

// One CTA per accumulator tile (batch, query head, row block): blockIdx.x.
template <typename Element>
__global__ void __launch_bounds__(kConvertThreads)
    store_dq_kernel(const float* __restrict__ accum, Element* __restrict__ dq, int64_t seqlen_q,
                    int64_t heads_q, int64_t head_dim, float scale) {
  __shared__ __align__(16) Element tile[Tiles::kRows * kTilePitch];
  const int64_t row_blocks = Tiles::row_blocks(seqlen_q);
  const int64_t tile_index = blockIdx.x;
  const int64_t row_block = tile_index % row_blocks;
  const int64_t bh = tile_index / row_blocks;
  const int64_t h = bh % heads_q;
  const int64_t b = bh / heads_q;
  const float4* src = reinterpret_cast<const float4*>(accum + tile_index * Tiles::kTileFloats);
  constexpr int kFloat4s = Tiles::kTileFloats / 4;
  constexpr int kLoads = kFloat4s / kConvertThreads;
  float4 v[kLoads];
#pragma unroll
  for (int i = 0; i < kLoads; ++i) v[i] = src[i * kConvertThreads + threadIdx.x];
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    // float4 f: half f / 1024 (64 dims each), n8 block j, the half's thread (its m64n64 tile
    // fragment): rows 16 (thread / 32) + (thread % 32) / 4 + {0, 8}, dims 8 j + 2 (thread % 4)
    // + {0, 1}.
    const int f = i * kConvertThreads + static_cast<int>(threadIdx.x);
    const int half = f / (kFloat4s / 2);
    const int j = (f % (kFloat4s / 2)) / 128;
    const int thread = f % 128;
    const int row = 16 * (thread / 32) + (thread % 32) / 4;
    const int dim = half * (Tiles::kDims / 2) + 8 * j + 2 * (thread % 4);
    *reinterpret_cast<uint32_t*>(&tile[row * kTilePitch + dim]) =
        sm80::pack2<Element>(v[i].x * scale, v[i].y * scale);
    *reinterpret_cast<uint32_t*>(&tile[(row + 8) * kTilePitch + dim]) =
        sm80::pack2<Element>(v[i].z * scale, v[i].w * scale);
  }
  __syncthreads();
  // Rows past T and dims past the head dim are the tile's padding: not written.
  const int chunks_per_row = static_cast<int>(head_dim / 8);
  const int64_t row0 = row_block * Tiles::kRows;
  const int rows = static_cast<int>(std::min<int64_t>(Tiles::kRows, seqlen_q - row0));
  for (int c = threadIdx.x; c < rows * chunks_per_row; c += kConvertThreads) {
    const int r = c / chunks_per_row;
    const int dim0 = (c % chunks_per_row) * 8;
    Element* out = dq + ((b * seqlen_q + row0 + r) * heads_q + h) * head_dim + dim0;
    *reinterpret_cast<uint4*>(out) =
        *reinterpret_cast<const uint4*>(&tile[r * kTilePitch + dim0]);
  }
}

template <typename Element>
std::string launch_store(const AttentionBwdParams& p, const float* dq_accum,
                         cudaStream_t stream) {
  const int64_t tiles = p.batch * p.heads_q * Tiles::row_blocks(p.seqlen_q);
  if (tiles == 0) return {};
  if (tiles > std::numeric_limits<int32_t>::max()) {
    return "store_dq: too many dq accumulator tiles for one grid (" + std::to_string(tiles) +
           ")";
  }
  store_dq_kernel<Element><<<static_cast<unsigned>(tiles), kConvertThreads, 0, stream>>>(
      dq_accum, static_cast<Element*>(p.dq), p.seqlen_q, p.heads_q, p.head_dim, p.scale);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}

}  // namespace

std::string store_dq_from_accumulator(const AttentionBwdParams& p, const float* dq_accum,
                                      cudaStream_t stream) {
  if (p.dtype == DType::kBFloat16) return launch_store<__nv_bfloat16>(p, dq_accum, stream);
  return launch_store<__half>(p, dq_accum, stream);
}

}  // namespace sparsek
