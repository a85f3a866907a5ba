"""Any call of a wrapped layer: several tensors, keyword and non-tensor arguments, nested outputs, the batch in dim 1
(nn.RNN / nn.LSTM / nn.GRU with batch_first=False), all exact against the float64 per-example loop, and clear errors
naming the module where a call cannot be handled."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_exact, row_loss, seed_of
from torch import nn

from fastdp.engine import GradSampleEngine
from fastdp.engine.provenance import Batched, Shared

#: (micro-batch sizes in examples): one micro-batch, and several
SIZES = {"one": [5], "several": [2, 3]}


class Mixer(nn.Module):
    """No rule: the fallback. Two tensors, a keyword-only float, an optional mask and a nested output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 4) / 2)
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x, y, *, scale: float = 1.0, mask=None):
        h = torch.tanh(x @ self.a + y * self.b) * scale
        if mask is not None:
            h = h * mask
        return h, {"sq": (h.square() * self.b).sum(-1, keepdim=True), "none": None}


class MultiArgNet(nn.Module):
    """A fallback module called with two batched tensors (one from a Linear), a shared mask and a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mixer = Mixer()
        self.register_buffer("mask", torch.tensor([1.0, 0.5, 1.0, 2.0]))

    def forward(self, x):
        h, extra = self.mixer(x, self.fc(x), scale=0.7, mask=self.mask)
        return torch.cat([h, extra["sq"]], -1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, 4), torch.randn(n, 5)


class Recurrent(nn.Module):
    """An RNN over (N, T, D) with its initial state from a Linear; output and final state both reach the loss."""

    def __init__(self, kind: type[nn.RNNBase], batch_first: bool, layers: int = 2, initial: bool = True) -> None:
        super().__init__()
        self.batch_first, self.initial = batch_first, initial
        self.h0 = nn.Linear(3, 5 * layers) if initial else None
        self.rnn = kind(3, 5, num_layers=layers, batch_first=batch_first, bidirectional=kind is nn.GRU)
        self.kind, self.layers = kind, layers

    def forward(self, x):
        n = x.shape[0]
        dirs = 2 if self.rnn.bidirectional else 1
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.initial:
            h0 = self.h0(x[:, 0]).view(n, self.layers, 5).transpose(0, 1).repeat(dirs, 1, 1)
            out, state = self.rnn(seq, (h0, torch.tanh(h0)) if self.kind is nn.LSTM else h0)
        else:
            out, state = self.rnn(seq)
        h_n = state[0] if self.kind is nn.LSTM else state
        out = out if self.batch_first else out.transpose(0, 1)
        return torch.cat([out.mean(1), h_n.transpose(0, 1).flatten(1)], 1)

    @staticmethod
    def inputs(n, width):
        return torch.randn(n, 4, 3), torch.randn(n, width)


def _views(x, t, augmult):
    """Each example's K views: the rows repeated, the second view perturbed so the views differ."""
    x, t = x.repeat_interleave(augmult, 0), t.repeat_interleave(augmult, 0)
    if augmult > 1:
        x[1::augmult] += 0.3 * torch.randn_like(x[1::augmult])
    return x, t


@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fallback_takes_any_call(sizes, augmult, reduction):
    torch.manual_seed(seed_of("multiarg", sizes, augmult, reduction))
    model = MultiArgNet()
    x, t = _views(*MultiArgNet.inputs(5), augmult)
    assert_exact(model, x, t, [s * augmult for s in SIZES[sizes]], augmult=augmult, reduction=reduction)


def test_probe_classifies_every_tensor_argument():
    torch.manual_seed(31)
    model = MultiArgNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = GradSampleEngine(model, max_grad_norm=1.0)
    x, t = MultiArgNet.inputs(4)
    row_loss(model(x), t).mean().backward()
    (layout,) = eng.layouts.values()
    assert layout[(model.mixer, 0)] == (Batched(1), Batched(1), Shared())  # x, fc(x), the mask


RNNS = [(kind, bf) for kind in (nn.RNN, nn.LSTM, nn.GRU) for bf in (True, False)]


@pytest.mark.parametrize("kind, batch_first", RNNS, ids=[f"{k.__name__}-bf{b}" for k, b in RNNS])
@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recurrent_layers_are_exact(kind, batch_first, sizes, augmult, reduction):
    torch.manual_seed(seed_of(kind.__name__, batch_first, sizes, augmult, reduction))
    model = Recurrent(kind, batch_first)
    dirs = 2 if model.rnn.bidirectional else 1
    width = 5 * dirs + 5 * model.layers * dirs
    x, t = _views(*Recurrent.inputs(5, width), augmult)
    assert_exact(model, x, t, [s * augmult for s in SIZES[sizes]], augmult=augmult, reduction=reduction)


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda k: k.__name__)
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layers_without_initial_state_are_exact(kind, batch_first):
    torch.manual_seed(seed_of(kind.__name__, batch_first, "zero state"))
    model = Recurrent(kind, batch_first, initial=False)
    dirs = 2 if model.rnn.bidirectional else 1
    x, t = _views(*Recurrent.inputs(5, 5 * dirs + 5 * model.layers * dirs), 2)
    assert_exact(model, x, t, [4, 6], augmult=2)


def test_recurrent_refusals_name_the_module_and_the_fix():
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [x.shape[1]] * x.shape[0], batch_first=True)
            return self.lstm(packed)[1][0][0]

    model = Packed()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"fastdp: lstm \(LSTM\): a PackedSequence input.*Pass the padded batch"):
        model(torch.randn(3, 5, 3))

    class Dropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True)

        def forward(self, x):
            return self.gru(x)[0]  # no initial state: torch's zeros

    dropout = Dropout()
    GradSampleEngine(dropout, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"fastdp: gru \(GRU\): dropout=0.5 between its layers.*dropout=0"):
        dropout(torch.randn(3, 5, 3))
    dropout.eval()
    dropout(torch.randn(3, 5, 3)).sum().backward()  # no dropout in eval mode: nothing to refuse


def test_single_input_rule_called_with_two_tensors_names_the_module():
    class TwoArgs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x, x)

    model = TwoArgs()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"fastdp: fc \(Linear\): its forward does not take this call"):
        model(torch.randn(2, 3))


class SeqFirst(nn.Module):
    """Position-wise layers fed (T, N, E), as inside nn.TransformerEncoderLayer(batch_first=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        h = self.ln(torch.tanh(self.fc(x.transpose(0, 1))))
        return h.transpose(0, 1).flatten(1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, 3, 4), torch.randn(n, 12)


@pytest.mark.parametrize("augmult", [1, 2])
def test_position_wise_layers_take_the_batch_in_dim_1(augmult):
    torch.manual_seed(seed_of("seq first", augmult))
    model = SeqFirst()
    x, t = _views(*SeqFirst.inputs(5), augmult)
    assert_exact(model, x, t, [2 * augmult, 3 * augmult], augmult=augmult)
    eng = GradSampleEngine(model, max_grad_norm=1.0, augmult=augmult)
    row_loss(model(x), t).mean().backward()
    (layout,) = eng.layouts.values()
    assert layout[(model.fc, 0)] == (Batched(augmult, dim=1),) and layout[(model.ln, 0)] == (Batched(augmult, dim=1),)


def test_fallback_output_with_the_batch_elsewhere_is_refused_not_broadcast():
    """A custom module returning (T, N, E): with T == N its dim 0 divides by the examples, and one example's (T, 1, E)
    output would broadcast against the wrong rows of the output gradient. It must be refused."""

    class SeqFirstOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):  # (N, T, E) -> (T, N, E)
            return (x * self.w).transpose(0, 1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = SeqFirstOut()

        def forward(self, x):
            return self.inner(x).transpose(0, 1).flatten(1)

    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GradSampleEngine(model, max_grad_norm=1.0)
    x = torch.randn(3, 3, 4)  # T == N == 3
    with pytest.raises(ValueError, match=r"SeqFirstOut run on one example returned an output of shape \(3, 1, 4\)"):
        model(x).square().sum().backward()
