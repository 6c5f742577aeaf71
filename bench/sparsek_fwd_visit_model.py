"""How many key tiles the SparseK forward visits per query tile, and how many are full or sure.

The forward (csrc/attention/sparse_key_visit.cuh) visits, for each query tile of 128 rows, the
planned candidates of the whole 128-key chunks of its first row's sparse domain (keys scoring
above that row's tau) in tiles of 128, then the contiguous range from the end of those chunks
to the last row's position. Candidates with u - tau >= 1 at the tile's last row are "full"
(gate 1 for every row of the tile); the plan lists them first, and every whole tile of them
takes the dense update with no gate (selection_params.h). Then come the "sure" ones, u > tau
at the last row (a gate above 0 for every row): whole tiles of full and sure keys are weighed
without the mask that hides a row's gate-0 keys. The model counts, per query tile, the
planned tiles, the full ones, the unmasked ones (full or sure) and the range tiles, and the
pairs visited over the pairs
attended (gate > 0, window band included), with the same thresholds as
bench/sparsek_bwd_visit_model.py (exact on every S/1024-th row, interpolated between).

    python bench/sparsek_fwd_visit_model.py                   # the issue's configs
    python bench/sparsek_fwd_visit_model.py --seq 32768 --sigma 4
"""

from __future__ import annotations

import argparse

import numpy as np

from sparsek_bwd_visit_model import add_score_args, model_scores

TILE = 128   # query rows a CTA and keys a tile (FwdSm90TileConfig)
CHUNK = 128  # keys a sorted chunk (SelectionTiles::kKeyChunk)


def forward_tiles(u: np.ndarray, tau: np.ndarray, window: int):
    """Per query tile: (planned, full, unmasked and range tiles), and the pairs visited."""
    seq = u.size
    planned, full, unmasked, ranged = [], [], [], []
    visited = 0
    for row0 in range(0, seq, TILE):
        last = min(seq, row0 + TILE) - 1
        domain = max(0, row0 - window + 1)
        keys = u[: domain // CHUNK * CHUNK]
        candidates = int(np.count_nonzero(keys > tau[row0]))
        with np.errstate(invalid="ignore"):
            full_keys = int(np.count_nonzero(keys - tau[last] >= np.float32(1)))
        unmasked_keys = int(np.count_nonzero(keys > tau[last]))
        range_keys = max(0, last - domain // CHUNK * CHUNK + 1)
        planned.append(-(-candidates // TILE))
        full.append(full_keys // TILE)
        unmasked.append(unmasked_keys // TILE)
        ranged.append(-(-range_keys // TILE))
        visited += (planned[-1] + ranged[-1]) * TILE * (last - row0 + 1)
    return (np.array(planned), np.array(full), np.array(unmasked), np.array(ranged),
            float(visited))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_score_args(ap)
    args = ap.parse_args(argv)
    print(f"K={args.topk} W={args.window}; tiles per query tile (mean); pairs per (kv head, "
          "query head)")
    print("| S | sigma | keys/row | planned tiles | of them full | full or sure | range tiles | "
          "visited / attended |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seq in args.seq:
        for sigma in args.sigma:
            u, tau, attended = model_scores(seq, sigma, args.topk, args.window, args.seed)
            # The kernel's scores and taus are float32; its taus never decrease down the rows.
            tau = np.maximum.accumulate(tau.astype(np.float32))
            planned, full, unmasked, ranged, visited = forward_tiles(
                u.astype(np.float32), tau, args.window)
            print(f"| {seq} | {sigma:g} | {attended / seq:.0f} | {planned.mean():.1f} | "
                  f"{full.mean():.1f} | {unmasked.mean():.1f} | {ranged.mean():.1f} | "
                  f"{visited / attended:.2f} |", flush=True)


if __name__ == "__main__":
    main()
