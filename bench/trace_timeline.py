"""The GPU timeline of the backward benchmark's programs, streams side by side: every kernel
and memset of one forward call and one `jax.grad` call, with its stream, start and duration.

Nsight Compute serializes a program's kernels, so it cannot show what the SparseK backward's
side stream overlaps (runtime/side_stream.h) or what a kernel loses to the one beside it. The
JAX profiler (CUPTI) records the real timeline:

    python bench/trace_timeline.py --seq 32768 --sigma 1 --impl ours --out /tmp/tl
    python bench/trace_timeline.py --seq 32768 --impl cudnn --out /tmp/tl

Each program (built as bench/backward_benchmark.py builds it: the forward, and jax.grad of
sum(o * w)) runs three times inside the trace, each call alone between short pauses. Printed
(and written to OUT/timeline_IMPL.txt): per call its host time, its GPU span and each
stream's busy time, and for the last call every event, offset from the call's first. A lone
call runs on a cooler chip than the benchmark's back-to-back reps (bench/NOTES.md, "The
producer's proxy fence": 12.8 ms of backward here against 14.2 ms in the benchmark at 32k):
read it for order and overlap, not for times to compare with the benchmark's.
"""
from __future__ import annotations

import argparse
import functools
import glob
import gzip
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backward_benchmark as bb  # noqa: E402
import sparsek_benchmark as skb  # noqa: E402
from jax_sparsek import sparsek_attention  # noqa: E402

CALLS = 3


def programs(impl: str, seq: int, sigma: float):
    """{"fwd": (fn, args), "grad": (fn, args)} for ours (SparseK), cuDNN's dense causal
    attention, or XLA's (float32: runs on any platform)."""
    dtype = jnp.float32 if impl == "xla" else jnp.float16
    q, k, v, u = skb.make_inputs(seq, dtype, sigma, 1)[0]
    w = bb.cotangent_weights(jax.random.PRNGKey(100), q.shape, dtype)
    if impl == "ours":
        attn = functools.partial(sparsek_attention, topk=skb.TOPK, window=skb.WINDOW,
                                 is_causal=True, implementation="cuda")
        args, argnums = (q, k, v, u), (0, 1, 2, 3)
    else:
        attn = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                 implementation="cudnn" if impl == "cudnn" else "xla")
        args, argnums = (q, k, v), (0, 1, 2)
    return {"fwd": (jax.jit(attn), args),
            "grad": (jax.jit(bb.grad_program(attn, argnums)), args + (w,))}


def timeline(trace: dict) -> list[str]:
    """Lines per marked call (mark_NAME_I annotations): GPU events inside each."""
    events = trace["traceEvents"]
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X"]
    lines = []
    for i in range(CALLS):
        for name in ("fwd", "grad"):
            marks = [e for e in spans if e["name"] == f"mark_{name}_{i}"]
            if not marks:
                lines.append(f"== {name}_{i}: no trace annotation")
                continue
            lo, hi = marks[0]["ts"], marks[0]["ts"] + marks[0]["dur"]
            gpu = sorted((e for e in spans if "GPU" in processes.get(e["pid"], "")
                          and lo <= e["ts"] <= hi), key=lambda e: e["ts"])
            lines.append(f"== {name}_{i}: host {marks[0]['dur'] / 1e3:.3f} ms, "
                         f"{len(gpu)} GPU events")
            if not gpu:
                continue
            start = gpu[0]["ts"]
            end = max(e["ts"] + e["dur"] for e in gpu)
            lines.append(f"   GPU span {(end - start) / 1e3:.3f} ms")
            busy = {}
            for e in gpu:
                stream = threads.get((e["pid"], e["tid"]), str(e["tid"]))
                busy[stream] = busy.get(stream, 0) + e["dur"]
            lines += [f"   {stream}: busy {b / 1e3:.3f} ms" for stream, b in busy.items()]
            if i == CALLS - 1:
                for e in gpu:
                    stream = threads.get((e["pid"], e["tid"]), str(e["tid"]))
                    lines.append(f"   {(e['ts'] - start) / 1e3:9.3f} +{e['dur'] / 1e3:8.3f} "
                                 f"[{stream[:28]}] {e['name'][:90]}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--impl", choices=["ours", "cudnn", "xla"], default="ours")
    ap.add_argument("--out", required=True, help="folder for the trace and the timeline")
    args = ap.parse_args(argv)
    progs = programs(args.impl, args.seq, args.sigma)
    if jax.default_backend() == "gpu":
        bb.warm_up(2.0)
    for fn, a in progs.values():
        jax.block_until_ready(fn(*a))
    log_dir = os.path.join(args.out, f"trace_{args.impl}")
    with jax.profiler.trace(log_dir):
        for i in range(CALLS):
            for name, (fn, a) in progs.items():
                time.sleep(0.01)
                with jax.profiler.TraceAnnotation(f"mark_{name}_{i}"):
                    jax.block_until_ready(fn(*a))
    path, = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path) as f:
        lines = timeline(json.load(f))
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, f"timeline_{args.impl}.txt"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
