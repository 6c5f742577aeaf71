"""Finding the compiled extension and registering its XLA FFI targets with JAX.

Nothing here runs at import of jax_sparsek: the extension is loaded the first time a lowering
or a build-info query needs it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path

FFI_TARGET_ATTENTION_FWD = "jax_sparsek_attention_fwd"
FFI_TARGET_SPARSEK_FWD = "jax_sparsek_sparsek_fwd"
FFI_TARGET_SPARSEK_SELECT = "jax_sparsek_sparsek_select"
FFI_TARGET_ATTENTION_BWD = "jax_sparsek_attention_bwd"
FFI_TARGET_SPARSEK_BWD = "jax_sparsek_sparsek_bwd"


_EXTENSION_NAME = "jax_sparsek._jax_sparsek_ext"


def _installed_extension_file():
    """The compiled module of an installed jax_sparsek that this source checkout shadows.

    Running from the repository root puts the source tree, which holds no compiled module,
    first on sys.path; the installed copy's module is then found beside its own package.
    """
    here = Path(__file__).resolve().parent
    for entry in sys.path:
        package_dir = Path(entry or ".") / "jax_sparsek"
        try:
            if not package_dir.is_dir() or package_dir.resolve() == here:
                continue
        except OSError:
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = package_dir / f"_jax_sparsek_ext{suffix}"
            if candidate.is_file():
                return candidate
    return None


@functools.cache
def load_extension():
    """The nanobind module, or None when the package was installed without CUDA code."""
    try:
        return importlib.import_module(_EXTENSION_NAME)
    except ImportError:
        pass
    path = _installed_extension_file()
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location(_EXTENSION_NAME, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        return None
    sys.modules[_EXTENSION_NAME] = module
    return module


@functools.cache
def _register_targets() -> bool:
    import jax.ffi

    ext = load_extension()
    if ext is None:
        return False
    jax.ffi.register_ffi_target(FFI_TARGET_ATTENTION_FWD, ext.attention_fwd_handler(),
                                platform="CUDA")
    jax.ffi.register_ffi_target(FFI_TARGET_SPARSEK_FWD, ext.sparsek_fwd_handler(),
                                platform="CUDA")
    jax.ffi.register_ffi_target(FFI_TARGET_SPARSEK_SELECT, ext.sparsek_select_handler(),
                                platform="CUDA")
    jax.ffi.register_ffi_target(FFI_TARGET_ATTENTION_BWD, ext.attention_bwd_handler(),
                                platform="CUDA")
    jax.ffi.register_ffi_target(FFI_TARGET_SPARSEK_BWD, ext.sparsek_bwd_handler(),
                                platform="CUDA")
    return True


def cuda_kernels_built() -> bool:
    """True when the CUDA kernels were compiled into this installation."""
    ext = load_extension()
    return ext is not None and len(ext.supported_archs()) > 0


def ensure_cuda_targets() -> None:
    """Registers the FFI targets; call before lowering to them."""
    if not cuda_kernels_built() or not _register_targets():
        raise RuntimeError(
            "jax_sparsek was installed without its CUDA kernels (no nvcc at build time); "
            "reinstall with the CUDA toolkit on PATH or use implementation='xla'")


def jax_has_cuda() -> bool:
    import jax

    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:
        return False


@functools.cache
def warn_reference_path(reason: str) -> None:
    """Says once per reason that the pure-JAX reference runs instead of the CUDA kernels."""
    warnings.warn(f"jax_sparsek: using the pure-JAX reference implementation ({reason}); it "
                  "materialises the T x S score matrix and is slow on long sequences",
                  RuntimeWarning, stacklevel=4)


def build_info() -> dict:
    """What this installation was built with and what the current machine offers."""
    ext = load_extension()
    info = {
        "extension_loaded": ext is not None,
        "cuda_kernels_built": cuda_kernels_built(),
        "supported_archs": list(ext.supported_archs()) if ext is not None else [],
        "extension_version": ext.version() if ext is not None else None,
        "jax_cuda_devices": jax_has_cuda(),
    }
    info["cuda_arch"] = None
    if info["cuda_kernels_built"]:
        try:
            info["cuda_arch"] = ext.cuda_arch()
            # Which forward and backward kernels run at head dim 128 here ('sm90_wgmma' or
            # 'mma_sync'), and how the backward computes dq ('dkdv_atomic' or 'dq_kernel';
            # the same in every mode).
            info["forward_kernel"] = ext.forward_kernel(128)
            info["backward_kernel"] = ext.backward_kernel(128)
            info["backward_dq"] = ext.backward_dq(128, False)
        except RuntimeError:  # built with CUDA, running on a machine without a GPU
            pass
    return info
