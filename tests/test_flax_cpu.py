"""jax_sparsek.flax on CPU (the pure-JAX reference path).

- attention_fn swapped into flax.nnx.MultiHeadAttention / flax.linen.MultiHeadDotProductAttention
  gives Flax's outputs and gradients (bf16 tolerance of SPARSEK.md) and really runs jax_sparsek
  (counted), with no mask, is_causal=True, a concrete causal mask, GQA, extra batch dims;
- every fallback (dropout while training, an arbitrary or traced mask, float32 inputs, bias,
  sow_weights, an unsupported head dim) warns once and equals Flax exactly;
- SparseKAttention (nnx and linen): shapes, the dense switch, topk >= T equals dense, nnx and
  linen agree, gradients reach the scoring network, a few training steps lower the loss.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax", reason="jax_sparsek.flax needs flax (pip install jax-sparsek[flax])")
optax = pytest.importorskip("optax", reason="needs optax (pip install jax-sparsek[flax])")

from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

from conftest import rel_err, tolerance  # noqa: E402
from jax_sparsek import flax as jsf  # noqa: E402
from jax_sparsek.flax import _attention_fn  # noqa: E402

BF16_TOL = tolerance(jnp.bfloat16)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees the once-per-reason fallback warnings afresh."""
    _attention_fn._warned_reasons.clear()
    yield
    _attention_fn._warned_reasons.clear()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach jax_sparsek.sparsek_attention from attention_fn."""
    calls = []
    original = _attention_fn.sparsek_attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(_attention_fn, "sparsek_attention", counting)
    return calls


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, jsf.SparseKFallbackWarning)]


def _inputs(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _assert_tree_close(a, b, tol, what):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    assert leaves_a, what
    for x, y in zip(leaves_a, leaves_b):
        err = rel_err(np.asarray(x, np.float32), np.asarray(y, np.float32))
        assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


# --------------------------------------------------------------------------------------------
# attention_fn in flax.nnx.MultiHeadAttention


def _nnx_mha(use_ours, *, num_heads=4, num_kv_heads=None, features=64, dtype=jnp.bfloat16,
             **kwargs):
    # No projection biases: the key bias has an exactly-zero gradient (softmax is invariant to
    # it), and the rounding noise that both implementations return there cannot be compared.
    kwargs.setdefault("use_bias", False)
    extra = {"attention_fn": jsf.attention_fn} if use_ours else {}
    return nnx.MultiHeadAttention(num_heads=num_heads, in_features=features,
                                  qkv_features=features, num_kv_heads=num_kv_heads,
                                  dtype=dtype, decode=False, rngs=nnx.Rngs(0), **kwargs,
                                  **extra)


def _nnx_out_and_grads(model, x, call_kwargs, *, jit=True):
    """Output and d(sum(out * cot)) / d(params, x) of an nnx module."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cot = _inputs(x.shape[:-1] + (model.out_features,), seed=7)

    def loss(params, x):
        out = nnx.merge(graphdef, params, rest)(x, **call_kwargs)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if jit:
        fn = jax.jit(fn)
    (_, out), grads = fn(params, x)
    return out, grads


NNX_CASES = {
    # name: (input shape, num_kv_heads, call kwargs)
    "no_mask": ((2, 48, 64), None, lambda shape: {}),
    "is_causal_gqa": ((2, 48, 64), 2, lambda shape: {"is_causal": True}),
    "make_causal_mask_gqa_extra_batch_dim": (
        (2, 3, 24, 64), 1, lambda shape: {"mask": nnx.make_causal_mask(jnp.ones(shape[:-1]))}),
}


@pytest.mark.parametrize("case", sorted(NNX_CASES))
def test_nnx_swap_matches_flax(case, kernel_calls):
    """Under jit (the masks are concrete: closed over, not arguments)."""
    shape, num_kv_heads, make_kwargs = NNX_CASES[case]
    x = _inputs(shape)
    kwargs = make_kwargs(shape)
    ref_out, ref_grads = _nnx_out_and_grads(_nnx_mha(False, num_kv_heads=num_kv_heads), x,
                                            kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, grads = _nnx_out_and_grads(_nnx_mha(True, num_kv_heads=num_kv_heads), x, kwargs)
    assert not _fallback_warnings(record), [str(w.message) for w in record]
    assert kernel_calls, "jax_sparsek was not called"
    assert kernel_calls[-1]["is_causal"] == (case != "no_mask")
    assert out.shape == shape and out.dtype == ref_out.dtype == jnp.bfloat16
    _assert_tree_close(out, ref_out, BF16_TOL, "output")
    _assert_tree_close(grads, ref_grads, BF16_TOL, "gradients")


# --------------------------------------------------------------------------------------------
# attention_fn in flax.linen.MultiHeadDotProductAttention


def _linen_mha(use_ours, **kwargs):
    kwargs.setdefault("use_bias", False)  # as in _nnx_mha
    extra = {"attention_fn": jsf.attention_fn} if use_ours else {}
    return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, dtype=jnp.bfloat16,
                                           **kwargs, **extra)


def _linen_out_and_grads(module, variables, x, call_kwargs, rngs=None):
    cot = _inputs(x.shape, seed=7)

    def loss(params, x):
        out = module.apply({"params": params}, x, rngs=rngs, **call_kwargs)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x)
    return out, grads


def test_linen_swap_matches_flax(kernel_calls):
    x = _inputs((2, 40, 64))
    kwargs = {"mask": nn.make_causal_mask(jnp.ones((2, 40)))}
    variables = _linen_mha(False).init(jax.random.key(0), x)
    ref_out, ref_grads = _linen_out_and_grads(_linen_mha(False), variables, x, kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, grads = _linen_out_and_grads(_linen_mha(True), variables, x, kwargs)
    assert not _fallback_warnings(record), [str(w.message) for w in record]
    assert kernel_calls and kernel_calls[-1]["is_causal"]
    _assert_tree_close(out, ref_out, BF16_TOL, "output")
    _assert_tree_close(grads, ref_grads, BF16_TOL, "gradients")


# --------------------------------------------------------------------------------------------
# attention_fn called directly


def test_direct_call_recognises_sliding_window_and_extra_batch_dims(kernel_calls):
    q = _inputs((2, 3, 32, 4, 16), seed=1, dtype=jnp.bfloat16)
    k = _inputs((2, 3, 32, 2, 16), seed=2, dtype=jnp.bfloat16)
    v = _inputs((2, 3, 32, 2, 16), seed=3, dtype=jnp.bfloat16)
    pos = np.arange(32)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 5)
    mask = jnp.asarray(band)[None, None, None]  # [1, 1, 1, T, S], concrete inside jit

    out = jax.jit(lambda q, k, v: jsf.attention_fn(q, k, v, mask=mask))(q, k, v)
    assert kernel_calls[-1]["window"] == 5 and kernel_calls[-1]["is_causal"]
    ref = jax.jit(lambda q, k, v: nnx.dot_product_attention(q, k, v, mask=mask))(q, k, v)
    _assert_tree_close(out, ref, BF16_TOL, "sliding window")
    # Without batch dims and with an all-True mask (full attention), eager.
    out = jsf.attention_fn(q[0, 0], k[0, 0], v[0, 0], mask=jnp.ones((32, 32), bool))
    assert kernel_calls[-1]["is_causal"] is False and out.shape == (32, 4, 16)
    ref = jax.jit(nnx.dot_product_attention)(q[0, 0], k[0, 0], v[0, 0])
    _assert_tree_close(out, ref, BF16_TOL, "no batch dims")


# --------------------------------------------------------------------------------------------
# Fallbacks: a warning (once per reason) and exactly Flax's result


def _call_twice_expect_one_warning(fn, match):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = fn()
        second = fn()
    found = _fallback_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    assert match in str(found[0].message), str(found[0].message)
    return first, second


def test_fallback_dropout_while_training_nnx(kernel_calls):
    x = _inputs((2, 16, 64))
    ref = _nnx_mha(False, dropout_rate=0.5)(x, deterministic=False)
    ours = _nnx_mha(True, dropout_rate=0.5)
    out, _ = _call_twice_expect_one_warning(lambda: ours(x, deterministic=False),
                                            "attention dropout while training")
    assert not kernel_calls
    _assert_tree_equal(out, ref)
    # deterministic=True (evaluation): dropout is off, jax_sparsek runs.
    ours(x, deterministic=True)
    assert kernel_calls


def test_fallback_dropout_while_training_linen(kernel_calls):
    x = _inputs((2, 16, 64))
    variables = _linen_mha(False, dropout_rate=0.5).init(jax.random.key(0), x,
                                                         deterministic=True)
    rngs = {"dropout": jax.random.key(3)}
    ref = _linen_mha(False, dropout_rate=0.5).apply(variables, x, deterministic=False,
                                                   rngs=rngs)
    ours = _linen_mha(True, dropout_rate=0.5)
    out, _ = _call_twice_expect_one_warning(
        lambda: ours.apply(variables, x, deterministic=False, rngs=rngs),
        "attention dropout while training")
    assert not kernel_calls
    _assert_tree_equal(out, ref)


def test_fallback_arbitrary_mask(kernel_calls):
    x = _inputs((2, 16, 64))
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, (2, 1, 16, 16)) | jnp.eye(16, dtype=bool)
    ref = _nnx_mha(False)(x, mask=mask)
    out, _ = _call_twice_expect_one_warning(lambda: _nnx_mha(True)(x, mask=mask),
                                            "the mask differs between batch entries")
    assert not kernel_calls
    _assert_tree_equal(out, ref)
    shared = mask[:1]  # the same for every batch entry, but not causal
    ref = _nnx_mha(False)(x, mask=shared)
    out, _ = _call_twice_expect_one_warning(lambda: _nnx_mha(True)(x, mask=shared),
                                            "neither all-True, nor causal")
    _assert_tree_equal(out, ref)


def test_fallback_traced_mask(kernel_calls):
    x = _inputs((2, 16, 64))

    def jitted(model):
        graphdef, params = nnx.split(model)

        @jax.jit
        def run(params, x):  # the mask is made inside jit: a traced value
            mask = nnx.make_causal_mask(jnp.ones(x.shape[:-1]))
            return nnx.merge(graphdef, params)(x, mask=mask)

        return functools.partial(run, params)

    ref = jitted(_nnx_mha(False))(x)
    fn = jitted(_nnx_mha(True))
    out, _ = _call_twice_expect_one_warning(lambda: fn(x), "traced value")
    assert not kernel_calls
    _assert_tree_equal(out, ref)


def test_fallback_float32_inputs(kernel_calls):
    x = _inputs((2, 16, 64))
    ref = _nnx_mha(False, dtype=None)(x)
    out, _ = _call_twice_expect_one_warning(lambda: _nnx_mha(True, dtype=None)(x),
                                            "float32 inputs: jax_sparsek needs float16/bfloat16")
    assert not kernel_calls and out.dtype == jnp.float32
    _assert_tree_equal(out, ref)


def test_fallback_bias_and_head_dim(kernel_calls):
    q = _inputs((2, 16, 4, 16), seed=1, dtype=jnp.bfloat16)
    k = _inputs((2, 16, 4, 16), seed=2, dtype=jnp.bfloat16)
    v = _inputs((2, 16, 4, 16), seed=3, dtype=jnp.bfloat16)
    bias = _inputs((1, 4, 16, 16), seed=4, dtype=jnp.bfloat16)
    out, _ = _call_twice_expect_one_warning(lambda: jsf.attention_fn(q, k, v, bias=bias),
                                            "bias=")
    _assert_tree_equal(out, nnx.dot_product_attention(q, k, v, bias=bias))
    q12, k12, v12 = (a[..., :12] for a in (q, k, v))
    out, _ = _call_twice_expect_one_warning(lambda: jsf.attention_fn(q12, k12, v12),
                                            "head dim 12")
    _assert_tree_equal(out, nnx.dot_product_attention(q12, k12, v12))
    assert not kernel_calls


def test_fallback_sow_weights(kernel_calls):
    x = _inputs((2, 16, 64))

    def forward(model):
        return nnx.capture(lambda m, x: m(x, sow_weights=True), nnx.Intermediate)(model, x)

    ref, ref_sown = forward(_nnx_mha(False))
    (out, sown), _ = _call_twice_expect_one_warning(lambda: forward(_nnx_mha(True)), "module=")
    assert not kernel_calls
    _assert_tree_equal(out, ref)
    assert jax.tree.leaves(ref_sown)
    _assert_tree_equal(sown, ref_sown)


# --------------------------------------------------------------------------------------------
# SparseKAttention


def _sparsek_nnx(**kwargs):
    config = dict(in_features=64, num_heads=4, num_kv_heads=2, topk=6, window=4)
    config.update(kwargs)
    return jsf.SparseKAttention(**config, rngs=nnx.Rngs(0))


def _score_grads_nnx(model, x):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cot = _inputs(x.shape, seed=9)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(out.astype(jnp.float32) * cot)

    return jax.jit(jax.grad(loss))(params)


@nnx.jit
def _apply(model, x):
    return model(x)


def test_sparsek_nnx_shapes_and_dense_switch():
    x = _inputs((2, 32, 64))
    model = _sparsek_nnx()
    out = _apply(model, x)
    assert out.shape == (2, 32, 64) and out.dtype == jnp.bfloat16
    assert model.query.kernel.shape == (64, 4, 16) and model.key.kernel.shape == (64, 2, 16)
    assert model.score.kernel.shape == (64, 2) and model.score_slope.shape == (2,)
    assert np.isfinite(np.asarray(out, np.float32)).all()

    # dense=True: plain causal attention on the module's own projections.
    model.dense = True
    dense = _apply(model, x)
    assert _apply(model, x[None, :1]).shape == (1, 1, 32, 64)  # extra batch dims

    @nnx.jit
    def flax_causal(model, x):
        q, k, v = model.query(x), model.key(x), model.value(x)
        return model.out(nnx.dot_product_attention(q, k, v, is_causal=True))

    _assert_tree_close(dense, flax_causal(model, x), BF16_TOL, "dense switch")
    # topk >= T selects every key: SparseK equals dense causal attention.
    model.dense = False
    model.topk = 32
    _assert_tree_close(_apply(model, x), dense, BF16_TOL, "topk >= T")


def test_sparsek_nnx_gradients_reach_scores():
    x = _inputs((2, 32, 64))
    grads = _score_grads_nnx(_sparsek_nnx(), x)
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
    assert float(jnp.abs(grads["score"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(grads["score_slope"][...]).max()) > 0
    # The dense switch ignores the scores: no gradient reaches them.
    dense_grads = _score_grads_nnx(_sparsek_nnx(dense=True), x)
    assert float(jnp.abs(dense_grads["score"]["kernel"][...]).max()) == 0


def test_sparsek_linen_matches_nnx():
    x = _inputs((2, 32, 64))
    nnx_model = _sparsek_nnx()
    linen_model = jsf.LinenSparseKAttention(num_heads=4, num_kv_heads=2, topk=6, window=4)
    variables = linen_model.init(jax.random.key(0), x)
    shapes = jax.tree.map(lambda a: a.shape, variables["params"])
    assert shapes == {"query": {"kernel": (64, 4, 16)}, "key": {"kernel": (64, 2, 16)},
                      "value": {"kernel": (64, 2, 16)}, "out": {"kernel": (4, 16, 64)},
                      "score": {"kernel": (64, 2), "bias": (2,)}, "score_slope": (2,)}
    # The nnx parameters in the linen tree: same function.
    state = nnx.state(nnx_model, nnx.Param)
    params = {name: jax.tree.map(lambda p: p[...], dict(state[name]),
                                 is_leaf=lambda p: isinstance(p, nnx.Variable))
              for name in ("query", "key", "value", "out", "score")}
    params = jax.tree.map(jnp.asarray, params)
    params["score_slope"] = jnp.asarray([0.5, -0.25], jnp.float32)
    nnx_model.score_slope[...] = params["score_slope"]
    out = jax.jit(linen_model.apply)({"params": params}, x)
    assert out.shape == (2, 32, 64) and out.dtype == jnp.bfloat16
    _assert_tree_close(out, _apply(nnx_model, x), 1e-6, "linen vs nnx")

    cot = _inputs(x.shape, seed=9)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(
        linen_model.apply({"params": p}, x).astype(jnp.float32) * cot)))(params)
    assert float(jnp.abs(grads["score"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["score_slope"]).max()) > 0


def test_sparsek_hyperparameter_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        jsf.SparseKAttention(64, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        jsf.SparseKAttention(64, 4, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="topk must be >= 1"):
        jsf.SparseKAttention(64, 4, topk=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8"):
        jsf.LinenSparseKAttention(num_heads=4).init(jax.random.key(0), jnp.ones((1, 8, 40)))


def _regression_losses(loss_fn, params, steps=20):
    tx = optax.adam(2e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


def test_sparsek_module_trains():
    """A few Adam steps fitting a fixed random target lower the loss (nnx; the linen module
    computes the same function, see test_sparsek_linen_matches_nnx)."""
    x = _inputs((2, 24, 32))
    target = _inputs((2, 24, 32), seed=11)
    model = jsf.SparseKAttention(32, 2, num_kv_heads=1, topk=4, window=2, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        out = nnx.merge(graphdef, params, rest)(x)
        return jnp.mean((out.astype(jnp.float32) - target) ** 2)

    losses = _regression_losses(loss_fn, params)
    assert losses[-1] < 0.8 * losses[0], losses
