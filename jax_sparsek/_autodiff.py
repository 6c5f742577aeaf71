"""Gradients of sparsek_attention: custom VJPs around the forward primitive.

The backward is the sparsek_attention_bwd primitive (_backward_primitive.py): on CUDA the
backward kernels, FlashAttention-2-style recomputation from the saved lse (SparseK: from the
forward's tau too, saved with it); elsewhere the explicit formulas of _backward_reference.py.
"""
from __future__ import annotations

import functools

from ._backward_primitive import attention_bwd
from ._primitive import attention_fwd
from ._validation import AttentionConfig

import jax


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense_attention(query, key, value, config: AttentionConfig):
    """(o, lse) of the dense modes, differentiable in query, key and value."""
    return tuple(attention_fwd(query, key, value, None, config))


def _dense_fwd(query, key, value, config):
    o, lse = attention_fwd(query, key, value, None, config)
    return (o, lse), (query, key, value, o, lse)


def _dense_bwd(config, residuals, cotangents):
    query, key, value, o, lse = residuals
    d_out, d_lse = cotangents
    return tuple(attention_bwd(query, key, value, None, None, o, lse, d_out, d_lse, config))


dense_attention.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def sparsek_attention_op(query, key, value, scores, config: AttentionConfig):
    """(o, lse) of the SparseK mode, differentiable in query, key, value and scores."""
    o, lse, _ = attention_fwd(query, key, value, scores, config)
    return o, lse


def _sparsek_fwd(query, key, value, scores, config):
    o, lse, tau = attention_fwd(query, key, value, scores, config)
    # tau ([B, Hkv, T] float32) spares the backward the selection's threshold solves.
    return (o, lse), (query, key, value, scores, tau, o, lse)


def _sparsek_bwd(config, residuals, cotangents):
    query, key, value, scores, tau, o, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, du = attention_bwd(query, key, value, scores, tau, o, lse, d_out, d_lse,
                                   config)
    return dq, dk, dv, du.astype(scores.dtype)


sparsek_attention_op.defvjp(_sparsek_fwd, _sparsek_bwd)
