"""Pure-JAX reference of SPARSEK.md's gated softmax. Runs on every platform.

It materialises the T x S score matrix, so it is meant for correctness and for machines
without our CUDA kernels, not for long sequences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def key_positions_visible(num_queries: int, num_keys: int, is_causal: bool, window: int):
    """Boolean [T, S] gate matrix of the dense modes, with bottom-right alignment.

    Query row i sits at absolute position p(i) = i + S - T.
    """
    row_pos = jnp.arange(num_queries)[:, None] + (num_keys - num_queries)
    key_pos = jnp.arange(num_keys)[None, :]
    visible = jnp.ones((num_queries, num_keys), dtype=bool)
    if is_causal:
        visible &= key_pos <= row_pos
    if window > 0:
        visible &= key_pos > row_pos - window
    return visible


def gated_attention_reference(query, key, value, gates, scale: float):
    """o, lse of the gated softmax, float32 arithmetic.

    query [B, T, Hq, D]; key, value [B, S, Hkv, D]; gates broadcastable to [B, Hkv, T, S]
    with values in [0, 1]. Returns o [B, T, Hq, D] in query's dtype and lse [B, Hq, T]
    (float32, or float64 for float64 inputs). Rows whose gates are all zero give o = 0 and lse = -inf.
    """
    b, t, hq, d = query.shape
    hkv = key.shape[2]
    group = hq // hkv
    # float32 arithmetic for 16-bit inputs (float64 stays float64, for gradient checks).
    f = jnp.promote_types(query.dtype, jnp.float32)
    q = query.astype(f).reshape(b, t, hkv, group, d)
    k = key.astype(f)
    v = value.astype(f)
    # HIGHEST: float32 products on GPUs too (the default may round operands to TF32).
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=jax.lax.Precision.HIGHEST) * scale  # [B, Hkv, G, T, S]
    gates = jnp.broadcast_to(jnp.asarray(gates, f), (b, hkv, t, k.shape[1]))[:, :, None]
    live = gates > 0
    s = jnp.where(live, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(live, gates * jnp.exp(s - row_max), 0.0)
    row_sum = jnp.sum(p, axis=-1, keepdims=True)
    nonempty = row_sum > 0
    lse = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, row_sum, 1.0)), -jnp.inf)
    o = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(nonempty, row_sum, 1.0), v,
                   precision=jax.lax.Precision.HIGHEST)
    o = o.reshape(b, t, hq, d).astype(query.dtype)
    lse = lse[..., 0].reshape(b, hq, t)
    return o, lse


def dense_attention_reference(query, key, value, *, scale: float, is_causal: bool,
                              window: int):
    """Full, causal or causal sliding-window attention: o [B,T,Hq,D], lse [B,Hq,T]."""
    gates = key_positions_visible(query.shape[1], key.shape[1], is_causal, window)
    return gated_attention_reference(query, key, value, gates, scale)
