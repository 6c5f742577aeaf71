"""Gradients of sparsek_attention on a CUDA device.

- Dense modes with implementation='cuda': the forward and backward CUDA kernels.
- SparseK with implementation=None, which on a GPU is the CUDA path (selection, forward and
  backward kernels).

Every gradient (q, k, v, scores) of sum(o * W) + sum(masked lse * Wl) is compared with the
float64 explicit gradients of the same (upcast) inputs computed on the CPU, under
SPARSEK.md's tolerances (2e-3 fp16, 1e-2 bf16), on ragged sizes (T = S = 17, T = 1 with
S = 100, T = 100 with S = 37 causal: rows that see no key), GQA 4, fp16 and bf16; the cuda
and xla gradients must agree. Every test needs the CUDA kernels (requires_cuda).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_qkv, rel_err, requires_cuda, rng_for, tolerance
from jax_sparsek import sparsek_attention
from jax_sparsek._backward_reference import (gated_attention_bwd_reference,
                                             sparsek_scores_grad)
from jax_sparsek._gates import sparsek_thresholds_and_gates
from jax_sparsek._reference import gated_attention_reference, key_positions_visible

pytestmark = requires_cuda

DENSE_IMPL = "cuda"
SPARSEK_IMPL = None


def _x64():
    """Context manager enabling float64 (restored on exit)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX

    return enable_x64()


def _cpu():
    return jax.devices("cpu")[0]


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int
    s: int
    hq: int
    hkv: int
    d: int = 64
    is_causal: bool = False
    window: int | None = None   # dense: sliding window (None = none); SparseK: W
    topk: int | None = None     # None: dense modes

    @property
    def sparsek(self) -> bool:
        return self.topk is not None

    def api_kwargs(self, implementation) -> dict:
        kw = dict(is_causal=self.is_causal, window=self.window, implementation=implementation)
        if self.sparsek:
            kw["topk"] = self.topk
        return kw

    def empty_rows(self) -> np.ndarray:
        pos = np.arange(self.t) + self.s - self.t
        return (pos < 0) if self.is_causal else np.zeros(self.t, bool)


# ------------------------------------------------------------------------------------------
# float64 oracle on the CPU


def _masked_lse(lse):
    return jnp.where(jnp.isfinite(lse), lse, 0.0)


def _explicit(q, k, v, u, dense_gates, topk, window, w_out, w_lse, *, sparse, scale):
    if sparse:
        tau, gates = sparsek_thresholds_and_gates(u, topk=topk, window=window,
                                                  num_queries=q.shape[1])
    else:
        gates = dense_gates
    o, lse = gated_attention_reference(q, k, v, gates, scale)
    d_lse = jnp.where(jnp.isfinite(lse), w_lse, 0.0)
    dq, dk, dv, g = gated_attention_bwd_reference(q, k, v, gates, o, lse, w_out, d_lse, scale,
                                                  need_gate_grad=True)
    grads = dict(q=dq, k=dk, v=dv)
    if sparse:
        grads["u"] = sparsek_scores_grad(u, tau, g, window=window)
    return grads


def _oracle_jit(fun, **kwargs):
    """jax.jit with XLA's backend optimisation off: faster CPU compiles of the oracle."""
    try:
        return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)
    except TypeError:  # a JAX without jit(compiler_options=...)
        return jax.jit(fun, **kwargs)


_explicit_jit = _oracle_jit(_explicit, static_argnames=("sparse", "scale"))


def reference_grads(case: Case, q, k, v, u, w_out, w_lse) -> dict:
    """float64 gradients (NumPy) of sum(o * w_out) + sum(masked lse * w_lse), on the CPU."""
    cpu = _cpu()
    with _x64(), jax.default_device(cpu):
        put = lambda x: jax.device_put(np.asarray(x, np.float64), cpu)  # noqa: E731
        dense = key_positions_visible(case.t, case.s, case.is_causal,
                                      0 if case.sparsek else (case.window or 0))
        u64 = put(u) if case.sparsek else put(np.zeros((case.b, case.s, case.hkv)))
        grads = _explicit_jit(put(q), put(k), put(v), u64, put(dense), case.topk or 1,
                              case.window or 0, put(w_out), put(w_lse), sparse=case.sparsek,
                              scale=1.0 / math.sqrt(case.d))
        return {name: np.asarray(g) for name, g in grads.items()}


# ------------------------------------------------------------------------------------------
# Gradients through the public API on the GPU


def _loss(case, implementation, q, k, v, u, w_out, w_lse):
    scores = (u,) if case.sparsek else ()
    out, lse = sparsek_attention(q, k, v, *scores, return_lse=True,
                                 **case.api_kwargs(implementation))
    return (jnp.sum(out.astype(jnp.float32) * w_out.astype(jnp.float32))
            + jnp.sum(_masked_lse(lse) * w_lse))


def _grads(case, implementation, q, k, v, u, w_out, w_lse):
    argnums = (0, 1, 2, 3) if case.sparsek else (0, 1, 2)
    loss = lambda q, k, v, u: _loss(case, implementation, q, k, v, u, w_out, w_lse)  # noqa: E731
    return dict(zip("qkvu", jax.grad(loss, argnums=argnums)(q, k, v, u)))


def _inputs(case: Case, dtype, seed=()):
    q, k, v = make_qkv(case.b, case.t, case.s, case.hq, case.hkv, case.d, dtype,
                       seed=("grad", case) + seed)
    rng = rng_for("grad-w", case, jnp.dtype(dtype).name, *seed)
    u = (jnp.asarray(rng.standard_normal((case.b, case.s, case.hkv)).astype(np.float32))
         if case.sparsek else None)
    w_out = jnp.asarray(rng.standard_normal(q.shape).astype(np.float32), dtype)
    w_lse = jnp.asarray(rng.standard_normal((case.b, case.hq, case.t)).astype(np.float32))
    return q, k, v, u, w_out, w_lse


def _check(case, api, ref, dtype, u_dtype=jnp.float32, context=""):
    tol = tolerance(dtype)
    assert set(api) == set(ref), (context, set(api), set(ref))
    for name in ref:
        expected = jnp.dtype(u_dtype) if name == "u" else jnp.dtype(dtype)
        assert api[name].dtype == expected, (context, name, api[name].dtype)
        got = np.asarray(api[name].astype(jnp.float32), np.float64)
        assert got.shape == ref[name].shape, (context, name, got.shape, ref[name].shape)
        assert not np.isnan(got).any(), f"{context}: NaN in d{name}"
        err = rel_err(got, ref[name])
        assert err < tol, f"{context}: d{name} relative error {err:.3g} >= {tol}"
    empty = case.empty_rows()
    if empty.any():
        dq = np.asarray(api["q"].astype(jnp.float32))
        assert np.all(dq[:, empty] == 0.0), f"{context}: dq of rows that see no key"


DENSE_CASES = {
    "T17_full_gqa4": Case(2, 17, 17, 8, 2),
    "T17_causal_mha": Case(2, 17, 17, 4, 4, is_causal=True),
    "T17_window5_gqa4": Case(1, 17, 17, 8, 2, is_causal=True, window=5),
    "T1_S100_full_gqa4": Case(2, 1, 100, 8, 2, d=128),
    "T1_S100_causal_gqa4": Case(2, 1, 100, 8, 2, is_causal=True),
    "T100_S37_causal_gqa4": Case(1, 100, 37, 8, 2, is_causal=True),
    "T100_S37_window7_gqa4": Case(1, 100, 37, 8, 2, d=128, is_causal=True, window=7),
}

SPARSEK_CASES = {
    "T17_K3_W2_gqa4": Case(2, 17, 17, 8, 2, is_causal=True, topk=3, window=2),
    "T1_S100_K8_W4_gqa4": Case(2, 1, 100, 8, 2, is_causal=True, topk=8, window=4),
    "T100_S37_K4_W0_gqa4": Case(1, 100, 37, 8, 2, is_causal=True, topk=4, window=0),
    "T100_S37_K1_W3_mha": Case(1, 100, 37, 2, 2, d=128, is_causal=True, topk=1, window=3),
}

DTYPE_PARAM = pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16],
                                      ids=["float16", "bfloat16"])


@DTYPE_PARAM
@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_cuda_grad(name, dtype):
    """Forward and backward CUDA kernels vs float64 on the CPU; and the same gradients with
    implementation='xla'."""
    case = DENSE_CASES[name]
    q, k, v, u, w_out, w_lse = _inputs(case, dtype)

    @jax.jit
    def both(q, k, v, w_out, w_lse):
        return (_grads(case, DENSE_IMPL, q, k, v, None, w_out, w_lse),
                _grads(case, "xla", q, k, v, None, w_out, w_lse))

    cuda, xla = both(q, k, v, w_out, w_lse)
    ref = reference_grads(case, q, k, v, None, w_out, w_lse)
    _check(case, cuda, ref, dtype, context=f"{name} {DENSE_IMPL}")
    _check(case, xla, ref, dtype, context=f"{name} xla")
    for grad_name in cuda:
        err = rel_err(np.asarray(cuda[grad_name].astype(jnp.float32)),
                      np.asarray(xla[grad_name].astype(jnp.float32)))
        assert err < tolerance(dtype), f"{name}: d{grad_name} cuda vs xla {err:.3g}"


@DTYPE_PARAM
@pytest.mark.parametrize("name", list(SPARSEK_CASES))
def test_sparsek_grad_on_gpu(name, dtype):
    """implementation=None on the GPU, all four gradients vs float64 on the CPU."""
    case = SPARSEK_CASES[name]
    q, k, v, u, w_out, w_lse = _inputs(case, dtype)
    api = jax.jit(lambda *a: _grads(case, SPARSEK_IMPL, *a))(q, k, v, u, w_out, w_lse)
    assert all(g.devices() == q.devices() for g in api.values())
    ref = reference_grads(case, q, k, v, u, w_out, w_lse)
    _check(case, api, ref, dtype, context=name)
    assert np.any(ref["u"]), f"{name}: du unexpectedly 0 (weak test)"
    du = np.asarray(api["u"])
    window_only = np.arange(case.s) > case.s - 1 - case.window
    assert np.all(du[:, window_only] == 0.0), f"{name}: du of keys only ever in windows"


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_dense_cuda_vmap_grad(dtype):
    """vmap(grad) over an extra leading axis through the CUDA forward."""
    case = DENSE_CASES["T17_window5_gqa4"]
    slices = [_inputs(case, dtype, seed=(i,)) for i in range(2)]
    stack = lambda j: jnp.stack([s[j] for s in slices])  # noqa: E731
    q, k, v, w_out, w_lse = (stack(j) for j in (0, 1, 2, 4, 5))
    batched = jax.jit(jax.vmap(lambda q, k, v, wo, wl: _grads(case, DENSE_IMPL, q, k, v, None,
                                                               wo, wl)))(q, k, v, w_out, w_lse)
    for i in range(2):
        ref = reference_grads(case, q[i], k[i], v[i], None, w_out[i], w_lse[i])
        _check(case, {n: g[i] for n, g in batched.items()}, ref, dtype, context=f"vmap {i}")
