"""Vision Transformer in timm's layout (``VisionTransformer``, ViT-S/16 by default widths), patch 4 for 32x32 inputs.

Patch embedding conv (``patch_embed.proj``), ``cls_token`` (1, 1, D) and ``pos_embed`` (1, 1 + tokens, D) as
parameters of the root, pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with a LayerNorm each,
attention from one ``qkv`` Linear and a ``proj`` Linear, an MLP ``fc1`` -> GELU -> ``fc2``, a final LayerNorm and a
``head`` on the class token. State-dict keys are timm's (``blocks.0.attn.qkv.weight``, ...).

Every layer has a fast exact rule (Conv2d, LayerNorm, Linear); the root's own ``cls_token`` and ``pos_embed`` get
theirs through fastdp.engine.owned_params (the expand and the broadcast add are split per example), so no part of
the model goes through the torch.func fallback. Parameters of ViT-S (D 384, depth 12, 6 heads, MLP 4x) at patch 4 and
32x32 with 10 classes: 21,342,346.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention from a packed ``qkv`` Linear and an output ``proj`` Linear."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width {dim} is not a multiple of the {heads} heads")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token (timm's ``VisionTransformer`` with ``class_token=True``, ``global_pool="token"``).

    Args:
        num_classes: outputs of the head.
        in_channels: input channels.
        image_size: side of the square input images.
        patch: side of the square patches (the patch embedding's kernel and stride).
        dim: token width D.
        depth: transformer blocks.
        heads: attention heads (D must be a multiple).
        mlp_ratio: hidden width of the MLP over D.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, tokens, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> VisionTransformer:
    """ViT-S's widths (D 384, depth 12, 6 heads) at patch 4: timm's ``vit_small_patch16_224`` layout for 32x32.

    Args:
        num_classes: outputs of the head.
        in_channels: input channels.
        image_size: side of the square input images (a multiple of ``patch``).
        **kwargs: ``patch``, ``dim``, ``depth``, ``heads``, ``mlp_ratio`` (tests build tiny ones).
    """
    return VisionTransformer(num_classes, in_channels, image_size, **kwargs)


def vit_mini(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs) -> VisionTransformer:
    """A few-second ViT for the embedded digits check: D 64, depth 4, 4 heads, MLP 2x, patch 4 (an 8x8 digit is 4
    patches and the class token). Same layout as :func:`vit`; ``kwargs`` override the widths."""
    widths = {"dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, **kwargs}
    return VisionTransformer(num_classes, in_channels, image_size, **widths)
