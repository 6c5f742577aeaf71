"""The SparseK mode of the pure-JAX reference (sparsek_gates, and sparsek_attention with
implementation='xla' or None) against the float64 NumPy reference of SPARSEK.md in
conftest.py, whose capped-simplex threshold is computed exactly by sorting.

Runs on any machine. XLA compiles are the cost here (about a second each on a small CPU), so
the gate grid computes all (topk, window) pairs of one shape in a single jitted call, and each
batch entry of the scores is a different pattern (ties, -inf padding, scaled scores, ...).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (DTYPES, assert_attention_close, make_qkv,
                      numpy_attention, numpy_capped_simplex, numpy_gated_attention,
                      numpy_sparsek_attention, numpy_sparsek_gates, rng_for)
from jax_sparsek import sparsek_attention, sparsek_gates

F32_EPS = float(np.finfo(np.float32).eps)

# --------------------------------------------------------------------------------------------
# Scores: one pattern per batch entry

VARIANTS = ("normal", "integers", "halves", "all_equal", "padded", "all_neginf", "x100",
            "x0.01")


def make_scores(variants, kv_len, kv_heads, dtype=jnp.float32, seed=()):
    """Scores [len(variants), S, Hkv]: batch entry b follows the pattern variants[b].

    integers / halves: heavy ties, and breakpoints u_j - 1 that coincide with other scores
    (thresholds that are not unique); all_equal: every score 0.3; padded: the last S/4 keys
    and about 20% of the others -inf; all_neginf: nothing can be selected; x100 / x0.01:
    scores of large magnitude / tiny spread.
    """
    rng = rng_for("scores", tuple(variants), kv_len, kv_heads, *seed)
    rows = []
    for name in variants:
        x = rng.standard_normal((kv_len, kv_heads))
        if name == "integers":
            x = np.round(2.0 * x)
        elif name == "halves":
            x = np.round(2.0 * x) / 2.0
        elif name == "all_equal":
            x = np.full_like(x, 0.3)
        elif name == "padded":
            x[rng.random(x.shape) < 0.2] = -np.inf
            x[-max(1, kv_len // 4):] = -np.inf
        elif name == "all_neginf":
            x = np.full_like(x, -np.inf)
        elif name == "x100":
            x = 100.0 * x
        elif name == "x0.01":
            x = 0.01 * x
        else:
            assert name == "normal", name
        rows.append(x)
    return jnp.asarray(np.stack(rows).astype(np.float32), dtype)


def _gate_atol(u_row) -> float:
    """Absolute tolerance of float32 thresholds and gates for scores u_row (a few ulps of the
    largest finite score, and of 1)."""
    finite = np.asarray(u_row, np.float64)
    finite = finite[np.isfinite(finite)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    return 8 * F32_EPS * scale


# --------------------------------------------------------------------------------------------
# The NumPy oracle itself


def test_numpy_capped_simplex_examples():
    lo, hi, m = numpy_capped_simplex([3.0, 2.0, 1.0, 0.0], 2)
    assert lo == hi == 1.0 and m.tolist() == [1.0, 1.0, 0.0, 0.0]
    lo, hi, m = numpy_capped_simplex([5.0, 5.0, 0.0, 0.0], 2)  # f flat at 2 on [0, 4]
    assert (lo, hi) == (0.0, 4.0) and m.tolist() == [1.0, 1.0, 0.0, 0.0]
    lo, hi, m = numpy_capped_simplex([0.3] * 4, 1)
    np.testing.assert_allclose([lo, hi], 0.05, rtol=1e-12)
    np.testing.assert_allclose(m, 0.25, rtol=1e-12)
    lo, hi, m = numpy_capped_simplex([0.5, 0.2, 0.1], 1)  # every gate fractional
    np.testing.assert_allclose([lo, hi], -0.2 / 3, rtol=1e-12)
    np.testing.assert_allclose(m, np.array([0.5, 0.2, 0.1]) + 0.2 / 3, rtol=1e-12)


@pytest.mark.parametrize("kind", ["normal", "integers", "halves", "x100"])
@pytest.mark.parametrize("n,topk", [(2, 1), (5, 3), (40, 1), (40, 7), (129, 64)])
def test_numpy_capped_simplex_vs_bisection(kind, n, topk):
    """The sorted projection against a float64 bisection of f(tau) = K (to the smallest root):
    same gates, sum K, and the bisection's root is the lower end of the admissible interval."""
    rng = rng_for("simplex", kind, n, topk)
    u = rng.standard_normal(n)
    u = {"normal": u, "integers": np.round(2 * u), "halves": np.round(2 * u) / 2,
         "x100": 100 * u}[kind]
    lo_t, hi_t, m = numpy_capped_simplex(u, topk)

    def f(tau):
        return np.clip(u - tau, 0.0, 1.0).sum()

    lo, hi = u.min() - 1.0, u.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > topk else (lo, mid)
    assert lo_t <= hi_t
    np.testing.assert_allclose(hi, lo_t, atol=1e-9 * max(1.0, np.abs(u).max()))
    np.testing.assert_allclose(m, np.clip(u - hi, 0.0, 1.0), atol=1e-9)
    np.testing.assert_allclose(m.sum(), topk, rtol=1e-12)
    for tau in (lo_t, hi_t, 0.5 * (lo_t + hi_t)):  # every admissible tau gives the same gates
        np.testing.assert_allclose(np.clip(u - tau, 0.0, 1.0), m, atol=1e-12)


def test_numpy_sparsek_attention_self_check():
    """numpy_sparsek_attention against a direct per-row loop over SPARSEK.md's formulas."""
    rng = np.random.default_rng(1)
    b, t, s, hq, hkv, d, k_top, w = 1, 6, 9, 4, 2, 8, 2, 2
    q, k, v = (rng.standard_normal(shape) for shape in
               ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))
    u = rng.standard_normal((b, s, hkv)).astype(np.float32).astype(np.float64)  # as used
    u[0, 1, 0] = -np.inf
    out, lse = numpy_sparsek_attention(q, k, v, u, k_top, w, scale=0.6)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(t):
            p = i + s - t
            window = [j for j in range(s) if p - w < j <= p]
            domain = [j for j in range(s) if j <= p - w and u[0, j, kh] > -np.inf]
            gate = {j: 1.0 for j in window}
            if len(domain) <= k_top:
                gate.update({j: 1.0 for j in domain})
            else:
                _, _, m = numpy_capped_simplex(u[0, domain, kh], k_top)
                assert abs(m.sum() - k_top) < 1e-12
                gate.update(dict(zip(domain, m)))
            weights = {j: g * np.exp(0.6 * q[0, i, h] @ k[0, j, kh])
                       for j, g in gate.items() if g > 0}
            total = sum(weights.values())
            np.testing.assert_allclose(lse[0, h, i], np.log(total), rtol=1e-12)
            expect = sum(wt * v[0, j, kh] for j, wt in weights.items()) / total
            np.testing.assert_allclose(out[0, i, h], expect, rtol=1e-11)


def test_numpy_gated_attention_binary_gates_is_dense():
    q, k, v = make_qkv(2, 7, 11, 4, 2, 8, jnp.float16, seed=("oracle",))
    rows = np.arange(7)[:, None] + 4
    gates = np.broadcast_to(np.arange(11)[None, :] <= rows, (2, 2, 7, 11)).astype(np.float64)
    got = numpy_gated_attention(q, k, v, gates)
    ref = numpy_attention(q, k, v, is_causal=True)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# sparsek_gates against the NumPy oracle, and the facts of SPARSEK.md "Gates"

# (S, T, Hkv, scores dtype) -> (topk, window) pairs, all computed by one jitted call.
# topk in {1, 3, >= S}, window in {0, 1, 5, >= S}; T = S, T < S (1, 9) and T > S.
GATE_GROUPS = {
    (1, 1, 2, "float32"): ((1, 0), (3, 5)),
    (1, 9, 2, "float32"): ((1, 0), (2, 1)),
    (7, 7, 2, "float32"): ((1, 0), (3, 1), (3, 5), (1, 5), (7, 0), (10, 1), (3, 7), (1, 12)),
    (7, 1, 2, "float32"): ((3, 0), (1, 2)),
    (7, 9, 2, "float32"): ((3, 1), (1, 0)),
    (40, 40, 2, "float32"): ((1, 0), (3, 1), (3, 5), (1, 5), (40, 0), (3, 40)),
    (40, 1, 2, "float32"): ((3, 0), (1, 5)),
    (40, 9, 2, "float32"): ((3, 5), (1, 0)),
    (40, 45, 2, "float32"): ((3, 1), (1, 0)),
    (129, 129, 2, "float32"): ((1, 0), (3, 5), (3, 1)),
    (129, 9, 2, "float32"): ((1, 1), (3, 0)),
    (40, 40, 1, "float32"): ((3, 0), (1, 1)),
    (40, 40, 2, "float16"): ((3, 1), (1, 0)),
    (40, 40, 2, "bfloat16"): ((3, 1), (1, 0)),
    (129, 129, 2, "bfloat16"): ((3, 0),),
}
GATE_CASES = [(group, kw) for group, pairs in GATE_GROUPS.items() for kw in pairs]


def _gate_case_id(case):
    (s, t, hkv, dtype), (topk, window) = case
    return f"S{s}-T{t}-Hkv{hkv}-{dtype}-K{topk}-W{window}"


@functools.cache
def _gate_group(group):
    """scores and, per (topk, window), sparsek_gates' (tau, gates) as float64 NumPy arrays."""
    s, t, hkv, dtype = group
    scores = make_scores(VARIANTS, s, hkv, jnp.dtype(dtype), seed=(t,))
    pairs = GATE_GROUPS[group]

    @jax.jit
    def all_pairs(u):
        return [sparsek_gates(u, topk=k, window=w, num_queries=t) for k, w in pairs]

    results = jax.device_get(all_pairs(scores))
    out = {}
    for pair, (tau, gates) in zip(pairs, results):
        assert tau.shape == (len(VARIANTS), hkv, t) and tau.dtype == np.float32
        assert gates.shape == (len(VARIANTS), hkv, t, s) and gates.dtype == np.float32
        out[pair] = (np.asarray(tau, np.float64), np.asarray(gates, np.float64))
    return np.asarray(scores.astype(jnp.float32), np.float64), out


@pytest.mark.parametrize("case", GATE_CASES, ids=_gate_case_id)
def test_gates_match_sorted_projection(case):
    (s, t, hkv, dtype), (topk, window) = case
    u, results = _gate_group(case[0])
    tau, gates = results[(topk, window)]
    ref_lo, ref_hi, ref_gates = numpy_sparsek_gates(u, topk, window, num_queries=t)
    for b, name in enumerate(VARIANTS):
        ctx = f"{name} K={topk} W={window} S={s} T={t}"
        atol = _gate_atol(u[b])
        assert not np.isnan(tau[b]).any() and not np.isnan(gates[b]).any(), ctx
        np.testing.assert_array_equal(np.isneginf(tau[b]), np.isneginf(ref_lo[b]),
                                      err_msg=f"{ctx}: -inf thresholds (|D_i| <= K)")
        finite = np.isfinite(ref_lo[b])
        below = ref_lo[b][finite] - atol - tau[b][finite]
        above = tau[b][finite] - ref_hi[b][finite] - atol
        assert np.all(below <= 0) and np.all(above <= 0), (
            f"{ctx}: tau outside the admissible interval by "
            f"{max(below.max(initial=0), above.max(initial=0)):.3g}")
        np.testing.assert_allclose(gates[b], ref_gates[b], rtol=0, atol=atol, err_msg=ctx)


def test_gates_all_ties_are_uniform():
    """All scores equal, |D_i| = n > K: every domain key gets K / n."""
    u = jnp.full((1, 12, 1), 0.7, jnp.float32)
    tau, gates = sparsek_gates(u, topk=3)
    tau, gates = np.asarray(tau), np.asarray(gates)
    for i in range(3, 12):  # |D_i| = i + 1 > 3
        np.testing.assert_allclose(gates[0, 0, i, :i + 1], 3.0 / (i + 1), rtol=1e-6)
        np.testing.assert_allclose(tau[0, 0, i], 0.7 - 3.0 / (i + 1), rtol=1e-5)
    assert np.all(gates[0, 0, :3, :] == np.tril(np.ones((3, 12))))  # |D_i| <= 3: all 1
    assert np.all(np.isneginf(tau[0, 0, :3])) and np.all(np.isfinite(tau[0, 0, 3:]))


@pytest.mark.parametrize("case", GATE_CASES, ids=_gate_case_id)
def test_gate_properties(case):
    """SPARSEK.md's facts, on sparsek_gates' own output: gates in [0, 1]; window keys 1; keys
    after p(i) and -inf keys outside the window 0; the domain's gates sum to min(K, |D_i|);
    tau never decreases along the rows; a key at or below tau_i stays at 0 for later rows."""
    (s, t, hkv, dtype), (topk, window) = case
    u, results = _gate_group(case[0])
    tau, gates = results[(topk, window)]
    keys = np.arange(s)
    for b, name in enumerate(VARIANTS):
        atol = _gate_atol(u[b])
        for h in range(hkv):
            ctx = f"{name} head {h} K={topk} W={window} S={s} T={t}"
            g, tau_bh, u_bh = gates[b, h], tau[b, h], u[b, :, h]
            assert np.all((g >= 0.0) & (g <= 1.0)), ctx
            for i in range(t):
                p = i + s - t
                in_window = (keys <= p) & (keys > p - window)
                domain = (keys <= p - window) & (u_bh > -np.inf)
                assert np.all(g[i, in_window] == 1.0), f"{ctx} row {i}: window keys"
                assert np.all(g[i, keys > p] == 0.0), f"{ctx} row {i}: future keys"
                assert np.all(g[i, np.isneginf(u_bh) & ~in_window] == 0.0), (
                    f"{ctx} row {i}: -inf keys")
                np.testing.assert_allclose(g[i, domain].sum(), min(topk, domain.sum()),
                                           rtol=1e-4, err_msg=f"{ctx} row {i}: gate sum")
                assert np.isneginf(tau_bh[i]) == (domain.sum() <= topk), f"{ctx} row {i}"
                if np.isfinite(tau_bh[i]):
                    evicted = domain & (u_bh < tau_bh[i] - 2 * atol)
                    assert np.all(g[i:, evicted] == 0.0), f"{ctx} row {i}: evicted keys"
            finite = np.isfinite(tau_bh)
            # The domain only grows: a finite threshold stays finite and never decreases.
            assert np.all(finite[1:] >= finite[:-1]), ctx
            steps = np.diff(tau_bh[finite])
            assert np.all(steps >= -atol), f"{ctx}: tau decreases by {-steps.min():.3g}"


# --------------------------------------------------------------------------------------------
# sparsek_attention against numpy_sparsek_attention

# id: (dtype, head_dim, Hq, Hkv, T, S, topk, window, score variants per batch entry,
#      scores dtype)
ATTENTION_CASES = {
    "f16-D16-mha": (jnp.float16, 16, 2, 2, 17, 17, 3, 0, ("normal", "integers"), "float32"),
    "bf16-D64-gqa4": (jnp.bfloat16, 64, 4, 1, 17, 17, 3, 2, ("normal", "halves"), "float32"),
    "f16-D64-gqa4-ties": (jnp.float16, 64, 8, 2, 33, 33, 5, 4, ("all_equal", "integers"),
                          "float32"),
    "bf16-D16-gqa8": (jnp.bfloat16, 16, 8, 1, 33, 33, 4, 1, ("normal", "padded"),
                      "float32"),
    "bf16-D16-decode": (jnp.bfloat16, 16, 4, 1, 1, 33, 4, 3, ("normal", "padded"), "float32"),
    "f16-D16-K-covers-domain": (jnp.float16, 16, 4, 1, 9, 33, 40, 0, ("normal", "padded"),
                                "float32"),
    "bf16-D64-T>S": (jnp.bfloat16, 64, 4, 2, 33, 17, 3, 2, ("padded", "normal"), "float32"),
    "f16-D16-W>=S": (jnp.float16, 16, 2, 1, 17, 17, 2, 17, ("normal", "all_neginf"),
                     "float32"),
    "bf16-D16-empty-rows-W0": (jnp.bfloat16, 16, 2, 1, 17, 17, 1, 0,
                               ("all_neginf", "normal"), "float32"),
    "f16-D64-scaled-scores": (jnp.float16, 64, 4, 1, 17, 33, 1, 1, ("x100", "x0.01"),
                              "float32"),
    "bf16-D64-bf16-scores": (jnp.bfloat16, 64, 4, 4, 33, 33, 7, 5, ("normal", "integers"),
                             "bfloat16"),
    "f16-D16-f16-scores-T<S": (jnp.float16, 16, 4, 2, 17, 33, 2, 0, ("halves", "padded"),
                               "float16"),
    "f16-T1-S1": (jnp.float16, 16, 2, 1, 1, 1, 1, 0, ("normal", "all_neginf"), "float32"),
}


def _attention_inputs(case_id):
    dtype, d, hq, hkv, t, s, topk, window, variants, scores_dtype = ATTENTION_CASES[case_id]
    q, k, v = make_qkv(len(variants), t, s, hq, hkv, d, dtype, seed=(case_id,))
    u = make_scores(variants, s, hkv, jnp.dtype(scores_dtype), seed=(case_id,))
    return q, k, v, u, topk, window


@functools.cache
def _attention_reference(case_id):
    q, k, v, u, topk, window = _attention_inputs(case_id)
    return numpy_sparsek_attention(q, k, v, u, topk, window)


def _check_sparsek(out, lse, case_id, context=""):
    q, _, _, _, _, _ = _attention_inputs(case_id)
    b, t, hq, _ = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, hq, t) and lse.dtype == jnp.float32
    assert not np.isnan(np.asarray(lse)).any(), f"{context}: NaN in lse"
    ref_o, ref_lse = _attention_reference(case_id)
    assert_attention_close(out, lse, ref_o, ref_lse, q.dtype, context=f"{case_id} {context}")
    return ref_o, ref_lse


@pytest.mark.parametrize("case_id", list(ATTENTION_CASES))
def test_attention_matches_numpy(case_id):
    q, k, v, u, topk, window = _attention_inputs(case_id)
    out, lse = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                                 implementation="xla", return_lse=True)
    _, ref_lse = _check_sparsek(out, lse, case_id, "xla")
    # Edge cases really reached: the cases meant to have empty rows have them.
    if case_id in ("bf16-D64-T>S", "bf16-D16-empty-rows-W0", "f16-T1-S1"):
        assert np.isneginf(ref_lse).any()


@pytest.mark.parametrize("case_id", ["bf16-D64-gqa4", "bf16-D64-T>S", "f16-D64-scaled-scores"])
def test_default_implementation_matches_xla(case_id):
    """implementation=None: the reference too (no SparseK kernel yet), bit for bit."""
    q, k, v, u, topk, window = _attention_inputs(case_id)
    kwargs = dict(topk=topk, window=window, is_causal=True, return_lse=True)
    default = sparsek_attention(q, k, v, u, **kwargs)
    xla = sparsek_attention(q, k, v, u, implementation="xla", **kwargs)
    for a, b in zip(default, xla):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    _check_sparsek(*default, case_id, "implementation=None")


def test_all_neginf_scores_without_window_give_zero_rows():
    q, k, v, u, topk, window = _attention_inputs("bf16-D16-empty-rows-W0")
    out, lse = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                                 implementation="xla", return_lse=True)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.all(out[0] == 0.0) and np.all(np.isneginf(lse[0]))  # batch 0: every score -inf
    assert np.all(np.isfinite(lse[1]))


# --------------------------------------------------------------------------------------------
# The dense limits: with every gate 0 or 1 and nothing excluded, SparseK is causal attention


def test_dense_limits_equal_causal():
    """K >= S with W = 0, K >= S with any W, and W >= S with any K: causal dense attention."""
    dtype, s, t = jnp.bfloat16, 21, 15
    q, k, v = make_qkv(2, t, s, 4, 2, 32, dtype, seed=("dense-limit",))
    u = make_scores(("normal", "integers"), s, 2, seed=("dense-limit",))
    limits = [(s, 0), (s + 10, 0), (s, 3), (10 * s, 2 * s), (1, s), (3, s + 7)]

    @jax.jit
    def run(q, k, v, u):
        dense = sparsek_attention(q, k, v, is_causal=True, implementation="xla",
                                  return_lse=True)
        sparse = [sparsek_attention(q, k, v, u, topk=topk, window=w, is_causal=True,
                                    implementation="xla", return_lse=True)
                  for topk, w in limits]
        return dense, sparse

    (dense_o, dense_lse), sparse = run(q, k, v, u)
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=True)
    assert_attention_close(dense_o, dense_lse, ref_o, ref_lse, dtype, context="dense")
    for (topk, w), (o, lse) in zip(limits, sparse):
        ctx = f"K={topk} W={w}"
        assert_attention_close(o, lse, ref_o, ref_lse, dtype, context=ctx)
        np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(dense_o, np.float32),
                                   rtol=1e-2, atol=1e-2, err_msg=ctx)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(dense_lse), rtol=1e-5,
                                   atol=1e-5, err_msg=ctx)
    # The oracles agree too.
    for topk, w in limits:
        o64, lse64 = numpy_sparsek_attention(q, k, v, u, topk, w)
        np.testing.assert_allclose(o64, ref_o, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lse64, ref_lse, rtol=1e-12)


def test_window_only_equals_sliding_window():
    """K >= S with -inf scores outside the window selects nothing more: a sliding window.
    With every score -inf, SparseK with window W is the dense sliding window of W keys."""
    dtype, s, t, w = jnp.float16, 19, 19, 4
    q, k, v = make_qkv(1, t, s, 2, 1, 16, dtype, seed=("window-only",))
    u = make_scores(("all_neginf",), s, 1)
    got = sparsek_attention(q, k, v, u, topk=s, window=w, is_causal=True,
                            implementation="xla", return_lse=True)
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=True, window=w)
    assert_attention_close(*got, ref_o, ref_lse, dtype, context="window only")


# --------------------------------------------------------------------------------------------
# Transformations: jit, vmap, eval_shape


def test_jit_equals_eager():
    case_id = "bf16-D64-gqa4"
    q, k, v, u, topk, window = _attention_inputs(case_id)
    f = functools.partial(sparsek_attention, topk=topk, window=window, is_causal=True,
                          implementation="xla", return_lse=True)
    eager = f(q, k, v, u)
    jitted = jax.jit(f)(q, k, v, u)
    for a, b in zip(eager, jitted):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-6, atol=1e-6)
    _check_sparsek(*jitted, case_id, "jit")


def test_vmap_scores_mapped_and_unmapped():
    dtype, n, b, t, s, hq, hkv, d, topk, w = jnp.float16, 2, 2, 13, 21, 4, 2, 16, 3, 2
    triples = [make_qkv(b, t, s, hq, hkv, d, dtype, seed=("vmap", i)) for i in range(n)]
    q, k, v = (jnp.stack(xs) for xs in zip(*triples))
    u = jnp.stack([make_scores(("normal", "padded"), s, hkv, seed=("vmap", i))
                   for i in range(n)])
    f = functools.partial(sparsek_attention, topk=topk, window=w, is_causal=True,
                          implementation="xla", return_lse=True)

    @jax.jit
    def run(q, k, v, u):
        return (jax.vmap(f)(q, k, v, u),                                   # all mapped
                jax.vmap(f, in_axes=(0, 0, 0, None))(q, k, v, u[0]),       # scores unmapped
                jax.vmap(f, in_axes=(None, None, None, 0), out_axes=1)(q[0], k[0], v[0], u))

    mapped, unmapped_scores, only_scores = run(q, k, v, u)
    assert mapped[0].shape == q.shape and mapped[1].shape == (n, b, hq, t)
    assert only_scores[0].shape == (b, n, t, hq, d) and only_scores[1].shape == (b, n, hq, t)
    for i in range(n):
        ref = numpy_sparsek_attention(q[i], k[i], v[i], u[i], topk, w)
        assert_attention_close(mapped[0][i], mapped[1][i], *ref, dtype, context=f"mapped {i}")
        ref = numpy_sparsek_attention(q[i], k[i], v[i], u[0], topk, w)
        assert_attention_close(unmapped_scores[0][i], unmapped_scores[1][i], *ref, dtype,
                               context=f"scores unmapped {i}")
        ref = numpy_sparsek_attention(q[0], k[0], v[0], u[i], topk, w)
        assert_attention_close(only_scores[0][:, i], only_scores[1][:, i], *ref, dtype,
                               context=f"only scores mapped {i}")


@pytest.mark.parametrize("scores_dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_eval_shape(dtype, scores_dtype):
    b, t, s, hq, hkv, d = 3, 5, 11, 8, 2, 64
    args = (jax.ShapeDtypeStruct((b, t, hq, d), dtype),
            jax.ShapeDtypeStruct((b, s, hkv, d), dtype),
            jax.ShapeDtypeStruct((b, s, hkv, d), dtype),
            jax.ShapeDtypeStruct((b, s, hkv), scores_dtype))
    out, lse = jax.eval_shape(functools.partial(
        sparsek_attention, topk=4, window=2, is_causal=True, return_lse=True), *args)
    assert out.shape == (b, t, hq, d) and out.dtype == jnp.dtype(dtype)
    assert lse.shape == (b, hq, t) and lse.dtype == jnp.float32
    out_only = jax.eval_shape(functools.partial(sparsek_attention, topk=4, is_causal=True),
                              *args)
    assert out_only.shape == (b, t, hq, d) and out_only.dtype == jnp.dtype(dtype)
    tau, gates = jax.eval_shape(functools.partial(sparsek_gates, topk=4, window=2,
                                                  num_queries=t), args[3])
    assert tau.shape == (b, hkv, t) and tau.dtype == jnp.float32
    assert gates.shape == (b, hkv, t, s) and gates.dtype == jnp.float32


def test_gates_clamp_topk_and_window():
    """topk >= S and window >= S are clamped to S: the same gates as topk = S / window = S."""
    u = make_scores(("normal", "padded"), 9, 2)
    pairs = (((9, 0), (50, 0)), ((2, 9), (2, 1000)), ((9, 9), (10, 10)))
    results = jax.jit(lambda u: [[sparsek_gates(u, topk=k, window=w) for k, w in pair]
                                 for pair in pairs])(u)
    for pair, (a, b) in zip(pairs, results):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(pair))


def test_numpy_inputs_accepted():
    q, k, v, u, topk, window = _attention_inputs("f16-D16-mha")
    a = sparsek_attention(*(np.asarray(x) for x in (q, k, v, u)), topk=topk, window=window,
                          is_causal=True, implementation="xla")
    b = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                          implementation="xla")
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# --------------------------------------------------------------------------------------------
# The fused Hopper backward's split of du (csrc/attention/bwd_sparsek_du.h), in NumPy on the
# reference's float32 thresholds: because tau never decreases down the rows, each key's rows
# of F form one interval found by binary search with the gate's own float32 comparisons, and
#   du_j = sum_i [j in F_i] g_ij - sum_{i in [lo_j, hi_j)} mean_i
# equals SPARSEK.md's sum_i [j in F_i] (g_ij - mean_i).

def _first_row(n, start, holds):
    """The first row in [start, n) where holds(row) is true (n: none), by the kernel's
    binary search (holds is monotone: false, then true)."""
    lo, hi = start, n
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _fractional_intervals(u_col, tau_row, s, t, window):
    """[lo_j, hi_j) per key as fractional_rows() of bwd_sparsek_du.cu computes them."""
    u32, tau32 = u_col.astype(np.float32), tau_row.astype(np.float32)
    intervals = []
    for j in range(s):
        first = max(0, j + window - (s - t))
        if not u32[j] > -np.inf or first >= t:
            intervals.append((0, 0))
            continue
        lo = _first_row(t, first, lambda i: u32[j] - tau32[i] < np.float32(1))
        hi = _first_row(t, lo, lambda i: not u32[j] > tau32[i])
        intervals.append((lo, hi))
    return intervals


@pytest.mark.parametrize("group", [(40, 40, 2, "float32"), (129, 129, 2, "float32"),
                                   (40, 9, 2, "float32"), (40, 45, 2, "float32"),
                                   (129, 129, 2, "bfloat16")], ids=str)
def test_fractional_rows_are_intervals(group):
    s, t, _, _ = group
    u, results = _gate_group(group)
    rng = rng_for("du-split", group)
    keys = np.arange(s)
    with np.errstate(invalid="ignore"):
        for (topk, window), (tau, _) in results.items():
            for b, name in enumerate(VARIANTS):
                for h in range(u.shape[2]):
                    ctx = f"{name} head {h} K={topk} W={window} S={s} T={t}"
                    u32 = u[b, :, h].astype(np.float32)
                    tau32 = tau[b, h].astype(np.float32)
                    # F as the kernels' gate decides it: sparse domain, 0 < fl(u - tau) < 1.
                    pos = np.arange(t)[:, None] + (s - t)
                    domain = keys[None, :] <= pos - window
                    diff = u32[None, :] - tau32[:, None]
                    frac = domain & (diff > 0) & (diff < 1)
                    intervals = _fractional_intervals(u[b, :, h], tau[b, h], s, t, window)
                    in_interval = np.zeros_like(frac)
                    for j, (lo, hi) in enumerate(intervals):
                        in_interval[lo:hi, j] = True
                    np.testing.assert_array_equal(in_interval, frac, err_msg=ctx)

                    # Two query heads of the group, arbitrary g: the split equals the direct sum.
                    g = rng.standard_normal((2, t, s))
                    count = frac.sum(axis=1)
                    row_sums = (g * frac).sum(axis=2)  # [heads, T]
                    means = np.where(count > 0, row_sums / np.maximum(count, 1), 0.0)
                    direct = ((g - means[:, :, None]) * frac).sum(axis=(0, 1))
                    prefix = np.concatenate([[0.0], np.cumsum(means.sum(axis=0))])
                    split = (g * frac).sum(axis=(0, 1)) - np.array(
                        [prefix[hi] - prefix[lo] for lo, hi in intervals])
                    np.testing.assert_allclose(split, direct, rtol=1e-12, atol=1e-12,
                                               err_msg=ctx)
