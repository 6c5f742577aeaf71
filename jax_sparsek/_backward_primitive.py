"""The sparsek_attention_bwd primitive: abstract evaluation, batching and lowering.

Operands (q, k, v, o, lse, d_out, d_lse) in the dense modes and (q, k, v, scores, tau, o,
lse, d_out, d_lse) in the SparseK mode, tau being the forward's thresholds [B, Hkv, T]
(float32; the CUDA kernels read them instead of solving them again, the reference solves
its own in the scores' precision); results (dq, dk, dv) and, in the SparseK mode, du
(float32, the gradient of the scores). Lowered on CUDA to the backward kernels' XLA FFI
custom call, and everywhere else (or with implementation='xla') to the pure-JAX reference
of _backward_reference.py, through the same sharding rule as the forward primitive
(_sharding.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import _extension, _sharding
from ._backward_reference import gated_attention_bwd_reference, sparsek_scores_grad
from ._gates import sparsek_thresholds_and_gates
from ._primitive import cuda_kernel_available, fold_into_batch
from ._reference import key_positions_visible
from ._validation import AttentionConfig

attention_bwd_p = Primitive("sparsek_attention_bwd")
attention_bwd_p.multiple_results = True
# The same computation on one device's shard (what the sharding rule's partition binds).
attention_bwd_shard_p = Primitive("sparsek_attention_bwd_shard")
attention_bwd_shard_p.multiple_results = True


def attention_bwd(query, key, value, scores, tau, out, lse, d_out, d_lse,
                  config: AttentionConfig):
    """Binds the primitive: dq, dk, dv in the input dtype, plus du [B, S, Hkv] (float32) in
    the SparseK mode (scores and the forward's tau given; both None in the dense modes)."""
    sparse = (scores, tau.astype(jnp.float32)) if config.sparsek else ()
    operands = (query, key, value) + sparse + (out, lse, d_out, d_lse.astype(jnp.float32))
    return attention_bwd_p.bind(*operands, config=config)


def _split(operands, config):
    if config.sparsek:
        query, key, value, scores, tau, out, lse, d_out, d_lse = operands
    else:
        (query, key, value, out, lse, d_out, d_lse), scores, tau = operands, None, None
    return query, key, value, scores, tau, out, lse, d_out, d_lse


def _reference_impl(*operands, config: AttentionConfig):
    query, key, value, scores, _, out, lse, d_out, d_lse = _split(operands, config)
    if not config.sparsek:
        gates = key_positions_visible(query.shape[1], key.shape[1], config.is_causal,
                                      config.window)
        return gated_attention_bwd_reference(query, key, value, gates, out, lse, d_out, d_lse,
                                             config.scale)
    # tau and the gates are recomputed in the scores' precision (the forward's tau is float32).
    tau, gates = sparsek_thresholds_and_gates(scores, topk=config.topk, window=config.window,
                                              num_queries=query.shape[1])
    dq, dk, dv, g = gated_attention_bwd_reference(query, key, value, gates, out, lse, d_out,
                                                  d_lse, config.scale, need_gate_grad=True)
    du = sparsek_scores_grad(scores, tau, g, window=config.window)
    return dq, dk, dv, du.astype(jnp.float32)


def _abstract_eval(*operands, config: AttentionConfig):
    query, key, value, scores, *_ = _split(operands, config)
    results = [jax.core.ShapedArray(query.shape, query.dtype),
               jax.core.ShapedArray(key.shape, key.dtype),
               jax.core.ShapedArray(value.shape, value.dtype)]
    if config.sparsek:
        results.append(jax.core.ShapedArray(scores.shape, jnp.float32))
    return tuple(results)


_reference_lowering = mlir.lower_fun(_reference_impl, multiple_results=True)


def _default_lowering(ctx, *operands, config: AttentionConfig):
    # The forward's lowering has already said (or raised) why the reference runs.
    return _reference_lowering(ctx, *operands, config=config)


def _workspace(size: int):
    return jax.ShapeDtypeStruct((max(size, 1),), jnp.uint8)


def _dense_cuda_impl(query, key, value, out, lse, d_out, d_lse, *, config: AttentionConfig):
    b, t, hq, d = query.shape
    s, hkv = key.shape[1], key.shape[2]
    ext = _extension.load_extension()
    call = jax.ffi.ffi_call(
        _extension.FFI_TARGET_ATTENTION_BWD,
        (jax.ShapeDtypeStruct(query.shape, query.dtype),
         jax.ShapeDtypeStruct(key.shape, key.dtype),
         jax.ShapeDtypeStruct(value.shape, value.dtype),
         _workspace(ext.attention_bwd_workspace_bytes(b, t, s, hq, hkv, d, False))))
    dq, dk, dv, _ = call(query, key, value, out, lse, d_out, d_lse,
                         scale=np.float32(config.scale), is_causal=np.int32(config.is_causal),
                         window=np.int64(config.window))
    return dq, dk, dv


def _sparsek_cuda_impl(query, key, value, scores, tau, out, lse, d_out, d_lse, *,
                       config: AttentionConfig):
    b, t, hq, d = query.shape
    s, hkv = key.shape[1], key.shape[2]
    ext = _extension.load_extension()
    # The selection's buffers, the span sort's (the dk/dv kernel's key order), a tau for the
    # deterministic path's selection and the backward's own (sparsek_bwd_workspace_layout).
    size = ext.sparsek_bwd_workspace_bytes(b, t, s, hq, hkv, d)
    call = jax.ffi.ffi_call(
        _extension.FFI_TARGET_SPARSEK_BWD,
        (jax.ShapeDtypeStruct(query.shape, query.dtype),
         jax.ShapeDtypeStruct(key.shape, key.dtype),
         jax.ShapeDtypeStruct(value.shape, value.dtype),
         jax.ShapeDtypeStruct(scores.shape, jnp.float32),
         _workspace(size)))
    # The selection reads float32 scores whatever their dtype (SPARSEK.md).
    dq, dk, dv, du, _ = call(query, key, value, scores.astype(jnp.float32), tau, out, lse,
                             d_out, d_lse, scale=np.float32(config.scale),
                             topk=np.int64(config.topk), window=np.int64(config.window))
    return dq, dk, dv, du


_dense_cuda_lowering = mlir.lower_fun(_dense_cuda_impl, multiple_results=True)
_sparsek_cuda_lowering = mlir.lower_fun(_sparsek_cuda_impl, multiple_results=True)


def _cuda_lowering(ctx, *operands, config: AttentionConfig):
    # Same choice as the forward's lowering (_primitive.py), which has warned where needed.
    if (config.implementation == "xla"
            or not cuda_kernel_available(config, ctx.avals_in[1].shape[1])
            or not _extension.cuda_kernels_built()):
        return _reference_lowering(ctx, *operands, config=config)
    _extension.ensure_cuda_targets()
    if config.sparsek:
        return _sparsek_cuda_lowering(ctx, *operands, config=config)
    return _dense_cuda_lowering(ctx, *operands, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _eager_impl(*operands, config: AttentionConfig):
    # Eager calls compile the primitive like jit does, so they take the same lowering path.
    return attention_bwd_p.bind(*operands, config=config)


attention_bwd_p.def_impl(_eager_impl)
attention_bwd_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[attention_bwd_p] = fold_into_batch(attention_bwd_p)
_Q, _K, _R, _U = _sharding.QUERY, _sharding.KEY, _sharding.ROWS, _sharding.SCORES
_T = _sharding.THRESHOLDS
_sharding.register_lowering(
    attention_bwd_p, attention_bwd_shard_p,
    {False: (_Q, _K, _K, _Q, _R, _Q, _R), True: (_Q, _K, _K, _U, _T, _Q, _R, _Q, _R)},
    {False: (_Q, _K, _K), True: (_Q, _K, _K, _U)})
attention_bwd_shard_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(attention_bwd_shard_p, _default_lowering)
mlir.register_lowering(attention_bwd_shard_p, _cuda_lowering, platform="cuda")
