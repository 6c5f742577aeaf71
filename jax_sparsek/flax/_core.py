"""What the nnx and linen SparseKAttention modules share: hyperparameter checks, the scoring
network's position term and the attention call."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..attention import sparsek_attention

_SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def check_hyperparameters(in_features, num_heads, num_kv_heads, head_dim, topk, window,
                          dtype):
    """Validated ``(num_kv_heads, head_dim, topk, window)``."""
    def positive_int(name, value):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return int(value)

    in_features = positive_int("in_features", in_features)
    num_heads = positive_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads",
                                                                        num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if head_dim is None:
        if in_features % num_heads:
            raise ValueError(f"in_features ({in_features}) must be a multiple of num_heads "
                             f"({num_heads}), or pass head_dim")
        head_dim = in_features // num_heads
    head_dim = positive_int("head_dim", head_dim)
    if head_dim % 8 or head_dim > 256:
        raise ValueError(f"head_dim must be a multiple of 8 between 8 and 256, got {head_dim}")
    if topk is not None:
        topk = positive_int("topk", topk)
    window = 0 if window is None else int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be float16 or bfloat16 (jax_sparsek's kernels), got "
                         f"{jnp.dtype(dtype).name}")
    return num_kv_heads, head_dim, topk, window


def position_term(slope, num_keys: int):
    """``slope[h] * j / S`` as ``[1, S, Nkv]`` float32 (``j`` the key position, ``S`` the
    sequence length)."""
    pos = jnp.arange(num_keys, dtype=jnp.float32) / num_keys
    return pos[None, :, None] * slope.astype(jnp.float32)[None, None, :]


def attend(query, key, value, scores, *, topk, window, dense, implementation):
    """Causal attention of the module: SparseK with ``scores`` unless ``dense`` or ``topk``
    is None, then plain causal attention."""
    if dense or topk is None:
        return sparsek_attention(query, key, value, is_causal=True,
                                 implementation=implementation)
    return sparsek_attention(query, key, value, scores, topk=topk, window=window,
                             is_causal=True, implementation=implementation)


def flatten_batch(x):
    """``[batch..., T, F]`` -> ``[B, T, F]`` and the batch dims."""
    if x.ndim < 2:
        raise ValueError(f"inputs must have shape [batch..., seq_len, features], got "
                         f"{tuple(x.shape)}")
    batch_dims = x.shape[:-2]
    return x.reshape((-1,) + x.shape[-2:]), batch_dims
