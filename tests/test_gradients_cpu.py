"""Gradients of sparsek_attention on the reference path (runs on any machine).

1. The explicit backward formulas (_backward_reference.py: gated_attention_bwd_reference and
   sparsek_scores_grad, SPARSEK.md "Gradients") against central finite differences of the
   float64 forward reference (gated_attention_reference with the dense gates or
   sparsek_thresholds_and_gates): dense full / causal / window, T != S both ways (empty
   rows), GQA 1/2/4, SparseK with K in {1, 3, >= domain}, W in {0, 2}, -inf scores; the
   scores gradient du is checked coordinate by coordinate. Tied scores: no NaN.
2. The public API (jax.grad of sparsek_attention, implementation='xla', fp16/bf16) against
   those float64 gradients of the upcast inputs, under SPARSEK.md's tolerances, with and
   without the lse cotangent (return_lse=True), and exact zeros: du = 0 when every domain
   fits in the budget and for keys that only ever sit in windows, dq = 0 on empty rows.
3. Transformations: eager grad, jit(grad), vmap(grad), value_and_grad, two calls.

float64 is enabled only inside ``_x64()`` blocks, never globally. The float64 oracles take
topk / window / scale as traced arguments, so cases of one shape share one compilation, and
they (and the accuracy sweep, which is not about compilation) compile at XLA's backend
optimisation level 0: XLA:CPU compile time dominates this file. Section 3 uses plain jax.jit.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_qkv, rel_err, rng_for, tolerance
from jax_sparsek import sparsek_attention
from jax_sparsek._backward_reference import (gated_attention_bwd_reference,
                                             sparsek_scores_grad)
from jax_sparsek._gates import sparsek_thresholds_and_gates
from jax_sparsek._reference import gated_attention_reference, key_positions_visible

IMPL = "xla"
FD_EPS = 1e-6
FD_TOL = 1e-6
FD_DIRECTIONS = 3


def _x64():
    """Context manager enabling float64 (restored on exit)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX

    return enable_x64()


def _fast_jit(fun):
    """jax.jit with XLA's backend optimisation off (faster CPU compiles, same HLO)."""
    try:
        return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0})
    except TypeError:  # a JAX without jit(compiler_options=...)
        return jax.jit(fun)


# ------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int
    s: int
    hq: int
    hkv: int
    d: int = 16
    is_causal: bool = False
    window: int | None = None   # dense: sliding window (None = none); SparseK: W
    topk: int | None = None     # None: dense modes
    scores: str = "normal"      # SparseK: "normal", "pad" (some -inf), "tied"
    scores_dtype: str = "float32"  # public API: "float32" or "input" (q's dtype)
    scale: float | None = None

    @property
    def sparsek(self) -> bool:
        return self.topk is not None

    @property
    def scale_f(self) -> float:
        return 1.0 / math.sqrt(self.d) if self.scale is None else self.scale

    def api_kwargs(self) -> dict:
        kw = dict(is_causal=self.is_causal, window=self.window, scale=self.scale,
                  implementation=IMPL)
        if self.sparsek:
            kw["topk"] = self.topk
        return kw

    def oracle_params(self) -> dict:
        """Traced configuration of the float64 oracles (call inside _x64())."""
        dense = key_positions_visible(self.t, self.s, self.is_causal,
                                      0 if self.sparsek else (self.window or 0))
        return dict(sparse=jnp.asarray(self.sparsek), topk=jnp.asarray(self.topk or 1),
                    window=jnp.asarray(self.window or 0), scale=jnp.asarray(self.scale_f),
                    dense_gates=jnp.asarray(dense, jnp.float64))

    def empty_rows(self) -> np.ndarray:
        """Boolean [T]: rows that see no key whatever the scores (p(i) < 0 when causal)."""
        pos = np.arange(self.t) + self.s - self.t
        return (pos < 0) if self.is_causal else np.zeros(self.t, bool)

    def window_only_keys(self) -> np.ndarray:
        """Boolean [S], SparseK: keys in no row's sparse domain (j > S - 1 - W)."""
        return np.arange(self.s) > self.s - 1 - (self.window or 0)


def _make_scores(case: Case, rng, dtype=np.float32):
    u = rng.standard_normal((case.b, case.s, case.hkv)).astype(np.float32)
    if case.scores == "pad":
        u[:, :3, 0] = -np.inf                        # padding at the start of head 0
        u[rng.random(u.shape) < 0.2] = -np.inf       # and scattered elsewhere
    elif case.scores == "tied":
        u = rng.integers(0, 3, u.shape).astype(np.float32)   # many ties, integer gaps
    return jnp.asarray(u, dtype)


# ------------------------------------------------------------------------------------------
# float64 oracles: forward, loss, explicit backward (call inside _x64()). Dense cases pass
# u = zeros and ignore du.


def _forward(q, k, v, u, params):
    tau, sparse_gates = sparsek_thresholds_and_gates(u, topk=params["topk"],
                                                     window=params["window"],
                                                     num_queries=q.shape[1])
    gates = jnp.where(params["sparse"], sparse_gates, params["dense_gates"])
    o, lse = gated_attention_reference(q, k, v, gates, params["scale"])
    return o, lse, tau, gates


def _masked_lse(lse):
    return jnp.where(jnp.isfinite(lse), lse, 0.0)


def _loss(q, k, v, u, params, w_out, w_lse):
    o, lse, _, _ = _forward(q, k, v, u, params)
    return jnp.sum(o * w_out) + jnp.sum(_masked_lse(lse) * w_lse)


def _explicit(q, k, v, u, params, w_out, w_lse):
    o, lse, tau, gates = _forward(q, k, v, u, params)
    d_lse = jnp.where(jnp.isfinite(lse), w_lse, 0.0)
    dq, dk, dv, g = gated_attention_bwd_reference(q, k, v, gates, o, lse, w_out, d_lse,
                                                  params["scale"], need_gate_grad=True)
    du = sparsek_scores_grad(u, tau, g, window=params["window"])
    return dict(q=dq, k=dk, v=dv, u=du)


_explicit64 = _fast_jit(_explicit)


@_fast_jit
def _fd64(q, k, v, u, params, w_out, w_lse, deltas):
    """Explicit gradients, the loss, and the loss at the perturbed points: deltas holds
    [N, ...] stacks for q, k, v, u (one vmapped forward for all)."""
    def at(dq, dk, dv, du):
        return _loss(q + dq, k + dk, v + dv, u + du, params, w_out, w_lse)

    losses = jax.vmap(at)(*(deltas[n] for n in "qkvu"))
    return (_explicit(q, k, v, u, params, w_out, w_lse),
            _loss(q, k, v, u, params, w_out, w_lse), losses)


def _to64(x):
    return jnp.asarray(np.asarray(x, np.float64))


def reference_grads(case: Case, q, k, v, u, w_out, w_lse=None):
    """float64 explicit gradients (NumPy) of sum(o * w_out) + sum(masked lse * w_lse) at the
    inputs upcast to float64 (du only in the SparseK mode)."""
    if w_lse is None:
        w_lse = np.zeros((case.b, case.hq, case.t))
    if u is None:
        u = np.zeros((case.b, case.s, case.hkv))
    with _x64():
        grads = _explicit64(_to64(q), _to64(k), _to64(v), _to64(u), case.oracle_params(),
                            _to64(w_out), _to64(w_lse))
        grads = {name: np.asarray(g) for name, g in grads.items()}
    if not case.sparsek:
        del grads["u"]
    return grads


def reference_loss(case: Case, q, k, v, u, w_out, w_lse) -> float:
    if u is None:
        u = np.zeros((case.b, case.s, case.hkv))
    with _x64():
        return float(_fast_jit(_loss)(_to64(q), _to64(k), _to64(v), _to64(u),
                                      case.oracle_params(), _to64(w_out), _to64(w_lse)))


def _assert_finite(grads: dict, context=""):
    for name, g in grads.items():
        g = np.asarray(g, np.float64)
        assert not np.isnan(g).any(), f"{context}: NaN in d{name}"
        assert np.isfinite(g).all(), f"{context}: inf in d{name}"


# ------------------------------------------------------------------------------------------
# 1. Explicit backward vs finite differences of the float64 forward

_A = dict(b=1, t=16, s=16, hq=4, hkv=2)      # GQA 2
_B = dict(b=2, t=16, s=16, hq=2, hkv=2)      # GQA 1, batch 2
_C = dict(b=1, t=16, s=16, hq=4, hkv=1)      # GQA 4
_D = dict(b=1, t=7, s=19, hq=4, hkv=2)       # T < S
_E = dict(b=1, t=19, s=7, hq=4, hkv=1)       # T > S: causal rows with no key
_F = dict(b=2, t=1, s=31, hq=4, hkv=1)       # decode

FD_CASES = {
    "full_gqa2": Case(**_A),
    "causal_gqa2": Case(**_A, is_causal=True),
    "window4_gqa2": Case(**_A, is_causal=True, window=4),
    "causal_scale0.7": Case(**_A, is_causal=True, scale=0.7),
    "sk_K1_W0": Case(**_A, is_causal=True, topk=1, window=0),
    "sk_K1_W2": Case(**_A, is_causal=True, topk=1, window=2),
    "sk_K3_W0": Case(**_A, is_causal=True, topk=3, window=0),
    "sk_K3_W2": Case(**_A, is_causal=True, topk=3, window=2),
    "sk_Kall_W0": Case(**_A, is_causal=True, topk=16, window=0),
    "sk_Kall_W2": Case(**_A, is_causal=True, topk=40, window=2),
    "sk_pad_-inf": Case(**_A, is_causal=True, topk=2, window=1, scores="pad"),
    "full_gqa1": Case(**_B),
    "sk_K3_W2_gqa1": Case(**_B, is_causal=True, topk=3, window=2),
    "window4_gqa4": Case(**_C, is_causal=True, window=4),
    "sk_K1_W2_gqa4": Case(**_C, is_causal=True, topk=1, window=2),
    "full_T<S": Case(**_D),
    "causal_T<S": Case(**_D, is_causal=True),
    "sk_T<S": Case(**_D, is_causal=True, topk=3, window=2),
    "full_T>S": Case(**_E),
    "causal_T>S": Case(**_E, is_causal=True),
    "window3_T>S": Case(**_E, is_causal=True, window=3),
    "sk_T>S_K2_W0": Case(**_E, is_causal=True, topk=2, window=0),
    "sk_T>S_K1_W2": Case(**_E, is_causal=True, topk=1, window=2),
    "causal_T1": Case(**_F, is_causal=True),
    "sk_T1_K4_W3": Case(**_F, is_causal=True, topk=4, window=3),
}


def _fd_inputs(case: Case, seed):
    rng = rng_for(case, *seed)
    q = rng.standard_normal((case.b, case.t, case.hq, case.d))
    k = rng.standard_normal((case.b, case.s, case.hkv, case.d))
    v = rng.standard_normal((case.b, case.s, case.hkv, case.d))
    u = (np.asarray(_make_scores(case, rng), np.float64) if case.sparsek
         else np.zeros((case.b, case.s, case.hkv)))
    w_out = rng.standard_normal(q.shape)
    w_lse = rng.standard_normal((case.b, case.hq, case.t))
    return rng, dict(q=q, k=k, v=v, u=u), w_out, w_lse


def _central(losses):
    losses = np.asarray(losses)
    return (losses[0::2] - losses[1::2]) / (2 * FD_EPS)


@pytest.mark.parametrize("name", list(FD_CASES))
def test_explicit_backward_matches_finite_differences(name):
    case = FD_CASES[name]
    rng, args, w_out, w_lse = _fd_inputs(case, ("fd",))
    # +-eps along FD_DIRECTIONS random directions per argument; for u also every coordinate.
    # (Dense cases too, with u = 0 unused: one compilation per shape, and a check that u
    # does not reach the dense modes.)
    directions = {n: rng.standard_normal((FD_DIRECTIONS,) + a.shape) for n, a in args.items()}
    coords = np.eye(args["u"].size).reshape((args["u"].size,) + args["u"].shape)
    directions["u"] = np.concatenate([directions["u"], coords])
    # One batch of perturbed points: +-eps along each direction of each argument in turn.
    sizes = {n: 2 * len(d) for n, d in directions.items()}
    total = sum(sizes.values())
    deltas, start = {}, 0
    for n, d in directions.items():
        stack = np.zeros((total,) + args[n].shape)
        stack[start:start + sizes[n]] = np.stack([FD_EPS * d, -FD_EPS * d],
                                                 axis=1).reshape((-1,) + args[n].shape)
        deltas[n], start = stack, start + sizes[n]
    with _x64():
        grads, base, losses = _fd64(*(_to64(args[n]) for n in "qkvu"), case.oracle_params(),
                                    _to64(w_out), _to64(w_lse),
                                    {n: _to64(d) for n, d in deltas.items()})
        grads = {n: np.asarray(g) for n, g in grads.items()}
        base = float(base)
        losses, start = np.asarray(losses), 0
        losses_by_arg = {}
        for n in directions:
            losses_by_arg[n], start = losses[start:start + sizes[n]], start + sizes[n]
        losses = losses_by_arg
    assert grads["q"].dtype == np.float64
    assert np.isfinite(base)
    if not case.sparsek:
        del grads["u"]
        assert np.abs(_central(losses["u"])).max() <= 1e-9, f"{name}: u reaches a dense mode"
    _assert_finite(grads, name)

    for arg, dirs in directions.items():
        if arg not in grads:
            continue
        fd = _central(losses[arg])[:FD_DIRECTIONS]
        an = dirs[:FD_DIRECTIONS].reshape(FD_DIRECTIONS, -1) @ grads[arg].ravel()
        if np.linalg.norm(an) == 0.0:
            # Only du of a case whose domains all fit in the budget is identically 0.
            assert arg == "u" and case.topk >= case.s, (name, arg)
            assert np.abs(fd).max() <= 1e-9, f"{name}: du = 0 but finite differences {fd}"
            continue
        err = np.linalg.norm(fd - an) / np.linalg.norm(an)
        assert err < FD_TOL, f"{name}: d{arg} directional FD relative error {err:.3g}"

    empty = case.empty_rows()
    if empty.any():
        assert np.all(grads["q"][:, empty] == 0.0), f"{name}: dq of rows that see no key"
    if not case.sparsek:
        return

    du = grads["u"]
    fd_u = _central(losses["u"])[FD_DIRECTIONS:].reshape(du.shape)
    # du coordinate by coordinate, zeros included.
    zero = du == 0.0
    assert np.abs(fd_u[zero]).max(initial=0.0) <= 1e-8 * (1.0 + np.abs(du).max()), (
        f"{name}: du = 0 where the finite difference is {np.abs(fd_u[zero]).max():.3g}")
    if not zero.all():
        err = np.linalg.norm(fd_u - du) / np.linalg.norm(du)
        assert err < FD_TOL, f"{name}: du coordinate FD relative error {err:.3g}"
    # Shifting every score by a constant moves tau with it: no gate changes.
    np.testing.assert_allclose(du.sum(axis=1), 0.0, atol=1e-12 * (1 + np.abs(du).sum()))
    assert np.all(du[np.isneginf(args["u"])] == 0.0), f"{name}: du of -inf scores"
    assert np.all(du[:, case.window_only_keys()] == 0.0), f"{name}: du of window-only keys"
    if case.topk >= case.s:
        assert np.all(du == 0.0), f"{name}: rows with |D_i| <= K pass no gradient to u"
    else:
        assert np.linalg.norm(du) > 0, f"{name}: du unexpectedly 0 (weak test)"


def test_tied_scores_give_finite_gradients():
    """Integer scores with ties: the projection may sit on a kink (no finite differences),
    but every gradient is finite and du sums to 0 per kv head."""
    for topk, window in [(1, 0), (2, 1), (3, 2)]:
        case = Case(**_A, is_causal=True, topk=topk, window=window, scores="tied")
        _, args, w_out, w_lse = _fd_inputs(case, ("tied",))
        grads = reference_grads(case, *(args[n] for n in "qkvu"), w_out, w_lse)
        _assert_finite(grads, f"tied K={topk} W={window}")
        np.testing.assert_allclose(grads["u"].sum(axis=1), 0.0, atol=1e-9)
    # The public API (fp16 q/k/v, float32 tied scores): no NaN either.
    q, k, v = (jnp.asarray(args[n], jnp.float16) for n in "qkv")
    api = _api_grads(case, q, k, v, jnp.asarray(args["u"], jnp.float32),
                     jnp.asarray(w_out, jnp.float16), jnp.asarray(w_lse, jnp.float32))
    for grads in api:
        _assert_finite(grads, "tied (API)")


# ------------------------------------------------------------------------------------------
# 2. The public API (implementation='xla', fp16 / bf16) against the float64 gradients


def _public_loss(case: Case, q, k, v, u, w_out, w_lse, use_lse: bool):
    """sum(o * w_out) [+ sum(masked lse * w_lse)]; without use_lse, return_lse=False."""
    kwargs = case.api_kwargs()
    scores = (u,) if case.sparsek else ()
    if not use_lse:
        out = sparsek_attention(q, k, v, *scores, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * w_out.astype(jnp.float32))
    out, lse = sparsek_attention(q, k, v, *scores, return_lse=True, **kwargs)
    return (jnp.sum(out.astype(jnp.float32) * w_out.astype(jnp.float32))
            + jnp.sum(_masked_lse(lse) * w_lse))


def _grad_fn(case: Case, use_lse: bool):
    argnums = (0, 1, 2, 3) if case.sparsek else (0, 1, 2)

    def grads(q, k, v, u, w_out, w_lse):
        loss = lambda q, k, v, u: _public_loss(case, q, k, v, u, w_out, w_lse, use_lse)
        return dict(zip("qkvu", jax.grad(loss, argnums=argnums)(q, k, v, u)))

    return grads


def _api_grads(case, q, k, v, u, w_out, w_lse):
    """Gradients of the o-only loss (return_lse=False) and of the o + lse loss, one compile."""
    def both(*args):
        return _grad_fn(case, False)(*args), _grad_fn(case, True)(*args)

    return _fast_jit(both)(q, k, v, u, w_out, w_lse)


def _public_inputs(case: Case, dtype, seed=()):
    q, k, v = make_qkv(case.b, case.t, case.s, case.hq, case.hkv, case.d, dtype,
                       seed=(case,) + seed)
    rng = rng_for(case, jnp.dtype(dtype).name, "w", *seed)
    scores_dtype = dtype if case.scores_dtype == "input" else jnp.float32
    u = _make_scores(case, rng, scores_dtype) if case.sparsek else None
    # Output cotangent representable in the dtype: the API sees exactly what the reference sees.
    w_out = jnp.asarray(rng.standard_normal(q.shape).astype(np.float32), dtype)
    w_lse = jnp.asarray(rng.standard_normal((case.b, case.hq, case.t)).astype(np.float32))
    return q, k, v, u, w_out, w_lse


def _check_against_reference(case, api, ref, dtype, u=None, context=""):
    tol = tolerance(dtype)
    assert set(api) == set(ref), (context, set(api), set(ref))
    for name in ref:
        expected_dtype = u.dtype if name == "u" else jnp.dtype(dtype)
        assert api[name].dtype == expected_dtype, (context, name, api[name].dtype)
        got = np.asarray(api[name].astype(jnp.float32), np.float64)
        assert got.shape == ref[name].shape, (context, name, got.shape, ref[name].shape)
        assert not np.isnan(got).any(), f"{context}: NaN in d{name}"
        if not np.any(ref[name]):
            assert not np.any(got), f"{context}: d{name} must be exactly 0"
            continue
        err = rel_err(got, ref[name])
        assert err < tol, f"{context}: d{name} relative error {err:.3g} >= {tol}"
    empty = case.empty_rows()
    if empty.any():
        dq = np.asarray(api["q"].astype(jnp.float32))
        assert np.all(dq[:, empty] == 0.0), f"{context}: dq of rows that see no key"
    if case.sparsek:
        du = np.asarray(api["u"].astype(jnp.float32))
        assert np.all(du[:, case.window_only_keys()] == 0.0), (
            f"{context}: keys only ever in windows must get du = 0 exactly")
        assert np.all(du[np.isneginf(np.asarray(u.astype(jnp.float32)))] == 0.0), (
            f"{context}: -inf scores must get du = 0")
        if case.topk >= case.s:
            assert np.all(du == 0.0), f"{context}: domains within budget: du must be 0"
        elif case.t > 1:
            assert np.any(ref["u"]), f"{context}: du unexpectedly 0 (weak test)"


_P = dict(b=1, t=24, s=24, hq=4, hkv=2, d=32)
_Q = dict(b=1, t=24, s=24, hq=4, hkv=1, d=32)
_R = dict(b=1, t=30, s=9, hq=4, hkv=2, d=32)

API_CASES = {
    "full_gqa2": Case(**_P),
    "causal_gqa2": Case(**_P, is_causal=True),
    "window5_gqa4": Case(**_Q, is_causal=True, window=5),
    "causal_T<S_gqa1": Case(b=2, t=9, s=30, hq=2, hkv=2, d=32, is_causal=True),
    "causal_T>S": Case(**_R, is_causal=True),
    "sk_K3_W0": Case(**_P, is_causal=True, topk=3, window=0),
    "sk_K1_W2_gqa4_16bit_scores": Case(**_Q, is_causal=True, topk=1, window=2,
                                       scores_dtype="input"),
    "sk_Kall_W2": Case(**_P, is_causal=True, topk=24, window=2),
    "sk_pad": Case(**_P, is_causal=True, topk=3, window=1, scores="pad"),
    "sk_T>S": Case(**_R, is_causal=True, topk=2, window=0),
    "sk_T1": Case(b=2, t=1, s=40, hq=4, hkv=2, d=32, is_causal=True, topk=4, window=3),
}


# Every case in float16; these in bfloat16 too (same code path, coarser rounding).
BF16_CASES = ("full_gqa2", "window5_gqa4", "causal_T>S", "sk_K1_W2_gqa4_16bit_scores",
              "sk_pad", "sk_T>S")
API_PARAMS = ([(name, jnp.float16) for name in API_CASES]
              + [(name, jnp.bfloat16) for name in BF16_CASES])


@pytest.mark.parametrize("name,dtype", API_PARAMS,
                         ids=[f"{n}-{jnp.dtype(d).name}" for n, d in API_PARAMS])
def test_api_grad_matches_float64(name, dtype):
    """Both losses: o only (return_lse=False) and o + lse (the dlse path)."""
    case = API_CASES[name]
    q, k, v, u, w_out, w_lse = _public_inputs(case, dtype)
    api_o, api_lse = _api_grads(case, q, k, v, u, w_out, w_lse)
    ref_o = reference_grads(case, q, k, v, u, w_out)
    ref_lse = reference_grads(case, q, k, v, u, w_out, w_lse)
    _check_against_reference(case, api_o, ref_o, dtype, u, context=f"{name} (o)")
    _check_against_reference(case, api_lse, ref_lse, dtype, u, context=f"{name} (o+lse)")


# ------------------------------------------------------------------------------------------
# 3. Transformations: eager grad, jit(grad), vmap(grad), value_and_grad, two calls

SK_CASE = Case(b=1, t=17, s=17, hq=4, hkv=2, is_causal=True, topk=3, window=2)
DENSE_CASE = Case(b=1, t=17, s=21, hq=4, hkv=1, is_causal=True, window=6)


def test_eager_grad():
    """jax.grad outside jit (op-by-op; the dense mode only, eager dispatch compiles slowly)."""
    q, k, v, u, w_out, w_lse = _public_inputs(DENSE_CASE, jnp.float16)
    eager = _grad_fn(DENSE_CASE, True)(q, k, v, u, w_out, w_lse)
    ref = reference_grads(DENSE_CASE, q, k, v, u, w_out, w_lse)
    _check_against_reference(DENSE_CASE, eager, ref, jnp.float16, u, context="eager grad")


def test_jit_grad():
    q, k, v, u, w_out, w_lse = _public_inputs(SK_CASE, jnp.float16)
    jitted = jax.jit(_grad_fn(SK_CASE, True))(q, k, v, u, w_out, w_lse)
    ref = reference_grads(SK_CASE, q, k, v, u, w_out, w_lse)
    _check_against_reference(SK_CASE, jitted, ref, jnp.float16, u, context="jit(grad)")


@pytest.mark.parametrize("case,kv_axis", [(DENSE_CASE, 0), (SK_CASE, None)],
                         ids=["dense-all_mapped", "sparsek-kv_unmapped"])
def test_vmap_grad(case, kv_axis):
    """jit(vmap(grad)) over an extra leading axis: each slice matches its float64 gradients."""
    n = 3
    slices = [_public_inputs(case, jnp.bfloat16, seed=(i,)) for i in range(n)]
    q = jnp.stack([s[0] for s in slices])
    k, v = (slices[0][1], slices[0][2]) if kv_axis is None else (
        jnp.stack([s[1] for s in slices]), jnp.stack([s[2] for s in slices]))
    u = jnp.stack([s[3] for s in slices]) if case.sparsek else None
    w_out = jnp.stack([s[4] for s in slices])
    w_lse = jnp.stack([s[5] for s in slices])
    in_axes = (0, kv_axis, kv_axis, 0 if case.sparsek else None, 0, 0)
    batched = jax.jit(jax.vmap(_grad_fn(case, True), in_axes=in_axes))(
        q, k, v, u, w_out, w_lse)
    for i in range(n):
        ki, vi = (k, v) if kv_axis is None else (k[i], v[i])
        ui = u[i] if case.sparsek else None
        api = {name: g[i] for name, g in batched.items()}
        ref = reference_grads(case, q[i], ki, vi, ui, w_out[i], w_lse[i])
        _check_against_reference(case, api, ref, jnp.bfloat16, ui, context=f"vmap slice {i}")


def test_value_and_grad_through_two_calls():
    """loss = dense(q, k, v) + SparseK(q, k, v, u) sharing inputs: the gradients add up."""
    dense = dataclasses.replace(SK_CASE, topk=None, window=None)  # causal, same shapes
    q, k, v, u, w_out, w_lse = _public_inputs(SK_CASE, jnp.float16)
    w_out2, w_lse2 = jnp.flip(w_out, axis=1), -w_lse

    def loss(q, k, v, u):
        return (_public_loss(dense, q, k, v, None, w_out2, w_lse2, True)
                + _public_loss(SK_CASE, q, k, v, u, w_out, w_lse, True))

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, u)
    api = dict(zip("qkvu", grads))
    ref_d = reference_grads(dense, q, k, v, None, w_out2, w_lse2)
    ref_s = reference_grads(SK_CASE, q, k, v, u, w_out, w_lse)
    ref = {n: ref_s[n] + ref_d.get(n, 0.0) for n in ref_s}
    _check_against_reference(SK_CASE, api, ref, jnp.float16, u, context="two calls")

    assert value.dtype == jnp.float32 and value.shape == ()
    ref_value = (reference_loss(dense, q, k, v, None, w_out2, w_lse2)
                 + reference_loss(SK_CASE, q, k, v, u, w_out, w_lse))
    assert abs(float(value) - ref_value) <= 2e-3 * (1.0 + abs(ref_value)), (value, ref_value)


def test_x64_not_left_enabled():
    """The float64 blocks above restore the default: other test files see float32."""
    assert jnp.zeros(1).dtype == jnp.float32
    assert not jax.config.jax_enable_x64
