"""A seeded generator of small random models over the layers fastdp supports, for the float64 oracle.

``RandomNet(seed)`` draws a graph from ``random.Random(seed)``: a convolutional trunk on (N, 2, 6, 6) images (plain,
grouped and weight-standardised convs, GroupNorm, scalar gains, activations, residual adds), the feature map turned
into tokens, a token stage (an Embedding of indices computed from the image, LayerNorm, Linear layers, a Linear
called twice, residual adds, a parameter of the root added to or multiplying the tokens, a Linear whose weight is
the Embedding's) and a head. Some layers are frozen. ``features`` says what the draw contains, so that a test can
check that the fixed list of seeds covers every one of them.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.nn import ScalarGain, ScaledStdConv2d, WSConv2d

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu}
FEATURES = frozenset({
    "conv", "grouped_conv", "ws_conv", "scaled_ws_conv", "group_norm", "gain", "conv_residual", "embedding",
    "layer_norm", "linear", "reused", "token_residual", "own_add", "own_mul", "own_expand", "tied", "frozen",
})  # fmt: skip
VOCAB = 5


class RandomNet(nn.Module):
    """A random composition of supported layers (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.features: set[str] = set()
        self.trunk: list[tuple] = []  # (conv name, norm name | None, gain name | None, activation, residual)
        self.convs = nn.ModuleDict()
        c = 2
        for i in range(rng.randint(1, 3)):
            kind = rng.choice(["conv", "grouped_conv", "ws_conv", "scaled_ws_conv"])
            cout = rng.choice([2, 4])
            if kind == "conv":
                conv = nn.Conv2d(c, cout, 3, padding=1, bias=rng.random() < 0.5)
            elif kind == "grouped_conv":
                conv = nn.Conv2d(c, cout, 3, padding=1, groups=2)
            elif kind == "ws_conv":
                conv = WSConv2d(c, cout, 3, padding=1)
            else:
                conv = ScaledStdConv2d(c, cout, 1, gamma=1.3)
            self.features.add(kind)
            self.convs[f"c{i}"] = conv
            norm = gain = None
            if rng.random() < 0.5:
                norm = f"n{i}"
                self.convs[norm] = nn.GroupNorm(2, cout)
                self.features.add("group_norm")
            if rng.random() < 0.4:
                gain = f"g{i}"
                self.convs[gain] = ScalarGain(0.5 + rng.random())
                self.features.add("gain")
            residual = cout == c and rng.random() < 0.6
            self.features |= {"conv_residual"} if residual else set()
            self.trunk.append((f"c{i}", norm, gain, rng.choice(sorted(ACTIVATIONS)), residual))
            c = cout
        d = c  # tokens: the 36 positions of the feature map, c features each
        self.tokens = 36
        self.use_embedding = rng.random() < 0.6
        if self.use_embedding:
            self.emb = nn.Embedding(VOCAB, d)
            self.features.add("embedding")
        self.ln = nn.LayerNorm(d) if rng.random() < 0.6 else None
        self.features |= {"layer_norm"} if self.ln is not None else set()
        self.own = rng.sample(["add", "mul", "expand"], rng.randint(1, 3))
        if "add" in self.own:
            self.pos = nn.Parameter(0.5 * torch.randn(1, self.tokens, d))
        if "mul" in self.own:
            self.scale = nn.Parameter(1.0 + 0.3 * torch.randn(d))
        if "expand" in self.own:
            self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.features |= {f"own_{k}" for k in self.own}
        self.mix = nn.Linear(d, d)
        self.reuse = rng.random() < 0.6
        self.features |= {"linear"} | ({"reused"} if self.reuse else set())
        self.token_residual = rng.random() < 0.6
        self.features |= {"token_residual"} if self.token_residual else set()
        self.act = rng.choice(sorted(ACTIVATIONS))
        self.head = nn.Linear(d, 3)
        self.tied = None
        if self.use_embedding and rng.random() < 0.7:
            self.tied = nn.Linear(d, VOCAB, bias=False)
            self.tied.weight = self.emb.weight
            self.features.add("tied")
        frozen = [m for m in (self.mix, self.head, *self.convs.values()) if rng.random() < 0.25]
        for m in frozen[:1]:
            m.requires_grad_(False)
            self.features.add("frozen")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv, norm, gain, act, residual in self.trunk:
            y = self.convs[conv](h)
            if norm is not None:
                y = self.convs[norm](y)
            if gain is not None:
                y = self.convs[gain](y)
            y = ACTIVATIONS[act](y)
            h = h + y if residual else y
        b = h.shape[0]
        t = h.flatten(2).transpose(1, 2)  # (N, 36, d)
        if self.use_embedding:  # token ids from the image: the sign pattern of two channels of the input
            idx = ((x[:, 0] > 0).long() + 2 * (x[:, 1] > 0.5).long()).flatten(1) % VOCAB
            t = t + self.emb(idx)
        if "add" in self.own:
            t = t + self.pos
        if "mul" in self.own:
            t = t * self.scale
        if "expand" in self.own:
            t = torch.cat([self.cls.expand(b, -1, -1), t], dim=1)
        if self.ln is not None:
            t = self.ln(t)
        y = ACTIVATIONS[self.act](self.mix(t))
        if self.reuse:
            y = ACTIVATIONS[self.act](self.mix(y))
        t = t + y if self.token_residual else y
        pooled = t.mean(1)
        out = self.head(pooled)
        if self.tied is not None:
            out = out + self.tied(pooled)[:, :3]
        return out

    @staticmethod
    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 2, 6, 6), torch.randn(n, 3)
