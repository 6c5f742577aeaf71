"""Where a kernel's warps wait, from an Nsight Compute source page (warp-state samples per SASS
instruction), summed over regions of the code.

Profile with source counters and export the SASS page as CSV:

    ncu --clock-control none --section SourceCounters --section WarpStateStats \\
        --import-source yes -k regex:attention_bwd_dkdv --launch-skip 1 --launch-count 1 \\
        -o rep python3 bench/backward_profile.py foundation_t8192_causal
    ncu -i rep.ncu-rep --page source --csv --print-source sass > rep.sass.csv

then

    python bench/ncu_source_summary.py rep.sass.csv                 # landmarks, top stalls
    python bench/ncu_source_summary.py rep.sass.csv --regions 300:600 600:1440

The landmark listing prints the wgmma, barrier, mbarrier, atomic, exit and branch
instructions and any instruction with at least --min-share of the samples, each with the
samples accumulated since the previous printed line; its first column is the instruction
index that --regions takes. A region's line gives its share of all samples, the instructions
executed (divide by the warp-steps for a per-step count) and its main stall reasons. Samples
count warps, so the producer warps of a warp-specialized kernel take their share too: read
the consumer loop's regions against each other. bench/NOTES.md ("Where the fused dk/dv
kernels wait") used it.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys

LANDMARK = re.compile(r"HGMMA|WARPGROUP|BAR\.|SYNCS|REDG|ATOMG|RED\.|EXIT|BRA |STSM")


def read_source_page(path):
    """(instructions, stall reason names): each instruction a dict of its columns."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # The first row names the kernel; the second is the header.
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[start]
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for r in rows[start + 1:]:
        if len(r) != len(header):
            continue
        rec = dict(zip(header, r))
        out.append({
            "source": rec["Source"].strip(),
            "samples": int(rec["Warp Stall Sampling (All Samples)"] or 0),
            "executed": int(rec["Instructions Executed"] or 0),
            "stalls": {k[len("stall_"):]: int(rec[k] or 0) for k in reasons},
        })
    return out, [k[len("stall_"):] for k in reasons]


def top_reasons(stalls, n):
    return sorted(((v, k) for k, v in stalls.items() if v), reverse=True)[:n]


def add_stalls(total, stalls):
    for k, v in stalls.items():
        total[k] = total.get(k, 0) + v


def landmarks(instrs, min_share, out):
    total = sum(i["samples"] for i in instrs) or 1
    acc, acc_stalls = 0, {}
    for idx, ins in enumerate(instrs):
        acc += ins["samples"]
        add_stalls(acc_stalls, ins["stalls"])
        if LANDMARK.search(ins["source"]) or ins["samples"] / total >= min_share:
            reasons = ", ".join(f"{k} {v / total * 100:.2f}" for v, k in top_reasons(acc_stalls, 2))
            out.write(f"{idx:5d} {acc / total * 100:6.2f}% ex={ins['executed']:>11d} "
                      f"{ins['source'][:64]:64s} {reasons}\n")
            acc, acc_stalls = 0, {}


def regions(instrs, spans, out):
    total = sum(i["samples"] for i in instrs) or 1
    for lo, hi in spans:
        part = instrs[lo:hi]
        samples = sum(i["samples"] for i in part)
        stalls = {}
        for ins in part:
            add_stalls(stalls, ins["stalls"])
        reasons = ", ".join(f"{k} {v / max(samples, 1) * 100:.1f}%"
                            for v, k in top_reasons(stalls, 6))
        out.write(f"[{lo}, {hi}) {samples / total * 100:5.1f}% of samples, "
                  f"{sum(i['executed'] for i in part)} instructions executed; {reasons}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--regions", nargs="*", default=[], metavar="LO:HI",
                    help="instruction index ranges to sum (from the landmark listing)")
    ap.add_argument("--min-share", type=float, default=0.004,
                    help="print any instruction with at least this share of the samples")
    ap.add_argument("--top", type=int, default=20, help="the most-sampled instructions")
    args = ap.parse_args(argv)
    instrs, _ = read_source_page(args.csv)
    if not instrs:
        sys.exit(f"{args.csv}: no SASS rows (was it exported with --print-source sass?)")
    total = sum(i["samples"] for i in instrs) or 1
    out = sys.stdout
    if args.regions:
        spans = []
        for text in args.regions:
            lo, _, hi = text.partition(":")
            spans.append((int(lo), int(hi)))
        regions(instrs, spans, out)
        return
    out.write(f"{len(instrs)} instructions, {total} samples\n")
    landmarks(instrs, args.min_share, out)
    out.write(f"\nthe {args.top} most-sampled instructions:\n")
    order = sorted(range(len(instrs)), key=lambda i: -instrs[i]["samples"])[:args.top]
    for idx in sorted(order):
        ins = instrs[idx]
        reasons = ", ".join(f"{k} {v}" for v, k in top_reasons(ins["stalls"], 3))
        out.write(f"{idx:5d} {ins['samples'] / total * 100:5.2f}% {ins['source'][:64]:64s} "
                  f"{reasons}\n")


if __name__ == "__main__":
    main()
