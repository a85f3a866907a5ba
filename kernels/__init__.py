"""Triton kernels for fastdp, installed as ``fastdp.kernels``. One op per module:

- ``per_sample_norm``  per-example ||delta_i^T a_i||^2 for linear and conv2d (implicit GEMM), optional write of G_i
- ``ghost_norm``       the same norm from tiles of the two Gram matrices (flash-attention-like, no T x T in memory)
- ``clip_reduce``      S = sum_i c_i G_i over kept gradients, and the book-keeping GEMM A^T diag(c) Delta (linear,
                       and conv2d by implicit GEMM)
- ``noisy_step``       Philox noise + 1/B + SGD/Adam/AdamW update over all parameters in one launch

Each module also holds the pure-torch ``*_ref`` of its op. This package imports nothing; the op modules import
without Triton too (their references work, their kernels raise an ImportError with install instructions when
launched). Set ``TRITON_INTERPRET=1`` before importing an op module to run its kernels on CPU tensors.
"""
