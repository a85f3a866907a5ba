"""fastdp: exact and fast differentially private training (DP-SGD) for PyTorch.

Replace your optimizer::

    opt = fastdp.DPSGD(model, lr=0.5, noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=256, sample_size=len(train_set))
"""

from fastdp import accounting, data, nn
from fastdp.backends import available_backends
from fastdp.ema import EMA
from fastdp.engine import GradSampleEngine
from fastdp.optim import DPSGD, DPOptimizer

__version__ = "0.1.0"

__all__ = ["DPOptimizer", "DPSGD", "EMA", "GradSampleEngine", "accounting", "available_backends", "data", "nn"]
