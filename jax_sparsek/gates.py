"""Public helper to see which keys each query selects in the SparseK mode."""
from __future__ import annotations

import jax.numpy as jnp

from ._gates import sparsek_thresholds_and_gates
from ._validation import _check_int, check_topk_and_window


def sparsek_gates(scores, *, topk, window=0, num_queries=None):
    """Thresholds and gates of the SparseK mode, for small shapes.

    Args:
      scores: ``[B, S, Nkv]`` importance score per key and kv head (float, finite or
        ``-inf``: never selected).
      topk: budget ``K >= 1``.
      window: ``W >= 0`` most recent keys always gated 1 (``None``: 0).
      num_queries: ``T`` (default ``S``); row ``i`` sits at position ``i + S - T``.

    Returns:
      ``(tau, gates)``: ``tau`` ``[B, Nkv, T]`` float32 (``-inf`` where the sparse domain holds
      at most ``K`` keys) and ``gates`` ``[B, Nkv, T, S]`` float32 in ``[0, 1]``, the weight
      ``m_ij`` of key ``j`` for query row ``i`` (SPARSEK.md, "Gates"). Materialises
      ``T x S`` per kv head.
    """
    if not hasattr(scores, "shape") or not hasattr(scores, "dtype"):
        raise TypeError(f"scores must be an array, got {type(scores).__name__}")
    if len(scores.shape) != 3:
        raise ValueError("scores must have rank 3 with layout [batch, kv_len, kv_heads], got "
                         f"shape {tuple(scores.shape)}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"scores must be a floating-point array, got {scores.dtype}")
    num_keys = scores.shape[1]
    topk, window = check_topk_and_window(topk, window)
    num_queries = num_keys if num_queries is None else _check_int("num_queries", num_queries)
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    return sparsek_thresholds_and_gates(scores, topk=min(topk, num_keys),
                                        window=min(window, num_keys), num_queries=num_queries)
