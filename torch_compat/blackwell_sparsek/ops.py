"""``attention_forward`` and the torch custom op it calls.

The op ``torch.ops.blackwell_sparsek.attention_fwd`` is registered with
``torch.library.custom_op`` and a fake (meta) implementation, so ``torch.compile`` traces it
without graph breaks. Its CUDA implementation hands raw pointers and strides to the compiled
library that the JAX side uses (``jax_sparsek._jax_sparsek_ext.attention_fwd_pointers``), on
torch's current stream of the inputs' device.

Gradients are not supported yet (the backward kernels are wired to JAX only): no autograd
formula is registered. Calling ``backward`` through the output raises a RuntimeError that says so; under
``torch.compile`` a call whose inputs require grad (with grad mode on) is refused while tracing
(with ``fullgraph=False`` it runs eagerly instead). Call it under ``torch.no_grad()`` /
``torch.inference_mode()`` or on inputs that do not require grad.
"""
import contextlib
import math
import numbers
import os
import re
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from . import _C
from . import core

Tensor = torch.Tensor

OP_NAME = "blackwell_sparsek::attention_fwd"
MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 0)
_KERNEL_DTYPES: Dict[torch.dtype, str] = {torch.float16: "float16",
                                          torch.bfloat16: "bfloat16"}
_MAX_SEQLEN = (1 << 31) - 1024  # positions are 32-bit inside the kernel
# Set by the test suite (tests/conftest.py) before import, as for the launcher, which poisons
# only outputs in the [B, T, H, D] contiguous layout.
_POISON_OUTPUTS = os.environ.get("JAX_SPARSEK_POISON_OUTPUTS") == "1"

NO_BACKWARD_MESSAGE = (
    "blackwell_sparsek.attention_forward has no backward yet (the library's backward kernels "
    "are wired to JAX only so far): gradients are not supported in this version. Run it "
    "under torch.no_grad() or "
    "torch.inference_mode(), or on inputs that do not require grad; for training use "
    "torch.nn.functional.scaled_dot_product_attention.")


# --------------------------------------------------------------------------------------------
# Argument checks (shared by attention_forward, the op and its fake implementation)


def _names(bshd: bool) -> Tuple[str, str]:
    return ("[B, S, H, D]", "bshd") if bshd else ("[B, H, S, D]", "bhsd")


def check_inputs(Q, K, V, *, bshd: bool = False, check_device: bool = True,
                 names: Sequence[str] = ("Q", "K", "V")) -> Tuple[int, int, int, int, int, int]:
    """Validates query/key/value; returns ``(B, T, Hq, S, Hkv, D)``.

    ``Q`` is ``[B, Hq, T, D]`` and ``K``, ``V`` are ``[B, Hkv, S, D]`` (``bshd=False``), or
    ``[B, T, Hq, D]`` and ``[B, S, Hkv, D]`` (``bshd=True``, the xFormers layout). Raises
    TypeError for a non-tensor, ValueError naming the argument for a non-CUDA tensor (when
    ``check_device``), a dtype other than float16/bfloat16, mismatched dtypes or devices, and
    incompatible shapes.
    """
    layout, _ = _names(bshd)
    qn, kn, vn = names
    for name, x in ((qn, Q), (kn, K), (vn, V)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in ((qn, Q), (kn, K), (vn, V)):
        if check_device and x.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor, got a tensor on {x.device}")
    for name, x in ((qn, Q), (kn, K), (vn, V)):
        if x.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name} must be torch.float16 (or torch.bfloat16), got {x.dtype}")
    for name, x in ((kn, K), (vn, V)):
        if x.dtype != Q.dtype:
            raise ValueError(f"{name} dtype {x.dtype} does not match {qn} dtype {Q.dtype}")
        if check_device and x.device != Q.device:
            raise ValueError(f"{name} is on {x.device} but {qn} is on {Q.device}; all inputs "
                             "must be on the same device")
    for name, x in ((qn, Q), (kn, K), (vn, V)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions {layout}, got shape "
                             f"{tuple(x.shape)}")
    if bshd:
        b, t, hq, d = Q.shape
        _, s, hkv, _ = K.shape
    else:
        b, hq, t, d = Q.shape
        _, hkv, s, _ = K.shape
    if tuple(V.shape) != tuple(K.shape):
        raise ValueError(f"{vn} shape {tuple(V.shape)} must equal {kn} shape {tuple(K.shape)}")
    if K.shape[0] != b:
        raise ValueError(f"{kn} batch size {K.shape[0]} does not match {qn} batch size {b}")
    if K.shape[3] != d:
        raise ValueError(f"{kn} head dim {K.shape[3]} does not match {qn} head dim {d}")
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{qn} head dim (last dimension) must be a multiple of 8 between 8 and "
                         f"{MAX_HEAD_DIM} (64 and 128 are the tuned sizes), got {d}")
    if hkv == 0:
        raise ValueError(f"{kn} must have at least one head, got shape {tuple(K.shape)}")
    if hq % hkv != 0:
        raise ValueError(f"{qn} heads ({hq}) must be a multiple of {kn}/{vn} heads ({hkv}) "
                         "(grouped-query attention)")
    if hq > 65535:
        raise ValueError(f"{qn} must have at most 65535 heads, got {hq}")
    if t > _MAX_SEQLEN or s > _MAX_SEQLEN:
        raise ValueError(f"sequence lengths must be below 2^31 - 1024, got {qn} {t}, {kn} {s}")
    return b, t, hq, s, hkv, d


def check_options(scale, causal, window, scores=None,
                  topk=None) -> Tuple[Optional[float], bool, int]:
    """Validates the options; returns ``(scale or None, causal, window)`` (window 0: none)."""
    if scores is not None or topk is not None:
        raise NotImplementedError(
            "the SparseK mode (scores=..., topk=...) is not implemented yet; call "
            "attention_forward without scores and topk for full, causal or sliding-window "
            "attention")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is None:
        window_int = 0
    else:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"window must be an int or None, got {type(window).__name__}")
        if window <= 0:
            raise ValueError(f"window must be a positive number of keys, got {window}")
        if not causal:
            raise ValueError("window selects a causal sliding window: pass causal=True with "
                             "window")
        window_int = int(window)
    return scale, causal, window_int


# --------------------------------------------------------------------------------------------
# Architecture


def _parse_target(name: str) -> Optional[Tuple[int, int, str]]:
    match = re.fullmatch(r"sm_(\d+)(\d)([af]?)", name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3)


def arch_supported(capability: Tuple[int, int], compiled: Sequence[str]) -> bool:
    """Whether code compiled for ``compiled`` (e.g. ``["sm_80", "sm_90a"]``) runs on a GPU of
    compute ``capability``: at least 8.0, and an ``sm_XYa`` target for exactly it, an
    ``sm_XYf`` target of its family, or a portable target no newer than it (machine code of
    the same major version, or PTX that the driver compiles)."""
    major, minor = int(capability[0]), int(capability[1])
    if (major, minor) < MIN_CAPABILITY:
        return False
    for name in compiled:
        target = _parse_target(name)
        if target is None:
            continue
        tmajor, tminor, suffix = target
        if suffix == "a" and (tmajor, tminor) == (major, minor):
            return True
        if suffix == "f" and tmajor == major and tminor <= minor:
            return True
        if suffix == "" and (tmajor, tminor) <= (major, minor):
            return True
    return False


_checked_devices: Dict[int, bool] = {}


def _check_device_arch(device: torch.device) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _checked_devices.get(index):
        return
    compiled = _C.supported_archs()  # ImportError with the fix when not built
    if not compiled:
        raise ImportError("blackwell_sparsek: the compiled library has no CUDA kernels; "
                          "reinstall with nvcc on PATH: pip install .")
    capability = tuple(torch.cuda.get_device_capability(index))
    if not arch_supported(capability, compiled):
        arch = f"sm_{capability[0]}{capability[1]}"
        name = torch.cuda.get_device_name(index)
        if capability < MIN_CAPABILITY:
            raise RuntimeError(
                f"blackwell_sparsek: GPU {index} ({name}) is {arch}, which is not supported: "
                "the kernels need compute capability 8.0 or newer (Ampere sm_80, Hopper "
                "sm_90, Blackwell sm_100)")
        raise RuntimeError(
            f"blackwell_sparsek: GPU {index} ({name}) is {arch}, for which this build has no "
            f"code (compiled for {', '.join(compiled)}); rebuild with its target, e.g. "
            f"BSK_CUDA_ARCH=\"{capability[0]}{capability[1]}\" pip install .")
    _checked_devices[index] = True


# --------------------------------------------------------------------------------------------
# Launch


def _layout_dims(bshd: bool) -> Tuple[int, int, int]:
    """Tensor dimensions holding (batch, row, head)."""
    return (0, 1, 2) if bshd else (0, 2, 1)


def kernel_strides(x: Tensor, bshd: bool, normalize: bool = True) -> Tuple[int, int, int]:
    """``(batch, row, head)`` strides in elements; with ``normalize``, 0 for a dimension of
    size 1 (never stepped over, so any stride there is fine)."""
    return tuple(0 if normalize and x.shape[d] == 1 else int(x.stride(d))
                 for d in _layout_dims(bshd))


def kernel_compatible(x: Tensor, bshd: bool) -> bool:
    """Whether the kernel can read ``x`` in place: head dim contiguous, every other stride a
    multiple of 8 elements, data 16-byte aligned (else the launcher refuses it)."""
    if x.stride(3) != 1:
        return False
    if any(s % 8 != 0 for s in kernel_strides(x, bshd)):
        return False
    return x.data_ptr() % 16 == 0


def prepare_input(x: Tensor, bshd: bool) -> Tensor:
    """``x`` itself when the kernel can read it in place, else a fresh contiguous copy (a
    strided view is never misread: it is either addressed through its strides or copied)."""
    if kernel_compatible(x, bshd):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _empty_outputs(q: Tensor, b: int, t: int, hq: int, d: int, bshd: bool):
    shape = (b, t, hq, d) if bshd else (b, hq, t, d)
    out = torch.empty(shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    return out, lse


def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                        window: int, bshd: bool) -> Tuple[Tensor, Tensor]:
    """The custom op: ``(out, lse)`` for ``q``, ``k``, ``v`` in the ``bshd`` or ``bhsd``
    layout. ``out`` has ``q``'s shape (contiguous), ``lse`` is ``[B, Hq, T]`` float32 (``-inf``
    for a row that sees no key, whose output is 0). ``window`` 0 means no sliding window."""
    b, t, hq, s, hkv, d = check_inputs(q, k, v, bshd=bshd)
    out, lse = _empty_outputs(q, b, t, hq, d, bshd)
    if out.numel() == 0:
        return out, lse
    if _POISON_OUTPUTS:  # tests: NaN first, so that an element the kernel skips shows
        out.fill_(math.nan)
        lse.fill_(math.nan)
    if s == 0:  # every row sees no key
        out.zero_()
        lse.fill_(-math.inf)
        return out, lse
    ext = _C.extension()
    _check_device_arch(q.device)
    q, k, v = (prepare_input(x, bshd) for x in (q, k, v))
    device = q.device
    guard = (torch.cuda.device(device) if device.index != torch.cuda.current_device()
             else contextlib.nullcontext())
    with guard:
        stream = torch.cuda.current_stream(device).cuda_stream
        ext.attention_fwd_pointers(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            b, t, s, hq, hkv, d,
            kernel_strides(q, bshd), kernel_strides(k, bshd), kernel_strides(v, bshd),
            kernel_strides(out, bshd, normalize=False),
            float(scale), bool(causal), int(min(window, s)) if window > 0 else 0,
            _KERNEL_DTYPES[q.dtype], int(device.index), int(stream))
    return out, lse


# The custom op (for torch.compile, which traces it through the fake implementation below).
# Eager calls on plain CUDA tensors that need no gradient skip the Python dispatcher and call
# _attention_fwd_impl directly: the dispatch of a Python custom op costs ~20 us a call.
attention_fwd = torch.library.custom_op(
    OP_NAME, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window, bool bshd) "
           "-> (Tensor, Tensor)")(_attention_fwd_impl)


def _plain_cuda_tensors(*tensors) -> bool:
    return all(type(x) is torch.Tensor and x.is_cuda for x in tensors)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, causal, window, bshd):
    b, t, hq, s, hkv, d = check_inputs(q, k, v, bshd=bshd, check_device=False)
    return _empty_outputs(q, b, t, hq, d, bshd)


# --------------------------------------------------------------------------------------------
# The public function


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return torch._dynamo.is_compiling()


def _raise_no_backward(grad):
    raise RuntimeError(NO_BACKWARD_MESSAGE)


def _profiling_ranges(enabled: bool, on_cuda: bool):
    if not enabled:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.profiler.record_function("blackwell_sparsek::attention_forward"))
    if on_cuda and torch.cuda.is_available():
        stack.enter_context(torch.cuda.nvtx.range("blackwell_sparsek::attention_forward"))
    return stack


def _warn_arch_mismatch(config: core.Config, device: torch.device) -> None:
    if config.auto_detect_arch:
        return
    try:
        capability = tuple(torch.cuda.get_device_capability(device))
    except (RuntimeError, AssertionError):
        return
    actual = f"{capability[0]}{capability[1]}"
    wanted = str(config.cuda_arch).removeprefix("sm_").rstrip("af")
    if wanted != actual:
        core._warn_once(
            f"arch:{config.cuda_arch}:{actual}",
            f"blackwell_sparsek: Config.cuda_arch={config.cuda_arch!r} (auto_detect_arch=False) "
            f"but the GPU is sm_{actual}; the CUDA runtime runs the code compiled for the GPU "
            "present (cuda_arch selects build targets only: BSK_CUDA_ARCH at build time)",
            stacklevel=4)


def _debug_check_inputs(tensors) -> None:
    for name, x in tensors:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} has non-finite values (NaN or inf) (BSK_DEBUG / "
                             "Config.debug_mode check)")


def _debug_check_output(out: Tensor) -> None:
    torch.cuda.synchronize(out.device)  # raises on an asynchronous CUDA error
    if bool(torch.isnan(out).any()):
        raise RuntimeError("blackwell_sparsek: the output has NaN values (BSK_DEBUG / "
                           "Config.debug_mode check)")


def _forward(Q, K, V, scale, causal, window, scores, topk, return_lse, bshd, names):
    scale, causal, window = check_options(scale, causal, window, scores, topk)
    check_inputs(Q, K, V, bshd=bshd, names=names)
    if scale is None:
        scale = 1.0 / math.sqrt(Q.shape[-1])
    requires_grad = torch.is_grad_enabled() and (Q.requires_grad or K.requires_grad
                                                 or V.requires_grad)
    if _is_compiling():
        if requires_grad:
            raise RuntimeError(NO_BACKWARD_MESSAGE + " (Under torch.compile the call is refused "
                               "while tracing when its inputs require grad.)")
        out, lse = attention_fwd(Q, K, V, scale, causal, window, bshd)
        return (out, lse) if return_lse else out

    config = core.get_default_config()
    _warn_arch_mismatch(config, Q.device)
    if config.debug_mode:
        _debug_check_inputs(zip(names, (Q, K, V)))
    # The direct call bypasses autograd too: only when no gradient is asked for, so that a
    # backward through the result still hits the op's clear "no backward yet" error.
    direct = not requires_grad and _plain_cuda_tensors(Q, K, V)
    op = _attention_fwd_impl if direct else attention_fwd
    with _profiling_ranges(config.enable_profiling, True):
        out, lse = op(Q, K, V, scale, causal, window, bshd)
    if config.debug_mode:
        _debug_check_output(out)
    if requires_grad:
        for x in (out, lse):
            if x.requires_grad:
                x.register_hook(_raise_no_backward)
    return (out, lse) if return_lse else out


def attention_forward(Q: Tensor, K: Tensor, V: Tensor, scale: Optional[float] = None,
                      causal: bool = False, *, window: Optional[int] = None,
                      scores: Optional[Tensor] = None, topk: Optional[int] = None,
                      return_lse: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Scaled dot-product attention with the blackwell_sparsek CUDA kernels.

    Args:
      Q: ``[B, H, T, D]`` CUDA tensor, ``torch.float16`` (or ``torch.bfloat16``).
      K, V: ``[B, Hkv, S, D]``, same dtype and device. ``Hkv`` must divide ``H``
        (grouped-query attention: query head ``h`` reads kv head ``h // (H // Hkv)``);
        ``Hkv == H`` is ordinary multi-head attention. ``T != S`` uses bottom-right alignment:
        query row ``i`` sits at position ``i + S - T``.
      scale: softmax scale, default ``1 / sqrt(D)``: ``softmax(Q @ K^T * scale) @ V``.
      causal: causal masking, key ``j`` visible to row ``i`` iff ``j <= i + S - T``.
      window: causal sliding window (needs ``causal=True``): row ``i`` sees the ``window`` keys
        ``i + S - T - window < j <= i + S - T``.
      scores, topk: the SparseK mode; not implemented yet (NotImplementedError).
      return_lse: also return the float32 log-sum-exp ``[B, H, T]`` of each row.

    Returns:
      ``[B, H, T, D]`` in the input dtype (contiguous); with ``return_lse`` the pair
      ``(out, lse)``. A row that sees no key gets output 0 and lse ``-inf``.

    Raises:
      ValueError: an input is not a CUDA tensor, not float16/bfloat16, or the shapes are
        incompatible (the message names the argument); bad ``window``/``scale`` values.
      RuntimeError: the GPU architecture is not supported (named in the message), or the
        kernel launch failed; also when backpropagating through the result (no backward yet).
      ImportError: the package was installed without its CUDA kernels.
      NotImplementedError: ``scores``/``topk`` given.

    Non-contiguous inputs are read through their strides when the head dim is contiguous and
    the other strides are multiples of 8 elements, else copied first. The kernel runs on
    torch's current stream of the inputs' device.
    """
    return _forward(Q, K, V, scale, causal, window, scores, topk, return_lse, False,
                    ("Q", "K", "V"))


def attention_forward_bshd(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                           causal: bool = False, *, window: Optional[int] = None,
                           return_lse: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``attention_forward`` on the xFormers/FlashAttention layout: ``q`` ``[B, T, H, D]``,
    ``k``, ``v`` ``[B, S, Hkv, D]``; returns ``[B, T, H, D]`` (contiguous) and, with
    ``return_lse``, lse ``[B, H, T]``. No transposing copies are made."""
    return _forward(q, k, v, scale, causal, window, None, None, return_lse, True,
                    ("q", "k", "v"))


__all__ = ["attention_forward", "attention_forward_bshd", "attention_fwd", "check_inputs",
           "check_options", "arch_supported", "prepare_input", "kernel_strides",
           "kernel_compatible", "NO_BACKWARD_MESSAGE"]
