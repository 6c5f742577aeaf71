"""Flax integration of jax_sparsek.

- :func:`attention_fn`: ``attention_fn=`` for ``flax.nnx.MultiHeadAttention`` and
  ``flax.linen.MultiHeadDotProductAttention`` (dense attention on jax_sparsek's kernel, Flax's
  own attention with a warning where a feature is missing).
- :class:`jax_sparsek.flax.nnx.SparseKAttention` (also ``jax_sparsek.flax.SparseKAttention``)
  and :class:`jax_sparsek.flax.linen.SparseKAttention`: causal multi-head self-attention with
  the SparseK scoring network, GQA, ``topk``/``window`` and a dense switch.

Needs ``flax`` (``pip install jax-sparsek[flax]``).
"""
from ._attention_fn import SparseKFallbackWarning, attention_fn
from . import linen, nnx
from .nnx import SparseKAttention

LinenSparseKAttention = linen.SparseKAttention

__all__ = ["LinenSparseKAttention", "SparseKAttention", "SparseKFallbackWarning",
           "attention_fn", "linen", "nnx"]
