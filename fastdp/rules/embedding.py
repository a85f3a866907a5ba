"""nn.Embedding: the per-example gradient scatters delta_t into the rows idx_t.

||G_i||^2 = sum_{t,s} [idx_t == idx_s] (delta_t . delta_s)  (ghost form: only colliding positions interact),
2 T'^2 D per example. The clipped sum scatter-adds the per-example-scaled delta (book-keeping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.contributions import accum_dtype, scale_rows
from fastdp.engine.interface import Contribution
from fastdp.rules.base import LayerCall, Rule, register_rule


class EmbeddingBookKeeping(Contribution):
    def __init__(self, idx: torch.Tensor, d: torch.Tensor, num_embeddings: int, sq: torch.Tensor) -> None:
        self.idx, self.d, self.V, self.sq = idx, d, num_embeddings, sq  # idx (B, T'), d (B, T', D)

    def sq_norm(self) -> torch.Tensor:
        return self.sq

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        d = scale_rows(self.d, w).flatten(0, 1)  # a dropped example's rows are exact zeros, even where they were NaN
        return torch.zeros(self.V, d.shape[1], dtype=d.dtype, device=d.device).index_add_(0, self.idx.flatten(), d)

    def instantiate(self) -> torch.Tensor:
        B, T, D = self.d.shape
        flat = self.idx + self.V * torch.arange(B, device=self.idx.device).view(-1, 1)
        out = torch.zeros(B * self.V, D, dtype=self.d.dtype, device=self.d.device)
        return out.index_add_(0, flat.flatten(), self.d.flatten(0, 1)).view(B, self.V, D)


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    def check(self, module: nn.Embedding) -> None:
        if module.max_norm is not None:
            raise ValueError(
                "fastdp: nn.Embedding(max_norm=...) renormalises looked-up rows in place from the data; this is "
                "not a differentiable, per-example function of the weights. Use max_norm=None."
            )
        if module.scale_grad_by_freq:
            raise ValueError(
                "fastdp: nn.Embedding(scale_grad_by_freq=True) scales gradients by counts over the whole batch, "
                "which mixes examples. Use scale_grad_by_freq=False."
            )
        if module.sparse:
            raise ValueError("fastdp: nn.Embedding(sparse=True) is not supported; DP noise makes the gradient dense.")

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
        same = idx.unsqueeze(2) == idx.unsqueeze(1)
        sq = (torch.bmm(d, d.transpose(1, 2)) * same).sum((1, 2))
        return [(m.weight, EmbeddingBookKeeping(idx, d, m.num_embeddings, sq))]
