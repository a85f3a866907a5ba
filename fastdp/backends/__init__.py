"""Backends of the engine and the optimizer step: one ``Backend`` object per backend, registered by name.

``torch`` is the exact reference and always available. ``triton``, ``cuda`` and ``cpp`` (fused kernels in
kernels/ and csrc/) register themselves when their code is present and loads; until then an explicit
request for one is an error, and ``auto`` picks the best available. ``FASTDP_BACKEND`` overrides ``auto``.

``cpp`` and ``cuda`` are the compiled extension ``fastdp._C`` (fastdp/_ext.py loads it once and keeps the
import error): ``cpp`` when it loaded, ``cuda`` when it also has its CUDA kernels and a GPU is visible.

``triton`` needs a GPU, except under ``TRITON_INTERPRET=1``: then an explicit ``backend="triton"`` runs the same
kernels on CPU tensors in Triton's interpreter (slowly; it is how the tests exercise the Triton backend without a
GPU). ``auto`` never picks an interpreted backend.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from fastdp import _ext
from fastdp.backends.base import Backend
from fastdp.backends.compiled import CompiledBackend
from fastdp.backends.triton import TritonBackend

__all__ = ["KNOWN", "Backend", "available_backends", "resolve_backend"]

logger = logging.getLogger("fastdp")

KNOWN = ("torch", "triton", "cuda", "cpp")


_AVAILABLE: dict[str, Backend] = {"torch": Backend("torch")}
#: why a known backend is not available (shown when someone asks for it explicitly)
_MISSING: dict[str, str] = {}
#: preference order of ``auto``. On a GPU, ``triton`` before ``cuda``: both have the fused step, and Triton has
#: every layer kernel of the plan (fastdp/backends/triton.py) where the compiled ``cuda`` has the linear norm.
#: (No GPU has ranked them by measurement yet; bench/ holds the benchmarks that would.)
_PREFERENCE = ("triton", "cuda", "cpp", "torch")


def _register_extension() -> None:
    """Register ``cpp`` / ``cuda`` from what fastdp._C provides, or record why not."""
    if not _ext.cpu_available():
        _MISSING["cpp"] = _MISSING["cuda"] = _ext.import_error_message()
        return
    _AVAILABLE["cpp"] = CompiledBackend("cpp", "cpu")
    if not _ext.cuda_compiled():
        _MISSING["cuda"] = (
            "fastdp._C was built without its CUDA kernels (at build time there was no nvcc, torch was a CPU "
            f"build, or no GPU was visible and FORCE_CUDA=1 was not set); {_ext.REBUILD_HINT}"
        )
    elif not torch.cuda.is_available():
        _MISSING["cuda"] = "fastdp._C has its CUDA kernels but no CUDA device is visible (torch.cuda.is_available())"
    else:
        _AVAILABLE["cuda"] = CompiledBackend("cuda", "cuda")


def _register_triton() -> None:
    """``triton`` when Triton is installed and a CUDA device is visible, or interpreted under TRITON_INTERPRET=1
    (the kernels in kernels/ are imported lazily)."""
    if importlib.util.find_spec("triton") is None:
        _MISSING["triton"] = "Triton is not installed (pip install 'fastdp[triton]' on Linux x86-64 with a GPU)"
    elif torch.cuda.is_available():
        _AVAILABLE["triton"] = TritonBackend(device_type="cuda")
    elif os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        _AVAILABLE["triton"] = TritonBackend(device_type="cpu", interpreted=True)
    else:
        _MISSING["triton"] = (
            "no CUDA device is visible (torch.cuda.is_available() is False); TRITON_INTERPRET=1 runs the Triton "
            "kernels on the CPU, for tests"
        )


_register_extension()
_register_triton()
_warned_fallback = False


def available_backends() -> list[str]:
    """Names of the backends that can be used on this machine, best first (interpreted ones left out)."""
    return [n for n in _PREFERENCE if n in _AVAILABLE and not _AVAILABLE[n].interpreted]


def resolve_backend(name: str = "auto", device: torch.device | str | None = None) -> Backend:
    """Resolve a backend name (or "auto", which honours FASTDP_BACKEND) to an available backend.

    Args:
        name: "auto" or one of KNOWN.
        device: where the model's parameters live; "auto" then picks the best backend whose kernels take that device
            (``cpp`` for a CPU model on a machine with a GPU), else the torch reference. None: the best available.

    Raises:
        ValueError: unknown name, or a backend that was explicitly requested and is not available.
    """
    if name == "auto":
        name = os.environ.get("FASTDP_BACKEND", "auto")
        if name == "auto":
            _log_extension_fallback()
            if device is None:
                return _AVAILABLE[available_backends()[0]]
            kind = torch.device(device).type
            fits = [n for n in available_backends() if _AVAILABLE[n].device_type in (kind, None)]
            return _AVAILABLE[fits[0]]
    if name not in KNOWN:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {KNOWN}")
    if name == "triton" and name not in _AVAILABLE:
        _register_triton()  # TRITON_INTERPRET may have been set after fastdp was imported
    if name not in _AVAILABLE:
        raise ValueError(f"backend {name!r} was requested but is not available: {_MISSING.get(name, 'not loaded')}")
    return _AVAILABLE[name]


def _log_extension_fallback() -> None:
    """One log line when ``auto`` cannot use a compiled extension that exists but failed to load."""
    global _warned_fallback
    if _warned_fallback or _ext.IMPORT_ERROR is None or _ext.not_built():
        return
    _warned_fallback = True
    logger.warning("fastdp: backend 'auto' falls back to %r: %s", available_backends()[0], _ext.import_error_message())
