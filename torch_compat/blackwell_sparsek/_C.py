"""The compiled library, shared with the JAX side: ``jax_sparsek._jax_sparsek_ext``.

There is no second CUDA build and no torch C++ extension: this module loads the nanobind
module that ``jax_sparsek`` itself loads (one shared library, one copy in the process) and
exposes the seed's ``_C.version()``, ``_C.cuda_arch()`` and ``_C.supported_archs()``.

Loading does not import ``jax_sparsek`` (whose ``__init__`` imports jax): the extension file is
located through ``importlib.util.find_spec("jax_sparsek")`` and loaded by file under its real
name ``jax_sparsek._jax_sparsek_ext``, registered in ``sys.modules``. A later
``import jax_sparsek`` then finds that same module object instead of loading the file again.
When ``jax_sparsek`` was imported first, its module is reused as is.

Nothing is loaded at ``import blackwell_sparsek``; the first call that needs the library does
it. When the package was installed without its CUDA kernels (no nvcc at build time), the
functions here raise ImportError with the fix, and ``import blackwell_sparsek`` still works.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
from typing import List, Optional

EXTENSION_NAME = "jax_sparsek._jax_sparsek_ext"

_REINSTALL_HINT = ("reinstall with the CUDA toolkit's nvcc on PATH (or CUDA_HOME set): "
                   "pip install .")

_lock = threading.Lock()
_module = None
_load_error: Optional[str] = None


def _find_extension_file() -> str:
    """The compiled module beside the jax_sparsek package that ``import jax_sparsek`` finds;
    when that copy has none (a source checkout shadowing an installation, e.g. when running
    from the repository root), the first one on ``sys.path``, as jax_sparsek's own loader
    does."""
    spec = importlib.util.find_spec("jax_sparsek")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("blackwell_sparsek needs the jax_sparsek package, which is not "
                          "installed; " + _REINSTALL_HINT)
    folders = list(spec.submodule_search_locations)
    folders += [os.path.join(entry or ".", "jax_sparsek") for entry in sys.path]
    for folder in folders:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_jax_sparsek_ext" + suffix)
            if os.path.isfile(path):
                return path
    raise ImportError(
        "the compiled library jax_sparsek._jax_sparsek_ext is missing from "
        f"{list(spec.submodule_search_locations)}: this installation has no CUDA kernels "
        "(built without nvcc, or a source tree without an installed copy); "
        + _REINSTALL_HINT)


def _load():
    """Loads (once) and returns the nanobind module; raises ImportError when impossible."""
    global _module, _load_error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _load_error is not None:
            raise ImportError(_load_error)
        try:
            module = sys.modules.get(EXTENSION_NAME)
            if module is None and "jax_sparsek" in sys.modules:
                # jax_sparsek (and jax) are imported already: load it the ordinary way.
                module = importlib.import_module(EXTENSION_NAME)
            if module is None:
                path = _find_extension_file()
                spec = importlib.util.spec_from_file_location(
                    EXTENSION_NAME, path,
                    loader=importlib.machinery.ExtensionFileLoader(EXTENSION_NAME, path))
                module = importlib.util.module_from_spec(spec)
                sys.modules[EXTENSION_NAME] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(EXTENSION_NAME, None)
                    raise
        except ImportError as exc:
            message = str(exc)
            if "reinstall" not in message:
                message = (f"could not load the compiled library {EXTENSION_NAME}: {exc}; "
                           + _REINSTALL_HINT)
            _load_error = message
            raise ImportError(message) from exc
        except OSError as exc:  # e.g. an unresolved shared-library dependency
            _load_error = (f"could not load the compiled library {EXTENSION_NAME}: {exc}; "
                           + _REINSTALL_HINT)
            raise ImportError(_load_error) from exc
        _module = module
        return module


def _reset() -> None:
    """Forgets the loaded module or the load failure (for tests); the next call loads again."""
    global _module, _load_error
    with _lock:
        _module = None
        _load_error = None


def extension():
    """The loaded nanobind module (the very object ``jax_sparsek`` uses)."""
    return _load()


def is_available() -> bool:
    """True when the compiled library loads and has CUDA kernels compiled in."""
    try:
        return len(_load().supported_archs()) > 0
    except ImportError:
        return False


def load_error() -> Optional[str]:
    """Why the library could not be loaded, or None (loads it if not tried yet)."""
    try:
        _load()
    except ImportError as exc:
        return str(exc)
    return None


def library_path() -> Optional[str]:
    """File of the loaded extension module, or None when it cannot be loaded."""
    try:
        return getattr(_load(), "__file__", None)
    except ImportError:
        return None


def version() -> str:
    """Version of the compiled library, e.g. ``"0.1.0"``."""
    return _load().version()


def cuda_arch() -> str:
    """Architecture of the current CUDA device, e.g. ``"sm_90"``.

    Raises RuntimeError when there is no usable CUDA device, ImportError when the library was
    not built.
    """
    return _load().cuda_arch()


def supported_archs() -> List[str]:
    """The CUDA targets compiled into the library, e.g. ``["sm_80", "sm_90a", "sm_100a"]``."""
    return list(_load().supported_archs())


__all__ = ["version", "cuda_arch", "supported_archs", "is_available", "extension",
           "load_error", "library_path"]
