"""Model surgery that makes a model DP-compatible."""

from __future__ import annotations

from torch import nn

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def replace_batchnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm (which mixes the examples of a batch) by a GroupNorm, in place.

    Args:
        model: the model to modify.
        num_groups: groups per GroupNorm; lowered to the largest divisor of the channel count when needed.

    Returns:
        The same model object, for chaining.
    """
    for name, child in model.named_children():
        if isinstance(child, _BATCHNORMS):
            channels = child.num_features
            gn = nn.GroupNorm(
                _largest_divisor_at_most(channels, num_groups), channels, eps=child.eps, affine=child.affine
            )
            if child.affine:
                gn.to(device=child.weight.device, dtype=child.weight.dtype)
            setattr(model, name, gn)
        else:
            replace_batchnorm(child, num_groups)
    return model
