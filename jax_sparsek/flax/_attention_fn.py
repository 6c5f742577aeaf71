"""``attention_fn``: jax_sparsek's dense attention behind Flax's multi-head attention modules.

``flax.nnx.MultiHeadAttention(..., attention_fn=attention_fn)`` and
``flax.linen.MultiHeadDotProductAttention(..., attention_fn=attention_fn)`` call it with their
projected query, key and value and their keyword set. Whatever jax_sparsek cannot compute
exactly is handed to Flax's own attention, with a one-time warning naming the reason: the
result is never silently different from Flax's.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ..attention import sparsek_attention

__all__ = ["SparseKFallbackWarning", "attention_fn"]

_SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_MAX_HEAD_DIM = 256
_UNSET = object()  # marks keyword arguments that the caller did not pass
_warned_reasons: set[str] = set()


class SparseKFallbackWarning(UserWarning):
    """jax_sparsek.flax.attention_fn handed a call to Flax's own attention."""


def _warn_fallback(reason: str) -> None:
    if reason in _warned_reasons:
        return
    _warned_reasons.add(reason)
    warnings.warn(f"jax_sparsek.flax.attention_fn: {reason}; using Flax's own attention "
                  "instead (this warning is shown once per reason)", SparseKFallbackWarning,
                  stacklevel=4)


def _is_traced(x) -> bool:
    tracer_type = getattr(jax.core, "Tracer", None)
    if tracer_type is not None:
        return isinstance(x, tracer_type)
    try:
        np.asarray(x)
    except Exception:  # noqa: BLE001 - a tracer cannot become a NumPy array
        return True
    return False


def _visible_pattern(q_len: int, kv_len: int, window: int) -> np.ndarray:
    """Boolean [T, S]: jax_sparsek's causal (window 0) or causal sliding-window pattern, with
    bottom-right alignment (row i sits at position i + S - T)."""
    row_pos = np.arange(q_len)[:, None] + (kv_len - q_len)
    key_pos = np.arange(kv_len)[None, :]
    visible = key_pos <= row_pos
    if window > 0:
        visible &= key_pos > row_pos - window
    return visible


def _classify_mask(mask, is_causal: bool, attn_shape: tuple[int, ...]):
    """(mode, reason): mode is ``(is_causal, window)`` for jax_sparsek, or None with the
    reason to fall back.

    ``attn_shape`` is ``batch_dims + (num_heads, T, S)``; ``mask`` broadcasts to it (nonzero
    = visible) and is combined with Flax's top-left causal mask when ``is_causal``.
    """
    q_len, kv_len = attn_shape[-2:]
    if mask is None:
        if not is_causal:
            return (False, 0), None
        if q_len != kv_len:
            return None, ("is_causal=True with query length != key length: Flax aligns the "
                          "causal mask top-left, jax_sparsek bottom-right")
        return (True, 0), None
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        return None, f"mask of type {type(mask).__name__} is not an array"
    if _is_traced(mask):
        return None, ("the mask is a traced value (built or passed inside jit, vmap or a "
                      "scan), whose values cannot be inspected; call the module with "
                      "is_causal=True and no mask for causal attention, or build the mask "
                      "outside the jitted function")
    try:
        broadcast = np.broadcast_shapes(tuple(mask.shape), attn_shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(attn_shape):
        return None, (f"a mask of shape {tuple(mask.shape)} does not broadcast to "
                      f"[batch..., num_heads, q_len, kv_len] = {tuple(attn_shape)}")
    visible = np.asarray(mask) != 0
    if visible.ndim < 2:
        visible = visible.reshape((1,) * (2 - visible.ndim) + visible.shape)
    flat = visible.reshape((-1,) + visible.shape[-2:])
    shared = flat.all(axis=0)
    if not np.array_equal(shared, flat.any(axis=0)):
        return None, "the mask differs between batch entries or heads"
    pattern = np.broadcast_to(shared, (q_len, kv_len))
    if is_causal:
        pattern = pattern & np.tril(np.ones((q_len, kv_len), dtype=bool))
    if not pattern.any(axis=1).all():
        return None, ("a row of the mask sees no key (Flax averages every value there, "
                      "jax_sparsek returns 0)")
    if pattern.all():
        return (False, 0), None
    window = int(pattern[-1].sum())
    if np.array_equal(pattern, _visible_pattern(q_len, kv_len, 0)):
        return (True, 0), None
    if window < kv_len and np.array_equal(pattern, _visible_pattern(q_len, kv_len, window)):
        return (True, window), None
    return None, ("the mask is neither all-True, nor causal, nor a causal sliding window "
                  "(bottom-right aligned)")


def _promote(query, key, value, dtype, promote_dtype):
    if promote_dtype is not None:
        return promote_dtype((query, key, value), dtype=dtype)
    from flax.nnx.nn import dtypes

    return dtypes.promote_dtype((query, key, value), dtype=dtype)


def _flax_attention(query, key, value, *, linen_flavour, kwargs):
    """Flax's own attention with the caller's arguments (nnx's, or linen's for linen callers)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not _UNSET}
    if linen_flavour:
        from flax import linen

        if kwargs.pop("is_causal", False):
            causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), dtype=bool))
            mask = kwargs.get("mask")
            kwargs["mask"] = causal if mask is None else jnp.logical_and(mask, causal)
        kwargs.pop("promote_dtype", None)
        return linen.dot_product_attention(query, key, value, **kwargs)
    from flax import nnx

    return nnx.dot_product_attention(query, key, value, **kwargs)


def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                 dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                 precision=None, module=None, promote_dtype=_UNSET, is_causal=False,
                 force_fp32_for_softmax=_UNSET, einsum_dot_general=_UNSET,
                 qk_attn_weights_einsum=_UNSET, attn_weights_value_einsum=_UNSET, *,
                 implementation=None, **kwargs):
    """Drop-in replacement for Flax's ``dot_product_attention`` running jax_sparsek.

    Pass it as ``attention_fn=`` to ``flax.nnx.MultiHeadAttention`` or
    ``flax.linen.MultiHeadDotProductAttention`` (or call it like
    ``flax.nnx.dot_product_attention``). Shapes: query ``[batch..., T, Nq, H]``, key and value
    ``[batch..., S, Nkv, H]`` (``Nq`` a multiple of ``Nkv``); returns ``[batch..., T, Nq, H]``.

    jax_sparsek's kernel (:func:`jax_sparsek.sparsek_attention`) runs when all of these hold:

    - after Flax's dtype promotion (``dtype=`` of the module) the inputs are float16 or
      bfloat16, and the head dim is a multiple of 8 between 8 and 256, equal for query, key
      and value;
    - no ``bias``; no ``module`` (``sow_weights=True`` asks for the attention weights, which
      are never materialised); no attention dropout (``dropout_rate == 0`` or
      ``deterministic=True``); no custom einsum (linen's ``einsum_dot_general``,
      ``qk_attn_weights_einsum``, ``attn_weights_value_einsum``); no other keyword;
    - the mask, combined with ``is_causal``, is one of: none (full attention); causal
      (``is_causal=True`` with ``T == S``, or a concrete mask equal to the lower-triangular
      pattern, e.g. ``nnx.make_causal_mask`` built outside ``jit``); a causal sliding window.
      A concrete mask is compared with these patterns, broadcast over batch and heads;
      a traced mask (made inside ``jit``) cannot be inspected and is handed to Flax. Under
      ``jit`` ask for causal attention with ``is_causal=True`` and no mask.

    Otherwise Flax's own attention runs (``flax.linen.dot_product_attention`` when the caller
    is linen's module or passes linen-only keywords, else ``flax.nnx.dot_product_attention``)
    and a :class:`SparseKFallbackWarning` says why, once per reason. ``precision`` is ignored
    by the kernel (it accumulates in float32); ``force_fp32_for_softmax`` likewise (the softmax
    is always float32).

    Args:
      implementation: passed to :func:`jax_sparsek.sparsek_attention` (``None``: the CUDA
        kernel on CUDA, the pure-JAX reference elsewhere; ``'cuda'``; ``'xla'``). Bind it
        with ``functools.partial``.
    """
    flax_kwargs = dict(bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
                       dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                       deterministic=deterministic, dtype=dtype, precision=precision,
                       module=module, promote_dtype=promote_dtype, is_causal=is_causal,
                       force_fp32_for_softmax=force_fp32_for_softmax,
                       einsum_dot_general=einsum_dot_general,
                       qk_attn_weights_einsum=qk_attn_weights_einsum,
                       attn_weights_value_einsum=attn_weights_value_einsum, **kwargs)
    linen_only = (force_fp32_for_softmax, einsum_dot_general, qk_attn_weights_einsum,
                  attn_weights_value_einsum)
    linen_flavour = any(v is not _UNSET for v in linen_only)
    if module is not None:
        from flax import linen

        linen_flavour = isinstance(module, linen.Module)

    def fallback(reason):
        _warn_fallback(reason)
        return _flax_attention(query, key, value, linen_flavour=linen_flavour,
                               kwargs=flax_kwargs)

    if kwargs:
        return fallback(f"unsupported keyword arguments {sorted(kwargs)}")
    if module is not None:
        return fallback("module= was given (sow_weights=True): the attention weights are "
                        "asked for, and jax_sparsek never materialises them")
    if dropout_rate > 0.0 and not deterministic:
        return fallback("attention dropout while training (dropout_rate > 0 and "
                        "deterministic=False)")
    if bias is not None:
        return fallback("bias= was given: jax_sparsek adds no attention bias")
    if any(v not in (None, _UNSET) for v in linen_only[1:]):
        return fallback("a custom einsum (einsum_dot_general, qk_attn_weights_einsum or "
                        "attn_weights_value_einsum) was given")

    q, k, v = _promote(query, key, value, dtype,
                       None if promote_dtype is _UNSET else promote_dtype)
    if jnp.dtype(q.dtype) not in _SUPPORTED_DTYPES:
        name = jnp.dtype(q.dtype).name
        return fallback(f"{name} inputs: jax_sparsek needs float16/bfloat16 (set "
                        "dtype=jnp.bfloat16 on the module)")
    if not q.ndim == k.ndim == v.ndim or q.ndim < 3:
        return fallback("query, key and value must have the same rank, at least 3")
    batch_dims = q.shape[:-3]
    if k.shape[:-3] != batch_dims or v.shape[:-3] != batch_dims:
        return fallback("query, key and value have different batch dims")
    (q_len, q_heads, head_dim), (kv_len, kv_heads) = q.shape[-3:], k.shape[-3:-1]
    if k.shape[-1] != head_dim or v.shape[-3:] != k.shape[-3:]:
        return fallback("query, key and value differ in head dim, or key and value in "
                        "length or heads")
    if head_dim % 8 or not 8 <= head_dim <= _MAX_HEAD_DIM:
        return fallback(f"head dim {head_dim}: jax_sparsek needs a multiple of 8 between 8 "
                        f"and {_MAX_HEAD_DIM}")
    if q_heads % kv_heads:
        return fallback(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads")
    if 0 in q.shape or 0 in k.shape:
        return fallback("an empty axis")
    mode, reason = _classify_mask(mask, bool(is_causal),
                                  tuple(batch_dims) + (q_heads, q_len, kv_len))
    if mode is None:
        return fallback(reason)
    causal, window = mode

    batch = math.prod(batch_dims)
    out = sparsek_attention(q.reshape((batch,) + q.shape[-3:]),
                            k.reshape((batch,) + k.shape[-3:]),
                            v.reshape((batch,) + v.shape[-3:]),
                            is_causal=causal, window=window or None,
                            implementation=implementation)
    return out.reshape(q.shape)
