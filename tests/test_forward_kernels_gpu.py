"""Both CUDA forward kernels against the float64 reference, on the same device.

On Hopper (compute capability 9.0, built for sm_90a) the forward runs on the warp-specialized
wgmma kernel (fwd_kernel_sm90.cuh) for head dims 72 to 128, which the other GPU test files
then exercise; JAX_SPARSEK_FORWARD_KERNEL=mma_sync sends calls to the mma.sync kernel, which
every other GPU runs. The variable is read at every call, so one process can check both.
Outputs are poisoned with NaN before every run (conftest.py).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_attention_close, make_qkv, numpy_attention,
                      numpy_gated_attention, numpy_sparsek_attention, numpy_sparsek_gates,
                      on_hopper_build, requires_cuda, rng_for, use_kernel)
from jax_sparsek import _extension, sparsek_attention

pytestmark = requires_cuda

KERNELS = ["default", "mma_sync"]


@pytest.fixture
def forward_kernel(request, monkeypatch):
    use_kernel(monkeypatch, "JAX_SPARSEK_FORWARD_KERNEL", request.param)
    return request.param


def test_kernel_choice(monkeypatch):
    ext = _extension.load_extension()
    monkeypatch.delenv("JAX_SPARSEK_FORWARD_KERNEL", raising=False)
    expected = "sm90_wgmma" if on_hopper_build() else "mma_sync"
    assert ext.forward_kernel(80) == expected
    assert ext.forward_kernel(128) == expected
    assert ext.forward_kernel(64) == "mma_sync"
    assert ext.forward_kernel(256) == "mma_sync"
    monkeypatch.setenv("JAX_SPARSEK_FORWARD_KERNEL", "mma_sync")
    assert ext.forward_kernel(128) == "mma_sync"


# (B, T, S, Hq, Hkv, D, dtype, is_causal, window): ragged lengths, T != S, GQA, windows.
DENSE_CASES = [
    (2, 1000, 1000, 4, 2, 128, jnp.float16, False, None),
    (2, 1000, 1000, 4, 2, 128, jnp.bfloat16, True, None),
    (1, 77, 1000, 8, 1, 64, jnp.float16, True, None),
    (1, 1, 1000, 8, 2, 128, jnp.bfloat16, False, None),
    (1, 1000, 17, 4, 4, 64, jnp.bfloat16, True, None),
    (1, 700, 700, 4, 1, 128, jnp.float16, True, 37),
    (1, 513, 513, 2, 2, 96, jnp.float16, True, 1),
    (1, 300, 300, 2, 1, 40, jnp.bfloat16, False, None),
]


def _dense_id(case):
    b, t, s, hq, hkv, d, dtype, causal, window = case
    return (f"B{b}-T{t}-S{s}-Hq{hq}-Hkv{hkv}-D{d}-{jnp.dtype(dtype).name}"
            f"-{'causal' if causal else 'full'}-W{window}")


@pytest.mark.parametrize("forward_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("case", DENSE_CASES, ids=[_dense_id(c) for c in DENSE_CASES])
def test_dense_modes(forward_kernel, case):
    b, t, s, hq, hkv, d, dtype, is_causal, window = case
    q, k, v = make_qkv(b, t, s, hq, hkv, d, dtype, seed=("kernels", forward_kernel))
    out, lse = sparsek_attention(q, k, v, is_causal=is_causal, window=window,
                                 implementation="cuda", return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=is_causal, window=window)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype,
                           context=f"{forward_kernel} {_dense_id(case)}")


# The Hopper kernel puts the scale into the exponent and takes the raw scores' row max, which
# holds for scale > 0 only; other scales go to the mma.sync kernel (fwd_dispatch.cu). Large
# logits (scale 1.0 at D = 128: std 11) check the online softmax's stability there.
@pytest.mark.parametrize("forward_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("scale", [0.3, 1.0, -0.1])
def test_explicit_scale(forward_kernel, scale):
    q, k, v = make_qkv(1, 700, 900, 4, 2, 128, jnp.float16, seed=("scale", scale))
    out, lse = sparsek_attention(q, k, v, is_causal=True, scale=scale, implementation="cuda",
                                 return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    ref_o, ref_lse = numpy_attention(q, k, v, is_causal=True, scale=scale)
    assert_attention_close(out, lse, ref_o, ref_lse, jnp.float16,
                           context=f"{forward_kernel} scale={scale}")


# The Hopper kernel's running max is lazy: it moves only when a tile's max passes it by more
# than 8 (log2 domain; kMaxSlack, online_softmax.cuh), and a warp skips the output's rescale
# where none of its rows moved. Keys whose norms step up every 256 positions (scale 0.5 at
# D = 128: the scores' spread grows by ~5.7 a step) move every row's max by far more than
# that every other tile and leave it lagging in between: the probabilities reach 2^8.
@pytest.mark.parametrize("forward_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("sparsek", [False, True], ids=["causal", "sparsek"])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["fp16", "bf16"])
def test_growing_row_max(forward_kernel, sparsek, dtype):
    b, t, s, hq, hkv, d, topk, window, scale = 1, 900, 1300, 4, 2, 128, 300, 100, 0.5
    q, k, v = make_qkv(b, t, s, hq, hkv, d, dtype, seed=("growing-max", sparsek))
    steps = 1.0 + np.arange(s, dtype=np.float32) // 256
    k = (k.astype(jnp.float32) * steps[None, :, None, None]).astype(dtype)
    u = None
    if sparsek:
        u = jnp.asarray(rng_for("growing-max-scores").standard_normal((b, s, hkv), np.float32))
    out, lse = sparsek_attention(q, k, v, u, topk=topk if sparsek else None,
                                 window=window if sparsek else None, is_causal=True,
                                 scale=scale, implementation="cuda", return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    if sparsek:
        ref_o, ref_lse = numpy_sparsek_attention(q, k, v, u, topk, window, scale=scale)
    else:
        ref_o, ref_lse = numpy_attention(q, k, v, is_causal=True, scale=scale)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype,
                           context=f"{forward_kernel} sparsek={sparsek}")


# SparseK with an explicit scale: the mma.sync kernel folds a gate into a score as log2(m);
# the Hopper kernel takes the raw scores' max and multiplies the gate after exp2(s c - max c),
# c = scale * log2(e) (a negative scale goes to the mma.sync kernel).
@pytest.mark.parametrize("forward_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("scale", [0.25, -0.2])
def test_sparsek_explicit_scale(forward_kernel, scale):
    b, t, s, hq, hkv, d, dtype, topk, window = 1, 900, 900, 4, 1, 128, jnp.bfloat16, 60, 40
    q, k, v = make_qkv(b, t, s, hq, hkv, d, dtype, seed=("sparsek-scale", scale))
    rng = rng_for("sparsek-scale-scores", scale)
    u = jnp.asarray(rng.standard_normal((b, s, hkv)).astype(np.float32))
    out, lse = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                                 scale=scale, implementation="cuda", return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    ref_o, ref_lse = numpy_sparsek_attention(q, k, v, u, topk, window, scale=scale)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype,
                           context=f"{forward_kernel} scale={scale}")


# (B, T, S, Hq, Hkv, D, dtype, topk, window): several gathered key tiles and the tail range;
# the last case visits enough tiles (up to 9 a query tile) that every stage and key slot of
# the warp-specialized kernel is reused several times.
SPARSEK_CASES = [
    (1, 600, 600, 4, 1, 128, jnp.float16, 40, 32),
    (2, 333, 333, 8, 2, 64, jnp.bfloat16, 100, 0),
    (1, 1, 900, 4, 2, 128, jnp.bfloat16, 64, 16),
    (1, 250, 700, 4, 4, 128, jnp.float16, 150, 200),
    (1, 2500, 2500, 4, 2, 128, jnp.bfloat16, 700, 300),
    # Window bands several key tiles wide, T != S: on the Hopper kernel the range tiles that lie
    # inside every row's band take the ungated update (the first), or every tile does (W > S).
    (1, 700, 1500, 4, 2, 128, jnp.float16, 200, 520),
    (1, 300, 1000, 2, 2, 128, jnp.bfloat16, 50, 2000),
    # A head dim below the Hopper kernel's 128: its gathers zero-fill the columns past it.
    (1, 700, 900, 4, 2, 96, jnp.float16, 150, 64),
]


def _sparsek_id(case):
    b, t, s, hq, hkv, d, dtype, topk, window = case
    return f"B{b}-T{t}-S{s}-Hq{hq}-Hkv{hkv}-D{d}-{jnp.dtype(dtype).name}-K{topk}-W{window}"


@pytest.mark.parametrize("forward_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("case", SPARSEK_CASES, ids=[_sparsek_id(c) for c in SPARSEK_CASES])
def test_sparsek(forward_kernel, case):
    _check_sparsek_case(case, "kernels-sparsek", forward_kernel, forward_kernel)


def _check_sparsek_case(case, label, setting, context):
    """One SPARSEK_CASES-style case on the CUDA kernels against the float64 reference: fresh
    q, k, v and normal scores (a tenth of them -inf) drawn from `label` and `setting`."""
    b, t, s, hq, hkv, d, dtype, topk, window = case
    q, k, v = make_qkv(b, t, s, hq, hkv, d, dtype, seed=(label, setting))
    rng = rng_for(f"{label}-scores", *case[:6], topk, window)
    u = rng.standard_normal((b, s, hkv)).astype(np.float32)
    u[rng.random(u.shape) < 0.1] = -np.inf
    u = jnp.asarray(u)
    out, lse = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                                 implementation="cuda", return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    ref_o, ref_lse = numpy_sparsek_attention(q, k, v, u, topk, window)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype, context=f"{context} {case}")


# (B, T, S, Hq, Hkv, D, dtype, topk, window): GQA groups of 2 to 8 query heads, which a CTA of
# the Hopper SparseK forward takes in turn (JAX_SPARSEK_FWD_HEADS_PER_CTA asks for the count:
# the largest that divides the group, up to it): ragged T, T != S, T = 1, W = 0 and W > S,
# D = 96, and query tiles of up to 20 key tiles (a chain of 8 heads then runs 160 steps
# through the stages and key slots).
CHAINED_HEAD_CASES = [
    (1, 600, 600, 8, 1, 128, jnp.float16, 40, 32),
    (2, 333, 333, 8, 2, 128, jnp.bfloat16, 100, 0),
    (1, 1, 900, 4, 1, 128, jnp.bfloat16, 64, 16),
    (1, 2500, 2500, 8, 1, 128, jnp.bfloat16, 700, 300),
    (1, 700, 1500, 4, 2, 128, jnp.float16, 200, 520),
    (1, 300, 1000, 4, 1, 96, jnp.bfloat16, 50, 2000),
]


@pytest.mark.parametrize("heads_per_cta", ["1", "2", "4", "8"])
@pytest.mark.parametrize("case", CHAINED_HEAD_CASES,
                         ids=[_sparsek_id(c) for c in CHAINED_HEAD_CASES])
def test_sparsek_chained_heads(monkeypatch, heads_per_cta, case):
    if not on_hopper_build():
        pytest.skip("only the Hopper kernel chains query heads")
    monkeypatch.delenv("JAX_SPARSEK_FORWARD_KERNEL", raising=False)
    monkeypatch.setenv("JAX_SPARSEK_FWD_HEADS_PER_CTA", heads_per_cta)
    _check_sparsek_case(case, "kernels-chained", heads_per_cta,
                        f"heads_per_cta={heads_per_cta}")


@pytest.mark.parametrize("heads_per_cta", ["2", "4"])
def test_sparsek_chained_heads_empty_tile(monkeypatch, heads_per_cta):
    """Every score -inf and W = 0 over 129 rows and 256 keys: the last query tile (one row at
    position 255) has no candidates and an empty contiguous range, so its CTA visits no key
    tile and stores every chained head's rows as empty (o = 0, lse = -inf), as the first
    tile's CTA does after visiting its range."""
    if not on_hopper_build():
        pytest.skip("only the Hopper kernel chains query heads")
    monkeypatch.delenv("JAX_SPARSEK_FORWARD_KERNEL", raising=False)
    monkeypatch.setenv("JAX_SPARSEK_FWD_HEADS_PER_CTA", heads_per_cta)
    q, k, v = make_qkv(1, 129, 256, 4, 1, 128, jnp.float16, seed=("chained-empty",))
    u = jnp.full((1, 256, 1), -jnp.inf, jnp.float32)
    out, lse = sparsek_attention(q, k, v, u, topk=40, window=0, is_causal=True,
                                 implementation="cuda", return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)
    assert np.all(np.asarray(lse) == -np.inf)


def test_sparsek_heads_per_cta_bad_setting(monkeypatch):
    """A JAX_SPARSEK_FWD_HEADS_PER_CTA that is not a count the launcher takes: an error naming
    it."""
    if not on_hopper_build():
        pytest.skip("only the Hopper kernel reads the setting")
    monkeypatch.delenv("JAX_SPARSEK_FORWARD_KERNEL", raising=False)
    monkeypatch.setenv("JAX_SPARSEK_FWD_HEADS_PER_CTA", "3")
    q, k, v = make_qkv(1, 300, 300, 4, 1, 128, jnp.float16, seed=("chained-bad",))
    u = jnp.asarray(rng_for("chained-bad").standard_normal((1, 300, 1)).astype(np.float32))
    with pytest.raises(Exception, match="JAX_SPARSEK_FWD_HEADS_PER_CTA must be 1, 2, 4 or 8"):
        jax.block_until_ready(sparsek_attention(q, k, v, u, topk=40, window=16,
                                                is_causal=True, implementation="cuda"))


# (B, T, S, Hq, Hkv, D, dtype, topk, window, sigma): widely spread scores (sigma 8), or
# domains that fit in K (tau = -inf), make the plan list whole key tiles of full keys (gate 1
# for every row of a query tile: the Hopper kernel updates them without a gate), with the
# other candidates of the same chunks after them.
FULL_KEY_CASES = [
    (1, 1024, 1024, 4, 1, 128, jnp.bfloat16, 300, 32, 8.0),
    (1, 1400, 1400, 4, 1, 128, jnp.float16, 1200, 32, 1.0),
]


def _most_full_keys(u, tau, window, num_queries, unmasked=False):
    """The most full keys any query tile's plan lists (selection_params.h), from the float64
    thresholds tau [B, Hkv, T]: keys of the whole 128-key chunks of the tile's first row's
    sparse domain with u - tau >= 1 at its last row (unmasked: full and sure keys, u > tau)."""
    u = np.asarray(u, np.float32).astype(np.float64)
    b, s, hkv = u.shape
    most = 0
    for row0 in range(0, num_queries, 128):
        last = min(num_queries, row0 + 128) - 1
        domain = min(max(row0 + s - num_queries - window + 1, 0), s)
        keys = u[:, : domain // 128 * 128, :]
        for bi in range(b):
            for h in range(hkv):
                with np.errstate(invalid="ignore"):  # -inf scores against tau = -inf
                    gap = keys[bi, :, h] - tau[bi, h, last]
                    listed = gap > 0.0 if unmasked else gap >= 1.0
                most = max(most, int(np.count_nonzero(listed)))
    return most


def _full_key_id(case):
    return _sparsek_id(case[:9]) + f"-sigma{case[9]:g}"


@pytest.mark.parametrize("forward_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("case", FULL_KEY_CASES, ids=[_full_key_id(c) for c in FULL_KEY_CASES])
def test_sparsek_full_key_tiles(forward_kernel, case):
    b, t, s, hq, hkv, d, dtype, topk, window, sigma = case
    q, k, v = make_qkv(b, t, s, hq, hkv, d, dtype, seed=("kernels-full", forward_kernel))
    rng = rng_for("kernels-full-scores", *case[:6], topk, window)
    u = sigma * rng.standard_normal((b, s, hkv)).astype(np.float32)
    u[rng.random(u.shape) < 0.1] = -np.inf
    _, tau, gates = numpy_sparsek_gates(u, topk, window, t)
    # The case must list a whole tile of full keys somewhere (a margin for float32 tau).
    assert _most_full_keys(u, tau, window, t) >= 136
    out, lse = sparsek_attention(q, k, v, jnp.asarray(u), topk=topk, window=window,
                                 is_causal=True, implementation="cuda", return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    ref_o, ref_lse = numpy_gated_attention(q, k, v, gates)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype, context=f"{forward_kernel} {case}")


@pytest.mark.parametrize("forward_kernel", KERNELS, indirect=True)
def test_sparsek_gated_first_tiles(forward_kernel):
    """Narrow scores (sigma 0.25: no query tile lists a tile of full keys), so every CTA's
    first key tiles take the gate (on the Hopper kernel, tiles of sure keys the weight
    without the mask), which reads their key slots: the Hopper producer reuses a slot only
    once the consumers' gates are done with it (fwd_kernel_sm90.cuh), and a slot overwritten
    early shows here, at the start of CTAs of up to 8 key tiles (rows attend up to ~790
    keys)."""
    b, t, s, hq, hkv, d, dtype, topk, window = 1, 1536, 1536, 4, 2, 128, jnp.float16, 150, 64
    q, k, v = make_qkv(b, t, s, hq, hkv, d, dtype, seed=("kernels-gated", forward_kernel))
    u = 0.25 * rng_for("kernels-gated-scores").standard_normal((b, s, hkv)).astype(np.float32)
    _, tau, gates = numpy_sparsek_gates(u, topk, window, t)
    assert _most_full_keys(u, tau, window, t) < 128
    # ... while some query tile lists a whole tile of sure keys (no row hides them).
    assert _most_full_keys(u, tau, window, t, unmasked=True) >= 136
    out, lse = sparsek_attention(q, k, v, jnp.asarray(u), topk=topk, window=window,
                                 is_causal=True, implementation="cuda", return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    ref_o, ref_lse = numpy_gated_attention(q, k, v, gates)
    assert_attention_close(out, lse, ref_o, ref_lse, dtype, context=forward_kernel)


@pytest.mark.parametrize("forward_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("num_keys", [2730 * 128, 2731 * 128, 4095 * 128, 4096 * 128],
                         ids=["S349440-sure-keys-listed", "S349568-full-keys-listed",
                              "S524160-full-keys-listed", "S524288-none-listed"])
def test_sparsek_plan_class_limits(forward_kernel, num_keys):
    """The plan lists sure keys up to 2730 chunks of keys, full keys up to 4095, and neither
    past them, where the attention's shared memory keeps fewer prefix sums
    (selection_params.h): a few decode-like rows over a third to half a million widely spread
    scores (many full keys, ~1300 sure ones), against the 'xla' reference."""
    t, topk, window = 3, 4096, 100
    q, k, v = make_qkv(1, t, num_keys, 2, 1, 128, jnp.float16, seed=("full-limit",))
    u = 8.0 * rng_for("full-limit-scores", num_keys).standard_normal((1, num_keys, 1))
    u = jnp.asarray(u.astype(np.float32))
    out, lse = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                                 implementation="cuda", return_lse=True)
    out, lse = jax.block_until_ready((out, lse))
    ref_o, ref_lse = sparsek_attention(q, k, v, u, topk=topk, window=window, is_causal=True,
                                       implementation="xla", return_lse=True)
    assert_attention_close(out, lse, np.asarray(ref_o, np.float64),
                           np.asarray(ref_lse, np.float64), jnp.float16,
                           context=f"{forward_kernel} S={num_keys}")


@pytest.mark.parametrize("sparsek", [False, True], ids=["causal", "sparsek"])
def test_kernels_agree(monkeypatch, sparsek):
    """Same inputs on both kernels: each within the tolerance of the other (fp32 softmax,
    fp16 P): a layout or schedule error in one of them would show as O(1) differences. 16
    query tiles of up to 16 key tiles: every stage and key slot of the Hopper kernel's
    pipeline is reused many times."""
    q, k, v = make_qkv(1, 2048, 2048, 8, 2, 128, jnp.float16, seed=("agree",))

    u = None
    if sparsek:
        u = jnp.asarray(rng_for("agree-scores").standard_normal((1, 2048, 2), np.float32))

    def run():
        return jax.block_until_ready(sparsek_attention(
            q, k, v, u, topk=512 if sparsek else None, window=128 if sparsek else None,
            is_causal=True, implementation="cuda", return_lse=True))

    monkeypatch.delenv("JAX_SPARSEK_FORWARD_KERNEL", raising=False)
    out_default, lse_default = run()
    monkeypatch.setenv("JAX_SPARSEK_FORWARD_KERNEL", "mma_sync")
    out_other, lse_other = run()
    diff = np.abs(np.asarray(out_default, np.float32) - np.asarray(out_other, np.float32))
    assert diff.max() < 2e-2, diff.max()
    np.testing.assert_allclose(np.asarray(lse_default), np.asarray(lse_other), atol=1e-3)
