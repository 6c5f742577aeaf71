"""Gradients of sparsek_attention: custom VJPs around the forward primitive.

The backward recomputes from the saved (o, lse, tau) with the explicit formulas of
_backward_reference.py. It runs on every platform; the CUDA backward kernels replace it on
CUDA when they land.
"""
from __future__ import annotations

import functools

from ._backward_reference import gated_attention_bwd_reference, sparsek_scores_grad
from ._gates import sparsek_thresholds_and_gates
from ._primitive import attention_fwd
from ._reference import key_positions_visible
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
    gates = key_positions_visible(query.shape[1], key.shape[1], config.is_causal,
                                  config.window)
    return gated_attention_bwd_reference(query, key, value, gates, o, lse, d_out, d_lse,
                                         config.scale)


dense_attention.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def sparsek_attention_op(query, key, value, scores, config: AttentionConfig):
    """(o, lse) of the SparseK mode, differentiable in query, key, value and scores."""
    o, lse, _ = attention_fwd(query, key, value, scores, config)
    return o, lse


def _sparsek_fwd(query, key, value, scores, config):
    o, lse, _ = attention_fwd(query, key, value, scores, config)
    return (o, lse), (query, key, value, scores, o, lse)


def _sparsek_bwd(config, residuals, cotangents):
    query, key, value, scores, o, lse = residuals
    d_out, d_lse = cotangents
    # tau and the gates are recomputed in the scores' precision (the forward's tau is float32).
    tau, gates = sparsek_thresholds_and_gates(scores, topk=config.topk, window=config.window,
                                              num_queries=query.shape[1])
    dq, dk, dv, g = gated_attention_bwd_reference(query, key, value, gates, o, lse, d_out,
                                                  d_lse, config.scale, need_gate_grad=True)
    du = sparsek_scores_grad(scores, tau, g, window=config.window)
    return dq, dk, dv, du.astype(scores.dtype)


sparsek_attention_op.defvjp(_sparsek_fwd, _sparsek_bwd)
