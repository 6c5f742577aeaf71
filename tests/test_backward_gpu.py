"""The CUDA backward kernels (dq, dk, dv and, in SparseK mode, du) on shapes that span several
tiles of both kernels, against the float64 explicit gradients of SPARSEK.md on the CPU.

test_gradients_gpu.py covers the small ragged shapes (and vmap); here: several query and key
tiles, lengths that are multiples of no tile, T != S, GQA 1/4/8, head dims 64/96/128/256,
K >= the domain, W = 0 and W >= S, several sorted key spans (the dk/dv kernel's order), -inf
scores, for fp16 and bf16. Outputs are poisoned with NaN before every kernel run
(conftest.py), so "no NaN" means every element was written. Also: a long
SparseK case against implementation='xla' on the GPU (too large for the float64 oracle),
run-to-run determinism of SparseK with JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 (the default
kernels add dq, and the rows' sums of g, with atomics: test_backward_kernels_gpu.py), and the
wider sorted key spans of long sequences (JAX_SPARSEK_KEY_SPAN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, requires_cuda, tolerance
from test_gradients_gpu import Case, _check, _grads, _inputs, reference_grads

pytestmark = requires_cuda

DTYPE_PARAM = pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16],
                                      ids=["float16", "bfloat16"])

DENSE_CASES = {
    "T300_causal_gqa4_d128": Case(1, 300, 300, 8, 2, d=128, is_causal=True),
    "T130_S250_full_mha_d64": Case(2, 130, 250, 4, 4, d=64),
    "T257_S513_window100_gqa8_d96": Case(1, 257, 513, 8, 1, d=96, is_causal=True,
                                         window=100),
    "T200_causal_gqa2_d256": Case(1, 200, 200, 4, 2, d=256, is_causal=True),
    "T1_S300_causal_gqa8_d128": Case(1, 1, 300, 8, 1, d=128, is_causal=True),
    "T300_S100_causal_d64": Case(1, 300, 100, 4, 2, d=64, is_causal=True),
}

SPARSEK_CASES = {
    "T300_K40_W16_gqa4_d128": Case(1, 300, 300, 8, 2, d=128, is_causal=True, topk=40,
                                   window=16),
    "T257_S700_K64_W0_gqa4_d64": Case(1, 257, 700, 4, 1, d=64, is_causal=True, topk=64,
                                      window=0),
    "T1_S500_K32_W8_gqa4_d64": Case(1, 1, 500, 8, 2, d=64, is_causal=True, topk=32, window=8),
    "T400_K500_W8_mha_d128": Case(2, 400, 400, 4, 4, d=128, is_causal=True, topk=500,
                                  window=8),
    "T384_K16_W400_mha_d64": Case(1, 384, 384, 8, 8, d=64, is_causal=True, topk=16,
                                  window=400),
    # A head dim below the Hopper kernels' 128: the gathers zero-fill the columns past it.
    "T300_S500_K60_W20_gqa4_d96": Case(1, 300, 500, 8, 2, d=96, is_causal=True, topk=60,
                                       window=20),
    "T640_K100_W32_gqa8_d128": Case(1, 640, 640, 8, 1, d=128, is_causal=True, topk=100,
                                    window=32),
    # Several of the dk/dv kernel's 1024-key sorted spans (selection/sort_key_spans.h), the
    # last one partial; T != S.
    "T1100_S2600_K96_W40_gqa8_d128": Case(1, 1100, 2600, 8, 1, d=128, is_causal=True,
                                          topk=96, window=40),
    "T2100_K200_W64_gqa4_d64": Case(1, 2100, 2100, 8, 2, d=64, is_causal=True, topk=200,
                                    window=64),
    # One head: the rows' sums of g and du are 301 floats, not a whole number of the
    # zeroing's 16-byte stores (bwd_preprocess.cu writes the tail one float a thread).
    "T301_K40_W16_mha1_d128": Case(1, 301, 301, 1, 1, d=128, is_causal=True, topk=40,
                                   window=16),
    # The Hopper kernels' head dim at T = 2100: two default row bands, three of 1024 rows.
    "T2100_K160_W48_gqa4_d128": Case(1, 2100, 2100, 8, 2, d=128, is_causal=True, topk=160,
                                     window=48),
}


def _api_grads(case, dtype, implementation="cuda"):
    q, k, v, u, w_out, w_lse = _inputs(case, dtype)
    grads = jax.jit(lambda *a: _grads(case, implementation, *a))(q, k, v, u, w_out, w_lse)
    return grads, (q, k, v, u, w_out, w_lse)


@DTYPE_PARAM
@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_backward_kernels(name, dtype):
    case = DENSE_CASES[name]
    api, inputs = _api_grads(case, dtype)
    ref = reference_grads(case, *inputs)
    _check(case, api, ref, dtype, context=name)


@pytest.mark.parametrize("name", ["T300_causal_gqa4_d128", "T257_S513_window100_gqa8_d96"])
def test_dense_backward_prepare_separate(name, monkeypatch):
    """JAX_SPARSEK_BWD_PREPARE=separate: Delta in a kernel of its own and the dq accumulator
    zeroed by a memset, the comparison for the fused kernel (the default)."""
    monkeypatch.setenv("JAX_SPARSEK_BWD_PREPARE", "separate")
    case = DENSE_CASES[name]
    api, inputs = _api_grads(case, jnp.float16)
    ref = reference_grads(case, *inputs)
    _check(case, api, ref, jnp.float16, context=f"{name} separate")


@DTYPE_PARAM
@pytest.mark.parametrize("name", list(SPARSEK_CASES))
def test_sparsek_backward_kernels(name, dtype):
    case = SPARSEK_CASES[name]
    api, inputs = _api_grads(case, dtype)
    ref = reference_grads(case, *inputs)
    _check(case, api, ref, dtype, context=name)
    du = np.asarray(api["u"])
    window_only = np.arange(case.s) > case.s - 1 - case.window
    assert np.all(du[:, window_only] == 0.0), f"{name}: du of keys only ever in windows"


@pytest.mark.parametrize("dtype", [jnp.float16], ids=["float16"])
def test_sparsek_backward_neg_inf_scores(dtype):
    """-inf scores over more than one sorted span: a -inf prefix longer than K + W (rows whose
    domain is all -inf), and 15% scattered; they sort after every finite score of their span
    but before its padding. Their du is 0."""
    case = Case(1, 1500, 1500, 8, 2, d=64, is_causal=True, topk=64, window=24)
    q, k, v, u, w_out, w_lse = _inputs(case, dtype)
    u = np.array(u)
    u[:, :300] = -np.inf
    u[np.random.default_rng(7).random(u.shape) < 0.15] = -np.inf
    u = jnp.asarray(u)
    api = jax.jit(lambda *a: _grads(case, "cuda", *a))(q, k, v, u, w_out, w_lse)
    ref = reference_grads(case, q, k, v, u, w_out, w_lse)
    _check(case, api, ref, dtype, context="neg_inf_scores")
    du = np.asarray(api["u"])
    assert np.all(du[np.isneginf(np.asarray(u))] == 0.0), "du of -inf scores"


def _check_against_xla(case, dtype):
    """The kernels' gradients against implementation='xla' on the GPU (shapes too large for
    the float64 oracle): no NaN, within the dtype's tolerance."""
    cuda, _ = _api_grads(case, dtype, "cuda")
    xla, _ = _api_grads(case, dtype, "xla")
    for name in xla:
        got = np.asarray(cuda[name].astype(jnp.float32))
        assert not np.isnan(got).any(), f"NaN in d{name}"
        err = rel_err(got, np.asarray(xla[name].astype(jnp.float32)))
        assert err < tolerance(dtype), f"d{name}: cuda vs xla relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [jnp.bfloat16], ids=["bfloat16"])
def test_sparsek_backward_long_against_xla(dtype):
    """T = S = 4096 (many plan chunks, several anchor groups): kernels vs the pure-JAX
    reference on the GPU."""
    _check_against_xla(Case(1, 4096, 4096, 8, 2, d=128, is_causal=True, topk=256, window=128),
                       dtype)


# Settings read at every call, forced at small S: row bands of 1024 rows (several bands at
# T >= 1100, where the default 2048-row bands leave one; selection/sort_key_spans.h), the
# span orders (kd, with other widths of its sorted key spans than 4096: 8192 is one partial
# span; last-row), and the fused SparseK dk/dv grid in thread-block clusters of neighbouring
# slices (D = 128 runs the fused kernel). JAX_SPARSEK_KEY_SPAN is set with the kd order.
_SETTING_CASES = [
    (variable, value, name)
    for variable, values, names in [
        ("JAX_SPARSEK_KEY_BAND_ROWS", ["1024"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T2100_K160_W48_gqa4_d128"]),
        ("JAX_SPARSEK_KEY_SPAN", ["1024", "2048", "8192"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T2100_K200_W64_gqa4_d64"]),
        # The span sort's orders (row bands are the default).
        ("JAX_SPARSEK_KEY_ORDER", ["kd", "last-row"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T2100_K200_W64_gqa4_d64",
          "T640_K100_W32_gqa8_d128"]),
        # The dk/dv CTAs on the slices span by span (the slice order is the default).
        ("JAX_SPARSEK_SLICE_ORDER", ["spans"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T640_K100_W32_gqa8_d128"]),
        ("JAX_SPARSEK_BWD_CLUSTER", ["2", "4", "8"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T400_K500_W8_mha_d128"]),
        # The dk/dv grid of every band's capacity, tile-major or head-major, with row bands
        # (the CTA list is their default).
        ("JAX_SPARSEK_BWD_GRID", ["tiles", "heads"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T2100_K160_W48_gqa4_d128"]),
        # Every step through both warpgroups' products (skipping a warpgroup's steps whose
        # rows see none of its keys is the default).
        ("JAX_SPARSEK_BWD_SKIP_HALVES", ["0"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T2100_K160_W48_gqa4_d128"]),
        # The consumers fencing the producer's copies for wgmma after their wait (the
        # producer fencing them before it arrives is the default).
        ("JAX_SPARSEK_BWD_PRODUCER_FENCE", ["0"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T2100_K160_W48_gqa4_d128"]),
        # Delta in a kernel of its own and a memset an accumulator (one kernel is the
        # default).
        ("JAX_SPARSEK_BWD_PREPARE", ["separate"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T301_K40_W16_mha1_d128"]),
        # Everything on the caller's stream (the side stream is the default).
        ("JAX_SPARSEK_SIDE_STREAM", ["0"],
         ["T1100_S2600_K96_W40_gqa8_d128", "T640_K100_W32_gqa8_d128"]),
    ]
    for value in values for name in names
]


@pytest.mark.parametrize("variable,value,name", _SETTING_CASES)
def test_sparsek_backward_settings(variable, value, name, monkeypatch):
    """Gradients against the float64 reference with a key order, band height, key span
    width or cluster size set."""
    monkeypatch.setenv(variable, value)
    if variable == "JAX_SPARSEK_KEY_SPAN":
        monkeypatch.setenv("JAX_SPARSEK_KEY_ORDER", "kd")
    case = SPARSEK_CASES[name]
    api, inputs = _api_grads(case, jnp.float16)
    ref = reference_grads(case, *inputs)
    _check(case, api, ref, jnp.float16, context=f"{name} {variable}={value}")


@pytest.mark.parametrize("order,span", [("kd", "4096"), ("kd", "8192"), ("last-row", "4096"),
                                        ("bands", "1024"), ("bands", "2048")])
def test_sparsek_backward_span_long_against_xla(order, span, monkeypatch):
    """Several wide spans (T = S = 9000: 4096 keys two whole and one partial, 8192 one and
    one), in either span order, and row bands of 1024 and 2048 rows (9 and 5 bands, keys
    carried through several): kernels against the pure-JAX reference on the GPU."""
    monkeypatch.setenv("JAX_SPARSEK_KEY_ORDER", order)
    if order == "bands":
        monkeypatch.setenv("JAX_SPARSEK_KEY_BAND_ROWS", span)
    else:
        monkeypatch.setenv("JAX_SPARSEK_KEY_SPAN", span)
    _check_against_xla(Case(1, 9000, 9000, 8, 2, d=128, is_causal=True, topk=512, window=128),
                       jnp.bfloat16)


@pytest.mark.parametrize("variable,value,message,name", [
    ("JAX_SPARSEK_KEY_SPAN", "3000", "JAX_SPARSEK_KEY_SPAN must be 1024, 2048, 4096 or 8192",
     "T300_K40_W16_gqa4_d128"),
    ("JAX_SPARSEK_KEY_ORDER", "score", "JAX_SPARSEK_KEY_ORDER must be bands, kd or last-row",
     "T300_K40_W16_gqa4_d128"),
    ("JAX_SPARSEK_KEY_BAND_ROWS", "3000", "JAX_SPARSEK_KEY_BAND_ROWS must be a power of two",
     "T300_K40_W16_gqa4_d128"),
    ("JAX_SPARSEK_KEY_BAND_ROWS", "512", "JAX_SPARSEK_KEY_BAND_ROWS must be a power of two",
     "T300_K40_W16_gqa4_d128"),
    ("JAX_SPARSEK_SLICE_ORDER", "rows", "JAX_SPARSEK_SLICE_ORDER must be start or spans",
     "T300_K40_W16_gqa4_d128"),
    ("JAX_SPARSEK_BWD_CLUSTER", "3", "JAX_SPARSEK_BWD_CLUSTER must be 1, 2, 4 or 8",
     "T1100_S2600_K96_W40_gqa8_d128"),
    ("JAX_SPARSEK_BWD_GRID", "rows", "JAX_SPARSEK_BWD_GRID must be list, tiles or heads",
     "T1100_S2600_K96_W40_gqa8_d128"),
    ("JAX_SPARSEK_BWD_SKIP_HALVES", "yes", "JAX_SPARSEK_BWD_SKIP_HALVES must be 1 or 0",
     "T1100_S2600_K96_W40_gqa8_d128"),
    ("JAX_SPARSEK_BWD_PRODUCER_FENCE", "yes",
     "JAX_SPARSEK_BWD_PRODUCER_FENCE must be 1 or 0", "T1100_S2600_K96_W40_gqa8_d128"),
    ("JAX_SPARSEK_BWD_PREPARE", "one", "JAX_SPARSEK_BWD_PREPARE must be fused or separate",
     "T300_K40_W16_gqa4_d128"),
])
def test_sparsek_backward_bad_setting(variable, value, message, name, monkeypatch):
    """A JAX_SPARSEK_KEY_SPAN that is not a width the sort has, a JAX_SPARSEK_KEY_ORDER or
    JAX_SPARSEK_SLICE_ORDER that is not an order it has, a JAX_SPARSEK_KEY_BAND_ROWS that is
    not a band height it takes, a JAX_SPARSEK_BWD_CLUSTER that is not a cluster size the
    launcher takes, a JAX_SPARSEK_BWD_GRID that is not a grid order, or a
    JAX_SPARSEK_BWD_SKIP_HALVES or JAX_SPARSEK_BWD_PRODUCER_FENCE that is not 1 or 0, or a
    JAX_SPARSEK_BWD_PREPARE that is not fused or separate: an error naming it."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(Exception, match=message):
        grads, _ = _api_grads(SPARSEK_CASES[name], jnp.float16)
        jax.block_until_ready(grads)


@pytest.mark.parametrize("name", ["T640_K100_W32_gqa8_d128", "T1100_S2600_K96_W40_gqa8_d128"])
def test_backward_deterministic(name, monkeypatch):
    """With JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 two SparseK runs give bitwise-equal
    gradients (no atomics in its kernels)."""
    monkeypatch.setenv("JAX_SPARSEK_DETERMINISTIC_BACKWARD", "1")
    case = SPARSEK_CASES[name]
    first, _ = _api_grads(case, jnp.float16)
    second, _ = _api_grads(case, jnp.float16)
    for name in first:
        assert np.array_equal(np.asarray(first[name].astype(jnp.float32)),
                              np.asarray(second[name].astype(jnp.float32))), name


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_sparsek_backward_reads_forward_tau(deterministic, monkeypatch):
    """The backward primitive takes the forward's tau: the default kernels read it (a tau
    shifted by 0.25 changes du and dq), the deterministic path solves its own again with the
    plan its dq kernel walks (the shifted tau changes nothing); with the forward's own tau both
    give the float64 reference's gradients (test_sparsek_backward_kernels)."""
    from jax_sparsek._backward_primitive import attention_bwd
    from jax_sparsek._primitive import attention_fwd
    from jax_sparsek._validation import check_attention_args

    if deterministic:
        monkeypatch.setenv("JAX_SPARSEK_DETERMINISTIC_BACKWARD", "1")
    case = SPARSEK_CASES["T640_K100_W32_gqa8_d128"]
    q, k, v, u, w_out, w_lse = _inputs(case, jnp.float16)
    config = check_attention_args(q, k, v, u, case.topk, case.window, True, None, "cuda")

    @jax.jit
    def grads(tau_shift):
        o, lse, tau = attention_fwd(q, k, v, u, config)
        return attention_bwd(q, k, v, u, tau + tau_shift, o, lse, w_out, w_lse, config)

    exact = [np.asarray(g.astype(jnp.float32)) for g in grads(0.0)]
    shifted = [np.asarray(g.astype(jnp.float32)) for g in grads(0.25)]
    for name, e, s in zip("qkvu", exact, shifted):
        assert not np.isnan(e).any() and not np.isnan(s).any(), f"NaN in d{name}"
    changed = {name: not np.allclose(e, s, rtol=1e-2, atol=1e-3)
               for name, e, s in zip("qkvu", exact, shifted)}
    if deterministic:
        assert not any(changed.values()), changed
    else:
        assert changed["u"] and changed["q"], changed
