"""jax_sparsek: fast sparse (SparseK) and dense attention for JAX on NVIDIA GPUs."""
from ._extension import build_info
from .gates import sparsek_gates
from ._reference import dense_attention_reference, gated_attention_reference
from .attention import sparsek_attention

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "dense_attention_reference",
    "gated_attention_reference",
    "sparsek_attention",
    "sparsek_gates",
]
