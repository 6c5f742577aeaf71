"""The public attention entry point."""
from __future__ import annotations

from . import _extension
from ._autodiff import dense_attention, sparsek_attention_op
from ._primitive import SPARSEK_CUDA_MAX_KEYS, cuda_kernel_available
from ._validation import check_attention_args


def sparsek_attention(query, key, value, scores=None, *, topk=None, window=None,
                      is_causal=False, scale=None, implementation=None, return_lse=False):
    """Scaled dot-product attention: full, causal, causal sliding-window and SparseK.

    Args:
      query: ``[B, T, Nq, H]`` float16 or bfloat16 (the layout of
        ``jax.nn.dot_product_attention``).
      key, value: ``[B, S, Nkv, H]``, same dtype; ``Nq`` a multiple of ``Nkv`` (GQA/MQA).
        ``T != S`` uses bottom-right alignment: query row ``i`` sits at position ``i + S - T``.
      scores: SparseK mode: ``[B, S, Nkv]`` importance score per key and kv head (any float
        dtype, used in float32; finite, or ``-inf`` for keys that are never selected, e.g.
        padding).
        Needs ``topk`` and ``is_causal=True``.
      topk: SparseK budget ``K >= 1``: each row's gates over its sparse domain (the keys
        before its window) sum to ``min(K, domain size)``; see SPARSEK.md.
      window: dense modes: causal sliding window, row ``i`` sees keys
        ``p(i) - window < j <= p(i)`` (needs ``is_causal=True``). SparseK mode: the
        ``window >= 0`` most recent keys always get gate 1 (default 0).
      is_causal: causal masking, ``j <= p(i)``.
      scale: softmax scale, default ``1 / sqrt(H)``.
      implementation: ``None`` (our CUDA kernel on CUDA, the pure-JAX reference elsewhere),
        ``'cuda'`` (the kernel or an error) or ``'xla'`` (the reference everywhere).
      return_lse: also return the float32 log-sum-exp ``[B, Nq, T]`` (``-inf`` for a row
        that sees no key, whose output is 0).

    Returns:
      ``[B, T, Nq, H]`` in the input dtype, and with ``return_lse`` the pair ``(out, lse)``.
    """
    config = check_attention_args(query, key, value, scores, topk, window, is_causal, scale,
                                  implementation)
    if config.implementation == "cuda":
        if not cuda_kernel_available(config, key.shape[1]):
            raise ValueError(
                f"implementation='cuda': the SparseK CUDA kernels take at most "
                f"{SPARSEK_CUDA_MAX_KEYS} keys, got key length {key.shape[1]}; use "
                "implementation=None or 'xla' (the pure-JAX reference)")
        if not _extension.cuda_kernels_built():
            _extension.ensure_cuda_targets()
        if not _extension.jax_has_cuda():
            raise RuntimeError("implementation='cuda' needs a CUDA device visible to JAX; "
                               "none was found (use implementation=None or 'xla')")
    if config.sparsek:
        out, lse = sparsek_attention_op(query, key, value, scores, config)
    else:
        out, lse = dense_attention(query, key, value, config)
    return (out, lse) if return_lse else out
