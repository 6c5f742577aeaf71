"""Adapters for xFormers and vLLM.

- ``SparseKAttention``: an ``nn.Module`` on the xFormers layout ``[B, S, H, D]`` (grouped-query
  attention when k/v have fewer heads). With an ``att_mask`` (a torch mask, or an xFormers
  ``AttentionBias`` that can be materialised) or with dropout while training, it falls back to
  ``torch.nn.functional.scaled_dot_product_attention``. Needs neither xFormers nor vLLM.
- ``SparseKAttentionOp``: ``(forward op, None)`` for ``xformers.ops.memory_efficient_attention(
  ..., op=SparseKAttentionOp)``. Built on first access; needs xFormers (ImportError saying
  ``pip install xformers`` otherwise).
- ``SparseKBackend``: the vLLM backend description (name ``"SPARSEK_XFORMERS"``, head sizes
  ``[64, 128]``, KV-cache shape) plus ``forward`` on vLLM's packed token layout. It subclasses
  vLLM's ``AttentionBackend`` when vLLM is installed. ``register_vllm_backend()`` registers it
  in vLLM's attention-backend registry (the ``CUSTOM`` slot); it is called on import of this
  module when vLLM is importable (a failure there is a warning), and raises ImportError saying
  ``pip install vllm`` when called without vLLM.

Importing this module needs neither xFormers nor vLLM.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .ops import NO_BACKWARD_MESSAGE, attention_forward_bshd

BACKEND_NAME = "SPARSEK_XFORMERS"
SUPPORTED_HEAD_SIZES = [64, 128]
VLLM_CLASS_PATH = "blackwell_sparsek.backends.SparseKBackend"

_XFORMERS_HINT = "install xFormers: pip install xformers"
_VLLM_HINT = "install vLLM: pip install vllm"


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# SDPA fallback (masks, dropout)


def _sdpa_bshd(q, k, v, attn_mask, dropout_p: float, scale: Optional[float], causal: bool):
    """SDPA on ``[B, S, H, D]`` inputs; k/v heads repeated when fewer than q's."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if kt.shape[1] != qt.shape[1]:
        group = qt.shape[1] // kt.shape[1]
        kt = kt.repeat_interleave(group, dim=1)
        vt = vt.repeat_interleave(group, dim=1)
    kwargs = {} if scale is None else {"scale": scale}
    t, s = qt.shape[2], kt.shape[2]
    is_causal = False
    if causal and attn_mask is None and t == s:
        is_causal = True  # SDPA's own causal mask (top-left) equals ours when T == S
    elif causal:
        # Bottom-right aligned causal mask, combined with the caller's mask.
        rows = torch.arange(t, device=q.device)[:, None] + (s - t)
        allowed = torch.arange(s, device=q.device)[None, :] <= rows
        if attn_mask is None:
            attn_mask = allowed
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & allowed
        else:
            attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, **kwargs)
    return out.transpose(1, 2)


def _materialize_bias(att_mask, q: torch.Tensor, k: torch.Tensor):
    """A torch mask for SDPA from a tensor or an xFormers ``AttentionBias``."""
    if isinstance(att_mask, torch.Tensor):
        return att_mask
    b, t, h, _ = q.shape
    s = k.shape[1]
    if hasattr(att_mask, "materialize"):  # xFormers AttentionBias
        return att_mask.materialize((b, h, t, s), dtype=q.dtype, device=q.device)
    if hasattr(att_mask, "to_tensor"):  # older xFormers AttentionMask
        return att_mask.to_tensor().to(device=q.device, dtype=q.dtype)
    raise TypeError("att_mask must be a torch.Tensor or an xFormers AttentionBias, got "
                    f"{type(att_mask).__name__}")


# --------------------------------------------------------------------------------------------
# SparseKAttention


class SparseKAttention(torch.nn.Module):
    """xFormers-style attention module over the blackwell_sparsek kernel.

    ``forward(q, k, v, att_mask=None)`` takes the xFormers layout ``[B, S, H, D]``
    (``k``/``v`` may have fewer heads than ``q``: grouped-query attention) and returns
    ``[B, S, H, D]``. Without a mask it runs the kernel (fp16/bf16 CUDA tensors); with
    ``att_mask`` (a boolean/additive torch mask broadcastable to ``[B, H, S_q, S_k]``, or an
    xFormers ``AttentionBias``), or with ``dropout > 0`` in training mode, it falls back to
    ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
      dropout: attention dropout probability (applied through the SDPA fallback in training
        mode only; the kernel has no dropout). ``None`` means 0.
      causal: causal masking (bottom-right aligned when the query is shorter than the keys).
      scale: softmax scale, default ``1 / sqrt(D)``.
      window: causal sliding window (needs ``causal=True``).
    Other positional or keyword arguments (e.g. from an xFormers attention config) are
    accepted and ignored with a warning.
    """

    def __init__(self, dropout: Optional[float] = None, *args, causal: bool = False,
                 scale: Optional[float] = None, window: Optional[int] = None, **kwargs):
        super().__init__()
        if args or kwargs:
            ignored = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
            warnings.warn("blackwell_sparsek.backends.SparseKAttention ignores the arguments "
                          f"{', '.join(ignored)}", UserWarning, stacklevel=2)
        dropout = 0.0 if dropout is None else float(dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if window is not None and not causal:
            raise ValueError("window selects a causal sliding window: pass causal=True")
        self.dropout = dropout
        self.causal = bool(causal)
        self.scale = scale
        self.window = window

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, scale={self.scale}, window={self.window}, "
                f"dropout={self.dropout}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                att_mask: Optional[Any] = None, **kwargs) -> torch.Tensor:
        if kwargs:
            warnings.warn("blackwell_sparsek.backends.SparseKAttention.forward ignores "
                          f"{sorted(kwargs)}", UserWarning, stacklevel=2)
        dropout_p = self.dropout if self.training else 0.0
        if att_mask is not None or dropout_p > 0.0:
            if self.window is not None:
                raise ValueError("SparseKAttention: window cannot be combined with att_mask or "
                                 "dropout (the SDPA fallback has no sliding window)")
            mask = None if att_mask is None else _materialize_bias(att_mask, q, k)
            return _sdpa_bshd(q, k, v, mask, dropout_p, self.scale, self.causal)
        return attention_forward_bshd(q, k, v, scale=self.scale, causal=self.causal,
                                      window=self.window)


# --------------------------------------------------------------------------------------------
# xFormers operator


def _xformers_operator(query, key, value, scale=None, causal=False):
    """What ``SparseKFwOp.OPERATOR`` points at (xFormers only checks that it exists)."""
    return attention_forward_bshd(query, key, value, scale=scale, causal=causal)


def _bmghk_to_bshd(q, k, v):
    """xFormers' 5-D grouped layout ``[B, M, G, H, K]`` (k/v expanded over H) to
    ``[B, M, heads, K]``: q gets G*H heads, k/v G heads when expanded (else G*H)."""
    b, mq, g, h, d = q.shape
    q4 = q.reshape(b, mq, g * h, d)
    if h == 1 or (k.stride(3) == 0 and v.stride(3) == 0):
        return q4, k[:, :, :, 0], v[:, :, :, 0]
    mk = k.shape[1]
    return q4, k.reshape(b, mk, g * h, d), v.reshape(b, mk, g * h, d)


def _build_xformers_op():
    try:
        from xformers.ops.fmha import attn_bias as xattn_bias
        from xformers.ops.fmha.common import AttentionFwOpBase
    except ImportError as exc:
        raise ImportError(f"SparseKAttentionOp needs xFormers, which is not importable "
                          f"({exc}); {_XFORMERS_HINT}") from exc

    top_left = getattr(xattn_bias, "LowerTriangularMask", None)
    bottom_right = getattr(xattn_bias, "LowerTriangularFromBottomRightMask", None)
    bias_types = tuple(t for t in (type(None), top_left, bottom_right) if t is not None)
    causal_types = tuple(t for t in (top_left, bottom_right) if t is not None)

    class SparseKFwOp(AttentionFwOpBase):
        """blackwell_sparsek forward for ``xformers.ops.memory_efficient_attention``: fp16/bf16
        CUDA inputs ``[B, M, H, K]`` or ``[B, M, G, H, K]``, K a multiple of 8 up to 256, no
        bias, ``LowerTriangularMask`` (when Mq == Mkv) or ``LowerTriangularFromBottomRightMask``;
        no dropout; no backward (gradients are not supported yet)."""

        OPERATOR = _xformers_operator
        SUPPORTED_DEVICES = {"cuda"}
        SUPPORTED_DTYPES = {torch.half, torch.bfloat16}
        SUPPORTED_MAX_K = 256
        SUPPORTED_MIN_K = 8
        SUPPORTED_ATTN_BIAS_TYPES = bias_types
        SUPPORTS_DROPOUT = False
        SUPPORTS_CUSTOM_SCALE = True
        SUPPORTS_DIFFERENT_VALUE_EMBED = False
        SUPPORTS_OUTPUT_DTYPE = False
        SUPPORTS_PARTIAL = False
        SUPPORTS_BMGHK = True
        CUDA_MINIMUM_COMPUTE_CAPABILITY = (8, 0)
        IS_DETERMINISTIC = True
        NAME = "sparsekF"

        @classmethod
        def not_supported_reasons(cls, d) -> List[str]:
            base = getattr(super(SparseKFwOp, cls), "not_supported_reasons", None)
            reasons = list(base(d)) if base is not None else []
            q, k = d.query, d.key
            if q.ndim not in (4, 5):
                reasons.append("query must be [B, M, H, K] or [B, M, G, H, K]")
            if q.shape[-1] % 8 != 0:
                reasons.append("query.shape[-1] must be a multiple of 8")
            if type(d.attn_bias) not in bias_types:
                reasons.append(f"attn_bias type {type(d.attn_bias).__name__} not supported")
            if top_left is not None and type(d.attn_bias) is top_left and \
                    q.shape[1] != k.shape[1]:
                reasons.append("LowerTriangularMask (top-left) with Mq != Mkv: use "
                               "LowerTriangularFromBottomRightMask")
            if q.ndim == 4 and k.ndim == 4 and k.shape[2] and q.shape[2] % k.shape[2] != 0:
                reasons.append("query heads must be a multiple of key heads")
            if getattr(d, "p", 0.0):
                reasons.append("dropout not supported")
            return reasons

        @classmethod
        def supports(cls, d) -> bool:
            return not cls.not_supported_reasons(d)

        @classmethod
        def apply(cls, inp, needs_gradient: bool):
            if needs_gradient:
                raise NotImplementedError(NO_BACKWARD_MESSAGE)
            q, k, v = inp.query, inp.key, inp.value
            if q.ndim == 5:
                q, k, v = _bmghk_to_bshd(q, k, v)
            if type(inp.attn_bias) not in bias_types:
                raise NotImplementedError(
                    f"SparseKFwOp: attn_bias {type(inp.attn_bias).__name__} not supported")
            causal = type(inp.attn_bias) in causal_types
            out = attention_forward_bshd(q, k, v, scale=inp.scale, causal=causal)
            return out.reshape(inp.query.shape[:-1] + (inp.value.shape[-1],)), None

    return (SparseKFwOp, None)


_xformers_op = None


def get_xformers_op():
    """``(SparseKFwOp, None)``: the ``op=`` argument of ``memory_efficient_attention``.
    Raises ImportError (saying ``pip install xformers``) without xFormers."""
    global _xformers_op
    if _xformers_op is None:
        _xformers_op = _build_xformers_op()
    return _xformers_op


# --------------------------------------------------------------------------------------------
# vLLM


def _vllm_backend_base():
    if not _module_available("vllm"):
        return object
    for module_name in ("vllm.v1.attention.backend", "vllm.attention.backends.abstract"):
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - any vLLM import problem: fall back to a plain class
            continue
        base = getattr(module, "AttentionBackend", None)
        if isinstance(base, type):
            return base
    return object


class SparseKBackend(_vllm_backend_base()):
    """vLLM attention backend description for blackwell_sparsek.

    ``get_name() == "SPARSEK_XFORMERS"``, ``get_supported_head_sizes() == [64, 128]``,
    ``get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)`` is
    ``(2, num_blocks, block_size, num_kv_heads, head_size)`` (keys and values, vLLM's
    FlashAttention layout).

    ``forward(query, key, value, cu_seqlens_q=None, cu_seqlens_k=None, scale=None,
    causal=True)`` runs the kernel on vLLM's packed token layout ``[num_tokens, heads,
    head_size]`` (one or several sequences, delimited by cumulative lengths). Serving inside
    vLLM needs a paged-KV-cache implementation (``get_impl_cls``), which does not exist yet:
    those methods raise NotImplementedError.
    """

    accept_output_buffer = False

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_supported_head_sizes() -> List[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def get_supported_dtypes(cls) -> List[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> Tuple[int, ...]:
        if head_size not in SUPPORTED_HEAD_SIZES:
            raise ValueError(f"head_size must be one of {SUPPORTED_HEAD_SIZES}, got "
                             f"{head_size}")
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def _paged_not_implemented(what: str):
        raise NotImplementedError(
            f"SparseKBackend.{what}: serving inside vLLM (attention over vLLM's paged KV cache) "
            "is not implemented yet; use SparseKBackend().forward on packed sequences, or "
            "another vLLM attention backend")

    @staticmethod
    def get_impl_cls():
        SparseKBackend._paged_not_implemented("get_impl_cls")

    @staticmethod
    def get_metadata_cls():
        SparseKBackend._paged_not_implemented("get_metadata_cls")

    @staticmethod
    def get_builder_cls():
        SparseKBackend._paged_not_implemented("get_builder_cls")

    @staticmethod
    def get_state_cls():
        SparseKBackend._paged_not_implemented("get_state_cls")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                cu_seqlens_q: Optional[Sequence[int]] = None,
                cu_seqlens_k: Optional[Sequence[int]] = None, scale: Optional[float] = None,
                causal: bool = True) -> torch.Tensor:
        """Attention on packed tokens: ``query`` ``[num_q_tokens, Hq, D]``, ``key``/``value``
        ``[num_k_tokens, Hkv, D]``; ``cu_seqlens_q``/``cu_seqlens_k`` (length ``n + 1``,
        starting at 0) delimit ``n`` sequences (default: one sequence). Causal masking is
        bottom-right aligned per sequence (a sequence's queries are its last tokens, as in
        chunked prefill and decode). Returns ``[num_q_tokens, Hq, D]``."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                raise ValueError(f"{name} must be a [num_tokens, num_heads, head_size] tensor")
        if (cu_seqlens_q is None) != (cu_seqlens_k is None):
            raise ValueError("pass both cu_seqlens_q and cu_seqlens_k, or neither")
        if cu_seqlens_q is None:
            return attention_forward_bshd(query[None], key[None], value[None], scale=scale,
                                          causal=causal)[0]
        bq = [int(x) for x in (cu_seqlens_q.tolist() if isinstance(cu_seqlens_q, torch.Tensor)
                               else cu_seqlens_q)]
        bk = [int(x) for x in (cu_seqlens_k.tolist() if isinstance(cu_seqlens_k, torch.Tensor)
                               else cu_seqlens_k)]
        if len(bq) != len(bk) or len(bq) < 2 or bq[0] != 0 or bk[0] != 0:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length n + 1 >= 2 "
                             "and start at 0")
        if bq[-1] != query.shape[0] or bk[-1] != key.shape[0]:
            raise ValueError(f"cu_seqlens must end at the token counts ({query.shape[0]}, "
                             f"{key.shape[0]}), got ({bq[-1]}, {bk[-1]})")
        if any(b < a for a, b in zip(bq, bq[1:])) or any(b < a for a, b in zip(bk, bk[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
        out = torch.empty_like(query)
        for i in range(len(bq) - 1):
            q0, q1, k0, k1 = bq[i], bq[i + 1], bk[i], bk[i + 1]
            if q1 == q0:
                continue
            out[q0:q1] = attention_forward_bshd(query[None, q0:q1], key[None, k0:k1],
                                                value[None, k0:k1], scale=scale,
                                                causal=causal)[0]
        return out


# vLLM's AttentionBackend is an ABC whose abstract methods change between releases; the
# methods above are the ones this backend provides, so instances stay constructible.
SparseKBackend.__abstractmethods__ = frozenset()


def register_vllm_backend() -> str:
    """Registers ``SparseKBackend`` in vLLM's attention-backend registry.

    vLLM's backend names are a fixed enum, so the backend takes the ``CUSTOM`` slot (select it
    with ``--attention-backend CUSTOM`` or ``VLLM_ATTENTION_BACKEND=CUSTOM``). Returns the
    slot's name. Raises ImportError (saying ``pip install vllm``) without vLLM and RuntimeError
    when the installed vLLM has no registry for out-of-tree backends.
    """
    try:
        importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(f"register_vllm_backend needs vLLM, which is not importable ({exc}); "
                          f"{_VLLM_HINT}") from exc
    problems = []
    for module_name in ("vllm.v1.attention.backends.registry",
                        "vllm.attention.backends.registry"):
        try:
            registry = importlib.import_module(module_name)
        except ImportError as exc:
            problems.append(f"{module_name}: {exc}")
            continue
        enum = getattr(registry, "AttentionBackendEnum", None)
        register = getattr(registry, "register_backend", None)
        if enum is None or register is None or not hasattr(enum, "CUSTOM"):
            problems.append(f"{module_name}: no register_backend/AttentionBackendEnum.CUSTOM")
            continue
        register(enum.CUSTOM, VLLM_CLASS_PATH)
        return "CUSTOM"
    raise RuntimeError("register_vllm_backend: this vLLM version has no registry for "
                       "out-of-tree attention backends (" + "; ".join(problems) + ")")


def __getattr__(name: str):
    if name == "SparseKAttentionOp":
        return get_xformers_op()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _auto_register() -> None:
    if not _module_available("vllm"):
        return
    try:
        register_vllm_backend()
    except Exception as exc:  # noqa: BLE001 - importing this module must not fail on vLLM
        warnings.warn(f"blackwell_sparsek: could not register the vLLM backend: {exc}",
                      RuntimeWarning, stacklevel=2)


_auto_register()

# SparseKAttentionOp is resolved lazily (module __getattr__) and so is left out of __all__:
# a star import must not need xFormers.
__all__ = ["SparseKAttention", "SparseKBackend", "register_vllm_backend", "get_xformers_op",
           "BACKEND_NAME", "SUPPORTED_HEAD_SIZES"]
