"""The dry run (fastdp/engine/dry_run.py) against the real engine: a DP training step with the Triton backend, its
kernels recorded instead of run, launches nothing the dry run of that model leaves out.

Both run in a subprocess without TRITON_INTERPRET: the kernel modules must hold Triton's JIT functions (whose
specialisation rules the signatures follow), not the interpreter's, and the backend is the GPU one (device type
'cpu' here, since the recorded kernels never touch memory).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")

SCRIPT = r"""
import sys, torch, torch.nn.functional as F
import fastdp
from fastdp import backends
from fastdp.backends.triton import TritonBackend
from fastdp.engine import dry_run
from fastdp.kernels._launches import recording
from fastdp.models import build_model

backends._AVAILABLE["triton"] = TritonBackend(device_type="cpu")  # recorded, never run: no GPU needed
precision = {"fp32": None, "bf16": torch.bfloat16}[sys.argv[1]]
B, K, shape = 4, 2, (3, 8, 8)
make = lambda: build_model("wrn-10-2", num_classes=10, in_channels=3)

torch.manual_seed(0)
model = make()
opt = fastdp.DPSGD(model, lr=0.1, momentum=0.9, weight_decay=1e-4, noise_multiplier=1.0, max_grad_norm=1.0,
                   expected_batch_size=B, augmult=K, backend="triton")
real = []
with recording(real.append):
    for _ in range(2):
        x, y = torch.randn(B * K, *shape), torch.randint(0, 10, (B * K,))
        with torch.autocast("cpu", dtype=precision) if precision else torch.autocast("cpu", enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
dry = dry_run.step_launches(make, shape, batch=B, augmult=K, precision=precision, optimizer="sgd", lr=0.1,
                            momentum=0.9, weight_decay=1e-4)
kernels = {l.kernel for l in real}
missing = {l.signature() for l in real} - {r.launch.signature() for r in dry}
print("real", len(real), "kernels", sorted(kernels), "dry", len(dry), "missing", len(missing))
for m in sorted(map(str, missing)):
    print("MISSING", m)
assert {"_per_sample_norm_conv2d_kernel", "_clip_reduce_kernel", "_noisy_step_kernel"} <= kernels, kernels
sys.exit(1 if missing else 0)
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dry_run_covers_what_the_engine_launches(precision):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, precision], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
