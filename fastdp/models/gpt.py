"""A small GPT-style language model in nanoGPT's layout (GPT-2's module names, nn.Linear for its Conv1D).

Token and position embeddings (``transformer.wte``, ``transformer.wpe``; the positions ``torch.arange(t)`` are shared
by every example, which the engine's provenance probe finds), pre-norm blocks with causal attention from a packed
``c_attn`` Linear and a ``c_proj`` Linear, an MLP ``c_fc`` -> GELU -> ``c_proj``, a final LayerNorm ``ln_f`` and an
``lm_head`` whose weight is the token embedding's (tied): that parameter gets the per-example sum of its Embedding
and Linear contributions before the norm. Every layer has a fast exact rule.

The output is the next-token logits (B, T, vocab). Defaults: vocab 256 (bytes), context 128, width 256, 4 blocks of
4 heads: 3,257,856 parameters.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width {dim} is not a multiple of the {heads} heads")
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, d))


class GPTMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = GPTMlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer LM.

    Args:
        vocab_size: tokens (the logits' width).
        context: longest sequence (rows of the position embedding).
        dim: width.
        depth: blocks.
        heads: attention heads (``dim`` must be a multiple).
        tie_embeddings: the output layer reuses the token embedding's weight (GPT-2).
        expand_positions: feed the position embedding ``arange(t)`` copied to (B, t) instead of the (t,) that every
            example shares (the same function; Opacus' hooks need a batch dimension there and its ghost clipping a
            contiguous one; fastdp takes either).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 128,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        tie_embeddings: bool = True,
        expand_positions: bool = False,
    ) -> None:
        super().__init__()
        self.context, self.expand_positions = context, expand_positions
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab_size, dim)
        self.transformer.wpe = nn.Embedding(context, dim)
        self.transformer.h = nn.Sequential(*(GPTBlock(dim, heads) for _ in range(depth)))
        self.transformer.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"a sequence of {t} tokens is longer than the model's context of {self.context}")
        tr = self.transformer
        pos = torch.arange(t, device=idx.device)
        x = tr.wte(idx) + tr.wpe(pos.expand(idx.shape[0], t).contiguous() if self.expand_positions else pos)
        return self.lm_head(tr.ln_f(tr.h(x)))


def gpt(num_classes: int = 256, **kwargs) -> GPT:
    """The small GPT-style LM; ``num_classes`` is its vocabulary (the outputs per position).

    Args:
        num_classes: vocabulary size.
        **kwargs: ``context``, ``dim``, ``depth``, ``heads``, ``tie_embeddings``, ``expand_positions``.
    """
    return GPT(num_classes, **kwargs)
