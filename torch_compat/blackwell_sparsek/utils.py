"""Timing and correctness helpers: ``benchmark_latency``, ``validate_correctness``,
``compare_to_sdpa`` and ``print_comparison_summary`` (the documented signatures, defaults and
return keys)."""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F


def _tensors_in(values: Iterable[Any]):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors_in(value)
        elif isinstance(value, dict):
            yield from _tensors_in(value.values())


def _cuda_device_of(args, kwargs) -> Optional[torch.device]:
    for tensor in _tensors_in(list(args) + list(kwargs.values())):
        if tensor.device.type == "cuda":
            return tensor.device
    return None


def benchmark_latency(kernel_fn: Callable, *args, num_warmup: int = 10, num_iters: int = 100,
                      **kwargs) -> Dict[str, float]:
    """Latency of ``kernel_fn(*args, **kwargs)`` in microseconds.

    On CUDA (any tensor argument on a CUDA device) each iteration is timed with a pair of CUDA
    events recorded on the current stream around the call, after ``num_warmup`` untimed calls,
    and the device is synchronised once at the end; the time therefore includes the host-side
    launch cost when that exceeds the GPU time (small problems). Otherwise (CPU tensors) each
    call is timed with ``time.perf_counter``.

    Returns ``{'mean_us', 'median_us', 'min_us', 'max_us', 'std_us', 'num_iters'}``
    (``std_us``: sample standard deviation, 0 for one iteration).
    """
    if not callable(kernel_fn):
        raise TypeError(f"kernel_fn must be callable, got {type(kernel_fn).__name__}")
    if isinstance(num_warmup, bool) or not isinstance(num_warmup, int) or num_warmup < 0:
        raise ValueError(f"num_warmup must be an int >= 0, got {num_warmup!r}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")

    device = _cuda_device_of(args, kwargs)
    for _ in range(num_warmup):
        kernel_fn(*args, **kwargs)
    times_us = []
    if device is not None:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(num_iters)]
            torch.cuda.synchronize(device)
            for start, end in events:
                start.record(stream)
                kernel_fn(*args, **kwargs)
                end.record(stream)
            torch.cuda.synchronize(device)
            times_us = [start.elapsed_time(end) * 1000.0 for start, end in events]
    else:
        for _ in range(num_iters):
            start = time.perf_counter()
            kernel_fn(*args, **kwargs)
            times_us.append((time.perf_counter() - start) * 1e6)
    return {
        "mean_us": float(statistics.fmean(times_us)),
        "median_us": float(statistics.median(times_us)),
        "min_us": float(min(times_us)),
        "max_us": float(max(times_us)),
        "std_us": float(statistics.stdev(times_us)) if len(times_us) > 1 else 0.0,
        "num_iters": int(num_iters),
    }


def validate_correctness(output: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-3,
                         atol: float = 2e-3) -> Tuple[bool, Dict[str, Any]]:
    """Compares ``output`` with ``reference`` element-wise, in float64.

    An element matches when ``|output - reference| <= atol + rtol * |reference|`` (as
    ``torch.allclose``; equal infinities match, NaN never does). Returns ``(is_correct,
    metrics)`` with ``max_diff``, ``mean_diff``, ``median_diff`` (absolute differences),
    ``num_elements``, ``num_mismatches``, ``mismatch_rate`` (percent of the elements),
    ``worst_diff_location`` (index tuple of the largest difference, NaN counting as largest),
    ``worst_diff_output`` and ``worst_diff_reference`` (the values there). Raises ValueError
    when the shapes differ.
    """
    if not isinstance(output, torch.Tensor) or not isinstance(reference, torch.Tensor):
        raise TypeError("output and reference must be torch.Tensor objects")
    if tuple(output.shape) != tuple(reference.shape):
        raise ValueError(f"output shape {tuple(output.shape)} does not match reference shape "
                         f"{tuple(reference.shape)}")
    out = output.detach().to(torch.float64)
    ref = reference.detach().to(device=out.device, dtype=torch.float64)
    num_elements = out.numel()
    if num_elements == 0:
        return True, {"max_diff": 0.0, "mean_diff": 0.0, "median_diff": 0.0,
                      "num_elements": 0, "num_mismatches": 0, "mismatch_rate": 0.0,
                      "worst_diff_location": (), "worst_diff_output": float("nan"),
                      "worst_diff_reference": float("nan")}
    diff = torch.where(out == ref, torch.zeros_like(out), (out - ref).abs())
    matches = diff <= atol + rtol * ref.abs()  # False where diff is NaN
    num_mismatches = int((~matches).sum().item())
    ranked = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    flat_index = int(torch.argmax(ranked.reshape(-1)).item())
    location = tuple(int(i) for i in _unravel(flat_index, tuple(out.shape)))
    flat_diff = diff.reshape(-1)
    metrics = {
        "max_diff": float(flat_diff[flat_index].item()),
        "mean_diff": float(diff.mean().item()),
        "median_diff": float(flat_diff.median().item()),
        "num_elements": int(num_elements),
        "num_mismatches": num_mismatches,
        "mismatch_rate": 100.0 * num_mismatches / num_elements,
        "worst_diff_location": location,
        "worst_diff_output": float(out.reshape(-1)[flat_index].item()),
        "worst_diff_reference": float(ref.reshape(-1)[flat_index].item()),
    }
    return num_mismatches == 0, metrics


def _unravel(index: int, shape: Tuple[int, ...]):
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index //= size
    return tuple(reversed(coords))


def _sdpa_reference_inputs(Q, K, V):
    """K and V with their heads repeated to Q's when they have fewer (GQA), for SDPA."""
    if K.dim() == 4 and Q.dim() == 4 and K.shape[1] != Q.shape[1] and K.shape[1] > 0 \
            and Q.shape[1] % K.shape[1] == 0:
        group = Q.shape[1] // K.shape[1]
        K = K.repeat_interleave(group, dim=1)
        V = V.repeat_interleave(group, dim=1)
    return K, V


def compare_to_sdpa(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, kernel_fn: Callable,
                    scale: Optional[float] = None, rtol: float = 1e-3,
                    atol: float = 2e-3) -> Dict[str, Any]:
    """Runs ``kernel_fn(Q, K, V)`` (``kernel_fn(Q, K, V, scale=scale)`` when ``scale`` is given)
    and ``torch.nn.functional.scaled_dot_product_attention`` on the same ``[B, H, S, D]``
    inputs (same scale, no mask; K/V heads repeated for SDPA when fewer than Q's), checks the
    output against SDPA's with ``validate_correctness(rtol, atol)`` and times both with
    ``benchmark_latency`` (defaults: 10 warmup, 100 timed calls).

    Returns ``{'is_correct', 'correctness_metrics', 'sdpa_time_us', 'kernel_time_us',
    'speedup' (sdpa_time / kernel_time), 'input_shape' ({'B', 'H', 'S', 'D'} of Q)}``.
    """
    kwargs = {} if scale is None else {"scale": scale}
    K_ref, V_ref = _sdpa_reference_inputs(Q, K, V)

    def sdpa():
        return F.scaled_dot_product_attention(Q, K_ref, V_ref, **kwargs)

    def kernel():
        return kernel_fn(Q, K, V, **kwargs)

    with torch.no_grad():
        output = kernel()
        reference = sdpa()
        is_correct, metrics = validate_correctness(output, reference, rtol=rtol, atol=atol)
        sdpa_stats = benchmark_latency(lambda *_: sdpa(), Q)
        kernel_stats = benchmark_latency(lambda *_: kernel(), Q)
    sdpa_us = sdpa_stats["median_us"]
    kernel_us = kernel_stats["median_us"]
    B, H, S, D = (int(n) for n in Q.shape)
    return {
        "is_correct": bool(is_correct),
        "correctness_metrics": metrics,
        "sdpa_time_us": float(sdpa_us),
        "kernel_time_us": float(kernel_us),
        "speedup": float(sdpa_us / kernel_us) if kernel_us > 0 else float("inf"),
        "input_shape": {"B": B, "H": H, "S": S, "D": D},
    }


def print_comparison_summary(comparison: Dict[str, Any]) -> None:
    """Prints a ``compare_to_sdpa`` result as a short human-readable summary."""
    shape = comparison.get("input_shape", {})
    metrics = comparison.get("correctness_metrics", {})
    shape_text = ", ".join(f"{k}={v}" for k, v in shape.items())
    status = "PASS" if comparison.get("is_correct") else "FAIL"
    lines = [
        "blackwell_sparsek vs torch SDPA",
        f"  input shape    : {shape_text}",
        f"  correctness    : {status} (max diff {metrics.get('max_diff', float('nan')):.3e}, "
        f"mean diff {metrics.get('mean_diff', float('nan')):.3e}, "
        f"mismatches {metrics.get('num_mismatches', 0)} = "
        f"{metrics.get('mismatch_rate', 0.0):.4f}%)",
        f"  SDPA latency   : {comparison.get('sdpa_time_us', float('nan')):.2f} us (median)",
        f"  kernel latency : {comparison.get('kernel_time_us', float('nan')):.2f} us (median)",
        f"  speedup        : {comparison.get('speedup', float('nan')):.2f}x "
        "(SDPA time / kernel time)",
    ]
    print("\n".join(lines))


__all__ = ["benchmark_latency", "validate_correctness", "compare_to_sdpa",
           "print_comparison_summary"]
