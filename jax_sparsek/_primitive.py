"""The sparsek_attention_fwd primitive: abstract evaluation, batching and lowering.

Operands (q, k, v) in the dense modes, (q, k, v, scores) in the SparseK mode; results
(o, lse) and, in the SparseK mode, tau (the per-row thresholds the backward needs).
The primitive lowers through its sharding rule (_sharding.py) to one per-device primitive
per shard of the batch and kv-head groups, which is lowered on CUDA to our XLA FFI custom
call, and everywhere else (or with implementation='xla') to the pure-JAX reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import _extension, _sharding
from ._gates import sparsek_thresholds_and_gates
from ._reference import dense_attention_reference, gated_attention_reference
from ._validation import AttentionConfig

attention_fwd_p = Primitive("sparsek_attention_fwd")
attention_fwd_p.multiple_results = True
# The same computation on one device's shard (what the sharding rule's partition binds).
attention_fwd_shard_p = Primitive("sparsek_attention_fwd_shard")
attention_fwd_shard_p.multiple_results = True


def attention_fwd(query, key, value, scores, config: AttentionConfig):
    """Binds the primitive.

    Returns o [B, T, Hq, D] and lse [B, Hq, T] (float32), plus tau [B, Hkv, T] (float32) in
    the SparseK mode.
    """
    operands = (query, key, value) + ((scores,) if config.sparsek else ())
    return attention_fwd_p.bind(*operands, config=config)


# The SparseK kernels keep one plan row of S / 128 entries in shared memory.
SPARSEK_CUDA_MAX_KEYS = 8192 * 128


def cuda_kernel_available(config: AttentionConfig, num_keys: int) -> bool:
    """Whether a CUDA kernel implements this configuration."""
    return not config.sparsek or num_keys <= SPARSEK_CUDA_MAX_KEYS


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


def fold_into_batch(primitive):
    """The vmap rule of our primitives: every mapped axis is folded into the batch axis
    (unmapped operands broadcast), so a vmapped call is still one kernel launch."""

    def rule(args, dims, *, config: AttentionConfig):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        folded = []
        for a, d in zip(args, dims):
            a = jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
            folded.append(a.reshape((size * a.shape[1],) + a.shape[2:]))
        results = primitive.bind(*folded, config=config)
        return [r.reshape((size, -1) + r.shape[1:]) for r in results], [0] * len(results)

    return rule


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
    if not cuda_kernel_available(config, ctx.avals_in[1].shape[1]):
        # implementation='cuda' was refused at trace time (attention.py).
        _extension.warn_reference_path(
            f"the SparseK CUDA kernels take at most {SPARSEK_CUDA_MAX_KEYS} keys")
        return _reference_lowering(ctx, *operands, config=config)
    if not _extension.cuda_kernels_built():
        if config.implementation == "cuda":
            _extension.ensure_cuda_targets()  # raises with the reason
        _extension.warn_reference_path("jax_sparsek was built without CUDA kernels")
        return _reference_lowering(ctx, *operands, config=config)
    _extension.ensure_cuda_targets()
    if config.sparsek:
        return _sparsek_cuda_lowering(ctx, *operands, config=config)
    rule = jax.ffi.ffi_lowering(_extension.FFI_TARGET_ATTENTION_FWD)
    return rule(ctx, *operands, scale=np.float32(config.scale),
                is_causal=np.int32(config.is_causal), window=np.int64(config.window))


def _selection_workspace(batch, num_queries, num_keys, kv_heads):
    """The uint8 workspace result the SparseK custom calls take (their selection's buffers)."""
    size = _extension.load_extension().sparsek_workspace_bytes(batch, num_queries, num_keys,
                                                               kv_heads)
    return jax.ShapeDtypeStruct((size,), jnp.uint8)


def _sparsek_cuda_impl(query, key, value, scores, *, config: AttentionConfig):
    b, t, hq, _ = query.shape
    s, hkv = key.shape[1], key.shape[2]
    call = jax.ffi.ffi_call(
        _extension.FFI_TARGET_SPARSEK_FWD,
        (jax.ShapeDtypeStruct(query.shape, query.dtype),
         jax.ShapeDtypeStruct((b, hq, t), jnp.float32),
         jax.ShapeDtypeStruct((b, hkv, t), jnp.float32),
         _selection_workspace(b, t, s, hkv)))
    # The selection reads float32 scores whatever their dtype (SPARSEK.md).
    o, lse, tau, _ = call(query, key, value, scores.astype(jnp.float32),
                          scale=np.float32(config.scale), topk=np.int64(config.topk),
                          window=np.int64(config.window))
    return o, lse, tau


_sparsek_cuda_lowering = mlir.lower_fun(_sparsek_cuda_impl, multiple_results=True)


def sparsek_select_cuda(scores, *, num_queries: int, topk: int, window: int):
    """The CUDA selection stage alone: tau [B, Hkv, T] (float32) from scores [B, S, Hkv].

    What the SparseK forward runs before its attention kernel; exposed for benchmarks (timing
    the selection apart) and tests. CUDA only.
    """
    _extension.ensure_cuda_targets()
    b, s, hkv = scores.shape
    call = jax.ffi.ffi_call(_extension.FFI_TARGET_SPARSEK_SELECT,
                            (jax.ShapeDtypeStruct((b, hkv, num_queries), jnp.float32),
                             _selection_workspace(b, num_queries, s, hkv)))
    tau, _ = call(scores.astype(jnp.float32), topk=np.int64(topk), window=np.int64(window))
    return tau


@functools.partial(jax.jit, static_argnames=("config",))
def _eager_impl(*operands, config: AttentionConfig):
    # Eager calls compile the primitive like jit does, so they take the same lowering path.
    return attention_fwd_p.bind(*operands, config=config)


attention_fwd_p.def_impl(_eager_impl)
attention_fwd_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[attention_fwd_p] = fold_into_batch(attention_fwd_p)
_Q, _K, _R, _U, _TAU = (_sharding.QUERY, _sharding.KEY, _sharding.ROWS, _sharding.SCORES,
                        _sharding.THRESHOLDS)
_sharding.register_lowering(
    attention_fwd_p, attention_fwd_shard_p,
    {False: (_Q, _K, _K), True: (_Q, _K, _K, _U)},
    {False: (_Q, _R), True: (_Q, _R, _TAU)})
attention_fwd_shard_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(attention_fwd_shard_p, _default_lowering)
mlir.register_lowering(attention_fwd_shard_p, _cuda_lowering, platform="cuda")
