#!/usr/bin/env python3
"""Backward benchmark: our backward kernels against jax.grad of cuDNN attention, same run.

    python bench/backward_benchmark.py                     # dense configs, then SparseK
    python bench/backward_benchmark.py --dense foundation_t8192_causal --sparse-seq 32768
    python bench/backward_benchmark.py --kernels default deterministic mma_sync
    python bench/backward_benchmark.py --dense --sparse-seq 32768 --sigma 1 4

Times (the median of --reps rounds of sparsek_benchmark.time_interleaved's balanced orders,
each a jitted program over distinct input sets):
    fwd        o = attention(q, k, v)
    fwd+bwd    jax.grad of sum(o * w) in q, k, v (and the scores, SparseK)
    bwd        fwd+bwd - fwd
with w random in the attention's dtype, as the cotangent a layer above sends: the attention's
backward gets w itself (XLA drops the multiplication by the sum's cotangent, 1). Until the
twenty-second session w was float32 and both programs also cast it to the attention's dtype
(~0.19 ms at S = 32k, bench/NOTES.md); --float32-cotangent keeps that.
for ours (sparsek_attention, implementation='cuda') and
jax.nn.dot_product_attention(implementation='cudnn'), their reps interleaved (ours, cuDNN,
ours, ...): under load the H200 runs at its power cap and its clocks wander between 1.5 and
2 GHz (nvidia-smi: SW power cap), so timings taken one after the other compare different
clocks; interleaved, both see the same. Backward TFLOP/s = 2.5 x the forward's
FLOPs (4 * B * Hq * D * attended pairs) over the backward time. Dense configs are those of
bench/benchmark.py; SparseK: B=1, Hq=32, Hkv=8, D=128, K=2048, W=512, T = S, scores
u ~ N(0, sigma^2) (--sigma, default 1), against cuDNN's dense causal backward (the pairs
SparseK attends are counted exactly from the selection's tau, as bench/sparsek_benchmark.py
does).

--kernels: "default" is the kernel the device picks (the wgmma kernels on Hopper at
64 < D <= 128, whose dense dk/dv kernel also adds dq with atomics), "deterministic" the same
with JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 (dq in its own kernel), "mma_sync" sets
JAX_SPARSEK_BACKWARD_KERNEL=mma_sync; the variables are read at every call (and the
deterministic choice also when the program is traced, which happens inside its timing). Each
gets its own rows, each timed against cuDNN again with the reps interleaved.

--variant NAME=VALUE (dense and SparseK rows) adds ours again with a setting of the library (an
environment variable read at every call) to the interleaved programs, e.g. --variant
JAX_SPARSEK_SIDE_STREAM=0 for the backward on the caller's stream alone.

Correctness: for the dense configs our gradients are compared with cuDNN's (relative error;
over the SPARSEK.md tolerance the row is marked INVALID and the exit code is 1).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import CONFIGS, kernel_env  # noqa: E402
from sparsek_benchmark import attended_pairs, time_interleaved  # noqa: E402
import sparsek_benchmark as skb  # noqa: E402

import jax_sparsek  # noqa: E402
from jax_sparsek import sparsek_attention  # noqa: E402
from jax_sparsek._primitive import sparsek_select_cuda  # noqa: E402

TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}
DTYPES = {"fp16": jnp.float16, "bf16": jnp.bfloat16}
DEFAULT_DENSE = ["foundation_t2048", "foundation_t2048_causal", "foundation_t8192",
                 "foundation_t8192_causal", "gqa_t8192"]


@contextlib.contextmanager
def backward_kernel_env(kernel: str):
    """JAX_SPARSEK_BACKWARD_KERNEL=mma_sync while the mma.sync kernels are timed,
    JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 while the deterministic ones are."""
    deterministic = kernel == "deterministic"
    with kernel_env("JAX_SPARSEK_BACKWARD_KERNEL", "default" if deterministic else kernel), \
            kernel_env("JAX_SPARSEK_DETERMINISTIC_BACKWARD", "1" if deterministic else "default"):
        yield


def warm_up(seconds=2.0):
    """Matmuls until the GPU has run `seconds` at load: the clocks ramp up from idle, which
    otherwise inflates the first row's timings (seen: our forward at 1.6x its later time)."""
    x = jnp.ones((8192, 8192), jnp.float16)
    step = jax.jit(lambda x: (x @ x) * jnp.float16(1e-4))
    jax.block_until_ready(step(x))
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = jax.block_until_ready(step(x))


def grad_program(attn, argnums):
    def loss(*args):
        *inputs, w = args
        return jnp.sum((attn(*inputs) * w).astype(jnp.float32))
    return jax.grad(loss, argnums=argnums)


def cotangent_weights(key, shape, dtype, float32_cotangent=False):
    """w of sum(o * w): in the attention's dtype, or float32 (the earlier harness)."""
    return jax.random.normal(key, shape, jnp.float32 if float32_cotangent else dtype)


def rel(a, b):
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def time_fwd_bwd(impls, reps):
    """(fwd, fwd+bwd, bwd) seconds for each (attn, sets with w last, argnums, iters) or
    (..., env) (settings while it runs, sparsek_benchmark.settings), all reps interleaved."""
    cases = []
    for attn, sets, argnums, iters, *env in impls:
        env = env[0] if env else {}
        cases.append((attn, [s[:-1] for s in sets], iters, env))
        cases.append((grad_program(attn, argnums), sets, iters, env))
    t = time_interleaved(cases, reps)
    return [(t[i], t[i + 1], t[i + 1] - t[i]) for i in range(0, len(t), 2)]


def dense_row(name, dtype_key, iters, reps, kernel="default", num_sets=2, variants=(),
              float32_cotangent=False):
    cfg = CONFIGS[name]
    dtype = DTYPES[dtype_key]
    sets = []
    for i in range(num_sets):
        kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(i), 4)
        q = jax.random.normal(kq, (cfg.B, cfg.T, cfg.Hq, cfg.D), dtype)
        k = jax.random.normal(kk, (cfg.B, cfg.S, cfg.Hkv, cfg.D), dtype)
        v = jax.random.normal(kv, (cfg.B, cfg.S, cfg.Hkv, cfg.D), dtype)
        w = cotangent_weights(kw, q.shape, dtype, float32_cotangent)
        sets.append((q, k, v, w))
    ours = functools.partial(sparsek_attention, is_causal=cfg.causal, window=cfg.window,
                             implementation="cuda")
    cudnn = functools.partial(jax.nn.dot_product_attention, is_causal=cfg.causal,
                              implementation="cudnn")
    with backward_kernel_env(kernel):
        g_ours = jax.block_until_ready(jax.jit(grad_program(ours, (0, 1, 2)))(*sets[0]))
        t_ours, t_cudnn, *t_variants = time_fwd_bwd(
            [(ours, sets, (0, 1, 2), iters), (cudnn, sets, (0, 1, 2), iters)]
            + [(ours, sets, (0, 1, 2), iters, env) for _, env in variants], reps)
    g_ref = jax.jit(grad_program(cudnn, (0, 1, 2)))(*sets[0])
    err = max(rel(a, b) for a, b in zip(g_ours, g_ref))
    ok = err <= TOLERANCE[jnp.dtype(dtype).name]
    pairs = cfg.T * (cfg.T + 1) // 2 if cfg.causal else cfg.T * cfg.S
    fwd_flops = 4 * cfg.B * cfg.Hq * cfg.D * pairs
    r = {"config": name, "kernel": kernel, "dtype": jnp.dtype(dtype).name,
         "cotangent": "float32" if float32_cotangent else jnp.dtype(dtype).name,
         "ours_fwd_s": t_ours[0],
         "ours_bwd_s": t_ours[2], "cudnn_fwd_s": t_cudnn[0], "cudnn_bwd_s": t_cudnn[2],
         "ours_bwd_tflops": 2.5 * fwd_flops / t_ours[2] / 1e12,
         "cudnn_bwd_tflops": 2.5 * fwd_flops / t_cudnn[2] / 1e12,
         "bwd_ratio_vs_cudnn": t_cudnn[2] / t_ours[2], "grad_rel_err_vs_cudnn": err,
         "valid": ok,
         "variants": {label: {"ours_fwd_s": t[0], "ours_bwd_s": t[2],
                              "bwd_ratio_vs_cudnn": t_cudnn[2] / t[2]}
                      for (label, _), t in zip(variants, t_variants)}}
    print(f"{name:26s} {kernel:13s} {r['dtype']:8s} | bwd ours {t_ours[2] * 1e3:8.3f} ms "
          f"({r['ours_bwd_tflops']:5.1f} TFLOP/s) | cudnn {t_cudnn[2] * 1e3:8.3f} ms "
          f"({r['cudnn_bwd_tflops']:5.1f}) -> {r['bwd_ratio_vs_cudnn']:4.2f}x cudnn | fwd ours "
          f"{t_ours[0] * 1e3:7.3f} cudnn {t_cudnn[0] * 1e3:7.3f} ms | err {err:.1e}"
          f"{'' if ok else ' INVALID'}", flush=True)
    print_variants(r, t_ours, "bwd_ratio_vs_cudnn", "x cudnn")
    return r


def print_variants(r, t_ours, ratio_key, ratio_name):
    """One line a --variant: its backward, against cuDNN and against the default settings."""
    for label, v in r["variants"].items():
        print(f"    with {label}: bwd ours {v['ours_bwd_s'] * 1e3:8.3f} ms -> "
              f"{v[ratio_key]:5.2f}{ratio_name} ({100 * (v['ours_bwd_s'] / t_ours[2] - 1):+.1f}% "
              f"against the default settings) | fwd ours {v['ours_fwd_s'] * 1e3:7.3f} ms",
              flush=True)


def sparse_row(seq, dtype_key, iters, reps, kernel="default", sigma=1.0, variants=(),
               float32_cotangent=False):
    dtype = DTYPES[dtype_key]
    sets = [s + (cotangent_weights(jax.random.PRNGKey(100 + i), s[0].shape, dtype,
                                   float32_cotangent),)
            for i, s in enumerate(skb.make_inputs(seq, dtype, sigma, 2))]
    ours = functools.partial(sparsek_attention, topk=skb.TOPK, window=skb.WINDOW,
                             is_causal=True, implementation="cuda")
    cudnn = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                              implementation="cudnn")
    u = sets[0][3]
    tau = jax.block_until_ready(jax.jit(functools.partial(
        sparsek_select_cuda, num_queries=seq, topk=skb.TOPK, window=skb.WINDOW))(u))
    pairs = int(attended_pairs(u, tau, seq=seq)) * (skb.HQ // skb.HKV)
    with backward_kernel_env(kernel):
        grads = jax.jit(grad_program(ours, (0, 1, 2, 3)))(*sets[0])
        finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)
        dense_sets = [s[:3] + s[4:] for s in sets]
        t_ours, t_cudnn, *t_variants = time_fwd_bwd(
            [(ours, sets, (0, 1, 2, 3), iters),
             (cudnn, dense_sets, (0, 1, 2), max(1, iters // 2))]
            + [(ours, sets, (0, 1, 2, 3), iters, env) for _, env in variants], reps)
    dense_pairs = skb.B * skb.HQ * seq * (seq + 1) // 2
    r = {"seq": seq, "sigma": sigma, "kernel": kernel, "dtype": jnp.dtype(dtype).name,
         "cotangent": "float32" if float32_cotangent else jnp.dtype(dtype).name,
         "topk": skb.TOPK, "window": skb.WINDOW,
         "keys_per_row": pairs / (skb.B * skb.HQ * seq),
         "ours_fwd_s": t_ours[0], "ours_bwd_s": t_ours[2], "cudnn_fwd_s": t_cudnn[0],
         "cudnn_bwd_s": t_cudnn[2],
         "ours_bwd_tflops": 2.5 * 4 * skb.D * pairs / t_ours[2] / 1e12,
         "cudnn_bwd_tflops": 2.5 * 4 * skb.D * dense_pairs / t_cudnn[2] / 1e12,
         "bwd_speedup_vs_cudnn_causal": t_cudnn[2] / t_ours[2], "valid": finite,
         "variants": {label: {"ours_fwd_s": t[0], "ours_bwd_s": t[2],
                              "bwd_speedup_vs_cudnn_causal": t_cudnn[2] / t[2]}
                      for (label, _), t in zip(variants, t_variants)}}
    print(f"SparseK S={seq:6d} sigma={sigma:g} {kernel:13s} {r['dtype']:8s} keys/row "
          f"{r['keys_per_row']:7.1f} | bwd ours "
          f"{t_ours[2] * 1e3:8.3f} ms ({r['ours_bwd_tflops']:5.1f} TFLOP/s on attended pairs) "
          f"| cudnn causal bwd {t_cudnn[2] * 1e3:8.3f} ms ({r['cudnn_bwd_tflops']:5.1f}) -> "
          f"{r['bwd_speedup_vs_cudnn_causal']:5.2f}x | fwd ours {t_ours[0] * 1e3:7.3f} ms"
          f"{'' if finite else ' NON-FINITE GRADIENTS'}", flush=True)
    print_variants(r, t_ours, "bwd_speedup_vs_cudnn_causal", "x")
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", nargs="*", default=DEFAULT_DENSE)
    ap.add_argument("--sparse-seq", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--sigma", type=float, nargs="+", default=[1.0],
                    help="SparseK rows: scores u ~ N(0, sigma^2), as bench/sparsek_benchmark.py")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp16"])
    ap.add_argument("--kernels", nargs="+", choices=["default", "deterministic", "mma_sync"],
                    default=["default"])
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", action="append", metavar="NAME=VALUE[,NAME=VALUE]",
                    help="also time ours with these settings (e.g. JAX_SPARSEK_"
                         "SIDE_STREAM=0), interleaved with the rest; repeatable")
    ap.add_argument("--float32-cotangent", action="store_true",
                    help="w (the cotangent) in float32, cast by both programs, as until the "
                         "twenty-second session")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    try:
        variants = skb.parse_variants(args.variant)
    except ValueError as error:
        ap.error(str(error))
    if jax.default_backend() != "gpu":
        print("backward_benchmark: no GPU visible to JAX; nothing to time.")
        return 0
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; backward kernel "
          f"{jax_sparsek.build_info().get('backward_kernel')}")
    warm_up()
    results = []
    for dt in args.dtype:
        for kernel in args.kernels:
            results += [dense_row(name, dt, args.iters, args.reps, kernel, variants=variants,
                                  float32_cotangent=args.float32_cotangent)
                        for name in args.dense]
            results += [sparse_row(seq, dt, args.iters, args.reps, kernel, sigma, variants,
                                   float32_cotangent=args.float32_cotangent)
                        for seq in args.sparse_seq for sigma in args.sigma]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "results": results}, f,
                      indent=1)
    return 0 if all(r["valid"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
