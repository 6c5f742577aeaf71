"""Trace-time argument checks for sparsek_attention.

Every error names the argument and what was expected, so that bad input fails in Python while
tracing, never inside a kernel.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16)
MAX_HEAD_DIM = 256
IMPLEMENTATIONS = (None, "cuda", "xla")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static description of one attention call (hashable: it becomes primitive params)."""

    scale: float
    is_causal: bool
    window: int  # dense modes: 0 means no sliding window; SparseK: the window W >= 0
    implementation: str | None
    topk: int = 0  # SparseK budget K >= 1; 0 selects the dense modes

    @property
    def sparsek(self) -> bool:
        return self.topk > 0


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def check_attention_args(query, key, value, scores, topk, window, is_causal, scale,
                         implementation) -> AttentionConfig:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 with layout [batch, seq_len, num_heads, head_dim], "
                f"got shape {tuple(x.shape)}")
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"query must be float16 or bfloat16, got {_dtype_name(query.dtype)}")
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            raise TypeError(
                f"{name} dtype {_dtype_name(x.dtype)} does not match query dtype "
                f"{_dtype_name(query.dtype)}")

    b, t, hq, d = query.shape
    _, s, hkv, _ = key.shape
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: query {b}, key {key.shape[0]}, value {value.shape[0]}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"value shape {tuple(value.shape)} must match key shape {tuple(key.shape)} "
            "in batch, seq_len and num_heads")
    if key.shape[3] != d or value.shape[3] != d:
        raise ValueError(
            f"head_dim differs: query {d}, key {key.shape[3]}, value {value.shape[3]}")
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim (last axis of query) must be a multiple of 8 between 8 and "
            f"{MAX_HEAD_DIM}, got {d}")
    if min(b, t, hq, s, hkv) == 0:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must have no empty axis")
    if hq % hkv != 0:
        raise ValueError(
            f"query num_heads ({hq}) must be a multiple of key/value num_heads ({hkv}) for "
            "grouped-query attention")
    if hq > 65535:
        raise ValueError(f"query num_heads must be at most 65535, got {hq}")

    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    is_causal = bool(is_causal)

    if scores is not None or topk is not None:
        topk_int, window_int = _check_sparsek_args(scores, topk, window, is_causal, b, s, hkv)
    else:
        topk_int = 0
        window_int = _check_dense_window(window, is_causal, s)

    if scale is None:
        scale_f = 1.0 / math.sqrt(d)
    else:
        if isinstance(scale, (str, bytes)):
            raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
        try:
            scale_f = float(scale)
        except (TypeError, ValueError):
            raise TypeError(
                f"scale must be a Python float or None, got {type(scale).__name__}") from None
        if not math.isfinite(scale_f):
            raise ValueError(f"scale must be finite, got {scale_f}")

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of None, 'cuda' or 'xla', got {implementation!r}")

    return AttentionConfig(scale=scale_f, is_causal=is_causal, window=window_int,
                           implementation=implementation, topk=topk_int)


def _check_int(name: str, value, what: str = "an int") -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return int(value)


def _check_dense_window(window, is_causal: bool, num_keys: int) -> int:
    if window is None:
        return 0
    window_int = _check_int("window", window, "an int or None")
    if window_int <= 0:
        raise ValueError(f"window must be a positive number of keys, got {window_int}")
    if not is_causal:
        raise ValueError(
            "window selects a causal sliding window: pass is_causal=True with window")
    # Every row sits at a position below S, so any window >= S is plain causal attention.
    return min(window_int, num_keys)


def check_topk_and_window(topk, window, where: str = "") -> tuple[int, int]:
    """SparseK budget K >= 1 and window W >= 0 (None: 0), as ints."""
    topk_int = _check_int("topk", topk)
    if topk_int < 1:
        raise ValueError(f"topk must be >= 1, got {topk_int}")
    window_int = 0 if window is None else _check_int("window", window, "an int or None")
    if window_int < 0:
        raise ValueError(f"window must be >= 0{where}, got {window_int}")
    return topk_int, window_int


def _check_sparsek_args(scores, topk, window, is_causal: bool, b: int, s: int,
                        hkv: int) -> tuple[int, int]:
    """SparseK mode: scores [B, S, Hkv] floating, topk >= 1, window >= 0, causal."""
    if scores is None:
        raise ValueError("topk selects the SparseK mode, which needs scores [batch, kv_len, "
                         "kv_heads] (one importance score per key and kv head)")
    if topk is None:
        raise ValueError("scores selects the SparseK mode, which needs topk (the number of "
                         "keys each query selects, >= 1)")
    if not hasattr(scores, "shape") or not hasattr(scores, "dtype"):
        raise TypeError(f"scores must be an array, got {type(scores).__name__}")
    if tuple(scores.shape) != (b, s, hkv):
        raise ValueError(
            f"scores must have shape [batch, kv_len, kv_heads] = {(b, s, hkv)}, got "
            f"{tuple(scores.shape)}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"scores must be a floating-point array, got {_dtype_name(scores.dtype)}")
    topk_int, window_int = check_topk_and_window(topk, window, " in the SparseK mode")
    if not is_causal:
        raise ValueError("the SparseK mode (scores, topk) is causal: pass is_causal=True")
    # A window >= S covers every key of every row; topk >= S selects every key.
    return min(topk_int, s), min(window_int, s)
