"""Sharding checks on fake CPU devices, run by test_sharding.py in a process of its own (the
device count is fixed when JAX starts): prints one JSON object of results.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_checks.py
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")

import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from jax_sparsek import sparsek_attention  # noqa: E402

warnings.simplefilter("ignore", RuntimeWarning)  # the reference path's warning on CPU
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
               "reduce-scatter")


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(b, t, s, hq, hkv, d, seed):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float16)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float16)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float16)
    u = jnp.asarray(rng.standard_normal((b, s, hkv)), jnp.float32)
    return q, k, v, u


def attention(sparsek: bool):
    if sparsek:
        return lambda q, k, v, u: sparsek_attention(q, k, v, u, topk=12, window=8,
                                                    is_causal=True)
    return lambda q, k, v, u: sparsek_attention(q, k, v, is_causal=True)


def check(name, mesh, sparsek, shape, q_spec, kv_spec, u_spec, expect_spec):
    """Forward and gradients of one sharded call against the same call on one device."""
    q, k, v, u = inputs(*shape, seed=len(name))
    fn = attention(sparsek)

    def loss(q, k, v, u):
        return jnp.sum(fn(q, k, v, u).astype(jnp.float32) ** 2)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3) if sparsek else (0, 1, 2))
    ref_out = jax.jit(fn)(q, k, v, u)
    ref_grads = jax.jit(grad)(q, k, v, u)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(q, q_spec), put(k, kv_spec), put(v, kv_spec), put(u, u_spec))
    fwd = jax.jit(fn)
    bwd = jax.jit(grad)
    out = fwd(*args)
    grads = bwd(*args)
    hlo = fwd.lower(*args).compile().as_text() + bwd.lower(*args).compile().as_text()
    return {
        "out_err": rel_err(out, ref_out),
        "grad_errs": [rel_err(g, r) for g, r in zip(grads, ref_grads)],
        "out_spec": str(out.sharding.spec),
        "grad_specs": [str(g.sharding.spec) for g in grads],
        "expect_spec": str(expect_spec),
        "collectives": sorted(c for c in COLLECTIVES if c in hlo),
    }


def main():
    devices = np.array(jax.devices())
    assert devices.size == 4, devices
    mesh = Mesh(devices.reshape(2, 2), ("data", "model"))
    heads = Mesh(devices.reshape(4), ("model",))
    bh = P("data", None, "model")
    results = {
        # (B, T, S, Hq, Hkv, D): GQA 2, batch and kv heads split 2 x 2.
        "dense_batch_heads": check("dense_batch_heads", mesh, False, (4, 48, 48, 8, 4, 32),
                                   bh, bh, bh, bh),
        "sparsek_batch_heads": check("sparsek_batch_heads", mesh, True,
                                     (4, 64, 64, 8, 4, 32), bh, bh, bh, bh),
        # Query heads split 4 ways, but Nkv = 2: the heads are gathered, the result is the
        # same.
        "dense_heads_not_divisible": check("dense_heads_not_divisible", heads, False,
                                           (2, 40, 40, 8, 2, 32), P(None, None, "model"),
                                           P(), P(), P()),
        # A sharded sequence is gathered (attention needs every key of a row).
        "sparsek_sequence_sharded": check("sparsek_sequence_sharded", mesh, True,
                                          (2, 64, 64, 4, 4, 32), P(None, "data"),
                                          P(None, "data"), P(None, "data"), P()),
    }
    # Inside shard_map over every axis, each device's call is the per-device computation.
    q, k, v, _ = inputs(4, 32, 32, 4, 4, 32, seed=7)
    spec = P("data", None, "model")
    mapped = jax.jit(jax.shard_map(lambda q, k, v: sparsek_attention(q, k, v, is_causal=True),
                                   mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))
    ref = jax.jit(lambda q, k, v: sparsek_attention(q, k, v, is_causal=True))(q, k, v)
    results["shard_map"] = {"out_err": rel_err(mapped(q, k, v), ref)}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
