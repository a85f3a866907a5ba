"""Wide ResNets as in De et al. 2022: pre-activation blocks (act -> GroupNorm -> conv), GroupNorm(16),
weight-standardised convs with gain and bias, a projection skip (act -> GN -> 1x1 conv with stride) in the
first block of every stage, identity elsewhere, and a head act -> GN -> global mean -> Linear.

As in the authors' code (jax_privacy ``WideResNet``) the projection skip has its own GroupNorm and is present in
the first block of every stage, even where the shapes would allow an identity (stage 1 of a width-1 WRN).
Parameters: WRN-16-4 2,753,818; WRN-40-4 8,961,306 (10 classes).

``ws=False`` builds the same network with plain nn.Conv2d (the benchmark's "GroupNorm, plain convs" WRN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.nn import WSConv2d


class _Block(nn.Module):
    def __init__(
        self, cin: int, cout: int, stride: int, conv: type[nn.Conv2d], groups: int, act, project: bool
    ) -> None:
        super().__init__()
        self.act = act
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = conv(cout, cout, 3, stride=1, padding=1)
        self.project_norm = self.project = None
        if project:
            # the skip's own GroupNorm, as jax_privacy's WRN (``Block_n_skip_norm``)
            self.project_norm = nn.GroupNorm(min(groups, cin), cin)
            self.project = conv(cin, cout, 1, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(x)
        skip = x if self.project is None else self.project(self.project_norm(a))
        out = self.conv1(self.norm1(a))
        out = self.conv2(self.norm2(self.act(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-width (depth = 6 n + 4).

    Args:
        depth: total depth; (depth - 4) must be divisible by 6.
        width: widening factor k (stages of 16k, 32k, 64k channels).
        num_classes: outputs of the head.
        ws: weight-standardised convs (De et al.) if True, plain nn.Conv2d otherwise.
        groups: GroupNorm groups.
        in_channels: input channels.
    """

    def __init__(
        self,
        depth: int = 16,
        width: int = 4,
        num_classes: int = 10,
        ws: bool = True,
        groups: int = 16,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        conv = WSConv2d if ws else nn.Conv2d
        act = nn.ReLU()
        self.stem = conv(in_channels, 16, 3, padding=1)
        blocks = []
        cin = 16
        for stage, cout in enumerate((16 * width, 32 * width, 64 * width)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(_Block(cin, cout, stride, conv, groups, act, project=i == 0))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.act = act
        self.norm = nn.GroupNorm(groups, cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.norm(self.act(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def wrn(depth: int = 16, width: int = 4, num_classes: int = 10, **kwargs) -> WideResNet:
    """Build a WRN-depth-width.

    Args:
        depth: total depth, 6 n + 4.
        width: widening factor.
        num_classes: outputs of the head.
        **kwargs: the other options of ``WideResNet`` (ws, groups, in_channels).

    Returns:
        The model.
    """
    return WideResNet(depth, width, num_classes, **kwargs)
