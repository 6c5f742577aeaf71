"""``SparseKAttention`` for ``flax.linen``: causal multi-head self-attention with SparseK."""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from . import _core

__all__ = ["SparseKAttention"]

_default_kernel_init = nn.initializers.lecun_normal()


class SparseKAttention(nn.Module):
    """Causal multi-head self-attention that attends to learned top-k keys (SparseK).

    The linen twin of :class:`jax_sparsek.flax.nnx.SparseKAttention` (same computation, same
    hyperparameters; see there). Parameters: ``query``, ``key``, ``value`` (DenseGeneral
    ``in_features -> (heads, head_dim)``), ``out`` (DenseGeneral ``(num_heads, head_dim) ->
    out_features``), ``score`` (Dense ``in_features -> num_kv_heads``, with bias) and
    ``score_slope`` ``[num_kv_heads]``. The scores are
    ``u[b, j, h] = (x[b, j] @ W_score)[h] + b_score[h] + score_slope[h] * j / T`` in float32.
    ``in_features`` is taken from the input.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_features: int | None = None
    topk: int | None = None
    window: int = 0
    dense: bool = False
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    use_bias: bool = False
    kernel_init: Callable = _default_kernel_init
    score_kernel_init: Callable = _default_kernel_init
    implementation: str | None = None

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        num_kv_heads, head_dim, topk, window = _core.check_hyperparameters(
            in_features, self.num_heads, self.num_kv_heads, self.head_dim, self.topk,
            self.window, self.dtype)
        out_features = in_features if self.out_features is None else self.out_features
        x, batch_dims = _core.flatten_batch(x)

        def projection(heads, name):
            return nn.DenseGeneral((heads, head_dim), use_bias=self.use_bias,
                                   dtype=self.dtype, param_dtype=self.param_dtype,
                                   kernel_init=self.kernel_init, name=name)

        query = projection(self.num_heads, "query")(x)
        key = projection(num_kv_heads, "key")(x)
        value = projection(num_kv_heads, "value")(x)
        score = nn.Dense(num_kv_heads, use_bias=True, dtype=jnp.float32,
                         param_dtype=self.param_dtype, kernel_init=self.score_kernel_init,
                         name="score")
        slope = self.param("score_slope", nn.initializers.zeros_init(), (num_kv_heads,),
                           self.param_dtype)
        sparse = not (self.dense or topk is None)
        # The score parameters exist in both modes, so one checkpoint serves both.
        u = score(x.astype(jnp.float32)) + _core.position_term(slope, x.shape[-2])
        o = _core.attend(query, key, value, u if sparse else None, topk=topk, window=window,
                         dense=self.dense, implementation=self.implementation)
        out = nn.DenseGeneral(out_features, axis=(-2, -1), use_bias=self.use_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=self.kernel_init, name="out")(o)
        return out.reshape(batch_dims + out.shape[-2:])
