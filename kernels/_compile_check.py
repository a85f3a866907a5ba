"""Compile every Triton kernel signature fastdp launches, for a CUDA architecture, without a GPU; report registers,
spills and vector loads.

    python -m fastdp.kernels._compile_check [--arch 90] [--arch 80]

The interpreter (what the CPU tests run) never compiles, so it cannot catch what only the compiler rejects (a
scalar argument Triton specialises to a Python int, a layout that does not lower) nor show register pressure.

What is compiled: the launches of ``SOURCES``, each recorded by running the host wrappers down their GPU path with
their kernels replaced by recorders (fastdp/kernels/_launches.py):

- ``preset_launches``: what a training step of each preset's model would launch (fastdp/engine/dry_run.py, whose
  docstring says why that enumeration is complete): fp32, bf16 and fp16 autocast, micro-batches of 256, 255 and 1
  examples, WS convs with the G_i write, SGD steps with and without momentum;
- ``variant_launches``: what the kernels offer beyond the presets (Adam(W), 16-bit parameters, sequence layers,
  channels_last inputs, the Philox streams). New kernel variants add their launches there or as one more source.

Equal launches are compiled once; each distinct compiled kernel (a signature: kernel, dtypes, constexprs and
Triton's specialisation of the integer arguments) goes through Triton's bundled ptxas for the register and spill
report. The matmul kernels' fp32 (tf32x3), bf16 and fp16 variants must also issue tensor-core instructions: their
SASS (Triton's bundled cuobjdump) is read for HGMMA/HMMA and FFMA (``_tensor_core_failures``); none is a failure.
A stand-in driver reports the CUDA target. Exit status 1 if any launch fails to compile or any kernel
spills registers (as .ci/check_cuda for csrc/), 2 if the stand-in driver does not fit this Triton version (then
nothing was checked).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0") and "fastdp.kernels.noisy_step" in sys.modules:
    raise SystemExit(
        "run this in a fresh process without TRITON_INTERPRET (the kernels were built for the interpreter)"
    )

import torch  # noqa: E402


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
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (regs[0] if regs else "?"), (str(max(map(int, spills[0]))) if spills else "?")


def preset_launches(presets: tuple[str, ...] | None = None, batches: tuple[int, ...] | None = None) -> list:
    """What a training step of every preset's model launches (fastdp/engine/dry_run.py: fp32, bf16 and fp16
    autocast, micro-batches of 256, 255 and 1 examples, every strategy the plan may time, both phases of the
    optimizer step); ``presets`` and ``batches`` narrow it down."""
    from fastdp.engine import dry_run

    return dry_run.preset_launches(batches=batches or dry_run.BATCHES, presets=presets)


def variant_launches() -> list:
    """Launches the kernels offer that no preset makes: the Adam(W) step, fp16/bf16 parameters, a step without
    noise, the ghost norm of a sequence layer, a first conv on channels_last images with views, the Philox streams.
    A new kernel variant that no preset reaches goes here (or in a function of its own added to ``SOURCES``)."""
    from fastdp.engine.dry_run import Recorded
    from fastdp.kernels import clip_reduce as cr
    from fastdp.kernels import ghost_norm as gn
    from fastdp.kernels import noisy_step as ns
    from fastdp.kernels import per_sample_norm as psn
    from fastdp.kernels._launches import recording

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    out: list = []
    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        n = str(dt).replace("torch.", "")
        cases += [
            (
                f"per_sample_norm + G_i {n}",
                lambda dt=dt: psn.per_sample_norm(
                    t(8, 256, 512, dtype=dt), t(8, 256, 384, dtype=dt), out=t(8, 384, 512, dtype=dt)
                ),
            ),
            (f"ghost_norm {n}", lambda dt=dt: gn.ghost_norm(t(8, 256, 512, dtype=dt), t(8, 256, 384, dtype=dt))),
            (f"clip_reduce {n}", lambda dt=dt: cr.clip_reduce(t(64, 1 << 16, dtype=dt), t(64))),
            (
                f"clip_reduce_bookkeeping {n}",
                lambda dt=dt: cr.clip_reduce_bookkeeping(t(64, 256, 512, dtype=dt), t(64, 256, 384, dtype=dt), t(64)),
            ),
            (  # a first conv on channels_last images, stride 2, two views per example: d = 27, x's C stride 1
                f"clip_reduce_bookkeeping_conv2d channels_last {n}",
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
                f"per_sample_norm_conv2d channels_last {n}",
                lambda dt=dt: psn.per_sample_norm_conv2d(
                    t(64, 3, 32, 32, dtype=dt).to(memory_format=torch.channels_last),
                    t(64, 16, 16, 16, dtype=dt),
                    3,
                    stride=2,
                    padding=1,
                    augmult=2,
                ),
            ),
            (
                f"noisy_step sgd nesterov {n} params",
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
                f"noisy_step sgd no noise {n} params",
                lambda dt=dt: ns.noisy_step(
                    [t(1 << 20, dtype=dt)],
                    [t(1 << 20, dtype=dt)],
                    std=0.0,
                    expected_batch_size=8,
                    seed=1,
                    step=1,
                    lr=0.1,
                ),
            ),
        ]
        for opt in ("adam", "adamw"):
            cases.append(
                (
                    f"noisy_step {opt} {n} params",
                    lambda dt=dt, opt=opt: ns.noisy_step(
                        [t(1 << 20, dtype=dt), t(999, dtype=dt)],
                        [t(1 << 20, dtype=dt), None],
                        std=1.0,
                        expected_batch_size=8,
                        seed=1,
                        step=1,
                        lr=0.1,
                        optimizer=opt,
                        weight_decay=0.1,
                    ),
                )
            )
    cases += [
        ("philox_normal", lambda: ns.philox_normal(1 << 20, 1, 1, device="meta")),
        ("philox_words", lambda: ns.philox_words(1 << 16, 1, 1, device="meta")),
    ]  # fmt: skip
    label = [""]
    with recording(lambda launch: out.append(Recorded(label[0], launch))):
        for label[0], fn in cases:
            fn()
    return out


#: where the launches to compile come from; a new source (say, another kernel family's variants) is one more entry
SOURCES = (preset_launches, variant_launches)


def check(arch: int, sources=SOURCES) -> int:
    """Compile every distinct launch of ``sources`` for sm_<arch>; 1 if any fails to compile or spills registers."""
    started = time.perf_counter()
    try:
        triton = _install_driver(arch)
    except Exception as e:  # noqa: BLE001 - any mismatch with Triton's internals means: cannot check here
        print(f"UNSUPPORTED: the stand-in driver does not fit this Triton ({type(e).__name__}: {e})")
        return 2
    recorded = [r for source in sources for r in source()]
    enumerated = time.perf_counter() - started
    # a launch's labels: the preset, batch, precision, layer and strategy it came from (the first is printed)
    labels: dict = {}
    for r in recorded:
        labels.setdefault(r.launch, []).append(r.label)
    kernels: dict = {}  # compiled kernel hash -> (launch, uses)
    failed = 0
    for launch, where in labels.items():
        try:
            compiled = launch.compile()
        except Exception as e:  # noqa: BLE001 - report every launch, then fail
            failed += 1
            print(f"FAIL sm_{arch} {where[0]}: {launch.describe()}: {type(e).__name__}: {e}")
            continue
        entry = kernels.setdefault(compiled.hash, [launch, compiled, 0])
        entry[2] += len(where)
    spilled = 0
    for launch, compiled, uses in kernels.values():
        ptx = compiled.asm["ptx"]
        regs, spills = _ptxas_info(triton, ptx, arch)
        v4 = len(re.findall(r"ld\.global[^\n]*\.v4", ptx))
        bad = spills not in ("0", "?")
        spilled += bad
        print(
            f"{'SPILL' if bad else 'ok  '} sm_{arch} {launch.kernel:40s} regs {regs:>3} spill bytes {spills:>3} "
            f"ld.v4 {v4:3d} mma {str('mma' in ptx):5s} uses {uses:4d}  {labels[launch][0]}: {launch.describe()}"
        )
        failed += _tensor_core_failures(triton, labels[launch][0], launch.kernel, compiled, arch)
    print(
        f"compile check sm_{arch}: {len(recorded)} launches recorded ({len(labels)} distinct) in {enumerated:.0f} s, "
        f"{len(kernels)} kernel signatures compiled, {spilled} spilling, {failed} failing, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    return 1 if failed or spilled else 0


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
    parser.add_argument("--preset", action="append", help="only this preset's launches (repeatable; default: all)")
    parser.add_argument("--batch", type=int, action="append", help="only this micro-batch size (repeatable)")
    parser.add_argument("--no-variants", action="store_true", help="leave out variant_launches")
    args = parser.parse_args()
    archs = args.arch or [90]
    if len(archs) == 1:
        presets = tuple(args.preset) if args.preset else None
        batches = tuple(args.batch) if args.batch else None
        sources = [lambda: preset_launches(presets, batches)]
        if not args.no_variants:
            sources.append(variant_launches)
        sys.exit(check(archs[0], sources))
    # Triton caches the target per device and the kernels get patched: one fresh process per architecture
    codes = [
        subprocess.run(
            [sys.executable, "-m", "fastdp.kernels._compile_check", "--arch", str(a), *_forward(args)]
        ).returncode
        for a in archs
    ]
    sys.exit(max(codes))


def _forward(args: argparse.Namespace) -> list[str]:
    """The narrowing options, for a subprocess per architecture."""
    out = [f"--preset={p}" for p in args.preset or ()] + [f"--batch={b}" for b in args.batch or ()]
    return out + (["--no-variants"] if args.no_variants else [])


if __name__ == "__main__":
    main()
