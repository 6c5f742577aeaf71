// Launching one instantiation of the forward kernel (the mma.sync one, fwd_kernel.cuh, or the
// Hopper one, fwd_kernel_sm90.cuh). Included only by the fwd_*hdim*.cu files, each of which
// instantiates one padded head dim of one kernel (so they compile in parallel).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "attention/cta_order.h"
#include "attention/fwd_kernel.cuh"
#include "attention/fwd_kernel_sm90.cuh"
#include "attention/tile_config.h"
#include "runtime/cuda_check.h"
#include "runtime/dependent_launch.h"
#include "runtime/grid_dependency.cuh"

namespace sparsek {

// dependent: the kernel waits for the grid before it (the selection's tile kernel) before it
// reads what that grid writes (fwd_kernel_sm90.cuh, begin_key_visit), so it may be launched
// to start while that grid finishes (runtime/grid_dependency.cuh).
template <typename Cfg, typename Element, typename KeyVisit, typename Kernel>
std::string launch_attention_fwd(Kernel kernel, const AttentionFwdParams& p,
                                 cudaStream_t stream, bool dependent = false) {
  const size_t smem_bytes = Cfg::kSmemBytes + KeyVisit::smem_bytes(p);
  if (smem_bytes > 48 * 1024) {
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  }
  const int64_t m_blocks = (p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
  int sms = 0;
  SPARSEK_RETURN_IF_CUDA_ERROR(CtaOrder::sm_count(&sms));
  // gridDim.z is at most 65535: larger batches go in several launches.
  constexpr int64_t kMaxBatchPerLaunch = 65535;
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxBatchPerLaunch) {
    AttentionFwdParams chunk = p;
    chunk.batch = std::min(kMaxBatchPerLaunch, p.batch - b0);
    chunk.q = static_cast<const Element*>(p.q) + b0 * p.q_batch_stride;
    chunk.k = static_cast<const Element*>(p.k) + b0 * p.k_batch_stride;
    chunk.v = static_cast<const Element*>(p.v) + b0 * p.v_batch_stride;
    chunk.o = static_cast<Element*>(p.o) + b0 * p.o_batch_stride;
    chunk.lse = p.lse + b0 * p.heads_q * p.seqlen_q;
    if (p.sparsek) {
      const int64_t heads = b0 * p.heads_kv;
      const int64_t padded = p.key_chunks * SelectionTiles::kKeyChunk;
      chunk.tau = p.tau + heads * p.seqlen_q;
      chunk.key_u = p.key_u + heads * padded;
      chunk.sorted_u = p.sorted_u + heads * padded;
      chunk.sorted_key = p.sorted_key + heads * padded;
      chunk.plan = p.plan + heads * m_blocks * plan_row_entries(p.key_chunks);
    }
    const CtaOrder::Grid grid = CtaOrder::make(chunk, m_blocks, p.heads_q, sms);
    chunk.tile_major_grid = grid.tile_major;
    cudaLaunchAttribute attributes[1];
    const cudaLaunchConfig_t config =
        programmatic_launch_config(grid.dims, dim3(Cfg::kNThreads), smem_bytes, stream,
                                   dependent && b0 == 0, attributes);
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaLaunchKernelEx(&config, kernel, chunk));
  }
  return {};
}

template <int kHeadDim, typename Element>
std::string run_attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  using Cfg = typename FwdTileSizes<kHeadDim>::Config;
  if (p.sparsek) {
    using Visit = SparseKKeyVisit<Cfg>;
    return launch_attention_fwd<Cfg, Element, Visit>(attention_fwd_kernel<Cfg, Element, Visit>,
                                                     p, stream);
  }
  using Visit = DenseKeyVisit<Cfg>;
  return launch_attention_fwd<Cfg, Element, Visit>(attention_fwd_kernel<Cfg, Element, Visit>, p,
                                                   stream);
}

template <int kHeadDim, typename Element>
std::string run_attention_fwd_sm90(const AttentionFwdParams& p, cudaStream_t stream) {
  using Cfg = typename FwdSm90TileSizes<kHeadDim>::Config;
  if (p.sparsek) {
    using Visit = SparseKKeyVisit<Cfg>;
    bool dependent = false;
    if (p.follows_selection) {
      if (std::string error = dependent_launch_allowed(&dependent); !error.empty()) return error;
    }
    return launch_attention_fwd<Cfg, Element, Visit>(
        attention_fwd_sm90_kernel<Cfg, Element, Visit>, p, stream, dependent);
  }
  using Visit = DenseKeyVisit<Cfg>;
  return launch_attention_fwd<Cfg, Element, Visit>(attention_fwd_sm90_kernel<Cfg, Element, Visit>,
                                                   p, stream);
}

}  // namespace sparsek

#define SPARSEK_INSTANTIATE_FWD(kHeadDim)                                                  \
  template std::string sparsek::run_attention_fwd<kHeadDim, __half>(                       \
      const sparsek::AttentionFwdParams&, cudaStream_t);                                   \
  template std::string sparsek::run_attention_fwd<kHeadDim, __nv_bfloat16>(                \
      const sparsek::AttentionFwdParams&, cudaStream_t)

#define SPARSEK_INSTANTIATE_FWD_SM90(kHeadDim)                                             \
  template std::string sparsek::run_attention_fwd_sm90<kHeadDim, __half>(                  \
      const sparsek::AttentionFwdParams&, cudaStream_t);                                   \
  template std::string sparsek::run_attention_fwd_sm90<kHeadDim, __nv_bfloat16>(           \
      const sparsek::AttentionFwdParams&, cudaStream_t)
