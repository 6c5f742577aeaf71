"""One backward (jax.grad) call of ours, for Nsight Compute: the dq and dk/dv kernels' times.

    ncu --clock-control none -k regex:attention_bwd_d --launch-skip 2 --launch-count 2 \\
        --metrics gpu__time_duration.sum python bench/backward_profile.py sparsek 32768 [sigma]
    JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 ncu ... python bench/backward_profile.py \\
        foundation_t8192_causal

The first call compiles and runs once (its two kernels skipped by --launch-skip 2), the
second is profiled. JAX_SPARSEK_BACKWARD_KERNEL=mma_sync profiles the mma.sync kernels. The
dense modes' default on Hopper runs no dq kernel (the dk/dv kernel adds dq): there use
-k regex:"attention_bwd_dkdv|store_dq" (the conversion kernel) with the same counts.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import sparsek_benchmark as skb  # noqa: E402
import jax_sparsek  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "foundation_t8192_causal"
    if name == "sparsek":
        seq = int(argv[1]) if len(argv) > 1 else 32768
        sigma = float(argv[2]) if len(argv) > 2 else 1.0
        q, k, v, u = skb.make_inputs(seq, jnp.float16, sigma, 1)[0]
        attn = functools.partial(jax_sparsek.sparsek_attention, topk=skb.TOPK,
                                 window=skb.WINDOW, is_causal=True, implementation="cuda")
        args, argnums = (q, k, v, u), (0, 1, 2, 3)
        shape = f"SparseK S={seq} sigma={sigma:g}"
    else:
        cfg = benchmark.CONFIGS[name]
        q, k, v = benchmark.make_inputs(cfg, jnp.float16, 1)[0]
        attn = functools.partial(jax_sparsek.sparsek_attention, is_causal=cfg.causal,
                                 window=cfg.window, implementation="cuda")
        args, argnums = (q, k, v), (0, 1, 2)
        shape = cfg.shape()
    fn = jax.jit(jax.grad(lambda *a: jnp.sum(attn(*a).astype(jnp.float32)), argnums=argnums))
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    print(f"profiled {name}: {shape}, backward kernel "
          f"{jax_sparsek.build_info().get('backward_kernel')}")


if __name__ == "__main__":
    main()
