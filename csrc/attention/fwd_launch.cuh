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
#include "runtime/debug_flags.h"
#include "runtime/dependent_launch.h"
#include "runtime/grid_dependency.cuh"

namespace sparsek {

// dependent: the kernel waits for the grid before it (the selection's tile kernel) before it
// reads what that grid writes (fwd_kernel_sm90.cuh, begin_key_visit), so it may be launched
// to start while that grid finishes (runtime/grid_dependency.cuh).
// heads_per_cta: query heads a CTA takes in turn (the Hopper SparseK forward; 1 elsewhere).
template <typename Cfg, typename Element, typename KeyVisit, typename Kernel>
std::string launch_attention_fwd(Kernel kernel, const AttentionFwdParams& p,
                                 cudaStream_t stream, bool dependent = false,
                                 int heads_per_cta = 1) {
  const size_t smem_bytes = Cfg::kSmemBytes + KeyVisit::smem_bytes(p) +
                            chained_q_bytes<Cfg, Element>(heads_per_cta);
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
    const CtaOrder::Grid grid = CtaOrder::make(chunk, m_blocks, p.heads_q / heads_per_cta, sms);
    chunk.tile_major_grid = grid.tile_major;
    chunk.heads_per_cta = heads_per_cta;
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

// How many query heads of one kv group a CTA of the Hopper SparseK forward takes in turn.
// They share the kv head's visit: the plan and tau the CTA copies once, the key positions and
// scores, the gathered K and V rows (from L2). Chained, a head's start (the CTA's launch, the
// plan's copy and barrier, the first K tile's copy, Q's) overlaps the last head's products,
// while its end (the last P V, the output's stores) stays a drain of the consumers. Two heads
// measured 1.4-3.1% faster than one at 32k and 128k, four no faster than one (fewer, longer
// CTAs and three drains; bench/NOTES.md), and two 0.6-1.1% slower at 8k, whose grid is 8
// waves of one-head CTAs: so the launcher chains two heads where the grid keeps kMinWaves
// waves of CTAs. The second Q buffer must fit beside the plan in shared memory (it does up to
// ~2500 key chunks, 320k keys; past that, one head). JAX_SPARSEK_FWD_HEADS_PER_CTA asks for a
// count (the largest that divides the group, up to it, where shared memory allows).
struct ChainedHeads {
  static constexpr int kMaxHeads = 2;
  static constexpr int64_t kMinWaves = 8;

  static std::string choose(const AttentionFwdParams& p, int64_t m_blocks, size_t smem_bytes,
                            size_t second_q_bytes, int* heads) {
    *heads = 1;
    const int requested = requested_fwd_heads_per_cta();
    if (requested < 0) return "JAX_SPARSEK_FWD_HEADS_PER_CTA must be 1, 2, 4 or 8";
    int device = 0, sms = 0, max_smem = 0;
    SPARSEK_RETURN_IF_CUDA_ERROR(CtaOrder::sm_count(&sms));
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
    SPARSEK_RETURN_IF_CUDA_ERROR(
        cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (smem_bytes + second_q_bytes > static_cast<size_t>(max_smem)) return {};
    const int group = static_cast<int>(p.heads_q / p.heads_kv);
    const int cap = requested > 0 ? requested : kMaxHeads;
    for (int h = std::min(cap, group); h > 1; --h) {
      if (group % h != 0) continue;
      const int64_t ctas = m_blocks * (p.heads_q / h) * p.batch;
      if (requested > 0 || ctas >= kMinWaves * sms) {
        *heads = h;
        return {};
      }
    }
    return {};
  }
};

template <int kHeadDim, typename Element>
std::string run_attention_fwd_sm90(const AttentionFwdParams& p, cudaStream_t stream) {
  using Cfg = typename FwdSm90TileSizes<kHeadDim>::Config;
  if (p.sparsek) {
    using Visit = SparseKKeyVisit<Cfg>;
    bool dependent = false;
    if (p.follows_selection) {
      if (std::string error = dependent_launch_allowed(&dependent); !error.empty()) return error;
    }
    int heads_per_cta = 1;
    const int64_t m_blocks = (p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM;
    if (std::string error = ChainedHeads::choose(
            p, m_blocks, Cfg::kSmemBytes + Visit::smem_bytes(p),
            chained_q_bytes<Cfg, Element>(2), &heads_per_cta);
        !error.empty()) {
      return error;
    }
    return launch_attention_fwd<Cfg, Element, Visit>(
        attention_fwd_sm90_kernel<Cfg, Element, Visit>, p, stream, dependent, heads_per_cta);
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
