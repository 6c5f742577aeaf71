"""The blackwell_sparsek PyTorch layer on a GPU (skipped without one or without built kernels).

attention_forward against a float64 reference (SPARSEK.md's criterion: relative error under
2e-3 for fp16 and 1e-2 for bf16, no NaN; conftest.py makes the launcher poison o and lse first,
so NaN-free output proves every element was written) over ragged shapes, causal / sliding
window, GQA, T != S and strided inputs; the current stream (a non-default stream, CUDA graph
capture) and device; torch.compile; the backends; compare_to_sdpa; the README's GPU examples.
"""
from __future__ import annotations

import math
import pathlib
import re

import pytest

torch = pytest.importorskip("torch")

import blackwell_sparsek  # noqa: E402
from blackwell_sparsek import _C, backends, core, ops, utils  # noqa: E402
from conftest import rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _C.is_available()),
    reason=("needs a CUDA GPU visible to torch and the compiled kernels "
            f"(cuda={torch.cuda.is_available()}, library error: {_C.load_error()})"))

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
README = pathlib.Path(__file__).resolve().parent.parent / "torch_compat" / "README.md"


def randn(*shape, dtype=torch.float16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=gen).to(dtype)


def make_qkv(b, hq, hkv, t, s, d, dtype=torch.float16, seed=0):
    return (randn(b, hq, t, d, dtype=dtype, seed=seed), randn(b, hkv, s, d, dtype=dtype,
                                                               seed=seed + 1),
            randn(b, hkv, s, d, dtype=dtype, seed=seed + 2))


def reference(q, k, v, causal=False, window=None, scale=None):
    """float64 ``(out, lse)`` for ``[B, H, T, D]`` q and ``[B, Hkv, S, D]`` k/v, bottom-right
    aligned masks, GQA by repeating kv heads; empty rows give 0 and -inf."""
    q64, k64, v64 = (x.double() for x in (q, k, v))
    _, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    k64 = k64.repeat_interleave(h // hkv, dim=1)
    v64 = v64.repeat_interleave(h // hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = torch.einsum("bhtd,bhsd->bhts", q64, k64) * scale
    rows = torch.arange(t, device=q.device)[:, None] + (s - t)
    cols = torch.arange(s, device=q.device)[None, :]
    allowed = torch.ones(t, s, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= cols <= rows
    if window:
        allowed &= cols > rows - window
    logits = logits.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse[..., None])
    weights = torch.where(allowed.any(-1)[:, None], weights, torch.zeros_like(weights))
    return weights @ v64, lse


def assert_matches(out, lse, ref_out, ref_lse, dtype, context=""):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    tol = TOL[dtype]
    err_o = rel_err(out.cpu().numpy() if dtype == torch.float16 else out.float().cpu().numpy(),
                    ref_out.cpu().numpy())
    assert err_o < tol, f"{context}: o relative error {err_o:.3g} >= {tol}"
    err_l = rel_err(lse.cpu().numpy(), ref_lse.cpu().numpy())
    assert err_l < tol, f"{context}: lse relative error {err_l:.3g} >= {tol}"
    empty = torch.isneginf(ref_lse)
    if empty.any():
        assert torch.all(out[empty] == 0), f"{context}: rows without keys must be 0"


# --------------------------------------------------------------------------------------------
# Correctness grid

GRID = [  # B, Hq, Hkv, T, S, D
    (1, 2, 2, 1, 1, 64),
    (2, 3, 3, 17, 17, 64),
    (1, 2, 2, 1000, 1000, 128),
    (1, 2, 2, 4099, 4099, 64),
    (2, 4, 4, 17, 1000, 128),     # T < S: chunked prefill
    (1, 4, 4, 1, 4099, 128),      # decode
    (1, 2, 2, 1000, 17, 64),      # T > S: causal rows before the keys are empty
    (2, 8, 2, 333, 333, 128),     # GQA 4:1
    (1, 8, 1, 100, 517, 64),      # MQA
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "b{}_h{}-{}_t{}_s{}_d{}".format(*s))
def test_attention_forward_fp16(shape, causal):
    b, hq, hkv, t, s, d = shape
    q, k, v = make_qkv(b, hq, hkv, t, s, d, seed=sum(shape))
    out, lse = blackwell_sparsek.attention_forward(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    assert_matches(out, lse, ref_out, ref_lse, torch.float16, f"{shape} causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 17, 17, 64), (1, 4, 2, 1000, 1000, 128),
                                   (1, 2, 2, 5, 4099, 64)],
                         ids=lambda s: "b{}_h{}-{}_t{}_s{}_d{}".format(*s))
def test_attention_forward_bf16(shape, causal):
    b, hq, hkv, t, s, d = shape
    q, k, v = make_qkv(b, hq, hkv, t, s, d, dtype=torch.bfloat16, seed=7)
    out, lse = blackwell_sparsek.attention_forward(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal=causal)
    assert_matches(out, lse, ref_out, ref_lse, torch.bfloat16, f"{shape} causal={causal}")


@pytest.mark.parametrize("shape,window", [((1, 2, 2, 1000, 1000, 64), 128),
                                          ((1, 4, 2, 17, 1000, 128), 300),
                                          ((1, 2, 2, 300, 300, 64), 5000)])
def test_sliding_window(shape, window):
    b, hq, hkv, t, s, d = shape
    q, k, v = make_qkv(b, hq, hkv, t, s, d, seed=3)
    out, lse = blackwell_sparsek.attention_forward(q, k, v, causal=True, window=window,
                                                   return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal=True, window=window)
    assert_matches(out, lse, ref_out, ref_lse, torch.float16, f"{shape} window={window}")


def test_custom_scale():
    q, k, v = make_qkv(1, 2, 2, 100, 100, 64, seed=5)
    out, lse = blackwell_sparsek.attention_forward(q, k, v, scale=0.05, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, scale=0.05)
    assert_matches(out, lse, ref_out, ref_lse, torch.float16, "scale=0.05")


def test_default_scale_matches_sdpa():
    q, k, v = make_qkv(1, 8, 8, 512, 512, 64, seed=11)
    out = blackwell_sparsek.attention_forward(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel_err(out.cpu().numpy(), ref.cpu().numpy()) < 2e-3


def test_empty_and_keyless_inputs():
    q, k, v = make_qkv(1, 2, 2, 0, 10, 64)
    out, lse = blackwell_sparsek.attention_forward(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)
    q, k, v = make_qkv(1, 2, 2, 5, 0, 64)
    out, lse = blackwell_sparsek.attention_forward(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


# --------------------------------------------------------------------------------------------
# Strides


def test_transposed_views_are_read_in_place_and_correct():
    # [B, S, H, D] storage viewed as [B, H, S, D]
    base = [randn(2, 300, 4, 64, seed=i) for i in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)
    assert not q.is_contiguous() and ops.kernel_compatible(q, False)
    out, lse = blackwell_sparsek.attention_forward(q, k, v, causal=True, return_lse=True)
    assert out.is_contiguous()
    ref_out, ref_lse = reference(q, k, v, causal=True)
    assert_matches(out, lse, ref_out, ref_lse, torch.float16, "transposed views")


def test_fused_qkv_projection_views():
    # q, k, v as strided slices of one [B, S, 3, H, D] buffer (the output of a fused projection)
    qkv = randn(2, 200, 3, 4, 128, seed=4)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out, lse = blackwell_sparsek.attention_forward(q, k, v, return_lse=True)
    ref_out, ref_lse = reference(q, k, v)
    assert_matches(out, lse, ref_out, ref_lse, torch.float16, "fused qkv views")


@pytest.mark.parametrize("case", ["head_dim_slice", "last_dim_strided", "odd_row_stride",
                                  "misaligned", "expanded_kv"])
def test_non_contiguous_inputs(case):
    b, h, s, d = 2, 4, 123, 64
    if case == "head_dim_slice":
        q, k, v = (randn(b, h, s, 2 * d, seed=i)[..., d:] for i in range(3))
    elif case == "last_dim_strided":
        q, k, v = (randn(b, h, d, s, seed=i).transpose(2, 3) for i in range(3))
        assert q.stride(-1) != 1
    elif case == "odd_row_stride":
        q, k, v = (randn(b, h, s, d + 4, seed=i)[..., :d] for i in range(3))
    elif case == "misaligned":
        q, k, v = (randn(b * h * s * d + 1, seed=i)[1:].view(b, h, s, d) for i in range(3))
        assert q.data_ptr() % 16 != 0
    else:
        q = randn(b, h, s, d, seed=0)
        k, v = (randn(b, 1, s, d, seed=i).expand(b, h, s, d) for i in (1, 2))
    out, lse = blackwell_sparsek.attention_forward(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal=True)
    assert_matches(out, lse, ref_out, ref_lse, torch.float16, case)


# --------------------------------------------------------------------------------------------
# Streams, devices, graphs


def test_runs_on_the_current_non_default_stream():
    q_src, k_src, v_src = make_qkv(2, 4, 4, 512, 512, 64, seed=21)
    stream = torch.cuda.Stream()  # non-blocking: does not wait for the legacy default stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # The inputs are written on `stream` only after a long sleep: a kernel launched on any
        # other stream would read them before they exist.
        torch.cuda._sleep(200_000_000)
        q, k, v = (x.clone() for x in (q_src, k_src, v_src))
        out = blackwell_sparsek.attention_forward(q, k, v, causal=True)
    stream.synchronize()
    ref_out, _ = reference(q_src, k_src, v_src, causal=True)
    assert rel_err(out.cpu().numpy(), ref_out.cpu().numpy()) < 2e-3


def test_cuda_graph_capture():
    q, k, v = make_qkv(1, 4, 4, 256, 256, 64, seed=22)
    static_out = blackwell_sparsek.attention_forward(q, k, v)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = blackwell_sparsek.attention_forward(q, k, v)
    q2, k2, v2 = make_qkv(1, 4, 4, 256, 256, 64, seed=23)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, _ = reference(q2, k2, v2)
    assert rel_err(static_out.cpu().numpy(), ref_out.cpu().numpy()) < 2e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_another_device_keep_the_current_device():
    torch.cuda.set_device(0)
    q, k, v = (x.to("cuda:1") for x in make_qkv(1, 2, 2, 100, 100, 64, seed=24))
    out = blackwell_sparsek.attention_forward(q, k, v)
    assert out.device == q.device and torch.cuda.current_device() == 0
    ref_out, _ = reference(q, k, v)
    assert rel_err(out.cpu().numpy(), ref_out.cpu().numpy()) < 2e-3


# --------------------------------------------------------------------------------------------
# torch.compile, autograd


def test_torch_compile_fullgraph_module():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64, dtype=torch.float16, device="cuda")

        def forward(self, q, k, v):
            o = blackwell_sparsek.attention_forward(q, k, v, causal=True)
            return self.proj(o) * 2

    block = Block()
    q, k, v = make_qkv(2, 4, 2, 200, 200, 64, seed=25)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        eager = block(q, k, v)
        result = compiled(q, k, v)
    torch.testing.assert_close(result, eager, rtol=2e-3, atol=2e-3)
    torch._dynamo.reset()


def test_backward_raises_clear_error():
    q, k, v = make_qkv(1, 2, 2, 32, 32, 64, seed=26)
    q.requires_grad_()
    out = blackwell_sparsek.attention_forward(q, k, v)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no backward yet"):
        out.float().sum().backward()
    raw, _ = torch.ops.blackwell_sparsek.attention_fwd(q, k, v, 0.125, False, 0, False)
    with pytest.raises(RuntimeError):  # the bare op has no autograd formula either
        raw.float().sum().backward()
    with torch.no_grad():
        assert not blackwell_sparsek.attention_forward(q, k, v).requires_grad
    with torch.inference_mode():
        blackwell_sparsek.attention_forward(q, k, v)


# --------------------------------------------------------------------------------------------
# Errors, config, build info on the device


def test_unsupported_architecture_is_named(monkeypatch):
    monkeypatch.setattr(ops, "_checked_devices", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    q, k, v = make_qkv(1, 2, 2, 16, 16, 64)
    with pytest.raises(RuntimeError, match=r"sm_75.*not supported"):
        blackwell_sparsek.attention_forward(q, k, v)


def test_c_and_build_info_on_the_device():
    major, minor = torch.cuda.get_device_capability()
    assert _C.cuda_arch() == f"sm_{major}{minor}"
    info = core.get_build_info()
    assert info["cuda_available"] and info["device_name"] == torch.cuda.get_device_name()
    assert info["device_capability"] == (major, minor)
    assert info["compute_arch"] == f"sm_{major}{minor}"
    assert info["arch_supported"] is True
    config = core.Config()
    assert config.cuda_arch.rstrip("af") == f"{major}{minor}"  # auto-detected


def test_debug_and_profile_modes(monkeypatch):
    monkeypatch.setenv("BSK_DEBUG", "1")
    monkeypatch.setenv("BSK_PROFILE", "1")
    core.reset_default_config()
    try:
        q, k, v = make_qkv(1, 2, 2, 64, 64, 64, seed=27)
        out = blackwell_sparsek.attention_forward(q, k, v)
        ref_out, _ = reference(q, k, v)
        assert rel_err(out.cpu().numpy(), ref_out.cpu().numpy()) < 2e-3
        bad = q.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="Q has non-finite values"):
            blackwell_sparsek.attention_forward(bad, k, v)
    finally:
        core.reset_default_config()


# --------------------------------------------------------------------------------------------
# Backends


@pytest.mark.parametrize("hq,hkv,causal", [(8, 8, False), (8, 2, True), (8, 1, True)])
def test_sparsek_attention_module(hq, hkv, causal):
    q = randn(2, 300, hq, 64, seed=30)
    k, v = randn(2, 300, hkv, 64, seed=31), randn(2, 300, hkv, 64, seed=32)
    out = backends.SparseKAttention(causal=causal)(q, k, v)
    assert out.shape == q.shape and out.is_contiguous()
    ref_out, _ = reference(*(x.transpose(1, 2) for x in (q, k, v)), causal=causal)
    assert rel_err(out.cpu().numpy(), ref_out.transpose(1, 2).cpu().numpy()) < 2e-3


def test_sparsek_attention_mask_fallback_on_gpu():
    q, k, v = (randn(1, 64, 4, 64, seed=i) for i in range(3))
    mask = torch.ones(64, 64, dtype=torch.bool, device="cuda").tril()
    out = backends.SparseKAttention()(q, k, v, att_mask=mask)
    kernel = backends.SparseKAttention(causal=True)(q, k, v)
    assert (out.float() - kernel.float()).abs().max().item() < 5e-3


def test_attention_forward_bshd_t_ne_s():
    q = randn(2, 17, 8, 128, seed=33)
    k, v = randn(2, 300, 2, 128, seed=34), randn(2, 300, 2, 128, seed=35)
    out, lse = blackwell_sparsek.attention_forward_bshd(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = reference(*(x.transpose(1, 2) for x in (q, k, v)), causal=True)
    assert_matches(out.transpose(1, 2), lse, ref_out, ref_lse, torch.float16, "bshd T != S")


def test_vllm_backend_forward_packed_sequences():
    lens_q, lens_k = [5, 1, 40], [5, 30, 100]
    cu_q = [0] + list(torch.tensor(lens_q).cumsum(0).tolist())
    cu_k = [0] + list(torch.tensor(lens_k).cumsum(0).tolist())
    query = randn(cu_q[-1], 8, 64, seed=36)
    key, value = randn(cu_k[-1], 2, 64, seed=37), randn(cu_k[-1], 2, 64, seed=38)
    out = backends.SparseKBackend().forward(query, key, value, cu_seqlens_q=cu_q,
                                            cu_seqlens_k=cu_k)
    for i in range(3):
        qs = query[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None]
        ks = key[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None]
        vs = value[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None]
        ref_out, _ = reference(qs, ks, vs, causal=True)
        got = out[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None]
        assert rel_err(got.cpu().numpy(), ref_out.cpu().numpy()) < 2e-3, i


# --------------------------------------------------------------------------------------------
# utils and the README


def test_compare_to_sdpa_on_the_device(capsys):
    q, k, v = make_qkv(1, 8, 8, 512, 512, 64, seed=40)
    result = utils.compare_to_sdpa(q, k, v, blackwell_sparsek.attention_forward)
    assert set(result) == {"is_correct", "correctness_metrics", "sdpa_time_us",
                           "kernel_time_us", "speedup", "input_shape"}
    assert result["is_correct"] is True, result["correctness_metrics"]
    assert result["input_shape"] == {"B": 1, "H": 8, "S": 512, "D": 64}
    assert result["kernel_time_us"] > 0 and result["sdpa_time_us"] > 0
    utils.print_comparison_summary(result)
    assert "PASS" in capsys.readouterr().out
    gqa = utils.compare_to_sdpa(q, k[:, :2], v[:, :2], blackwell_sparsek.attention_forward,
                                scale=0.1)
    assert gqa["is_correct"] is True, gqa["correctness_metrics"]


def test_benchmark_latency_uses_cuda_events():
    q, k, v = make_qkv(1, 8, 8, 512, 512, 64, seed=41)
    stats = utils.benchmark_latency(blackwell_sparsek.attention_forward, q, k, v,
                                    num_warmup=2, num_iters=5, causal=True)
    assert stats["num_iters"] == 5 and 0 < stats["min_us"] <= stats["max_us"]


def test_readme_gpu_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if b.startswith(("# Needs a CUDA GPU.", "# Runs without a GPU."))]
    assert len(runnable) >= 5
    namespace = {}
    try:
        for block in runnable:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    finally:
        core.reset_default_config()
        torch._dynamo.reset()
    printed = capsys.readouterr().out
    assert "Validation passed" in printed and "Latency:" in printed
