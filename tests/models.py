"""Small random models covering every supported layer, for the oracle tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.nn import ScaledStdConv2d, WSConv2d


class Seq(nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> Linear on sequences -> Linear without bias."""

    vocab = 11

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(self.vocab, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 3, bias=False)

    def forward(self, idx):
        return self.fc2(torch.tanh(self.fc1(self.ln(self.emb(idx))))).mean(1)

    @staticmethod
    def inputs(n):
        return torch.randint(0, Seq.vocab, (n, 5)), torch.randn(n, 3)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=2)
        self.c2 = nn.Conv1d(4, 4, 4, padding="same", dilation=2, padding_mode="circular")
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.gn(F.gelu(self.c2(F.gelu(self.c1(x)))))
        return self.fc(h.mean(2))

    @staticmethod
    def inputs(n):
        return torch.randn(n, 2, 12), torch.randn(n, 3)


class Conv2dNet(nn.Module):
    """Stride, 'same' with an even kernel (asymmetric), reflect padding, groups, dilation, no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 6, 2, padding="same", groups=2)
        self.c3 = nn.Conv2d(6, 6, 3, stride=2, dilation=2, padding=2, bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(self.gn(self.c3(h)).flatten(1))

    @staticmethod
    def inputs(n):
        return torch.randn(n, 3, 8, 8), torch.randn(n, 3)


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.c2 = nn.Conv3d(3, 3, (1, 2, 3), dilation=(1, 2, 1), padding=(0, 1, 2))
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c(x)))).mean((2, 3, 4)))

    @staticmethod
    def inputs(n):
        return torch.randn(n, 2, 3, 6, 6), torch.randn(n, 2)


class WSNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = WSConv2d(3, 8, 3, padding=1)
        self.c2 = ScaledStdConv2d(8, 8, 3, stride=2, groups=2, gamma=1.7)
        self.c3 = WSConv2d(8, 4, 1, groups=2, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(self.c3(h).flatten(1))

    @staticmethod
    def inputs(n):
        return torch.randn(n, 3, 8, 8), torch.randn(n, 3)


class Gain(nn.Module):
    """A container with its own elementwise and 0-dim parameters (fastdp.engine.owned_params; ``inner`` keeps its
    rule)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.randn(n))
        self.s = nn.Parameter(torch.tensor(0.7))
        self.inner = nn.Linear(n, n)

    def forward(self, x):
        return self.inner(x * self.g) * self.s + x


class Scale(nn.Module):
    """A leaf module with parameters and no rule: the torch.func fallback."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(1.0 + 0.3 * torch.randn(n))
        self.b = nn.Parameter(0.1 * torch.randn(n))

    def forward(self, x):
        return x * self.w + self.b


class SharedNet(nn.Module):
    """Tied weights (embedding = output layer), a module called twice, a container with its own parameters and a
    fallback module."""

    vocab = 7

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(self.vocab, 5)
        self.mix = nn.Linear(5, 5)
        self.gain = Gain(5)
        self.out = nn.Linear(5, self.vocab, bias=False)
        self.out.weight = self.emb.weight
        self.scale = Scale(self.vocab)

    def forward(self, idx):
        h = self.emb(idx).mean(1)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        return self.scale(self.out(self.gain(h)))

    @staticmethod
    def inputs(n):
        return torch.randint(0, SharedNet.vocab, (n, 4)), torch.randn(n, SharedNet.vocab)


MODELS = {"seq": Seq, "conv1d": Conv1dNet, "conv2d": Conv2dNet, "conv3d": Conv3dNet, "ws": WSNet, "shared": SharedNet}
