"""Configuration (``Config``, the process-wide default) and build/environment information.

Environment variables set the defaults of ``Config`` fields at construction time; where each
one acts (build time, run time, or only recorded) is listed in ``ENVIRONMENT_VARIABLES`` and in
torch_compat/README.md. Nothing is silently ignored: a field that has no effect on this
implementation warns once when it is given a value other than its default, and ``CUTLASS_PATH``
warns once that it has no effect.

Fields that act at run time:

- ``enable_profiling`` (``BSK_PROFILE``): each ``attention_forward`` call is wrapped in a
  ``torch.profiler.record_function`` range and, on CUDA, an NVTX range (visible in Nsight
  Systems and the torch profiler). Skipped inside ``torch.compile`` graphs.
- ``debug_mode`` (``BSK_DEBUG``): extra input checks (finite values) before the launch, then a
  device synchronisation and a NaN check of the output after it, so an asynchronous CUDA error
  surfaces at the call that caused it. Skipped inside ``torch.compile`` graphs.
- ``auto_detect_arch`` (``BSK_AUTO_DETECT``) and ``cuda_arch`` (``BSK_CUDA_ARCH``):
  ``cuda_arch`` is detected from the current GPU when auto-detection is on and a GPU is
  visible. The CUDA runtime always runs the code compiled for the GPU present; when
  auto-detection is off and ``cuda_arch`` names another architecture than the GPU's, the first
  call warns once.

Build options (``use_fast_math``) and kernel tiling (``block_m``, ``block_n``, ``num_stages``,
``num_warps``, ``persistent_kernel``, ``warp_specialized``, ``use_tma``) are fixed when the
library is compiled; here they are recorded only.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from . import _C

# Where each environment variable acts. Keys are the variable names.
ENVIRONMENT_VARIABLES: Dict[str, str] = {
    "CUDA_HOME": "build time: CMake takes nvcc from $CUDA_HOME/bin (unless CUDACXX is set)",
    "CUTLASS_PATH": ("recorded in Config.cutlass_path; no effect (this library uses no "
                     "CUTLASS code); warns once"),
    "BSK_CUDA_ARCH": ("build time: CUDA targets to compile (e.g. '90a' or '80;90a'); run "
                      "time: default of Config.cuda_arch when auto-detection is off or no GPU "
                      "is visible"),
    "BSK_AUTO_DETECT": "run time: default of Config.auto_detect_arch ('1')",
    "BSK_FAST_MATH": ("build time: '1' compiles with nvcc --use_fast_math; run time: default "
                      "of Config.use_fast_math (recorded only)"),
    "BSK_PROFILE": "run time: default of Config.enable_profiling (NVTX/profiler ranges)",
    "BSK_DEBUG": "run time: default of Config.debug_mode (sync + checks after each call)",
    "BSK_BUILD_DIR": ("build time through pip: pip install . "
                      "--config-settings=build-dir=$BSK_BUILD_DIR; run time: default of "
                      "Config.build_dir (recorded only: nothing is compiled at run time)"),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

_DOCUMENTED_CUDA_ARCH = "90a"

# Fields fixed at build time: recorded, no effect at run time.
INERT_FIELDS: Dict[str, str] = {
    "block_m": "the kernel's query tile is fixed at build time",
    "block_n": "the kernel's key/value tile is fixed at build time",
    "num_stages": "the kernel's pipeline depth is fixed at build time",
    "num_warps": "the kernel's warps per block are fixed at build time",
    "persistent_kernel": "the kernel's launch scheme is fixed at build time",
    "warp_specialized": "the kernel's warp roles are fixed at build time",
    "use_tma": "the kernel's load path is fixed at build time",
    "use_fast_math": ("fast math is chosen at build time: BSK_FAST_MATH=1 pip install . "
                      "(then reinstall)"),
    "cutlass_path": "this library uses no CUTLASS code",
}

_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str, category=UserWarning, stacklevel: int = 3) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, category, stacklevel=stacklevel)


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (any case)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    _warn_once(f"env:{name}={raw}",
               f"blackwell_sparsek: {name}={raw!r} is not a boolean (use 1/0, true/false, "
               f"yes/no, on/off); using the default {int(default)}", stacklevel=4)
    return default


def _env_str(name: str) -> Optional[str]:
    raw = os.environ.get(name)
    return raw if raw else None


def arch_of_capability(capability: Tuple[int, int], compiled=None) -> str:
    """``"90a"``-style name for a compute capability, with the ``a`` suffix when an
    architecture-specific target for exactly it was compiled in (``sm_90a``, ``sm_100a``)."""
    major, minor = capability
    name = f"{major}{minor}"
    if compiled is None:
        try:
            compiled = _C.supported_archs()
        except ImportError:
            compiled = []
    if f"sm_{name}a" in compiled:
        name += "a"
    return name


def detect_cuda_arch() -> Optional[str]:
    """The current GPU's architecture as ``"90a"``/``"80"``..., or None without a GPU."""
    try:
        if not torch.cuda.is_available():
            return None
        return arch_of_capability(torch.cuda.get_device_capability())
    except (RuntimeError, AssertionError):
        return None


def _field_defaults() -> Dict[str, Any]:
    """Each field's default as the environment sets it now (what ``Config()`` would take)."""
    return {
        "cuda_arch": _env_str("BSK_CUDA_ARCH") or _DOCUMENTED_CUDA_ARCH,
        "auto_detect_arch": env_flag("BSK_AUTO_DETECT", True),
        "block_m": 64, "block_n": 64, "num_stages": 2, "num_warps": 4,
        "use_fast_math": env_flag("BSK_FAST_MATH", True),
        "enable_profiling": env_flag("BSK_PROFILE", False),
        "debug_mode": env_flag("BSK_DEBUG", False),
        "persistent_kernel": True, "warp_specialized": True, "use_tma": True,
        "cutlass_path": _env_str("CUTLASS_PATH"),
        "build_dir": _env_str("BSK_BUILD_DIR"),
    }


@dataclass
class Config:
    """Configuration of blackwell_sparsek (the documented fields and defaults).

    Defaults without environment variables are the documented ones; ``BSK_*``,
    ``CUTLASS_PATH`` override them when set (see ``ENVIRONMENT_VARIABLES``). With
    ``auto_detect_arch`` on (the default) and a GPU visible, ``cuda_arch`` is replaced by the
    current GPU's architecture when the Config is created.

    Acting at run time: ``enable_profiling``, ``debug_mode``, ``auto_detect_arch`` and
    ``cuda_arch`` (a check, see the module docstring). Recorded only (fixed when the library is
    compiled; setting a non-default value warns once): ``block_m``, ``block_n``,
    ``num_stages``, ``num_warps``, ``use_fast_math``, ``persistent_kernel``,
    ``warp_specialized``, ``use_tma``, ``cutlass_path``. ``build_dir`` is recorded (nothing is
    compiled at run time; pass it to pip at build time).
    """

    # Architecture
    cuda_arch: str = field(default_factory=lambda: _env_str("BSK_CUDA_ARCH")
                           or _DOCUMENTED_CUDA_ARCH)
    auto_detect_arch: bool = field(default_factory=lambda: env_flag("BSK_AUTO_DETECT", True))

    # Kernel parameters (fixed at build time: recorded only)
    block_m: int = 64
    block_n: int = 64
    num_stages: int = 2
    num_warps: int = 4

    # Build options
    use_fast_math: bool = field(default_factory=lambda: env_flag("BSK_FAST_MATH", True))
    enable_profiling: bool = field(default_factory=lambda: env_flag("BSK_PROFILE", False))
    debug_mode: bool = field(default_factory=lambda: env_flag("BSK_DEBUG", False))

    # Performance tuning (fixed at build time: recorded only)
    persistent_kernel: bool = True
    warp_specialized: bool = True
    use_tma: bool = True

    # Paths
    cutlass_path: Optional[str] = field(default_factory=lambda: _env_str("CUTLASS_PATH"))
    build_dir: Optional[str] = field(default_factory=lambda: _env_str("BSK_BUILD_DIR"))

    def __post_init__(self) -> None:
        if self.auto_detect_arch:
            detected = detect_cuda_arch()
            if detected is not None:
                object.__setattr__(self, "cuda_arch", detected)
        if self.cutlass_path is not None:
            source = ("CUTLASS_PATH" if self.cutlass_path == _env_str("CUTLASS_PATH")
                      else "Config.cutlass_path")
            _warn_once("cutlass_path",
                       f"blackwell_sparsek: {source}={self.cutlass_path!r} has no effect: this "
                       "library uses no CUTLASS code (its kernels are compiled with the "
                       "package)", stacklevel=4)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in INERT_FIELDS and name != "cutlass_path":
            default = _field_defaults()[name]
            if value != default:
                _warn_once(f"inert:{name}",
                           f"blackwell_sparsek: Config.{name}={value!r} has no effect at run "
                           f"time ({INERT_FIELDS[name]}); it is recorded only", stacklevel=3)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_default_config: Optional[Config] = None
_default_lock = threading.Lock()


def get_default_config() -> Config:
    """The process-wide default configuration, created from the environment on first use."""
    global _default_config
    config = _default_config
    if config is None:
        with _default_lock:
            if _default_config is None:
                _default_config = Config()
            config = _default_config
    return config


def set_default_config(config: Config) -> None:
    """Makes ``config`` the process-wide default (used by ``attention_forward``)."""
    global _default_config
    if not isinstance(config, Config):
        raise TypeError(f"config must be a blackwell_sparsek.core.Config, got "
                        f"{type(config).__name__}")
    with _default_lock:
        _default_config = config


def reset_default_config() -> None:
    """Forgets the default configuration; the next ``get_default_config()`` re-reads the
    environment."""
    global _default_config
    with _default_lock:
        _default_config = None


def get_build_info() -> Dict[str, Any]:
    """Build environment information.

    The documented keys: ``torch_version``, ``cuda_available``, ``cuda_version`` (torch's CUDA,
    None for a CPU build), ``cudnn_version`` (int or None), ``device_name``,
    ``device_capability`` (``(major, minor)``) and ``compute_arch`` (``"sm_90"``); the device
    keys are None without a GPU. Extra keys: ``package_version``, ``library_loaded``,
    ``library_version``, ``library_path``, ``supported_archs`` (targets compiled in),
    ``library_error`` (why the library did not load, or None) and ``arch_supported``.
    """
    from . import __version__
    from .ops import arch_supported

    cuda_available = bool(torch.cuda.is_available())
    cudnn_version = None
    try:
        cudnn_version = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - a CPU build may raise instead of returning None
        cudnn_version = None
    device_name = device_capability = compute_arch = None
    if cuda_available:
        try:
            device_name = torch.cuda.get_device_name()
            device_capability = tuple(torch.cuda.get_device_capability())
            compute_arch = f"sm_{device_capability[0]}{device_capability[1]}"
        except RuntimeError:
            pass
    error = _C.load_error()
    archs = _C.supported_archs() if error is None else []
    return {
        "torch_version": torch.__version__,
        "cuda_available": cuda_available,
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn_version,
        "device_name": device_name,
        "device_capability": device_capability,
        "compute_arch": compute_arch,
        "package_version": __version__,
        "library_loaded": error is None,
        "library_version": _C.version() if error is None else None,
        "library_path": _C.library_path(),
        "supported_archs": archs,
        "library_error": error,
        "arch_supported": (arch_supported(device_capability, archs)
                           if device_capability is not None and archs else None),
    }


__all__ = ["Config", "get_default_config", "set_default_config", "reset_default_config",
           "get_build_info", "ENVIRONMENT_VARIABLES", "INERT_FIELDS", "env_flag",
           "detect_cuda_arch"]
