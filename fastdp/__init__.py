"""fastdp: exact and fast differentially private training (DP-SGD) for PyTorch.

Replace your optimizer::

    opt = fastdp.DPSGD(model, lr=0.5, noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=256, sample_size=len(train_set))

The names below are imported on first use (PEP 562), so that ``import fastdp.train`` (the command line, which checks
its arguments before anything else) does not wait for torch, dp-accounting and the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "DPOptimizer": "fastdp.optim",
    "DPSGD": "fastdp.optim",
    "EMA": "fastdp.ema",
    "GradSampleEngine": "fastdp.engine",
    "available_backends": "fastdp.backends",
    "accounting": None,  # submodules
    "data": None,
    "nn": None,
}

__all__ = ["DPOptimizer", "DPSGD", "EMA", "GradSampleEngine", "accounting", "available_backends", "data", "nn"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastdp' has no attribute {name!r}")
    module = _LAZY[name]
    value = (
        importlib.import_module(f"fastdp.{name}") if module is None else getattr(importlib.import_module(module), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
