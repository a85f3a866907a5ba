"""Models of the papers fastdp reproduces, every parameter covered by an exact fast per-example rule."""

from fastdp.models.digits_cnn import digits_cnn
from fastdp.models.gpt import GPT, gpt
from fastdp.models.nfnet import NFConfig, NormFreeNet, nf_resnet50, nfnet
from fastdp.models.registry import IMAGE_MODEL_NAMES, MODEL_NAMES, build_model
from fastdp.models.smoothnet import SmoothNet, smoothnet_v1
from fastdp.models.timm_checkpoint import LoadResult, load_timm_checkpoint, to_timm_state_dict
from fastdp.models.vit import VisionTransformer, vit, vit_mini
from fastdp.models.wrn import WideResNet, wrn

__all__ = [
    "GPT",
    "IMAGE_MODEL_NAMES",
    "MODEL_NAMES",
    "LoadResult",
    "NFConfig",
    "NormFreeNet",
    "SmoothNet",
    "VisionTransformer",
    "WideResNet",
    "build_model",
    "digits_cnn",
    "gpt",
    "load_timm_checkpoint",
    "nf_resnet50",
    "nfnet",
    "smoothnet_v1",
    "to_timm_state_dict",
    "vit",
    "vit_mini",
    "wrn",
]
