"""List-scheduling model of an attention grid's tail (csrc/attention/cta_order.h).

The hardware starts CTAs in block-index order on the first free SM, one CTA an SM at a time
for our kernels. The model prints each grid's makespan over the ideal (total work / SMs) for
the order head by head (the old one) and tile-major within each batch (gridDim = (heads,
tiles, batch): the new one for plain causal grids and the SparseK dk/dv grid).

 - Plain causal grids: tile j of n does (n - j) units of work (key tiles in the dk/dv grid;
   query tiles, reversed, in the forward and dq grids).
 - `--sparsek`: the SparseK dk/dv grid at the issue's configs (B = 1, Hq = 32, Hkv = 8,
   K = 2048, W = 512; a CTA loops over the 4 query heads of its kv head), each CTA's rows
   from bench/sparsek_bwd_visit_model.py (64-key slices of 1024-key spans sorted by last row,
   64-row steps, one kv head's random scores each), work = row steps + 1.

    python bench/cta_order_model.py [--sms 132] [--sparsek]
"""
from __future__ import annotations

import argparse
import heapq
import os
import sys

import numpy as np

# name: (batch, heads a batch in the grid, tiles a head, work units a tile step)
CAUSAL_GRIDS = {
    "foundation_t8192_causal forward (B2 H16, 64 query tiles)": (2, 16, 64, 1),
    "foundation_t8192_causal dk/dv (B2 Hkv16, 64 key tiles)": (2, 16, 64, 1),
    "gqa_t8192 dk/dv (B2 Hkv8, a CTA loops over 4 query heads)": (2, 8, 64, 4),
    "gqa_t8192 forward (B2 Hq32)": (2, 32, 64, 1),
    "foundation_t2048_causal dk/dv (B8 H16, 16 key tiles)": (8, 16, 16, 1),
}


def makespan(jobs, sms):
    free = [0.0] * sms
    heapq.heapify(free)
    for work in jobs:
        heapq.heappush(free, heapq.heappop(free) + work)
    return max(free)


def report(name, per_group, heads, sms):
    """per_group: one list of CTA works per (batch, head), batch-major, in tile order."""
    head_major = [w for group in per_group for w in group]
    tiles = len(per_group[0])
    tile_major = [per_group[b * heads + h][t] for b in range(len(per_group) // heads)
                  for t in range(tiles) for h in range(heads)]
    ideal = sum(head_major) / sms
    print(f"{name:62s} {makespan(head_major, sms) / ideal:10.3f} "
          f"{makespan(tile_major, sms) / ideal:10.3f}", flush=True)


def sparsek_dkdv_groups(seq, sigma, heads_kv=8, group=4, topk=2048, window=512, seed=0):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sparsek_bwd_visit_model as visit_model
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(heads_kv):
        u = (sigma * rng.standard_normal(seq)).astype(np.float32)
        tau, _ = visit_model.row_thresholds(u, topk, window, 256)
        _, _, rows, _ = visit_model.visited_pairs(u, tau, 1024, window, 64, 64,
                                                  order="last-row")
        groups.append(list(np.ceil(rows / 64) * group + 1))
    return groups


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--sparsek", action="store_true",
                        help="also the SparseK dk/dv grid (about a minute)")
    args = parser.parse_args()
    print(f"makespan / ideal on {args.sms} SMs")
    print(f"{'grid':62s} {'head-major':>10s} {'tile-major':>10s}")
    for name, (batch, heads, tiles, scale) in CAUSAL_GRIDS.items():
        per_tile = [(tiles - j) * scale for j in range(tiles)]  # longest first within a head
        report(name, [per_tile] * (batch * heads), heads, args.sms)
    if args.sparsek:
        for seq in (32768, 131072):
            for sigma in (1.0, 4.0):
                report(f"SparseK dk/dv S={seq} sigma {sigma:g}",
                       sparsek_dkdv_groups(seq, sigma), 8, args.sms)


if __name__ == "__main__":
    main()
