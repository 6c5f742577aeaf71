"""JAX transformations of sparsek_attention on the reference path: jit, vmap (every in_axes
/ out_axes pattern, nested), eval_shape, make_jaxpr; eager vs jit."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPES, assert_attention_close, make_qkv, numpy_attention, rng_for
from jax_sparsek import sparsek_attention

IMPL = "xla"


def _f32(x):
    return np.asarray(x, np.float32)


def _assert_same(a, b):
    """Bitwise equality of (tuples of) arrays."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
        return
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_array_equal(_f32(a), _f32(b))


def _stacked(n, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype, seed=()):
    """n independent (q, k, v) triples stacked along a new leading axis."""
    triples = [make_qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype,
                        seed=seed + (i,)) for i in range(n)]
    return tuple(jnp.stack(xs) for xs in zip(*triples))


def _attn(**kwargs):
    return functools.partial(sparsek_attention, implementation=IMPL, return_lse=True, **kwargs)


# ------------------------------------------------------------------------------------------
# jit


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True),
                                    dict(is_causal=True, window=5), dict(scale=0.3)],
                         ids=["full", "causal", "window", "scale"])
def test_jit_equals_eager(dtype, kwargs):
    q, k, v = make_qkv(2, 13, 21, 4, 2, 32, dtype, seed=tuple(kwargs))
    f = _attn(**kwargs)
    eager = f(q, k, v)
    jitted = jax.jit(f)(q, k, v)
    _assert_same(eager, jitted)
    ref_o, ref_lse = numpy_attention(q, k, v, **kwargs)
    assert_attention_close(*jitted, ref_o, ref_lse, dtype)


def test_jit_static_argnames():
    q, k, v = make_qkv(1, 9, 9, 2, 1, 16, jnp.float16)
    f = jax.jit(sparsek_attention,
                static_argnames=("is_causal", "window", "scale", "implementation",
                                 "return_lse"))
    for kwargs in (dict(is_causal=True), dict(is_causal=True, window=2), dict()):
        got = f(q, k, v, implementation=IMPL, return_lse=True, **kwargs)
        _assert_same(got, _attn(**kwargs)(q, k, v))


def test_jit_inside_larger_computation():
    q, k, v = make_qkv(1, 11, 11, 2, 2, 16, jnp.bfloat16)

    @jax.jit
    def g(q, k, v):
        out, lse = sparsek_attention(q * 2, k, v + 1, is_causal=True, implementation=IMPL,
                                     return_lse=True)
        return out.astype(jnp.float32).sum(), lse

    total, lse = g(q, k, v)
    out_ref, lse_ref = _attn(is_causal=True)(q * 2, k, v + 1)
    # XLA may skip the bf16 rounding of `out` before the float32 sum (excess precision).
    np.testing.assert_allclose(float(total), float(_f32(out_ref).sum()), rtol=5e-3)
    np.testing.assert_allclose(_f32(lse), _f32(lse_ref), rtol=1e-5)


def test_jaxpr_binds_primitive():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, jnp.float16)
    jaxpr = jax.make_jaxpr(_attn(is_causal=True))(q, k, v)

    def primitive_names(jaxpr):
        """Primitive names, descending into sub-jaxprs (the custom_vjp call's body)."""
        names = []
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    names.extend(primitive_names(inner))
        return names

    names = primitive_names(jaxpr.jaxpr)
    # One forward primitive, wrapped in the custom VJP that gives it gradients.
    assert names.count("sparsek_attention_fwd") == 1, names
    assert any("custom_vjp" in n for n in names), names


def test_sparsek_grad_passes_forward_tau():
    """The SparseK gradient program binds the forward primitive once and hands its tau (the
    third result) to the backward primitive as its fifth operand: the CUDA backward reads the
    forward's thresholds instead of solving them again (_autodiff.py)."""
    q, k, v = make_qkv(1, 12, 12, 2, 1, 8, jnp.float16)
    u = jnp.asarray(rng_for("grad-tau-scores").standard_normal((1, 12, 1)).astype(np.float32))
    loss = lambda q, u: sparsek_attention(q, k, v, u, topk=3, window=2,  # noqa: E731
                                          is_causal=True).astype(jnp.float32).sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, u).jaxpr

    def equations(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)

    eqns = list(equations(jaxpr))
    fwd = [e for e in eqns if e.primitive.name == "sparsek_attention_fwd"]
    bwd = [e for e in eqns if e.primitive.name == "sparsek_attention_bwd"]
    assert len(fwd) == 1 and len(bwd) == 1, [e.primitive.name for e in eqns]
    tau = fwd[0].outvars[2]
    assert tau.aval.shape == (1, 1, 12), tau.aval
    assert bwd[0].invars[4] is tau, (bwd[0].invars, fwd[0].outvars)


# ------------------------------------------------------------------------------------------
# vmap


def _per_slice(f, q, k, v, q_axis=0, k_axis=0, v_axis=0, n=None):
    """Applies f slice by slice along the given axes (None: unmapped) and stacks on axis 0."""
    n = n or next(x.shape[a] for x, a in ((q, q_axis), (k, k_axis), (v, v_axis))
                  if a is not None)
    take = lambda x, a, i: x if a is None else jnp.take(x, i, axis=a)  # noqa: E731
    outs = [f(take(q, q_axis, i), take(k, k_axis, i), take(v, v_axis, i)) for i in range(n)]
    return tuple(jnp.stack(xs) for xs in zip(*outs))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True),
                                    dict(is_causal=True, window=3)],
                         ids=["full", "causal", "window"])
def test_vmap_all_mapped(dtype, kwargs):
    q, k, v = _stacked(3, 2, 9, 12, 4, 2, 16, dtype, seed=tuple(kwargs))
    f = _attn(**kwargs)
    got = jax.vmap(f)(q, k, v)
    assert got[0].shape == q.shape and got[1].shape == (3, 2, 4, 9)
    _assert_same(got, _per_slice(f, q, k, v))
    for i in range(3):
        ref_o, ref_lse = numpy_attention(q[i], k[i], v[i], **kwargs)
        assert_attention_close(got[0][i], got[1][i], ref_o, ref_lse, dtype)


@pytest.mark.parametrize("in_axes", [(0, None, None), (None, 0, 0), (None, 0, None),
                                     (None, None, 0), (0, 0, None)], ids=str)
def test_vmap_some_operands_mapped(in_axes):
    n, b, t, s, hq, hkv, d = 3, 2, 7, 10, 4, 1, 16
    dtype = jnp.float16
    mapped = _stacked(n, b, t, s, hq, hkv, d, dtype, seed=in_axes)
    single = make_qkv(b, t, s, hq, hkv, d, dtype, seed=("single",) + in_axes)
    args = [m if a == 0 else x for m, x, a in zip(mapped, single, in_axes)]
    f = _attn(is_causal=True)
    got = jax.vmap(f, in_axes=in_axes)(*args)
    assert got[0].shape == (n, b, t, hq, d) and got[1].shape == (n, b, hq, t)
    _assert_same(got, _per_slice(f, *args, *in_axes))
    for i in range(n):
        qi, ki, vi = (x[i] if a == 0 else x for x, a in zip(args, in_axes))
        ref_o, ref_lse = numpy_attention(qi, ki, vi, is_causal=True)
        assert_attention_close(got[0][i], got[1][i], ref_o, ref_lse, dtype)


@pytest.mark.parametrize("q_axis,kv_axis", [(1, 1), (4, 2), (2, 4), (-1, 0), (3, None)],
                         ids=str)
@pytest.mark.parametrize("out_axes", [0, 1, (2, 3), (-1, 0)], ids=str)
def test_vmap_in_axes_out_axes(q_axis, kv_axis, out_axes):
    n, b, t, s, hq, hkv, d = 3, 2, 5, 6, 2, 2, 8
    dtype = jnp.bfloat16
    q0, k0, v0 = _stacked(n, b, t, s, hq, hkv, d, dtype, seed=(q_axis, kv_axis))
    q = jnp.moveaxis(q0, 0, q_axis)
    if kv_axis is None:
        k, v = k0[0], v0[0]
    else:
        k, v = jnp.moveaxis(k0, 0, kv_axis), jnp.moveaxis(v0, 0, kv_axis)
    f = _attn(is_causal=True, window=3)
    got = jax.vmap(f, in_axes=(q_axis, kv_axis, kv_axis), out_axes=out_axes)(q, k, v)
    expect = _per_slice(f, q, k, v, q_axis, kv_axis, kv_axis)
    o_axis, l_axis = out_axes if isinstance(out_axes, tuple) else (out_axes, out_axes)
    _assert_same((jnp.moveaxis(got[0], o_axis, 0), jnp.moveaxis(got[1], l_axis, 0)), expect)


def test_vmap_nested():
    n1, n2, b, t, s, hq, hkv, d = 2, 3, 1, 6, 9, 4, 2, 16
    dtype = jnp.float16
    q, k, v = _stacked(n1 * n2, b, t, s, hq, hkv, d, dtype, seed=("nested",))
    q, k, v = (x.reshape((n1, n2) + x.shape[1:]) for x in (q, k, v))
    f = _attn(is_causal=True)
    got = jax.vmap(jax.vmap(f))(q, k, v)
    assert got[0].shape == (n1, n2, b, t, hq, d) and got[1].shape == (n1, n2, b, hq, t)
    # Inner axis mapped for query only, outer for all: k, v broadcast along the inner axis.
    got_mixed = jax.vmap(jax.vmap(f, in_axes=(0, None, None)), in_axes=(0, 0, 0))(
        q, k[:, 0], v[:, 0])
    for i in range(n1):
        for j in range(n2):
            _assert_same((got[0][i, j], got[1][i, j]), f(q[i, j], k[i, j], v[i, j]))
            _assert_same((got_mixed[0][i, j], got_mixed[1][i, j]),
                         f(q[i, j], k[i, 0], v[i, 0]))
            ref_o, ref_lse = numpy_attention(q[i, j], k[i, j], v[i, j], is_causal=True)
            assert_attention_close(got[0][i, j], got[1][i, j], ref_o, ref_lse, dtype)


def test_vmap_under_jit_and_without_lse():
    q, k, v = _stacked(4, 1, 8, 8, 2, 1, 32, jnp.bfloat16, seed=("jit-vmap",))
    f = functools.partial(sparsek_attention, is_causal=True, implementation=IMPL)
    got = jax.jit(jax.vmap(f))(q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype
    _assert_same(got, jnp.stack([f(q[i], k[i], v[i]) for i in range(4)]))


def test_vmap_size_one_axis():
    q, k, v = _stacked(1, 2, 5, 5, 2, 2, 8, jnp.float16, seed=("size1",))
    f = _attn()
    _assert_same(jax.vmap(f)(q, k, v), _per_slice(f, q, k, v))


# ------------------------------------------------------------------------------------------
# eval_shape


EVAL_SHAPE_CONFIGS = [
    # (B, T, S, Hq, Hkv, D, dtype, kwargs)
    (1, 1, 1, 1, 1, 8, jnp.float16, dict()),
    (2, 17, 33, 4, 4, 64, jnp.bfloat16, dict(is_causal=True)),
    (3, 100, 17, 8, 1, 128, jnp.float16, dict(is_causal=True, window=7)),
    (1, 1, 4099, 32, 8, 256, jnp.bfloat16, dict(is_causal=True)),
    (4, 4099, 1000, 16, 2, 80, jnp.float16, dict(scale=0.1)),
]


@pytest.mark.parametrize("b,t,s,hq,hkv,d,dtype,kwargs", EVAL_SHAPE_CONFIGS)
@pytest.mark.parametrize("implementation", [None, "xla"])
def test_eval_shape(b, t, s, hq, hkv, d, dtype, kwargs, implementation):
    q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
    kv = jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
    f = functools.partial(sparsek_attention, implementation=implementation, **kwargs)
    out, lse = jax.eval_shape(functools.partial(f, return_lse=True), q, kv, kv)
    assert out.shape == (b, t, hq, d) and out.dtype == jnp.dtype(dtype)
    assert lse.shape == (b, hq, t) and lse.dtype == jnp.float32
    out_only = jax.eval_shape(f, q, kv, kv)
    assert out_only.shape == (b, t, hq, d) and out_only.dtype == jnp.dtype(dtype)


def test_eval_shape_vmap():
    q = jax.ShapeDtypeStruct((5, 2, 9, 8, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 30, 2, 64), jnp.bfloat16)
    out, lse = jax.eval_shape(jax.vmap(_attn(is_causal=True), in_axes=(0, None, None)),
                              q, kv, kv)
    assert out.shape == (5, 2, 9, 8, 64) and out.dtype == jnp.bfloat16
    assert lse.shape == (5, 2, 8, 9) and lse.dtype == jnp.float32


def test_eval_shape_raises_validation_errors():
    q = jax.ShapeDtypeStruct((1, 4, 3, 64), jnp.float16)
    kv = jax.ShapeDtypeStruct((1, 4, 2, 64), jnp.float16)
    with pytest.raises(ValueError, match="multiple of key/value num_heads"):
        jax.eval_shape(sparsek_attention, q, kv, kv)


def test_fresh_inputs_differ_per_parameters():
    """The seeding helper gives different data for different parameters (sanity)."""
    a = rng_for(1, "x").standard_normal(4)
    b = rng_for(2, "x").standard_normal(4)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, rng_for(1, "x").standard_normal(4))
