"""The compiled extension ``fastdp._C``, loaded once; its import error is kept, never raised here.

``import fastdp`` must work without the extension (no compiler at install time, ``FASTDP_SKIP_EXT=1``, a torch
upgraded after the build). Importing ``fastdp._C`` registers the ops ``torch.ops.fastdp.*`` (csrc/bindings.cpp):

- ``clip_reduce(grads, weights)`` / ``clip_reduce.out(..., out=)``: S = sum_i weights[i] * grads[i],
- ``noisy_sgd_step_(...)`` / ``noisy_adam_step_(...)``: the noisy optimizer step over all parameters in one call,
- ``philox_normal_(out, seed, step, offset)`` / ``philox_words(...)``: the noise stream of :mod:`fastdp.philox`,
- ``linear_sq_norms(a, delta, grads=None)``: per-example squared gradient norms of a linear layer (CUDA),
- ``compiled_with_cuda()``.

Once ``fastdp._C`` has loaded, :mod:`fastdp._fake_ops` registers the ops' fake kernels (output shapes and dtypes
without data), which torch.compile / torch.export trace them with.
"""

from __future__ import annotations

import importlib
import warnings

import torch

REBUILD_HINT = (
    "rebuild it with `pip install --no-build-isolation -e .` from the fastdp checkout, with a C++ compiler "
    "(and, for 'cuda', nvcc plus a CUDA build of torch; FORCE_CUDA=1 on a machine without a GPU) and "
    "FASTDP_SKIP_EXT unset"
)

IMPORT_ERROR: BaseException | None = None
try:
    # import_module, not `from fastdp import _C`: the latter turns "no such module" into a generic ImportError
    _C = importlib.import_module("fastdp._C")  # registers torch.ops.fastdp.*
except Exception as e:  # noqa: BLE001 - ImportError, or OSError/undefined symbols after a torch upgrade
    _C = None
    IMPORT_ERROR = e
else:
    try:  # fake kernels for torch.compile; they need the ops registered above
        importlib.import_module("fastdp._fake_ops")
    except Exception as e:  # noqa: BLE001 - a stale build lacking an op, or a torch without register_fake
        warnings.warn(
            f"fastdp: the fake kernels of torch.ops.fastdp.* did not register ({type(e).__name__}: {e}); the ops run "
            f"eagerly but not under torch.compile; {REBUILD_HINT}",
            stacklevel=2,
        )


def cpu_available() -> bool:
    """Whether the extension loaded (its CPU kernels are always compiled in)."""
    return _C is not None


def cuda_compiled() -> bool:
    """Whether the extension loaded and was built with its CUDA kernels."""
    return _C is not None and bool(torch.ops.fastdp.compiled_with_cuda())


def not_built() -> bool:
    """True when the extension is simply absent (skipped or never built), False when it exists but failed to load."""
    return isinstance(IMPORT_ERROR, ModuleNotFoundError) and IMPORT_ERROR.name == "fastdp._C"


def import_error_message() -> str:
    """Why the extension is unavailable, with rebuild instructions (empty when it loaded)."""
    if IMPORT_ERROR is None:
        return ""
    return f"fastdp._C did not load ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}); {REBUILD_HINT}"
