"""Shared test configuration and helpers for jax_sparsek.

- Output poisoning: the CUDA launcher fills ``o`` and ``lse`` with NaN bytes before every run
  when ``JAX_SPARSEK_POISON_OUTPUTS=1`` is set at process start, so "no NaN in the output"
  proves every element was written. It must be set before jax_sparsek is imported.
- ``requires_cuda``: skips a test unless the CUDA kernels were built and JAX sees a CUDA device.
- A float64 NumPy reference of SPARSEK.md's dense modes (full, causal, causal sliding window),
  written independently of ``jax_sparsek._reference``.
- ``rel_err`` and ``assert_attention_close``: the correctness criterion of SPARSEK.md.

Test modules import the helpers with ``from conftest import ...``.
"""
from __future__ import annotations

import os

os.environ["JAX_SPARSEK_POISON_OUTPUTS"] = "1"  # before jax_sparsek (and its launcher) loads

import importlib.metadata  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_TESTS_DIR = pathlib.Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent
if str(_TESTS_DIR) not in sys.path:  # `from conftest import ...` under any import mode
    sys.path.insert(0, str(_TESTS_DIR))


def _prefer_installed_package() -> None:
    """Imports the installed jax_sparsek (with its compiled extension), not the source tree.

    ``python -m pytest`` run from the repository root puts the root first on ``sys.path``, so
    ``import jax_sparsek`` would find the source directory, which has no compiled extension,
    and every GPU test would skip. When a regular (non-editable) installation exists, its
    directory goes first on ``sys.path``. Without an installation nothing changes (the source
    tree is imported, as when developing without a build).
    """
    for name in ("jax-sparsek", "jax_sparsek"):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed = pathlib.Path(dist.locate_file("jax_sparsek"))
        if not (installed / "__init__.py").is_file():
            return  # an editable install, or a layout we do not know: leave sys.path alone
        if installed.resolve() == (_REPO_ROOT / "jax_sparsek").resolve():
            return
        site_dir = str(installed.parent)
        if site_dir in sys.path:
            sys.path.remove(site_dir)
        sys.path.insert(0, site_dir)
        return


_prefer_installed_package()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_sparsek  # noqa: E402

try:
    BUILD_INFO = jax_sparsek.build_info()
except Exception as exc:  # noqa: BLE001 - test_build.py::test_build_info reports it
    from jax_sparsek import _extension

    BUILD_INFO = {"cuda_kernels_built": _extension.cuda_kernels_built(),
                  "jax_cuda_devices": _extension.jax_has_cuda(),
                  "build_info_error": repr(exc)}
CUDA_AVAILABLE = bool(BUILD_INFO["cuda_kernels_built"] and BUILD_INFO["jax_cuda_devices"])

requires_cuda = pytest.mark.skipif(
    not CUDA_AVAILABLE,
    reason=("needs jax_sparsek's CUDA kernels and a CUDA device visible to JAX "
            f"(cuda_kernels_built={BUILD_INFO['cuda_kernels_built']}, "
            f"jax_cuda_devices={BUILD_INFO['jax_cuda_devices']})"))

# The implicit reference path warns once per reason; that is expected on CPU-only machines.
_REFERENCE_WARNING_FILTER = (
    r"ignore:jax_sparsek. using the pure-JAX reference implementation:RuntimeWarning")

TOLERANCE = {jnp.float16: 2e-3, jnp.bfloat16: 1e-2}
DTYPES = (jnp.float16, jnp.bfloat16)


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", _REFERENCE_WARNING_FILTER)


def pytest_report_header(config):
    return [f"jax_sparsek {jax_sparsek.__version__} from {pathlib.Path(jax_sparsek.__file__).parent}",
            f"jax_sparsek.build_info(): {BUILD_INFO}",
            f"jax {jax.__version__}, devices: {jax.devices()}",
            f"JAX_SPARSEK_POISON_OUTPUTS={os.environ.get('JAX_SPARSEK_POISON_OUTPUTS')}"]


# --------------------------------------------------------------------------------------------
# Inputs


def tolerance(dtype) -> float:
    return TOLERANCE[jnp.dtype(dtype).type]


def rng_for(*params) -> np.random.Generator:
    """A generator seeded by the test parameters (stable across processes, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def random_array(rng: np.random.Generator, shape, dtype, std: float = 1.0):
    """Random normal values (never all zeros), rounded to ``dtype``."""
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * std, dtype=dtype)


def make_qkv(batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype, *, seed=(), std=1.0):
    """Fresh random query ``[B,T,Hq,D]`` and key/value ``[B,S,Hkv,D]`` in ``dtype``."""
    rng = rng_for(batch, q_len, kv_len, q_heads, kv_heads, head_dim, jnp.dtype(dtype).name,
                  *seed)
    q = random_array(rng, (batch, q_len, q_heads, head_dim), dtype, std)
    k = random_array(rng, (batch, kv_len, kv_heads, head_dim), dtype, std)
    v = random_array(rng, (batch, kv_len, kv_heads, head_dim), dtype, std)
    return q, k, v


# --------------------------------------------------------------------------------------------
# Float64 NumPy reference of SPARSEK.md's dense modes (independent of jax_sparsek._reference)


def dense_gate_matrix(q_len: int, kv_len: int, is_causal: bool, window) -> np.ndarray:
    """Boolean [T, S]: gate m_ij = 1. Row i sits at p(i) = i + S - T (bottom-right)."""
    visible = np.ones((q_len, kv_len), dtype=bool)
    for i in range(q_len):
        p = i + kv_len - q_len
        if is_causal:
            visible[i, max(p + 1, 0):] = False
        if window:
            visible[i, :max(min(p - window + 1, kv_len), 0)] = False
    return visible


def numpy_attention(query, key, value, *, is_causal=False, window=None, scale=None):
    """o [B,T,Hq,D] and lse [B,Hq,T] in float64, for full/causal/sliding-window attention.

    Query head h reads kv head h // (Hq // Hkv). A row with no visible key gets o = 0 and
    lse = -inf.
    """
    q = np.asarray(query).astype(np.float64)
    k = np.asarray(key).astype(np.float64)
    v = np.asarray(value).astype(np.float64)
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    assert k.shape == v.shape == (b, s_len, hkv, d) and hq % hkv == 0
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    group = hq // hkv
    gates = dense_gate_matrix(t, s_len, is_causal, window)  # [T, S]
    nonempty = gates.any(axis=1)  # [T]
    out = np.zeros((b, t, hq, d), dtype=np.float64)
    lse = np.full((b, hq, t), -np.inf, dtype=np.float64)
    for h in range(hq):
        kh = h // group
        logits = scale * np.matmul(q[:, :, h, :], k[:, :, kh, :].transpose(0, 2, 1))  # [B,T,S]
        logits = np.where(gates[None], logits, -np.inf)
        row_max = np.max(logits, axis=-1, keepdims=True)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)
        weights = np.where(gates[None], np.exp(logits - row_max), 0.0)
        row_sum = weights.sum(axis=-1, keepdims=True)
        safe_sum = np.where(row_sum > 0, row_sum, 1.0)
        out[:, :, h, :] = np.matmul(weights / safe_sum, v[:, :, kh, :])
        lse[:, h, :] = np.where(nonempty[None], (row_max + np.log(safe_sum))[..., 0], -np.inf)
    return out, lse


# --------------------------------------------------------------------------------------------
# Comparison


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| over the finite entries of ``ref``.

    ``-inf`` entries (lse of empty rows) must sit exactly where ``ref`` has them; they are then
    left out of the norm. NaN anywhere in ``out`` is an error.
    """
    out = np.asarray(out).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not np.isnan(out).any(), f"{int(np.isnan(out).sum())} NaN entries in output"
    assert not np.isnan(ref).any(), "NaN in reference"
    ref_neginf = np.isneginf(ref)
    out_neginf = np.isneginf(out)
    if not np.array_equal(ref_neginf, out_neginf):
        raise AssertionError(
            f"-inf pattern differs: {int(ref_neginf.sum())} -inf entries expected, "
            f"{int(out_neginf.sum())} found, {int((ref_neginf != out_neginf).sum())} mismatches")
    finite = ~ref_neginf
    assert np.isfinite(ref[finite]).all(), "reference has +inf entries"
    assert np.isfinite(out[finite]).all(), "output has inf entries where the reference is finite"
    diff = np.linalg.norm(out[finite] - ref[finite])
    norm = np.linalg.norm(ref[finite])
    if norm == 0.0:
        return float(diff)
    return float(diff / norm)


def assert_attention_close(out, lse, ref_out, ref_lse, dtype, *, context=""):
    """SPARSEK.md's criterion: relative error of o and lse under the dtype's tolerance, no NaN,
    and rows with no visible key give exactly o = 0 and lse = -inf."""
    tol = tolerance(dtype)
    assert out.dtype == jnp.dtype(dtype), (out.dtype, dtype)
    out_np = np.asarray(out).astype(np.float64)
    ref_out = np.asarray(ref_out)
    assert out_np.shape == ref_out.shape, (out_np.shape, ref_out.shape)
    assert not np.isnan(out_np).any(), (
        f"{context}: {int(np.isnan(out_np).sum())} NaN entries in o (unwritten or invalid)")
    err_o = rel_err(out_np, ref_out)
    assert err_o < tol, f"{context}: o relative error {err_o:.3g} >= {tol}"
    if lse is not None:
        assert lse.dtype == jnp.float32, lse.dtype
        lse_np = np.asarray(lse)
        assert lse_np.shape == ref_lse.shape, (lse_np.shape, ref_lse.shape)
        err_l = rel_err(lse_np, ref_lse)
        assert err_l < tol, f"{context}: lse relative error {err_l:.3g} >= {tol}"
        empty = np.isneginf(ref_lse)  # [B, Hq, T]
        if empty.any():
            rows = np.transpose(empty, (0, 2, 1))  # [B, T, Hq]
            assert np.all(out_np[rows] == 0.0), f"{context}: empty rows must give o = 0"
    return err_o
