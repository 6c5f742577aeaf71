"""One forward call of ours at a benchmark config, for Nsight Compute.

    ncu --clock-control none -k regex:attention_fwd --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python bench/forward_profile.py gpt4

The first call compiles and runs once (skipped by --launch-skip 1), the second is profiled.
JAX_SPARSEK_FORWARD_KERNEL=mma_sync profiles the mma.sync kernel instead of the Hopper one.
"""
from __future__ import annotations

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import jax_sparsek  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "gpt4"
    cfg = benchmark.CONFIGS[name]
    q, k, v = benchmark.make_inputs(cfg, jax.numpy.float16, 1)[0]
    fn = jax.jit(lambda q, k, v: jax_sparsek.sparsek_attention(
        q, k, v, is_causal=cfg.causal, window=cfg.window, implementation="cuda"))
    for _ in range(2):
        jax.block_until_ready(fn(q, k, v))
    print(f"profiled {name}: {cfg.shape()}, kernel {jax_sparsek.build_info().get('forward_kernel')}")


if __name__ == "__main__":
    main()
