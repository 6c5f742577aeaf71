// Selection step 2: exact tau at the anchor rows, one block per anchor, from the whole
// prefix. Anchors are few (T / (kAnchorEvery * kQueryTile) + 2 per kv head); every other
// row is solved inside the bracket two anchors make (step 3).
#include "runtime/grid_dependency.cuh"
#include "selection/selection_kernels.cuh"
#include "selection/threshold_solve.cuh"

namespace sparsek {

__global__ void __launch_bounds__(kAnchorThreads)
    anchor_thresholds_kernel(SparseKSelectParams p, SelectionLayout l, SelectionBuffers w) {
  __shared__ double scratch[kAnchorThreads / 32 * 15];
  // The tile kernel may start once every anchor block runs: its blocks wait for the flags.
  launch_dependent_grids();
  // The longest prefix first: the blocks of a last wave are then the shortest.
  const int64_t anchor = gridDim.x - 1 - blockIdx.x;
  const int64_t row = anchor_row(anchor, p.seqlen_q);
  const int64_t n = sparse_domain_end(row, p.seqlen_q, p.seqlen_k, p.window);
  for (int64_t bh = blockIdx.y; bh < l.batch_heads; bh += gridDim.y) {
    const float tau = solve_threshold_block<kAnchorThreads>(w.key_u + bh * l.padded_keys(), n,
                                                            p.topk, scratch);
    if (threadIdx.x == 0) {
      w.anchor_tau[bh * l.anchors + anchor] = tau;
      release_flag(w.anchor_ready + bh * l.anchors + anchor);
    }
  }
}

}  // namespace sparsek
