#!/usr/bin/env python3
"""SparseK forward benchmark: the selection stage plus the sparse attention kernel against
dense causal attention (cuDNN through jax.nn.dot_product_attention, and our dense kernel).

    python bench/sparsek_benchmark.py                       # S = 8k, 32k, 128k; fp16, bf16
    python bench/sparsek_benchmark.py --seq 32768 --dtype fp16 --sigma 1 --json out.json

Config (issue 3): B=1, Hq=32, Hkv=8, D=128, topk K=2048, window W=512, T = S. Scores are
random normal u ~ N(0, sigma^2) per key and kv head (--sigma, default both 1 and 4): the
spread of the scores decides how many keys get a fractional gate (0 < m < 1), and so how
many keys past K each row attends. Both are reported.

Timed, each as one jitted program over distinct input sets, the median of its runs over
--reps rounds; a round runs every program once in each order of a balanced design (every
program right after every other one equally often: time_interleaved):
    ours      sparsek_attention(q, k, v, scores, topk=K, window=W, implementation='cuda')
              (selection + attention, end to end)
    select    the selection stage alone (jax_sparsek._primitive.sparsek_select_cuda)
    cudnn     jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
    dense     sparsek_attention(q, k, v, is_causal=True, implementation='cuda')
Effective TFLOP/s count only the pairs attended: 4 * Hq * D * sum_i |{j : m_ij > 0}|, with
the pairs counted exactly on the GPU from the selection's tau (window keys plus the domain
keys with u_j > tau_i). The attention-only time is ours - select.

--band adds, per sigma, cuDNN's and our dense kernel on a causal sliding window whose rows
attend as many keys on average as ours (the same pairs, contiguous: what either takes for
them with no selection, no gather and no gates; cuDNN's causal time over its band time is the
speedup its own kernel would reach on our pairs). --variant NAME=VALUE adds ours again with a
setting of the library (an environment variable read at every call) to the interleaved
programs, e.g. --variant JAX_SPARSEK_DEPENDENT_LAUNCH=0 for the kernels launched one after
the other.

Correctness: before timing, 64 rows spread over the sequence (kv head 0 and its 4 query
heads) are recomputed in float32 from their whole prefix (the reference's threshold solver,
its gates, a gated softmax) and compared with ours; over the SPARSEK.md tolerance the row is
marked INVALID and the exit code is 1.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    import jax_sparsek  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_sparsek import sparsek_attention  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import kernel_env  # noqa: E402
from jax_sparsek._gates import _capped_simplex_threshold  # noqa: E402
from jax_sparsek._primitive import sparsek_select_cuda  # noqa: E402
from jax_sparsek._reference import gated_attention_reference  # noqa: E402

B, HQ, HKV, D, TOPK, WINDOW = 1, 32, 8, 128, 2048, 512
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}
DTYPES = {"fp16": jnp.float16, "bf16": jnp.bfloat16}
SET_BYTES_LIMIT = 3 * 2**30
# The dense causal peers at the same shape: cuDNN's, and our own dense kernel
# (bench/forward_profile.py profiles them too).
DENSE_CAUSAL = {
    "cudnn": functools.partial(jax.nn.dot_product_attention, is_causal=True,
                               implementation="cudnn"),
    "dense": functools.partial(sparsek_attention, is_causal=True, implementation="cuda"),
}


def make_inputs(seq, dtype, sigma, num_sets, seed=0):
    sets = []
    for i in range(num_sets):
        kq, kk, kv, ku = jax.random.split(jax.random.PRNGKey(seed * 1000 + i), 4)
        q = jax.random.normal(kq, (B, seq, HQ, D), dtype)
        k = jax.random.normal(kk, (B, seq, HKV, D), dtype)
        v = jax.random.normal(kv, (B, seq, HKV, D), dtype)
        u = sigma * jax.random.normal(ku, (B, seq, HKV), jnp.float32)
        sets.append((q, k, v, u))
    return sets


@contextlib.contextmanager
def settings(env):
    """The library's settings (environment variables read at every call, e.g.
    JAX_SPARSEK_SIDE_STREAM=0) for the duration, through benchmark.kernel_env ("default"
    unsets one); the previous values come back on exit."""
    with contextlib.ExitStack() as stack:
        for name, value in env.items():
            stack.enter_context(kernel_env(name, value))
        yield


def parse_variants(variants):
    """--variant NAME=VALUE[,NAME=VALUE...] -> [(label, {NAME: VALUE, ...})]; ValueError naming
    the option for an item without a name and '='."""
    parsed = []
    for text in variants or []:
        items = [item.split("=", 1) for item in text.split(",")]
        if any(len(item) != 2 or not item[0] for item in items):
            raise ValueError(f"--variant expects NAME=VALUE[,NAME=VALUE...], got {text!r}")
        parsed.append((text, dict(items)))
    return parsed


def balanced_orders(n):
    """Orders of n programs in which every program runs right after every other one equally
    often (a Williams design: n orders for even n, 2n for odd n). A program timed always after
    the same one inherits that one's heat (the clock under the power cap): seen in the
    sixteenth session, the same program ran 5-8% slower after a dense kernel than after a
    short one, and a fixed order or its reverse (ABBA) favour the programs at its ends."""
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(i + shift) % n for i in first] for shift in range(n)]
    if n % 2:
        orders += [order[::-1] for order in orders]
    return orders


def time_interleaved(cases, reps):
    """Median seconds per call for each (fn, sets, iters) or (fn, sets, iters, env): one
    jitted program each, run on every set (with the settings env, if given); the programs'
    reps interleaved: each rep runs every program once in each of balanced_orders, so that
    all see the same clocks and the same predecessors (under load the H200 sits at its power
    cap and its SM clock wanders between 1.5 and 2 GHz: a program timed right after another
    runs on a hotter, slower chip)."""
    programs = [(jax.jit(lambda all_sets, fn=case[0]: [fn(*s) for s in all_sets]), case[1],
                 case[2], case[3] if len(case) > 3 else {}) for case in cases]
    for program, sets, _, env in programs:
        with settings(env):
            jax.block_until_ready(program(sets))
    def timed(index):
        program, sets, iters, env = programs[index]
        with settings(env):
            start = time.perf_counter()
            for _ in range(iters):
                out = program(sets)
            jax.block_until_ready(out)
            return (time.perf_counter() - start) / (iters * len(sets))

    times = [[] for _ in programs]
    for _ in range(reps):
        for order in balanced_orders(len(programs)):
            for i in order:
                times[i].append(timed(i))
    return [statistics.median(t) for t in times]


@functools.partial(jax.jit, static_argnames=("seq",))
def attended_pairs(u, tau, *, seq):
    """sum over kv heads and rows of |{j : m_ij > 0}| (T = S)."""
    rows_per_step = 256
    u_heads = jnp.moveaxis(u[0], 0, 1)  # [Hkv, S]
    keys = jnp.arange(seq)

    def step(start):
        rows = start + jnp.arange(rows_per_step)
        domain_end = jnp.clip(rows - WINDOW + 1, 0, seq)                 # p(i) = i
        window = jnp.minimum(rows + 1, WINDOW)
        t = jax.lax.dynamic_slice_in_dim(tau[0], start, rows_per_step, axis=1)  # [Hkv, r]
        inside = keys[None, :] < domain_end[:, None]                      # [r, S]
        selected = (u_heads[:, None, :] > t[:, :, None]) & inside[None]
        return (jnp.sum(selected, dtype=jnp.int32).astype(jnp.float32)
                + HKV * jnp.sum(window).astype(jnp.float32))

    starts = jnp.arange(0, seq, rows_per_step)
    return jnp.sum(jax.lax.map(step, starts))


def band_width(keys_per_row, seq):
    """The causal sliding window w whose rows attend keys_per_row keys on average: row i
    attends min(i + 1, w), so the rows' total is w seq - w (w - 1) / 2 (at most the causal
    mean (seq + 1) / 2: w = seq)."""
    b = 2 * seq + 1
    w = (b - np.sqrt(max(0.0, b * b - 8.0 * keys_per_row * seq))) / 2
    return int(min(seq, max(1, round(w))))


def band_programs(w):
    """cuDNN's and our dense causal attention over the window of the last w keys."""
    return (functools.partial(jax.nn.dot_product_attention, is_causal=True,
                              implementation="cudnn", local_window_size=(w - 1, 0)),
            functools.partial(sparsek_attention, is_causal=True, window=w,
                              implementation="cuda"))


def check_rows(q, k, v, u, out, dtype_name, seq):
    """Relative error of ours on 64 rows recomputed in float32 from their whole prefix."""
    rows = np.unique(np.concatenate([np.linspace(0, seq - 1, 60).astype(int),
                                     [0, 1, seq // 2, seq - 1]]))
    u0 = u[0, :, 0].astype(jnp.float32)
    domain_end = np.clip(rows - WINDOW + 1, 0, seq)
    keys = np.arange(seq)
    in_domain = keys[None, :] < domain_end[:, None]
    tau = _capped_simplex_threshold(jnp.where(in_domain, u0[None, :], -jnp.inf), TOPK)
    in_window = (keys[None, :] <= rows[:, None]) & (keys[None, :] > rows[:, None] - WINDOW)
    gates = jnp.where(in_window, 1.0, jnp.where(in_domain, jnp.clip(u0[None] - tau[:, None],
                                                                    0.0, 1.0), 0.0))
    group = HQ // HKV
    qs = q[:, rows, :group]
    ref, _ = gated_attention_reference(qs, k[:, :, :1], v[:, :, :1], gates[None, None],
                                       1.0 / np.sqrt(D))
    got = out[:, rows, :group].astype(jnp.float32)
    ref = ref.astype(jnp.float32)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    return err, err <= TOLERANCE[dtype_name]


def run(seq, dtype_key, sigmas, iters, reps, variants=(), band=False):
    dtype = DTYPES[dtype_key]
    dtype_name = jnp.dtype(dtype).name
    set_bytes = seq * (HQ + 2 * HKV) * D * 2 + seq * HQ * D * 2
    num_sets = int(max(1, min(4, SET_BYTES_LIMIT // set_bytes)))
    results = []
    sparse = functools.partial(sparsek_attention, topk=TOPK, window=WINDOW, is_causal=True,
                               implementation="cuda")
    select = functools.partial(sparsek_select_cuda, num_queries=seq, topk=TOPK, window=WINDOW)
    dense_pairs = B * HQ * seq * (seq + 1) // 2
    cudnn, dense = DENSE_CAUSAL["cudnn"], DENSE_CAUSAL["dense"]
    for sigma in sigmas:
        sets = make_inputs(seq, dtype, sigma, num_sets)
        q, k, v, u = sets[0]
        out = jax.block_until_ready(jax.jit(sparse)(q, k, v, u))
        err, ok = check_rows(q, k, v, u, out, dtype_name, seq)
        tau = jax.block_until_ready(jax.jit(select)(u))
        pairs = int(attended_pairs(u, tau, seq=seq)) * (HQ // HKV)
        dense_sets = [s[:3] for s in sets]
        dense_iters = max(1, iters // 4)
        select_only = lambda q_, k_, v_, u_: select(u_)  # noqa: E731
        width = band_width(pairs / (B * HQ * seq), seq) if band else 0
        band_cases = [(fn, dense_sets, iters) for fn in band_programs(width)] if band else []
        t_ours, t_select, cudnn_s, dense_s, *t_rest = time_interleaved(
            [(sparse, sets, iters), (select_only, sets, iters),
             (cudnn, dense_sets, dense_iters), (dense, dense_sets, dense_iters)]
            + band_cases
            + [case for _, env in variants
               for case in ((sparse, sets, iters, env), (select_only, sets, iters, env))], reps)
        t_band, t_variants = t_rest[:len(band_cases)], t_rest[len(band_cases):]
        baseline = {"cudnn_s": cudnn_s, "dense_s": dense_s}
        flop_per_pair = 4 * D
        t_attn = t_ours - t_select
        r = {
            "seq": seq, "dtype": dtype_name, "sigma": sigma, "topk": TOPK, "window": WINDOW,
            "rel_err": err, "valid": ok,
            "keys_per_row": pairs / (B * HQ * seq),
            "ours_s": t_ours, "select_s": t_select, "attention_s": t_attn,
            **baseline,
            "speedup_vs_cudnn": baseline["cudnn_s"] / t_ours,
            "select_share": t_select / t_attn,
            "sparse_tflops": flop_per_pair * pairs / t_attn / 1e12,
            "e2e_tflops": flop_per_pair * pairs / t_ours / 1e12,
            "dense_tflops": flop_per_pair * dense_pairs / baseline["dense_s"] / 1e12,
            "cudnn_tflops": flop_per_pair * dense_pairs / baseline["cudnn_s"] / 1e12,
        }
        r["sparse_vs_dense_efficiency"] = r["sparse_tflops"] / r["dense_tflops"]
        if band:
            band_pairs = B * HQ * (width * seq - width * (width - 1) // 2)
            r["band"] = {
                "width": width, "keys_per_row": band_pairs / (B * HQ * seq),
                "cudnn_s": t_band[0], "dense_s": t_band[1],
                "cudnn_speedup_vs_cudnn_causal": cudnn_s / t_band[0],
                "cudnn_tflops": flop_per_pair * band_pairs / t_band[0] / 1e12,
                "dense_tflops": flop_per_pair * band_pairs / t_band[1] / 1e12,
                "attention_vs_dense_band": t_band[1] / t_attn,
            }
        r["variants"] = {label: {"ours_s": t, "select_s": t_sel,
                                 "speedup_vs_cudnn": baseline["cudnn_s"] / t}
                         for (label, _), t, t_sel in zip(variants, t_variants[0::2],
                                                         t_variants[1::2])}
        results.append(r)
        print(f"S={seq:6d} {dtype_name:8s} sigma={sigma:g}: keys/row {r['keys_per_row']:7.1f} "
              f"| ours {t_ours * 1e3:8.3f} ms (select {t_select * 1e3:7.3f} ms = "
              f"{100 * r['select_share']:4.1f}% of attention) | cudnn causal "
              f"{baseline['cudnn_s'] * 1e3:8.3f} ms -> {r['speedup_vs_cudnn']:5.2f}x | sparse "
              f"{r['sparse_tflops']:5.1f} TFLOP/s = {100 * r['sparse_vs_dense_efficiency']:4.1f}% "
              f"of our dense ({r['dense_tflops']:5.1f}; cudnn {r['cudnn_tflops']:5.1f}) | "
              f"err {err:.1e}{'' if ok else ' INVALID'}", flush=True)
        if band:
            bd = r["band"]
            print(f"    band of {bd['width']} keys ({bd['keys_per_row']:.1f} a row): cudnn "
                  f"{bd['cudnn_s'] * 1e3:8.3f} ms ({bd['cudnn_tflops']:5.1f} TFLOP/s) -> "
                  f"{bd['cudnn_speedup_vs_cudnn_causal']:5.2f}x cudnn causal | our dense "
                  f"{bd['dense_s'] * 1e3:8.3f} ms ({bd['dense_tflops']:5.1f} TFLOP/s); our "
                  f"attention {100 * bd['attention_vs_dense_band']:5.1f}% of its speed",
                  flush=True)
        for label, v in r["variants"].items():
            print(f"    with {label}: ours {v['ours_s'] * 1e3:8.3f} ms (select "
                  f"{v['select_s'] * 1e3:7.3f} ms) -> {v['speedup_vs_cudnn']:5.2f}x cudnn "
                  f"({100 * (v['ours_s'] / t_ours - 1):+.1f}% against the default settings)",
                  flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    ap.add_argument("--sigma", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variant", action="append", metavar="NAME=VALUE[,NAME=VALUE]",
                    help="also time ours with these settings (e.g. JAX_SPARSEK_DEPENDENT_"
                         "LAUNCH=0), interleaved with the rest; repeatable")
    ap.add_argument("--band", action="store_true",
                    help="also time cuDNN's and our dense causal attention on a sliding window "
                         "with as many keys a row as ours attends")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    try:
        variants = parse_variants(args.variant)
    except ValueError as error:
        ap.error(str(error))
    if jax.default_backend() != "gpu":
        print("sparsek_benchmark: no GPU visible to JAX; nothing to time.")
        return 0
    dev = jax.devices()[0]
    kernel = jax_sparsek.build_info().get("forward_kernel")
    print(f"device: {dev.device_kind}; jax {jax.__version__}; forward kernel {kernel}")
    results = []
    for seq in args.seq:
        for dt in args.dtype:
            results += run(seq, dt, args.sigma, args.iters, args.reps, variants, args.band)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "results": results}, f, indent=1)
    return 0 if all(r["valid"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
