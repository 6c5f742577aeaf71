"""The pure-JAX reference path (implementation='xla', and None without CUDA kernels) against
the float64 NumPy reference of SPARSEK.md's dense modes. Runs on any machine."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (CUDA_AVAILABLE, DTYPES, assert_attention_close, dense_gate_matrix,
                      make_qkv, numpy_attention)
from jax_sparsek import _extension, sparsek_attention

# (is_causal, window) of the dense modes; a window of None means no window. "large" is >= S.
MODES = {
    "full": (False, None),
    "causal": (True, None),
    "window1": (True, 1),
    "window7": (True, 7),
    "window_large": (True, "large"),
}


def _window(window, kv_len):
    return kv_len + 5 if window == "large" else window


def _run_and_check(q, k, v, *, is_causal, window, dtype, implementation="xla", scale=None,
                   context=""):
    out, lse = sparsek_attention(q, k, v, is_causal=is_causal, window=window, scale=scale,
                                 implementation=implementation, return_lse=True)
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=is_causal, window=window, scale=scale)
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not np.isnan(np.asarray(lse)).any()
    assert_attention_close(out, lse, ref_o, ref_lse, dtype, context=context)
    return out, lse


# (T, S): ragged, T = 1, T < S, T > S (causal rows with no key), T = S = 1.
SIZES = [(1, 1), (1, 17), (17, 17), (17, 33), (33, 17), (33, 100), (100, 33), (100, 100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("q_len,kv_len", SIZES)
def test_modes_and_sizes(dtype, mode, q_len, kv_len):
    is_causal, window = MODES[mode]
    window = _window(window, kv_len)
    q, k, v = make_qkv(2, q_len, kv_len, 2, 1, 64, dtype, seed=(mode,))
    _run_and_check(q, k, v, is_causal=is_causal, window=window, dtype=dtype,
                   context=f"{mode} T={q_len} S={kv_len}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("head_dim", [8, 16, 64, 80, 128, 256])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_head_dims(dtype, head_dim, is_causal):
    q_len, kv_len = (9, 21) if head_dim == 256 else (21, 40)
    q, k, v = make_qkv(1, q_len, kv_len, 2, 2, head_dim, dtype, seed=(is_causal,))
    _run_and_check(q, k, v, is_causal=is_causal, window=None, dtype=dtype,
                   context=f"D={head_dim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("q_heads,kv_heads", [(1, 1), (4, 4), (4, 1), (8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("mode", ["full", "causal", "window7"])
def test_gqa(dtype, q_heads, kv_heads, mode):
    is_causal, window = MODES[mode]
    q, k, v = make_qkv(2, 19, 27, q_heads, kv_heads, 32, dtype, seed=(mode,))
    _run_and_check(q, k, v, is_causal=is_causal, window=window, dtype=dtype,
                   context=f"Hq={q_heads} Hkv={kv_heads} {mode}")


def test_gqa_head_mapping():
    """Query head h must read kv head h // (Hq // Hkv): make every kv head's values distinct
    constants and check which constant each query head returns."""
    b, t, s, hq, hkv, d = 1, 5, 6, 8, 2, 8
    q, k, _ = make_qkv(b, t, s, hq, hkv, d, jnp.float16)
    v = jnp.broadcast_to(jnp.arange(1, hkv + 1, dtype=jnp.float16)[None, None, :, None],
                         (b, s, hkv, d))
    out = np.asarray(sparsek_attention(q, k, v, implementation="xla"), np.float32)
    for h in range(hq):
        np.testing.assert_allclose(out[:, :, h, :], h // (hq // hkv) + 1, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("window,q_len,kv_len", [
    (1, 1, 1), (1, 9, 4), (3, 9, 4), (4, 5, 9), (9, 5, 9), (10, 5, 9), (1000, 12, 30),
    (2, 30, 12)])
def test_window_edges(dtype, window, q_len, kv_len):
    """W = 1, W = S, W > S, and windows combined with T > S (leading rows see no key)."""
    q, k, v = make_qkv(1, q_len, kv_len, 2, 1, 16, dtype, seed=(window,))
    _run_and_check(q, k, v, is_causal=True, window=window, dtype=dtype,
                   context=f"W={window} T={q_len} S={kv_len}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("window", [None, 1, 3])
def test_empty_rows_are_zero_and_neginf(dtype, window):
    """Causal with T > S: row i sees keys j <= i + S - T, so rows i < T - S see nothing."""
    b, t, s, hq = 2, 13, 5, 4
    q, k, v = make_qkv(b, t, s, hq, 2, 32, dtype, seed=(window,))
    out, lse = sparsek_attention(q, k, v, is_causal=True, window=window, implementation="xla",
                                 return_lse=True)
    out = np.asarray(out, np.float32)
    lse = np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    empty = t - s
    assert np.all(out[:, :empty] == 0.0)
    assert np.all(np.isneginf(lse[:, :, :empty]))
    assert np.all(np.isfinite(lse[:, :, empty:]))
    assert np.all(np.abs(out[:, empty:]).sum(axis=-1) > 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("scale", [0.05, 0.5, 1.0, -0.3])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_explicit_scale(dtype, scale, is_causal):
    """scale=1.0 with D=64 gives logits of std 8: checks the softmax is computed stably."""
    q, k, v = make_qkv(1, 24, 31, 2, 1, 64, dtype, seed=(scale, is_causal))
    _run_and_check(q, k, v, is_causal=is_causal, window=None, dtype=dtype, scale=scale,
                   context=f"scale={scale}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_large_logits_stable(dtype):
    """Inputs of std 6 (logits in the hundreds): no overflow, no NaN."""
    q, k, v = make_qkv(1, 16, 16, 2, 2, 64, dtype, std=6.0)
    _run_and_check(q, k, v, is_causal=True, window=None, dtype=dtype, context="large logits")


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 32, jnp.float16)
    implicit = sparsek_attention(q, k, v, implementation="xla")
    explicit = sparsek_attention(q, k, v, scale=1.0 / np.sqrt(32), implementation="xla")
    np.testing.assert_array_equal(np.asarray(implicit, np.float32),
                                  np.asarray(explicit, np.float32))


def test_window_at_least_s_equals_causal():
    q, k, v = make_qkv(1, 12, 20, 2, 2, 16, jnp.bfloat16)
    causal = sparsek_attention(q, k, v, is_causal=True, implementation="xla", return_lse=True)
    for window in (20, 21, 10_000):
        windowed = sparsek_attention(q, k, v, is_causal=True, window=window,
                                     implementation="xla", return_lse=True)
        for a, b in zip(causal, windowed):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_numpy_reference_self_check():
    """The test oracle itself, against a direct per-row loop over SPARSEK.md's formulas."""
    rng = np.random.default_rng(0)
    b, t, s, hq, hkv, d, w = 1, 7, 5, 4, 2, 8, 2
    q = rng.standard_normal((b, t, hq, d))
    k = rng.standard_normal((b, s, hkv, d))
    v = rng.standard_normal((b, s, hkv, d))
    out, lse = numpy_attention(q, k, v, is_causal=True, window=w, scale=0.7)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(t):
            p = i + s - t
            keys = [j for j in range(s) if p - w < j <= p]
            assert dense_gate_matrix(t, s, True, w)[i].tolist() == [j in keys for j in range(s)]
            if not keys:
                assert np.isneginf(lse[0, h, i]) and np.all(out[0, i, h] == 0)
                continue
            logits = np.array([0.7 * q[0, i, h] @ k[0, j, kh] for j in keys])
            weights = np.exp(logits)
            np.testing.assert_allclose(lse[0, h, i], np.log(weights.sum()), rtol=1e-12)
            expect = sum(wt * v[0, j, kh] for wt, j in zip(weights, keys)) / weights.sum()
            np.testing.assert_allclose(out[0, i, h], expect, rtol=1e-12)


@pytest.mark.skipif(CUDA_AVAILABLE, reason="implementation=None runs the CUDA kernel here")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("mode", ["full", "causal", "window7"])
def test_default_implementation_matches_xla(dtype, mode):
    is_causal, window = MODES[mode]
    q, k, v = make_qkv(2, 23, 31, 4, 2, 64, dtype, seed=(mode,))
    default = sparsek_attention(q, k, v, is_causal=is_causal, window=window, return_lse=True)
    xla = sparsek_attention(q, k, v, is_causal=is_causal, window=window, implementation="xla",
                            return_lse=True)
    for a, b in zip(default, xla):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=is_causal, window=window)
    assert_attention_close(*default, ref_o, ref_lse, dtype, context=f"default {mode}")


@pytest.mark.skipif(CUDA_AVAILABLE, reason="implementation=None runs the CUDA kernel here")
def test_implicit_reference_path_warns():
    _extension.warn_reference_path.cache_clear()
    q, k, v = make_qkv(1, 3, 11, 3, 1, 24, jnp.float16, seed=("warns",))  # a fresh shape
    with pytest.warns(RuntimeWarning, match="pure-JAX reference"):
        jax.block_until_ready(sparsek_attention(q, k, v))


def test_explicit_xla_does_not_warn():
    _extension.warn_reference_path.cache_clear()
    q, k, v = make_qkv(1, 3, 13, 3, 1, 24, jnp.float16, seed=("no-warn",))  # a fresh shape
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        jax.block_until_ready(sparsek_attention(q, k, v, implementation="xla"))


def test_numpy_inputs_accepted():
    q, k, v = make_qkv(1, 6, 9, 2, 1, 16, jnp.float16)
    q_np, k_np, v_np = (np.asarray(x) for x in (q, k, v))
    out = sparsek_attention(q_np, k_np, v_np, is_causal=True, implementation="xla")
    ref = sparsek_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
