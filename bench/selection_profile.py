"""Runs the SparseK selection stage alone at the benchmark's shapes, for a kernel profiler.

    ncu --clock-control none --kernel-name regex:"sort_key|anchor|tile_thresholds" \
        --metrics gpu__time_duration.sum python3 bench/selection_profile.py

prints each kernel's time; without a profiler it prints the stage's wall time per call.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jax_sparsek._primitive import sparsek_select_cuda


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--sigma", type=float, nargs="+", default=[1.0])
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()
    for seq in args.seq:
        for sigma in args.sigma:
            u = sigma * jax.random.normal(jax.random.key(seq), (1, seq, args.heads_kv),
                                          jnp.float32)
            select = jax.jit(lambda u_: sparsek_select_cuda(u_, num_queries=seq,
                                                            topk=args.topk,
                                                            window=args.window))
            select(u).block_until_ready()
            start = time.perf_counter()
            for _ in range(args.calls):
                tau = select(u)
            tau.block_until_ready()
            ms = (time.perf_counter() - start) / args.calls * 1e3
            print(f"S={seq} sigma={sigma}: {ms:.3f} ms per call "
                  f"(tau finite rows {int(jnp.isfinite(tau).sum())})", flush=True)


if __name__ == "__main__":
    main()
