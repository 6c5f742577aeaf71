"""Which of the fused SparseK dk/dv kernel's row-tile reads miss L2, by key order and CTA order.

The fused kernel (csrc/attention/bwd_dkdv_kernel_sm90.cuh) gives a CTA one 128-entry slice of
a sorted key span and walks the slice's rows in 64-row tiles from the tile of its first row to
the tile of its last, each tile once per query head of the kv group (heads innermost). Each
such step reads the query head's Q and dO tile and adds into its dq accumulator tile: 64 KB
that CTAs of the same kv head share in L2 when they visit the same tile close enough in time.
The visit model (sparsek_bwd_visit_model.py) counts the steps; this one asks how many of them
miss L2, which the visit count cannot see: the kd order visits 10% fewer pairs than the
last-row order at 32k sigma 1, yet its kernel read 15% more from DRAM (28.7 against 25.1 GB;
L2 hit rate 39.5% against 51.7%; bench/NOTES.md, fourteenth session).

The model: `heads` kv heads, each with scores of its own (seeds 0, 1, ...); the grid
tile-major in clusters of `cluster` neighbouring slices of one kv head, clusters of the same
slice ranks over the heads launched in turn; a cluster starts when `cluster` SMs are free, on
the latest of them (list scheduling on `sms` SMs; a step takes one unit of time, a row tile
`group` units, one per query head); L2 holds the `capacity` most recently used (kv head, query
head, row tile) entries (64 KB each: 400 is about half of an H200's 50 MB, the rest going to
K, V and the other traffic). It reproduces the direction of the measured effects: clusters of
two cut the last-row order's misses by 41% (measured: DRAM bytes -26%), and kd misses 24-37%
more than last-row (measured +15%).

Slice orders (how the CTA ranks map to slices): "spans" as the sort leaves them (span by
span); "start": by first row tile, ties by last row tile descending, across the kv head's
spans (the dk/dv kernel reads each slice's keys from its entries, so any permutation works).

    python bench/sparsek_bwd_l2_model.py                     # 32k sigma 1, the main orders
    python bench/sparsek_bwd_l2_model.py --seq 32768 --sigma 4 --capacity 400 800
"""

from __future__ import annotations

import argparse
import heapq
from collections import OrderedDict

import numpy as np

import sparsek_bwd_visit_model as visit_model

BLOCK_N = 128  # entries a slice (the fused kernel's kBlockN)
BLOCK_M = 64  # rows a step


def slice_tiles(u: np.ndarray, tau: np.ndarray, span: int, window: int, order: str):
    """Each slice's first and last 64-row tile (-1 as last: no row), in the sort's order."""
    _, _, num_rows, min_key = visit_model.visited_pairs(u, tau, span, window, BLOCK_N, BLOCK_M,
                                                        order=order)
    has_rows = num_rows > 0
    first = np.where(has_rows, min_key // BLOCK_M, 0)
    last = np.where(has_rows, (min_key + num_rows - 1) // BLOCK_M, -1)
    return first, last


def slice_order(first: np.ndarray, last: np.ndarray, how: str) -> np.ndarray:
    """CTA rank -> slice: "spans" (the identity) or "start" (first tile, then last descending,
    then slice)."""
    if how == "spans":
        return np.arange(first.size)
    if how == "start":
        return np.lexsort((np.arange(first.size), -last, first))
    raise ValueError(how)


def simulate(heads: list[tuple[np.ndarray, np.ndarray]], orders: list[np.ndarray], sms: int,
             cluster: int, group: int, capacity: int):
    """(row-tile steps, L2 misses, makespan) of the grid; heads[h] = (first, last) of kv head
    h's slices, orders[h] its rank -> slice map."""
    slices = heads[0][0].size
    if slices % cluster:
        raise ValueError("the slice count must be a multiple of the cluster size")
    free = [(0, sm) for sm in range(sms)]
    heapq.heapify(free)
    steps = []
    for rank0 in range(0, slices, cluster):
        for h, (first, last) in enumerate(heads):
            taken = [heapq.heappop(free) for _ in range(cluster)]
            start = max(t for t, _ in taken)
            for k, (_, sm) in enumerate(taken):
                s = orders[h][rank0 + k]
                tiles = max(0, int(last[s]) - int(first[s]) + 1)
                for i in range(tiles):
                    for q in range(group):
                        steps.append((start + i * group + q, h, q, int(first[s]) + i))
                heapq.heappush(free, (start + tiles * group, sm))
    steps.sort()
    cache: OrderedDict = OrderedDict()
    misses = 0
    for step in steps:
        entry = step[1:]
        if entry in cache:
            cache.move_to_end(entry)
        else:
            misses += 1
            cache[entry] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return len(steps), misses, max(t for t, _ in free)


# name: (sort order, slice order); the span width is the kernel's for S in that order.
CONFIGS = {
    "last-row": ("last-row", "spans"),
    "kd": ("kd", "spans"),
    "kd-start": ("kd", "start"),
    "kd-pairs": ("kd-pairs", "spans"),
    "kd-pairs-start": ("kd-pairs", "start"),
}


def span_width(seq: int, order: str) -> int:
    """key_span_width / kd_key_span_width of selection/sort_key_spans.h."""
    if order == "last-row":
        return visit_model.kernel_span_width(seq)
    return 4096 if seq <= 49152 else 8192


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768, help="S = T")
    ap.add_argument("--sigma", type=float, default=1.0, help="u ~ N(0, sigma^2)")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8, help="kv heads (Hkv)")
    ap.add_argument("--group", type=int, default=4, help="query heads a kv head (Hq / Hkv)")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--cluster", type=int, default=2)
    ap.add_argument("--capacity", type=int, nargs="+", default=[400, 800],
                    help="L2 entries of 64 KB (a query head's Q, dO and dq tiles)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args(argv)
    scores = [visit_model.model_scores(args.seq, args.sigma, args.topk, args.window, seed)
              for seed in range(args.heads)]
    print(f"S={args.seq} sigma={args.sigma:g} Hkv={args.heads} group={args.group} "
          f"SMs={args.sms} cluster={args.cluster}")
    print("| config | row-tile steps | " +
          " | ".join(f"misses, capacity {c}" for c in args.capacity) + " | makespan |")
    print("| --- | ---: | " + " | ".join("---:" for _ in args.capacity) + " | ---: |")
    for name in args.configs:
        order, how = CONFIGS[name]
        span = span_width(args.seq, order)
        heads = [slice_tiles(u, tau, span, args.window, order) for u, tau, _ in scores]
        orders = [slice_order(first, last, how) for first, last in heads]
        cells = []
        for capacity in args.capacity:
            steps, misses, makespan = simulate(heads, orders, args.sms, args.cluster,
                                               args.group, capacity)
            cells.append(f"{misses} ({misses / steps:.3f})")
        print(f"| {name} | {steps} | " + " | ".join(cells) + f" | {makespan} |", flush=True)


if __name__ == "__main__":
    main()
