"""List-scheduling model of a causal attention grid's tail (csrc/attention/cta_order.h).

Each CTA owns one tile of one (head, batch) group; under a causal mask tile j of n does
(n - j) units of work (key tiles in the dk/dv grid; query tiles, reversed, in the forward and
dq grids). The hardware starts CTAs in block-index order on the first free SM, one CTA an SM
at a time for our kernels. The model prints the grid's makespan over the ideal
(total work / SMs) for the order head by head (the old one) and tile-major (the new one, for
plain causal grids).

    python bench/cta_order_model.py [--sms 132]
"""
from __future__ import annotations

import argparse
import heapq

# name: (groups = B * heads a CTA grid spans, tiles a group, work units a tile step)
GRIDS = {
    "foundation_t8192_causal forward (B2 H16, 64 query tiles)": (32, 64, 1),
    "foundation_t8192_causal dk/dv (B2 Hkv16, 64 key tiles)": (32, 64, 1),
    "gqa_t8192 dk/dv (B2 Hkv8, a CTA loops over 4 query heads)": (16, 64, 4),
    "gqa_t8192 forward (B2 Hq32)": (64, 64, 1),
    "foundation_t2048_causal dk/dv (B8 H16, 16 key tiles)": (128, 16, 1),
}


def makespan(jobs, sms):
    free = [0.0] * sms
    heapq.heapify(free)
    for work in jobs:
        heapq.heappush(free, heapq.heappop(free) + work)
    return max(free)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sms", type=int, default=132)
    args = parser.parse_args()
    print(f"makespan / ideal on {args.sms} SMs")
    print(f"{'grid':62s} {'head-major':>10s} {'tile-major':>10s}")
    for name, (groups, tiles, scale) in GRIDS.items():
        per_tile = [(tiles - j) * scale for j in range(tiles)]  # longest first within a head
        head_major = [w for _ in range(groups) for w in per_tile]
        tile_major = [w for w in per_tile for _ in range(groups)]
        ideal = sum(head_major) / args.sms
        print(f"{name:62s} {makespan(head_major, args.sms) / ideal:10.3f} "
              f"{makespan(tile_major, args.sms) / ideal:10.3f}")


if __name__ == "__main__":
    main()
