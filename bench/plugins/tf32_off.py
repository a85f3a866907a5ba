"""pytest plugin (``-p tf32_off`` with bench/plugins on PYTHONPATH; bench/gpu_validate.sh loads it): every fp32
matmul and convolution of the session in full fp32.

cuDNN runs fp32 convolutions in TF32 by default on Ampere and Hopper (10-bit mantissa operands), which breaks the
tests' float64-oracle tolerances (2e-5) without any kernel being wrong. The switches are the ones
fastdp.engine.precision.full_fp32 sets, through the same API (torch >= 2.9: ``fp32_precision``; mixing it with the
legacy ``allow_tf32`` flags makes torch raise when it reads them).
"""

from fastdp.engine.precision import _KNOBS

for _module, _attr, _value in _KNOBS:
    setattr(_module, _attr, _value)
