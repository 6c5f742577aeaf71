"""The SparseK CUDA path (selection stage + sparse attention kernel) against references.

Small shapes against the float64 NumPy oracle of SPARSEK.md (conftest.py); shapes too large
for it (several anchor groups of the selection, S = 8192) against implementation='xla', the
pure-JAX reference that the CPU tests check against that oracle. Outputs are poisoned with NaN
before every run (conftest.py), so "no NaN" means every element was written.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_attention_close, make_qkv, numpy_attention,
                      numpy_sparsek_attention, requires_cuda, rng_for)
from jax_sparsek import sparsek_attention
from jax_sparsek._primitive import attention_fwd
from jax_sparsek._validation import check_attention_args

pytestmark = requires_cuda


def make_scores(batch, kv_len, kv_heads, kind, seed):
    rng = rng_for("sparsek-gpu-scores", batch, kv_len, kv_heads, kind, *seed)
    shape = (batch, kv_len, kv_heads)
    if kind == "normal":  # with padding keys
        u = rng.standard_normal(shape).astype(np.float32)
        u[rng.random(shape) < 0.15] = -np.inf
    elif kind == "sharp":  # spread scores: gates mostly 0 or 1
        u = (4.0 * rng.standard_normal(shape)).astype(np.float32)
    elif kind == "tied":  # three distinct values: ties everywhere
        u = rng.integers(0, 3, shape).astype(np.float32)
    elif kind == "padded_head":  # a long -inf prefix, and one kv head entirely -inf
        u = rng.standard_normal(shape).astype(np.float32)
        u[:, : kv_len // 3] = -np.inf
        u[:, :, -1] = -np.inf
    elif kind == "slope":  # a position slope, as the paper's scoring network adds
        u = (0.01 * np.arange(kv_len)[None, :, None]
             + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    else:
        raise ValueError(kind)
    return jnp.asarray(u)


def run_cuda(q, k, v, u, topk, window, **kw):
    out, lse = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                                 implementation="cuda", return_lse=True, **kw)
    out, lse = jax.block_until_ready((out, lse))
    assert not np.isnan(np.asarray(out, np.float32)).any(), "NaN in out"
    assert not np.isnan(np.asarray(lse)).any(), "NaN in lse"
    return out, lse


# (B, T, S, Hq, Hkv, D, dtype, topk, window, scores)
ORACLE_CASES = [
    (1, 300, 300, 4, 1, 64, jnp.float16, 20, 16, "normal"),
    (2, 200, 200, 8, 1, 128, jnp.bfloat16, 33, 0, "normal"),
    (1, 1, 777, 4, 2, 64, jnp.float16, 50, 30, "normal"),
    (1, 130, 515, 2, 2, 128, jnp.float16, 64, 100, "sharp"),
    (1, 257, 257, 2, 1, 64, jnp.bfloat16, 300, 0, "normal"),
    (1, 150, 150, 2, 2, 64, jnp.float16, 10, 400, "normal"),
    (1, 190, 190, 4, 4, 64, jnp.float16, 25, 5, "tied"),
    (1, 40, 20, 2, 1, 64, jnp.float16, 3, 2, "normal"),
    (1, 211, 211, 4, 2, 128, jnp.bfloat16, 40, 32, "padded_head"),
    (2, 173, 301, 8, 2, 32, jnp.float16, 17, 9, "slope"),
    (1, 129, 129, 2, 1, 128, jnp.float16, 1, 0, "sharp"),
    # W = 0 and a last query tile of one row at position S - 1 = 255: its domain ends on a
    # chunk boundary, so its contiguous range has no keys (the Hopper kernel's first tile is
    # then a candidates' one, not the range's).
    (1, 129, 256, 2, 1, 128, jnp.float16, 40, 0, "normal"),
    (1, 1, 384, 4, 1, 128, jnp.bfloat16, 100, 0, "normal"),
]


def _case_id(case):
    b, t, s, hq, hkv, d, dtype, topk, window, kind = case
    return (f"B{b}-T{t}-S{s}-Hq{hq}-Hkv{hkv}-D{d}-{jnp.dtype(dtype).name}-K{topk}-W{window}-"
            f"{kind}")


@pytest.mark.parametrize("case", ORACLE_CASES, ids=[_case_id(c) for c in ORACLE_CASES])
def test_sparsek_kernel_matches_float64_oracle(case):
    b, t, s, hq, hkv, d, dtype, topk, window, kind = case
    q, k, v = make_qkv(b, t, s, hq, hkv, d, dtype, seed=("sparsek-gpu",))
    u = make_scores(b, s, hkv, kind, ("oracle", t))
    out, lse = run_cuda(q, k, v, u, topk, window)
    ref_o, ref_lse = numpy_sparsek_attention(q, k, v, u, topk, window)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype, context=_case_id(case))


def test_sparsek_kernel_dense_limit_is_causal_attention():
    """K >= S and W = 0: every key of the causal past has gate 1."""
    q, k, v = make_qkv(1, 333, 333, 4, 2, 128, jnp.float16, seed=("dense-limit",))
    u = make_scores(1, 333, 2, "normal", ("dense-limit",))
    u = jnp.where(jnp.isfinite(u), u, 0.0)
    out, lse = run_cuda(q, k, v, u, 333, 0)
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=True)
    assert_attention_close(out, lse, ref_o, ref_lse, jnp.float16, context="dense limit")


def test_sparsek_kernel_empty_rows():
    """Rows before the first key (T > S) and rows whose keys are all -inf and outside the
    window: o = 0 and lse = -inf, no NaN."""
    q, k, v = make_qkv(1, 50, 30, 2, 1, 64, jnp.float16, seed=("empty",))
    u = jnp.full((1, 30, 1), -jnp.inf, jnp.float32)
    out, lse = run_cuda(q, k, v, u, 4, 0)
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)
    assert np.all(np.asarray(lse) == -np.inf)


# Larger shapes: several anchor groups (16 query tiles of 128 rows each), against 'xla'.
XLA_CASES = [
    (1, 2600, 2600, 2, 1, 64, jnp.float16, 300, 64, "normal"),
    (1, 4500, 4500, 2, 2, 128, jnp.bfloat16, 1500, 0, "slope"),
    (1, 8192, 8192, 4, 1, 128, jnp.float16, 512, 128, "sharp"),
    (1, 3000, 6000, 4, 2, 64, jnp.float16, 700, 200, "tied"),
    # 500k keys for 200 rows (chunked prefill): a plan row of 3907 chunks (31 KB of the
    # Hopper kernel's shared memory) and anchors 16 query tiles apart that the rows never reach.
    (1, 200, 500_000, 2, 1, 128, jnp.float16, 4000, 300, "normal"),
]


@pytest.mark.parametrize("case", XLA_CASES, ids=[_case_id(c) for c in XLA_CASES])
def test_sparsek_kernel_matches_xla_reference_long(case):
    b, t, s, hq, hkv, d, dtype, topk, window, kind = case
    q, k, v = make_qkv(b, t, s, hq, hkv, d, dtype, seed=("sparsek-long",))
    u = make_scores(b, s, hkv, kind, ("long", t))
    out, lse = run_cuda(q, k, v, u, topk, window)
    ref_o, ref_lse = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                                       implementation="xla", return_lse=True)
    assert_attention_close(out, lse, np.asarray(ref_o, np.float64),
                           np.asarray(ref_lse, np.float64), dtype, context=_case_id(case))


def test_sparsek_kernel_tau_matches_reference():
    """The selection's per-row thresholds: where the root is unique they agree with the
    reference's; -inf exactly where the domain holds at most K keys."""
    q, k, v = make_qkv(1, 2300, 2300, 2, 2, 64, jnp.float16, seed=("tau",))
    u = make_scores(1, 2300, 2, "normal", ("tau",))
    outs = {}
    for impl in ("cuda", "xla"):
        config = check_attention_args(q, k, v, u, 200, 50, True, None, impl)
        outs[impl] = np.asarray(jax.jit(functools.partial(attention_fwd, config=config))(
            q, k, v, u)[2])
    cuda, xla = outs["cuda"], outs["xla"]
    np.testing.assert_array_equal(np.isneginf(cuda), np.isneginf(xla))
    finite = np.isfinite(xla)
    np.testing.assert_allclose(cuda[finite], xla[finite], atol=2e-5, rtol=0)
    assert np.all(np.diff(np.where(finite, cuda, -1e30), axis=-1) >= -1e-6), "tau decreases"


def test_sparsek_kernel_jit_vmap_and_default_implementation():
    q, k, v = make_qkv(3, 97, 97, 4, 2, 64, jnp.bfloat16, seed=("vmap",))
    u = make_scores(3, 97, 2, "normal", ("vmap",))
    f = functools.partial(sparsek_attention, topk=12, window=7, is_causal=True)
    eager = f(q, k, v, u, implementation="cuda")
    default = jax.jit(f)(q, k, v, u)  # None: the CUDA kernels on a CUDA device
    batched = jax.vmap(lambda a, b_, c, d_: f(a[None], b_[None], c[None], d_[None],
                                              implementation="cuda")[0])(q, k, v, u)
    for x in (default, batched):
        np.testing.assert_array_equal(np.asarray(eager, np.float32), np.asarray(x, np.float32))


def test_sparsek_kernel_deterministic():
    q, k, v = make_qkv(1, 700, 700, 4, 1, 128, jnp.float16, seed=("det",))
    u = make_scores(1, 700, 1, "normal", ("det",))
    a = run_cuda(q, k, v, u, 64, 32)
    b = run_cuda(q, k, v, u, 64, 32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_sparsek_kernel_scores_dtype():
    """bf16 scores are used in float32, as the reference does."""
    q, k, v = make_qkv(1, 160, 160, 2, 1, 64, jnp.float16, seed=("udtype",))
    u = make_scores(1, 160, 1, "normal", ("udtype",)).astype(jnp.bfloat16)
    out, lse = run_cuda(q, k, v, u, 20, 8)
    ref_o, ref_lse = numpy_sparsek_attention(q, k, v, u, 20, 8)
    assert_attention_close(out, lse, ref_o, ref_lse, jnp.float16, context="bf16 scores")
