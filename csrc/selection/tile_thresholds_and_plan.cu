// Selection step 3, one block per (query tile, batch x kv head): every row's exact tau and
// the tile's visit plan (selection_params.h).
//
// tau never decreases down the rows, so the anchors before and after the tile bracket the
// tau of each of its rows. One read of the tile's common domain classifies its keys against
// that bracket (threshold_solve.cuh): most weigh a constant 0 or 1 or u - tau over the whole
// bracket and are only counted; the few "breakpoint keys" are listed in shared memory,
// sorted, with prefix sums. Before the sort the bracket is narrowed to the tile's own first
// and last rows (tile_bracket.cuh) and the listed keys are weighed again: tens stay listed
// instead of hundreds. The keys the rows add past the first row's domain get prefix
// counts and sums the same way. Then each thread solves one row on its own, from a start
// interpolated between the anchors (tau varies smoothly down the rows). If the list
// overflows (scores bunched inside the bracket), every row is solved from its whole prefix
// instead: slower, same result.
#include <cmath>

#include "runtime/grid_dependency.cuh"
#include "selection/block_reduce.cuh"
#include "selection/selection_kernels.cuh"
#include "selection/threshold_solve.cuh"
#include "selection/tile_bracket.cuh"

namespace sparsek {

// Three blocks an SM (80 registers; the spills cost one local load a quad in the domain pass,
// the rest is outside the loops): every phase of a block waits on latency (loads, barriers,
// one thread's row solve), and a third block hides more of it than the spills cost (-9% at
// 32k, NVIDIA H200).
__global__ void __launch_bounds__(kTileThreads, 3)
    tile_thresholds_and_plan_kernel(SparseKSelectParams p, SelectionLayout l,
                                    SelectionBuffers w, bool tile_major) {
  // The attention kernel may start once every block of this grid runs; it waits for the
  // whole grid (runtime/grid_dependency.cuh) before it reads a plan.
  launch_dependent_grids();
  constexpr int kTile = SelectionTiles::kQueryTile;
  constexpr int kChunk = SelectionTiles::kKeyChunk;
  constexpr int kWarps = kTileThreads / 32;
  static_assert(kChunk < (1 << 16), "a chunk's two counts share one warp sum");
  static_assert(kTile <= kTileThreads, "a thread a row");
  extern __shared__ __align__(16) unsigned char smem[];
  double* scratch = reinterpret_cast<double*>(smem + TilePlanSmem::kScratch);
  double* s_prefix = reinterpret_cast<double*>(smem + TilePlanSmem::kPrefix);
  float* s_breakpoints = reinterpret_cast<float*>(smem + TilePlanSmem::kBreakpoints);
  // The keys past the first row's domain.
  float* s_growth = reinterpret_cast<float*>(smem + TilePlanSmem::kGrowth);
  float* s_tau = reinterpret_cast<float*>(smem + TilePlanSmem::kTau);
  // The keys still listed once the bracket is narrowed to the tile's rows.
  float* s_relisted = reinterpret_cast<float*>(smem + TilePlanSmem::kRelisted);
  // [0]: breakpoints listed, [1]: first row past K keys, [2]: keys relisted
  int* s_counter = reinterpret_cast<int*>(smem + TilePlanSmem::kCounters);
  // Shared by the growth summary and, once every tau is known, the plan's chunk counts.
  unsigned char* s_shared = smem + TilePlanSmem::kShared;
  int* s_chunk = reinterpret_cast<int*>(s_shared);
  GrowthSummary growth_summary;
  growth_summary.linear_sum = reinterpret_cast<double*>(s_shared);
  growth_summary.finite = reinterpret_cast<int*>(growth_summary.linear_sum + kTile + 1);
  growth_summary.ones = growth_summary.finite + kTile + 1;
  growth_summary.linear = growth_summary.ones + kTile + 1;
  growth_summary.listed = growth_summary.linear + kTile + 1;
  growth_summary.listed_u = reinterpret_cast<float*>(growth_summary.listed + kTile + 1);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t tile = tile_major ? blockIdx.y : blockIdx.x;
  const int64_t bh_first = tile_major ? blockIdx.x : blockIdx.y;
  const int64_t bh_stride = tile_major ? gridDim.x : gridDim.y;
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

  for (int64_t bh = bh_first; bh < l.batch_heads; bh += bh_stride) {
    const float* u = w.key_u + bh * l.padded_keys();
    for (int i = tid; i < growth; i += kTileThreads) s_growth[i] = u[n0 + i];
    if (tid == 0) {
      s_counter[0] = 0;
      s_counter[1] = rows;
      s_counter[2] = 0;
      // The anchor kernel may still run (a dependent launch): wait for this tile's two.
      acquire_wait_flag(w.anchor_ready + bh * l.anchors + anchor);
      acquire_wait_flag(w.anchor_ready + bh * l.anchors + anchor + 1);
    }
    __syncthreads();
    // Past L1: another block of this SM may have read the line before the anchors were set.
    const float anchor_lo = __ldcg(w.anchor_tau + bh * l.anchors + anchor);
    const float anchor_hi = __ldcg(w.anchor_tau + bh * l.anchors + anchor + 1);

    float lo = anchor_lo;
    float hi = anchor_hi;
    int64_t lo_row = anchor_row(anchor, p.seqlen_q);  // where tau is lo
    int64_t hi_row = anchor_row(anchor + 1, p.seqlen_q);
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
        lo_row = row0 + first;
      }
    }

    if (anchor_hi == -INFINITY || lo == -INFINITY) {
      // Even the anchor after the tile (or the tile's last row) has at most K keys: so does
      // every row of the tile.
      for (int r = tid; r < rows; r += kTileThreads) s_tau[r] = -INFINITY;
    } else {
      // Counts in integers, the linear keys' sum in double, each thread's keys in a fixed
      // order (deterministic). Without branches (bracket_weight's cases as predicates): the
      // listed keys of a warp's quads take one atomic a warp, their slots from ballots.
      int finite_keys = 0, ones = 0, linear = 0;
      double linear_sum = 0.0;
      const float lo_plus_1 = lo + 1.f, hi_plus_1 = hi + 1.f;
      const unsigned lanes_before = (1u << lane) - 1u;
      // Every lane of the warp calls this (v = -inf where it has no key).
      auto classify_quad = [&](const float (&v)[4]) {
        bool listed[4];
        unsigned listed_lanes[4];
        int listed_count = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool above_lo = v[e] > lo;
          const bool is_one = above_lo && v[e] >= hi_plus_1;
          const bool is_linear = above_lo && !is_one && v[e] >= hi && v[e] <= lo_plus_1;
          listed[e] = above_lo && !is_one && !is_linear;
          finite_keys += v[e] > -INFINITY;
          ones += is_one;
          linear += is_linear;
          linear_sum += is_linear ? static_cast<double>(v[e]) : 0.0;
          listed_lanes[e] = __ballot_sync(0xffffffffu, listed[e]);
          listed_count += __popc(listed_lanes[e]);
        }
        if (listed_count == 0) return;  // the same for the whole warp
        int slot = 0;
        if (lane == 0) slot = atomicAdd(s_counter, listed_count);
        slot = __shfl_sync(0xffffffffu, slot, 0);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int k = slot + __popc(listed_lanes[e] & lanes_before);
          if (listed[e] && k < kTileBreakpointCapacity) s_breakpoints[k] = v[e];
          slot += __popc(listed_lanes[e]);
        }
      };
      // The rows of u start 16-byte aligned (whole chunks). A warp runs while any of its lanes
      // has a quad left. The next quad's load is issued before this one is classified: two in
      // flight a thread.
      const int64_t quads = n0 / 4;
      const float4* u4 = reinterpret_cast<const float4*>(u);
      const float4 none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
      auto quad = [&](int64_t q) { return q < quads ? u4[q] : none; };
      float4 next0 = quad(tid), next1 = quad(tid + kTileThreads);
      for (int64_t q = tid; q - lane < quads; q += 2 * kTileThreads) {
        const float v0[4] = {next0.x, next0.y, next0.z, next0.w};
        const float v1[4] = {next1.x, next1.y, next1.z, next1.w};
        next0 = quad(q + 2 * kTileThreads);
        next1 = quad(q + 3 * kTileThreads);
        classify_quad(v0);
        classify_quad(v1);
      }
      if (warp == 0) {
        // The last n0 % 4 keys.
        const int64_t j = quads * 4 + lane;
        const float v[4] = {j < n0 ? u[j] : -INFINITY, -INFINITY, -INFINITY, -INFINITY};
        classify_quad(v);
      }
      double sums[4] = {static_cast<double>(finite_keys), static_cast<double>(ones),
                        static_cast<double>(linear), linear_sum};
      block_sum<kTileThreads, 4>(sums, scratch);
      int breakpoints = s_counter[0];
      if (breakpoints <= kTileBreakpointCapacity) {
        float* list = s_breakpoints;
        BracketSums bracket_sums{sums[1], sums[2], sums[3]};
        auto along = [&](int64_t row) {
          return hi_row > lo_row
                     ? static_cast<float>(row - lo_row) / static_cast<float>(hi_row - lo_row)
                     : 0.f;
        };
        {
          // The tile's own bracket (tile_bracket.cuh), then its keys weighed against it.
          TileBracketInput in;
          in.listed = s_breakpoints;
          in.count = breakpoints;
          in.growth_u = s_growth;
          in.growth = growth;
          in.sums = bracket_sums;
          in.first_row_finite = sums[0] > topk;  // the first row's domain is the common one
          const float start[2] = {lo + (hi - lo) * along(row0),
                                  lo + (hi - lo) * along(row0 + rows - 1)};
          float narrow_lo, narrow_hi;
          narrow_tile_bracket<kTileThreads>(in, lo, hi, start, p.topk, narrow_lo, narrow_hi,
                                            reinterpret_cast<int64_t*>(scratch));
          if (narrow_lo > lo || narrow_hi < hi) {
            BracketSums narrow_sums = bracket_sums;
            const int relisted = relist_keys<kTileThreads>(
                s_breakpoints, breakpoints, narrow_lo, narrow_hi, s_relisted,
                kTileRelistCapacity, s_counter + 2, narrow_sums,
                reinterpret_cast<int64_t*>(scratch));
            if (relisted <= kTileRelistCapacity) {
              list = s_relisted;
              breakpoints = relisted;
              bracket_sums = narrow_sums;
              if (narrow_lo > lo) lo_row = row0;
              if (narrow_hi < hi) hi_row = row0 + rows - 1;
              lo = narrow_lo;
              hi = narrow_hi;
            }
          }
        }
        // Sorted (which also makes the list's order, filled by atomics, not matter), then
        // prefix sums in a fixed order.
        if (warp == kWarps - 1) growth_summary.build_warp(s_growth, growth, lo, hi, lane);
        if (breakpoints <= kTileThreads) {
          block_rank_sort_descending<kTileThreads>(list, breakpoints);
        } else {
          int padded = 1;
          while (padded < breakpoints) padded <<= 1;
          for (int i = breakpoints + tid; i < padded; i += kTileThreads) list[i] = -INFINITY;
          block_sort_descending<kTileThreads>(list, padded);  // starts with a barrier
        }
        const int per_thread = (breakpoints + kTileThreads - 1) / kTileThreads;
        const int begin = min(tid * per_thread, breakpoints);
        const int end = min(begin + per_thread, breakpoints);
        double local = 0.0;
        for (int i = begin; i < end; ++i) local += list[i];
        double total = 0.0;
        double running = block_exclusive_scan<kTileThreads>(local, total, scratch);
        for (int i = begin; i < end; ++i) {
          running += list[i];
          s_prefix[i + 1] = running;
        }
        if (tid == 0) s_prefix[0] = 0.0;
        __syncthreads();

        BracketSummary summary;
        summary.sums = bracket_sums;
        summary.breakpoints = list;
        summary.prefix = s_prefix;
        summary.count = breakpoints;
        if (tid < rows) {
          const int own = own_keys(tid);
          float tau = -INFINITY;
          if (sums[0] + growth_summary.finite[own] > topk) {
            const float start = lo + (hi - lo) * along(row0 + tid);
            tau = solve_threshold_row(summary, growth_summary, own, lo, hi, start, p.topk);
          }
          s_tau[tid] = tau;
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
    // Exact taus never decrease down the rows, and the plan below counts on it; rows solved
    // apart can round to an ulp below the row before, so the tile keeps the running maximum.
    if (warp == 0) {
      static_assert(kTile == 4 * 32, "four rows a lane");
      float run[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 4 * lane + e;
        run[e] = r < rows ? s_tau[r] : -INFINITY;
        if (e > 0) run[e] = fmaxf(run[e], run[e - 1]);
      }
      float before = warp_inclusive_scan(run[3], [](float a, float b) { return fmaxf(a, b); });
      before = __shfl_up_sync(0xffffffffu, before, 1);
      if (lane == 0) before = -INFINITY;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 4 * lane + e;
        if (r < rows) s_tau[r] = fmaxf(run[e], before);
      }
    }
    __syncthreads();
    for (int r = tid; r < rows; r += kTileThreads) {
      p.tau[bh * p.seqlen_q + row0 + r] = s_tau[r];
    }

    // The plan: candidates per whole chunk of the first row's domain, split into full keys
    // (gate 1 at the last row, hence at every row), sure ones (a gate above 0 at every row)
    // and gated ones, as prefix sums (selection_params.h).
    const float first_tau = s_tau[0];
    const float last_tau = s_tau[rows - 1];
    const bool lists_full = plan_lists_full_keys(l.chunks);
    const bool lists_sure = plan_lists_sure_keys(l.chunks);
    const int chunks = static_cast<int>(n0 / kChunk);
    int* s_full = s_chunk + chunks;  // fits: TilePlanSmem::bytes
    int* s_sure = s_full + (lists_full ? chunks : 0);
    // A warp a chunk (a float4 a lane), kPlanLoads chunks' loads in flight a warp: one at a
    // time, each iteration waited for its load and then its warp sum.
    constexpr int kPlanLoads = 4;
    const float4* u_chunks = reinterpret_cast<const float4*>(u);
    for (int c0 = warp; c0 < chunks; c0 += kPlanLoads * kWarps) {
      float4 v[kPlanLoads];
#pragma unroll
      for (int e = 0; e < kPlanLoads; ++e) {
        const int c = c0 + e * kWarps;
        v[e] = c < chunks ? u_chunks[static_cast<int64_t>(c) * (kChunk / 4) + lane]
                          : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      }
#pragma unroll
      for (int e = 0; e < kPlanLoads; ++e) {
        const int c = c0 + e * kWarps;
        const float4 x = v[e];
        const int above =
            (x.x > first_tau) + (x.y > first_tau) + (x.z > first_tau) + (x.w > first_tau);
        const int sure =
            (x.x > last_tau) + (x.y > last_tau) + (x.z > last_tau) + (x.w > last_tau);
        const int full = (x.x - last_tau >= 1.f) + (x.y - last_tau >= 1.f) +
                         (x.z - last_tau >= 1.f) + (x.w - last_tau >= 1.f);
        // One warp sum for the three counts (each at most kChunk < 2^10). full <= sure <=
        // above: last_tau >= first_tau, and u - last_tau >= 1 implies u > last_tau.
        static_assert(kChunk < (1 << 10), "ten bits a count");
        const int packed = warp_sum(above + (lists_sure ? sure << 10 : 0) +
                                    (lists_full ? full << 20 : 0));
        if (lane == 0 && c < chunks) {
          const int n_above = packed & 0x3ff, n_sure = (packed >> 10) & 0x3ff;
          const int n_full = packed >> 20;
          const int listed_before_gated = lists_sure ? n_sure : n_full;
          s_chunk[c] = n_above - listed_before_gated;
          if (lists_full) s_full[c] = n_full;
          if (lists_sure) s_sure[c] = n_sure - n_full;
        }
      }
    }
    __syncthreads();
    // The gated and full prefix sums in one 64-bit scan (full counts in the high word: each
    // total is below 2^31, so the low word never carries), the sure ones in a second.
    const int per_thread = (chunks + kTileThreads - 1) / kTileThreads;
    const int begin = min(tid * per_thread, chunks);
    const int end = min(begin + per_thread, chunks);
    auto pair_of = [&](int c) {
      return (static_cast<int64_t>(lists_full ? s_full[c] : 0) << 32) + s_chunk[c];
    };
    int64_t local = 0;
    for (int c = begin; c < end; ++c) local += pair_of(c);
    int64_t total = 0;
    int64_t running = block_exclusive_scan<kTileThreads>(
        local, total, reinterpret_cast<int64_t*>(scratch));
    int32_t* gated_plan = w.plan + (bh * l.tiles + tile) * l.plan_row();
    int32_t* full_plan = gated_plan + l.chunks + 1;
    int32_t* sure_plan = full_plan + l.chunks + 1;
    for (int c = begin; c < end; ++c) {
      gated_plan[c] = static_cast<int32_t>(running & 0xffffffff);
      full_plan[c] = static_cast<int32_t>(running >> 32);
      running += pair_of(c);
    }
    if (tid == 0) {
      gated_plan[chunks] = static_cast<int32_t>(total & 0xffffffff);
      full_plan[chunks] = static_cast<int32_t>(total >> 32);
    }
    if (lists_sure) {  // (else no consumer reads the sure sums)
      int sure_local = 0;
      for (int c = begin; c < end; ++c) sure_local += s_sure[c];
      int sure_total = 0;
      int sure_running = block_exclusive_scan<kTileThreads>(sure_local, sure_total,
                                                            reinterpret_cast<int*>(scratch));
      for (int c = begin; c < end; ++c) {
        sure_plan[c] = sure_running;
        sure_running += s_sure[c];
      }
      if (tid == 0) sure_plan[chunks] = sure_total;
    }
    __syncthreads();
  }
  // So that this grid completes only after the anchor grid: a later plain launch (or the
  // attention's wait) then knows both are done.
  wait_for_prerequisite_grids();
}

}  // namespace sparsek
