"""``SparseKAttention`` for ``flax.nnx``: causal multi-head self-attention with SparseK."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from . import _core

__all__ = ["SparseKAttention"]

_default_kernel_init = nnx.initializers.lecun_normal()


class SparseKAttention(nnx.Module):
    """Causal multi-head self-attention that attends to learned top-k keys (SparseK).

    ``x [batch..., T, in_features] -> [batch..., T, out_features]``. Per layer:

    - ``q = x Wq`` ``[B, T, num_heads, head_dim]``; ``k = x Wk``, ``v = x Wv``
      ``[B, T, num_kv_heads, head_dim]`` (GQA when ``num_kv_heads < num_heads``);
    - the scoring network of SparseK: one importance score per key and kv head,
      ``u[b, j, h] = (x[b, j] @ W_score)[h] + b_score[h] + score_slope[h] * j / T``, computed in
      float32 (``score`` is a ``Linear(in_features, num_kv_heads)`` and ``score_slope`` a
      learned ``[num_kv_heads]`` vector, initialised to 0);
    - ``o = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True)``: each
      query keeps its ``window`` most recent keys and a budget of ``topk`` keys before them,
      chosen by the differentiable SPARSEK projection of ``u`` (gradients reach ``score``
      and ``score_slope`` through the gates);
    - ``out = o Wo``.

    With ``dense=True`` (or ``topk=None``) the layer is plain causal attention, ignoring the
    scores, ``topk`` and ``window``; the parameters are the same, so one checkpoint serves
    both. There is no KV cache (no decoding mode) and no dropout.

    Args:
      in_features: model width ``d_model``.
      num_heads: query heads.
      num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
      head_dim: default ``in_features // num_heads``; a multiple of 8 up to 256.
      out_features: default ``in_features``.
      topk: SparseK budget ``K >= 1`` per query (None: dense causal attention).
      window: the ``W >= 0`` most recent keys every query always sees (SparseK mode).
      dense: plain causal attention (the baseline switch).
      dtype: compute dtype of the projections and attention, float16 or bfloat16.
      param_dtype: parameter dtype.
      use_bias: biases in the q/k/v/out projections (the score projection always has one).
      implementation: passed to :func:`jax_sparsek.sparsek_attention`.
      rngs: ``nnx.Rngs`` for the initialisers.
    """

    def __init__(self, in_features: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, out_features: int | None = None,
                 topk: int | None = None, window: int = 0, dense: bool = False,
                 dtype=jnp.bfloat16, param_dtype=jnp.float32, use_bias: bool = False,
                 kernel_init=_default_kernel_init, score_kernel_init=_default_kernel_init,
                 implementation: str | None = None, rngs: nnx.Rngs):
        num_kv_heads, head_dim, topk, window = _core.check_hyperparameters(
            in_features, num_heads, num_kv_heads, head_dim, topk, window, dtype)
        self.in_features = in_features
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.out_features = in_features if out_features is None else out_features
        self.topk = topk
        self.window = window
        self.dense = bool(dense)
        self.dtype = dtype
        self.implementation = implementation

        def projection(heads):
            return nnx.LinearGeneral(in_features, (heads, head_dim), use_bias=use_bias,
                                     dtype=dtype, param_dtype=param_dtype,
                                     kernel_init=kernel_init, rngs=rngs)

        self.query = projection(num_heads)
        self.key = projection(num_kv_heads)
        self.value = projection(num_kv_heads)
        self.out = nnx.LinearGeneral((num_heads, head_dim), self.out_features, axis=(-2, -1),
                                     use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                                     kernel_init=kernel_init, rngs=rngs)
        self.score = nnx.Linear(in_features, num_kv_heads, use_bias=True, dtype=jnp.float32,
                                param_dtype=param_dtype, kernel_init=score_kernel_init,
                                rngs=rngs)
        self.score_slope = nnx.Param(jnp.zeros((num_kv_heads,), param_dtype))

    def scores(self, x):
        """SparseK importance scores ``[B, T, num_kv_heads]`` (float32) for ``x [B, T, F]``."""
        u = self.score(x.astype(jnp.float32))
        return u + _core.position_term(self.score_slope[...], x.shape[-2])

    def __call__(self, x):
        x, batch_dims = _core.flatten_batch(x)
        query, key, value = self.query(x), self.key(x), self.value(x)
        scores = None if self.dense or self.topk is None else self.scores(x)
        o = _core.attend(query, key, value, scores, topk=self.topk, window=self.window,
                         dense=self.dense, implementation=self.implementation)
        out = self.out(o)
        return out.reshape(batch_dims + out.shape[-2:])
