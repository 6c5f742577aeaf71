"""The public attention entry point."""
from __future__ import annotations

from . import _extension
from ._primitive import attention_fwd
from ._validation import check_attention_args


def sparsek_attention(query, key, value, scores=None, *, topk=None, window=None,
                      is_causal=False, scale=None, implementation=None, return_lse=False):
    """Scaled dot-product attention: full, causal, causal sliding-window (and SparseK).

    Args:
      query: ``[B, T, Nq, H]`` float16 or bfloat16 (the layout of
        ``jax.nn.dot_product_attention``).
      key, value: ``[B, S, Nkv, H]``, same dtype; ``Nq`` a multiple of ``Nkv`` (GQA/MQA).
        ``T != S`` uses bottom-right alignment: query row ``i`` sits at position ``i + S - T``.
      scores, topk: the SparseK mode (per-key scores ``[B, S, Nkv]`` and a key budget);
        reserved, not implemented yet.
      window: causal sliding window: row ``i`` sees keys ``p(i) - window < j <= p(i)``.
        Needs ``is_causal=True``.
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
        if not _extension.cuda_kernels_built():
            _extension.ensure_cuda_targets()
        if not _extension.jax_has_cuda():
            raise RuntimeError("implementation='cuda' needs a CUDA device visible to JAX; "
                               "none was found (use implementation=None or 'xla')")
    out, lse = attention_fwd(query, key, value, config)
    return (out, lse) if return_lse else out
