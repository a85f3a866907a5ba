"""Batched data augmentation on the training device: augmult views, random crops of the reflect-padded image, flips.

With augmult K every example brings K independently augmented views, example-major (rows ``i*K .. i*K+K-1`` are
example i's), and DP-SGD clips the mean of an example's K view gradients (De et al. 2022): the views are one
example for privacy, so K costs compute but no privacy. The whole batch is augmented by a few gathers, with no
Python loop over examples or views, on the CPU or the GPU where the batch already is.

A crop is taken from the image padded by ``p`` pixels on each side by reflection (``F.pad(mode="reflect")``: the
edge pixel is not repeated) at a uniform offset in ``[0, 2p]`` per axis, back to ``H x W``. The padded image is
never built: each output row and column index is mapped straight into the original image by reflecting it at the
borders, so the cost is that of reading ``H x W`` pixels per view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

Stats = Sequence[float] | torch.Tensor

__all__ = ["AugmentParams", "augment", "normalize", "to_float"]


class AugmentParams(NamedTuple):
    """The random draws of one :func:`augment` call, one entry per output view (``n * augmult`` of them).

    Attributes:
        top: int64, row of the crop's top-left corner in the padded image, in ``[0, 2 * crop_padding]``.
        left: int64, column of the crop's top-left corner in the padded image, in ``[0, 2 * crop_padding]``.
        flip: bool, whether the cropped view is flipped horizontally (left-right).
    """

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor


def to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixels as floats in [0, 1]: uint8 is divided by 255, floating-point input is returned unchanged.

    Args:
        x: uint8 pixels (0..255) or floating-point pixels already in [0, 1].
        dtype: floating dtype for uint8 input.

    Returns:
        A floating-point tensor of the same shape, on the same device.
    """
    if x.dtype == torch.uint8:
        return x.to(dtype).div_(255)
    if x.is_floating_point():
        return x
    raise TypeError(
        f"pixels must be uint8 (0..255) or floating point (0..1), got {x.dtype}; convert with x.to(torch.uint8) "
        "if they are 0..255 integers."
    )


def normalize(x: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """``(x - mean) / std`` per channel of images ``(..., C, H, W)``; uint8 input goes through :func:`to_float` first.

    Args:
        x: images, uint8 or floating point in [0, 1], channels at dim -3.
        mean: C per-channel means (e.g. ``dataset.mean``).
        std: C per-channel standard deviations (e.g. ``dataset.std``), positive.

    Returns:
        A new floating-point tensor of the same shape.
    """
    x = to_float(x)
    if x.dim() < 3:
        raise ValueError(f"normalize needs images of shape (..., C, H, W), got shape {tuple(x.shape)}.")
    c = x.shape[-3]
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).flatten()
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).flatten()
    if m.numel() != c or s.numel() != c:
        raise ValueError(
            f"mean and std need one value per channel: the images have C={c} (dim -3 of shape {tuple(x.shape)}), "
            f"got {m.numel()} means and {s.numel()} stds."
        )
    return (x - m.view(c, 1, 1)) / s.view(c, 1, 1)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Maps indices in ``[-(size-1), 2*(size-1)]`` into ``[0, size)`` by reflection without repeating the edge
    (-1 -> 1, size -> size-2), i.e. the index an image reflect-padded by F.pad reads from."""
    return (size - 1) - ((size - 1) - i.abs()).abs()


def _draw(views: int, pad: int, flip: bool, generator: torch.Generator | None, device: torch.device) -> AugmentParams:
    """Draws top, left (uniform in [0, 2*pad]) and flip (Bernoulli(1/2)) per view, in that order."""
    if pad > 0:
        top = torch.randint(0, 2 * pad + 1, (views,), generator=generator, device=device)
        left = torch.randint(0, 2 * pad + 1, (views,), generator=generator, device=device)
    else:
        top = left = torch.zeros(views, dtype=torch.long, device=device)
    if flip:
        flips = torch.randint(0, 2, (views,), generator=generator, device=device).bool()
    else:
        flips = torch.zeros(views, dtype=torch.bool, device=device)
    return AugmentParams(top, left, flips)


def _apply(x: torch.Tensor, augmult: int, params: AugmentParams, pad: int) -> torch.Tensor:
    """The views of ``x`` (n, C, H, W) described by ``params``, as floats of shape (n * augmult, C, H, W)."""
    n, c, h, w = x.shape
    views = n * augmult
    dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
    out = torch.empty((views, c, h, w), dtype=dtype, device=x.device)
    if views == 0:
        return out
    dev = x.device
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    # Source row and column in the original image of each output pixel, per view. A flip reverses the crop's
    # columns, so it is folded into the column index and costs nothing.
    rows = _reflect(params.top[:, None] - pad + ar_h, h)  # (views, h)
    cols = torch.where(params.flip[:, None], (w - 1) - ar_w, ar_w)
    cols = _reflect(params.left[:, None] - pad + cols, w)  # (views, w)
    example = torch.arange(views, device=dev) // augmult  # example-major: view v shows example v // K

    # Separable gather in the input dtype (uint8: 4x less traffic), channels first so that both steps index
    # one dim: rows of each view's example, then per-view columns through a stride-0 expanded index.
    xc = x.transpose(0, 1).reshape(c, n * h, w)
    picked = xc.index_select(1, (example[:, None] * h + rows).flatten()).view(c, views, h, w)
    picked = picked.gather(3, cols.view(1, views, 1, w).expand(c, views, h, w))
    out.copy_(picked.transpose(0, 1))
    if x.dtype == torch.uint8:
        out.div_(255)  # the same operation as to_float, so a view without crop or flip equals to_float(x) exactly
    return out


def augment(
    x: torch.Tensor,
    augmult: int,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, AugmentParams]:
    """``augmult`` randomly cropped and flipped views of every image, example-major, as floats in [0, 1].

    View ``v`` (rows ``i*K + k``, ``k < K``, belong to example ``i``) is the ``H x W`` crop at offset
    ``(top[v], left[v])`` of example ``v // K`` reflect-padded by ``crop_padding`` pixels on each side, flipped
    left-right if ``flip[v]``. Offsets are uniform in ``[0, 2 * crop_padding]`` and flips Bernoulli(1/2), all
    independent; ``crop_padding=0`` takes no crop and ``flip=False`` no flip (and neither draws random numbers).

    Args:
        x: images of shape ``(n, C, H, W)``, uint8 (0..255) or floating point (0..1), on any device; n may be 0.
        augmult: views per example K, >= 1.
        crop_padding: reflection padding p on each side, ``0 <= p < min(H, W)``.
        flip: draw random horizontal flips.
        generator: a ``torch.Generator`` on ``x``'s device for reproducible draws; default the global RNG of
            that device. Draw order: all tops, all lefts, all flips.
        return_params: also return the draws.

    Returns:
        Views of shape ``(n * K, C, H, W)``: float32 for uint8 input, else ``x``'s dtype; with
        ``return_params=True`` the pair ``(views, AugmentParams)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"augment needs a batch of images of shape (n, C, H, W), got {shape}.")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"augment needs uint8 (0..255) or floating-point (0..1) pixels, got {x.dtype}.")
    if isinstance(augmult, bool) or int(augmult) != augmult or augmult < 1:
        raise ValueError(f"augmult must be an integer >= 1 (views per example), got {augmult!r}.")
    h, w = x.shape[-2:]
    if isinstance(crop_padding, bool) or int(crop_padding) != crop_padding or not 0 <= crop_padding < min(h, w):
        raise ValueError(
            f"crop_padding must be an integer in [0, min(H, W)) = [0, {min(h, w)}) for reflection padding of "
            f"{h}x{w} images, got {crop_padding!r}."
        )
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the images are on {x.device}; make the generator on the "
            f"images' device: torch.Generator(device={str(x.device)!r}).manual_seed(seed)."
        )
    augmult, pad = int(augmult), int(crop_padding)
    params = _draw(x.shape[0] * augmult, pad, flip, generator, x.device)
    if pad == 0 and not flip:
        views = to_float(x).repeat_interleave(augmult, dim=0)
    else:
        views = _apply(x, augmult, params, pad)
    return (views, params) if return_params else views
