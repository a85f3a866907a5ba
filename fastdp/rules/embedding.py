"""nn.Embedding and nn.EmbeddingBag: the per-example gradient scatters delta_t into the rows idx_t.

||G_i||^2 = sum_{t,s} [idx_t == idx_s] (delta_t . delta_s)  (ghost form: only colliding positions interact),
2 T'^2 D per example. The clipped sum scatter-adds the per-example-scaled delta (book-keeping).

EmbeddingBag (modes "sum" and "mean", 2-D input: one bag per row) is the same with one token per (bag, position):
token u of bag r carries delta_u = c_u delta_r, c_u its per_sample_weight ("sum"), 1 / (non-padding tokens of the
bag) ("mean"), 0 for padding_idx. A 1-D input with offsets packs the bags of all examples into one row, which no
provenance can split: refused, as is "max" (each output feature picks its own token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.binding import Binding, CallError, bind_call
from fastdp.engine.contributions import accum_dtype, mask_rows
from fastdp.engine.interface import Contribution
from fastdp.rules.base import LayerCall, Rule, register_rule


class EmbeddingBookKeeping(Contribution):
    def __init__(self, idx: torch.Tensor, d: torch.Tensor, num_embeddings: int, sq: torch.Tensor) -> None:
        self.idx, self.d, self.V, self.sq = idx, d, num_embeddings, sq  # idx (B, T'), d (B, T', D)

    def sq_norm(self) -> torch.Tensor:
        return self.sq

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        d = (self.d * w.to(self.d.dtype).view(-1, 1, 1)).flatten(0, 1)
        return torch.zeros(self.V, d.shape[1], dtype=d.dtype, device=d.device).index_add_(0, self.idx.flatten(), d)

    def instantiate(self) -> torch.Tensor:
        B, T, D = self.d.shape
        flat = self.idx + self.V * torch.arange(B, device=self.idx.device).view(-1, 1)
        out = torch.zeros(B * self.V, D, dtype=self.d.dtype, device=self.d.device)
        return out.index_add_(0, flat.flatten(), self.d.flatten(0, 1)).view(B, self.V, D)

    def drop(self, keep: torch.Tensor) -> None:
        self.d = mask_rows(self.d, keep)


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
        x = values["input"]
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or values["offsets"] is not None:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CallError(
                f"its input has shape {shape}{' with offsets' if values['offsets'] is not None else ''}: a 1-D input "
                "with offsets packs the bags of all examples into one row, which cannot be attributed to examples. "
                "Pass a 2-D (bags, bag_size) input, one bag per row (pad short bags with padding_idx)."
            )
        return b

    def compute(self, call: LayerCall, *inputs: torch.Tensor):
        m = call.module
        values = call.binding.values(m, inputs)
        idx, psw = values["input"], values["per_sample_weights"]
        out = F.embedding_bag(idx, m.weight, mode=m.mode, per_sample_weights=psw, padding_idx=m.padding_idx)
        return out, (idx,) if psw is None else (idx, psw)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor):
        m = call.module
        names = call.binding.names
        out = [None] * len(names)
        if len(saved) == 2:  # d out_r / d psw_rt = weight[idx_rt] (padding tokens take no part)
            idx, psw = saved
            g = torch.einsum("rtd,rd->rt", F.embedding(idx, m.weight.to(grad_out.dtype)), grad_out)
            if m.padding_idx is not None:
                g = g.masked_fill(idx == m.padding_idx, 0)
            out[names.index("per_sample_weights")] = g.to(psw.dtype)
        return tuple(out)

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        idx = saved[0]
        acc = accum_dtype(grad_out.dtype)
        keep = torch.ones_like(idx, dtype=acc) if m.padding_idx is None else (idx != m.padding_idx).to(acc)
        if len(saved) == 2:
            c = saved[1].to(acc) * keep
        elif m.mode == "mean":
            c = keep / keep.sum(1, keepdim=True).clamp_min(1)
        else:
            c = keep
        d = c.unsqueeze(-1) * grad_out.to(acc).unsqueeze(1)  # (rows, bag, D): each token's share of its bag's delta
        B = call.examples
        idx, d = idx.reshape(B, -1), d.reshape(B, -1, m.embedding_dim)
        return [(m.weight, EmbeddingBookKeeping(idx, d, m.num_embeddings, embedding_ghost_sq_norms(idx, d)))]
