"""The rules for nn.RMSNorm, nn.Bilinear, nn.EmbeddingBag and transformers' Conv1D against the float64 per-example
loop, and the cases they refuse.

transformers is not a dependency: its Conv1D is tested through a local class of the same definition, registered by
qualified name exactly as fastdp registers transformers' (fastdp.rules.hf_conv1d)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from conftest import assert_exact, row_loss, seed_of
from torch import nn

from fastdp.engine import GradSampleEngine
from fastdp.rules import register_rule, rule_for
from fastdp.rules.hf_conv1d import Conv1DRule

SIZES = {"one": [5], "several": [2, 3]}


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, verbatim: y = x W + b with W (nx, nf)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


register_rule(f"{Conv1D.__module__}.{Conv1D.__qualname__}")(Conv1DRule)


class RMS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.RMSNorm(6)
        self.norm2 = nn.RMSNorm((3, 6), eps=None)  # torch's default eps: the dtype's machine epsilon

    def forward(self, x):
        return self.norm2(torch.tanh(self.norm(self.fc(x)))).flatten(1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, 3, 4), torch.randn(n, 18)


class Bi(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bi = nn.Bilinear(3, 4, 5)
        self.bi2 = nn.Bilinear(5, 5, 2, bias=False)

    def forward(self, x):
        h = torch.tanh(self.bi(x, self.fc(x)))  # (N, T, 5): T rows per example
        pooled = h.mean(1)
        return torch.cat([h.flatten(1), self.bi2(pooled, pooled)], 1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, 3, 3), torch.randn(n, 17)


class Bags(nn.Module):
    """2-D bags: "sum" with per_sample_weights computed from the data, "mean" with padding."""

    vocab = 9

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(self.vocab, 1)
        self.sum = nn.EmbeddingBag(self.vocab, 4, mode="sum")
        self.mean = nn.EmbeddingBag(self.vocab, 4, mode="mean", padding_idx=0)

    def forward(self, idx):
        psw = torch.sigmoid(self.emb(idx)).squeeze(-1)
        return torch.cat([self.sum(idx, per_sample_weights=psw), self.mean(idx)], 1)

    @staticmethod
    def inputs(n):
        return torch.randint(0, Bags.vocab, (n, 5)), torch.randn(n, 8)


class GPT2Block(nn.Module):
    """GPT-2's attention with Conv1D projections (c_attn to q|k|v, c_proj), causal, and its Conv1D MLP."""

    def __init__(self, E: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * E, E), Conv1D(E, E)
        self.c_fc, self.c_out = Conv1D(2 * E, E), Conv1D(E, 2 * E)
        self.ln = nn.LayerNorm(E)
        self.heads = heads
        for m in (self.c_attn, self.c_proj, self.c_fc, self.c_out):
            nn.init.normal_(m.weight, std=0.3)

    def forward(self, x):
        n, t, e = x.shape
        q, k, v = self.c_attn(self.ln(x)).split(e, 2)
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.c_proj(att.transpose(1, 2).reshape(n, t, e))
        return (h + self.c_out(torch.tanh(self.c_fc(h)))).flatten(1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, 4, 8), torch.randn(n, 32)


MODELS = {"rmsnorm": RMS, "bilinear": Bi, "embedding_bag": Bags, "conv1d": GPT2Block}


def _views(x, t, augmult):
    x, t = x.repeat_interleave(augmult, 0), t.repeat_interleave(augmult, 0)
    if augmult > 1:
        if x.is_floating_point():
            x[1::augmult] += 0.3 * torch.randn_like(x[1::augmult])
        else:
            x[1::augmult] = (x[1::augmult] + 1) % Bags.vocab
    return x, t


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_layer_rules_are_exact(name, sizes, augmult, reduction):
    torch.manual_seed(seed_of(name, sizes, augmult, reduction))
    model = MODELS[name]()
    x, t = _views(*MODELS[name].inputs(5), augmult)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer may go through the fallback
        plans = assert_exact(model, x, t, [s * augmult for s in SIZES[sizes]], augmult=augmult, reduction=reduction)
    assert set(plans) == {
        n for n, m in model.named_modules() if rule_for(m) is not None and any(True for _ in m.parameters(False))
    }


@pytest.mark.parametrize("strategy", ["ghost", "keep", "instantiate_bk"])
def test_conv1d_forced_strategy_runs_and_is_exact(strategy):
    torch.manual_seed(seed_of("conv1d", strategy))
    model = GPT2Block()
    x, t = GPT2Block.inputs(6)
    plans = assert_exact(model, x, t, [4, 2], strategy=strategy)
    expected = {"c_attn", "c_proj", "c_fc", "c_out"} | ({"ln"} if strategy == "keep" else set())  # LayerNorm: keep
    assert {n for n, s in plans.items() if s == strategy} == expected


@pytest.mark.parametrize("strategy", ["ghost", "keep"])
def test_bilinear_forced_strategy_runs_and_is_exact(strategy):
    torch.manual_seed(seed_of("bilinear", strategy))
    model = Bi()
    x, t = Bi.inputs(6)
    plans = assert_exact(model, x, t, [4, 2], strategy=strategy, augmult=1)
    assert plans["bi"] == strategy and plans["bi2"] == strategy


def test_transformers_conv1d_is_registered_by_name_without_importing_it():
    import sys

    from fastdp.rules.hf_conv1d import CONV1D_NAMES

    assert "transformers" not in sys.modules or importlib.util.find_spec("transformers") is not None
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed here; its Conv1D's rule is tested through the local copy")
    from transformers.pytorch_utils import Conv1D as HF

    assert f"{HF.__module__}.{HF.__qualname__}" in CONV1D_NAMES
    assert isinstance(rule_for(HF(6, 4)), Conv1DRule)


class FlatBags(nn.Module):
    """A 1-D input with offsets: each example's L tokens flattened, in ``bags`` bags of its own (mean and sum)."""

    def __init__(self, bags: int = 2, last_offset: bool = False) -> None:
        super().__init__()
        self.mean = nn.EmbeddingBag(9, 4, mode="mean", padding_idx=0, include_last_offset=last_offset)
        self.sum = nn.EmbeddingBag(9, 4, mode="sum")
        self.bags, self.last_offset = bags, last_offset

    def forward(self, idx):
        n, length = idx.shape
        cuts = torch.tensor([0, 1, 3, 4][: self.bags])  # uneven bags within each example
        starts = (torch.arange(n).unsqueeze(1) * length + cuts).flatten()
        mean_offsets = torch.cat([starts, torch.tensor([n * length])]) if self.last_offset else starts
        a = self.mean(idx.flatten(), mean_offsets).view(n, -1)
        return torch.cat([a, self.sum(idx.flatten(), starts).view(n, -1)], 1)

    @staticmethod
    def inputs(n):
        return torch.randint(0, 9, (n, 5)), torch.randn(n, 16)


@pytest.mark.parametrize("last_offset", [False, True])
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_embedding_bag_with_offsets_within_examples_is_exact(last_offset, augmult, reduction):
    torch.manual_seed(seed_of("flat bags", last_offset, augmult, reduction))
    model = FlatBags(last_offset=last_offset)
    x, t = _views(*FlatBags.inputs(5), augmult)
    assert_exact(model, x, t, [2 * augmult, 3 * augmult], augmult=augmult, reduction=reduction)


def test_embedding_bag_whose_bags_cross_examples_and_max_mode_are_refused_by_name():
    class Crossing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(9, 4)

        def forward(self, idx):  # one bag per example, but shifted: bag 0 is tokens 0-1, bag 1 tokens 2-4, ...
            return self.bag(idx.flatten(), torch.tensor([0, 2, 5, 8])).view(idx.shape[0], -1)

    model = Crossing()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"fastdp: bag \(EmbeddingBag\): its offsets make 4 bags over 12 tokens"):
        model(torch.randint(0, 9, (4, 3)))
    with pytest.raises(ValueError, match=r"EmbeddingBag\(mode='max'\).*mode='sum' or 'mean'"):
        GradSampleEngine(nn.Sequential(nn.EmbeddingBag(9, 4, mode="max")), max_grad_norm=1.0)


def test_rms_norm_and_bilinear_run_sequence_first():
    """Position-wise rules take (T, N, ...) with the batch in dim 1 (as inside a batch_first=False transformer)."""

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.RMSNorm(4)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.norm(x.transpose(0, 1))).transpose(0, 1).flatten(1)

    torch.manual_seed(41)
    model = SeqFirst()
    x, t = torch.randn(5, 3, 4), torch.randn(5, 12)
    assert_exact(model, x, t, [3, 2])
    row_loss(model(x), t)  # plain forward still fine afterwards
