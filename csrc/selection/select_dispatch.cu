// sparsek_select(): checks the parameters and launches the three selection kernels (only the
// first where the thresholds are given); the third may start while the second runs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"
#include "runtime/dependent_launch.h"
#include "runtime/grid_dependency.cuh"
#include "runtime/scoped_device.h"
#include "runtime/workspace_align.h"
#include "selection/selection_kernels.cuh"
#include "sparsek_api.h"

namespace sparsek {

namespace {

std::string check_select_params(const SparseKSelectParams& p) {
  if (!p.scores || !p.workspace) return "a scores or workspace pointer is null";
  if (!p.tau && !p.thresholds_given) return "the tau pointer is null";
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.seqlen_k <= 0 || p.heads_kv <= 0) {
    return "batch, sequence lengths and heads_kv must be positive";
  }
  if (p.topk < 1) return "topk must be >= 1, got " + std::to_string(p.topk);
  if (p.window < 0) return "window must be >= 0, got " + std::to_string(p.window);
  if (p.seqlen_k > int64_t{SelectionTiles::kMaxChunks} * SelectionTiles::kKeyChunk) {
    return "the SparseK kernels take at most " +
           std::to_string(int64_t{SelectionTiles::kMaxChunks} * SelectionTiles::kKeyChunk) +
           " keys, got " + std::to_string(p.seqlen_k);
  }
  if (p.seqlen_q > (int64_t{1} << 30)) return "seqlen_q must be below 2^30";
  if (reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0) {
    return "the workspace must be 16-byte aligned";
  }
  return {};
}

}  // namespace

SelectionLayout make_selection_layout(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                      int64_t heads_kv) {
  SelectionLayout l;
  l.batch_heads = batch * heads_kv;
  l.chunks = (seqlen_k + SelectionTiles::kKeyChunk - 1) / SelectionTiles::kKeyChunk;
  l.tiles = (seqlen_q + SelectionTiles::kQueryTile - 1) / SelectionTiles::kQueryTile;
  l.anchors = (l.tiles + SelectionTiles::kAnchorEvery - 1) / SelectionTiles::kAnchorEvery + 1;
  const int64_t keys = l.batch_heads * l.padded_keys();
  int64_t offset = 0;
  l.key_u_offset = offset;
  offset += align256(keys * 4);
  l.sorted_u_offset = offset;
  offset += align256(keys * 4);
  l.sorted_key_offset = offset;
  offset += align256(keys * 4);
  l.anchor_tau_offset = offset;
  offset += align256(l.batch_heads * l.anchors * 4);
  l.plan_offset = offset;
  offset += align256(l.batch_heads * l.tiles * l.plan_row() * 4);
  l.anchor_ready_offset = offset;
  offset += align256(l.batch_heads * l.anchors * 4);
  l.workspace_bytes = offset;
  return l;
}

int64_t sparsek_workspace_bytes(int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                                int64_t heads_kv) {
  return make_selection_layout(batch, seqlen_q, seqlen_k, heads_kv).workspace_bytes;
}

std::string sparsek_select(const SparseKSelectParams& p, void* stream_ptr) {
  if (std::string error = check_select_params(p); !error.empty()) return error;
  ScopedDevice scoped_device;
  if (std::string error = scoped_device.enter(p.device); !error.empty()) return error;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  // Read before anything is launched, so that a bad setting launches nothing.
  bool dependent = false;
  if (std::string error = dependent_launch_allowed(&dependent); !error.empty()) return error;
  const SelectionLayout l = make_selection_layout(p.batch, p.seqlen_q, p.seqlen_k, p.heads_kv);
  const SelectionBuffers w = selection_buffers(l, p.workspace);
  if (poison_outputs_requested()) {
    if (!p.thresholds_given) {
      SPARSEK_RETURN_IF_CUDA_ERROR(
          cudaMemsetAsync(p.tau, 0xFF, l.batch_heads * p.seqlen_q * sizeof(float), stream));
    }
    SPARSEK_RETURN_IF_CUDA_ERROR(
        cudaMemsetAsync(p.workspace, 0xFF, l.workspace_bytes, stream));
  }
  const unsigned grid_y = static_cast<unsigned>(std::min<int64_t>(l.batch_heads, 65535));

  sort_key_chunks_kernel<<<dim3(static_cast<unsigned>(l.chunks), grid_y), kSortThreads, 0,
                           stream>>>(p, l, w);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  if (p.thresholds_given) return {};

  anchor_thresholds_kernel<<<dim3(static_cast<unsigned>(l.anchors), grid_y), kAnchorThreads,
                             0, stream>>>(p, l, w);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());

  const size_t smem = TilePlanSmem::bytes(l.chunks);
  if (smem > 48 * 1024) {
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(
        tile_thresholds_and_plan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(smem)));
  }
  // Tile-major where the tiles fit gridDim.y: the first blocks take the first tiles of every
  // kv head, whose anchors (the shortest prefixes) are solved first. Launched to start while
  // the anchor kernel runs (its blocks wait for their two anchors' flags).
  const bool tile_major = l.tiles <= 65535 && l.batch_heads <= 0x7fffffff;
  const dim3 grid = tile_major ? dim3(static_cast<unsigned>(l.batch_heads),
                                      static_cast<unsigned>(l.tiles))
                               : dim3(static_cast<unsigned>(l.tiles), grid_y);
  cudaLaunchAttribute attributes[1];
  const cudaLaunchConfig_t config =
      programmatic_launch_config(grid, dim3(kTileThreads), smem, stream, dependent, attributes);
  SPARSEK_RETURN_IF_CUDA_ERROR(
      cudaLaunchKernelEx(&config, tile_thresholds_and_plan_kernel, p, l, w, tile_major));
  return {};
}

}  // namespace sparsek
