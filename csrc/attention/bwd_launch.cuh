// Launching one instantiation of the backward's dq and dk/dv kernels (in that order: dk/dv
// reads the SparseK means dq writes): the mma.sync ones (bwd_dq_kernel.cuh,
// bwd_dkdv_kernel.cuh) or the Hopper ones (bwd_*_kernel_sm90.cuh), whose dk/dv kernel can
// also compute dq (atomics into a float32 accumulator; no dq kernel; SparseK's du then
// finishes in bwd_sparsek_du.h). Included only by the
// bwd_*hdim*.cu files, each of which instantiates one padded head dim of one kernel pair (so
// they compile in parallel).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "attention/bwd_dkdv_kernel.cuh"
#include "attention/bwd_dkdv_kernel_sm90.cuh"
#include "attention/bwd_dq_accumulator.h"
#include "attention/bwd_dq_kernel.cuh"
#include "attention/bwd_dq_kernel_sm90.cuh"
#include "attention/bwd_kv_accumulator.h"
#include "attention/bwd_sparsek_du.h"
#include "attention/bwd_tile_config.h"
#include "attention/bwd_workspace.h"
#include "attention/cta_order.h"
#include "runtime/cuda_check.h"
#include "runtime/debug_flags.h"
#include "runtime/side_stream.h"
#include "selection/sort_key_spans.h"

namespace sparsek {

// The parameters of batches [b0, b0 + count): every pointer moved to batch b0.
template <typename Element>
AttentionBwdParams batch_slice(const AttentionBwdParams& p, int64_t b0, int64_t count) {
  AttentionBwdParams chunk = p;
  chunk.batch = count;
  chunk.q = static_cast<const Element*>(p.q) + b0 * p.q_batch_stride;
  chunk.k = static_cast<const Element*>(p.k) + b0 * p.k_batch_stride;
  chunk.v = static_cast<const Element*>(p.v) + b0 * p.v_batch_stride;
  chunk.o = static_cast<const Element*>(p.o) + b0 * p.o_batch_stride;
  chunk.d_out = static_cast<const Element*>(p.d_out) + b0 * p.do_batch_stride;
  const int64_t rows = b0 * p.heads_q * p.seqlen_q;
  chunk.lse = p.lse + rows;
  if (p.d_lse) chunk.d_lse = p.d_lse + rows;
  chunk.dq = static_cast<Element*>(p.dq) + rows * p.head_dim;
  const int64_t keys = b0 * p.seqlen_k * p.heads_kv;
  chunk.dk = static_cast<Element*>(p.dk) + keys * p.head_dim;
  chunk.dv = static_cast<Element*>(p.dv) + keys * p.head_dim;
  if (p.dk_accum) {
    chunk.dk_accum = p.dk_accum + keys * p.head_dim;
    chunk.dv_accum = p.dv_accum + keys * p.head_dim;
  }
  if (p.sparsek) {
    chunk.du = p.du + keys;
    const int64_t heads = b0 * p.heads_kv;
    const int64_t padded = p.key_chunks * SelectionTiles::kKeyChunk;
    const int64_t plan_tiles =
        (p.seqlen_q + SelectionTiles::kQueryTile - 1) / SelectionTiles::kQueryTile;
    chunk.tau = p.tau + heads * p.seqlen_q;
    chunk.key_u = p.key_u + heads * padded;
    chunk.sorted_u = p.sorted_u + heads * padded;
    chunk.sorted_key = p.sorted_key + heads * padded;
    chunk.plan = p.plan + heads * plan_tiles * plan_row_entries(p.key_chunks);
    chunk.span_sorted_u = p.span_sorted_u + heads * p.key_span_stride;
    chunk.span_sorted_key = p.span_sorted_key + heads * p.key_span_stride;
    chunk.span_last_row = p.span_last_row + heads * p.key_span_stride;
    if (p.slice_order) {
      chunk.slice_order = p.slice_order + heads * (p.key_span_stride / KeySpans::kKdLeaf);
    }
    if (p.visiting_slices) chunk.visiting_slices = p.visiting_slices + heads;
  }
  return chunk;
}

template <typename Kernel>
std::string allow_smem(Kernel kernel, size_t smem_bytes) {
  if (smem_bytes > 48 * 1024) {
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  }
  return {};
}

// The dk/dv kernels: the mma.sync one and the Hopper one (which also takes the dq
// accumulator, null unless it computes dq).
using DkDvKernel = void (*)(AttentionBwdParams, const float*, const float*);
using DkDvSm90Kernel = void (*)(AttentionBwdParams, const float*, float*, float*);

// The fused SparseK dk/dv grid goes in thread-block clusters of `cluster` CTAs along its
// tiles: neighbouring slices of one sorted key span (cluster divides the slices of a span),
// which start at the same row and end near it. Launched together, they walk the same rows at
// the same time, so that each step's Q and dO tiles and dq accumulator tile, which otherwise
// come from DRAM for every CTA (bench/NOTES.md), can be shared in L2. The kernel does not use
// the cluster otherwise. Measured at S = 32k (bench/NOTES.md, "Clusters of span slices"):
// pairs 1-5% faster than single CTAs in four same-call comparisons, clusters of 4 slower at
// sigma 4.
constexpr int kSparseKDkDvClusterCtas = 2;

// The mma.sync kernel never runs in clusters (cluster is 1 there).
inline std::string launch_dkdv(DkDvKernel kernel, dim3 grid, bool, int, int threads,
                               size_t smem, cudaStream_t stream, const AttentionBwdParams& p,
                               const float* delta, float* mean, float*) {
  kernel<<<grid, threads, smem, stream>>>(p, delta, mean);
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return {};
}
// The cluster runs along the grid's tiles: gridDim.y tile-major, gridDim.x head-major.
inline std::string launch_dkdv(DkDvSm90Kernel kernel, dim3 grid, bool tile_major, int cluster,
                               int threads, size_t smem, cudaStream_t stream,
                               const AttentionBwdParams& p, const float* delta, float* mean,
                               float* dq_accum) {
  if (cluster == 1) {
    kernel<<<grid, threads, smem, stream>>>(p, delta, mean, dq_accum);
    SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
    return {};
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = tile_major ? 1 : static_cast<unsigned>(cluster);
  attribute[0].val.clusterDim.y = tile_major ? static_cast<unsigned>(cluster) : 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  SPARSEK_RETURN_IF_CUDA_ERROR(cudaLaunchKernelEx(&config, kernel, p, delta, mean, dq_accum));
  return {};
}

// delta, mean: the workspace's [B, Hq, T] buffers (mean null unless SparseK; with dq_accum
// the rows' sums of g over F_i, zeroed). dq_accum: the zeroed float32 accumulator
// (bwd_dq_accumulator.h) when the dk/dv kernel computes dq (the dq kernel is then not
// launched), else null.
template <typename DqCfg, typename DkDvCfg, typename Element, typename KeyVisit,
          typename QueryVisit, typename DqKernel, typename DkDvKernelT>
std::string launch_attention_bwd(DqKernel dq_kernel, DkDvKernelT dkdv_kernel,
                                 const AttentionBwdParams& p, float* delta, float* mean,
                                 float* dq_accum, cudaStream_t stream) {
  const size_t dq_smem = DqCfg::kSmemBytes + KeyVisit::smem_bytes(p);
  const size_t dkdv_smem = DkDvCfg::kSmemBytes + QueryVisit::smem_bytes(p);
  if (!dq_accum) {
    if (std::string error = allow_smem(dq_kernel, dq_smem); !error.empty()) return error;
  }
  if (std::string error = allow_smem(dkdv_kernel, dkdv_smem); !error.empty()) return error;

  const int64_t m_blocks = (p.seqlen_q + DqCfg::kBlockM - 1) / DqCfg::kBlockM;
  // SparseK: one dk/dv CTA per kBlockN entries of the span sort (bwd_query_visit.cuh), or
  // of the row bands' lists.
  const int64_t key_tiles =
      !p.sparsek ? (p.seqlen_k + DkDvCfg::kBlockN - 1) / DkDvCfg::kBlockN
      : p.key_band_rows > 0
          ? KeyBands::stride(p.seqlen_q, p.seqlen_k, p.key_band_rows) / DkDvCfg::kBlockN
          : key_span_count(p.seqlen_k, p.key_span) * (p.key_span / DkDvCfg::kBlockN);
  int sms = 0;
  SPARSEK_RETURN_IF_CUDA_ERROR(CtaOrder::sm_count(&sms));
  // The SparseK dk/dv grid's order (cta_order.h): tile-major for the span orders, the CTA
  // list with row bands (head-major where there is none), unless JAX_SPARSEK_BWD_GRID says
  // which.
  bool sparsek_tile_major = p.key_band_rows == 0;
  bool band_cta_list = p.sparsek && p.key_band_rows > 0 && p.band_ctas && dq_accum;
  if (p.sparsek) {
    const int requested = requested_bwd_grid();
    if (requested < 0) return "JAX_SPARSEK_BWD_GRID must be list, tiles or heads";
    if (requested == 1 || requested == 2) {
      sparsek_tile_major = requested == 1;
      band_cta_list = false;
    }
  }
  // SparseK with dq fused (the Hopper kernel; only it takes dq_accum): the dk/dv grid in
  // clusters along its tiles, and the warpgroups' idle steps skipped unless asked not to.
  int cluster = 1;
  bool skip_idle_halves = false;
  const int producer_fence = requested_bwd_producer_fence();
  if (producer_fence < 0) return "JAX_SPARSEK_BWD_PRODUCER_FENCE must be 1 or 0";
  if (p.sparsek && dq_accum) {
    const int skip = requested_bwd_skip_halves();
    if (skip < 0) return "JAX_SPARSEK_BWD_SKIP_HALVES must be 1 or 0";
    skip_idle_halves = skip == 1;
    const int requested = requested_bwd_cluster();
    if (requested < 0) return "JAX_SPARSEK_BWD_CLUSTER must be 1, 2, 4 or 8";
    cluster = requested > 0 ? requested : kSparseKDkDvClusterCtas;
    if ((p.key_span / DkDvCfg::kBlockN) % cluster != 0) {
      return "the SparseK dk/dv cluster must divide a key span's slices";
    }
  }
  if (band_cta_list) {
    // One 1-D grid of every (batch, kv head)'s capacity (the list fits int32: BandCtas::fits),
    // in clusters along it.
    AttentionBwdParams whole = p;
    whole.skip_idle_halves = skip_idle_halves;
    whole.producer_fences = producer_fence == 1;
    return launch_dkdv(dkdv_kernel, dim3(static_cast<unsigned>(p.batch * p.heads_kv * key_tiles)),
                       /*tile_major=*/false, cluster, DkDvCfg::kNThreads, dkdv_smem, stream,
                       whole, delta, mean, dq_accum);
  }
  // gridDim.y and z are at most 65535: larger batches go in several launches.
  constexpr int64_t kMaxBatchPerLaunch = 65535;
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxBatchPerLaunch) {
    const int64_t count = std::min(kMaxBatchPerLaunch, p.batch - b0);
    AttentionBwdParams chunk = batch_slice<Element>(p, b0, count);
    chunk.band_ctas = nullptr;  // the grids below, not the CTA list
    chunk.skip_idle_halves = skip_idle_halves;
    chunk.producer_fences = producer_fence == 1;
    // Each grid picks its CTA order from its own tile count: the flag is set per launch.
    const int64_t rows = b0 * p.heads_q * p.seqlen_q;
    float* chunk_delta = delta + rows;
    float* chunk_mean = mean ? mean + rows : nullptr;
    if (!dq_accum) {
      const CtaOrder::Grid dq_grid = CtaOrder::make(chunk, m_blocks, p.heads_q, sms);
      chunk.tile_major_grid = dq_grid.tile_major;
      dq_kernel<<<dq_grid.dims, DqCfg::kNThreads, dq_smem, stream>>>(chunk, chunk_delta,
                                                                     chunk_mean);
      SPARSEK_RETURN_IF_CUDA_ERROR(cudaGetLastError());
    }
    float* chunk_dq_accum =
        dq_accum ? dq_accum + DqAccumulatorTiles::elems(b0, p.seqlen_q, p.heads_q) : nullptr;
    const CtaOrder::Grid dkdv_grid =
        p.sparsek ? CtaOrder::make_sparsek_key_grid(chunk, key_tiles, sparsek_tile_major)
                  : CtaOrder::make(chunk, key_tiles, p.heads_kv, sms);
    chunk.tile_major_grid = dkdv_grid.tile_major;
    if (std::string error = launch_dkdv(dkdv_kernel, dkdv_grid.dims, dkdv_grid.tile_major,
                                        cluster, DkDvCfg::kNThreads, dkdv_smem, stream, chunk,
                                        chunk_delta, chunk_mean, chunk_dq_accum);
        !error.empty()) {
      return error;
    }
  }
  return {};
}

template <int kHeadDim, typename Element>
std::string run_attention_bwd(const AttentionBwdParams& p, float* delta, float* mean,
                              cudaStream_t stream) {
  using Sizes = BwdTileSizes<kHeadDim>;
  using Dq = typename Sizes::Dq;
  using DkDv = typename Sizes::DkDv;
  if (p.sparsek) {
    using KeyVisit = SparseKKeyVisitBwd<Dq>;
    using QueryVisit = SparseKQueryVisit<DkDv>;
    return launch_attention_bwd<Dq, DkDv, Element, KeyVisit, QueryVisit>(
        attention_bwd_dq_kernel<Dq, Element, KeyVisit>,
        attention_bwd_dkdv_kernel<DkDv, Element, QueryVisit>, p, delta, mean, nullptr,
        stream);
  }
  using KeyVisit = DenseKeyVisitBwd<Dq>;
  using QueryVisit = DenseQueryVisit<DkDv>;
  return launch_attention_bwd<Dq, DkDv, Element, KeyVisit, QueryVisit>(
      attention_bwd_dq_kernel<Dq, Element, KeyVisit>,
      attention_bwd_dkdv_kernel<DkDv, Element, QueryVisit>, p, delta, mean, nullptr, stream);
}

// One Hopper dq and dk/dv kernel pair on the workspace's buffers.
template <typename Dq, typename DkDv, typename Element, template <typename> class KeyVisit,
          template <typename> class QueryVisit>
std::string launch_attention_bwd_sm90(const AttentionBwdParams& p, const BwdRowBuffers& rows,
                                      cudaStream_t stream) {
  return launch_attention_bwd<Dq, DkDv, Element, KeyVisit<Dq>, QueryVisit<DkDv>>(
      attention_bwd_dq_sm90_kernel<Dq, Element, KeyVisit<Dq>>,
      attention_bwd_dkdv_sm90_kernel<DkDv, Element, QueryVisit<DkDv>>, p, rows.delta,
      rows.mean, rows.dq_accum, stream);
}

// The Hopper kernels (BwdSm90TileSizes). rows.dq_accum null: the dq kernel, then dk/dv CTAs
// of two warpgroups (dense modes) or one (SparseK). Otherwise the warp-specialized dk/dv
// kernel with dq fused (two warpgroups, every mode) adds dq into rows.dq_accum, which
// attention_bwd_prepare zeroed; in SparseK mode it also sums g over F_i into rows.mean (zeroed
// there too), and du finishes in bwd_sparsek_du.h on a side stream while dq is converted
// (runtime/side_stream.h: du's four small kernels take ~35 us at 32k, dq's conversion ~190).
template <int kHeadDim, typename Element>
std::string run_attention_bwd_sm90(const AttentionBwdParams& p, const BwdRowBuffers& rows,
                                   cudaStream_t stream) {
  using Sizes = BwdSm90TileSizes<kHeadDim>;
  using Dq = typename Sizes::Dq;
  if (!rows.dq_accum) {
    if (p.sparsek) {
      return launch_attention_bwd_sm90<Dq, typename Sizes::DkDvSparseK, Element,
                                       SparseKKeyVisitBwd, SparseKQueryVisit>(p, rows, stream);
    }
    return launch_attention_bwd_sm90<Dq, typename Sizes::DkDvDense, Element, DenseKeyVisitBwd,
                                     DenseQueryVisit>(p, rows, stream);
  }
  if (p.sparsek) {
    if (std::string error =
            launch_attention_bwd_sm90<Dq, typename Sizes::DkDvSparseKFusedDq, Element,
                                      SparseKKeyVisitBwd, SparseKQueryVisit>(p, rows, stream);
        !error.empty()) {
      return error;
    }
    // du's row counts read only the scores and tau, and only du's pass reads them: they run
    // on the side stream too, off the path to the dk/dv kernel (~15 us at 32k).
    cudaStream_t side = stream;
    if (std::string error = fork_side_stream(stream, &side); !error.empty()) return error;
    if (std::string error = sparsek_du_count_fractional_rows(p, rows.row_edges, side);
        !error.empty()) {
      return error;
    }
    if (std::string error = sparsek_du_subtract_means(p, rows, side); !error.empty()) {
      return error;
    }
    if (std::string error = store_dq_from_accumulator(p, rows.dq_accum, stream);
        !error.empty()) {
      return error;
    }
    if (p.key_band_rows > 0) {  // row bands: dk and dv were added up
      if (std::string error = store_kv_from_accumulators(p, stream); !error.empty()) {
        return error;
      }
    }
    return join_side_stream(stream, side);
  } else {
    if (std::string error =
            launch_attention_bwd_sm90<Dq, typename Sizes::DkDvDenseFusedDq, Element,
                                      DenseKeyVisitBwd, DenseQueryVisit>(p, rows, stream);
        !error.empty()) {
      return error;
    }
  }
  return store_dq_from_accumulator(p, rows.dq_accum, stream);
}

}  // namespace sparsek

#define SPARSEK_INSTANTIATE_BWD(kHeadDim)                                                  \
  template std::string sparsek::run_attention_bwd<kHeadDim, __half>(                       \
      const sparsek::AttentionBwdParams&, float*, float*, cudaStream_t);                   \
  template std::string sparsek::run_attention_bwd<kHeadDim, __nv_bfloat16>(                \
      const sparsek::AttentionBwdParams&, float*, float*, cudaStream_t)

#define SPARSEK_INSTANTIATE_BWD_SM90(kHeadDim)                                             \
  template std::string sparsek::run_attention_bwd_sm90<kHeadDim, __half>(                  \
      const sparsek::AttentionBwdParams&, const sparsek::BwdRowBuffers&, cudaStream_t);    \
  template std::string sparsek::run_attention_bwd_sm90<kHeadDim, __nv_bfloat16>(           \
      const sparsek::AttentionBwdParams&, const sparsek::BwdRowBuffers&, cudaStream_t)
