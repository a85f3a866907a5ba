"""Models by name: ``build_model("wrn-16-4", num_classes=10)``."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from fastdp.models.digits_cnn import digits_cnn
from fastdp.models.gpt import gpt
from fastdp.models.nfnet import nf_resnet50, nfnet
from fastdp.models.smoothnet import smoothnet_v1
from fastdp.models.vit import vit, vit_mini
from fastdp.models.wrn import wrn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "wrn-16-4": lambda num_classes, **kw: wrn(16, 4, num_classes, **kw),
    "wrn-40-4": lambda num_classes, **kw: wrn(40, 4, num_classes, **kw),
    "smoothnet_v1": smoothnet_v1,
    "nf_resnet50": nf_resnet50,
    **{f"nfnet-f{k}": (lambda num_classes, k=k, **kw: nfnet(f"F{k}", num_classes, **kw)) for k in range(4)},
    "digits_cnn": digits_cnn,
    "vit-s": vit,
    "vit-mini": vit_mini,
    "gpt-lm": gpt,
}
#: models whose parameters depend on the input images' side (a ViT's position embedding): build_model passes it on
_SIZED = frozenset({"vit-s", "vit-mini"})

#: the names build_model knows (plus any "wrn-<depth>-<width>")
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
#: the image classifiers among them (what fastdp-train trains); gpt-lm is a language model over token ids
IMAGE_MODEL_NAMES: tuple[str, ...] = tuple(n for n in MODEL_NAMES if n != "gpt-lm")

_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")


def build_model(name: str, num_classes: int, image_size: int | None = None, **kwargs) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of ``MODEL_NAMES`` ("wrn-16-4", "wrn-40-4", "smoothnet_v1", "nf_resnet50", "nfnet-f0" ..
            "nfnet-f3", "digits_cnn", "vit-s", "vit-mini", "gpt-lm") or any "wrn-<depth>-<width>" (depth = 6 n + 4).
            Case-insensitive.
        num_classes: outputs of the model (the vocabulary of "gpt-lm").
        image_size: side of the square input images, for the models whose parameters depend on it (the ViTs: their
            position embedding; default 32); the convolutional models take any size and ignore it.
        **kwargs: passed to the model's constructor (e.g. ``in_channels``, ``drop_path_rate``, a ViT's ``patch``).

    Returns:
        The model, freshly initialised.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    key = name.lower()
    if key in _SIZED and image_size is not None:
        kwargs["image_size"] = image_size
    if key in _BUILDERS:
        return _BUILDERS[key](num_classes=num_classes, **kwargs)
    m = _WRN.match(key)
    if m:
        return wrn(int(m.group(1)), int(m.group(2)), num_classes, **kwargs)
    raise ValueError(
        f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}, or wrn-<depth>-<width> (e.g. wrn-28-10)"
    )
