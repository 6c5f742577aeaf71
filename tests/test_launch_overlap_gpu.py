"""The overlapped launches of SparseK on the GPU, without output poisoning.

Two settings, both on by default and read at every call:
- JAX_SPARSEK_DEPENDENT_LAUNCH: the selection's tile kernel starts while the anchor kernel
  runs (each block waits for its two anchors' flags) and the Hopper forward starts while the
  tile kernel finishes (runtime/grid_dependency.cuh);
- JAX_SPARSEK_SIDE_STREAM: the SparseK backward sorts its keys on a second stream beside
  Delta and the zeroed dq accumulator, and finishes du there beside dq's conversion
  (runtime/side_stream.h).

Every other GPU test runs them too, but with outputs poisoned (conftest.py), so memsets sit
between the selection and the forward kernel. Here a subprocess without poisoning runs the
forward (o, lse) and the gradients with each setting on and off in turn: o, lse, dk and dv
must be bitwise equal (their kernels add in a fixed order in the backward's kd key order,
which the subprocess sets: the default row bands add dk and dv with atomics), dq and du
(atomics) equal up to their summation order, and everything within tolerance of
implementation='xla'; then one program of four calls on two score sets in turn, whose o, dk
and dv must match the serial launches' bitwise (a read of the selection's results before they
are written would see the other set's, left in a reused workspace). Also: a bad value of
either setting is an error naming it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import requires_cuda

pytestmark = requires_cuda

# Runs in a fresh process: conftest.py (which turns poisoning on) is not imported there.
_SCRIPT = r"""
import json, os, sys
import numpy as np
import jax, jax.numpy as jnp
import jax_sparsek

seq, heads_q, heads_kv, topk, window, with_xla = (int(a) for a in sys.argv[1:7])
rng = np.random.default_rng(seq)
shape_q, shape_kv = (1, seq, heads_q, 128), (1, seq, heads_kv, 128)
q = jnp.asarray(rng.standard_normal(shape_q, dtype=np.float32), jnp.bfloat16)
k = jnp.asarray(rng.standard_normal(shape_kv, dtype=np.float32), jnp.bfloat16)
v = jnp.asarray(rng.standard_normal(shape_kv, dtype=np.float32), jnp.bfloat16)
u = jnp.asarray(2.0 * rng.standard_normal((1, seq, heads_kv), dtype=np.float32))
w = jnp.asarray(rng.standard_normal(shape_q, dtype=np.float32))

def attend(impl):
    return lambda q, k, v, u: jax_sparsek.sparsek_attention(
        q, k, v, u, topk=topk, window=window, is_causal=True, implementation=impl,
        return_lse=True)

def loss(impl):
    return lambda q, k, v, u: jnp.sum(attend(impl)(q, k, v, u)[0].astype(jnp.float32) * w)

def run(impl, variable=None, value=None):
    if variable:
        os.environ[variable] = value
    fwd = jax.jit(attend(impl))(q, k, v, u)
    grads = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2, 3)))(q, k, v, u)
    out = {"o": fwd[0], "lse": fwd[1]}
    out.update(zip(("dq", "dk", "dv", "du"), grads))
    return {name: np.asarray(jnp.asarray(x, jnp.float32)) for name, x in out.items()}

def rel(a, b):
    finite = np.isfinite(b)
    assert np.array_equal(finite, np.isfinite(a))
    a, b = a[finite].astype(np.float64), b[finite].astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

report = {}
os.environ["JAX_SPARSEK_SIDE_STREAM"] = "1"
on = run("cuda", "JAX_SPARSEK_DEPENDENT_LAUNCH", "1")
off_dependent = run("cuda", "JAX_SPARSEK_DEPENDENT_LAUNCH", "0")
os.environ["JAX_SPARSEK_DEPENDENT_LAUNCH"] = "1"
off_side = run("cuda", "JAX_SPARSEK_SIDE_STREAM", "0")
for name in on:
    report[name] = {
        "nan": bool(np.isnan(on[name]).any()),
        "equal_dependent_off": bool(np.array_equal(on[name], off_dependent[name])),
        "equal_side_off": bool(np.array_equal(on[name], off_side[name])),
        "rel_dependent_off": rel(on[name], off_dependent[name]),
        "rel_side_off": rel(on[name], off_side[name]),
    }
# Four calls in one program on two score sets in turn: XLA may give each call the workspace the
# call before left, so a read of the selection's results before they are written would return
# the other set's (and differ from the serial launches).
u2 = jnp.asarray(2.0 * rng.standard_normal((1, seq, heads_kv), dtype=np.float32))
alternate = jax.jit(lambda q, k, v, u, u2: [attend("cuda")(q, k, v, x)[0] for x in (u, u2, u, u2)])
alternate_grads = jax.jit(lambda q, k, v, u, u2: [
    jax.grad(loss("cuda"), argnums=(1, 2))(q, k, v, x) for x in (u, u2, u, u2)])
def as_np(tree):
    return [np.asarray(jnp.asarray(x, jnp.float32)) for x in jax.tree_util.tree_leaves(tree)]
os.environ.update(JAX_SPARSEK_DEPENDENT_LAUNCH="0", JAX_SPARSEK_SIDE_STREAM="0")
serial = as_np(alternate(q, k, v, u, u2)) + as_np(alternate_grads(q, k, v, u, u2))
os.environ.update(JAX_SPARSEK_DEPENDENT_LAUNCH="1", JAX_SPARSEK_SIDE_STREAM="1")
mismatches = 0
for _ in range(3):
    overlapped = as_np(alternate(q, k, v, u, u2)) + as_np(alternate_grads(q, k, v, u, u2))
    mismatches += sum(not np.array_equal(a, b) for a, b in zip(overlapped, serial))
report["alternating"] = {"mismatches": mismatches, "outputs": len(serial)}
if with_xla:
    xla = run("xla")
    for name in on:
        report[name]["rel_xla"] = rel(on[name], xla[name])
print("REPORT " + json.dumps(report))
"""


def _run_unpoisoned(*args):
    env = dict(os.environ)
    env.pop("JAX_SPARSEK_POISON_OUTPUTS", None)
    for variable in ("JAX_SPARSEK_DEPENDENT_LAUNCH", "JAX_SPARSEK_SIDE_STREAM"):
        env.pop(variable, None)
    # The kd key order: its dk/dv kernel writes each key once, so dk and dv are bitwise
    # reproducible and a race shows as a mismatch. The default row bands add a key's dk and
    # dv over several CTAs with atomics (last bits vary run to run); their gradients are
    # checked against the float64 reference in test_backward_gpu.py.
    env["JAX_SPARSEK_KEY_ORDER"] = "kd"
    done = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


@pytest.mark.parametrize("seq,heads_q,heads_kv,topk,window,with_xla", [
    # 64 query tiles and 5 anchors a kv head, against the pure-JAX reference.
    (8192, 8, 2, 512, 128, 1),
    # 256 tiles and 17 anchors a kv head (the benchmark's anchor count), several waves of the
    # tile kernel: the settings against each other only (xla would need ~40 GB).
    (32768, 8, 2, 2048, 512, 0),
])
def test_overlap_settings_match_serial_launches(seq, heads_q, heads_kv, topk, window,
                                                with_xla):
    report = _run_unpoisoned(seq, heads_q, heads_kv, topk, window, with_xla)
    # o of 4 forward calls and dk, dv of 4 backward calls (all summed in a fixed order).
    alternating = report.pop("alternating")
    assert alternating["outputs"] == 12 and alternating["mismatches"] == 0, alternating
    for name, r in report.items():
        assert not r["nan"], f"NaN in {name}"
        # The forward's kernels and dk/dv's add in a fixed order; dq and du's atomics do not.
        if name in ("o", "lse", "dk", "dv"):
            assert r["equal_dependent_off"], (name, r)
            assert r["equal_side_off"], (name, r)
        else:
            assert r["rel_dependent_off"] < 1e-3, (name, r)
            assert r["rel_side_off"] < 1e-3, (name, r)
        if with_xla:
            assert r["rel_xla"] < 1e-2, (name, r)


@pytest.mark.parametrize("variable,value", [
    ("JAX_SPARSEK_DEPENDENT_LAUNCH", "yes"),
    ("JAX_SPARSEK_SIDE_STREAM", "2"),
])
def test_overlap_bad_setting(variable, value, monkeypatch):
    """A value other than 0 or 1: an error that names the variable (the forward reads
    JAX_SPARSEK_DEPENDENT_LAUNCH, the SparseK backward JAX_SPARSEK_SIDE_STREAM)."""
    import jax_sparsek

    monkeypatch.setenv(variable, value)
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 300, 4, 128), dtype=np.float32), jnp.float16)
    k = jnp.asarray(rng.standard_normal((1, 300, 2, 128), dtype=np.float32), jnp.float16)
    u = jnp.asarray(rng.standard_normal((1, 300, 2), dtype=np.float32))

    def loss(q, k, v, u):
        return jnp.sum(jax_sparsek.sparsek_attention(
            q, k, v, u, topk=40, window=16, is_causal=True,
            implementation="cuda").astype(jnp.float32))

    with pytest.raises(Exception, match=f"{variable} must be 0 or 1"):
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, k, u))
