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

# The torch layer (blackwell_sparsek): the installed copy when there is one, else the source
# tree's torch_compat/ (appended, so that it never shadows an installation).
import importlib.util  # noqa: E402

if importlib.util.find_spec("blackwell_sparsek") is None:
    sys.path.append(str(_REPO_ROOT / "torch_compat"))

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


def use_kernel(monkeypatch, variable: str, kernel: str) -> None:
    """Kernel choice through JAX_SPARSEK_FORWARD_KERNEL / JAX_SPARSEK_BACKWARD_KERNEL (read at
    every call): "default" unsets the variable (the device's own choice), else sets it."""
    if kernel == "default":
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, kernel)


def on_hopper_build() -> bool:
    """Whether the Hopper (wgmma) kernels can run here: an sm_90 device and sm_90a code."""
    from jax_sparsek import _extension

    ext = _extension.load_extension()
    return ext.cuda_arch() == "sm_90" and "sm_90a" in ext.supported_archs()


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
# Float64 NumPy reference of SPARSEK.md's SparseK mode (independent of jax_sparsek._gates):
# the capped-simplex threshold is found exactly by sorting, never by bisection.


def _flat_tolerance(topk) -> float:
    """How close f(tau) must be to K to count as equal (f is a sum of float64 clips)."""
    return 1e-9 * max(1.0, float(topk))


def numpy_capped_simplex(values, topk):
    """Euclidean projection of ``values`` onto ``{m in [0, 1]^n : sum m = topk}``, by sorting.

    ``values``: 1-D finite float64, ``n > topk``. f(tau) = sum_j clip(u_j - tau, 0, 1) is
    continuous, non-increasing and piecewise linear with breakpoints at u_j and u_j - 1;
    f(max u) = 0 < topk and f(min u - 1) = n > topk. The breakpoints are sorted descending,
    f is evaluated at each, and the segment where f crosses topk is solved linearly.

    Returns ``(tau_lo, tau_hi, gates)``: every tau in [tau_lo, tau_hi] solves f(tau) = topk
    (an interval where f is flat at topk, e.g. [0, 4] for u = (5, 5, 0, 0) and topk = 2;
    tau_lo == tau_hi when the root is unique). The gates are unique.
    """
    u = np.asarray(values, dtype=np.float64)
    assert u.ndim == 1 and np.isfinite(u).all() and u.size > topk >= 1, (u, topk)
    x = np.sort(u)[::-1]                                           # descending
    breaks = np.unique(np.concatenate([x, x - 1.0]))[::-1]         # descending, distinct
    f = np.clip(x[None, :] - breaks[:, None], 0.0, 1.0).sum(axis=1)  # non-decreasing
    tol = _flat_tolerance(topk)
    first = int(np.argmax(f >= topk - tol))  # f[0] = 0 < topk and f[-1] = n > topk
    assert first >= 1
    if abs(f[first] - topk) <= tol:
        # f reaches topk at a breakpoint: f < topk above it; it stays at topk while flat.
        tau_hi = breaks[first]
        idx = first
        while idx + 1 < breaks.size and abs(f[idx + 1] - topk) <= tol:
            idx += 1
        tau_lo = breaks[idx]
    else:
        # f crosses topk strictly inside (breaks[first], breaks[first - 1]), where it is
        # linear: #saturated + sum_{fractional} (u_j - tau) = topk.
        mid = 0.5 * (breaks[first] + breaks[first - 1])
        saturated = x >= mid + 1.0
        fractional = (x > mid) & (x < mid + 1.0)
        n_frac = int(fractional.sum())
        assert n_frac > 0
        tau_lo = tau_hi = (x[fractional].sum() - (topk - int(saturated.sum()))) / n_frac
    return float(tau_lo), float(tau_hi), np.clip(u - tau_hi, 0.0, 1.0)


def numpy_sparsek_gates(scores, topk, window=0, num_queries=None):
    """SPARSEK.md's SparseK gates in float64, per (batch, kv head, row).

    ``scores`` ``[B, S, Hkv]`` (any float dtype, used in float32; ``-inf`` never selected).
    Row i sits at p(i) = i + S - T. Window keys p(i) - W < j <= p(i) get gate 1; the sparse
    domain D_i = {j <= p(i) - W : u_j > -inf} gets 1 everywhere when |D_i| <= K, else the
    capped-simplex projection of u restricted to D_i; every other key gets 0.

    Returns ``(tau_lo, tau_hi, gates)``: ``[B, Hkv, T]`` float64 bounds of the admissible
    thresholds (``-inf`` where |D_i| <= K) and gates ``[B, Hkv, T, S]`` float64.
    """
    u = np.asarray(scores).astype(np.float32).astype(np.float64)
    b, s_len, hkv = u.shape
    t = s_len if num_queries is None else int(num_queries)
    window = 0 if window is None else int(window)
    assert topk >= 1 and window >= 0
    tau_lo = np.full((b, hkv, t), -np.inf)
    tau_hi = np.full((b, hkv, t), -np.inf)
    gates = np.zeros((b, hkv, t, s_len))
    keys = np.arange(s_len)
    for i in range(t):
        p = i + s_len - t
        in_window = (keys <= p) & (keys > p - window)
        for bi in range(b):
            for h in range(hkv):
                row = u[bi, :, h]
                domain = (keys <= p - window) & (row > -np.inf)
                gates[bi, h, i, in_window] = 1.0
                if domain.sum() <= topk:
                    gates[bi, h, i, domain] = 1.0
                    continue
                lo, hi, m = numpy_capped_simplex(row[domain], topk)
                tau_lo[bi, h, i], tau_hi[bi, h, i] = lo, hi
                gates[bi, h, i, domain] = m
    return tau_lo, tau_hi, gates


def numpy_gated_attention(query, key, value, gates, scale=None):
    """o [B,T,Hq,D] and lse [B,Hq,T] (float64) of the gated softmax with gates [B,Hkv,T,S]:
    o_i = sum_j m_ij exp(s_ij) v_j / sum_j m_ij exp(s_ij), lse_i = log sum_j m_ij exp(s_ij);
    o = 0 and lse = -inf for a row with no positive gate. Query head h uses kv head
    h // (Hq // Hkv)."""
    q = np.asarray(query).astype(np.float64)
    k = np.asarray(key).astype(np.float64)
    v = np.asarray(value).astype(np.float64)
    gates = np.asarray(gates, dtype=np.float64)
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    assert k.shape == v.shape == (b, s_len, hkv, d) and hq % hkv == 0
    assert gates.shape == (b, hkv, t, s_len), gates.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    group = hq // hkv
    out = np.zeros((b, t, hq, d))
    lse = np.full((b, hq, t), -np.inf)
    for h in range(hq):
        kh = h // group
        m = gates[:, kh]                                             # [B, T, S]
        live = m > 0
        logits = scale * np.matmul(q[:, :, h, :], k[:, :, kh, :].transpose(0, 2, 1))
        logits = np.where(live, logits, -np.inf)
        row_max = np.max(logits, axis=-1, keepdims=True)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)
        weights = np.where(live, m * np.exp(logits - row_max), 0.0)
        row_sum = weights.sum(axis=-1, keepdims=True)
        nonempty = row_sum[..., 0] > 0
        safe_sum = np.where(row_sum > 0, row_sum, 1.0)
        out[:, :, h, :] = np.matmul(weights / safe_sum, v[:, :, kh, :])
        lse[:, h, :] = np.where(nonempty, (row_max + np.log(safe_sum))[..., 0], -np.inf)
    return out, lse


def numpy_sparsek_attention(query, key, value, scores, topk, window=0, scale=None):
    """o [B,T,Hq,D] and lse [B,Hq,T] (float64) of SPARSEK.md's SparseK mode (always causal);
    the gates of a kv head are shared by its query heads."""
    _, _, gates = numpy_sparsek_gates(scores, topk, window, num_queries=np.shape(query)[1])
    return numpy_gated_attention(query, key, value, gates, scale)


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
