"""Triton kernels for fastdp, installed as ``fastdp.kernels``.

The kernels (per-example norm, ghost norm, clip-and-reduce, noisy multi-tensor step) land with the kernels
issue. Importing this package never requires Triton or a GPU.
"""
