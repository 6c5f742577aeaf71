"""What was built and what is imported: build_info, and that an installed package is the one
under test."""
from __future__ import annotations

import importlib.metadata
import pathlib

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
