#!/usr/bin/env python3
"""blackwell_sparsek.utils.compare_to_sdpa on the seed's shapes, as a markdown table.

    python bench/torch_compare.py                 # fp16, causal and not, the three shapes
    python bench/torch_compare.py --dtype bf16 --iters 200

For each shape (B, H, S, D) in {(1, 8, 512, 64), (1, 32, 2048, 128), (1, 32, 8192, 128)} and
causal in {no, yes}: random normal Q, K, V on the GPU, then compare_to_sdpa (SDPA with the same
scale, its fastest backend; correctness with rtol=1e-3, atol=2e-3; median latency of --iters
calls after --warmup calls, CUDA events). Causal rows pass ``causal=True`` to both (T == S, so
SDPA's top-left and our bottom-right alignment agree). Run it outside the source tree or after
``pip install .`` so that the installed package (with its kernels) is imported. Exit code 1
when a result is not correct.
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

SHAPES = [(1, 8, 512, 64), (1, 32, 2048, 128), (1, 32, 8192, 128)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 0

    import blackwell_sparsek
    from blackwell_sparsek import attention_forward, utils

    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    info = blackwell_sparsek.get_build_info()
    print(f"device: {info['device_name']} ({info['compute_arch']}), torch "
          f"{info['torch_version']}, library {info['library_version']} "
          f"{info['supported_archs']}, dtype {args.dtype}\n")

    # compare_to_sdpa times with benchmark_latency's defaults; honour --iters/--warmup.
    utils_benchmark = utils.benchmark_latency
    utils.benchmark_latency = functools.partial(utils_benchmark, num_warmup=args.warmup,
                                                num_iters=args.iters)
    rows, failed = [], False
    try:
        for b, h, s, d in SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(s * 1000 + d)
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=gen)
                       for _ in range(3))
            for causal in (False, True):
                if causal:
                    kernel = functools.partial(attention_forward, causal=True)
                    sdpa = F.scaled_dot_product_attention
                    F.scaled_dot_product_attention = functools.partial(sdpa, is_causal=True)
                else:
                    kernel = attention_forward
                try:
                    result = utils.compare_to_sdpa(q, k, v, kernel)
                finally:
                    if causal:
                        F.scaled_dot_product_attention = sdpa
                failed |= not result["is_correct"]
                rows.append((f"{b}, {h}, {s}, {d}", "yes" if causal else "no",
                             result["kernel_time_us"], result["sdpa_time_us"],
                             result["speedup"], result["correctness_metrics"]["max_diff"],
                             result["is_correct"]))
            del q, k, v
            torch.cuda.empty_cache()
    finally:
        utils.benchmark_latency = utils_benchmark

    print("| shape (B, H, S, D) | causal | kernel (us) | SDPA (us) | speedup | max diff "
          "| correct |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for shape, causal, kernel_us, sdpa_us, speedup, max_diff, ok in rows:
        print(f"| {shape} | {causal} | {kernel_us:.1f} | {sdpa_us:.1f} | {speedup:.2f}x | "
              f"{max_diff:.2e} | {'yes' if ok else 'NO'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
