"""nn.MultiheadAttention's rule and the transformer layers built on it, against the float64 per-example loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_exact, row_loss, seed_of
from torch import nn

from fastdp.engine import GradSampleEngine

E, H, L, S = 8, 2, 5, 4
SIZES = {"one": [5], "several": [2, 3]}

#: MultiheadAttention configurations: packed / separate projections, self / cross attention, masks, extra keys
CONFIGS = {
    "self": dict(batch_first=True, need_weights=True),
    "self_seq_first_padding": dict(batch_first=False, padding=True),
    "cross_separate_kv_zero_attn": dict(kdim=6, vdim=3, cross=True, bias_kv=True, zero_attn=True, causal=True),
    "cross_packed_3d_mask": dict(cross=True, mask3d=True, need_weights=True, average=False),
    "no_bias_causal_hint": dict(bias=False, causal=True, is_causal=True, padding=True),
}


class Attention(nn.Module):
    """x (N, L, E) -> MultiheadAttention -> per-example output; key/value from a Linear of x (cross attention)."""

    def __init__(self, batch_first=True, kdim=None, vdim=None, cross=False, bias=True, bias_kv=False,
                 zero_attn=False, need_weights=False, average=True, padding=False, causal=False, is_causal=False,
                 mask3d=False) -> None:  # fmt: skip
        super().__init__()
        self.mha = nn.MultiheadAttention(
            E, H, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim, vdim=vdim,
            batch_first=batch_first,
        )  # fmt: skip
        self.mem_k = nn.Linear(E, kdim or E) if cross else None
        self.mem_v = nn.Linear(E, vdim or E) if cross and (kdim or vdim) else None
        self.cfg = dict(batch_first=batch_first, cross=cross, need_weights=need_weights, average=average,
                        padding=padding, causal=causal, is_causal=is_causal, mask3d=mask3d)  # fmt: skip

    def forward(self, x):
        c = self.cfg
        n = x.shape[0]
        q = x
        if c["cross"]:
            mem = torch.tanh(x[:, :S])
            k = self.mem_k(mem)
            v = self.mem_v(mem) if self.mem_v is not None else k
        else:
            k = v = x
        s = k.shape[1]
        kwargs = {"need_weights": c["need_weights"], "average_attn_weights": c["average"]}
        if c["padding"]:  # per example: keys whose first feature is large are padding (never the first key)
            pad = k[..., 0] > 0.8
            pad[:, 0] = False
            kwargs["key_padding_mask"] = pad
        if c["causal"]:
            kwargs["attn_mask"] = torch.triu(torch.full((L, s), float("-inf")), 1)
            kwargs["is_causal"] = c["is_causal"]
        if c["mask3d"]:  # a float mask per example and head, from the data
            m = 0.3 * torch.tanh(q[..., :1] @ k[..., :1].transpose(1, 2))
            kwargs["attn_mask"] = m.repeat_interleave(H, 0)
        if not c["batch_first"]:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, weights = self.mha(q, k, v, **kwargs)
        out = out if c["batch_first"] else out.transpose(0, 1)
        parts = [out.flatten(1)]
        if weights is not None:
            parts.append(weights.reshape(n, -1))
        return torch.cat(parts, 1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, L, E), torch.randn(n, 10 * L * E)


def _views(x, t, augmult):
    x, t = x.repeat_interleave(augmult, 0), t.repeat_interleave(augmult, 0)
    if augmult > 1:
        x[1::augmult] += 0.3 * torch.randn_like(x[1::augmult])
    return x, t


def _targets(model, x, t):
    with torch.no_grad():
        width = model(x[:1]).shape[1]
    return t[:, :width]


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multihead_attention_is_exact(config, sizes, augmult, reduction):
    torch.manual_seed(seed_of(config, sizes, augmult, reduction))
    model = Attention(**CONFIGS[config])
    x, t = Attention.inputs(5)
    x, t = _views(x, _targets(model, x, t), augmult)
    plans = assert_exact(model, x, t, [s * augmult for s in SIZES[sizes]], augmult=augmult,
                         reduction=reduction)  # fmt: skip
    assert "mha" in plans, "MultiheadAttention ran its own rule"


@pytest.mark.parametrize("strategy", ["ghost", "keep", "instantiate_bk"])
@pytest.mark.parametrize("config", ["self", "cross_separate_kv_zero_attn"])
def test_multihead_attention_forced_strategy_runs_and_is_exact(strategy, config):
    torch.manual_seed(seed_of(strategy, config))
    model = Attention(**CONFIGS[config])
    x, t = Attention.inputs(6)
    t = _targets(model, x, t)
    plans = assert_exact(model, x, t, [4, 2], strategy=strategy)
    assert plans["mha"] == strategy


def test_multihead_attention_needs_no_fallback_and_keeps_state_dict_keys():
    model = Attention(**CONFIGS["cross_separate_kv_zero_attn"])
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns: none may
        eng = GradSampleEngine(model, max_grad_norm=1.0)
    x, t = Attention.inputs(3)
    row_loss(model(x), _targets(model, x, t)).mean().backward()
    assert list(model.state_dict()) == keys
    assert model.mha.out_proj not in eng.plans and model.mha in eng.plans  # out_proj runs inside the rule


def test_is_causal_without_a_mask_is_refused_by_name():
    class Hint(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, is_causal=True, need_weights=False)[0]

    model = Hint()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"fastdp: attn \(MultiheadAttention\): is_causal=True.*causal mask"):
        model(torch.randn(3, L, E))


def test_unbatched_query_is_refused_by_name():
    model = nn.Sequential(nn.MultiheadAttention(E, H))
    model.forward = lambda x: model[0](x, x, x)[0]
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"fastdp: 0 \(MultiheadAttention\): its query has shape \(5, 8\)"):
        model(torch.randn(5, E))


# ----------------------------------------------------------------------------------------------- transformers


class Encoder(nn.Module):
    """nn.TransformerEncoder of two layers, a causal mask and key padding from the data; batch in dim 1 inside when
    batch_first=False."""

    def __init__(self, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, activation="gelu", batch_first=batch_first,
                                           norm_first=norm_first)  # fmt: skip
        # nested tensors (the default) are a no-grad fast path: the engine's probe turns it off, training never takes it
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(E, 3)
        self.batch_first = batch_first

    def forward(self, x):
        pad = x[..., 0] > 0.8
        pad[:, 0] = False
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.enc(h, mask=mask, src_key_padding_mask=pad, is_causal=True)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h).flatten(1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, L, E), torch.randn(n, 3 * L)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mem = nn.Linear(E, E)
        self.dec = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.dec(x, torch.tanh(self.mem(x[:, :S])), tgt_mask=mask, tgt_is_causal=True)
        return self.head(h).flatten(1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, L, E), torch.randn(n, 3 * L)


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0,
                                batch_first=True)  # fmt: skip
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        src, tgt = x[:, :S], x[:, S - 1 :]
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.head(self.t(src, tgt, tgt_mask=mask)).flatten(1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, L + 2, E), torch.randn(n, 3 * (L + 3 - S))


TRANSFORMERS = {
    "encoder": lambda: Encoder(True, False),
    "encoder_seq_first_norm_first": lambda: Encoder(False, True),
    "decoder": Decoder,
    "transformer": Seq2Seq,
}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_transformer_layers_train_exactly(name, sizes, augmult, reduction):
    torch.manual_seed(seed_of(name, sizes, augmult, reduction))
    model = TRANSFORMERS[name]()
    x, t = type(model).inputs(5)
    x, t = _views(x, t, augmult)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own UserWarnings about nested tensors
        plans = assert_exact(model, x, t, [s * augmult for s in SIZES[sizes]], augmult=augmult, reduction=reduction)
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert attention and all(n in plans for n in attention)


def test_mask_whose_rows_match_the_batch_by_chance_is_shared():
    """A (4, 4) zero mask with micro-batches of 2 then 4 examples: its rows fit 2 per example and do not move with
    the examples, so the probe cannot tell it from per-example copies; a mask is never split, so it is shared and
    the second micro-batch (4 examples) is not refused."""

    class ZeroMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, attn_mask=torch.zeros(4, 4), need_weights=False)[0].flatten(1)

    torch.manual_seed(43)
    model = ZeroMask()
    x, t = torch.randn(6, 4, E), torch.randn(6, 4 * E)
    assert_exact(model, x, t, [2, 4])


def test_attention_called_twice_sums_its_per_example_gradients():
    """One MultiheadAttention used for self- then cross-attention: its packed weight gets a full GEMM and a stack of
    row blocks, added per example before the norm."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True)
            self.mem = nn.Linear(E, E)

        def forward(self, x):
            h = self.mha(x, x, x, need_weights=False)[0]
            m = self.mem(x[:, :S])
            return self.mha(torch.tanh(h), m, m, need_weights=False)[0].flatten(1)

    torch.manual_seed(44)
    model = Twice()
    x, t = torch.randn(6, L, E), torch.randn(6, L * E)
    x, t = _views(x, t, 2)
    assert_exact(model, x, t, [4, 8], augmult=2)


def test_attention_is_planned_once_for_every_micro_batch_size(monkeypatch):
    """The plan of a layer with several inputs is keyed by their shapes without the batch (Poisson batches vary)."""
    from fastdp.rules import rule_for

    torch.manual_seed(45)
    model = Attention(**CONFIGS["cross_separate_kv_zero_attn"])
    eng = GradSampleEngine(model, max_grad_norm=1.0)
    rule = rule_for(model.mha)
    planned = []
    original = rule.strategies
    monkeypatch.setattr(rule, "strategies", lambda *a, **k: planned.append(1) or original(*a, **k))
    for n in (4, 3, 5):
        x, t = Attention.inputs(n)
        row_loss(model(x), _targets(model, x, t)).mean().backward()
    assert len(planned) == 1 and model.mha in eng.plans


def test_attention_frozen_after_wrapping_is_not_attributed_or_refused():
    """A layer frozen after the engine wrapped it needs no per-example gradient: neither the probe nor the forward
    takes its call apart (here one the rule would refuse: 2-D queries shared by every example)."""
    from conftest import reduce_rows, reference, split

    class Queries(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(E, H)
            self.queries = nn.Parameter(torch.randn(L, E), requires_grad=False)
            self.fc = nn.Linear(E, 3)

        def forward(self, x):
            pooled = self.mha(self.queries, self.queries, self.queries)[0].mean(0)  # (E,): no batch at all
            return self.fc(x + pooled).flatten(1)

    torch.manual_seed(46)
    model = Queries()
    plain = copy.deepcopy(model).requires_grad_(False)  # the oracle runs on an unwrapped copy
    plain.fc.requires_grad_(True)
    eng = GradSampleEngine(model, max_grad_norm=0.5)
    model.mha.requires_grad_(False)
    x, t = torch.randn(5, L, E), torch.randn(5, 3 * L)
    for xs, ts in split(x, t, [2, 3]):
        reduce_rows(row_loss(model(xs), ts), "mean").backward()
    summed, _ = eng.pop()
    ref, _ = reference(plain, x, t, max_grad_norm=0.5)
    assert set(ref) == {"fc.weight", "fc.bias"}
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-6)
