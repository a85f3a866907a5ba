"""SmoothNet v1 (W80D50) of Remerscheid et al. 2022, "SmoothNets: Optimizing CNN architecture design for
differentially private deep learning": a wide, DenseNet-style CNN (no bottlenecks) with SELU activations, GroupNorm
and max pooling.

Layout (width w, depth d; W80D50 is w = 8, d = 5, i.e. 8 * w = 64 and 16 * w = 128 channels, 5 blocks per stage):

    stage 0   d dense blocks of  conv3x3 (no bias) -> maxpool 3x3/s1/p1 -> GroupNorm(8) -> SELU,  8w channels each;
              block j sees the concatenation of the stage input and the outputs of blocks 0..j-1
    transition  1x1 conv (no bias) halving the concatenated channels (in + d * 8w -> (in + d * 8w) // 2),
              then avgpool 2x2/s2
    stage 1   d dense blocks as above, 16w channels each
    head      avgpool 2x2/s2, keep the last block's 16w channels only, adaptive avgpool to 4x4,
              FC(16w * 16 -> 256) -> SELU -> FC(256 -> 128) -> SELU -> FC(128 -> classes)

The head's input is 16w * 4 * 4 = 2048 features for W80D50, for any input resolution (the adaptive pool; at 32x32
CIFAR input it is a plain 2x2 average of the 8x8 map). This follows the authors' public code
(TUM-AIMED/PrivateModelArchitectures, ``SmoothNet`` with width 8, depth 5, ``norm_groups=8``).

Parameter count of W80D50 at CIFAR-10 (3 input channels, 10 classes), 3,391,853 in all (the paper's 3.39M):

    stage 0 convs   9 * 64 * (3 + 67 + 131 + 195 + 259)            =   377,280    GroupNorms 5 * 2 * 64  =   640
    transition      323 * 161  (3 + 5 * 64 = 323 channels in)      =    52,003
    stage 1 convs   9 * 128 * (161 + 289 + 417 + 545 + 673)        = 2,401,920    GroupNorms 5 * 2 * 128 = 1,280
    head            2048 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10 =   558,730
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SmoothBlock(nn.Module):
    """conv3x3 -> maxpool 3x3/s1 -> GroupNorm -> SELU (resolution and channel count preserved by the pool)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.norm = nn.GroupNorm(min(groups, cout), cout)
        self.act = nn.SELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.pool(self.conv(x))))


class _DenseStage(nn.Module):
    """``depth`` blocks; block j takes the stage input concatenated with the outputs of blocks 0..j-1."""

    def __init__(self, cin: int, growth: int, depth: int, groups: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_SmoothBlock(cin + j * growth, growth, groups) for j in range(depth))
        self.out_channels = cin + depth * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.cat((x, block(x)), dim=1)
        return x


class SmoothNet(nn.Module):
    """SmoothNet v1; see the module docstring for the layout.

    Args:
        num_classes: outputs of the last FC layer.
        in_channels: input channels.
        width: width factor w (stages of 8w and 16w channels); 8.0 for W80D50.
        depth: depth factor d (blocks per stage); 5.0 for W80D50.
        groups: GroupNorm groups (capped at the channel count).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: float = 8.0, depth: float = 5.0, groups: int = 8
    ) -> None:
        super().__init__()
        c0, c1, n = int(width * 8), int(width * 16), int(depth)
        if min(c0, c1, n) < 1:
            raise ValueError(f"SmoothNet needs width >= 1/8 and depth >= 1, got width={width}, depth={depth}")
        self.stage0 = _DenseStage(in_channels, c0, n, groups)
        mid = self.stage0.out_channels // 2
        self.transition = nn.Conv2d(self.stage0.out_channels, mid, 1, bias=False)
        self.stage1 = _DenseStage(mid, c1, n, groups)
        self.last_channels = c1
        self.fc1 = nn.Linear(c1 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.act = nn.SELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.transition(self.stage0(x)), 2)
        x = self.stage1(x)[:, -self.last_channels :]  # only the last block's output reaches the head
        x = F.adaptive_avg_pool2d(F.avg_pool2d(x, 2), 4).flatten(1)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def smoothnet_v1(num_classes: int = 10, in_channels: int = 3, **kwargs) -> SmoothNet:
    """SmoothNet W80D50 (about 3.39M parameters at 3 input channels and 10 classes).

    Args:
        num_classes: outputs of the head.
        in_channels: input channels.
        **kwargs: ``width``, ``depth``, ``groups`` of ``SmoothNet`` (smaller values give reduced variants).

    Returns:
        The model.
    """
    return SmoothNet(num_classes, in_channels, **kwargs)
