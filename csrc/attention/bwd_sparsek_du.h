// du of the SparseK backward when the dk/dv kernel computes dq (bwd_dkdv_kernel_sm90.cuh,
// Cfg::kFuseDq): no dq kernel runs before dk/dv, so nothing has the rows' means
//   mean_i = sum_{l in F_i} g_il / |F_i|
// when dk/dv visits a pair. SPARSEK.md's
//   du_j = sum_h sum_i [j in F_i] (g_ij - mean_i)        (h: the query heads of the group)
// is split in two: the dk/dv kernel writes the first term into du and adds each row's sum of
// g over F_i into row_sums; the kernels here subtract the second.
//
// tau never decreases down the rows (selection_params.h), so for a key j scored u the rows
// with j in F_i (its sparse domain: p(i) - W >= j; and 0 < clip(u - tau_i) < 1) form one
// interval [lo_j, hi_j): lo_j is the first such row with u - tau_i < 1, hi_j the first with
// tau_i >= u. A binary search finds both with the float comparisons the kernels' gate makes
// (sparsek_gate.cuh), so the intervals hold exactly the pairs the dk/dv kernel counted. Then
//   |F_i| = #{j : lo_j <= i < hi_j}    (a difference array, row_edges, and a prefix sum)
//   sum_{i in [lo_j, hi_j)} sum_h mean_i = P[hi_j] - P[lo_j]
// with P the float64 prefix of the group's row means (mean_prefix), scanned in segments of
// MeanPrefixSegments::kRows rows a CTA: the segments' edge totals, then each segment's
// counts and means (the edges before it from the totals), then each segment's prefix (the
// means before it from their totals). Every sum is in a fixed order: the same du run to run.
// Memory: O(B Hkv T); work O(B Hkv (S log T + T)).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention/bwd_params.h"
#include "attention/bwd_workspace.h"

namespace sparsek {

// Zeroes row_edges [B, Hkv, T + 1] int32 and adds each key's interval ends into it (+1 at
// lo_j, -1 at hi_j). Needs only tau and the scores: may run before the dk/dv kernel.
std::string sparsek_du_count_fractional_rows(const AttentionBwdParams& p, int32_t* row_edges,
                                             cudaStream_t stream);

// After the dk/dv kernel: rows.mean_prefix [B, Hkv, T + 1] float64 from the row sums the
// dk/dv kernel added into rows.mean [B, Hq, T] and rows.row_edges (rows.segment_*_totals: the
// scan's scratch), then du_j -= P[hi_j] - P[lo_j] for every key.
std::string sparsek_du_subtract_means(const AttentionBwdParams& p, const BwdRowBuffers& rows,
                                      cudaStream_t stream);

}  // namespace sparsek
