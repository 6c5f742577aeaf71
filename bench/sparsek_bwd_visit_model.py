"""How many (key, row) pairs the SparseK dk/dv kernel visits, per width of the sorted key span.

The dk/dv kernel (csrc/attention/bwd_dkdv_kernel.cuh, SparseKQueryVisit in
bwd_query_visit.cuh) gives one CTA a slice of kBlockN consecutive entries of a sorted span of
keys (selection/sort_key_spans.h). The CTA visits the rows from the first row whose position
reaches the slice's smallest key to the last row that either has one of its keys in the window
band or has tau below one of its scores, in steps of kBlockM rows. The model counts what each
span width and order visits, against the pairs actually attended (gate m_ij > 0, window band
included): spans sorted by score (the kernel until b3 in bench/NOTES.md) and by the last row
that attends a key (the kernel since), so that both can be chosen before writing the kernel.
The last line of each (S, sigma) is the kernel's own choice: last-row order at
key_span_width(S) (1024 keys up to 48k, 2048 up to 96k, 4096 past that;
selection/sort_key_spans.h, s8 in bench/NOTES.md).

tau is the exact SPARSEK threshold (SPARSEK.md), solved on every `--row-step`-th row from the
whole prefix (bisection on the keys within 1 of the K-th largest score, which bracket tau) and
interpolated linearly in between (tau never decreases down the rows). One kv head is modelled:
every count is per (kv head, query head), so ratios hold for any B, Hq and Hkv.

    python bench/sparsek_bwd_visit_model.py                   # the issue's configs
    python bench/sparsek_bwd_visit_model.py --seq 32768 --sigma 1 --spans 128 1024
    python bench/sparsek_bwd_visit_model.py --seq 32768 --spans 1024 --block-n 128 \
        --block-m 64 --cluster 2 4 8     # the fused kernel; tiles that clusters would share
    python bench/sparsek_bwd_visit_model.py --seq 8192 32768 65536 131072 --spans 1024 \
        --block-n 128 --block-m 64 --kd-spans 2048 4096 8192   # kd order (kd_order)
    python bench/sparsek_bwd_visit_model.py --seq 8192 32768 131072 --spans 1024 \
        --block-n 128 --block-m 64 --kd-spans 4096 --bands 2048 4096 8192   # row bands
"""

from __future__ import annotations

import argparse
import math

import numpy as np


def solve_tau(domain: np.ndarray, topk: int) -> float:
    """The exact tau of one row: sum_j clip(u_j - tau, 0, 1) = topk (-inf if the domain fits)."""
    n = domain.size
    if n <= topk:
        return -math.inf
    kth = np.partition(domain, n - topk)[n - topk]  # the topk-th largest score
    # f(kth) <= topk - 1 (only keys above kth count, each at most 1) and f(kth - 1) >= topk
    # (the topk keys at or above kth count 1 each): tau lies in [kth - 1, kth).
    cand = domain[domain > kth - 1.0].astype(np.float64)
    lo, hi = float(kth) - 1.0, float(kth)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.clip(cand - mid, 0.0, 1.0).sum() >= topk:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def row_thresholds(u: np.ndarray, topk: int, window: int, row_step: int):
    """tau at every row (T = S), exact on the sampled rows, and the attended pairs."""
    seq = u.size
    sample_rows = np.unique(np.concatenate([np.arange(0, seq, row_step), [seq - 1]]))
    tau_s = np.empty(sample_rows.size)
    sparse_attended_s = np.empty(sample_rows.size)
    for idx, row in enumerate(sample_rows):
        n = max(0, row - window + 1)  # sparse domain [0, row - W]
        dom = u[:n]
        tau = solve_tau(dom, topk)
        tau_s[idx] = tau
        sparse_attended_s[idx] = n if tau == -math.inf else np.count_nonzero(dom > tau)
    rows = np.arange(seq)
    # Rows whose domain holds at most K keys select all of it: tau = -inf exactly there.
    finite = np.isfinite(tau_s)
    tau = np.full(seq, -np.inf)
    first_finite_row = max(0, topk + window)  # domain of row r has r - W + 1 keys
    if finite.any():
        fr = rows >= first_finite_row
        tau[fr] = np.interp(rows[fr], sample_rows[finite], tau_s[finite])
    sparse_attended = np.interp(rows, sample_rows, sparse_attended_s)
    sparse_attended = np.where(rows < first_finite_row, np.maximum(0, rows - window + 1),
                               sparse_attended)
    window_attended = np.minimum(window, rows + 1)
    return tau, float(sparse_attended.sum() + window_attended.sum())


def model_scores(seq: int, sigma: float, topk: int, window: int, seed: int, row_step: int = 0):
    """The benchmarks' scores u ~ N(0, sigma^2) (float32 values, held as float64), tau at every
    row (exact every `row_step` rows, default S / 1024) and the attended pairs."""
    rng = np.random.default_rng(seed)
    u = rng.normal(0.0, sigma, seq).astype(np.float32).astype(np.float64)
    tau, attended = row_thresholds(u, topk, window, row_step or max(1, seq // 1024))
    return u, tau, attended


def add_score_args(ap: argparse.ArgumentParser):
    """The options both visit models share: the benchmarks' shapes and scores."""
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072],
                    help="S = T (default: 8k 32k 128k)")
    ap.add_argument("--sigma", type=float, nargs="+", default=[1.0, 4.0],
                    help="u ~ N(0, sigma^2)")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)


def kd_order(start: np.ndarray, end: np.ndarray, block_n: int,
             pairs_by_end: bool = False, span: int | None = None) -> np.ndarray:
    """The entries of one span in kd order: indices into start / end (the keys' first row,
    their position, and last attending row), slices of block_n consecutive entries.

    The tree is that of a whole span of `span` entries (block_n times a power of two, at least
    the entries; None: the smallest such), cut at the entries: the node at depth d is an
    aligned run of span >> d places, and it splits into its two halves, the first half
    taking the entries of the smaller coordinate of the node's larger extent (max - min; the
    start on a tie), ascending, ties by start. A node whose entries fit in its first half
    splits into that half alone. Nodes of at most block_n entries are the leaves, sorted by
    last row descending, then start (the first entry of a slice holds its latest last row, as
    the kernel's tile bound expects). A slice's keys then lie close in both where their rows
    begin and where they end, where sorting a span by last row keeps only the ends close:
    the slice's rows begin at the span's first keys. (Aligned runs let the kernel's sort of
    a ragged span, a row band's second one, sort only each node's run at every depth; the
    halves of whole slices it replaced visited the same pairs within 0.3%.)

    pairs_by_end: nodes of more than block_n and at most 2 block_n entries (a cluster pair's
    two slices) split by last row whatever the extents, so that both slices start on the same
    rows and walk them in step (sparsek_bwd_l2_model.py).

    Ties left by both coordinates go by index (the entries' order in start / end), as the
    kernel's sort keys end in the entry's place in the span: row bands' pieces share starts
    (a band's first row) and ends (its last).
    """
    if span is None:
        span = block_n
        while span < start.size:
            span *= 2
    if span < start.size or span % block_n or (span // block_n) & (span // block_n - 1):
        raise ValueError(f"span must be block_n times a power of two, at least {start.size}")

    def split(ix: np.ndarray, run: int) -> list[np.ndarray]:
        if ix.size <= block_n:
            return [ix[np.lexsort((ix, start[ix], -end[ix]))]]
        half = run // 2
        if ix.size <= half:
            return split(ix, half)
        s, e = start[ix], end[ix]
        if pairs_by_end and ix.size <= 2 * block_n:
            key = e
        else:
            key = s if s.max() - s.min() >= e.max() - e.min() else e
        ordered = ix[np.lexsort((ix, s, key))]
        return split(ordered[:half], half) + split(ordered[half:], half)

    if start.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(split(np.arange(start.size), span))


def visited_pairs(u: np.ndarray, tau: np.ndarray, span: int, window: int, block_n: int,
                  block_m: int, order: str = "score"):
    """(key, row) pairs the dk/dv CTAs compute (whole kBlockM row steps), and the CTA count.

    order "score": each span sorted by score, descending, ties by key position (the kernel
    before b3).
    order "last-row": sorted by the last row that attends the key (window band or tau < u),
    descending, ties by key position: what a slice's row range depends on (the kernel since
    b3).
    order "kd": each span's keys in kd_order of (position, last row); "kd-pairs": the same
    with pairs_by_end.
    """
    seq = u.size
    spans = -(-seq // span)
    padded = spans * span
    u_pad = np.full(padded, -np.inf)
    u_pad[:seq] = u
    pos = np.arange(padded)
    # Last row with tau < u (tau non-decreasing); -inf scores are never selected.
    sparse_last = np.searchsorted(tau, u_pad, side="left") - 1
    sparse_last = np.where(np.isfinite(u_pad), sparse_last, -1)
    last_row = np.maximum(sparse_last, pos + window - 1) if window > 0 else sparse_last
    last_row = np.where(pos < seq, np.minimum(last_row, seq - 1), -1)
    pos2 = pos.reshape(spans, span)
    if order == "score":
        perm = np.lexsort((pos2, -u_pad.reshape(spans, span)), axis=-1)  # ties by position
    elif order == "last-row":
        perm = np.lexsort((pos2, -last_row.reshape(spans, span)), axis=-1)
    elif order in ("kd", "kd-pairs"):
        perm = np.tile(np.arange(span), (spans, 1))
        for sp in range(spans):
            n = int(min(span, max(0, seq - sp * span)))  # the span's keys; padding after
            perm[sp, :n] = kd_order(pos2[sp, :n], last_row.reshape(spans, span)[sp, :n],
                                    block_n, pairs_by_end=order == "kd-pairs", span=span)
    else:
        raise ValueError(order)
    sk = np.take_along_axis(pos2, perm, axis=-1).reshape(-1, block_n)
    s_last = np.take_along_axis(sparse_last.reshape(spans, span), perm, axis=-1)
    s_last = s_last.reshape(-1, block_n)
    valid = sk < seq
    any_valid = valid.any(axis=1)
    min_key = np.where(valid, sk, np.iinfo(np.int64).max).min(axis=1)
    max_key = np.where(valid, sk, -1).max(axis=1)
    # The slice's top score bounds its sparse rows: the max of the keys' last rows.
    hi = np.where(valid, s_last, -1).max(axis=1)
    if window > 0:
        hi = np.maximum(hi, max_key + window - 1)
    hi = np.minimum(hi, seq - 1)
    num_rows = np.where(any_valid, np.maximum(0, hi - min_key + 1), 0)
    steps = -(-num_rows // block_m)
    return float((steps * block_m * block_n).sum()), int(sk.shape[0]), num_rows, min_key


def band_slices(u: np.ndarray, tau: np.ndarray, window: int, band_rows: int, block_n: int,
                block_m: int, span: int = 4096):
    """Row bands (selection/sort_key_spans.h, KeyOrder::kBands; T = S): the rows cut into
    bands of band_rows, each key's rows [its position, its last row] into one piece a band
    they meet; a band's pieces in position order, kd_order of (first row in the band, last
    row in the band) in spans of `span` entries, slices of block_n entries, each visiting its
    pieces' rows in whole block_m steps. Returns each slice's first and last row tile (band
    by band, in list order), the slices the grid launches (every band's capacity: its reach
    rounded up to `span`, KeyBands::capacity) and the pieces a key (mean)."""
    seq = u.size
    pos = np.arange(seq)
    sparse_last = np.searchsorted(tau, u, side="left") - 1
    sparse_last = np.where(np.isfinite(u), sparse_last, -1)
    last = np.minimum(np.maximum(sparse_last, pos + window - 1) if window > 0 else sparse_last,
                      seq - 1)
    first_tiles, last_tiles, launched, pieces = [], [], 0, 0
    for row0 in range(0, seq, band_rows):
        row_end = min(seq, row0 + band_rows) - 1
        keep = (pos <= row_end) & (last >= row0) & (last >= pos)
        starts = np.maximum(pos[keep], row0)
        ends = np.minimum(last[keep], row_end)
        pieces += int(keep.sum())
        launched += -(-(row_end + 1) // span) * span // block_n
        for s0 in range(0, starts.size, span):
            st, en = starts[s0:s0 + span], ends[s0:s0 + span]
            order = kd_order(st, en, block_n, pairs_by_end=True, span=span)
            st, en = st[order], en[order]
            for b in range(0, st.size, block_n):
                first_tiles.append(int(st[b:b + block_n].min()) // block_m)
                last_tiles.append(int(en[b:b + block_n].max()) // block_m)
    return np.array(first_tiles), np.array(last_tiles), launched, pieces / seq


def band_visited_pairs(u: np.ndarray, tau: np.ndarray, window: int, band_rows: int,
                       block_n: int, block_m: int, span: int = 4096):
    """The (key, row) pairs the row bands' slices visit (band_slices), the slices with
    pieces, the slices the grid launches and the pieces a key (mean)."""
    first, last, launched, per_key = band_slices(u, tau, window, band_rows, block_n, block_m,
                                                 span)
    visited = float(((last - first + 1) * block_m * block_n).sum())
    return visited, int(first.size), launched, per_key


def cluster_tile_reads(row_lo: np.ndarray, num_rows: np.ndarray, cluster: int, block_m: int):
    """Row tiles the CTAs read (each tile once a step: its Q and dO, and its dq accumulator)
    alone, and read by clusters of `cluster` neighbouring CTAs that walk their rows in step
    and share every tile they have in common (each distinct tile of a cluster read once).

    row_lo, num_rows: each CTA's first row and row count, in launch order (a cluster's CTAs
    are consecutive; CTAs visiting no row read nothing). The fused kernel aligns a CTA's steps
    to whole tiles, so its tiles run from row_lo // block_m to (row_lo + num_rows - 1) //
    block_m. Returns (tiles read alone, tiles read by the clusters).
    """
    if row_lo.size % cluster:
        raise ValueError("the CTA count must be a multiple of the cluster size")
    has_rows = num_rows > 0
    first = np.where(has_rows, row_lo // block_m, 0)
    last = np.where(has_rows, (row_lo + num_rows - 1) // block_m, -1)
    alone = int((last - first + 1).sum())
    shared = 0
    for group in range(0, row_lo.size, cluster):
        tiles = set()
        for a, b in zip(first[group:group + cluster], last[group:group + cluster]):
            tiles.update(range(int(a), int(b) + 1))
        shared += len(tiles)
    return alone, shared


def kernel_span_width(seq: int) -> int:
    """key_span_width of selection/sort_key_spans.h: the kernel's span width for S keys."""
    return 1024 if seq <= 49152 else (2048 if seq <= 98304 else 4096)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_score_args(ap)
    ap.add_argument("--spans", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096],
                    help="widths of the sorted key spans (128: the selection's chunks)")
    ap.add_argument("--block-n", type=int, default=64,
                    help="entries per dk/dv CTA (kBlockN of BwdTileSizes<128>)")
    ap.add_argument("--block-m", type=int, default=32,
                    help="rows per dk/dv step (kBlockM of BwdTileSizes<128>)")
    ap.add_argument("--row-step", type=int, default=0,
                    help="rows between exact tau solves (default: S / 1024)")
    ap.add_argument("--kd-spans", type=int, nargs="*", default=[4096, 8192],
                    help="also: kd order (kd_order) within spans of these widths")
    ap.add_argument("--bands", type=int, nargs="*", default=[],
                    help="also: row bands of these heights (band_visited_pairs; with "
                         "--block-n 128 --block-m 64, the fused kernel's tiles)")
    ap.add_argument("--cluster", type=int, nargs="*", default=[],
                    help="also: the row tiles that clusters of this many neighbouring slices "
                         "read if they walk in step, over lone CTAs' (the kernel's spans)")
    args = ap.parse_args(argv)
    cluster_rows = []

    print(f"K={args.topk} W={args.window} kBlockN={args.block_n} kBlockM={args.block_m}; "
          "pairs per (kv head, query head); 'visited' counts whole kBlockM x kBlockN steps; "
          "'last-row order' sorts each span by the last row attending a key (the kernel) "
          "instead of by score")
    print("| S | sigma | keys/row | span | dk/dv CTAs | visited / attended | vs span 128 | "
          "last-row order: visited / attended |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seq in args.seq:
        for sigma in args.sigma:
            u, tau, attended = model_scores(seq, sigma, args.topk, args.window, args.seed,
                                            args.row_step)
            base = None
            for span in args.spans:
                if span % args.block_n:
                    raise SystemExit(f"span {span} is not a multiple of kBlockN {args.block_n}")
                visited, ctas, _, _ = visited_pairs(u, tau, span, args.window, args.block_n,
                                                    args.block_m)
                by_last, _, _, _ = visited_pairs(u, tau, span, args.window, args.block_n,
                                                 args.block_m, order="last-row")
                base = visited if base is None else base
                print(f"| {seq} | {sigma:g} | {attended / seq:.0f} | {span} | {ctas} | "
                      f"{visited / attended:.2f} | {visited / base:.2f} | "
                      f"{by_last / attended:.2f} |", flush=True)
            width = kernel_span_width(seq)
            kernel, ctas, num_rows, row_lo = visited_pairs(u, tau, width, args.window,
                                                           args.block_n, args.block_m,
                                                           order="last-row")
            print(f"| {seq} | {sigma:g} | {attended / seq:.0f} | kernel: {width} | {ctas} | - "
                  f"| - | {kernel / attended:.2f} |", flush=True)
            for span in args.kd_spans:
                kd, ctas, _, _ = visited_pairs(u, tau, span, args.window, args.block_n,
                                               args.block_m, order="kd")
                print(f"| {seq} | {sigma:g} | {attended / seq:.0f} | kd: {span} | {ctas} | - "
                      f"| - | {kd / attended:.3f} |", flush=True)
            for rows in args.bands:
                banded, slices, launched, per_key = band_visited_pairs(
                    u, tau, args.window, rows, args.block_n, args.block_m)
                print(f"| {seq} | {sigma:g} | {attended / seq:.0f} | bands: {rows} rows | "
                      f"{slices} of {launched} | - | - | {banded / attended:.3f} "
                      f"({per_key:.2f} pieces a key) |", flush=True)
            for cluster in args.cluster:
                alone, shared = cluster_tile_reads(row_lo, num_rows, cluster, args.block_m)
                cluster_rows.append(f"| {seq} | {sigma:g} | {cluster} | {shared / alone:.3f} |")
    if cluster_rows:
        print("\nClusters of neighbouring slices of the kernel's spans walking their rows in "
              "step: row tiles read (Q, dO, dq accumulator) over those read by lone CTAs")
        print("| S | sigma | cluster | tiles read / alone |")
        print("| ---: | ---: | ---: | ---: |")
        print("\n".join(cluster_rows))


if __name__ == "__main__":
    main()
