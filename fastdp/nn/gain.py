"""A learnable scalar gain, y = g * x: the skip-init gain that ends every NF-ResNet / NFNet residual branch
(Brock et al. 2021; De et al. 2020, "Batch normalization biases residual blocks towards the identity function").

It is its own module (rather than a bare parameter on the block) so that fastdp has an exact per-example rule for
it (``fastdp.rules.gain``): a parameter owned by a block without a rule would send the whole block through the
slow torch.func fallback.
"""

from __future__ import annotations

import torch
from torch import nn


class ScalarGain(nn.Module):
    """Multiply the input by one learnable scalar.

    Args:
        init: initial value of the gain (0.0: skip-init, the residual branch starts switched off).

    The parameter ``gain`` is 0-dimensional, like timm's ``skipinit_gain`` (``torch.tensor(0.)``).
    """

    def __init__(self, init: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((), float(init), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.to(x.dtype)


__all__ = ["ScalarGain"]
