"""Both CUDA backward kernel pairs (dq, dk/dv) against the float64 explicit gradients, on the
same device.

On Hopper (compute capability 9.0, built for sm_90a) the backward runs on the wgmma kernels
(bwd_dq_kernel_sm90.cuh, bwd_dkdv_kernel_sm90.cuh) for head dims 72 to 128, which
test_backward_gpu.py and test_gradients_gpu.py then exercise; the dk/dv kernel also computes
dq (float32 atomics; in SparseK mode also the rows' sums of g that du needs), unless
JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 keeps the dq kernel. JAX_SPARSEK_BACKWARD_KERNEL=mma_sync
sends calls to the mma.sync kernels, which every other GPU runs. Both variables are read at
every call, so one process can check every choice ("deterministic" below). Outputs are
poisoned with NaN before every run (conftest.py).
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

KERNELS = ["default", "deterministic", "mma_sync"]


def use_backward_kernel(monkeypatch, kernel: str) -> None:
    """'default', 'mma_sync', or 'deterministic' (the default kernels with dq in a kernel of
    its own, no atomics)."""
    use_kernel(monkeypatch, "JAX_SPARSEK_BACKWARD_KERNEL",
               "default" if kernel == "deterministic" else kernel)
    use_kernel(monkeypatch, "JAX_SPARSEK_DETERMINISTIC_BACKWARD",
               "1" if kernel == "deterministic" else "default")


@pytest.fixture
def backward_kernel(request, monkeypatch):
    use_backward_kernel(monkeypatch, request.param)
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


def test_dq_choice(monkeypatch):
    """dq comes from the dk/dv kernel's atomics in every mode on the Hopper kernels, and
    JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 or the mma.sync kernels turn that off."""
    ext = _extension.load_extension()
    use_backward_kernel(monkeypatch, "default")
    atomic = "dkdv_atomic" if on_hopper_build() else "dq_kernel"
    assert ext.backward_dq(128, False) == atomic
    assert ext.backward_dq(96, False) == atomic
    assert ext.backward_dq(128, True) == atomic
    assert ext.backward_dq(64, False) == "dq_kernel"
    assert _extension.build_info()["backward_dq"] == atomic
    for kernel in ("deterministic", "mma_sync"):
        use_backward_kernel(monkeypatch, kernel)
        assert ext.backward_dq(128, False) == "dq_kernel", kernel
        assert ext.backward_dq(128, True) == "dq_kernel", kernel


# Several dq row tiles (128) and dk/dv key tiles (128; 64 for SparseK's deterministic kernel),
# lengths that are multiples of no tile, T != S both ways, GQA 1/4/8, D = 96 (padded to 128)
# and 128, rows that see no key (T > S causal), full, causal and windowed.
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


@pytest.mark.parametrize("mode", ["causal", "sparsek"])
def test_kernels_agree(monkeypatch, mode):
    """Same inputs on every kernel choice, a size past the float64 oracle: each within the
    tolerance of the mma.sync kernels (a layout error would show as O(1) differences)."""
    if mode == "causal":
        case = Case(1, 3000, 3000, 8, 2, d=128, is_causal=True)
    else:
        case = Case(1, 3000, 3000, 8, 2, d=128, is_causal=True, topk=200, window=64)
    q, k, v, u, w_out, w_lse = _inputs(case, jnp.float16)
    fn = jax.jit(lambda *a: _grads(case, "cuda", *a))

    results = {}
    for kernel in KERNELS:
        use_backward_kernel(monkeypatch, kernel)
        results[kernel] = jax.block_until_ready(fn(q, k, v, u, w_out, w_lse))
    mma = results["mma_sync"]
    for kernel in ("default", "deterministic"):
        for name in mma:
            a = np.asarray(results[kernel][name].astype(jnp.float32), np.float64)
            b = np.asarray(mma[name].astype(jnp.float32), np.float64)
            err = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert err < 4e-3, f"{kernel} d{name}: kernels differ by {err:.3g}"


@pytest.mark.parametrize("mode", ["causal", "sparsek"])
def test_hopper_backward_deterministic(monkeypatch, mode):
    """With JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 two runs are bitwise equal. Without it dk and
    dv still are: only dq is added with atomics (and in SparseK mode the rows' sums of g,
    from which du's means come)."""
    if mode == "causal":
        case = Case(1, 1100, 2600, 8, 1, d=128, is_causal=True)
    else:
        case = Case(1, 1100, 2600, 8, 1, d=128, is_causal=True, topk=96, window=40)
    inputs = _inputs(case, jnp.float16)
    fn = jax.jit(lambda *a: _grads(case, "cuda", *a))
    for kernel in ("deterministic", "default"):
        use_backward_kernel(monkeypatch, kernel)
        first = jax.block_until_ready(fn(*inputs))
        second = jax.block_until_ready(fn(*inputs))
        for name in first:
            if kernel == "default" and name in ("q", "u"):
                continue
            assert np.array_equal(np.asarray(first[name].astype(jnp.float32)),
                                  np.asarray(second[name].astype(jnp.float32))), (kernel, name)


@pytest.mark.parametrize("mode", ["window", "sparsek"])
def test_deterministic_at_trace_time(monkeypatch, mode):
    """A program traced with JAX_SPARSEK_DETERMINISTIC_BACKWARD=1 reserved no dq accumulator:
    called after the variable is unset, it keeps the dq kernel (bitwise equal to the traced
    choice) instead of failing; one traced without it and called with it set reserves the
    accumulator but takes the dq kernel."""
    if mode == "window":
        case = Case(1, 700, 900, 8, 2, d=128, is_causal=True, window=200)
    else:
        case = Case(1, 700, 900, 8, 2, d=128, is_causal=True, topk=150, window=40)
    inputs = _inputs(case, jnp.float16)
    ref = reference_grads(case, *inputs)
    use_backward_kernel(monkeypatch, "deterministic")
    fn = jax.jit(lambda *a: _grads(case, "cuda", *a))
    traced_deterministic = jax.block_until_ready(fn(*inputs))
    use_backward_kernel(monkeypatch, "default")
    later = jax.block_until_ready(fn(*inputs))
    for name in later:
        assert np.array_equal(np.asarray(later[name].astype(jnp.float32)),
                              np.asarray(traced_deterministic[name].astype(jnp.float32))), name
    fn2 = jax.jit(lambda *a: _grads(case, "cuda", *a))
    jax.block_until_ready(fn2(*inputs))  # traced with the accumulator
    use_backward_kernel(monkeypatch, "deterministic")
    again = jax.block_until_ready(fn2(*inputs))
    for name in again:
        assert np.array_equal(np.asarray(again[name].astype(jnp.float32)),
                              np.asarray(traced_deterministic[name].astype(jnp.float32))), name
    _check(case, later, ref, jnp.float16, context="deterministic at trace time")
