"""Weight-standardised convolutions (De et al. 2022 WRNs; Brock et al. 2021 NFNets).

Both layers compute, per output row r of the weight (fan-in n = in_channels / groups * prod(kernel)):

    W_hat[r] = s_r * (W[r] - mean(W[r])) / sqrt(var(W[r]) + eps),   s_r = gain_r * scale

with the biased variance and a data-independent ``scale``. fastdp computes their per-example gradient norms
exactly from the gradient w.r.t. W_hat through the Jacobian of the standardisation (see
``fastdp.rules.ws_conv``), without materialising per-example gradients.
"""

from __future__ import annotations

import torch
from torch import nn


def standardize_weight(weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row standardisation.

    Args:
        weight: (C_out, C_in / groups, *kernel).
        eps: added to the biased variance.

    Returns:
        ``(u, std)``: u = (W - mean) / std with std = sqrt(var + eps), shaped like ``weight``; std is (C_out,).
    """
    flat = weight.flatten(1)
    var, mean = torch.var_mean(flat, dim=1, correction=0)
    std = torch.sqrt(var + eps)
    u = (flat - mean[:, None]) / std[:, None]
    return u.view_as(weight), std


class _StandardizedConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel and scaled by ``gain * scale``."""

    scale: float
    eps: float

    def row_scale(self) -> torch.Tensor:
        """s_r = gain_r * scale, shape (C_out,)."""
        return self.gain.reshape(-1) * self.scale

    def standardized_weight(self) -> torch.Tensor:
        u, _ = standardize_weight(self.weight, self.eps)
        return u * self.row_scale().view(-1, *([1] * (u.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class WSConv2d(_StandardizedConv2d):
    """Weight-standardised conv of De et al. 2022 (jax_privacy WRNs): learnable gain (C_out,) and bias.

    W_hat = gain * (W - mean) / sqrt(fan_in * (var + eps')): the 1/sqrt(fan_in) keeps activations
    variance-preserving, as in the paper's haiku layer. Implemented as scale = fan_in ** -0.5 with the
    epsilon on the variance.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as ``nn.Conv2d``.
        eps: added to the per-row variance (default 1e-4 / fan_in, the paper's floor on fan_in * var).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        eps: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        fan_in = self.weight[0].numel()
        self.gain = nn.Parameter(torch.ones(out_channels, device=device, dtype=dtype))
        self.scale = fan_in**-0.5
        self.eps = 1e-4 / fan_in if eps is None else eps


class ScaledStdConv2d(_StandardizedConv2d):
    """NFNet scaled weight-standardised conv, parameter-compatible with timm's ``ScaledStdConv2d``.

    W_hat = gain * gamma / sqrt(fan_in) * (W - mean) / sqrt(var + eps); ``gain`` is (C_out, 1, 1, 1) as in
    timm checkpoints; ``padding=None`` means symmetric "same"-style padding ((stride - 1) + dilation * (k - 1)) // 2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=None,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        if padding is None:
            k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
            s = stride if isinstance(stride, int) else stride[0]
            d = dilation if isinstance(dilation, int) else dilation[0]
            padding = ((s - 1) + d * (k - 1)) // 2
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, "zeros", device, dtype
        )
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), gain_init, device=device, dtype=dtype))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps


__all__ = ["WSConv2d", "ScaledStdConv2d", "standardize_weight"]
