"""The Gaussian noise source of the optimizer step.

Default: torch's Philox/Mersenne generators, one per device, seeded once; their state is part of the
optimizer's state_dict so a resumed run draws exactly the noise an uninterrupted one would have.

``secure=True`` draws from the operating system's entropy (os.urandom) and turns it into normals with
Box-Muller in float64 on the host: no seed to steal or replay. Cost: 16 bytes of OS entropy per two
coordinates plus a host-to-device copy, roughly 50-100 ms per million parameters on a CPU core, so a 10M
parameter model pays about a second per step. Not reproducible by construction, so it has no state.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


class GaussianNoise:
    """Standard normal samples for the DP step.

    Args:
        seed: seed of the per-device generators (ignored when secure); None draws one from OS entropy.
        secure: draw from OS entropy instead of a seeded generator.
    """

    def __init__(self, seed: int | None = None, secure: bool = False) -> None:
        self.secure = secure
        self.seed = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, torch.Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending_states:
                gen.set_state(self._pending_states.pop(key))
            self._generators[key] = gen
        return gen

    def sample(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of i.i.d. N(0, 1) entries (float32 or better, then cast to ``dtype``)."""
        if self.secure:
            return _os_entropy_normal(math.prod(shape)).view(shape).to(device=device, dtype=dtype)
        gen_dtype = torch.promote_types(dtype, torch.float32)
        z = torch.randn(shape, generator=self._generator(device), device=device, dtype=gen_dtype)
        return z.to(dtype)

    def state_dict(self) -> dict:
        states = {k: g.get_state() for k, g in self._generators.items()}
        states.update(self._pending_states)
        return {"seed": self.seed, "secure": self.secure, "states": states}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.secure = int(state["seed"]), bool(state["secure"])
        self._generators = {}
        self._pending_states = {k: v.clone() for k, v in state["states"].items()}


def _os_entropy_normal(n: int) -> torch.Tensor:
    """n standard normals from os.urandom by Box-Muller in float64 (53-bit uniforms; u1 in (0, 1] so log is finite)."""
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z)
