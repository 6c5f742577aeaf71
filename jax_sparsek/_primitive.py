"""The sparsek_attention_fwd primitive: abstract evaluation, batching and lowering.

Operands (q, k, v) in the dense modes, (q, k, v, scores) in the SparseK mode; results
(o, lse) and, in the SparseK mode, tau (the per-row thresholds the backward needs).
Lowered on CUDA to our XLA FFI custom call, and everywhere else (or with
implementation='xla') to the pure-JAX reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import _extension
from ._gates import sparsek_thresholds_and_gates
from ._reference import dense_attention_reference, gated_attention_reference
from ._validation import AttentionConfig

attention_fwd_p = Primitive("sparsek_attention_fwd")
attention_fwd_p.multiple_results = True


def attention_fwd(query, key, value, scores, config: AttentionConfig):
    """Binds the primitive.

    Returns o [B, T, Hq, D] and lse [B, Hq, T] (float32), plus tau [B, Hkv, T] (float32) in
    the SparseK mode.
    """
    operands = (query, key, value) + ((scores,) if config.sparsek else ())
    return attention_fwd_p.bind(*operands, config=config)


def cuda_kernel_available(config: AttentionConfig) -> bool:
    """Whether a CUDA kernel implements this configuration (the SparseK one is not built yet)."""
    return not config.sparsek


def _reference_impl(query, key, value, *scores, config: AttentionConfig):
    if not config.sparsek:
        o, lse = dense_attention_reference(query, key, value, scale=config.scale,
                                           is_causal=config.is_causal, window=config.window)
        return o, lse.astype(jnp.float32)
    tau, gates = sparsek_thresholds_and_gates(scores[0], topk=config.topk,
                                              window=config.window,
                                              num_queries=query.shape[1])
    o, lse = gated_attention_reference(query, key, value, gates, config.scale)
    return o, lse.astype(jnp.float32), tau.astype(jnp.float32)


def _abstract_eval(query, key, value, *scores, config: AttentionConfig):
    b, t, hq, _ = query.shape
    results = [jax.core.ShapedArray(query.shape, query.dtype),
               jax.core.ShapedArray((b, hq, t), jnp.float32)]
    if config.sparsek:
        results.append(jax.core.ShapedArray((b, key.shape[2], t), jnp.float32))
    return tuple(results)


def _batch(args, dims, *, config: AttentionConfig):
    """vmap: every mapped axis is folded into the batch axis (unmapped operands broadcast)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    folded = []
    for a, d in zip(args, dims):
        a = jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
        folded.append(a.reshape((size * a.shape[1],) + a.shape[2:]))
    results = attention_fwd_p.bind(*folded, config=config)
    return [r.reshape((size, -1) + r.shape[1:]) for r in results], [0] * len(results)


_reference_lowering = mlir.lower_fun(_reference_impl, multiple_results=True)


def _default_lowering(ctx, *operands, config: AttentionConfig):
    if config.implementation == "cuda":
        raise RuntimeError("implementation='cuda' was requested but the computation is being "
                           "compiled for a platform other than CUDA")
    if config.implementation is None:
        _extension.warn_reference_path("no CUDA device")
    return _reference_lowering(ctx, *operands, config=config)


def _cuda_lowering(ctx, *operands, config: AttentionConfig):
    if config.implementation == "xla":
        return _reference_lowering(ctx, *operands, config=config)
    if not cuda_kernel_available(config):
        # implementation='cuda' was refused at trace time (attention.py).
        _extension.warn_reference_path("the SparseK CUDA kernel is not built yet")
        return _reference_lowering(ctx, *operands, config=config)
    if not _extension.cuda_kernels_built():
        if config.implementation == "cuda":
            _extension.ensure_cuda_targets()  # raises with the reason
        _extension.warn_reference_path("jax_sparsek was built without CUDA kernels")
        return _reference_lowering(ctx, *operands, config=config)
    _extension.ensure_cuda_targets()
    rule = jax.ffi.ffi_lowering(_extension.FFI_TARGET_ATTENTION_FWD)
    return rule(ctx, *operands, scale=np.float32(config.scale),
                is_causal=np.int32(config.is_causal), window=np.int64(config.window))


@functools.partial(jax.jit, static_argnames=("config",))
def _eager_impl(*operands, config: AttentionConfig):
    # Eager calls compile the primitive like jit does, so they take the same lowering path.
    return attention_fwd_p.bind(*operands, config=config)


attention_fwd_p.def_impl(_eager_impl)
attention_fwd_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[attention_fwd_p] = _batch
mlir.register_lowering(attention_fwd_p, _default_lowering)
mlir.register_lowering(attention_fwd_p, _cuda_lowering, platform="cuda")
