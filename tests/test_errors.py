"""Every argument error of sparsek_attention: raised in Python, at trace time, naming the
argument; the same errors under jax.jit."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BUILD_INFO, CUDA_AVAILABLE
from jax_sparsek import sparsek_attention, sparsek_gates

B, T, S, HQ, HKV, D = 2, 5, 7, 4, 2, 16


def _arr(shape, dtype=jnp.float16, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def _qkv(q_shape=(B, T, HQ, D), k_shape=(B, S, HKV, D), v_shape=None, dtype=jnp.float16):
    v_shape = k_shape if v_shape is None else v_shape
    return _arr(q_shape, dtype, 1), _arr(k_shape, dtype, 2), _arr(v_shape, dtype, 3)


def _raises_eager_and_jit(exc, match, q, k, v, **kwargs):
    """The error is raised by a direct call and while tracing under jax.jit."""
    with pytest.raises(exc, match=match):
        sparsek_attention(q, k, v, **kwargs)
    fn = jax.jit(functools.partial(sparsek_attention, **kwargs))
    with pytest.raises(exc, match=match):
        fn(q, k, v)


# ------------------------------------------------------------------------------------------
# Arrays: type, rank, dtype, shapes


@pytest.mark.parametrize("position", ["query", "key", "value"])
@pytest.mark.parametrize("bad", [None, 3.0, [[1.0]], "q"], ids=["None", "float", "list", "str"])
def test_non_array(position, bad):
    q, k, v = _qkv()
    args = dict(query=q, key=k, value=v)
    args[position] = bad
    with pytest.raises(TypeError, match=rf"{position} must be an array"):
        sparsek_attention(args["query"], args["key"], args["value"])

    def traced(q, k, v):  # the bad argument is a Python constant inside the traced function
        a = dict(query=q, key=k, value=v)
        a[position] = bad
        return sparsek_attention(a["query"], a["key"], a["value"])

    with pytest.raises(TypeError, match=rf"{position} must be an array"):
        jax.jit(traced)(q, k, v)


@pytest.mark.parametrize("position", ["query", "key", "value"])
@pytest.mark.parametrize("shape", [(B, T, D), (T, HQ, D), (B, T, HQ, D, 1), (D,)],
                         ids=["rank3", "rank3b", "rank5", "rank1"])
def test_wrong_rank(position, shape):
    q, k, v = _qkv()
    args = dict(query=q, key=k, value=v)
    args[position] = _arr(shape)
    _raises_eager_and_jit(ValueError, rf"{position} must have rank 4", args["query"],
                          args["key"], args["value"])


def test_scalar_array_rank():
    q, k, v = _qkv()
    _raises_eager_and_jit(ValueError, "query must have rank 4", jnp.float16(1.0), k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.int32, jnp.int8, jnp.bool_,
                                   jnp.float8_e4m3fn],
                         ids=lambda d: jnp.dtype(d).name)
def test_unsupported_dtype(dtype):
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        q, k, v = (np.ones(s, np.float64) for s in ((B, T, HQ, D), (B, S, HKV, D),
                                                    (B, S, HKV, D)))
        with pytest.raises(TypeError, match="query must be float16 or bfloat16"):
            sparsek_attention(q, k, v)
        return
    q, k, v = (jnp.ones(s, dtype) for s in ((B, T, HQ, D), (B, S, HKV, D), (B, S, HKV, D)))
    _raises_eager_and_jit(TypeError, "query must be float16 or bfloat16", q, k, v)


@pytest.mark.parametrize("position", ["key", "value"])
@pytest.mark.parametrize("q_dtype,other", [(jnp.float16, jnp.bfloat16),
                                           (jnp.bfloat16, jnp.float16),
                                           (jnp.float16, jnp.float32)],
                         ids=["f16-bf16", "bf16-f16", "f16-f32"])
def test_dtype_mismatch(position, q_dtype, other):
    q, k, v = _qkv(dtype=q_dtype)
    args = dict(query=q, key=k, value=v)
    args[position] = args[position].astype(other)
    _raises_eager_and_jit(TypeError, rf"{position} dtype \w+ does not match query dtype",
                          args["query"], args["key"], args["value"])


@pytest.mark.parametrize("head_dim", [4, 12, 20, 130, 264, 512], ids=lambda d: f"D{d}")
def test_bad_head_dim(head_dim):
    q, k, v = _qkv((1, 3, 2, head_dim), (1, 3, 2, head_dim))
    _raises_eager_and_jit(ValueError, rf"head_dim .*multiple of 8 between 8 and 256, got "
                          rf"{head_dim}", q, k, v)


@pytest.mark.parametrize("head_dim", [8, 256])
def test_head_dim_bounds_accepted(head_dim):
    q, k, v = _qkv((1, 3, 2, head_dim), (1, 3, 2, head_dim))
    out = sparsek_attention(q, k, v, implementation="xla")
    assert out.shape == q.shape


@pytest.mark.parametrize("position", ["key", "value"])
def test_batch_mismatch(position):
    q, k, v = _qkv()
    args = dict(query=q, key=k, value=v)
    if position == "key":  # key and value both differ from query
        args["key"], args["value"] = _arr((B + 1, S, HKV, D)), _arr((B + 1, S, HKV, D))
        match = "batch sizes differ"
    else:
        args["value"] = _arr((B + 1, S, HKV, D))
        match = "batch sizes differ"
    _raises_eager_and_jit(ValueError, match, args["query"], args["key"], args["value"])


@pytest.mark.parametrize("position", ["key", "value", "both"])
def test_head_dim_mismatch(position):
    q, k, v = _qkv()
    if position in ("key", "both"):
        k = _arr((B, S, HKV, 2 * D))
    if position in ("value", "both"):
        v = _arr((B, S, HKV, 2 * D))
    _raises_eager_and_jit(ValueError, "head_dim differs", q, k, v)


@pytest.mark.parametrize("v_shape", [(B, S + 1, HKV, D), (B, S, HKV + 2, D)],
                         ids=["seq_len", "num_heads"])
def test_value_key_mismatch(v_shape):
    q, k, v = _qkv(v_shape=v_shape)
    _raises_eager_and_jit(ValueError, r"value shape .* must match key shape", q, k, v)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 3), (3, 2), (2, 4), (6, 4)])
def test_heads_not_divisible(q_heads, kv_heads):
    q, k, v = _qkv((B, T, q_heads, D), (B, S, kv_heads, D))
    _raises_eager_and_jit(ValueError, rf"query num_heads \({q_heads}\) must be a multiple of "
                          rf"key/value num_heads \({kv_heads}\)", q, k, v)


@pytest.mark.parametrize("q_shape,k_shape", [
    ((0, T, HQ, D), (0, S, HKV, D)), ((B, 0, HQ, D), (B, S, HKV, D)),
    ((B, T, HQ, D), (B, 0, HKV, D)), ((B, T, 0, D), (B, S, HKV, D)),
    ((B, T, HQ, D), (B, S, 0, D))], ids=["B0", "T0", "S0", "Hq0", "Hkv0"])
def test_empty_axis(q_shape, k_shape):
    q, k, v = _qkv(q_shape, k_shape)
    _raises_eager_and_jit(ValueError, "must have no empty axis", q, k, v)


# ------------------------------------------------------------------------------------------
# Keyword arguments


@pytest.mark.parametrize("window", [0, -1, -100])
def test_window_not_positive(window):
    q, k, v = _qkv()
    _raises_eager_and_jit(ValueError, rf"window must be a positive number of keys, got "
                          rf"{window}", q, k, v, is_causal=True, window=window)


@pytest.mark.parametrize("window", [2.0, 2.5, "3", True, np.bool_(True), [2]],
                         ids=["float", "float2", "str", "bool", "np_bool", "list"])
def test_window_wrong_type(window):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="window must be an int or None"):
        sparsek_attention(q, k, v, is_causal=True, window=window)
    if isinstance(window, list):
        return  # unhashable: cannot be a jit static argument, the closure test below covers it
    fn = jax.jit(lambda q, k, v: sparsek_attention(q, k, v, is_causal=True, window=window))
    with pytest.raises(TypeError, match="window must be an int or None"):
        fn(q, k, v)


def test_window_numpy_int_accepted():
    q, k, v = _qkv()
    a = sparsek_attention(q, k, v, is_causal=True, window=np.int64(3), implementation="xla")
    b = sparsek_attention(q, k, v, is_causal=True, window=3, implementation="xla")
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_window_traced():
    q, k, v = _qkv()
    fn = jax.jit(lambda q, k, v, w: sparsek_attention(q, k, v, is_causal=True, window=w))
    with pytest.raises(TypeError, match="window must be an int or None"):
        fn(q, k, v, 3)


@pytest.mark.parametrize("window", [1, 4, 100])
def test_window_without_causal(window):
    q, k, v = _qkv()
    _raises_eager_and_jit(ValueError, "window .*is_causal=True", q, k, v, window=window)
    _raises_eager_and_jit(ValueError, "window .*is_causal=True", q, k, v, window=window,
                          is_causal=False)


@pytest.mark.parametrize("is_causal", [1, 0, "yes", None, 1.0], ids=repr)
def test_is_causal_not_bool(is_causal):
    q, k, v = _qkv()
    _raises_eager_and_jit(TypeError, "is_causal must be a bool", q, k, v, is_causal=is_causal)


def test_is_causal_traced():
    q, k, v = _qkv()
    fn = jax.jit(lambda q, k, v, c: sparsek_attention(q, k, v, is_causal=c))
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        fn(q, k, v, True)


def test_is_causal_numpy_bool_accepted():
    q, k, v = _qkv()
    a = sparsek_attention(q, k, v, is_causal=np.bool_(True), implementation="xla")
    b = sparsek_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, np.float32(np.inf),
                                   np.float64(np.nan)],
                         ids=["inf", "-inf", "nan", "np_inf", "np_nan"])
def test_scale_not_finite(scale):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale must be finite"):
        sparsek_attention(q, k, v, scale=scale)
    fn = jax.jit(lambda q, k, v: sparsek_attention(q, k, v, scale=scale))
    with pytest.raises(ValueError, match="scale must be finite"):
        fn(q, k, v)


@pytest.mark.parametrize("scale", [[0.1], object()], ids=["list", "object"])
def test_scale_wrong_type(scale):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="scale must be a Python float or None"):
        sparsek_attention(q, k, v, scale=scale)


def test_scale_traced():
    """A traced scale cannot become a static kernel parameter: TypeError naming scale."""
    q, k, v = _qkv()
    fn = jax.jit(lambda q, k, v, s: sparsek_attention(q, k, v, scale=s))
    with pytest.raises(TypeError, match="scale"):
        fn(q, k, v, 0.5)


@pytest.mark.parametrize("scale", [0.5, 2, np.float32(0.25), np.float16(0.125)],
                         ids=["float", "int", "np_f32", "np_f16"])
def test_scale_numbers_accepted(scale):
    q, k, v = _qkv()
    a = sparsek_attention(q, k, v, scale=scale, implementation="xla")
    b = sparsek_attention(q, k, v, scale=float(scale), implementation="xla")
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("implementation", ["CUDA", "triton", "cudnn", "", "Xla", 0],
                         ids=repr)
def test_unknown_implementation(implementation):
    q, k, v = _qkv()
    _raises_eager_and_jit(ValueError, "implementation must be one of None, 'cuda' or 'xla'",
                          q, k, v, implementation=implementation)


# ------------------------------------------------------------------------------------------
# SparseK mode: scores [B, S, Hkv] (floating), topk >= 1, window >= 0, is_causal=True


def _scores(shape=(B, S, HKV), dtype=jnp.float32):
    return _arr(shape, dtype, 4)


def _raises_sparsek(exc, match, scores, **kwargs):
    """The error is raised by a direct call and under jax.jit: an array scores is a traced
    argument, anything else a Python constant inside the traced function."""
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        sparsek_attention(q, k, v, scores, **kwargs)
    if hasattr(scores, "shape") and hasattr(scores, "dtype"):
        fn = jax.jit(lambda q, k, v, u: sparsek_attention(q, k, v, u, **kwargs))
        with pytest.raises(exc, match=match):
            fn(q, k, v, scores)
    else:
        fn = jax.jit(lambda q, k, v: sparsek_attention(q, k, v, scores, **kwargs))
        with pytest.raises(exc, match=match):
            fn(q, k, v)


SPARSEK_OK = dict(topk=3, window=1, is_causal=True)


@pytest.mark.parametrize("shape", [(B, S + 1, HKV), (B, S, HKV + 1), (B + 1, S, HKV),
                                   (B, S, HQ), (B, HKV, S), (1, S, HKV)],
                         ids=["kv_len", "kv_heads", "batch", "q_heads", "transposed",
                              "batch1"])
def test_scores_wrong_shape(shape):
    _raises_sparsek(ValueError, r"scores must have shape \[batch, kv_len, kv_heads\] = "
                    rf"\({B}, {S}, {HKV}\)", _scores(shape), **SPARSEK_OK)


@pytest.mark.parametrize("shape", [(B, S), (B, S, HKV, 1), (S,), ()],
                         ids=["rank2", "rank4", "rank1", "rank0"])
def test_scores_wrong_rank(shape):
    _raises_sparsek(ValueError, r"scores must have shape \[batch, kv_len, kv_heads\]",
                    _scores(shape), **SPARSEK_OK)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_],
                         ids=lambda d: jnp.dtype(d).name)
def test_scores_not_floating(dtype):
    _raises_sparsek(TypeError, rf"scores must be a floating-point array, got "
                    rf"{jnp.dtype(dtype).name}", jnp.ones((B, S, HKV), dtype), **SPARSEK_OK)


@pytest.mark.parametrize("scores", ["s", 3.0, [[[1.0]]], object()],
                         ids=["str", "float", "list", "object"])
def test_scores_not_an_array(scores):
    _raises_sparsek(TypeError, "scores must be an array", scores, **SPARSEK_OK)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16, np.float64],
                         ids=lambda d: np.dtype(d).name)
def test_scores_float_dtypes_accepted(dtype):
    q, k, v = _qkv()
    u = np.asarray(_scores()).astype(dtype) if dtype == np.float64 else _scores(dtype=dtype)
    out = sparsek_attention(q, k, v, u, implementation="xla", **SPARSEK_OK)
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize("kwargs", [dict(), dict(window=2, is_causal=True),
                                    dict(is_causal=True)], ids=["plain", "window", "causal"])
def test_scores_without_topk(kwargs):
    _raises_sparsek(ValueError, "scores selects the SparseK mode, which needs topk", _scores(),
                    **kwargs)


@pytest.mark.parametrize("kwargs", [dict(topk=4), dict(topk=4, is_causal=True),
                                    dict(topk=4, window=2, is_causal=True)],
                         ids=["plain", "causal", "window"])
def test_topk_without_scores(kwargs):
    q, k, v = _qkv()
    _raises_eager_and_jit(ValueError, "topk selects the SparseK mode, which needs scores",
                          q, k, v, **kwargs)


@pytest.mark.parametrize("topk", [0, -1, -100, np.int32(0)], ids=repr)
def test_topk_not_positive(topk):
    _raises_sparsek(ValueError, rf"topk must be >= 1, got {int(topk)}", _scores(),
                    topk=topk, is_causal=True)


@pytest.mark.parametrize("topk", [2.0, 2.5, "3", True, np.bool_(True), np.float32(2)],
                         ids=["float", "float2", "str", "bool", "np_bool", "np_float"])
def test_topk_wrong_type(topk):
    _raises_sparsek(TypeError, "topk must be an int", _scores(), topk=topk, is_causal=True)


def test_topk_traced():
    q, k, v = _qkv()
    fn = jax.jit(lambda q, k, v, u, t: sparsek_attention(q, k, v, u, topk=t, is_causal=True))
    with pytest.raises(TypeError, match="topk must be an int"):
        fn(q, k, v, _scores(), 3)


def test_topk_numpy_int_and_large_accepted():
    """np.int64 topk is an int; topk >= S is clamped to S (every key selected)."""
    q, k, v = _qkv()
    u = _scores()
    kw = dict(is_causal=True, implementation="xla", window=1)
    a = sparsek_attention(q, k, v, u, topk=np.int64(3), **kw)
    b = sparsek_attention(q, k, v, u, topk=3, **kw)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    a = sparsek_attention(q, k, v, u, topk=S, **kw)
    b = sparsek_attention(q, k, v, u, topk=10 * S, **kw)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("window", [-1, -100])
def test_sparsek_window_negative(window):
    _raises_sparsek(ValueError, rf"window must be >= 0 in the SparseK mode, got {window}",
                    _scores(), topk=3, window=window, is_causal=True)


@pytest.mark.parametrize("window", [2.0, 2.5, "3", True, np.bool_(False)],
                         ids=["float", "float2", "str", "bool", "np_bool"])
def test_sparsek_window_wrong_type(window):
    _raises_sparsek(TypeError, "window must be an int or None", _scores(), topk=3,
                    window=window, is_causal=True)


def test_sparsek_window_zero_and_none_accepted():
    """window=0 is valid in the SparseK mode (no window keys) and None means 0."""
    q, k, v = _qkv()
    u = _scores()
    kw = dict(topk=2, is_causal=True, implementation="xla")
    a = sparsek_attention(q, k, v, u, window=0, **kw)
    b = sparsek_attention(q, k, v, u, window=None, **kw)
    c = sparsek_attention(q, k, v, u, **kw)
    for x in (b, c):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(x, np.float32))


@pytest.mark.parametrize("kwargs", [dict(topk=3), dict(topk=3, is_causal=False),
                                    dict(topk=3, window=2, is_causal=False)],
                         ids=["default", "explicit", "window"])
def test_sparsek_not_causal(kwargs):
    _raises_sparsek(ValueError, r"SparseK mode .*is causal: pass is_causal=True", _scores(),
                    **kwargs)


def test_sparsek_cuda_key_length_limit():
    """implementation='cuda' in the SparseK mode takes at most 2^20 keys (the kernels keep a
    plan row of S / 128 entries in shared memory); checked on shapes alone, at trace time."""
    import jax
    q = jax.ShapeDtypeStruct((1, 4, 2, 64), jnp.float16)
    kv = jax.ShapeDtypeStruct((1, 2**20 + 1, 1, 64), jnp.float16)
    u = jax.ShapeDtypeStruct((1, 2**20 + 1, 1), jnp.float32)
    f = functools.partial(sparsek_attention, topk=4, is_causal=True, implementation="cuda")
    with pytest.raises(ValueError, match=r"at most 1048576 keys, got key length 1048577"):
        jax.eval_shape(f, q, kv, kv, u)


def test_sparsek_argument_errors_come_before_implementation():
    _raises_sparsek(ValueError, "topk must be >= 1", _scores(), topk=0, is_causal=True,
                    implementation="cuda")
    _raises_sparsek(ValueError, "implementation must be one of", _scores(),
                    implementation="triton", **SPARSEK_OK)


# sparsek_gates(scores, *, topk, window=0, num_queries=None)


@pytest.mark.parametrize("scores", [np.zeros((B, S)), np.zeros((B, S, HKV, 1))],
                         ids=["rank2", "rank4"])
def test_gates_scores_rank(scores):
    with pytest.raises(ValueError, match="scores must have rank 3"):
        sparsek_gates(scores, topk=2)


@pytest.mark.parametrize("scores", ["s", [[[1.0]]], np.zeros((B, S, HKV), np.int32)],
                         ids=["str", "list", "int32"])
def test_gates_scores_not_a_float_array(scores):
    with pytest.raises(TypeError, match="scores must be a"):
        sparsek_gates(scores, topk=2)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(topk=0), ValueError, "topk must be >= 1, got 0"),
    (dict(topk=-2), ValueError, "topk must be >= 1, got -2"),
    (dict(topk=2.0), TypeError, "topk must be an int"),
    (dict(topk=True), TypeError, "topk must be an int"),
    (dict(topk=None), TypeError, "topk must be an int"),
    (dict(topk=2, window=-1), ValueError, "window must be >= 0, got -1"),
    (dict(topk=2, window=1.0), TypeError, "window must be an int"),
    (dict(topk=2, window=False), TypeError, "window must be an int"),
    (dict(topk=2, num_queries=0), ValueError, "num_queries must be >= 1, got 0"),
    (dict(topk=2, num_queries=3.0), TypeError, "num_queries must be an int"),
], ids=["topk0", "topk_neg", "topk_float", "topk_bool", "topk_none", "window_neg",
        "window_float", "window_bool", "num_queries0", "num_queries_float"])
def test_gates_argument_errors(kwargs, exc, match):
    u = _scores()
    with pytest.raises(exc, match=match):
        sparsek_gates(u, **kwargs)
    with pytest.raises(exc, match=match):
        jax.jit(lambda u: sparsek_gates(u, **kwargs))(u)


def test_gates_topk_required():
    with pytest.raises(TypeError, match="topk"):
        sparsek_gates(_scores())  # keyword-only and required


def test_gates_traced_topk():
    with pytest.raises(TypeError, match="topk must be an int"):
        jax.jit(lambda u, t: sparsek_gates(u, topk=t))(_scores(), 2)


@pytest.mark.skipif(CUDA_AVAILABLE, reason="the CUDA kernels and a CUDA device are present")
def test_cuda_implementation_unavailable():
    """On a machine without the kernels or without a CUDA device, 'cuda' says what is missing."""
    q, k, v = _qkv()
    if not BUILD_INFO["cuda_kernels_built"]:
        match = "installed without its CUDA kernels"
    else:
        match = "needs a CUDA device visible to JAX"
    _raises_eager_and_jit(RuntimeError, match, q, k, v, implementation="cuda")
    _raises_eager_and_jit(RuntimeError, match, q, k, v, implementation="cuda", is_causal=True,
                          return_lse=True)
