"""Sharding rules of the attention primitives (forward and backward, dense and SparseK).

Attention is independent across the batch and across kv-head groups, so under ``jit`` with
sharded operands each device runs the kernel on its own batch rows and heads, with no
communication. The sequences and the head dim stay whole on every device: attention over a
sharded sequence would need a ring exchange of K and V, so operands sharded along them are
gathered first. Heads are split by kv head: query heads ``h * G .. h * G + G - 1`` (G = Nq /
Nkv) stay with kv head ``h``; a head sharding that does not divide Nkv is dropped (the heads
are gathered).

Each primitive lowers through ``jax.experimental.custom_partitioning``: the sharding rule
(Shardy) names the factors of every operand and result (the sequences and the head dim
never split), and the partition callback picks the batch and head shardings and binds the
per-device primitive, whose lowerings are the CUDA kernels or the reference. A single device
and the body of a ``shard_map`` lower the per-device primitive directly.
"""
from __future__ import annotations

import functools
import math

from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

# Factor names of each array kind: b batch, t query rows, s keys, h query heads, k kv heads,
# d head dim. h and k are separate factors (a compound "(k g)" let Shardy split a mesh axis
# into sub-axes when k was too small for it, which the partition callback cannot take); the
# partition callback keeps them consistent.
QUERY = "b t h d"     # query, out, d_out, dq
KEY = "b s k d"       # key, value, dk, dv
ROWS = "b h t"        # lse, d_lse
SCORES = "b s k"      # scores, du
THRESHOLDS = "b k t"  # tau

# Where the batch (B) and head (H) mesh axes go in each kind.
_SPECS = {
    QUERY: lambda b, h: PartitionSpec(b, None, h, None),
    KEY: lambda b, h: PartitionSpec(b, None, h, None),
    ROWS: lambda b, h: PartitionSpec(b, h, None),
    SCORES: lambda b, h: PartitionSpec(b, None, h),
    THRESHOLDS: lambda b, h: PartitionSpec(b, h, None),
}

# Factors that are never split across devices.
_REPLICATED = ("t", "s", "d")


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _batch_and_head_axes(mesh, query_shape, kv_heads: int):
    """The mesh axes of the query's batch and head dims, or None for a dim left whole."""
    sharding = query_shape.sharding
    if not isinstance(sharding, NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    batch_axes, head_axes = spec[0], spec[2]
    if query_shape.shape[0] % _axes_size(mesh, batch_axes) != 0:
        batch_axes = None
    if kv_heads % _axes_size(mesh, head_axes) != 0:
        head_axes = None
    return batch_axes, head_axes


def _rule(operands, results) -> str:
    """The Shardy rule of a call with these operand and result kinds."""
    return ", ".join(operands) + " -> " + ", ".join(results)


def _replicated_factors(rule: str) -> tuple[str, ...]:
    # In the order the factors first appear in the rule (the verifier wants them sorted).
    names = [c for c in rule if c.isalpha()]
    return tuple(sorted((f for f in _REPLICATED if f in names), key=names.index))


def _binder(local_primitive):
    def bind(*arrays, config):
        return tuple(local_primitive.bind(*arrays, config=config))

    return bind


def partitioned(local_primitive, operands: tuple[str, ...], results: tuple[str, ...]):
    """A function (config, *arrays) -> results that binds `local_primitive` on each device's
    shard of the batch and kv-head groups. `operands` and `results` name the kind of each
    array (QUERY, KEY, ...); operand 0 is the query and operand 1 the key."""
    bind = _binder(local_primitive)

    @functools.partial(custom_partitioning, static_argnums=(0,))
    def call(config, *arrays):
        return bind(*arrays, config=config)

    def shardings(mesh, arg_shapes):
        batch_axes, head_axes = _batch_and_head_axes(mesh, arg_shapes[0],
                                                     arg_shapes[1].shape[2])
        return ([NamedSharding(mesh, _SPECS[kind](batch_axes, head_axes)) for kind in operands],
                [NamedSharding(mesh, _SPECS[kind](batch_axes, head_axes)) for kind in results])

    def infer_sharding_from_operands(config, mesh, arg_shapes, result_shape):
        return tuple(shardings(mesh, arg_shapes)[1])

    def partition(config, mesh, arg_shapes, result_shape):
        arg_shardings, result_shardings = shardings(mesh, arg_shapes)

        return (mesh, functools.partial(bind, config=config), tuple(result_shardings),
                tuple(arg_shardings))

    rule = _rule(operands, results)
    call.def_partition(partition=partition,
                       infer_sharding_from_operands=infer_sharding_from_operands,
                       sharding_rule=rule,
                       need_replication_factors=_replicated_factors(rule))
    return call


def register_lowering(primitive, local_primitive, operands_by_mode, results_by_mode):
    """Lowers `primitive` (every platform) to its per-device primitive `local_primitive` on
    every shard. `operands_by_mode` / `results_by_mode` map config.sparsek to the kinds of the
    operands and results (see partitioned)."""
    calls = {mode: partitioned(local_primitive, operands_by_mode[mode], results_by_mode[mode])
             for mode in operands_by_mode}
    local = _binder(local_primitive)

    def sharded(*arrays, config):
        return calls[config.sparsek](config, *arrays)

    def rule(ctx, *arrays, config):
        context = ctx.module_context.axis_context
        # One device, a shard_map body (no device assignment), or a JAX that does not take
        # the registration below: the per-device primitive is the whole computation (in the
        # last case XLA gathers sharded operands of the CUDA custom call, as for any custom
        # call).
        whole = (getattr(context, "num_devices", 1) == 1
                 or getattr(context, "device_assignment", None) is None)
        fn = local if whole else sharded
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *arrays, config=config)

    mlir.register_lowering(primitive, rule)
    # jit gives the lowering its devices only for the primitives registered here (JAX's own
    # cuDNN attention registers its custom-partitioned primitives the same way).
    try:
        from jax._src import dispatch
        dispatch.prim_requires_devices_during_lowering.add(primitive)
    except (ImportError, AttributeError):
        pass
