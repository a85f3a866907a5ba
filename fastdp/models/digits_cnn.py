"""The small GroupNorm CNN of ``fastdp-train``'s embedded check (scikit-learn's 8x8 digits, 1 channel)."""

from __future__ import annotations

from torch import nn


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Conv(1, 16, 3, p1) - GN(4, 16) - ReLU - Conv(16, 32, 3, s2, p1) - GN(8, 32) - ReLU - Linear(512, classes).

    Args:
        num_classes: outputs of the last layer.
        in_channels: input channels (1 for digits).

    Returns:
        The model (4,896 + 513 * num_classes parameters), for (N, 1, 8, 8) inputs.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes),
    )  # fmt: skip
