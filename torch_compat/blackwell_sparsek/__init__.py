"""blackwell_sparsek: the PyTorch API of jax-sparsek's attention kernels.

A thin layer over the same compiled library the JAX package uses (``jax_sparsek``'s nanobind
module; see ``blackwell_sparsek._C``): no second CUDA build, no torch C++ extension, and jax is
not imported. Install with ``pip install ".[torch]"`` (or any torch >= 2.4).

    import torch
    from blackwell_sparsek import attention_forward

    Q = torch.randn(1, 8, 512, 64, dtype=torch.float16, device="cuda")
    K = torch.randn(1, 8, 512, 64, dtype=torch.float16, device="cuda")
    V = torch.randn(1, 8, 512, 64, dtype=torch.float16, device="cuda")
    out = attention_forward(Q, K, V, causal=True)   # [1, 8, 512, 64]

Modules: ``ops`` (``attention_forward`` and its ``torch.library`` custom op), ``core``
(``Config``, ``get_build_info``), ``utils`` (timing and correctness helpers), ``backends``
(xFormers and vLLM adapters), ``_C`` (the compiled library).

Importing the package needs no GPU and no compiled kernels; calls that need them raise
ImportError (no kernels: reinstall with nvcc on PATH) or RuntimeError (unsupported GPU).
"""
try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("blackwell_sparsek needs PyTorch: pip install \"jax-sparsek[torch]\" "
                      "(or pip install torch)") from exc

__version__ = "0.1.0"

from . import _C, core, ops, utils  # noqa: E402
from .core import Config, get_build_info, get_default_config, set_default_config  # noqa: E402
from .ops import attention_forward, attention_forward_bshd  # noqa: E402

_BACKEND_NAMES = ("SparseKAttention", "SparseKAttentionOp", "SparseKBackend",
                  "register_vllm_backend")


def __getattr__(name):
    # The adapters live in blackwell_sparsek.backends, imported on first use (it registers the
    # vLLM backend when vLLM is installed, and SparseKAttentionOp needs xFormers).
    if name == "backends" or name in _BACKEND_NAMES:
        import importlib

        backends = importlib.import_module(".backends", __name__)
        return backends if name == "backends" else getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "attention_forward",
    "attention_forward_bshd",
    "Config",
    "get_build_info",
    "get_default_config",
    "set_default_config",
    "SparseKAttention",
    "SparseKBackend",
    "register_vllm_backend",
]
