"""Load timm's published weights for ``nf_resnet50`` and ``dm_nfnet_f0``..``dm_nfnet_f6`` from a local file into
fastdp's ``NormFreeNet`` (``fastdp.models.nf_resnet50`` / ``fastdp.models.nfnet``). Nothing is downloaded: fetch the
file yourself (timm's release assets, e.g. ``dm_nfnet_f0-604f9c3a.pth``, or the Hugging Face hub's
``timm/dm_nfnet_f0.dm_in1k`` ``model.safetensors``) and pass its path.

Key table, timm -> fastdp ({s} stage, {b} block, {i} 1-4, {conv} conv1|conv2|conv2b|conv3, {p} weight|bias|gain,
{wb} weight|bias, {fc} fc1|fc2). A checkpoint key matching no row is an unknown key.

    timm                                     fastdp                                   what
    stem.conv.{p}                            stem.conv.{p}                            NF-ResNet 7x7 stem conv
    stem.conv{i}.{p}                         stem.conv{i}.{p}                         NFNet stem convs
    stages.{s}.{b}.{conv}.{p}                stages.{s}.{b}.{conv}.{p}                block convs
    stages.{s}.{b}.downsample.conv.{p}       stages.{s}.{b}.downsample.conv.{p}       projection shortcut
    stages.{s}.{b}.attn_last.{fc}.{wb}       stages.{s}.{b}.se.{fc}.{wb}              squeeze-excite 1x1 convs
    stages.{s}.{b}.skipinit_gain             stages.{s}.{b}.skip_gain.gain            skip-init scalar (shape ())
    final_conv.{p}                           final_conv.{p}                           NFNet final 1x1 conv
    head.fc.{wb}                             head.{wb}                                classifier

Two adjustments, both reported in the returned ``LoadResult``:

- Head: when the checkpoint's classifier has a different number of classes than the model (fine-tuning on another
  dataset), the checkpoint's ``head.fc`` is dropped and the model keeps its own freshly initialised head.
- Skip gains: timm's ``nf_resnet50`` has no ``skipinit_gain`` (it zero-initialises conv3's gain instead). When the
  checkpoint has no skip gain at all and the model has them, they are set to 1, which computes exactly the
  checkpoint's function.

Under ``strict=True`` every other model parameter must come from the checkpoint and every checkpoint key must map to
a model parameter; shapes must always agree.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

_FIELDS = {
    "s": r"\d+",
    "b": r"\d+",
    "i": r"[1-4]",
    "conv": r"conv1|conv2b|conv2|conv3",
    "p": r"weight|bias|gain",
    "wb": r"weight|bias",
    "fc": r"fc1|fc2",
}

#: (timm key, fastdp key) templates; the module docstring shows the same table
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("stem.conv.{p}", "stem.conv.{p}"),
    ("stem.conv{i}.{p}", "stem.conv{i}.{p}"),
    ("stages.{s}.{b}.{conv}.{p}", "stages.{s}.{b}.{conv}.{p}"),
    ("stages.{s}.{b}.downsample.conv.{p}", "stages.{s}.{b}.downsample.conv.{p}"),
    ("stages.{s}.{b}.attn_last.{fc}.{wb}", "stages.{s}.{b}.se.{fc}.{wb}"),
    ("stages.{s}.{b}.skipinit_gain", "stages.{s}.{b}.skip_gain.gain"),
    ("final_conv.{p}", "final_conv.{p}"),
    ("head.fc.{wb}", "head.{wb}"),
)

_HEAD = ("head.weight", "head.bias")


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(t) if i % 2 == 0 else f"(?P<{t}>{_FIELDS[t]})" for i, t in enumerate(parts))
    return re.compile(f"^{regex}$")


_TO_FASTDP = [(_compile(t), f) for t, f in KEY_TABLE]
_TO_TIMM = [(_compile(f), t) for t, f in KEY_TABLE]


def _translate(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


def fastdp_key(timm_key: str) -> str | None:
    """The fastdp parameter name of a timm checkpoint key (None if the key table has no row for it)."""
    return _translate(timm_key, _TO_FASTDP)


def timm_key(fastdp_key: str) -> str | None:
    """The timm checkpoint key of a fastdp NormFreeNet parameter (None if the key table has no row for it)."""
    return _translate(fastdp_key, _TO_TIMM)


def to_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under timm's key names (the inverse of the key table), e.g. to export them.

    Raises:
        KeyError: a parameter has no row in the key table.
    """
    out = {}
    for name, t in model.state_dict().items():
        key = timm_key(name)
        if key is None:
            raise KeyError(f"parameter {name!r} has no timm equivalent in fastdp.models.timm_checkpoint.KEY_TABLE")
        out[key] = t
    return out


@dataclass
class LoadResult:
    """What ``load_timm_checkpoint`` did.

    Attributes:
        loaded: fastdp parameter names set from the checkpoint.
        missing: model parameters the checkpoint did not provide (always empty under strict=True).
        unexpected: checkpoint keys that map to no model parameter (always empty under strict=True).
        head_replaced: the checkpoint's classifier had another number of classes and was not loaded.
        skip_gains_set_to_one: skip gains absent from the checkpoint (timm nf_resnet50), set to 1.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    head_replaced: bool = False
    skip_gains_set_to_one: list[str] = field(default_factory=list)


def _read(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint at {path!r}. fastdp downloads nothing: get timm's weights for the model (e.g. the "
            "release asset dm_nfnet_f0-604f9c3a.pth or nf_resnet50_ra2-9f236009.pth, or model.safetensors from the "
            "Hugging Face hub repository timm/<model>) and put the file at that path."
        )
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(
                f"{path!r} is a safetensors file and the 'safetensors' package is not installed: "
                "pip install safetensors (or convert the file to a torch .pth)"
            ) from e
        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # training checkpoints wrap the weights; DDP prefixes them with "module."
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state_dict (a dict of tensors), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"{shown}{f' and {len(keys) - n} more' if len(keys) > n else ''}"


def load_timm_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadResult:
    """Load a timm state_dict (``nf_resnet50``, ``dm_nfnet_f*``) from a local file into a fastdp NormFreeNet.

    Args:
        model: the fastdp model (``nf_resnet50(...)`` or ``nfnet("F0", ...)`` of the checkpoint's architecture).
        path: a ``.pth`` / ``.pt`` file (``torch.load``, weights only) or a ``.safetensors`` file (needs the
            ``safetensors`` package).
        strict: require every model parameter to come from the checkpoint (except a replaced head and the skip
            gains of a checkpoint that has none) and every checkpoint key to be used.

    Returns:
        What was loaded, what was not, and whether the head was replaced (see ``LoadResult``).

    Raises:
        FileNotFoundError: no file at ``path`` (the message says where to put it).
        KeyError: under strict, checkpoint keys without a model parameter or model parameters without a checkpoint
            key (a few of each are listed).
        ValueError: a tensor whose shape differs from the model's (always), or a file that is not a state_dict.
    """
    path = os.fspath(path)
    state = _read(path)
    own = model.state_dict()
    result = LoadResult()

    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        name = fastdp_key(key)
        if name is None or name not in own:
            unknown.append(key)
        else:
            mapped[name] = value

    if all(k in mapped for k in _HEAD) and mapped["head.weight"].shape != own["head.weight"].shape:
        ck_classes, classes = mapped["head.weight"].shape[0], own["head.weight"].shape[0]
        ck_features, features = mapped["head.weight"].shape[1], own["head.weight"].shape[1]
        if ck_features == features and ck_classes != classes:
            for k in _HEAD:
                del mapped[k]
            result.head_replaced = True
            logger.info("%s: %d-class head not loaded; the model keeps its %d-class head", path, ck_classes, classes)

    gains = [k for k in own if k.endswith("skip_gain.gain")]
    if gains and not any(k.endswith("skip_gain.gain") for k in mapped):
        for k in gains:
            mapped[k] = torch.ones_like(own[k], device="cpu")
        result.skip_gains_set_to_one = gains

    mismatched = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        details = "; ".join(
            f"{timm_key(k) or k} -> {k}: checkpoint {tuple(mapped[k].shape)}, model {tuple(own[k].shape)}"
            for k in mismatched[:5]
        )
        raise ValueError(
            f"{path!r}: {len(mismatched)} tensor(s) do not fit the model ({details}). Build the model of the "
            "checkpoint's architecture (e.g. nfnet('F3') for dm_nfnet_f3)."
        )

    missing = [k for k in own if k not in mapped and not (result.head_replaced and k in _HEAD)]
    if strict and unknown:
        raise KeyError(
            f"{path!r}: {len(unknown)} checkpoint key(s) have no parameter in this model: {_few(unknown)}. Is it a "
            "timm nf_resnet50 / dm_nfnet_f* checkpoint of the same architecture? (strict=False ignores them)"
        )
    if strict and missing:
        raise KeyError(
            f"{path!r}: {len(missing)} model parameter(s) are not in the checkpoint: {_few(missing)} "
            f"(timm names: {_few([timm_key(k) or k for k in missing])}). strict=False keeps their current values."
        )
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)
    result.loaded = [k for k in mapped if k not in result.skip_gains_set_to_one]
    result.missing, result.unexpected = missing, unknown
    return result
