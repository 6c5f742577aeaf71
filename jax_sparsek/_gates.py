"""SparseK thresholds and gates (SPARSEK.md, "Gates"), in pure JAX.

For row i at position p(i) = i + S - T, the sparse domain is D_i = {j <= p(i) - W : u_j > -inf}.
When |D_i| > K, tau_i solves sum_{j in D_i} clip(u_j - tau_i, 0, 1) = K (the Euclidean
projection of u onto {m in [0, 1]^n : sum m = K}); otherwise every key of D_i gets gate 1 and
tau_i = -inf. Window keys p(i) - W < j <= p(i) get gate 1. Scores must be finite or -inf.

This materialises [B, Hkv, T, S]: it is the reference and the tool for looking at small
shapes, not the fast path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_BISECTION_STEPS = 60  # from a bracket of width 1 to adjacent float64 values


def _capped_simplex_threshold(values, topk: int):
    """tau per row of `values` [..., n] (float32, -inf = outside the domain).

    Rows whose domain holds at most `topk` keys get -inf. Bisection brackets the linear piece
    of f(tau) = sum clip(v - tau, 0, 1) that crosses topk, and the closing step solves that
    piece exactly: tau = (sum of the fractional values - (topk - #saturated)) / #fractional.
    """
    inside = values > -jnp.inf
    count = jnp.sum(inside, axis=-1)
    safe = jnp.where(inside, values, 0.0)
    # The root lies in [v_K - 1, v_K] for the K-th largest value v_K: the K largest values
    # each add 1 to f(v_K - 1) >= K, while f(v_K) <= K - 1. A bracket of width 1 whatever
    # the scores' range.
    # (From a sort rather than lax.top_k, so that topk may be a traced value.)
    n = values.shape[-1]
    kth = jnp.take(jnp.sort(values, axis=-1), jnp.clip(n - topk, 0, n - 1), axis=-1)
    hi = jnp.where(count > topk, kth, 0.0)
    lo = jnp.where(count > topk, kth - 1.0, 0.0)

    def f(tau):
        gate = jnp.clip(safe - tau[..., None], 0.0, 1.0)
        return jnp.sum(jnp.where(inside, gate, 0.0), axis=-1)

    def step(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        above = f(mid) > topk  # the root lies above mid
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (lo, hi))
    tau = 0.5 * (lo + hi)
    fractional = inside & (values > tau[..., None]) & (values < tau[..., None] + 1.0)
    saturated = inside & (values >= tau[..., None] + 1.0)
    n_frac = jnp.sum(fractional, axis=-1)
    exact = (jnp.sum(jnp.where(fractional, values, 0.0), axis=-1)
             - (topk - jnp.sum(saturated, axis=-1))) / jnp.maximum(n_frac, 1)
    tau = jnp.where(n_frac > 0, exact, tau)
    return jnp.where(count > topk, tau, -jnp.inf)


def sparsek_thresholds_and_gates(scores, *, topk: int, window: int, num_queries: int):
    """tau [B, Hkv, T] and gates [B, Hkv, T, S] (float32) for scores [B, S, Hkv]."""
    num_keys = scores.shape[1]
    # float32 whatever the scores' dtype (float64 stays float64, for gradient checks).
    compute_dtype = jnp.promote_types(scores.dtype, jnp.float32)
    u = jnp.moveaxis(scores.astype(compute_dtype), 1, 2)[:, :, None, :]  # [B, Hkv, 1, S]
    row_pos = jnp.arange(num_queries)[:, None] + (num_keys - num_queries)
    key_pos = jnp.arange(num_keys)[None, :]
    in_window = (key_pos <= row_pos) & (key_pos > row_pos - window)      # [T, S]
    in_domain = (key_pos <= row_pos - window) & (u > -jnp.inf)          # [B, Hkv, T, S]
    tau = _capped_simplex_threshold(jnp.where(in_domain, u, -jnp.inf), topk)
    sparse_gate = jnp.clip(u - tau[..., None], 0.0, 1.0)
    gates = jnp.where(in_window, 1.0, jnp.where(in_domain, sparse_gate, 0.0))
    return tau.astype(compute_dtype), gates.astype(compute_dtype)
