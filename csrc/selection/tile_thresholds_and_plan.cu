// Selection step 3, one block per (query tile, batch x kv head): every row's exact tau and
// the tile's visit plan (selection_params.h).
//
// tau never decreases down the rows, so the anchors before and after the tile bracket the
// tau of each of its rows. One read of the tile's common domain classifies its keys against
// that bracket (threshold_solve.cuh): most weigh a constant 0 or 1 or u - tau over the whole
// bracket and are only counted; the few "breakpoint keys" are listed in shared memory,
// sorted, with prefix sums. Each warp then solves a run of consecutive rows from that
// summary and the keys each row adds past the first row's domain, each row starting from the
// previous row's tau. If the list overflows (scores bunched inside the bracket), every row
// is solved from its whole prefix instead: slower, same result.
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
  constexpr int kRowsPerWarp = kTile / kWarps;
  extern __shared__ __align__(16) unsigned char smem[];
  double* scratch = reinterpret_cast<double*>(smem);  // kWarps * 15 doubles
  double* s_prefix = scratch + kWarps * 15;           // kTileBreakpointCapacity + 1
  float* s_breakpoints = reinterpret_cast<float*>(s_prefix + kTileBreakpointCapacity + 1);
  float* s_growth = s_breakpoints + kTileBreakpointCapacity;  // keys past the first row's domain
  float* s_tau = s_growth + kTile;
  int* s_counter = reinterpret_cast<int*>(s_tau + kTile);
  int* s_chunk = s_counter + 16;  // [0]: breakpoints listed, [1]: first row past K keys, [8, 16): scan scratch; then candidates per whole chunk of the first row's domain

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t tile = blockIdx.x;
  const int64_t row0 = tile * kTile;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kTile), p.seqlen_q - row0));
  const int64_t n0 = sparse_domain_end(row0, p.seqlen_q, p.seqlen_k, p.window);
  const int64_t n1 = sparse_domain_end(row0 + rows - 1, p.seqlen_q, p.seqlen_k, p.window);
  const int growth = static_cast<int>(n1 - n0);  // < kTile: one key per row at most
  const int64_t anchor = tile / SelectionTiles::kAnchorEvery;
  const double topk = static_cast<double>(p.topk);
  auto own_keys = [&](int r) {
    return static_cast<int>(sparse_domain_end(row0 + r, p.seqlen_q, p.seqlen_k, p.window) - n0);
  };

  for (int64_t bh = blockIdx.y; bh < l.batch_heads; bh += gridDim.y) {
    const float* u = w.key_u + bh * l.padded_keys();
    const float anchor_lo = w.anchor_tau[bh * l.anchors + anchor];
    const float anchor_hi = w.anchor_tau[bh * l.anchors + anchor + 1];
    for (int i = tid; i < growth; i += kTileThreads) s_growth[i] = u[n0 + i];
    if (tid == 0) {
      s_counter[0] = 0;
      s_counter[1] = rows;
    }
    __syncthreads();

    float lo = anchor_lo;
    const float hi = anchor_hi;
    if (anchor_hi != -INFINITY && lo == -INFINITY) {
      // The tile's first rows may still take every key. The first row r* past K finite keys
      // is solved exactly from its prefix: its tau bounds every later row's from below.
      double finite[1] = {0.0};
      for (int64_t j = tid; j < n0; j += kTileThreads) finite[0] += u[j] > -INFINITY ? 1.0 : 0.0;
      block_sum<kTileThreads, 1>(finite, scratch);
      if (tid < rows) {
        const int own = own_keys(tid);
        int count = 0;
        for (int j = 0; j < own; ++j) count += s_growth[j] > -INFINITY;
        if (finite[0] + count > topk) atomicMin(s_counter + 1, tid);
      }
      __syncthreads();
      const int first = s_counter[1];
      if (first < rows) {
        lo = solve_threshold_block<kTileThreads>(u, n0 + own_keys(first), p.topk, scratch);
      }
    }

    if (anchor_hi == -INFINITY || lo == -INFINITY) {
      // Even the anchor after the tile (or the tile's last row) has at most K keys: so does
      // every row of the tile.
      for (int r = tid; r < rows; r += kTileThreads) s_tau[r] = -INFINITY;
    } else {
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
        // Sorted (which also makes the list's order, filled by atomics, not matter), then
        // prefix sums in a fixed order.
        int padded = 1;
        while (padded < breakpoints) padded <<= 1;
        for (int i = breakpoints + tid; i < padded; i += kTileThreads) {
          s_breakpoints[i] = -INFINITY;
        }
        block_sort_descending<kTileThreads>(s_breakpoints, padded);
        const int per_thread = (breakpoints + kTileThreads - 1) / kTileThreads;
        const int begin = min(tid * per_thread, breakpoints);
        const int end = min(begin + per_thread, breakpoints);
        double local = 0.0;
        for (int i = begin; i < end; ++i) local += s_breakpoints[i];
        double total = 0.0;
        double running = block_exclusive_scan<kTileThreads>(local, total, scratch);
        for (int i = begin; i < end; ++i) {
          running += s_breakpoints[i];
          s_prefix[i + 1] = running;
        }
        if (tid == 0) s_prefix[0] = 0.0;
        __syncthreads();

        BracketSummary summary;
        summary.ones = sums[1];
        summary.linear = sums[2];
        summary.linear_sum = sums[3];
        summary.breakpoints = s_breakpoints;
        summary.prefix = s_prefix;
        summary.count = breakpoints;
        float previous = lo;  // tau of the warp's previous row (rows before r* have none)
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const int r = warp * kRowsPerWarp + i;
          if (r >= rows) break;
          const int own = own_keys(r);
          float finite = 0.f;
          for (int j = lane; j < own; j += 32) finite += s_growth[j] > -INFINITY ? 1.f : 0.f;
          finite = warp_sum(finite);
          float tau = -INFINITY;
          if (sums[0] + finite > topk) {
            tau = solve_threshold_warp(summary, s_growth, own, lo, hi, previous, p.topk, lane);
            previous = tau;
          }
          if (lane == 0) s_tau[r] = tau;
        }
      } else {
        for (int r = 0; r < rows; ++r) {
          const float tau = solve_threshold_block<kTileThreads>(u, n0 + own_keys(r), p.topk,
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
