"""Models of the papers fastdp reproduces."""

from fastdp.models.wrn import WideResNet, wrn

__all__ = ["WideResNet", "wrn"]
