#!/usr/bin/env python3
"""Forward attention benchmark: jax_sparsek's CUDA kernel against the attention kernels a JAX
or PyTorch user would otherwise call.

    python bench/benchmark.py --list                 # configs, FLOPs, bytes, floors
    python bench/benchmark.py --config gpt4          # one config (several may follow)
    python bench/benchmark.py --sweep --json out.json
    python bench/benchmark.py --config gqa_t8192 --impls ours,torch-flash --dtype bf16

Implementations timed (``--impls``; each skipped with a printed reason where it fails or does
not support the config):

    ours             sparsek_attention(implementation='cuda')
    jax-cudnn        jax.nn.dot_product_attention(implementation='cudnn')
    jax-xla          jax.nn.dot_product_attention(implementation='xla')   (materialises T x S)
    torch-flash      torch SDPA under sdpa_kernel(FLASH_ATTENTION)        (FlashAttention-2)
    torch-efficient  torch SDPA under sdpa_kernel(EFFICIENT_ATTENTION)
    torch-cudnn      torch SDPA under sdpa_kernel(CUDNN_ATTENTION)

Method. Inputs are random normal (never zeros). Every implementation first computes one kv
group of batch 0 that is compared with a float32 reference on upcast inputs
(``dense_attention_reference`` at matmul precision 'highest'); ``ours`` over the SPARSEK.md
tolerance (2e-3 fp16, 1e-2 bf16) is marked INVALID and makes the exit code 1, so a wrong kernel
cannot post a number. JAX: one jitted program runs the attention once on each of R distinct
input sets (``--sets``, default 8, at most 4 GiB of them: distinct, so that XLA cannot merge
the calls, the L2 (50 MB) cannot hold them, and JAX's per-program overhead, tens of us, is
spread over R calls; jax-xla, which materialises T x S logits, gets only enough sets to span 4x
the L2), is warmed up, then ``--iters`` programs are dispatched and the last is waited on
(block_until_ready); the time per attention call is the median over ``--reps`` repetitions.
Torch: the same R calls are captured in one CUDA graph (eager if capture fails) and timed the
same way with CUDA events. FLOPs count useful work only:
``4 * B * Hq * D * (attended (row, key) pairs)``, with the pairs counted exactly for causal,
window and T != S (bottom-right alignment, SPARSEK.md). Minimal bytes: q, k, v read once, o
written once (lse excluded: only ours writes it).

Peers align causal masks top-left (jax.nn's xla and cudnn paths, torch's is_causal), ours
bottom-right: they compute the same function only when T == S, so causal T != S configs skip
them. Torch SDPA has no sliding-window argument (a mask would force a dense path), so window
configs skip torch.

On a machine without a GPU this prints so and does a tiny smoke run of the machinery with the
pure-JAX implementations, then exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

# Leave GPU memory to torch as well: JAX would otherwise take 75% of it at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    import jax_sparsek
except ImportError:  # run from a checkout without installing: use the source tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax_sparsek

L2_BYTES = 50e6
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}
SETS_BYTES_LIMIT = 4 * 2**30
XLA_LOGITS_LIMIT = 8 * 2**30  # jax-xla materialises B*Hq*T*S float32 logits (and more)
# Measured ceilings on this workplace's machines (see bench/NOTES.md):
# (dense fp16/bf16 matrix rate FLOP/s, device-to-device copy bytes/s).
CEILINGS = {"H100": (798e12, 3.0e12), "H200": (788e12, 4.3e12)}
# ours-mma-sync: ours with JAX_SPARSEK_FORWARD_KERNEL=mma_sync (the mma.sync kernel where the
# Hopper kernel would run), to compare the two kernels in one run.
OURS_KERNELS = {"ours": None, "ours-mma-sync": "mma_sync"}
IMPLS = ("ours", "ours-mma-sync", "jax-cudnn", "jax-xla", "torch-flash", "torch-efficient",
         "torch-cudnn")


@dataclasses.dataclass(frozen=True)
class Config:
    B: int
    T: int
    S: int
    Hq: int
    Hkv: int
    D: int
    causal: bool
    window: int | None  # causal sliding window W: row at position p sees p - W < j <= p
    description: str

    def shape(self) -> str:
        mode = (f"causal window {self.window}" if self.window else
                "causal" if self.causal else "full")
        return (f"B={self.B} T={self.T} S={self.S} Hq={self.Hq} Hkv={self.Hkv} D={self.D} "
                f"{mode}")


def _foundation(b, t, causal):
    return Config(b, t, t, 16, 16, 128, causal, None,
                  f"FlashAttention-2 paper's setting at D=128 (hidden 2048, B*T = 16k tokens), "
                  f"{'causal' if causal else 'non-causal'}")


CONFIGS = {
    # The seed README's performance table (H100, seq/heads/dim given, batch and masking not):
    # B=1 and no mask assumed.
    "seed_s512_h96_d64": Config(1, 512, 512, 96, 96, 64, False, None,
                                "seed table row 1: seq 512, 96 heads, dim 64 (B=1 assumed)"),
    "seed_s2048_h32_d128": Config(1, 2048, 2048, 32, 32, 128, False, None,
                                  "seed table row 2: seq 2048, 32 heads, dim 128 (B=1 assumed)"),
    "gpt4": Config(1, 8192, 8192, 32, 32, 128, False, None,
                   "seed table row 3 / the seed's '--config gpt4': seq 8192, 32 heads, dim 128"),
    "gpt4_causal": Config(1, 8192, 8192, 32, 32, 128, True, None, "gpt4, causal"),
    "foundation_t2048": _foundation(8, 2048, False),
    "foundation_t2048_causal": _foundation(8, 2048, True),
    "foundation_t8192": _foundation(2, 8192, False),
    "foundation_t8192_causal": _foundation(2, 8192, True),
    "gqa_t8192": Config(2, 8192, 8192, 32, 8, 128, True, None,
                        "GQA prefill, 4 query heads per kv head, causal"),
    "window_t8192_w512": Config(2, 8192, 8192, 16, 16, 128, True, 512,
                                "causal sliding window of 512 keys (Mistral-style local layer)"),
    "decode_s8192": Config(8, 1, 8192, 32, 8, 128, False, None,
                           "decode step: 1 query row on an 8192-key GQA cache, memory bound; "
                           "non-causal (bottom-right causal with T=1 sees every key anyway, "
                           "and the peers align top-left)"),
}

# --sweep: the FlashAttention-2 paper's grid: B*T = 16k tokens, hidden 2048 (H = 2048 / D).
SWEEP = {
    f"sweep_d{d}_t{t}{'_causal' if causal else ''}": Config(
        16384 // t, t, t, 2048 // d, 2048 // d, d, causal, None,
        f"sweep: B*T = 16k, H = {2048 // d}, D = {d}")
    for d in (64, 128) for causal in (False, True)
    for t in (512, 1024, 2048, 4096, 8192, 16384)
}


# ---------------------------------------------------------------------------------- counting

def attended_pairs(cfg: Config) -> int:
    """Sum over query rows of the keys each row attends (one batch element, one head)."""
    pos = np.arange(cfg.T, dtype=np.int64) + (cfg.S - cfg.T)  # bottom-right alignment
    hi = np.minimum(pos, cfg.S - 1) if cfg.causal else np.full(cfg.T, cfg.S - 1)
    lo = np.maximum(pos - cfg.window + 1, 0) if cfg.window else np.zeros(cfg.T, np.int64)
    return int(np.maximum(hi - lo + 1, 0).sum())


def flops(cfg: Config) -> int:
    return 4 * cfg.B * cfg.Hq * cfg.D * attended_pairs(cfg)


def min_bytes(cfg: Config, itemsize: int = 2) -> int:
    """q and o, k and v, each moved once."""
    return itemsize * cfg.D * cfg.B * (2 * cfg.T * cfg.Hq + 2 * cfg.S * cfg.Hkv)


def ceilings_for(device_kind: str):
    return next((c for name, c in CEILINGS.items() if name in device_kind), None)


def floor_seconds(cfg: Config, ceilings) -> tuple[float, str]:
    compute, memory = flops(cfg) / ceilings[0], min_bytes(cfg) / ceilings[1]
    return max(compute, memory), ("compute" if compute >= memory else "memory")


# ------------------------------------------------------------------------------------ inputs

def make_inputs(cfg: Config, dtype, num_sets: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3 * num_sets)
    shapes = [(cfg.B, cfg.T, cfg.Hq, cfg.D), (cfg.B, cfg.S, cfg.Hkv, cfg.D),
              (cfg.B, cfg.S, cfg.Hkv, cfg.D)]
    return [tuple(jax.random.normal(keys[3 * i + j], shapes[j], jnp.float32).astype(dtype)
                  for j in range(3)) for i in range(num_sets)]


def set_bytes(cfg: Config) -> int:
    return min_bytes(cfg) - 2 * cfg.B * cfg.T * cfg.Hq * cfg.D  # q, k, v


def num_input_sets(cfg: Config, requested: int) -> int:
    """The requested number of input sets, fewer if they would take more than 4 GiB."""
    return int(max(1, min(requested, SETS_BYTES_LIMIT // set_bytes(cfg))))


def num_l2_sets(cfg: Config) -> int:
    """Enough sets to span 4x the L2, so that timed calls read from HBM."""
    return int(max(1, math.ceil(4 * L2_BYTES / set_bytes(cfg))))


def check_slice(cfg: Config):
    """Query heads and kv head of the slice every implementation is checked on."""
    return cfg.Hq // cfg.Hkv, 1  # the first kv group of batch 0


def reference_slice(cfg: Config, q, k, v):
    """float32 o of batch 0, the first kv group, from upcast inputs."""
    g, _ = check_slice(cfg)
    q32, k32, v32 = (a[:1].astype(jnp.float32) for a in (q, k, v))
    with jax.default_matmul_precision("highest"):
        out, _ = jax.jit(functools.partial(
            jax_sparsek.dense_attention_reference, scale=cfg.D ** -0.5, is_causal=cfg.causal,
            window=cfg.window or 0))(q32[:, :, :g], k32[:, :, :1], v32[:, :, :1])
    return out


def relative_error(out, ref) -> float:
    out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


# ------------------------------------------------------------------------------ JAX timing

@contextlib.contextmanager
def kernel_env(variable: str, kernel: str | None):
    """A kernel choice (JAX_SPARSEK_FORWARD_KERNEL / JAX_SPARSEK_BACKWARD_KERNEL, read at
    every call) for the duration: None leaves the variable as it is, "default" unsets it (the
    device's own choice), anything else sets it; the previous value comes back on exit."""
    if kernel is None:
        yield
        return
    previous = os.environ.pop(variable, None)
    if kernel != "default":
        os.environ[variable] = kernel
    try:
        yield
    finally:
        os.environ.pop(variable, None)
        if previous is not None:
            os.environ[variable] = previous


def forward_kernel_env(impl: str):
    """JAX_SPARSEK_FORWARD_KERNEL=mma_sync while ours-mma-sync runs."""
    return kernel_env("JAX_SPARSEK_FORWARD_KERNEL", OURS_KERNELS.get(impl))


def jax_attention_fn(impl: str, cfg: Config, platform_is_gpu: bool):
    """f(q, k, v) -> o for a JAX implementation, or raises why it can't run this config."""
    if impl in OURS_KERNELS:
        if impl != "ours" and not platform_is_gpu:
            raise NotImplementedError("needs a GPU")
        return functools.partial(jax_sparsek.sparsek_attention, is_causal=cfg.causal,
                                 window=cfg.window,
                                 implementation="cuda" if platform_is_gpu else "xla")
    if cfg.T != cfg.S and (cfg.causal or cfg.window):
        raise NotImplementedError("jax.nn aligns causal masks top-left; ours bottom-right")
    window = (cfg.window - 1, 0) if cfg.window else None
    if impl == "jax-cudnn":
        if not platform_is_gpu:
            raise NotImplementedError("needs a GPU")
        return functools.partial(jax.nn.dot_product_attention, is_causal=cfg.causal,
                                 local_window_size=window, implementation="cudnn")
    if impl == "jax-xla":
        logits = 4 * cfg.B * cfg.Hq * cfg.T * cfg.S
        if logits > XLA_LOGITS_LIMIT:
            raise MemoryError(f"would materialise {logits / 2**30:.0f} GiB of float32 logits")
        return functools.partial(jax.nn.dot_product_attention, is_causal=cfg.causal,
                                 local_window_size=window, implementation="xla")
    raise ValueError(impl)


def time_jax(fn, input_sets, iters: int, reps: int) -> float:
    """Median seconds per attention call; one program runs fn on every input set."""
    program = jax.jit(lambda sets: [fn(*s) for s in sets])
    for _ in range(2):
        jax.block_until_ready(program(input_sets))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            out = program(input_sets)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / (iters * len(input_sets)))
    return statistics.median(samples)


# ---------------------------------------------------------------------------- torch timing

_TORCH = None


def torch_or_reason():
    """(torch module, None) when torch with CUDA is importable, else (None, reason)."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
            _TORCH = (torch, None) if torch.cuda.is_available() else (
                None, "torch has no CUDA device")
        except Exception as e:  # noqa: BLE001
            _TORCH = (None, f"torch not importable ({type(e).__name__}: {e})")
    return _TORCH


def torch_attention_fn(impl: str, cfg: Config, sets_jax):
    """(f() -> list of outputs [B,Hq,T,D] over the input sets, note) or raises why not."""
    torch, reason = torch_or_reason()
    if torch is None:
        raise NotImplementedError(reason)
    if cfg.window:
        raise NotImplementedError("SDPA has no sliding-window argument")
    if cfg.T != cfg.S and cfg.causal:
        raise NotImplementedError("SDPA's is_causal aligns top-left; ours bottom-right")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    backend = {"torch-flash": SDPBackend.FLASH_ATTENTION,
               "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
               "torch-cudnn": SDPBackend.CUDNN_ATTENTION}[impl]
    # [B, T, H, D] JAX arrays -> contiguous [B, H, T, D] torch tensors, the layout SDPA expects.
    sets = [tuple(torch.from_dlpack(a).permute(0, 2, 1, 3).contiguous() for a in s)
            for s in sets_jax]
    group = cfg.Hq // cfg.Hkv

    def run(sets, gqa):
        with sdpa_kernel(backend):
            return [F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal,
                                                   scale=cfg.D ** -0.5, enable_gqa=gqa)
                    for q, k, v in sets]

    note = ""
    if group > 1:
        try:
            with warnings.catch_warnings():  # a backend without GQA explains why, at length
                warnings.simplefilter("ignore")
                run(sets[:1], True)
            torch.cuda.synchronize()
            return (lambda: run(sets, True)), "enable_gqa"
        except Exception:  # noqa: BLE001
            sets = [(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
                    for q, k, v in sets]
            note = "kv heads repeated (no enable_gqa)"
    return (lambda: run(sets, False)), note


def time_torch(fn, num_calls: int, iters: int, reps: int) -> tuple[float, str]:
    """Median seconds per attention call, by CUDA events around CUDA-graph replays."""
    torch, _ = torch_or_reason()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture wants
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    how = "cuda graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            keep = fn()  # noqa: F841  (outputs stay allocated for the replays)
        step = graph.replay
        step()
    except Exception:  # noqa: BLE001
        torch.cuda.synchronize()
        step, how = fn, "eager"
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / (iters * num_calls))
    return statistics.median(samples), how


# --------------------------------------------------------------------------------- running

def short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def run_config(name: str, cfg: Config, dtype, impls, iters, reps, requested_sets, on_gpu,
               device_kind, verbose):
    tol = TOLERANCE[jnp.dtype(dtype).name]
    num_sets = num_input_sets(cfg, requested_sets) if on_gpu else 1
    sets = make_inputs(cfg, dtype, num_sets)
    ref = reference_slice(cfg, *sets[0])
    g, _ = check_slice(cfg)
    n_flops, n_bytes = flops(cfg), min_bytes(cfg, jnp.dtype(dtype).itemsize)
    ceilings = ceilings_for(device_kind)
    result = {"config": name, **dataclasses.asdict(cfg), "dtype": jnp.dtype(dtype).name,
              "flops": n_flops, "min_bytes": n_bytes, "input_sets": num_sets, "impls": {}}
    if ceilings:
        floor, bound = floor_seconds(cfg, ceilings)
        result.update(floor_ms=floor * 1e3, bound=bound)

    print(f"\n== {name}: {cfg.shape()} {jnp.dtype(dtype).name}  ({cfg.description})")
    print(f"   {n_flops / 1e9:.1f} GFLOP, {n_bytes / 1e6:.1f} MB, {num_sets} input set(s)"
          + (f"; floor {floor * 1e3:.3f} ms ({bound} bound)" if ceilings else ""))

    ours_out = None
    for impl in impls:
        entry = result["impls"][impl] = {}
        try:
            if impl.startswith("torch"):
                if not on_gpu:
                    raise NotImplementedError("no GPU")
                fn, note = torch_attention_fn(impl, cfg, sets)
                out = fn()[0][:1, :g].permute(0, 2, 1, 3)
                out = jnp.asarray(out.float().cpu().numpy())
                seconds, how = time_torch(fn, num_sets, iters, reps)
                note = ", ".join(x for x in (note, how) if x)
            else:
                attn = jax_attention_fn(impl, cfg, on_gpu)
                with forward_kernel_env(impl):
                    full = jax.jit(attn)(*sets[0])
                if impl == "ours":
                    ours_out = full
                elif ours_out is not None and impl == "jax-cudnn":
                    entry["rel_err_vs_ours"] = relative_error(ours_out, full)
                out = full[:1, :, :g]
                # jax-xla materialises T x S logits per call: only as many sets as beat the L2.
                timed = sets[:num_l2_sets(cfg)] if impl == "jax-xla" else sets
                with forward_kernel_env(impl):
                    seconds, note = time_jax(attn, timed, iters, reps), ""
                if impl == "ours" and not on_gpu:
                    note = "implementation='xla' (no GPU)"
        except Exception as e:  # noqa: BLE001
            entry.update(status="skipped", reason=short(e))
            if verbose:
                traceback.print_exc()
            continue
        err = relative_error(out, ref)
        valid = err <= tol  # False for NaN as well
        entry.update(status="ok" if valid else ("INVALID" if impl == "ours" else "mismatch"),
                     time_ms=seconds * 1e3, tflops=n_flops / seconds / 1e12,
                     gbps=n_bytes / seconds / 1e9, rel_err=err, note=note)
        if ceilings:
            entry["of_floor"] = result["floor_ms"] / entry["time_ms"]

    ours = result["impls"].get("ours", {})
    for impl, entry in result["impls"].items():
        if impl != "ours" and "time_ms" in entry and ours.get("status") == "ok":
            entry["speedup"] = entry["time_ms"] / ours["time_ms"]  # peer time / our time
    print_table(result, tol)
    return result


def print_table(result, tol):
    print(f"   {'impl':<16}{'ms':>10}{'TFLOP/s':>9}{'GB/s':>8}{'speedup':>9}{'rel err':>10}  note")
    for impl, e in result["impls"].items():
        if "time_ms" not in e:
            print(f"   {impl:<16}{'-':>10}  skipped: {e['reason']}")
            continue
        speedup = f"{e['speedup']:.2f}x" if "speedup" in e else "-"
        flag = "" if e["status"] == "ok" else f" {e['status']} (tolerance {tol:g})"
        extra = ([f"vs ours {e['rel_err_vs_ours']:.1e}"] if "rel_err_vs_ours" in e else [])
        extra += [e["note"]] if e["note"] else []
        print(f"   {impl:<16}{e['time_ms']:>10.4f}{e['tflops']:>9.1f}{e['gbps']:>8.0f}"
              f"{speedup:>9}{e['rel_err']:>10.1e}  {'; '.join(extra)}{flag}")


def versions() -> dict:
    info = {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", None) or _pkg_version("jaxlib"),
            "jax_sparsek": jax_sparsek.__version__, "jax_sparsek_path": jax_sparsek.__file__,
            "build_info": jax_sparsek.build_info()}
    try:
        from jax._src.lib import cuda_versions
        info["cudnn_jax"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001
        info["cudnn_jax"] = None
    torch, _ = torch_or_reason()
    if torch is not None:
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cudnn_torch=torch.backends.cudnn.version())
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def _pkg_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def smoke_config(cfg: Config) -> Config:
    """A tiny config with the same masking and head grouping, for a machine without a GPU."""
    t = min(cfg.T, 128)
    s = t if cfg.T == cfg.S else min(cfg.S, 256)
    hkv = min(cfg.Hkv, 2)
    hq = hkv * min(cfg.Hq // cfg.Hkv, 4)
    window = min(cfg.window, t // 2) if cfg.window else None
    return dataclasses.replace(cfg, B=1, T=t, S=s, Hq=hq, Hkv=hkv, window=window,
                               description="smoke run of " + cfg.description)


def list_configs():
    print(f"{'config':<26}{'shape':<56}{'GFLOP':>9}{'MB':>8}"
          + "".join(f"{name + ' floor ms':>16}" for name in CEILINGS))
    for name, cfg in {**CONFIGS, **SWEEP}.items():
        floors = "".join(
            f"{floor_seconds(cfg, c)[0] * 1e3:>10.3f} ({floor_seconds(cfg, c)[1][:3]})"
            for c in CEILINGS.values())
        print(f"{name:<26}{cfg.shape():<56}{flops(cfg) / 1e9:>9.1f}{min_bytes(cfg) / 1e6:>8.1f}"
              f"{floors}")
        if name in CONFIGS:
            print(f"{'':<26}{cfg.description}")
    print("\nfloors: fp16 FLOPs and minimal bytes (q, k, v read once, o written once) over the "
          "measured ceilings " + ", ".join(f"{n} {c[0] / 1e12:.0f} TFLOP/s {c[1] / 1e12:.1f} TB/s"
                                          for n, c in CEILINGS.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=[], metavar="NAME",
                        help="named config(s) (--list shows them); default: all named configs")
    parser.add_argument("--sweep", action="store_true",
                        help="the sweep grid: T 512..16384, D 64 and 128, causal and not")
    parser.add_argument("--list", action="store_true", help="list the configs and exit")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--iters", type=int, default=10,
                        help="timed programs per repetition (each runs every input set)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions; the median is kept")
    parser.add_argument("--sets", type=int, default=8,
                        help="input sets, one call each per timed program (at most 4 GiB of "
                             "them); below 8, JAX's per-program overhead shows on calls "
                             "under ~0.2 ms")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="tracebacks of skipped peers")
    args = parser.parse_args(argv)

    if args.list:
        list_configs()
        return 0
    every = {**CONFIGS, **SWEEP}
    unknown = [n for n in args.config if n not in every]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if unknown or set(impls) - set(IMPLS):
        parser.error(f"unknown config(s) {unknown} (see --list)" if unknown else
                     f"--impls must name some of {', '.join(IMPLS)}")
    names = list(args.config) + (list(SWEEP) if args.sweep else [])
    names = names or list(CONFIGS)
    dtype = jnp.float16 if args.dtype == "fp16" else jnp.bfloat16

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    meta = {"device": device.device_kind, "backend": jax.default_backend(),
            "versions": versions(), "dtype": args.dtype, "iters": args.iters, "reps": args.reps,
            "smoke": not on_gpu, "argv": sys.argv[1:]}
    print(f"device: {meta['device']} ({meta['backend']})")
    print("versions: " + ", ".join(f"{k}={v}" for k, v in meta["versions"].items()
                                   if k != "build_info"))
    print("build_info: " + ", ".join(f"{k}={v}" for k, v in
                                     meta["versions"]["build_info"].items()))
    iters, reps = args.iters, args.reps
    if not on_gpu:
        print("\nNo GPU visible to JAX: nothing here is worth timing. Smoke run of the "
              "benchmark's machinery on shrunken configs, 'ours' through implementation='xla'.")
        impls = [i for i in impls if i in ("ours", "jax-xla")]
        iters, reps = 1, 1

    print("\nspeedup = peer time / our time (> 1: ours is faster); rel err: against the float32 "
          "reference, on batch 0 and the first kv group")
    results, invalid = [], []
    for name in names:
        cfg = every[name] if on_gpu else smoke_config(every[name])
        try:
            result = run_config(name, cfg, dtype, impls, iters, reps, args.sets, on_gpu,
                                device.device_kind, args.verbose)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory making the inputs)
            print(f"   config failed: {short(e)}")
            result = {"config": name, "error": short(e)}
        results.append(result)
        if result.get("impls", {}).get("ours", {}).get("status") == "INVALID":
            invalid.append(name)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"\nwrote {args.json}")
    if invalid:
        print(f"\nINVALID: ours is over the tolerance on {', '.join(invalid)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
