"""Backends of the engine and the optimizer step, registered by name.

``torch`` is the exact reference and always available. ``triton``, ``cuda`` and ``cpp`` (fused kernels in
kernels/ and csrc/) register themselves when their code is present and loads; until then an explicit
request for one is an error, and ``auto`` picks the best available. ``FASTDP_BACKEND`` overrides ``auto``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

KNOWN = ("torch", "triton", "cuda", "cpp")


@dataclass(frozen=True)
class Backend:
    name: str


_AVAILABLE: dict[str, Backend] = {"torch": Backend("torch")}
#: why a known backend is not available (shown when someone asks for it explicitly)
_MISSING: dict[str, str] = {
    "triton": "the Triton kernels are not part of this build yet",
    "cuda": "the compiled extension fastdp._C (CUDA) is not part of this build yet",
    "cpp": "the compiled extension fastdp._C (CPU) is not part of this build yet",
}
#: preference order of ``auto``
_PREFERENCE = ("cuda", "triton", "cpp", "torch")


def available_backends() -> list[str]:
    """Names of the backends that can be used on this machine."""
    return [n for n in _PREFERENCE if n in _AVAILABLE]


def resolve_backend(name: str = "auto") -> Backend:
    """Resolve a backend name (or "auto", which honours FASTDP_BACKEND) to an available backend.

    Raises:
        ValueError: unknown name, or a backend that was explicitly requested and is not available.
    """
    if name == "auto":
        name = os.environ.get("FASTDP_BACKEND", "auto")
        if name == "auto":
            return _AVAILABLE[available_backends()[0]]
    if name not in KNOWN:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {KNOWN}")
    if name not in _AVAILABLE:
        raise ValueError(f"backend {name!r} was requested but is not available: {_MISSING.get(name, 'not loaded')}")
    return _AVAILABLE[name]
