"""Both CUDA backward kernel pairs (dq, dk/dv) against the float64 explicit gradients, on the
same device.

On Hopper (compute capability 9.0, built for sm_90a) the backward runs on the wgmma kernels
(bwd_dq_kernel_sm90.cuh, bwd_dkdv_kernel_sm90.cuh) for head dims 72 to 128, which
test_backward_gpu.py and test_gradients_gpu.py then exercise; JAX_SPARSEK_BACKWARD_KERNEL=
mma_sync sends calls to the mma.sync kernels, which every other GPU runs. The variable is
read at every call, so one process can check both. Outputs are poisoned with NaN before
every run (conftest.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import on_hopper_build, requires_cuda, use_kernel
from jax_sparsek import _extension
from test_gradients_gpu import Case, _check, _grads, _inputs, reference_grads

pytestmark = requires_cuda

KERNELS = ["default", "mma_sync"]


@pytest.fixture
def backward_kernel(request, monkeypatch):
    use_kernel(monkeypatch, "JAX_SPARSEK_BACKWARD_KERNEL", request.param)
    return request.param


def test_kernel_choice(monkeypatch):
    ext = _extension.load_extension()
    monkeypatch.delenv("JAX_SPARSEK_BACKWARD_KERNEL", raising=False)
    expected = "sm90_wgmma" if on_hopper_build() else "mma_sync"
    assert ext.backward_kernel(72) == expected
    assert ext.backward_kernel(128) == expected
    assert ext.backward_kernel(64) == "mma_sync"
    assert ext.backward_kernel(256) == "mma_sync"
    monkeypatch.setenv("JAX_SPARSEK_BACKWARD_KERNEL", "mma_sync")
    assert ext.backward_kernel(128) == "mma_sync"
    # The forward's choice is its own.
    assert ext.forward_kernel(128) == expected


# Several dq row tiles (128) and dk/dv key tiles (128 dense, 64 SparseK), lengths that are
# multiples of no tile, T != S both ways, GQA 1/4/8, D = 96 (padded to 128) and 128, rows that
# see no key (T > S causal), full, causal and windowed.
CASES = {
    "T700_full_gqa4_d128_f16": (Case(1, 700, 700, 8, 2, d=128), jnp.float16),
    "T1000_causal_gqa8_d128_bf16": (Case(1, 1000, 1000, 8, 1, d=128, is_causal=True),
                                    jnp.bfloat16),
    "T333_S900_window77_mha_d96_f16": (Case(2, 333, 900, 4, 4, d=96, is_causal=True,
                                            window=77), jnp.float16),
    "T500_S200_causal_gqa2_d128_f16": (Case(1, 500, 200, 4, 2, d=128, is_causal=True),
                                       jnp.float16),
    "T1_S640_full_gqa4_d128_bf16": (Case(2, 1, 640, 8, 2, d=128), jnp.bfloat16),
    "T600_K40_W32_gqa4_d128_f16": (Case(1, 600, 600, 8, 2, d=128, is_causal=True, topk=40,
                                        window=32), jnp.float16),
    "T1100_S2600_K96_W40_gqa8_d128_bf16": (Case(1, 1100, 2600, 8, 1, d=128, is_causal=True,
                                                topk=96, window=40), jnp.bfloat16),
    "T450_K500_W0_mha_d96_f16": (Case(1, 450, 450, 4, 4, d=96, is_causal=True, topk=500,
                                      window=0), jnp.float16),
}


@pytest.mark.parametrize("backward_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("name", list(CASES))
def test_backward_kernels(backward_kernel, name):
    case, dtype = CASES[name]
    q, k, v, u, w_out, w_lse = _inputs(case, dtype, seed=(backward_kernel,))
    if case.sparsek:  # some -inf scores: never selected, du = 0
        u = np.array(u)
        u[np.random.default_rng(3).random(u.shape) < 0.1] = -np.inf
        u = jnp.asarray(u)
    api = jax.block_until_ready(
        jax.jit(lambda *a: _grads(case, "cuda", *a))(q, k, v, u, w_out, w_lse))
    ref = reference_grads(case, q, k, v, u, w_out, w_lse)
    _check(case, api, ref, dtype, context=f"{backward_kernel} {name}")
    if case.sparsek:
        du = np.asarray(api["u"])
        assert np.all(du[np.isneginf(np.asarray(u))] == 0.0), "du of -inf scores"


def test_kernels_agree(monkeypatch):
    """Same inputs on both kernel pairs, a size past the float64 oracle: each within the
    tolerance of the other (a layout error would show as O(1) differences)."""
    case = Case(1, 3000, 3000, 8, 2, d=128, is_causal=True)
    q, k, v, u, w_out, w_lse = _inputs(case, jnp.float16)
    fn = jax.jit(lambda *a: _grads(case, "cuda", *a))

    monkeypatch.delenv("JAX_SPARSEK_BACKWARD_KERNEL", raising=False)
    default = jax.block_until_ready(fn(q, k, v, u, w_out, w_lse))
    monkeypatch.setenv("JAX_SPARSEK_BACKWARD_KERNEL", "mma_sync")
    mma = jax.block_until_ready(fn(q, k, v, u, w_out, w_lse))
    for name in mma:
        a = np.asarray(default[name].astype(jnp.float32), np.float64)
        b = np.asarray(mma[name].astype(jnp.float32), np.float64)
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err < 4e-3, f"d{name}: kernels differ by {err:.3g}"


def test_hopper_backward_deterministic(monkeypatch):
    """The wgmma kernels, like the others, use no atomics: two runs are bitwise equal."""
    monkeypatch.delenv("JAX_SPARSEK_BACKWARD_KERNEL", raising=False)
    case = Case(1, 1100, 2600, 8, 1, d=128, is_causal=True, topk=96, window=40)
    inputs = _inputs(case, jnp.float16)
    fn = jax.jit(lambda *a: _grads(case, "cuda", *a))
    first = jax.block_until_ready(fn(*inputs))
    second = jax.block_until_ready(fn(*inputs))
    for name in first:
        assert np.array_equal(np.asarray(first[name].astype(jnp.float32)),
                              np.asarray(second[name].astype(jnp.float32))), name
