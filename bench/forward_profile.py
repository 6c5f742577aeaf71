"""One forward call of ours at a benchmark config, for Nsight Compute.

    ncu --clock-control none -k regex:attention_fwd --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python bench/forward_profile.py gpt4

`sparsek:S:SIGMA` (e.g. `sparsek:32768:4`) profiles the SparseK forward at issue 3's config
(bench/sparsek_benchmark.py: B=1, Hq=32, Hkv=8, D=128, K=2048, W=512, T = S), selection
included in the call (the regex above picks the attention kernel). For where a SparseK tile
waits, per SASS line (the producer warpgroup's gather against the consumers' softmax):

    ncu --clock-control none -k regex:attention_fwd --launch-skip 1 --launch-count 1 \\
        --set full --import-source yes -o fwd python bench/forward_profile.py sparsek:32768:4
    ncu -i fwd.ncu-rep --page source --csv --print-source sass > fwd_sass.csv

`dense:S` profiles our dense causal forward on the same inputs, `cudnn:S` cuDNN's
(jax.nn.dot_product_attention, implementation='cudnn'; its kernel is not named attention_fwd:
list the call's kernels first, e.g. with --metrics gpu__time_duration.sum and no -k).

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
import sparsek_benchmark  # noqa: E402


def sparsek_call(spec: str):
    """The SparseK forward of `sparsek:S:SIGMA` and its inputs."""
    _, seq, sigma = spec.split(":")
    args = sparsek_benchmark.make_inputs(int(seq), jax.numpy.float16, float(sigma), 1)[0]
    fn = jax.jit(lambda q, k, v, u: jax_sparsek.sparsek_attention(
        q, k, v, u, topk=sparsek_benchmark.TOPK, window=sparsek_benchmark.WINDOW,
        is_causal=True, implementation="cuda"))
    return fn, args, f"S={seq} sigma={sigma} (B=1 Hq=32 Hkv=8 D=128 K=2048 W=512)"


def dense_call(spec: str):
    """Our dense causal forward (`dense:S`) or cuDNN's (`cudnn:S`) on issue 3's inputs."""
    kind, seq = spec.split(":")
    q, k, v, _ = sparsek_benchmark.make_inputs(int(seq), jax.numpy.float16, 1.0, 1)[0]
    fn = jax.jit(sparsek_benchmark.DENSE_CAUSAL[kind])
    return fn, (q, k, v), f"{kind} causal S={seq} (B=1 Hq=32 Hkv=8 D=128)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else "gpt4"
    if name.startswith("sparsek:"):
        fn, args, shape = sparsek_call(name)
    elif name.startswith(("dense:", "cudnn:")):
        fn, args, shape = dense_call(name)
    else:
        cfg = benchmark.CONFIGS[name]
        args = benchmark.make_inputs(cfg, jax.numpy.float16, 1)[0]
        fn = jax.jit(lambda q, k, v: jax_sparsek.sparsek_attention(
            q, k, v, is_causal=cfg.causal, window=cfg.window, implementation="cuda"))
        shape = cfg.shape()
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    print(f"profiled {name}: {shape}, kernel {jax_sparsek.build_info().get('forward_kernel')}")


if __name__ == "__main__":
    main()
