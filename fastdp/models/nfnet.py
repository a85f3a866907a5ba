"""Normaliser-free networks (Brock et al. 2021): NF-ResNet-50 and NFNet-F0..F6, parameter- and layout-compatible
with timm's ``nf_resnet50`` and ``dm_nfnet_f0``..``dm_nfnet_f6`` (see ``fastdp.models.timm_checkpoint``).

No normalisation layer: every conv is a ``fastdp.nn.ScaledStdConv2d`` (scaled weight standardisation with a learnable
per-channel gain), activations are scaled by a constant gamma so that they keep unit variance on unit-Gaussian
inputs (relu: 1.7139588594436646, gelu: 1.7015043497085571, DeepMind's constants), and each pre-activation residual
block computes

    h = act(x) * beta                         beta = 1 / sqrt(expected variance of x)
    shortcut = x,  or  conv1x1(avgpool(h))    (first block of a stage: new width and/or stride)
    branch = conv3(act(conv2b(act(conv2(act(conv1(h)))))))    (conv2b only in NFNets; conv2/conv2b grouped)
    branch = 2 * SE(branch)                   (NFNets: squeeze-excite with ratio 0.5, gain 2)
    branch = skip_gain * drop_path(branch)    (skip_gain: a learnable scalar initialised to 0 -- SkipInit)
    out = shortcut + alpha * branch           alpha = 0.2

The expected variance restarts at 1 after the first block of a stage and grows by alpha^2 per block. Stochastic
depth (``drop_path_rate``; rates rising linearly with depth to that value, as timm) drops a residual branch per
example (per row: with augmult K each view draws its own mask), in training mode only; it never mixes examples.

Architectures (timm's configurations; stems have stride 4, stages strides 1, 2, 2, 2):

- NF-ResNet-50: stem 7x7/2 conv (64) + 3x3/2 maxpool; depths (3, 4, 6, 3), widths (256, 512, 1024, 2048),
  bottleneck ratio 0.25, ungrouped, relu with gamma folded into the conv scale (timm), no SE, no final conv;
  25.56M parameters at 1000 classes.
- NFNet-Fk (k = 0..6): stem of four 3x3 convs (16, 32, 64, 128; strides 2, 1, 1, 2); depths (1, 2, 6, 3) * (k + 1),
  widths (256, 512, 1536, 1536), bottleneck ratio 0.5, group width 128, gelu with gamma in the activation, SE,
  extra 3x3 conv, final 1x1 conv to 3072 channels, TF "SAME" padding (asymmetric for stride 2) as DeepMind's
  weights; F0 71.49M, F1 132.63M, F2 193.78M, F3 254.92M parameters at 1000 classes.

Unlike timm's ``nf_resnet50`` (which zero-initialises conv3's gain instead), both carry the scalar skip gain of the
paper by default (``skipinit=True``, 16 more parameters for NF-ResNet-50); loading timm's nf_resnet50 weights sets
those gains to 1, which computes exactly timm's function.

Every parameterised module (ScaledStdConv2d, the SE's 1x1 nn.Conv2d, ScalarGain, nn.Linear) has an exact fast
per-example rule in fastdp.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.nn import ScalarGain, ScaledStdConv2d

#: gamma such that gamma * act(z) has unit variance for z ~ N(0, 1) (DeepMind's nfnets constants)
ACT_GAMMA = {"relu": 1.7139588594436646, "gelu": 1.7015043497085571, "silu": 1.7881293296813965}
_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@dataclass(frozen=True)
class NFConfig:
    """Architecture of a normaliser-free network.

    Attributes:
        depths: blocks per stage.
        channels: output channels per stage.
        stem: "7x7_pool" (ResNet: 7x7/2 conv + 3x3/2 max pool) or "deep_quad" (NFNet: four 3x3 convs, strides
            2, 1, 1, 2, with stem_chs / 8, / 4, / 2, / 1 channels).
        stem_chs: output channels of the stem.
        bottle_ratio: bottleneck width relative to the block's output channels.
        group_size: channels per group of the 3x3 convs (None: ungrouped).
        act: "relu", "gelu" or "silu".
        gamma_in_act: scale the activations by gamma (NFNets); False folds gamma into every conv's scale (timm's
            NF-ResNets, including the stem conv, which no activation precedes).
        se_ratio: squeeze-excite reduction after conv3 (None: no SE).
        extra_conv: a second grouped 3x3 conv (conv2b) in each block.
        feat_mult: a final 1x1 conv to feat_mult * channels[-1] channels before the head (0: none).
        same_padding: TF "SAME" padding, asymmetric for stride 2 (the padding DeepMind's NFNet weights were
            trained with); False pads symmetrically.
        alpha: residual branch scale.
        attn_gain: gain applied to the SE output.
        std_conv_eps: epsilon of the weight standardisation.
        skipinit: a learnable scalar gain (zero-initialised) at the end of every residual branch.
    """

    depths: tuple[int, ...]
    channels: tuple[int, ...]
    stem: str
    stem_chs: int
    bottle_ratio: float
    group_size: int | None
    act: str
    gamma_in_act: bool
    se_ratio: float | None
    extra_conv: bool
    feat_mult: float
    same_padding: bool
    alpha: float = 0.2
    attn_gain: float = 2.0
    std_conv_eps: float = 1e-5
    skipinit: bool = True


NF_RESNET50 = NFConfig(
    depths=(3, 4, 6, 3), channels=(256, 512, 1024, 2048), stem="7x7_pool", stem_chs=64, bottle_ratio=0.25,
    group_size=None, act="relu", gamma_in_act=False, se_ratio=None, extra_conv=False, feat_mult=0.0,
    same_padding=False,
)  # fmt: skip

NFNET_VARIANTS = {
    f"F{k}": NFConfig(
        depths=tuple(d * (k + 1) for d in (1, 2, 6, 3)),
        channels=(256, 512, 1536, 1536),
        stem="deep_quad",
        stem_chs=128,
        bottle_ratio=0.5,
        group_size=128,
        act="gelu",
        gamma_in_act=True,
        se_ratio=0.5,
        extra_conv=True,
        feat_mult=2.0,
        same_padding=True,
    )  # fmt: skip
    for k in range(7)
}


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round to a multiple of ``divisor`` (at least ``divisor``), rounding up if rounding lost over 10%."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < round_limit * v else out


class ScaledActivation(nn.Module):
    """act(x) * gamma (parameter-free)."""

    def __init__(self, act: str, gamma: float = 1.0) -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unknown activation {act!r}; known: {', '.join(_ACTS)}")
        self.act, self.gamma = act, gamma
        self._fn = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fn(x)
        return y if self.gamma == 1.0 else y * self.gamma

    def extra_repr(self) -> str:
        return f"{self.act}, gamma={self.gamma}"


class TFSamePad2d(nn.Module):
    """TensorFlow "SAME" padding for a conv of this kernel/stride/dilation: output size ceil(size / stride), the
    odd extra pixel on the bottom/right. Depends on the input size, so it runs in the forward (parameter-free)."""

    def __init__(self, kernel_size: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad: list[int] = []
        for size in reversed(x.shape[2:]):  # F.pad lists the last dimension first
            out = -(-size // self.stride)  # ceil
            total = max((out - 1) * self.stride + (self.kernel_size - 1) * self.dilation + 1 - size, 0)
            pad += [total // 2, total - total // 2]
        return F.pad(x, pad) if any(pad) else x


class StochasticDepth(nn.Module):
    """In training, zero each row (example view) with probability ``rate`` and scale the rest by 1 / (1 - rate)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * (mask / keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean over positions of x)))), fc1/fc2 1x1 convs with bias (timm's SEModule)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class _Layers:
    """Builds the convs, paddings and activations of one configuration."""

    def __init__(self, cfg: NFConfig) -> None:
        self.cfg = cfg
        self.conv_gamma = 1.0 if cfg.gamma_in_act else ACT_GAMMA[cfg.act]
        self.act_gamma = ACT_GAMMA[cfg.act] if cfg.gamma_in_act else 1.0

    def dynamic_pad(self, stride: int) -> bool:
        """TF SAME with stride 1 (odd kernels) is symmetric, a static padding; with stride > 1 it depends on the
        input size, so the conv gets padding 0 and a TFSamePad2d in front of it."""
        return self.cfg.same_padding and stride > 1

    def conv(
        self, cin: int, cout: int, kernel_size: int, stride: int = 1, groups: int = 1, gain_init: float = 1.0
    ) -> ScaledStdConv2d:
        padding = 0 if self.dynamic_pad(stride) else None  # None: symmetric
        return ScaledStdConv2d(
            cin, cout, kernel_size, stride=stride, padding=padding, groups=groups, gamma=self.conv_gamma,
            eps=self.cfg.std_conv_eps, gain_init=gain_init,
        )  # fmt: skip

    def pad(self, kernel_size: int, stride: int) -> nn.Module:
        return TFSamePad2d(kernel_size, stride) if self.dynamic_pad(stride) else nn.Identity()

    def act(self) -> ScaledActivation:
        return ScaledActivation(self.cfg.act, self.act_gamma)


class _Downsample(nn.Module):
    """Shortcut projection: avgpool 2x2 (stride > 1) then a 1x1 conv."""

    def __init__(self, layers: _Layers, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.conv = layers.conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class NFBlock(nn.Module):
    """Normaliser-free pre-activation bottleneck block (see the module docstring)."""

    def __init__(self, layers: _Layers, cin: int, cout: int, stride: int, beta: float, drop_path_rate: float) -> None:
        super().__init__()
        cfg = layers.cfg
        mid = make_divisible(cout * cfg.bottle_ratio)
        groups = 1
        if cfg.group_size:
            groups = mid // cfg.group_size
            if groups < 1:
                raise ValueError(
                    f"group_size {cfg.group_size} exceeds the bottleneck width {mid} of a {cout}-channel block"
                )
            mid = cfg.group_size * groups
        self.alpha, self.beta, self.attn_gain = cfg.alpha, beta, cfg.attn_gain
        self.act1 = layers.act()
        self.downsample = _Downsample(layers, cin, cout, stride) if (cin != cout or stride != 1) else None
        self.conv1 = layers.conv(cin, mid, 1)
        self.act2 = layers.act()
        self.pad2 = layers.pad(3, stride)
        self.conv2 = layers.conv(mid, mid, 3, stride=stride, groups=groups)
        self.act2b = layers.act() if cfg.extra_conv else None
        self.conv2b = layers.conv(mid, mid, 3, groups=groups) if cfg.extra_conv else None
        self.act3 = layers.act()
        # with a skip gain conv3 starts at gain 1; without one, its zero gain switches the branch off (timm)
        self.conv3 = layers.conv(mid, cout, 1, gain_init=1.0 if cfg.skipinit else 0.0)
        self.se = SqueezeExcite(cout, make_divisible(cout * cfg.se_ratio, round_limit=0.0)) if cfg.se_ratio else None
        self.drop_path = StochasticDepth(drop_path_rate) if drop_path_rate > 0 else None
        self.skip_gain = ScalarGain(0.0) if cfg.skipinit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(h)
        out = self.conv1(h)
        out = self.conv2(self.pad2(self.act2(out)))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        out = self.conv3(self.act3(out))
        if self.se is not None:
            out = self.attn_gain * self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        if self.skip_gain is not None:
            out = self.skip_gain(out)
        return shortcut + self.alpha * out


def _stem(layers: _Layers, cin: int) -> nn.Sequential:
    cfg = layers.cfg
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if cfg.stem == "7x7_pool":
        if layers.dynamic_pad(2):
            parts["pad"] = layers.pad(7, 2)
        parts["conv"] = layers.conv(cin, cfg.stem_chs, 7, stride=2)
        parts["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
    elif cfg.stem == "deep_quad":
        widths = (cfg.stem_chs // 8, cfg.stem_chs // 4, cfg.stem_chs // 2, cfg.stem_chs)
        for i, (cout, stride) in enumerate(zip(widths, (2, 1, 1, 2), strict=True), start=1):
            if i > 1:
                parts[f"act{i}"] = layers.act()
            if layers.dynamic_pad(stride):
                parts[f"pad{i}"] = layers.pad(3, stride)
            parts[f"conv{i}"] = layers.conv(cin, cout, 3, stride=stride)
            cin = cout
    else:
        raise ValueError(f"unknown stem {cfg.stem!r}; known: '7x7_pool', 'deep_quad'")
    return nn.Sequential(parts)


class NormFreeNet(nn.Module):
    """A normaliser-free ResNet / NFNet (see the module docstring).

    Args:
        cfg: the architecture.
        num_classes: outputs of the head.
        in_channels: input channels.
        drop_path_rate: stochastic depth rate of the last block (rates rise linearly from 0 over the blocks).
        drop_rate: dropout before the head (per element, so per example).
    """

    def __init__(
        self, cfg: NFConfig, num_classes: int = 1000, in_channels: int = 3, drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        if len(cfg.depths) != len(cfg.channels):
            raise ValueError(f"depths {cfg.depths} and channels {cfg.channels} must have the same length")
        if cfg.act not in ACT_GAMMA:
            raise ValueError(f"unknown activation {cfg.act!r}; known: {', '.join(ACT_GAMMA)}")
        self.cfg = cfg
        layers = _Layers(cfg)
        self.stem = _stem(layers, in_channels)
        total = sum(cfg.depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, cin, expected_var, b = [], cfg.stem_chs, 1.0, 0
        for s, (depth, cout) in enumerate(zip(cfg.depths, cfg.channels, strict=True)):
            blocks = []
            for i in range(depth):
                stride = 2 if (i == 0 and s > 0) else 1
                blocks.append(NFBlock(layers, cin, cout, stride, expected_var**-0.5, rates[b]))
                if i == 0:
                    expected_var = 1.0  # the projection shortcut resets the signal's variance
                expected_var += cfg.alpha**2
                cin, b = cout, b + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv = None
        if cfg.feat_mult:
            self.final_conv = layers.conv(cin, int(cin * cfg.feat_mult), 1)
            cin = int(cin * cfg.feat_mult)
        self.final_act = layers.act()
        self.num_features = cin
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else None
        self.head = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's initialisation: fan-in normal convs (the standardisation makes their scale irrelevant), zero biases,
        # a small normal head
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map, (N, num_features, H / 32, W / 32)."""
        x = self.stages(self.stem(x))
        if self.final_conv is not None:
            x = self.final_conv(x)
        return self.final_act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean((2, 3))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.head(x)


def _build(cfg: NFConfig, num_classes: int, in_channels: int, overrides: dict) -> NormFreeNet:
    model_args = {k: overrides.pop(k) for k in ("drop_path_rate", "drop_rate") if k in overrides}
    fields = {f.name for f in dataclasses.fields(NFConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}; NFConfig fields: {sorted(fields)}, plus drop_path_rate, drop_rate"
        )
    return NormFreeNet(dataclasses.replace(cfg, **overrides), num_classes, in_channels, **model_args)


def nf_resnet50(num_classes: int = 1000, in_channels: int = 3, **overrides) -> NormFreeNet:
    """NF-ResNet-50 (timm ``nf_resnet50`` layout plus the paper's skip gains).

    Args:
        num_classes: outputs of the head.
        in_channels: input channels.
        **overrides: ``drop_path_rate``, ``drop_rate``, or any ``NFConfig`` field (e.g. ``channels``, ``depths``,
            ``stem_chs`` for reduced variants built through the same code, ``skipinit=False`` for timm's exact
            parameter set).

    Returns:
        The model (25.56M parameters at 1000 classes).
    """
    return _build(NF_RESNET50, num_classes, in_channels, overrides)


def nfnet(variant: str = "F0", num_classes: int = 1000, in_channels: int = 3, **overrides) -> NormFreeNet:
    """NFNet-F0..F6 (timm ``dm_nfnet_f*`` layout: DeepMind's weights).

    Args:
        variant: "F0" .. "F6" (depths (1, 2, 6, 3) times 1 .. 7).
        num_classes: outputs of the head.
        in_channels: input channels.
        **overrides: ``drop_path_rate``, ``drop_rate``, or any ``NFConfig`` field (e.g. ``channels``, ``depths``,
            ``stem_chs``, ``group_size`` for reduced variants built through the same code).

    Returns:
        The model (F0: 71.49M parameters at 1000 classes).
    """
    key = variant.upper()
    if key not in NFNET_VARIANTS:
        raise ValueError(f"unknown NFNet variant {variant!r}; known: {', '.join(NFNET_VARIANTS)}")
    return _build(NFNET_VARIANTS[key], num_classes, in_channels, overrides)
