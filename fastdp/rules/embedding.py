"""nn.Embedding and nn.EmbeddingBag: the per-example gradient scatters delta_t into the rows idx_t.

||G_i||^2 = sum_{t,s} [idx_t == idx_s] (delta_t . delta_s)  (ghost form: only colliding positions interact),
2 T'^2 D per example. The clipped sum scatter-adds the per-example-scaled delta (book-keeping).

EmbeddingBag (modes "sum" and "mean", 2-D input: one bag per row) is the same with one token per (bag, position):
token u of bag r carries delta_u = c_u delta_r, c_u its per_sample_weight ("sum"), 1 / (non-padding tokens of the
bag) ("mean"), 0 for padding_idx. A 1-D input with offsets is taken when its tokens are example-major (the probe
sees that) and the offsets give every example the same number of bags within its own tokens; otherwise a bag would
mix examples and it is refused, as is "max" (each output feature picks its own token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.binding import Binding, CallError, bind_call
from fastdp.engine.contributions import accum_dtype, zero_dropped
from fastdp.engine.interface import Contribution
from fastdp.rules.base import LayerCall, Rule, register_rule


class EmbeddingBookKeeping(Contribution):
    def __init__(self, idx: torch.Tensor, d: torch.Tensor, num_embeddings: int, sq: torch.Tensor) -> None:
        self.idx, self.d, self.V, self.sq = idx, d, num_embeddings, sq  # idx (B, T'), d (B, T', D)

    def sq_norm(self) -> torch.Tensor:
        return self.sq

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        (d,) = zero_dropped(w, self.d, scaled=1)  # a dropped example's rows are exact zeros, even where NaN
        d = d.flatten(0, 1)
        return torch.zeros(self.V, d.shape[1], dtype=d.dtype, device=d.device).index_add_(0, self.idx.flatten(), d)

    def instantiate(self) -> torch.Tensor:
        B, T, D = self.d.shape
        flat = self.idx + self.V * torch.arange(B, device=self.idx.device).view(-1, 1)
        out = torch.zeros(B * self.V, D, dtype=self.d.dtype, device=self.d.device)
        return out.index_add_(0, flat.flatten(), self.d.flatten(0, 1)).view(B, self.V, D)


def embedding_ghost_sq_norms(idx: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_{t,s} [idx_t == idx_s] (d_t . d_s) per example, for idx (B, T'), d (B, T', D)."""
    same = idx.unsqueeze(2) == idx.unsqueeze(1)
    return (torch.bmm(d, d.transpose(1, 2)) * same).sum((1, 2))


def _refuse_data_dependent(module: nn.Embedding | nn.EmbeddingBag) -> None:
    name = type(module).__name__
    if module.max_norm is not None:
        raise ValueError(
            f"fastdp: nn.{name}(max_norm=...) renormalises looked-up rows in place from the data; this is "
            "not a differentiable, per-example function of the weights. Use max_norm=None."
        )
    if module.scale_grad_by_freq:
        raise ValueError(
            f"fastdp: nn.{name}(scale_grad_by_freq=True) scales gradients by counts over the whole batch, "
            "which mixes examples. Use scale_grad_by_freq=False."
        )
    if module.sparse:
        raise ValueError(f"fastdp: nn.{name}(sparse=True) is not supported; DP noise makes the gradient dense.")


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    def check(self, module: nn.Embedding) -> None:
        _refuse_data_dependent(module)

    def compute(self, call: LayerCall, idx: torch.Tensor):
        m = call.module
        if idx.dim() < 1:
            raise ValueError(f"fastdp needs a batch dimension: Embedding got indices of shape {tuple(idx.shape)}")
        return F.embedding(idx, m.weight, m.padding_idx), (idx,)

    def grad_input(self, call, saved, grad_out):
        return None

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        (idx,) = saved
        B = idx.shape[0] // augmult
        D = m.embedding_dim
        idx = idx.reshape(B, -1)
        d = grad_out.to(accum_dtype(grad_out.dtype)).reshape(B, -1, D)
        if m.padding_idx is not None:
            d = d * (idx != m.padding_idx).unsqueeze(-1)
        return [(m.weight, EmbeddingBookKeeping(idx, d, m.num_embeddings, embedding_ghost_sq_norms(idx, d)))]


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(Rule):
    def check(self, module: nn.EmbeddingBag) -> None:
        _refuse_data_dependent(module)
        if module.mode not in ("sum", "mean"):
            raise ValueError(
                f"fastdp: nn.EmbeddingBag(mode={module.mode!r}) has no rule (each output feature picks its own token). "
                "Use mode='sum' or 'mean'."
            )

    def bind(self, module: nn.EmbeddingBag, args: tuple, kwargs: dict) -> Binding:
        b = bind_call(module, args, kwargs, not_data=("offsets",))
        values = b.values(module, b.tensors)
        x, offsets = values["input"], values["offsets"]
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2) or (x.dim() == 1) != (offsets is not None):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CallError(
                f"its input has shape {shape}{' with offsets' if offsets is not None else ''}; fastdp takes a 2-D "
                "(bags, bag_size) input, one bag per row, or a 1-D input with offsets whose bags each lie within one "
                "example's tokens."
            )
        return b

    def compute(self, call: LayerCall, *inputs: torch.Tensor):
        m = call.module
        values = call.binding.values(m, inputs)
        idx, offsets, psw = values["input"], values["offsets"], values["per_sample_weights"]
        out = F.embedding_bag(idx, m.weight, offsets, mode=m.mode, per_sample_weights=psw, padding_idx=m.padding_idx,
                              include_last_offset=m.include_last_offset)  # fmt: skip
        tokens, bags = idx.flatten(), _bag_of_tokens(call, idx, offsets)
        call.info["psw_shape"] = None if psw is None else psw.shape
        return out, (tokens, bags) if psw is None else (tokens, bags, psw.flatten())

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor):
        m = call.module
        names = call.binding.names
        out = [None] * len(names)
        if len(saved) == 3:  # d out_bag / d psw_u = weight[idx_u] (padding tokens take no part)
            tokens, bags, psw = saved
            g = torch.linalg.vecdot(F.embedding(tokens, m.weight.to(grad_out.dtype)), grad_out[bags])
            if m.padding_idx is not None:
                g = g.masked_fill(tokens == m.padding_idx, 0)
            out[names.index("per_sample_weights")] = g.to(psw.dtype).view(call.info["psw_shape"])
        return tuple(out)

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        tokens, bags = saved[:2]
        acc = accum_dtype(grad_out.dtype)
        keep = torch.ones_like(tokens, dtype=acc) if m.padding_idx is None else (tokens != m.padding_idx).to(acc)
        if len(saved) == 3:
            c = saved[2].to(acc) * keep
        elif m.mode == "mean":
            count = torch.zeros(grad_out.shape[0], dtype=acc, device=keep.device).index_add_(0, bags, keep)
            c = keep / count.clamp_min(1)[bags]
        else:
            c = keep
        d = c.unsqueeze(-1) * grad_out.to(acc)[bags]  # each token's share of its bag's delta
        B = call.examples  # tokens are example-major (_bag_of_tokens checked it for 1-D input)
        tokens, d = tokens.reshape(B, -1), d.reshape(B, -1, m.embedding_dim)
        return [(m.weight, EmbeddingBookKeeping(tokens, d, m.num_embeddings, embedding_ghost_sq_norms(tokens, d)))]


def _bag_of_tokens(call: LayerCall, idx: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """The bag (output row) of every token. A 1-D input's tokens are example-major (the probe found m per example);
    its bags, set by offsets, must each lie within one example's tokens and be as many per example, else a bag's
    gradient would mix examples."""
    if offsets is None:
        return torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
    starts = offsets[:-1] if call.module.include_last_offset else offsets
    bags = torch.bucketize(torch.arange(idx.shape[0], device=idx.device), starts, right=True) - 1
    B, m = call.examples, call.input_rows[call.binding.names.index("input")]
    per = starts.shape[0] // B
    if m is None or starts.shape[0] % B or not torch.equal(torch.arange(idx.shape[0], device=idx.device) // m,
                                                           bags // max(per, 1)):  # fmt: skip
        raise CallError(
            f"its offsets make {starts.shape[0]} bags over {idx.shape[0]} tokens whose bags do not map to the "
            f"{B} examples of the micro-batch ({m} tokens each): a bag holding tokens of several examples mixes them. "
            "Give every example the same number of bags, each within its own tokens, or pass a 2-D (bags, bag_size) "
            "input."
        )
    return bags
