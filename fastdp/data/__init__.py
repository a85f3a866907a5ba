"""Data side of DP training: datasets, Poisson sampling of logical batches, micro-batches and augmentation."""

from fastdp.data.augment import AugmentParams, augment, normalize, to_float
from fastdp.data.datasets import DATASETS, load_dataset
from fastdp.data.distributed_sampler import DistributedPoissonSampler
from fastdp.data.image_dataset import DatasetNotFound, ImageDataset, TensorImageDataset, data_root
from fastdp.data.image_folder import ImageFolderDataset
from fastdp.data.micro import logical_batches, micro_batches
from fastdp.data.poisson import PoissonSampler

__all__ = [
    "DATASETS",
    "AugmentParams",
    "DatasetNotFound",
    "DistributedPoissonSampler",
    "ImageDataset",
    "ImageFolderDataset",
    "PoissonSampler",
    "TensorImageDataset",
    "augment",
    "data_root",
    "load_dataset",
    "logical_batches",
    "micro_batches",
    "normalize",
    "to_float",
]
