"""Layers and model surgery for DP training."""

from fastdp.nn.gain import ScalarGain
from fastdp.nn.replace import replace_batchnorm
from fastdp.nn.ws_conv import ScaledStdConv2d, WSConv2d, standardize_weight

__all__ = ["ScalarGain", "ScaledStdConv2d", "WSConv2d", "replace_batchnorm", "standardize_weight"]
