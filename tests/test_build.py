"""What was built and what is imported: build_info, and that an installed package is the one
under test."""
from __future__ import annotations

import importlib.metadata
import pathlib

import pytest

import jax_sparsek
from conftest import BUILD_INFO


def test_build_info():
    info = jax_sparsek.build_info()
    always = {"extension_loaded", "cuda_kernels_built", "supported_archs", "extension_version",
              "jax_cuda_devices", "cuda_arch"}
    # Where a device answers (cuda_arch set): which kernels run at head dim 128 on it.
    on_device = {"forward_kernel", "backward_kernel", "backward_dq"}
    assert set(info) == (always | on_device if info["cuda_arch"] is not None else always)
    if info["cuda_arch"] is not None:
        assert info["forward_kernel"] in ("sm90_wgmma", "mma_sync")
        assert info["backward_kernel"] in ("sm90_wgmma", "mma_sync")
        assert info["backward_dq"] in ("dkdv_atomic", "dq_kernel")
    assert isinstance(info["extension_loaded"], bool)
    assert isinstance(info["cuda_kernels_built"], bool)
    assert isinstance(info["jax_cuda_devices"], bool)
    assert isinstance(info["supported_archs"], list)
    if info["cuda_kernels_built"]:
        assert info["extension_loaded"]
        assert info["supported_archs"]
    if info["cuda_kernels_built"] and info["jax_cuda_devices"]:
        assert isinstance(info["cuda_arch"], str) and info["cuda_arch"].startswith("sm_")
    if not info["cuda_kernels_built"]:
        assert info["cuda_arch"] is None
    # Without a CUDA device build_info must still answer (cuda_arch None), not raise.
    assert info["cuda_arch"] is None or isinstance(info["cuda_arch"], str)
    if not info["extension_loaded"]:
        assert info["supported_archs"] == [] and info["extension_version"] is None
    assert info == BUILD_INFO


def test_installed_package_is_the_one_tested():
    """With a regular installation present (CI: pip install ".[test]"), the tests must import
    it, not the source tree beside them, which lacks the compiled extension."""
    for name in ("jax-sparsek", "jax_sparsek"):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        installed = pathlib.Path(dist.locate_file("jax_sparsek"))
        if (installed / "__init__.py").is_file():
            imported = pathlib.Path(jax_sparsek.__file__).resolve().parent
            assert imported == installed.resolve(), (
                f"tests import jax_sparsek from {imported}, not the installed {installed}")
        return


def _align256(n: int) -> int:
    return (n + 255) // 256 * 256


@pytest.mark.skipif(not BUILD_INFO["extension_loaded"], reason="the library is not built here")
@pytest.mark.parametrize("b,t,s,hq,hkv,d", [(1, 32768, 32768, 32, 8, 128),
                                            (2, 1100, 2600, 8, 1, 128), (1, 1, 500, 8, 2, 64)])
def test_sparsek_bwd_workspace_is_its_parts(b, t, s, hq, hkv, d):
    """The SparseK backward's workspace (what the lowering reserves, in one library call):
    the selection's, the span sort's and a tau's buffers, then the backward kernels' own, each
    at a 256-byte boundary."""
    from jax_sparsek import _extension

    ext = _extension.load_extension()
    parts = (_align256(ext.sparsek_workspace_bytes(b, t, s, hkv))
             + ext.sparsek_key_span_workspace_bytes(b, t, s, hkv)
             + _align256(b * hkv * t * 4)
             + ext.attention_bwd_workspace_bytes(b, t, s, hq, hkv, d, True))
    assert ext.sparsek_bwd_workspace_bytes(b, t, s, hq, hkv, d) == parts
