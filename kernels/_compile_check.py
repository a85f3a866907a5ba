"""Compile every fastdp Triton kernel for a CUDA architecture without a GPU; report registers, spills, vector loads.

    python -m fastdp.kernels._compile_check [--arch 90] [--arch 80]

The interpreter (what the CPU tests run) never compiles, so it cannot catch what only the compiler rejects (a
scalar argument Triton specialises to a Python int, a layout that does not lower) nor show register pressure. Here
a stand-in driver reports a CUDA target, each kernel's ``warmup`` compiles it through PTX to a cubin with the
shapes and dtypes the host wrappers choose for a GPU (the wrappers run on CPU tensors whose memory is never read),
and Triton's bundled ptxas reports registers and spill bytes. Exit status 1 if any kernel fails to compile or
spills registers (as .ci/check_cuda for csrc/), 2 if the stand-in driver does not fit this Triton version (then
nothing was checked).

The matmul kernels' fp32 (tf32x3), bf16 and fp16 variants must also issue tensor-core instructions: their SASS
(Triton's bundled cuobjdump) is read for HGMMA/HMMA and FFMA (``_tensor_core_failures``); none is a failure.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0") and "fastdp.kernels.noisy_step" in sys.modules:
    raise SystemExit(
        "run this in a fresh process without TRITON_INTERPRET (the kernels were built for the interpreter)"
    )

import torch  # noqa: E402

GPU = torch.device("cuda")


def _install_driver(arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_Driver())
    return triton


def _ptxas_info(triton, ptx: str, arch: int) -> tuple[str, str]:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exe = next(
        (os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))), None
    )
    if exe is None:
        return "?", "?"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run(
            [exe, f"-arch={sm}", "-v", src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True
        )
    out = r.stdout + r.stderr
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return (regs[0] if regs else "?"), (spills[0] if spills else "?")


def check(arch: int) -> int:
    try:
        triton = _install_driver(arch)
    except Exception as e:  # noqa: BLE001 - any mismatch with Triton's internals means: cannot check here
        print(f"UNSUPPORTED: the stand-in driver does not fit this Triton ({type(e).__name__}: {e})")
        return 2
    from fastdp.kernels import _triton
    from fastdp.kernels import clip_reduce as cr
    from fastdp.kernels import ghost_norm as gn
    from fastdp.kernels import noisy_step as ns
    from fastdp.kernels import per_sample_norm as psn

    compiled: list = []

    class _Warmup:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def go(*args, **kwargs):
                compiled.append((self.fn.fn.__name__, self.fn.warmup(*args, grid=grid, **kwargs)))

            return go

    def on_gpu(fn):
        return lambda *a, **k: fn(*[GPU if isinstance(x, torch.device) else x for x in a], **k)

    for mod in (psn, gn, cr, ns):
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(mod, name, _Warmup(obj))
        mod.check_launchable = lambda op, *t: torch.device("cpu")
        mod._settings = on_gpu(mod._settings)
        for attr in ("interpreting",):
            if hasattr(mod, attr):
                setattr(mod, attr, lambda: False)
    cr._settings_bookkeeping = on_gpu(cr._settings_bookkeeping)
    cr.num_sms = lambda device: 132
    _triton.interpreting = lambda: False

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype)

    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        n = str(dt).replace("torch.", "")
        cases += [
            (
                f"per_sample_norm {n}",
                lambda dt=dt: psn.per_sample_norm(
                    t(8, 256, 512, dtype=dt), t(8, 256, 384, dtype=dt), out=t(8, 384, 512, dtype=dt)
                ),
            ),
            (
                f"per_sample_norm_conv2d {n}",
                lambda dt=dt: psn.per_sample_norm_conv2d(
                    t(8, 64, 16, 16, dtype=dt), t(8, 128, 16, 16, dtype=dt), 3, padding=1
                ),
            ),
            (f"ghost_norm {n}", lambda dt=dt: gn.ghost_norm(t(8, 256, 512, dtype=dt), t(8, 256, 384, dtype=dt))),
            (  # WRN's 8x8 stage: 256 -> 256 channels, 3x3
                f"ghost_norm_conv2d {n}",
                lambda dt=dt: gn.ghost_norm_conv2d(t(8, 256, 8, 8, dtype=dt), t(8, 256, 8, 8, dtype=dt), 3, padding=1),
            ),
            (f"clip_reduce {n}", lambda dt=dt: cr.clip_reduce(t(64, 1 << 16, dtype=dt), t(64))),
            (
                f"clip_reduce_bookkeeping {n}",
                lambda dt=dt: cr.clip_reduce_bookkeeping(t(64, 256, 512, dtype=dt), t(64, 256, 384, dtype=dt), t(64)),
            ),
            (
                f"clip_reduce_bookkeeping_conv2d {n}",
                lambda dt=dt: cr.clip_reduce_bookkeeping_conv2d(
                    t(64, 64, 16, 16, dtype=dt), t(64, 128, 16, 16, dtype=dt), t(64), 3, padding=1
                ),
            ),
            (  # a first conv on channels_last images, stride 2, two views per example: d = 27, x's C stride 1
                f"clip_reduce_bookkeeping_conv2d cl {n}",
                lambda dt=dt: cr.clip_reduce_bookkeeping_conv2d(
                    t(64, 3, 32, 32, dtype=dt).to(memory_format=torch.channels_last),
                    t(64, 16, 16, 16, dtype=dt),
                    t(32),
                    3,
                    stride=2,
                    padding=1,
                    augmult=2,
                ),
            ),
            (
                f"noisy_step sgd {n}",
                lambda dt=dt: ns.noisy_step(
                    [t(1 << 20, dtype=dt), t(999, dtype=dt)],
                    [t(1 << 20, dtype=dt), None],
                    std=1.0,
                    expected_batch_size=8,
                    seed=1,
                    step=1,
                    lr=0.1,
                    momentum=0.9,
                    nesterov=True,
                    weight_decay=0.1,
                ),
            ),
            (
                f"noisy_step adamw {n}",
                lambda dt=dt: ns.noisy_step(
                    [t(1 << 20, dtype=dt)],
                    [t(1 << 20, dtype=dt)],
                    std=1.0,
                    expected_batch_size=8,
                    seed=1,
                    step=1,
                    lr=0.1,
                    optimizer="adamw",
                    weight_decay=0.1,
                ),
            ),
        ]
    cases += [
        ("philox_normal", lambda: ns.philox_normal(1 << 20, 1, 1, device="cpu")),
        ("philox_words", lambda: ns.philox_words(1 << 16, 1, 1, device="cpu")),
    ]
    failed = 0
    for label, fn in cases:
        start = len(compiled)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL sm_{arch} {label}: {type(e).__name__}: {e}")
            continue
        for name, kernel in compiled[start:]:
            ptx = kernel.asm["ptx"]
            regs, spills = _ptxas_info(triton, ptx, arch)
            v4 = len(re.findall(r"ld\.global[^\n]*\.v4", ptx))
            mma = "mma" in ptx
            spilled = spills not in ("0", "?")
            failed += spilled
            print(
                f"{'SPILL' if spilled else 'ok  '} sm_{arch} {label:42s} {name:40s} regs {regs:>3} spill bytes "
                f"{spills:>3} ld.v4 {v4:3d} mma {mma}"
            )
            failed += _tensor_core_failures(triton, label, name, kernel, arch)
    return 1 if failed else 0


#: the kernels whose inner loop is a tl.dot: their fp32 (tf32x3), bf16 and fp16 variants must run on tensor cores
TENSOR_CORE_KERNELS = frozenset(
    {
        "_per_sample_norm_linear_kernel",
        "_per_sample_norm_conv2d_kernel",
        "_ghost_norm_kernel",
        "_ghost_norm_conv2d_kernel",
        "_clip_reduce_bookkeeping_kernel",
        "_clip_reduce_bookkeeping_conv2d_kernel",
    }
)


def _sass_counts(triton, cubin: bytes) -> dict[str, int] | None:
    """Counts of tensor-core (HGMMA: sm_90a warpgroup MMA; HMMA: warp MMA) and FFMA instructions in the SASS of a
    cubin, by the cuobjdump Triton bundles; None where it is missing."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(exe):
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([exe, "--dump-sass", path], capture_output=True, text=True).stdout
    return {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "FFMA")}


def _tensor_core_failures(triton, label: str, name: str, kernel, arch: int) -> int:
    """1 if a matmul kernel's compiled code has no tensor-core instruction (sm_80 and newer), else 0; prints the
    instruction mix. fp32 operands use tf32x3 (three TF32 MMAs), bf16/fp16 their native MMA: an FFMA-only kernel
    would run at the FMA units' rate, ~15x below the tensor cores' on an H100/H200."""
    if name not in TENSOR_CORE_KERNELS or arch < 80:
        return 0
    counts = _sass_counts(triton, kernel.asm["cubin"])
    if counts is None:
        print(f"     sm_{arch} {label:42s} tensor cores: unchecked (no cuobjdump beside Triton)")
        return 0
    ok = counts["HGMMA"] + counts["HMMA"] > 0
    mix = " ".join(f"{k} {v}" for k, v in counts.items())
    print(f"{'ok  ' if ok else 'NOTC'} sm_{arch} {label:42s} tensor cores: {mix}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default 90)")
    archs = parser.parse_args().arch or [90]
    if len(archs) == 1:
        sys.exit(check(archs[0]))
    # Triton caches the target per device and the kernels get patched: one fresh process per architecture
    codes = [
        subprocess.run([sys.executable, "-m", "fastdp.kernels._compile_check", "--arch", str(a)]).returncode
        for a in archs
    ]
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
