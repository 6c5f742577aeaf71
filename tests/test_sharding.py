"""The sharding rule (jax_sparsek/_sharding.py) on four fake CPU devices: sharded calls give
what the same call on one device gives, batch and kv-head shardings stay in place without
any collective, and shardings the kernels cannot split (a sequence, heads that do not divide
the kv heads) are gathered and still give the right result.

The checks run in a process of their own (tests/sharding_checks.py), since the fake device
count is fixed when JAX starts; they use the reference path, whatever the machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHECKS = os.path.join(os.path.dirname(__file__), "sharding_checks.py")


@pytest.fixture(scope="module", params=["shardy", "gspmd"])
def results(request):
    # Both of XLA's partitioners: Shardy (JAX's default) takes the rule's factors, GSPMD the
    # callback that infers the results' shardings.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_USE_SHARDY_PARTITIONER="true" if request.param == "shardy" else "false")
    proc = subprocess.run([sys.executable, CHECKS], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


# fp16 inputs; the sharded program fuses differently, so gradients may differ in the last
# bits (tolerance of SPARSEK.md for fp16).
TOLERANCE = 2e-3


@pytest.mark.parametrize("case", ["dense_batch_heads", "sparsek_batch_heads",
                                  "dense_heads_not_divisible", "sparsek_sequence_sharded"])
def test_sharded_matches_one_device(results, case):
    r = results[case]
    assert r["out_err"] <= TOLERANCE, r
    assert all(e <= TOLERANCE for e in r["grad_errs"]), r


@pytest.mark.parametrize("case", ["dense_batch_heads", "sparsek_batch_heads"])
def test_batch_and_heads_stay_sharded(results, case):
    r = results[case]
    assert r["out_spec"] == r["expect_spec"], r
    assert all(spec == r["expect_spec"] for spec in r["grad_specs"]), r
    assert r["collectives"] == [], r


def test_unsplittable_shardings_are_gathered(results):
    # Heads that do not divide Nkv, and a sharded sequence: the operands are gathered.
    assert "all-gather" in results["dense_heads_not_divisible"]["collectives"]
    assert "all-gather" in results["sparsek_sequence_sharded"]["collectives"]


def test_inside_shard_map(results):
    assert results["shard_map"]["out_err"] <= TOLERANCE
