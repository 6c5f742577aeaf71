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

 - `--bands`: the row bands' dk/dv grid (sort_key_spans.h, KeyOrder::kBands; 2048-row bands
   at 8k and 32k, 8192 at 128k), each kv head's slices in the slice order (first row tile,
   then last row tile descending) from bench/sparsek_bwd_visit_model.py's band_slices, work
   = 4 (query heads) x row tiles + FIXED (a CTA's fixed costs, in steps) a visiting slice and
   EMPTY a CTA past a head's visiting slices. Orders: head-major over each head's capacity
   (the empty CTAs after each head's slices), tile-major, and the CTA list (BandCtas in
   sort_key_spans.h: every head's visiting slices head by head, the last `--tail` of them
   longest first, the empty CTAs last), and the whole list longest first.

    python bench/cta_order_model.py [--sms 132] [--sparsek] [--bands [--tail 528]]
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


FIXED, EMPTY = 2.0, 0.3  # steps: a visiting CTA's fixed costs, an empty CTA's whole time


def band_grid_orders(seq, sigma, band_rows, tail, sms, heads_kv=8, group=4, topk=2048,
                     window=512, seed=0):
    """makespan / (visiting work / SMs) of the row bands' grid in each order."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sparsek_bwd_visit_model as visit_model
    rng = np.random.default_rng(seed)
    heads, launched = [], 0
    for _ in range(heads_kv):
        u = (sigma * rng.standard_normal(seq)).astype(np.float32)
        tau, _ = visit_model.row_thresholds(u, topk, window, 256)
        first, last, launched, _ = visit_model.band_slices(u, tau, window, band_rows, 128, 64)
        order = np.lexsort((-last, first))  # the slice order
        heads.append(list((last[order] - first[order] + 1) * group + FIXED))
    empty = [[EMPTY] * (launched - len(h)) for h in heads]
    ideal = sum(map(sum, heads)) / sms
    head_major = [w for h, e in zip(heads, empty) for w in h + e]
    ranks = max(len(h) + len(e) for h, e in zip(heads, empty))
    padded = [h + e for h, e in zip(heads, empty)]
    tile_major = [p[r] for r in range(ranks) for p in padded if r < len(p)]
    listed = [w for h in heads for w in h]
    cut = max(0, len(listed) - tail)
    cta_list = listed[:cut] + sorted(listed[cut:], reverse=True) + [w for e in empty for w in e]
    longest_first = sorted(listed, reverse=True) + [w for e in empty for w in e]
    return [makespan(order, sms) / ideal
            for order in (head_major, tile_major, cta_list, longest_first)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--sparsek", action="store_true",
                        help="also the SparseK dk/dv grid (about a minute)")
    parser.add_argument("--bands", action="store_true",
                        help="also the row bands' dk/dv grid in its orders (a few minutes)")
    parser.add_argument("--tail", type=int, default=528,
                        help="the CTA list's entries at its end longest first (4 waves)")
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
    if args.bands:
        print(f"\nRow bands' dk/dv grid, makespan / (visiting work / SMs); a visiting CTA "
              f"{FIXED:g} steps of fixed costs, an empty one {EMPTY:g}")
        print(f"{'grid':36s} {'head-major':>10s} {'tile-major':>10s} {'CTA list':>10s} "
              f"{'longest 1st':>11s}")
        for seq, band_rows in ((8192, 2048), (32768, 2048), (131072, 8192)):
            for sigma in (1.0, 4.0):
                ratios = band_grid_orders(seq, sigma, band_rows, args.tail, args.sms)
                print(f"{f'S={seq} sigma {sigma:g} ({band_rows}-row bands)':36s} " +
                      " ".join(f"{r:10.3f}" for r in ratios[:3]) + f" {ratios[3]:11.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
