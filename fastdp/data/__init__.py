"""Data side of DP training: Poisson sampling of logical batches and their split into micro-batches."""

from fastdp.data.micro import logical_batches, micro_batches
from fastdp.data.poisson import PoissonSampler

__all__ = ["PoissonSampler", "logical_batches", "micro_batches"]
