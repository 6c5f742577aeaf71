// Selection step 3, one block per (query tile, batch x kv head): every row's exact tau and
// the tile's visit plan (selection_params.h).
//
// tau never decreases down the rows, so the anchors before and after the tile bracket the
// tau of each of its rows. One read of the tile's common domain classifies its keys against
// that bracket (threshold_solve.cuh): most weigh a constant 0 or 1 or u - tau over the whole
// bracket and are only counted; the few "breakpoint keys" are listed in shared memory with
// the keys each row adds past the first row's domain. Each warp then solves its rows from
// that summary and those lists. If the list overflows (scores bunched inside the bracket),
// every row is solved from its whole prefix instead: slower, same result.
#include <cmath>

#include "selection/block_reduce.cuh"
#include "selection/selection_kernels.cuh"
#include "selection/threshold_solve.cuh"

namespace sparsek {

__global__ void __launch_bounds__(kTileThreads)
    tile_thresholds_and_plan_kernel(SparseKSelectParams p, SelectionLayout l,
                                    SelectionBuffers w) {
  constexpr int kTile = SelectionTiles::kQueryTile;
  constexpr int kChunk = SelectionTiles::kKeyChunk;
  constexpr int kWarps = kTileThreads / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  double* scratch = reinterpret_cast<double*>(smem);  // kWarps * 15 doubles
  float* s_breakpoints = reinterpret_cast<float*>(smem + kWarps * 15 * sizeof(double));
  float* s_growth = s_breakpoints + kTileBreakpointCapacity;  // keys past the first row's domain
  float* s_tau = s_growth + kTile;
  int* s_counter = reinterpret_cast<int*>(s_tau + kTile);
  int* s_chunk = s_counter + 16;  // [0]: breakpoints listed, [8, 16): scan scratch; then candidates per whole chunk of the first row's domain

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t tile = blockIdx.x;
  const int64_t row0 = tile * kTile;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kTile), p.seqlen_q - row0));
  const int64_t n0 = sparse_domain_end(row0, p.seqlen_q, p.seqlen_k, p.window);
  const int64_t n1 = sparse_domain_end(row0 + rows - 1, p.seqlen_q, p.seqlen_k, p.window);
  const int growth = static_cast<int>(n1 - n0);  // < kTile: one key per row at most
  const int64_t anchor = tile / SelectionTiles::kAnchorEvery;
  const double topk = static_cast<double>(p.topk);

  for (int64_t bh = blockIdx.y; bh < l.batch_heads; bh += gridDim.y) {
    const float* u = w.key_u + bh * l.padded_keys();
    const float anchor_lo = w.anchor_tau[bh * l.anchors + anchor];
    const float anchor_hi = w.anchor_tau[bh * l.anchors + anchor + 1];
    for (int i = tid; i < growth; i += kTileThreads) s_growth[i] = u[n0 + i];
    if (tid == 0) s_counter[0] = 0;
    __syncthreads();

    if (anchor_hi == -INFINITY) {
      // Even the anchor after the tile has at most K keys: so does every row of the tile.
      for (int r = tid; r < rows; r += kTileThreads) s_tau[r] = -INFINITY;
    } else {
      float lo = anchor_lo;
      const float hi = anchor_hi;
      if (lo == -INFINITY) {
        // Some rows of the tile still take every key: bracket from below by the smallest
        // finite score (f(min - 1) = domain size).
        float smallest = INFINITY, unused = -INFINITY;
        for (int64_t j = tid; j < n1; j += kTileThreads) {
          const float v = u[j];
          if (v > -INFINITY) smallest = fminf(smallest, v);
        }
        block_min_max<kTileThreads>(smallest, unused, reinterpret_cast<float*>(scratch));
        lo = smallest - 1.f;
      }
      double sums[4] = {0.0, 0.0, 0.0, 0.0};  // finite keys, ones, linear, linear sum
      for (int64_t j = tid; j < n0; j += kTileThreads) {
        const float v = u[j];
        if (!(v > -INFINITY)) continue;
        sums[0] += 1.0;
        if (v <= lo) continue;
        if (v >= hi + 1.f) {
          sums[1] += 1.0;
        } else if (v >= hi && v <= lo + 1.f) {
          sums[2] += 1.0;
          sums[3] += v;
        } else {
          const int k = atomicAdd(s_counter, 1);
          if (k < kTileBreakpointCapacity) s_breakpoints[k] = v;
        }
      }
      block_sum<kTileThreads, 4>(sums, scratch);
      const int breakpoints = s_counter[0];
      if (breakpoints <= kTileBreakpointCapacity) {
        BracketSummary summary;
        summary.ones = sums[1];
        summary.linear = sums[2];
        summary.linear_sum = sums[3];
        for (int r = warp; r < rows; r += kWarps) {
          const int own = static_cast<int>(
              sparse_domain_end(row0 + r, p.seqlen_q, p.seqlen_k, p.window) - n0);
          float finite = 0.f;
          for (int j = lane; j < own; j += 32) finite += s_growth[j] > -INFINITY ? 1.f : 0.f;
          finite = warp_sum(finite);
          float tau = -INFINITY;
          if (sums[0] + finite > topk) {
            tau = solve_threshold_warp(summary, s_breakpoints, breakpoints, s_growth, own, lo,
                                       hi, p.topk, lane);
          }
          if (lane == 0) s_tau[r] = tau;
        }
      } else {
        for (int r = 0; r < rows; ++r) {
          const float tau = solve_threshold_block<kTileThreads>(
              u, sparse_domain_end(row0 + r, p.seqlen_q, p.seqlen_k, p.window), p.topk,
              scratch);
          if (tid == 0) s_tau[r] = tau;
        }
      }
    }
    __syncthreads();
    for (int r = tid; r < rows; r += kTileThreads) {
      p.tau[bh * p.seqlen_q + row0 + r] = s_tau[r];
    }

    // The plan: candidates per whole chunk of the first row's domain, as prefix sums.
    const float first_tau = s_tau[0];
    const int chunks = static_cast<int>(n0 / kChunk);
    for (int c = warp; c < chunks; c += kWarps) {
      const float4 v = reinterpret_cast<const float4*>(u + static_cast<int64_t>(c) * kChunk)[lane];
      int above = (v.x > first_tau) + (v.y > first_tau) + (v.z > first_tau) + (v.w > first_tau);
      above = warp_sum(above);
      if (lane == 0) s_chunk[c] = above;
    }
    __syncthreads();
    const int per_thread = (chunks + kTileThreads - 1) / kTileThreads;
    const int begin = min(tid * per_thread, chunks);
    const int end = min(begin + per_thread, chunks);
    int local = 0;
    for (int c = begin; c < end; ++c) local += s_chunk[c];
    int total = 0;
    int running = block_exclusive_scan<kTileThreads>(local, total, s_counter + 8);
    int32_t* plan = w.plan + (bh * l.tiles + tile) * l.plan_row();
    for (int c = begin; c < end; ++c) {
      plan[c] = running;
      running += s_chunk[c];
    }
    if (tid == 0) plan[chunks] = total;
    __syncthreads();
  }
}

}  // namespace sparsek
