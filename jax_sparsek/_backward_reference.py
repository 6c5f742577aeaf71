"""Pure-JAX backward of the gated softmax, written from SPARSEK.md's Gradients section.

Recomputes the probabilities from the saved lse (as FlashAttention's backward does) instead
of differentiating the forward, so that it is the explicit reference for the CUDA backward:

    P_ij = m_ij exp(s_ij - lse_i),  dP_ij = <dO_i, v_j>,  Delta_i = <dO_i, o_i> - dlse_i
    dv_j = sum_i P_ij dO_i,  dS_ij = P_ij (dP_ij - Delta_i)
    dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i
    g_ij = exp(s_ij - lse_i) (dP_ij - Delta_i)                    (d loss / d m_ij)
    du_j = sum_i [j in F_i] (g_ij - mean_{l in F_i} g_il)          F_i = {0 < u_j - tau_i < 1}

(dlse, the cotangent of the returned lse, enters through Delta: d lse_i / d s_ij = P_ij.)
Float32 arithmetic, O(T x S) memory per kv head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def gated_attention_bwd_reference(query, key, value, gates, out, lse, d_out, d_lse,
                                  scale: float, *, need_gate_grad: bool = False):
    """dq, dk, dv (in the input dtypes) and, if asked, g [B, Hkv, T, S] summed over the
    query heads of each kv group (float32)."""
    b, t, hq, d = query.shape
    s_len, hkv = key.shape[1], key.shape[2]
    group = hq // hkv
    f32 = jnp.promote_types(query.dtype, jnp.float32)  # float64 stays float64
    q = query.astype(f32).reshape(b, t, hkv, group, d)
    k = key.astype(f32)
    v = value.astype(f32)
    do = d_out.astype(f32).reshape(b, t, hkv, group, d)
    o = out.astype(f32).reshape(b, t, hkv, group, d)
    lse = lse.reshape(b, hkv, group, t)[..., None]                    # [B, Hkv, G, T, 1]
    dlse = d_lse.astype(f32).reshape(b, hkv, group, t)[..., None]
    gates = jnp.broadcast_to(jnp.asarray(gates, f32), (b, hkv, t, s_len))[:, :, None]

    s = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=_HIGHEST) * scale
    live = (gates > 0) & jnp.isfinite(lse)
    # exp(s - lse) is bounded by 1 / m_ij where m_ij > 0; elsewhere it is never used.
    e = jnp.where(live, jnp.exp(jnp.where(live, s - lse, 0.0)), 0.0)
    p = gates * e
    dp = jnp.einsum("btkgd,bskd->bkgts", do, v, precision=_HIGHEST)
    delta = jnp.einsum("btkgd,btkgd->bkgt", do, o, precision=_HIGHEST)[..., None] - dlse
    ds = p * (dp - delta)
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, precision=_HIGHEST) * scale
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, q, precision=_HIGHEST) * scale
    dv = jnp.einsum("bkgts,btkgd->bskd", p, do, precision=_HIGHEST)
    grads = (dq.reshape(b, t, hq, d).astype(query.dtype), dk.astype(key.dtype),
             dv.astype(value.dtype))
    if not need_gate_grad:
        return grads
    g = jnp.sum(e * (dp - delta), axis=2)                             # [B, Hkv, T, S]
    return grads + (g,)


def sparsek_scores_grad(scores, tau, gate_grad, *, window: int):
    """du [B, S, Hkv] (float32) from g [B, Hkv, T, S] through the projection."""
    t = tau.shape[-1]
    s_len = scores.shape[1]
    u = jnp.moveaxis(scores.astype(tau.dtype), 1, 2)[:, :, None, :]  # [B, Hkv, 1, S]
    row_pos = jnp.arange(t)[:, None] + (s_len - t)
    key_pos = jnp.arange(s_len)[None, :]
    in_domain = (key_pos <= row_pos - window) & (u > -jnp.inf)
    # tau = -inf (domain within budget) leaves F empty: those gates are constant 1.
    excess = jnp.where(in_domain & jnp.isfinite(tau[..., None]), u - tau[..., None], -1.0)
    fractional = (excess > 0) & (excess < 1)
    n_frac = jnp.sum(fractional, axis=-1, keepdims=True)
    g = jnp.where(fractional, gate_grad, 0.0)
    mean = jnp.sum(g, axis=-1, keepdims=True) / jnp.maximum(n_frac, 1)
    du = jnp.sum(jnp.where(fractional, g - mean, 0.0), axis=2)       # [B, Hkv, S]
    return jnp.moveaxis(du, 1, 2)
