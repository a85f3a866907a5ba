"""The Gaussian noise source of the optimizer step.

Default: the counter-based Philox stream of fastdp.philox. Noise element ``e`` of step ``t`` is a pure function of
(seed, t, e), with the elements numbered over the optimizer's parameters laid end to end; the fused steps draw the
same stream inside their kernels. The noise therefore has no generator state: restoring a checkpoint, moving the
model to another device (cuda:0 -> cuda:1, cpu -> cpu:0) or training on another rank can never restart a stream and
replay an earlier step's draw (two updates with the same noise would let an observer cancel it). Only the seed is
state, and the step count, which the optimizer keeps.

The stream is computed by fastdp._C's ``philox_normal_`` where the compiled extension has it for the device (CPU:
~1 ms per million elements on 2 cores; CUDA), else by the pure-torch reference of fastdp.philox (~100 ms per million
on 2 CPU cores; elementwise int64 kernels on a GPU). Both compute the same function (uint32 words bit-exact, normals
to a few float32 ulp).

``secure=True`` draws from the operating system's entropy (os.urandom) and turns it into normals with
Box-Muller in float64 on the host: no seed to steal or replay. Cost: 16 bytes of OS entropy per two
coordinates plus a host-to-device copy: 150-210 ms per million parameters per step measured on a 2-core CPU under load
(bench/bench_secure_rng.py; the Philox stream: 1-20 ms), so a 10M parameter model pays 1.5-2 s per step. Not
reproducible by construction, so it has no state.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fastdp import _ext, philox

#: elements per call of the pure-torch reference: on a CPU its int64 temporaries then stay in cache (2x faster than
#: one call); on a GPU the chunk bounds them (~100 bytes per element) without adding launches
_REFERENCE_CHUNK = {"cpu": 1 << 16}
_REFERENCE_CHUNK_OTHER = 1 << 24


class GaussianNoise:
    """Standard normal samples for the DP step.

    Args:
        seed: the stream's key (ignored when secure); None draws one from OS entropy.
        secure: draw from OS entropy instead of the seeded counter-based stream.
    """

    def __init__(self, seed: int | None = None, secure: bool = False) -> None:
        self.secure = secure
        self.seed = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else int(seed)
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"the noise seed must be in [0, 2^64), got {self.seed}")

    def sample(self, numel: int, step: int, offset: int, device: torch.device) -> torch.Tensor:
        """Elements ``offset .. offset + numel - 1`` of step ``step``'s noise: i.i.d. N(0, 1), float32 (float64 from
        OS entropy), on ``device``."""
        if self.secure:
            return _os_entropy_normal(numel).to(device)
        return philox_normal(numel, self.seed, step, offset, torch.device(device))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "secure": self.secure}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints of fastdp <= 0.1 also hold torch.Generator states ("states"): the stream no longer has any
        self.seed, self.secure = int(state["seed"]), bool(state["secure"])


def philox_normal(numel: int, seed: int, step: int, offset: int, device: torch.device) -> torch.Tensor:
    """The Philox noise elements ``offset ..`` of ``step`` (fastdp.philox's function), by fastdp._C where it has the
    device, else by the pure-torch reference."""
    if (device.type == "cpu" and _ext.cpu_available()) or (device.type == "cuda" and _ext.cuda_compiled()):
        return torch.ops.fastdp.philox_normal_(torch.empty(numel, device=device), seed, step, offset)
    out = torch.empty(numel, device=device)
    chunk = _REFERENCE_CHUNK.get(device.type, _REFERENCE_CHUNK_OTHER)
    for start in range(0, numel, chunk):
        n = min(chunk, numel - start)
        out[start : start + n] = philox.philox_normal(n, seed, step, offset + start, device)
    return out


def _os_entropy_normal(n: int) -> torch.Tensor:
    """n standard normals from os.urandom by Box-Muller in float64 (53-bit uniforms; u1 in (0, 1] so log is finite)."""
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z)
