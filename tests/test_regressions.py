"""Models that were exact before the engine took any call (issue 13) and must stay exact: a GPT with tied embeddings and
causal attention written with Linear layers, depthwise / circular / 'same' convolutions, ConvTranspose2d, InstanceNorm
and PReLU through the fallback, a Linear reused three times, frozen parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_exact, seed_of
from torch import nn

SIZES = {"one": [5], "several": [2, 3]}


class TiedGPT(nn.Module):
    vocab, E, T = 11, 8, 5

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(self.vocab, self.E)
        self.wpe = nn.Embedding(self.T, self.E)
        self.ln = nn.LayerNorm(self.E)
        self.c_attn = nn.Linear(self.E, 3 * self.E)
        self.c_proj = nn.Linear(self.E, self.E)
        self.head = nn.Linear(self.E, self.vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        n, t = idx.shape
        h = self.wte(idx) + self.wpe(torch.arange(t))
        q, k, v = self.c_attn(self.ln(h)).view(n, t, 3, 2, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, -1)
        return self.head(h + self.c_proj(att)).flatten(1)

    @staticmethod
    def inputs(n):
        return torch.randint(0, TiedGPT.vocab, (n, TiedGPT.T)), torch.randn(n, TiedGPT.T * TiedGPT.vocab)


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.circular = nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular")
        self.same = nn.Conv2d(6, 3, 4, padding="same")
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.circular(torch.tanh(self.depthwise(x))))
        return self.fc(self.same(h).mean((2, 3)))

    @staticmethod
    def inputs(n):
        return torch.randn(n, 4, 6, 6), torch.randn(n, 2)


class Fallbacks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.inorm(self.up(x))).mean((2, 3)))

    @staticmethod
    def inputs(n):
        return torch.randn(n, 3, 4, 4), torch.randn(n, 2)


class ReusedFrozen(nn.Module):
    """One Linear called three times, and a frozen layer in between."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(4, 2)
        self.out.bias.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = torch.tanh(self.fc(self.frozen(h)))
        return self.out(torch.tanh(self.fc(h)))

    @staticmethod
    def inputs(n):
        return torch.randn(n, 4), torch.randn(n, 2)


MODELS = {"tied_gpt": TiedGPT, "convs": Convs, "fallbacks": Fallbacks, "reused_frozen": ReusedFrozen}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_models_that_worked_stay_exact(name, sizes, augmult, reduction):
    torch.manual_seed(seed_of(name, sizes, augmult, reduction))
    model = MODELS[name]()
    x, t = MODELS[name].inputs(5)
    x, t = x.repeat_interleave(augmult, 0), t.repeat_interleave(augmult, 0)
    if augmult > 1 and x.is_floating_point():
        x[1::augmult] += 0.3 * torch.randn_like(x[1::augmult])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning
        assert_exact(model, x, t, [s * augmult for s in SIZES[sizes]], augmult=augmult, reduction=reduction)
