"""The blackwell_sparsek PyTorch layer, everything that runs without a GPU.

API surface and defaults, error types and messages, the compiled library being the one the JAX
side loads, Config and environment variables, utils on CPU tensors, the backends' behaviour
without xFormers/vLLM (and with stand-in packages), tracing under torch.compile with fake CUDA
tensors, and torch_compat/README.md's examples that need no GPU.
"""
from __future__ import annotations

import inspect
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch")

import blackwell_sparsek  # noqa: E402
from blackwell_sparsek import _C, backends, core, ops, utils  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
README = REPO_ROOT / "torch_compat" / "README.md"
ENV_VARS = ("CUDA_HOME", "CUTLASS_PATH", "BSK_CUDA_ARCH", "BSK_AUTO_DETECT", "BSK_FAST_MATH",
            "BSK_PROFILE", "BSK_DEBUG", "BSK_BUILD_DIR")
DOCUMENTED_CONFIG = {
    "cuda_arch": "90a", "auto_detect_arch": True, "block_m": 64, "block_n": 64,
    "num_stages": 2, "num_warps": 4, "use_fast_math": True, "enable_profiling": False,
    "debug_mode": False, "persistent_kernel": True, "warp_specialized": True, "use_tma": True,
    "cutlass_path": None, "build_dir": None,
}
LIBRARY = _C.is_available()
requires_library = pytest.mark.skipif(
    not LIBRARY, reason=f"the compiled library is not loadable here: {_C.load_error()}")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


@pytest.fixture
def clean_env(monkeypatch):
    """No BSK_*/CUTLASS_PATH variables, a fresh default config and fresh one-time warnings."""
    for name in ENV_VARS:
        if name != "CUDA_HOME":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(core, "_warned", set())
    core.reset_default_config()
    yield monkeypatch
    core.reset_default_config()


def _subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _run_python(code: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd or "/",
                          env=env or _subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def fake_cuda(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


# --------------------------------------------------------------------------------------------
# Surface


def test_version_matches_jax_sparsek():
    import jax_sparsek

    assert blackwell_sparsek.__version__ == "0.1.0" == jax_sparsek.__version__


def test_public_names():
    for name in ("attention_forward", "attention_forward_bshd", "Config", "get_build_info",
                 "get_default_config", "set_default_config", "__version__"):
        assert hasattr(blackwell_sparsek, name), name
    for name in ("benchmark_latency", "validate_correctness", "compare_to_sdpa",
                 "print_comparison_summary"):
        assert callable(getattr(utils, name)), name
    for name in ("Config", "get_default_config", "set_default_config", "get_build_info"):
        assert hasattr(core, name), name
    for name in ("version", "cuda_arch", "supported_archs"):
        assert callable(getattr(_C, name)), name
    for name in ("SparseKAttention", "SparseKBackend", "register_vllm_backend"):
        assert getattr(backends, name) is getattr(blackwell_sparsek, name)


def test_attention_forward_signature():
    params = inspect.signature(blackwell_sparsek.attention_forward).parameters
    assert list(params)[:5] == ["Q", "K", "V", "scale", "causal"]
    assert params["scale"].default is None and params["causal"].default is False
    for name in ("window", "scores", "topk", "return_lse"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["window"].default is None


def test_utils_signatures():
    sig = inspect.signature(utils.benchmark_latency)
    assert list(sig.parameters) == ["kernel_fn", "args", "num_warmup", "num_iters", "kwargs"]
    assert sig.parameters["num_warmup"].default == 10
    assert sig.parameters["num_iters"].default == 100
    sig = inspect.signature(utils.validate_correctness)
    assert list(sig.parameters) == ["output", "reference", "rtol", "atol"]
    assert (sig.parameters["rtol"].default, sig.parameters["atol"].default) == (1e-3, 2e-3)
    sig = inspect.signature(utils.compare_to_sdpa)
    assert list(sig.parameters) == ["Q", "K", "V", "kernel_fn", "scale", "rtol", "atol"]
    assert sig.parameters["scale"].default is None
    assert (sig.parameters["rtol"].default, sig.parameters["atol"].default) == (1e-3, 2e-3)


def test_custom_op_registered():
    op = torch.ops.blackwell_sparsek.attention_fwd
    schema = str(op.default._schema)
    assert "Tensor q, Tensor k, Tensor v, float scale, bool causal, int window, bool bshd" \
        in schema, schema


def test_import_does_not_import_jax_and_jax_does_not_import_torch():
    result = _run_python("""
        import sys
        import blackwell_sparsek, blackwell_sparsek.backends, blackwell_sparsek.utils
        blackwell_sparsek._C.is_available()  # loads the library when there is one
        assert "jax" not in sys.modules, "blackwell_sparsek imported jax"
        assert "jax_sparsek" not in sys.modules, "blackwell_sparsek imported jax_sparsek"
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    result = _run_python("""
        import sys
        import jax_sparsek
        jax_sparsek.build_info()
        assert "torch" not in sys.modules, "jax_sparsek imported torch"
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# --------------------------------------------------------------------------------------------
# The compiled library: the one jax_sparsek loads


@requires_library
def test_library_is_the_one_jax_sparsek_loads():
    from jax_sparsek import _extension

    assert _C.extension() is _extension.load_extension()
    assert _C.extension() is sys.modules[_C.EXTENSION_NAME]
    assert _C.version() == blackwell_sparsek.__version__
    archs = _C.supported_archs()
    assert archs and all(re.fullmatch(r"sm_\d+[af]?", a) for a in archs), archs


@requires_library
@pytest.mark.parametrize("cwd", ["/", str(REPO_ROOT)], ids=["outside", "repo_root"])
def test_library_loaded_first_by_torch_layer_is_reused_by_jax(cwd):
    # From the repository root the source tree's jax_sparsek (no compiled module) shadows the
    # installed one; both layers then load the installed module, once.
    result = _run_python("""
        import sys
        from blackwell_sparsek import _C
        module = _C.extension()
        assert "jax_sparsek" not in sys.modules and "jax" not in sys.modules
        import jax_sparsek
        from jax_sparsek import _extension, _jax_sparsek_ext
        assert _extension.load_extension() is module
        assert _jax_sparsek_ext is module
        assert jax_sparsek.build_info()["cuda_kernels_built"]
        print("ok", _C.version(), _C.supported_archs())
    """, cwd=cwd)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@requires_library
@no_gpu
def test_cuda_arch_without_gpu_raises_runtime_error():
    with pytest.raises(RuntimeError, match="CUDA device"):
        _C.cuda_arch()


def test_missing_library_gives_clear_import_error(monkeypatch):
    def missing():
        raise ImportError("the compiled library jax_sparsek._jax_sparsek_ext is missing; "
                          "reinstall with nvcc on PATH: pip install .")

    monkeypatch.setattr(_C, "_module", None)
    monkeypatch.setattr(_C, "_load_error", None)
    monkeypatch.delitem(sys.modules, _C.EXTENSION_NAME, raising=False)
    monkeypatch.delitem(sys.modules, "jax_sparsek", raising=False)
    monkeypatch.setattr(_C, "_find_extension_file", missing)
    for fn in (_C.version, _C.supported_archs, _C.cuda_arch, _C.extension):
        with pytest.raises(ImportError, match=r"pip install \."):
            fn()
    assert not _C.is_available()
    assert "pip install ." in _C.load_error()
    info = core.get_build_info()
    assert info["library_loaded"] is False and info["supported_archs"] == []
    assert "pip install ." in info["library_error"]
    monkeypatch.setattr(_C, "_module", None)
    monkeypatch.setattr(_C, "_load_error", None)


def test_missing_jax_sparsek_gives_clear_import_error(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(_C, "_module", None)
    monkeypatch.setattr(_C, "_load_error", None)
    monkeypatch.delitem(sys.modules, _C.EXTENSION_NAME, raising=False)
    monkeypatch.delitem(sys.modules, "jax_sparsek", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax_sparsek"
                        else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="jax_sparsek package"):
        _C.version()
    monkeypatch.setattr(_C, "_module", None)
    monkeypatch.setattr(_C, "_load_error", None)


# --------------------------------------------------------------------------------------------
# Errors


def test_cpu_inputs_raise_value_error_naming_argument():
    q = torch.randn(1, 8, 64, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^Q must be a CUDA tensor"):
        blackwell_sparsek.attention_forward(q, q, q)
    with FakeTensorMode():
        qc = fake_cuda(1, 8, 64, 64)
        with pytest.raises(ValueError, match=r"^K must be a CUDA tensor"):
            blackwell_sparsek.attention_forward(qc, q, qc)
        with pytest.raises(ValueError, match=r"^V must be a CUDA tensor"):
            blackwell_sparsek.attention_forward(qc, qc, q)


def test_non_tensor_raises_type_error():
    with pytest.raises(TypeError, match="K must be a torch.Tensor"):
        blackwell_sparsek.attention_forward(torch.zeros(1), [1.0], torch.zeros(1))


@pytest.mark.parametrize("bad,name", [("Q", "Q"), ("K", "K"), ("V", "V")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8])
def test_dtype_errors_name_the_argument(bad, name, dtype):
    with FakeTensorMode():
        t = {n: fake_cuda(2, 4, 32, 64) for n in "QKV"}
        t[bad] = fake_cuda(2, 4, 32, 64, dtype=dtype)
        with pytest.raises(ValueError, match=rf"^{name} must be torch.float16 \(or "
                                             r"torch.bfloat16\)"):
            blackwell_sparsek.attention_forward(t["Q"], t["K"], t["V"])


def test_mixed_dtypes_raise_value_error():
    with FakeTensorMode():
        q = fake_cuda(2, 4, 32, 64)
        kb = fake_cuda(2, 4, 32, 64, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="K dtype torch.bfloat16 does not match Q dtype"):
            blackwell_sparsek.attention_forward(q, kb, q)
        with pytest.raises(ValueError, match="V dtype"):
            blackwell_sparsek.attention_forward(q, q, kb)


@pytest.mark.parametrize("q_shape,k_shape,v_shape,pattern", [
    ((2, 4, 32), (2, 4, 32, 64), (2, 4, 32, 64), r"^Q must have 4 dimensions"),
    ((2, 4, 32, 64), (2, 4, 32, 64, 1), (2, 4, 32, 64), r"^K must have 4 dimensions"),
    ((2, 4, 32, 64), (2, 4, 32, 64), (2, 4, 31, 64), r"^V shape .* must equal K shape"),
    ((2, 4, 32, 64), (3, 4, 32, 64), (3, 4, 32, 64), r"^K batch size 3 does not match Q"),
    ((2, 4, 32, 64), (2, 4, 32, 128), (2, 4, 32, 128), r"^K head dim 128 does not match Q"),
    ((2, 4, 32, 60), (2, 4, 32, 60), (2, 4, 32, 60), r"^Q head dim .* multiple of 8"),
    ((2, 4, 32, 264), (2, 4, 32, 264), (2, 4, 32, 264), r"^Q head dim .* multiple of 8"),
    ((2, 6, 32, 64), (2, 4, 32, 64), (2, 4, 32, 64), r"^Q heads \(6\) must be a multiple of"),
    ((2, 4, 32, 64), (2, 0, 32, 64), (2, 0, 32, 64), r"^K must have at least one head"),
])
def test_shape_errors_name_the_argument(q_shape, k_shape, v_shape, pattern):
    with FakeTensorMode():
        q, k, v = fake_cuda(*q_shape), fake_cuda(*k_shape), fake_cuda(*v_shape)
        with pytest.raises(ValueError, match=pattern):
            blackwell_sparsek.attention_forward(q, k, v)


def test_device_mismatch_raises_value_error():
    with FakeTensorMode():
        q = torch.empty(1, 2, 8, 64, dtype=torch.float16, device="cuda:0")
        k = torch.empty(1, 2, 8, 64, dtype=torch.float16, device="cuda:1")
        with pytest.raises(ValueError, match="K is on cuda:1 but Q is on cuda:0"):
            blackwell_sparsek.attention_forward(q, k, k)


def test_option_errors():
    with FakeTensorMode():
        q = fake_cuda(1, 2, 16, 64)
        with pytest.raises(ValueError, match="pass causal=True with window"):
            blackwell_sparsek.attention_forward(q, q, q, window=4)
        with pytest.raises(ValueError, match="window must be a positive"):
            blackwell_sparsek.attention_forward(q, q, q, causal=True, window=0)
        with pytest.raises(TypeError, match="window must be an int"):
            blackwell_sparsek.attention_forward(q, q, q, causal=True, window=2.5)
        with pytest.raises(TypeError, match="causal must be a bool"):
            blackwell_sparsek.attention_forward(q, q, q, causal=1)
        with pytest.raises(ValueError, match="scale must be finite"):
            blackwell_sparsek.attention_forward(q, q, q, scale=math.inf)
        with pytest.raises(TypeError, match="scale must be a float"):
            blackwell_sparsek.attention_forward(q, q, q, scale="0.1")
        with pytest.raises(NotImplementedError, match="SparseK mode"):
            blackwell_sparsek.attention_forward(q, q, q, scores=q, topk=4)
        with pytest.raises(NotImplementedError, match="SparseK mode"):
            blackwell_sparsek.attention_forward(q, q, q, topk=4)


@pytest.mark.parametrize("capability,compiled,expected", [
    ((7, 5), ["sm_80", "sm_90a", "sm_100a"], False),
    ((6, 0), ["sm_80"], False),
    ((8, 0), ["sm_80", "sm_90a"], True),
    ((8, 6), ["sm_80"], True),
    ((8, 9), ["sm_90a", "sm_100a"], False),
    ((9, 0), ["sm_90a"], True),
    ((9, 0), ["sm_100a"], False),
    ((10, 0), ["sm_80", "sm_90a", "sm_100a"], True),
    ((10, 3), ["sm_100a"], False),
    ((10, 3), ["sm_100f"], True),
    ((12, 0), ["sm_80", "sm_90a", "sm_100a"], True),  # through sm_80's PTX
    ((12, 0), ["sm_90a", "sm_100a"], False),
])
def test_arch_supported(capability, compiled, expected):
    assert ops.arch_supported(capability, compiled) is expected


# --------------------------------------------------------------------------------------------
# Strides: read in place or copied, never misread


def test_bhsd_strides_of_contiguous_and_transposed_views():
    x = torch.randn(2, 4, 10, 64, dtype=torch.float16)
    assert ops.kernel_strides(x, False) == (4 * 10 * 64, 64, 10 * 64)
    assert ops.kernel_compatible(x, False) and ops.prepare_input(x, False) is x
    y = torch.randn(2, 10, 4, 64, dtype=torch.float16).transpose(1, 2)  # [B,H,S,D] view
    assert not y.is_contiguous()
    assert ops.kernel_strides(y, False) == (10 * 4 * 64, 4 * 64, 64)
    assert ops.prepare_input(y, False) is y
    assert ops.kernel_strides(x.transpose(1, 2), True) == ops.kernel_strides(x, False)


def test_size_one_dims_get_stride_zero():
    x = torch.randn(1, 1, 1, 64, dtype=torch.float16)
    assert ops.kernel_strides(x, False) == (0, 0, 0)
    assert ops.kernel_strides(x, False, normalize=False) == (64, 64, 64)


def test_expanded_kv_heads_are_read_in_place():
    k = torch.randn(2, 1, 16, 64, dtype=torch.float16).expand(2, 8, 16, 64)
    assert ops.kernel_strides(k, False) == (16 * 64, 64, 0)
    assert ops.prepare_input(k, False) is k


def test_head_dim_slice_is_read_in_place():
    x = torch.randn(2, 4, 16, 128, dtype=torch.float16)[..., :64]
    assert ops.prepare_input(x, False) is x


@pytest.mark.parametrize("case", ["last_dim_stride", "odd_row_stride", "misaligned"])
def test_incompatible_layouts_are_copied(case):
    if case == "last_dim_stride":
        x = torch.randn(2, 4, 64, 16, dtype=torch.float16).transpose(2, 3)  # D stride 16
    elif case == "odd_row_stride":
        x = torch.randn(2, 4, 16, 68, dtype=torch.float16)[..., :64]  # row stride 68
    else:
        base = torch.randn(2 * 4 * 16 * 64 + 1, dtype=torch.float16)
        x = base[1:].view(2, 4, 16, 64)  # contiguous but 2-byte misaligned
        assert x.is_contiguous() and x.data_ptr() % 16 != 0
    assert not ops.kernel_compatible(x, False)
    y = ops.prepare_input(x, False)
    assert y is not x and y.is_contiguous() and y.data_ptr() % 16 == 0
    assert ops.kernel_compatible(y, False)
    assert torch.equal(y, x)


# --------------------------------------------------------------------------------------------
# The op's fake implementation and torch.compile (fake CUDA tensors: no GPU needed)


@pytest.mark.parametrize("bshd", [False, True])
def test_fake_impl_shapes(bshd):
    with FakeTensorMode():
        if bshd:
            q, k = fake_cuda(2, 100, 8, 64), fake_cuda(2, 120, 2, 64)
        else:
            q, k = fake_cuda(2, 8, 100, 64), fake_cuda(2, 2, 120, 64)
        out, lse = torch.ops.blackwell_sparsek.attention_fwd(q, k, k, 0.125, True, 0, bshd)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        assert lse.shape == (2, 8, 100) and lse.dtype == torch.float32
        o2, l2 = blackwell_sparsek.attention_forward(q.transpose(1, 2) if bshd else q,
                                                     k.transpose(1, 2) if bshd else k,
                                                     k.transpose(1, 2) if bshd else k,
                                                     return_lse=True)
        assert o2.shape == (2, 8, 100, 64) and l2.shape == (2, 8, 100)


def test_bshd_entry_point_and_sparsek_attention_shapes():
    with FakeTensorMode():
        q, k = fake_cuda(2, 100, 8, 64, dtype=torch.bfloat16), \
            fake_cuda(2, 120, 2, 64, dtype=torch.bfloat16)
        out = blackwell_sparsek.attention_forward_bshd(q, k, k, causal=True)
        assert out.shape == (2, 100, 8, 64) and out.dtype == torch.bfloat16
        out = backends.SparseKAttention(causal=True)(q, k, k)
        assert out.shape == (2, 100, 8, 64) and out.is_contiguous()


def test_torch_compile_fullgraph_traces_the_custom_op():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return blackwell_sparsek.attention_forward(q, k, v, causal=True).sum(-1)

    torch._dynamo.reset()
    with FakeTensorMode():
        q, k = fake_cuda(2, 8, 100, 64), fake_cuda(2, 2, 120, 64)
        out = torch.compile(Block(), backend=capture, fullgraph=True)(q, k, k)
    assert out.shape == (2, 8, 100)
    assert len(graphs) == 1
    code = graphs[0].code
    assert "torch.ops.blackwell_sparsek.attention_fwd.default" in code, code
    torch._dynamo.reset()


def test_torch_compile_refuses_inputs_requiring_grad_with_a_clear_message():
    def capture(gm, example_inputs):
        return gm.forward

    def fn(q, k, v):
        return blackwell_sparsek.attention_forward(q, k, v)

    torch._dynamo.reset()
    with FakeTensorMode():
        q = fake_cuda(1, 2, 16, 64).requires_grad_()
        with pytest.raises(Exception, match="no backward yet"):
            torch.compile(fn, backend=capture, fullgraph=True)(q, q, q)
        with torch.no_grad():  # fine without grad mode
            out = torch.compile(fn, backend=capture, fullgraph=True)(q, q, q)
        assert out.shape == q.shape
    torch._dynamo.reset()


def test_eager_backward_raises_clear_error(monkeypatch):
    # The wrapper's eager path on CPU tensors: the op is replaced by a differentiable stand-in
    # (the real op needs a GPU; tests/test_torch_gpu.py checks it), so this checks that
    # attention_forward itself makes backward fail loudly instead of passing gradients.
    real_check = ops.check_inputs
    monkeypatch.setattr(ops, "check_inputs",
                        lambda *a, **k: real_check(*a, **{**k, "check_device": False}))
    monkeypatch.setattr(ops, "attention_fwd",
                        lambda q, k, v, scale, causal, window, bshd:
                        (q * scale, torch.zeros(q.shape[:3], requires_grad=True)))
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16, requires_grad=True)
    out = blackwell_sparsek.attention_forward(q, q.detach(), q.detach())
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no backward yet"):
        out.float().sum().backward()
    with torch.no_grad():
        assert not blackwell_sparsek.attention_forward(q, q, q).requires_grad


# --------------------------------------------------------------------------------------------
# Config and environment variables


def test_config_documented_defaults(clean_env):
    config = core.Config()
    for name, value in DOCUMENTED_CONFIG.items():
        if name == "cuda_arch" and torch.cuda.is_available():
            continue  # auto-detected
        assert getattr(config, name) == value, name
    assert [f.name for f in __import__("dataclasses").fields(core.Config)] == \
        list(DOCUMENTED_CONFIG)


def test_config_env_overrides(clean_env):
    clean_env.setenv("BSK_DEBUG", "1")
    clean_env.setenv("BSK_PROFILE", "true")
    clean_env.setenv("BSK_FAST_MATH", "0")
    clean_env.setenv("BSK_AUTO_DETECT", "0")
    clean_env.setenv("BSK_CUDA_ARCH", "80")
    clean_env.setenv("BSK_BUILD_DIR", "/tmp/bsk-build")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # env-derived defaults must not warn
        config = core.Config()
    assert config.debug_mode is True and config.enable_profiling is True
    assert config.use_fast_math is False
    assert config.auto_detect_arch is False and config.cuda_arch == "80"
    assert config.build_dir == "/tmp/bsk-build"
    assert core.get_default_config().debug_mode is True


def test_cutlass_path_warns_once(clean_env):
    clean_env.setenv("CUTLASS_PATH", "/opt/cutlass")
    with pytest.warns(UserWarning, match="CUTLASS_PATH='/opt/cutlass' has no effect"):
        config = core.Config()
    assert config.cutlass_path == "/opt/cutlass"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        core.Config()  # once only


def test_invalid_boolean_env_warns_and_keeps_default(clean_env):
    clean_env.setenv("BSK_DEBUG", "maybe")
    with pytest.warns(UserWarning, match="BSK_DEBUG='maybe' is not a boolean"):
        assert core.Config().debug_mode is False


@pytest.mark.parametrize("field,value", [("block_m", 128), ("block_n", 32), ("num_stages", 3),
                                         ("num_warps", 8), ("persistent_kernel", False),
                                         ("warp_specialized", False), ("use_tma", False),
                                         ("use_fast_math", False)])
def test_inert_fields_warn_when_set(clean_env, field, value):
    with pytest.warns(UserWarning, match=rf"Config.{field}=.* has no effect at run time"):
        config = core.Config(**{field: value})
    assert getattr(config, field) == value
    config = core.Config()
    clean_env.setattr(core, "_warned", set())
    with pytest.warns(UserWarning, match=rf"Config.{field}="):
        setattr(config, field, value)


def test_default_config_roundtrip(clean_env):
    with pytest.warns(UserWarning):
        config = core.Config(block_m=128, block_n=128, enable_profiling=True)
    core.set_default_config(config)
    assert core.get_default_config() is config
    with pytest.raises(TypeError, match="Config"):
        core.set_default_config({"block_m": 64})
    core.reset_default_config()
    assert core.get_default_config() is not config


def test_every_environment_variable_is_documented():
    text = README.read_text()
    env_table = text[text.index("### Environment variables"):]
    for name in ENV_VARS:
        assert name in core.ENVIRONMENT_VARIABLES, name
        assert f"| `{name}` |" in env_table, f"{name} missing from the README's table"
    assert set(core.ENVIRONMENT_VARIABLES) == set(ENV_VARS)


def test_build_info_keys():
    info = core.get_build_info()
    documented = {"torch_version": str, "cuda_available": bool, "cuda_version": (str, type(None)),
                  "cudnn_version": (int, type(None)), "device_name": (str, type(None)),
                  "device_capability": (tuple, type(None)), "compute_arch": (str, type(None))}
    for key, types in documented.items():
        assert key in info, key
        assert isinstance(info[key], types), (key, info[key])
    assert info["torch_version"] == torch.__version__
    assert info["library_loaded"] == LIBRARY
    if not torch.cuda.is_available():
        assert info["device_name"] is None and info["compute_arch"] is None
    else:
        assert re.fullmatch(r"sm_\d+", info["compute_arch"])


def test_profile_mode_runs(clean_env):
    clean_env.setenv("BSK_PROFILE", "1")
    assert core.get_default_config().enable_profiling
    with FakeTensorMode():
        q = fake_cuda(1, 2, 16, 64)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = blackwell_sparsek.attention_forward(q, q, q)
    assert out.shape == q.shape
    names = {event.name for event in prof.events()}
    assert "blackwell_sparsek::attention_forward" in names, sorted(names)[:20]


def test_debug_mode_input_checks(clean_env):
    clean_env.setenv("BSK_DEBUG", "1")
    assert core.get_default_config().debug_mode
    x = torch.tensor([1.0, math.nan])
    with pytest.raises(ValueError, match="K has non-finite values"):
        ops._debug_check_inputs([("K", x)])
    ops._debug_check_inputs([("Q", torch.ones(3))])


# --------------------------------------------------------------------------------------------
# utils on CPU tensors


def test_benchmark_latency_cpu():
    calls = []

    def fn(a, b, scale=1.0):
        calls.append(scale)
        return (a @ b) * scale

    a = torch.randn(32, 32)
    stats = utils.benchmark_latency(fn, a, a, num_warmup=3, num_iters=7, scale=2.0)
    assert set(stats) == {"mean_us", "median_us", "min_us", "max_us", "std_us", "num_iters"}
    assert stats["num_iters"] == 7 and len(calls) == 10 and set(calls) == {2.0}
    assert 0 <= stats["min_us"] <= stats["median_us"] <= stats["max_us"]
    assert stats["min_us"] <= stats["mean_us"] <= stats["max_us"] and stats["std_us"] >= 0
    single = utils.benchmark_latency(fn, a, a, num_warmup=0, num_iters=1)
    assert single["std_us"] == 0.0 and single["num_iters"] == 1
    with pytest.raises(ValueError, match="num_iters"):
        utils.benchmark_latency(fn, a, a, num_iters=0)
    with pytest.raises(ValueError, match="num_warmup"):
        utils.benchmark_latency(fn, a, a, num_warmup=-1)


METRIC_KEYS = {"max_diff", "mean_diff", "median_diff", "num_elements", "num_mismatches",
               "mismatch_rate", "worst_diff_location", "worst_diff_output",
               "worst_diff_reference"}


def test_validate_correctness_identical_and_close():
    ref = torch.randn(2, 3, 4, 8)
    ok, metrics = utils.validate_correctness(ref.clone(), ref)
    assert ok and set(metrics) == METRIC_KEYS
    assert metrics["max_diff"] == 0.0 and metrics["num_mismatches"] == 0
    assert metrics["mismatch_rate"] == 0.0 and metrics["num_elements"] == ref.numel()
    ok, metrics = utils.validate_correctness(ref.half(), ref)  # fp16 rounding: within tol
    assert ok, metrics


def test_validate_correctness_mismatch_metrics():
    ref = torch.zeros(2, 3, 4, 5, dtype=torch.float32)
    out = ref.clone()
    out[1, 2, 3, 4] = 0.5
    out[0, 0, 0, 1] = 1e-3  # within atol
    ok, metrics = utils.validate_correctness(out, ref)
    assert not ok
    assert metrics["num_mismatches"] == 1
    assert metrics["mismatch_rate"] == pytest.approx(100.0 / ref.numel())
    assert metrics["worst_diff_location"] == (1, 2, 3, 4)
    assert metrics["worst_diff_output"] == 0.5 and metrics["worst_diff_reference"] == 0.0
    assert metrics["max_diff"] == 0.5
    assert metrics["mean_diff"] == pytest.approx((0.5 + 1e-3) / ref.numel())
    ok, metrics = utils.validate_correctness(out, ref, rtol=0.0, atol=1.0)
    assert ok


def test_validate_correctness_nan_and_shape():
    ref = torch.ones(4)
    out = torch.tensor([1.0, math.nan, 1.0, 1.0])
    ok, metrics = utils.validate_correctness(out, ref)
    assert not ok and metrics["num_mismatches"] == 1
    assert metrics["worst_diff_location"] == (1,)
    inf = torch.tensor([math.inf, 1.0])
    assert utils.validate_correctness(inf, inf.clone())[0]
    with pytest.raises(ValueError, match="shape"):
        utils.validate_correctness(torch.ones(3), torch.ones(4))


def _manual_attention(Q, K, V, scale=None):
    scale = 1.0 / math.sqrt(Q.shape[-1]) if scale is None else scale
    if K.shape[1] != Q.shape[1]:
        group = Q.shape[1] // K.shape[1]
        K, V = K.repeat_interleave(group, 1), V.repeat_interleave(group, 1)
    weights = torch.softmax((Q.double() @ K.double().transpose(-1, -2)) * scale, dim=-1)
    return (weights @ V.double()).to(Q.dtype)


def test_compare_to_sdpa_cpu(capsys):
    torch.manual_seed(0)
    Q, K, V = (torch.randn(1, 4, 64, 32) for _ in range(3))
    result = utils.compare_to_sdpa(Q, K, V, _manual_attention)
    assert set(result) == {"is_correct", "correctness_metrics", "sdpa_time_us",
                           "kernel_time_us", "speedup", "input_shape"}
    assert result["is_correct"] is True
    assert set(result["correctness_metrics"]) == METRIC_KEYS
    assert result["input_shape"] == {"B": 1, "H": 4, "S": 64, "D": 32}
    assert result["sdpa_time_us"] > 0 and result["kernel_time_us"] > 0
    assert result["speedup"] == pytest.approx(result["sdpa_time_us"] / result["kernel_time_us"])
    utils.print_comparison_summary(result)
    printed = capsys.readouterr().out
    assert "PASS" in printed and "speedup" in printed and "H=4" in printed


def test_compare_to_sdpa_scale_and_gqa():
    torch.manual_seed(1)
    Q = torch.randn(2, 8, 40, 16)
    K, V = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    seen = {}

    def kernel(q, k, v, scale=None):
        seen["scale"] = scale
        return _manual_attention(q, k, v, scale)

    result = utils.compare_to_sdpa(Q, K, V, kernel, scale=0.3)
    assert seen["scale"] == 0.3 and result["is_correct"]
    wrong = utils.compare_to_sdpa(Q, K, V, lambda q, k, v: _manual_attention(q, k, v, 1.0))
    assert wrong["is_correct"] is False and wrong["correctness_metrics"]["num_mismatches"] > 0


# --------------------------------------------------------------------------------------------
# Backends without a GPU


def test_sparsek_attention_mask_falls_back_to_sdpa():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 12, 4, 16) for _ in range(3))  # [B, S, H, D]
    mask = torch.rand(2, 4, 12, 12) > 0.3
    mask[..., 0] = True
    out = backends.SparseKAttention()(q, k, v, att_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref)


def test_sparsek_attention_fallback_gqa_causal_bottom_right():
    torch.manual_seed(3)
    q = torch.randn(1, 5, 4, 16)
    k, v = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    zero_bias = torch.zeros(1, 1, 5, 9)
    out = backends.SparseKAttention(causal=True)(q, k, v, att_mask=zero_bias)
    # reference: bottom-right causal mask (row i sees keys j <= i + 4), heads repeated
    kr, vr = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    logits = torch.einsum("bthd,bshd->bhts", q, kr) / 4.0
    allowed = torch.arange(9)[None, :] <= torch.arange(5)[:, None] + 4
    logits = logits.masked_fill(~allowed, -math.inf)
    ref = torch.einsum("bhts,bshd->bthd", logits.softmax(-1), vr)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_sparsek_attention_materializes_xformers_bias():
    class FakeBias:
        def materialize(self, shape, dtype, device):
            return torch.zeros(shape, dtype=dtype, device=device)

    q = torch.randn(1, 6, 2, 8)
    out = backends.SparseKAttention()(q, q, q, att_mask=FakeBias())
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, q, q))).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    with pytest.raises(TypeError, match="att_mask must be"):
        backends.SparseKAttention()(q, q, q, att_mask=object())


def test_sparsek_attention_dropout_and_arguments():
    q = torch.randn(1, 6, 2, 8)
    module = backends.SparseKAttention(dropout=0.5).train()
    assert module(q, q, q).shape == q.shape  # SDPA fallback with dropout
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        module.eval()(q.half(), q.half(), q.half())  # the kernel path
    with pytest.warns(UserWarning, match="ignores the arguments"):
        backends.SparseKAttention(0.0, dim_model=512)
    with pytest.raises(ValueError, match="causal=True"):
        backends.SparseKAttention(window=4)
    with pytest.raises(ValueError, match="dropout"):
        backends.SparseKAttention(dropout=1.5)


def test_xformers_op_without_xformers_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` fail
    monkeypatch.setattr(backends, "_xformers_op", None)
    with pytest.raises(ImportError, match="pip install xformers"):
        backends.SparseKAttentionOp  # noqa: B018
    with pytest.raises(ImportError, match="pip install xformers"):
        from blackwell_sparsek import SparseKAttentionOp  # noqa: F401
    with pytest.raises(ImportError, match="pip install xformers"):
        from blackwell_sparsek.backends import SparseKAttentionOp  # noqa: F401,F811


_XFORMERS_STUB = {
    "xformers/__init__.py": "",
    "xformers/ops/__init__.py": "",
    "xformers/ops/fmha/__init__.py": "",
    "xformers/ops/fmha/attn_bias.py": textwrap.dedent("""
        class AttentionBias:
            pass
        class LowerTriangularMask(AttentionBias):
            pass
        class LowerTriangularFromBottomRightMask(AttentionBias):
            pass
        class BlockDiagonalMask(AttentionBias):
            pass
    """),
    "xformers/ops/fmha/common.py": textwrap.dedent("""
        from dataclasses import dataclass
        from typing import Any, Optional
        @dataclass
        class Inputs:
            query: Any
            key: Any
            value: Any
            attn_bias: Any = None
            p: float = 0.0
            scale: Optional[float] = None
        class AttentionFwOpBase:
            @classmethod
            def not_supported_reasons(cls, d):
                reasons = []
                if d.query.device.type not in cls.SUPPORTED_DEVICES:
                    reasons.append(f"device={d.query.device.type}")
                if d.query.dtype not in cls.SUPPORTED_DTYPES:
                    reasons.append(f"dtype={d.query.dtype}")
                return reasons
    """),
}


def _write_stub(root: pathlib.Path, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def xformers_stub(tmp_path, monkeypatch):
    _write_stub(tmp_path, _XFORMERS_STUB)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in list(sys.modules):
        if name == "xformers" or name.startswith("xformers."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(backends, "_xformers_op", None)
    yield
    for name in list(sys.modules):
        if name == "xformers" or name.startswith("xformers."):
            del sys.modules[name]


def test_xformers_op_with_stand_in_xformers(xformers_stub):
    from xformers.ops.fmha import attn_bias
    from xformers.ops.fmha.common import AttentionFwOpBase, Inputs

    op = backends.SparseKAttentionOp
    assert isinstance(op, tuple) and len(op) == 2 and op[1] is None
    fw = op[0]
    assert issubclass(fw, AttentionFwOpBase) and fw.NAME == "sparsekF"
    assert blackwell_sparsek.SparseKAttentionOp is op  # cached, same object
    assert fw.SUPPORTS_BMGHK and not fw.SUPPORTS_DROPOUT and fw.SUPPORTED_MAX_K == 256

    with FakeTensorMode():
        q = fake_cuda(2, 16, 4, 64)
        assert fw.not_supported_reasons(Inputs(q, q, q)) == []
        assert fw.supports(Inputs(q, q, q, attn_bias.LowerTriangularMask()))
        short = fake_cuda(2, 8, 4, 64)
        reasons = fw.not_supported_reasons(Inputs(short, q, q, attn_bias.LowerTriangularMask()))
        assert any("LowerTriangularFromBottomRightMask" in r for r in reasons)
        assert fw.supports(Inputs(short, q, q, attn_bias.LowerTriangularFromBottomRightMask()))
        assert not fw.supports(Inputs(q, q, q, attn_bias.BlockDiagonalMask()))
        assert not fw.supports(Inputs(q, q, q, p=0.1))
        odd = fake_cuda(2, 16, 4, 20)
        assert not fw.supports(Inputs(odd, odd, odd))
        out, ctx = fw.apply(Inputs(short, q, q, attn_bias.LowerTriangularFromBottomRightMask(),
                                   scale=0.1), needs_gradient=False)
        assert out.shape == short.shape and ctx is None
        with pytest.raises(NotImplementedError, match="no backward yet"):
            fw.apply(Inputs(q, q, q), needs_gradient=True)
    cpu = torch.randn(1, 4, 2, 64, dtype=torch.float16)
    assert "device=cpu" in fw.not_supported_reasons(Inputs(cpu, cpu, cpu))


def test_bmghk_layout_conversion():
    # xFormers' 5-D grouped layout [B, M, G, H, K] with k/v expanded over H: G kv heads.
    q5 = torch.randn(2, 16, 3, 4, 64)
    k5 = torch.randn(2, 24, 3, 1, 64).expand(2, 24, 3, 4, 64)
    q, k, v = backends._bmghk_to_bshd(q5, k5, k5)
    assert q.shape == (2, 16, 12, 64) and k.shape == v.shape == (2, 24, 3, 64)
    assert torch.equal(q[:, :, 5], q5[:, :, 1, 1]) and torch.equal(k[:, :, 1], k5[:, :, 1, 2])
    # not expanded: every query head has its own kv head
    k5 = torch.randn(2, 24, 3, 4, 64)
    q, k, v = backends._bmghk_to_bshd(q5, k5, k5)
    assert k.shape == (2, 24, 12, 64) and torch.equal(k[:, :, 7], k5[:, :, 1, 3])


def test_vllm_backend_without_vllm(monkeypatch):
    backend = backends.SparseKBackend
    assert backend.get_name() == "SPARSEK_XFORMERS"
    assert backend.get_supported_head_sizes() == [64, 128]
    assert backend.get_kv_cache_shape(100, 16, 8, 128) == (2, 100, 16, 8, 128)
    with pytest.raises(ValueError, match="head_size"):
        backend.get_kv_cache_shape(100, 16, 8, 96)
    with pytest.raises(NotImplementedError, match="paged KV cache"):
        backend.get_impl_cls()
    instance = backend()
    with pytest.raises(ValueError, match="cu_seqlens"):
        instance.forward(torch.randn(4, 2, 64), torch.randn(4, 2, 64), torch.randn(4, 2, 64),
                         cu_seqlens_q=[0, 4])
    with pytest.raises(ValueError, match="num_tokens"):
        instance.forward(torch.randn(1, 4, 2, 64), torch.randn(4, 2, 64), torch.randn(4, 2, 64))
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install vllm"):
        backends.register_vllm_backend()


_VLLM_STUB = {
    "vllm/__init__.py": "",
    "vllm/v1/__init__.py": "",
    "vllm/v1/attention/__init__.py": "",
    "vllm/v1/attention/backend.py": textwrap.dedent("""
        from abc import ABC, abstractmethod
        class AttentionBackend(ABC):
            @staticmethod
            @abstractmethod
            def get_name(): ...
            @staticmethod
            @abstractmethod
            def get_some_future_method(): ...
    """),
    "vllm/v1/attention/backends/__init__.py": "",
    "vllm/v1/attention/backends/registry.py": textwrap.dedent("""
        import enum, os
        class AttentionBackendEnum(enum.Enum):
            FLASH_ATTN = 1
            CUSTOM = 2
        REGISTERED = {}
        def register_backend(backend, class_path=None):
            if os.environ.get("STUB_VLLM_FAIL"):
                raise RuntimeError("stub registry failure")
            REGISTERED[backend] = class_path
    """),
}


def test_vllm_backend_auto_registers_with_stand_in_vllm(tmp_path):
    _write_stub(tmp_path, _VLLM_STUB)
    env = _subprocess_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    code = """
        import warnings
        warnings.simplefilter("error")
        import blackwell_sparsek.backends as b
        from vllm.v1.attention.backend import AttentionBackend
        from vllm.v1.attention.backends.registry import REGISTERED, AttentionBackendEnum
        assert REGISTERED == {AttentionBackendEnum.CUSTOM:
                              "blackwell_sparsek.backends.SparseKBackend"}, REGISTERED
        assert issubclass(b.SparseKBackend, AttentionBackend)
        b.SparseKBackend()  # constructible despite the ABC
        assert b.register_vllm_backend() == "CUSTOM"
        print("ok")
    """
    result = _run_python(code, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    env["STUB_VLLM_FAIL"] = "1"
    result = _run_python("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import blackwell_sparsek.backends
        assert any("could not register the vLLM backend" in str(w.message) for w in caught)
        print("ok")
    """, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# --------------------------------------------------------------------------------------------
# Packaging and the README's CPU examples


def test_wheel_ships_blackwell_sparsek():
    import importlib.metadata

    try:
        files = importlib.metadata.files("jax-sparsek")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("jax-sparsek is not installed")
    names = {str(f) for f in files or ()}
    if not any(n.startswith("jax_sparsek/") for n in names):
        pytest.skip("editable installation")
    assert "blackwell_sparsek/__init__.py" in names
    assert "blackwell_sparsek/ops.py" in names
    requires = importlib.metadata.requires("jax-sparsek") or []
    assert any(r.startswith("torch") and "extra == \"torch\"" in r for r in requires), requires


def readme_blocks(kind: str):
    """The README's python blocks whose first line is '# Runs without a GPU.' (kind='cpu') or
    '# Needs a CUDA GPU.' (kind='gpu')."""
    first = {"cpu": "# Runs without a GPU.", "gpu": "# Needs a CUDA GPU."}[kind]
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith(first)]


def test_readme_cpu_examples_run(clean_env, capsys):
    blocks = readme_blocks("cpu")
    assert len(blocks) >= 2
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the Config example warns on purpose
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert "Input error: Q must be a CUDA tensor" in printed
    assert "Block M: 128" in printed and "Compute:" in printed


def test_readme_mentions_limitations_and_bf16():
    text = README.read_text()
    for needle in ("No gradients yet", "No SparseK mode yet", "bf16", "GQA", "T != S",
                   "Measured on an NVIDIA H200"):
        assert needle in text, needle
