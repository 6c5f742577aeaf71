"""``python -m jax_sparsek``: check that attention runs here, is right, and how fast.

Builds a small pre-norm transformer block (layernorm, GQA attention with 8 query heads and
2 kv heads of dimension 64, output projection, MLP) with random bf16 weights, runs it jitted on
JAX's default device, and prints:

- the device, ``build_info()`` and which attention implementation ran;
- the relative error of the attention output (causal, and causal sliding window) against a
  float32 reference computed from upcast inputs, the test of SPARSEK.md ("What counts as
  correct"): the exit code is 1 when it exceeds 2e-3 (fp16) or 1e-2 (bf16);
- the median time per call of the jitted block, with our attention and with the pure-JAX
  reference (``implementation='xla'``) in its place.

Small sizes on CPU (seconds on a laptop), larger ones on a GPU.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp

import jax_sparsek
from jax_sparsek import dense_attention_reference, sparsek_attention

TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 64


def init_params(rng, dtype):
    model = NUM_Q_HEADS * HEAD_DIM
    shapes = {"wq": (model, NUM_Q_HEADS * HEAD_DIM), "wk": (model, NUM_KV_HEADS * HEAD_DIM),
              "wv": (model, NUM_KV_HEADS * HEAD_DIM), "wo": (NUM_Q_HEADS * HEAD_DIM, model),
              "w1": (model, 4 * model), "w2": (4 * model, model)}
    keys = jax.random.split(rng, len(shapes))
    params = {name: (jax.random.normal(k, shape) / shape[0] ** 0.5).astype(dtype)
              for k, (name, shape) in zip(keys, shapes.items())}
    params.update(ln1=jnp.ones((model,), dtype), ln2=jnp.ones((model,), dtype))
    return params


def layernorm(x, gain):
    x32 = x.astype(jnp.float32)
    x32 = (x32 - x32.mean(-1, keepdims=True)) * jax.lax.rsqrt(x32.var(-1, keepdims=True) + 1e-5)
    return (x32 * gain.astype(jnp.float32)).astype(x.dtype)


def project_qkv(params, h):
    b, t, _ = h.shape
    q = (h @ params["wq"]).reshape(b, t, NUM_Q_HEADS, HEAD_DIM)
    k = (h @ params["wk"]).reshape(b, t, NUM_KV_HEADS, HEAD_DIM)
    v = (h @ params["wv"]).reshape(b, t, NUM_KV_HEADS, HEAD_DIM)
    return q, k, v


def block(params, x, attention):
    """x + Attn(LN(x)), then + MLP(LN(.)); ``attention(q, k, v)`` is the swappable part."""
    b, t, model = x.shape
    q, k, v = project_qkv(params, layernorm(x, params["ln1"]))
    x = x + attention(q, k, v).reshape(b, t, model) @ params["wo"]
    h = layernorm(x, params["ln2"])
    return x + jax.nn.gelu(h @ params["w1"]) @ params["w2"]


def relative_error(out, ref):
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def median_ms(fn, *args, warmup=2, iters=10):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_sparsek", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float16
    tolerance = TOLERANCE[jnp.dtype(dtype).name]
    # We say below which implementation ran; the once-per-process warning would repeat it.
    warnings.filterwarnings("ignore", message="jax_sparsek: using the pure-JAX reference")

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    batch, seq = (4, 4096) if on_gpu else (2, 256)
    window = seq // 4
    info = jax_sparsek.build_info()
    kernel = info["cuda_kernels_built"] and info["jax_cuda_devices"]

    print(f"jax_sparsek {jax_sparsek.__version__}, jax {jax.__version__}")
    print(f"device:         {jax.default_backend()} / {device.device_kind}")
    print("build_info:     " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"implementation: {'cuda kernel' if kernel else 'pure-JAX reference'}")
    print(f"block:          B={batch} T={seq} heads {NUM_Q_HEADS}q/{NUM_KV_HEADS}kv "
          f"dim {HEAD_DIM}, {jnp.dtype(dtype).name}, tolerance {tolerance:g}")

    rng_params, rng_x = jax.random.split(jax.random.PRNGKey(0))
    params = init_params(rng_params, dtype)
    x = jax.random.normal(rng_x, (batch, seq, NUM_Q_HEADS * HEAD_DIM)).astype(dtype)
    q, k, v = jax.jit(lambda p, x: project_qkv(p, layernorm(x, p["ln1"])))(params, x)
    upcast = [a.astype(jnp.float32) for a in (q, k, v)]

    ok = True
    print(f"\n{'variant':<18} {'attn rel err':>12} {'block vs xla':>12} "
          f"{'block ms':>9} {'xla ms':>9}")
    for name, window_arg in (("causal", None), (f"window {window}", window)):
        ours = functools.partial(sparsek_attention, is_causal=True, window=window_arg)
        xla = functools.partial(ours, implementation="xla")

        with jax.default_matmul_precision("highest"):  # no TF32 in the float32 reference
            ref, _ = jax.jit(functools.partial(
                dense_attention_reference, scale=HEAD_DIM ** -0.5, is_causal=True,
                window=window_arg or 0))(*upcast)
        attn_err = relative_error(jax.jit(ours)(q, k, v), ref)

        block_ours = jax.jit(functools.partial(block, attention=ours))
        block_xla = jax.jit(functools.partial(block, attention=xla))
        block_err = relative_error(block_ours(params, x), block_xla(params, x))
        ms_ours, ms_xla = median_ms(block_ours, params, x), median_ms(block_xla, params, x)

        passed = attn_err <= tolerance  # False for NaN too
        ok &= passed
        print(f"{name:<18} {attn_err:>12.2e} {block_err:>12.2e} {ms_ours:>9.3f} {ms_xla:>9.3f}"
              f"{'' if passed else '   FAIL: over tolerance'}")

    print("\nOK" if ok else "\nFAILED: attention error over the SPARSEK.md tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
