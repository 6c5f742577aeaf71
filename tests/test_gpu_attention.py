"""The CUDA kernels (implementation='cuda') against the float64 NumPy reference.

Skipped unless jax_sparsek was built with its CUDA kernels and JAX sees a CUDA device.
conftest.py sets JAX_SPARSEK_POISON_OUTPUTS=1 before jax_sparsek loads, so the launcher fills
o and lse with NaN before every run: "no NaN in the output" means every element was written.
"""
from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (DTYPES, assert_attention_close, make_qkv, numpy_attention,
                      numpy_sparsek_attention, rel_err, requires_cuda, rng_for, tolerance)
from jax_sparsek import _extension, sparsek_attention

pytestmark = requires_cuda

IMPL = "cuda"

MODES = {
    "full": (False, None),
    "causal": (True, None),
    "window1": (True, 1),
    "window37": (True, 37),
    "window_large": (True, "large"),
}


def _window(window, kv_len):
    return kv_len + 3 if window == "large" else window


def _dtype_id(d):
    return jnp.dtype(d).name


def _param_id(x):
    return _dtype_id(x) if isinstance(x, type) else str(x)


def _check(q, k, v, dtype, *, is_causal=False, window=None, scale=None, context=""):
    out, lse = sparsek_attention(q, k, v, is_causal=is_causal, window=window, scale=scale,
                                 implementation=IMPL, return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    b, t, hq, d = q.shape
    assert out.shape == (b, t, hq, d) and out.dtype == q.dtype
    assert lse.shape == (b, hq, t) and lse.dtype == jnp.float32
    assert not np.isnan(np.asarray(lse)).any(), f"{context}: NaN in lse"
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=is_causal, window=window, scale=scale)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype, context=context)
    return out, lse


def test_poisoning_enabled():
    assert os.environ.get("JAX_SPARSEK_POISON_OUTPUTS") == "1"


# T = S ragged, T = S = 1, T = 1 (decode), T < S (chunked prefill), T > S (empty causal rows).
CORE_SIZES = [(1, 1), (17, 17), (1, 1000), (77, 1000), (1000, 17), (1000, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("q_len,kv_len", CORE_SIZES)
def test_core_grid(dtype, head_dim, mode, q_len, kv_len):
    is_causal, window = MODES[mode]
    window = _window(window, kv_len)
    q, k, v = make_qkv(2, q_len, kv_len, 4, 2, head_dim, dtype, seed=(mode,))
    _check(q, k, v, dtype, is_causal=is_causal, window=window,
           context=f"{mode} D={head_dim} T={q_len} S={kv_len}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("head_dim", [8, 32, 80, 96, 160, 256])
@pytest.mark.parametrize("mode,q_len,kv_len", [
    ("full", 100, 300), ("causal", 300, 100), ("window37", 257, 257)])
def test_head_dims(dtype, head_dim, mode, q_len, kv_len):
    is_causal, window = MODES[mode]
    q, k, v = make_qkv(1, q_len, kv_len, 4, 4, head_dim, dtype, seed=(mode,))
    _check(q, k, v, dtype, is_causal=is_causal, window=window,
           context=f"{mode} D={head_dim} T={q_len} S={kv_len}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("q_heads,kv_heads", [(1, 1), (8, 8), (8, 2), (8, 1), (4, 1),
                                              (16, 4), (32, 4)])
@pytest.mark.parametrize("mode,q_len,kv_len", [
    ("full", 129, 333), ("causal", 333, 333), ("window37", 77, 333)])
def test_gqa(dtype, q_heads, kv_heads, mode, q_len, kv_len):
    is_causal, window = MODES[mode]
    q, k, v = make_qkv(2, q_len, kv_len, q_heads, kv_heads, 128, dtype, seed=(mode,))
    _check(q, k, v, dtype, is_causal=is_causal, window=window,
           context=f"Hq={q_heads} Hkv={kv_heads} {mode}")


@pytest.mark.parametrize("dtype,q_len,kv_len,is_causal,window", [
    (jnp.float16, 4099, 4099, False, None),
    (jnp.float16, 4099, 4099, True, None),
    (jnp.bfloat16, 4099, 4099, False, None),
    (jnp.bfloat16, 4099, 4099, True, None),
    (jnp.float16, 4099, 4099, True, 1500),
    (jnp.bfloat16, 1, 4099, True, None),
    (jnp.float16, 513, 4099, True, 1000),
    (jnp.bfloat16, 4099, 1000, True, None),
], ids=_param_id)
def test_long_sequences(dtype, q_len, kv_len, is_causal, window):
    q, k, v = make_qkv(1, q_len, kv_len, 4, 2, 128, dtype, seed=(is_causal, window))
    _check(q, k, v, dtype, is_causal=is_causal, window=window,
           context=f"T={q_len} S={kv_len} causal={is_causal} W={window}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("scale", [0.3, 1.0, -0.1])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_explicit_scale(dtype, scale, is_causal):
    """scale=1.0 with D=64 gives logits of std 8: checks the online softmax is stable."""
    q, k, v = make_qkv(2, 257, 300, 4, 1, 64, dtype, seed=(scale, is_causal))
    _check(q, k, v, dtype, is_causal=is_causal, scale=scale, context=f"scale={scale}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_large_magnitude_inputs(dtype):
    q, k, v = make_qkv(1, 200, 200, 2, 2, 128, dtype, std=4.0)
    _check(q, k, v, dtype, is_causal=True, context="std=4 inputs")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("q_len,kv_len,is_causal,window", [
    (17, 17, False, None), (300, 1000, True, None), (1000, 300, True, 50), (1, 777, True, 5)],
    ids=str)
def test_cuda_matches_xla(dtype, q_len, kv_len, is_causal, window):
    q, k, v = make_qkv(2, q_len, kv_len, 8, 2, 128, dtype, seed=("xla", is_causal, window))
    kwargs = dict(is_causal=is_causal, window=window, return_lse=True)
    out_c, lse_c = sparsek_attention(q, k, v, implementation="cuda", **kwargs)
    out_x, lse_x = sparsek_attention(q, k, v, implementation="xla", **kwargs)
    tol = tolerance(dtype)
    assert rel_err(out_c, np.asarray(out_x).astype(np.float64)) < tol
    assert rel_err(lse_c, np.asarray(lse_x).astype(np.float64)) < tol
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=is_causal, window=window)
    assert_attention_close(out_c, lse_c, ref_o, ref_lse, dtype, context="cuda")
    assert_attention_close(out_x, lse_x, ref_o, ref_lse, dtype, context="xla on GPU")


def test_default_implementation_is_the_kernel():
    """implementation=None runs the CUDA kernel on a CUDA device: same bits, no warning."""
    q, k, v = make_qkv(2, 129, 257, 8, 2, 64, jnp.bfloat16, seed=("default",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        default = sparsek_attention(q, k, v, is_causal=True, return_lse=True)
        jax.block_until_ready(default)
    cuda = sparsek_attention(q, k, v, is_causal=True, implementation="cuda", return_lse=True)
    for a, b in zip(default, cuda):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_deterministic():
    q, k, v = make_qkv(2, 1000, 1000, 8, 2, 128, jnp.float16, seed=("det",))
    f = functools.partial(sparsek_attention, is_causal=True, implementation=IMPL,
                          return_lse=True)
    first = jax.block_until_ready(f(q, k, v))
    second = jax.block_until_ready(f(q, k, v))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_jit_vmap(dtype):
    n, b, t, s, hq, hkv, d = 3, 2, 100, 150, 4, 2, 64
    triples = [make_qkv(b, t, s, hq, hkv, d, dtype, seed=("vmap", i)) for i in range(n)]
    q, k, v = (jnp.stack(xs) for xs in zip(*triples))
    f = functools.partial(sparsek_attention, is_causal=True, window=40, implementation=IMPL,
                          return_lse=True)
    out, lse = jax.jit(jax.vmap(f))(q, k, v)
    assert out.shape == q.shape and lse.shape == (n, b, hq, t)
    for i in range(n):
        ref_o, ref_lse = numpy_attention(q[i], k[i], v[i], is_causal=True, window=40)
        assert_attention_close(out[i], lse[i], ref_o, ref_lse, dtype, context=f"vmap slice {i}")
    # Only the query mapped (key and value broadcast), out_axes=1.
    out_q, lse_q = jax.jit(jax.vmap(f, in_axes=(0, None, None), out_axes=1))(q, k[0], v[0])
    assert out_q.shape == (b, n) + q.shape[2:] and lse_q.shape == (b, n, hq, t)
    for i in range(n):
        ref_o, ref_lse = numpy_attention(q[i], k[0], v[0], is_causal=True, window=40)
        assert_attention_close(out_q[:, i], lse_q[:, i], ref_o, ref_lse, dtype,
                               context=f"vmap query-only slice {i}")


def test_jit_transposed_operands():
    """Operands produced inside a jitted computation (transposes, casts) reach the kernel
    with the layout it expects."""
    rng = np.random.default_rng(7)
    q_bhtd = jnp.asarray(rng.standard_normal((2, 4, 90, 64), np.float32))
    k_bhsd = jnp.asarray(rng.standard_normal((2, 2, 120, 64), np.float32))

    @jax.jit
    def g(q_bhtd, k_bhsd):
        q = jnp.swapaxes(q_bhtd, 1, 2).astype(jnp.float16)
        k = jnp.swapaxes(k_bhsd, 1, 2).astype(jnp.float16)
        out, lse = sparsek_attention(q, k, k * 0.5, is_causal=True, implementation=IMPL,
                                     return_lse=True)
        return jnp.swapaxes(out, 1, 2), lse, q, k

    out_t, lse, q, k = g(q_bhtd, k_bhsd)
    ref_o, ref_lse = numpy_attention(q, k, k * 0.5, is_causal=True)
    assert_attention_close(jnp.swapaxes(out_t, 1, 2), lse, ref_o, ref_lse, jnp.float16)


@pytest.mark.parametrize("dtype,q_heads,kv_heads,q_len,kv_len,is_causal", [
    (jnp.float16, 32, 8, 8, 8, True),
    (jnp.bfloat16, 32, 32, 8, 8, False),
    (jnp.float16, 32, 4, 1, 24, True),
], ids=_param_id)
def test_batch_chunking(dtype, q_heads, kv_heads, q_len, kv_len, is_causal):
    """B * Hq = 67200 > 65535: the launcher must split the batch over several grids."""
    b = 2100
    q, k, v = make_qkv(b, q_len, kv_len, q_heads, kv_heads, 64, dtype, seed=("chunk",))
    out, lse = _check(q, k, v, dtype, is_causal=is_causal,
                      context=f"B={b} Hq={q_heads} Hkv={kv_heads}")
    # The last batch entries (in the last chunk) are computed, not left poisoned or zero.
    assert np.all(np.abs(np.asarray(out[-1], np.float32)).sum(axis=-1) > 0)
    assert np.all(np.isfinite(np.asarray(lse[-1])))


def test_batch_chunking_through_vmap():
    """vmap folds its axis into the batch: 3 x 700 x 32 heads = 67200 (head, batch) pairs."""
    n, b, hq, hkv = 3, 700, 32, 8
    triples = [make_qkv(b, 8, 8, hq, hkv, 64, jnp.float16, seed=("chunk-vmap", i))
               for i in range(n)]
    q, k, v = (jnp.stack(xs) for xs in zip(*triples))
    f = functools.partial(sparsek_attention, is_causal=True, implementation=IMPL,
                          return_lse=True)
    out, lse = jax.jit(jax.vmap(f))(q, k, v)
    for i in range(n):
        ref_o, ref_lse = numpy_attention(q[i], k[i], v[i], is_causal=True)
        assert_attention_close(out[i], lse[i], ref_o, ref_lse, jnp.float16,
                               context=f"slice {i}")
