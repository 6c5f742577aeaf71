"""The training example (python -m jax_sparsek.train) at a tiny size: both models' losses go
down, the JSON results are complete (and name the implementation: the pure-JAX reference on
CPU, jax_sparsek's CUDA kernel in the dense model where it is available), the exit status
reports a loss that does not go down, and the generated corpus is deterministic."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

_REASON = "the training example needs flax and optax (pip install jax-sparsek[flax])"
pytest.importorskip("flax", reason=_REASON)
pytest.importorskip("optax", reason=_REASON)

from conftest import CUDA_AVAILABLE  # noqa: E402
from jax_sparsek import train  # noqa: E402

TINY = ["--seq-len", "64", "--batch-size", "8", "--d-model", "32", "--layers", "1",
        "--heads", "2", "--kv-heads", "1", "--topk", "8", "--window", "8", "--lr", "1e-2"]


def test_both_models_learn(tmp_path, capsys):
    out = tmp_path / "results.json"
    status = train.main(TINY + ["--steps", "30", "--log-every", "10", "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "OK: the loss went down for dense, sparsek" in printed
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"dense", "sparsek"}
    for name, run in results["runs"].items():
        assert run["loss_went_down"], (name, run["initial_loss"], run["final_loss"])
        assert run["final_loss"] < 0.9 * run["initial_loss"]
        assert len(run["losses"]) == 30 and all(np.isfinite(run["losses"]))
        assert [p["step"] for p in run["curve"]] == [1, 10, 20, 30]
        assert run["tokens_per_s"] > 0
    if CUDA_AVAILABLE:  # the dense model's compiled step calls jax_sparsek's CUDA kernel
        assert results["runs"]["dense"]["custom_calls"], results["runs"]["dense"]
    elif jax.default_backend() == "cpu":
        for run in results["runs"].values():
            assert run["implementation"].startswith("pure-JAX reference"), run["implementation"]
    # The same initialisation and batches: the two models start from the same loss.
    dense, sparsek = results["runs"]["dense"], results["runs"]["sparsek"]
    assert abs(dense["initial_loss"] - sparsek["initial_loss"]) < 0.05


def test_exit_status_when_the_loss_does_not_go_down(capsys):
    status = train.main(TINY + ["--mode", "dense", "--steps", "3", "--lr", "0"])
    assert status == 1
    assert "FAIL" in capsys.readouterr().out


def test_corpus_is_deterministic():
    a = train.make_corpus(5_000, seq_len=128, seed=3)
    assert a == train.make_corpus(5_000, seq_len=128, seed=3)
    assert a != train.make_corpus(5_000, seq_len=128, seed=4)
    line = a.splitlines()[0]
    items = [item.rstrip(";") for item in line.split(" ")]
    definitions = dict(item.split("=") for item in items if "=" in item)
    queries = [item.split("?") for item in items if "?" in item]
    assert queries and all(definitions[name] == value for name, value in queries)
    data = train.CharData(a, 32)
    batch = data.batch(4, np.random.default_rng(0))
    answers = train.answer_positions(data, batch)
    assert answers.shape == (4, 32) and answers.any()
    chars = np.array(data.chars)
    assert set(chars[batch[:, 1:][answers]]) <= set("0123456789")
