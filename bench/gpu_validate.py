"""The Python stages of bench/gpu_validate.sh (read its header first): one stage per call, results as lines.

    python bench/gpu_validate.py norms|step|noisy|smoke [--dry-run]

- ``norms``  each distinct conv layer of WRN-40-4 (CIFAR, batch 256): the per-example norm kernel
             (kernels/per_sample_norm.py, bf16 and fp32 operands) against cuDNN's bf16 weight gradient of the layer.
             Target: at most 1.0x, per layer and over the whole model (layers weighted by how often they occur).
- ``step``   WRN-16-4 (GroupNorm, plain convs, so that Opacus runs it too), batch 256, CIFAR shapes, bf16 autocast:
             one training step of non-private SGD, Opacus (hooks) and fastdp.DPSGD per backend; median step time,
             kernel launches per step (CUDA kernels seen by torch.profiler; on the CPU, kernel-launching aten ops).
             Target: each fastdp backend at most 1.25x the non-private step (providers most important first).
- ``noisy``  the fused noisy optimizer step (Triton kernel, and the CUDA one of fastdp._C where built) over ~1 GB of
             fp32 parameters in many tensors, SGD with and without momentum, against a device-to-device copy.
             Bytes counted: each tensor read once and written once (SGD: param and sum read, param written; with
             momentum the buffer read and written too). Target: at least 80% of the copy's bandwidth.
- ``smoke``  every kernel once on tiny shapes with boundary sizes, outputs NaN-poisoned and compared with the
             references: what compute-sanitizer's memcheck runs (the script runs it once first, to compile).

Each stage prints ``RESULT <stage> <what>: <value> [target ...] PASS|FAIL|INFO`` lines (gpu_validate.sh collects them
into its summary) and writes them to $OUT/<stage>.json when OUT is set. Exit status 0 unless the stage crashed;
missed targets are FAIL lines, not errors.

``--dry-run`` runs the stage on the CPU at tiny sizes (Triton in its interpreter, fastdp._C's CPU kernels in the
place of the CUDA ones) so that the stage's code is exercised without a GPU (tests/test_gpu_validate.py); its
numbers mean nothing and its targets read INFO.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import warnings

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CUDA = torch.cuda.is_available() and not DRY
DEVICE = torch.device("cuda" if CUDA else "cpu")
RESULTS: list[dict] = []


# ------------------------------------------------------------------------------------------------------- helpers
def say(*args) -> None:
    print(*args, flush=True)


def result(stage: str, what: str, value: float, unit: str = "", target: str | None = None, ok: bool | None = None):
    """One result line; ``ok`` None is information, else PASS/FAIL against ``target`` (INFO in a dry run)."""
    verdict = "INFO" if ok is None or DRY else ("PASS" if ok else "FAIL")
    text = f"{value:.3g}{unit}" if isinstance(value, float) else f"{value}{unit}"
    say(f"RESULT {stage} {what}: {text}" + (f" [target {target}]" if target else "") + f" {verdict}")
    RESULTS.append({"stage": stage, "what": what, "value": value, "unit": unit, "target": target, "verdict": verdict})


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_ms(fn, warmup_ms: float = 25, rep_ms: float = 100, back_to_back: int = 10) -> float:
    """Median time of ``fn`` in ms: CUDA events through triton.testing.do_bench on the GPU, wall clock on the CPU.

    On the GPU each timed sample runs ``fn`` ``back_to_back`` times between one pair of events (the time is per
    call): do_bench's events bracket one call, and a Python wrapper's host time (~0.1-1 ms for the Triton ones,
    comparable to the kernels at these sizes) would land inside the window with nothing queued ahead of it. Back to
    back, the host enqueues the next call while the GPU runs this one, so the figure is the kernels' throughput
    unless the host is the slower of the two (which it then shows)."""
    if CUDA:
        import triton.testing

        def calls():
            for _ in range(back_to_back):
                fn()

        return float(triton.testing.do_bench(calls, warmup=warmup_ms, rep=rep_ms, return_mode="median")) / back_to_back
    fn()
    times = []
    for _ in range(1 if DRY else 3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu (dry run)"


def randn(*shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    """Normal draws from ``gen``, on its device (a GPU's generator draws a GB in milliseconds, a CPU's in ~10 s)."""
    device = gen.device if gen is not None else None
    return torch.randn(*shape, generator=gen, device=device).to(DEVICE, dtype)


def extension_ops() -> bool:
    """Whether fastdp._C's ops run on this device (its CUDA kernels on a GPU; its CPU kernels in a dry run)."""
    from fastdp import _ext

    return _ext.cuda_compiled() if CUDA else _ext.cpu_available()


# --------------------------------------------------------------------------------------------------------- norms
def conv_layers(depth: int = 40, width: int = 4, side: int = 32) -> list[tuple[tuple, int]]:
    """The distinct Conv2d layers of WRN-depth-width on side x side images: ((C, H, p, k, stride, pad), count)."""
    from fastdp.models import build_model

    model = build_model(f"wrn-{depth}-{width}", num_classes=10, in_channels=3)
    seen: dict[tuple, int] = {}

    def hook(m, args):
        x = args[0]
        key = (m.in_channels, x.shape[-1], m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for h in handles:
        h.remove()
    return list(seen.items())


def stage_norms() -> None:
    from fastdp.kernels import per_sample_norm as psn

    batch = 2 if DRY else 256
    gen = torch.Generator().manual_seed(0)
    total = {"wgrad": 0.0, "bf16": 0.0, "fp32": 0.0}
    layers = conv_layers()
    for (C, H, p, k, s, pad), count in layers[:3] if DRY else layers:
        if DRY:  # interpreter-sized: few channels, small images
            C, H, p = min(C, 2), min(H, 6), min(p, 4)
        Ho = (H + 2 * pad - k) // s + 1
        x, d = randn(batch, C, H, H, gen=gen), randn(batch, p, Ho, Ho, gen=gen)
        xb, db = x.bfloat16(), d.bfloat16()
        w = torch.empty(p, C, k, k, device=DEVICE, dtype=torch.bfloat16)

        def wgrad(db=db, xb=xb, w=w, s=s, pad=pad):
            return torch.ops.aten.convolution_backward(
                db, xb, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, [False, True, False]
            )[1]

        def norm(a, b, k=k, s=s, pad=pad):
            return lambda: psn.per_sample_norm_conv2d(a, b, k, stride=s, padding=pad)

        # a sanity check of the kernel on these shapes (tests/ hold the real ones): bf16 operands against float64
        n = min(batch, 4)
        ref = psn.per_sample_norm_conv2d_ref(xb[:n].double(), db[:n].double(), k, s, pad)
        err = ((norm(xb, db)()[:n].double() - ref).abs().max() / ref.abs().max()).item()
        t_w, t_b, t_f = time_ms(wgrad), time_ms(norm(xb, db)), time_ms(norm(x, d))
        for key, t in (("wgrad", t_w), ("bf16", t_b), ("fp32", t_f)):
            total[key] += count * t
        layer = f"conv {C}->{p} k{k} s{s} {H}x{H} (x{count})"
        say(f"{layer}: wgrad bf16 {t_w:.3f} ms, norm bf16 {t_b:.3f} ms, norm fp32 {t_f:.3f} ms, rel err bf16 {err:.1e}")
        result("norms", f"{layer} norm bf16 / wgrad bf16", t_b / t_w, "x", "<= 1.0", t_b / t_w <= 1.0)
        if not math.isfinite(err) or err > 2e-2:
            result("norms", f"{layer} norm bf16 rel err vs float64", err, "", "<= 2e-2", False)
    result("norms", "WRN-40-4 all convs: norm bf16 / wgrad bf16", total["bf16"] / total["wgrad"], "x", "<= 1.0",
           total["bf16"] <= total["wgrad"])  # fmt: skip
    result("norms", "WRN-40-4 all convs: norm fp32 (what the rules pass today) / wgrad bf16",
           total["fp32"] / total["wgrad"], "x")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- step
#: most important first: a stage cut short by its timeout keeps what it printed
STEP_PROVIDERS = ("non-private", "fastdp-triton", "fastdp-cuda", "opacus", "fastdp-torch")


def _launches(step) -> int:
    """Kernels one step launches: CUDA kernels and copies in torch.profiler's trace on a GPU; on the CPU, the
    kernel-launching aten ops (fastdp.launches, as bench/bench_launches.py counts them)."""
    if CUDA:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from fastdp.launches import LaunchCounter

    with LaunchCounter() as counter:
        step()
    return counter.total


def _build(provider: str, batch: int):
    from fastdp.models import wrn

    torch.manual_seed(0)
    model = wrn(16, 4, num_classes=10, ws=False).to(DEVICE).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(DEVICE)
    y = torch.randint(0, 10, (batch,), generator=gen).to(DEVICE)
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
    forward = model
    if provider == "non-private":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elif provider == "opacus":
        import opacus
        from opacus.optimizers import DPOptimizer

        forward = opacus.GradSampleModule(model)
        opt = DPOptimizer(torch.optim.SGD(forward.parameters(), lr=0.1), **kw)
    else:
        import fastdp

        backend = provider.removeprefix("fastdp-")
        if backend not in fastdp.available_backends():
            raise LookupError(f"backend {backend!r} is not available here ({fastdp.available_backends()})")
        opt = fastdp.DPSGD(model, lr=0.1, backend=backend, seed=0, **kw)

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step, opt


def stage_step() -> None:
    batch = 2 if DRY else 256
    warm, reps = (1, 2) if DRY else (3, 10)
    times: dict[str, float] = {}
    for provider in STEP_PROVIDERS:
        if DRY and provider == "fastdp-triton":
            continue  # a WRN step in Triton's interpreter takes minutes
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step, opt = _build(provider, batch)
                for _ in range(warm):  # fastdp's plan (autotuning) and Triton's compilation happen here
                    step()
                sync()
                samples = []
                for _ in range(reps):
                    start = time.perf_counter()
                    step()
                    sync()
                    samples.append(1e3 * (time.perf_counter() - start))
                launches = _launches(step)
        except Exception as e:  # noqa: BLE001 - one provider failing must not hide the others
            say(f"SKIP step {provider}: {type(e).__name__}: {str(e)[:300]}")
            continue
        times[provider] = statistics.median(samples)
        plan = ""
        if provider.startswith("fastdp"):
            from collections import Counter

            plan = ", ".join(f"{k} x{n}" for k, n in Counter(c for _, c in opt.engine.plans.values()).most_common())
        say(f"step {provider}: median {times[provider]:.2f} ms over {reps}, {launches} launches per step {plan}")
        result("step", f"WRN-16-4 B{batch} bf16 {provider} step", times[provider], " ms")
        result("step", f"WRN-16-4 B{batch} bf16 {provider} launches per step", launches)
        base = times.get("non-private")
        if base is not None and provider != "non-private":
            ratio = times[provider] / base
            if provider.startswith("fastdp"):
                result("step", f"{provider} / non-private, bf16 B{batch}", ratio, "x", "<= 1.25", ratio <= 1.25)
            else:
                result("step", f"{provider} / non-private, bf16 B{batch}", ratio, "x")


# --------------------------------------------------------------------------------------------------------- noisy
def _copy_ms(numel: int, gen: torch.Generator) -> float:
    """A device-to-device copy of ``numel`` fp32 elements (freed after): the bandwidth ceiling, read + write."""
    src = randn(numel, gen=gen)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src))


def stage_noisy() -> None:
    from fastdp.kernels import noisy_step as ns

    big, small = (512, 10) if DRY else (1 << 22, 1000)
    numels = [big] * (6 if DRY else 60) + [small] * (4 if DRY else 40)  # ~1 GB of fp32 parameters on a GPU
    total = sum(numels)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    t_copy = _copy_ms(total, gen)
    copy_bw = 2 * 4 * total / (t_copy * 1e-3)
    size = f"{len(numels)} tensors, {total / 1e6:.1f} M fp32 elements"
    say(f"noisy: {size}; copy {t_copy:.3f} ms, {copy_bw / 1e9:.0f} GB/s")
    result("noisy", f"copy bandwidth ({device_name()})", copy_bw / 1e9, " GB/s")
    params = [randn(n, gen=gen) for n in numels]
    sums = [randn(n, gen=gen) for n in numels]
    bufs = [randn(n, gen=gen) for n in numels]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    common = dict(std=1.0, expected_batch_size=256, seed=12345, step=1, offsets=offsets, lr=1e-4)
    runs = {
        "triton sgd": (lambda: ns.noisy_step(params, sums, **common), 3),
        "triton sgd momentum": (lambda: ns.noisy_step(params, sums, momentum=0.9, momentum_buffers=bufs, **common), 5),
    }
    if extension_ops():
        ops = torch.ops.fastdp
        name = "cuda" if CUDA else "cpp"
        runs[f"{name} sgd"] = (
            lambda: ops.noisy_sgd_step_(params, sums, [], offsets, 1.0, 256.0, 12345, 1, 1e-4, 0.0, 0.0, 0.0, False,
                                        False), 3)  # fmt: skip
        runs[f"{name} sgd momentum"] = (
            lambda: ops.noisy_sgd_step_(params, sums, bufs, offsets, 1.0, 256.0, 12345, 1, 1e-4, 0.9, 0.0, 0.0, False,
                                        False), 5)  # fmt: skip
    else:
        say("SKIP noisy cuda: fastdp._C has no kernels for this device")
    for label, (fn, tensors_moved) in runs.items():
        try:
            t = time_ms(fn)
        except Exception as e:  # noqa: BLE001
            say(f"SKIP noisy {label}: {type(e).__name__}: {str(e)[:300]}")
            continue
        bw = tensors_moved * 4 * total / (t * 1e-3)
        say(f"noisy {label}: {t:.3f} ms, {bw / 1e9:.0f} GB/s")
        result("noisy", f"{label} / copy bandwidth", bw / copy_bw, "", ">= 0.80", bw >= 0.8 * copy_bw)


# --------------------------------------------------------------------------------------------------------- smoke
def stage_smoke() -> None:
    """Every kernel once on tiny shapes that cross tile boundaries; outputs poisoned with NaN, results compared with
    the references (loose bounds: this is for the memory checker, tests/ hold the exact ones)."""
    from fastdp.kernels import clip_reduce as cr
    from fastdp.kernels import ghost_norm as gn
    from fastdp.kernels import noisy_step as ns
    from fastdp.kernels import per_sample_norm as psn

    gen = torch.Generator().manual_seed(0)
    bad = 0

    def check(what: str, got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-3) -> None:
        nonlocal bad
        got, ref = got.double().cpu(), ref.double().cpu()
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        ok = math.isfinite(err) and err <= tol
        bad += not ok
        say(f"smoke {what}: rel err {err:.1e} {'ok' if ok else 'BAD'}")

    for dt in (torch.float32, torch.bfloat16):
        tol = 1e-3 if dt == torch.float32 else 3e-2
        a, d = randn(3, 37, 19, dtype=dt, gen=gen), randn(3, 37, 21, dtype=dt, gen=gen)
        g = torch.full((3, 21, 19), float("nan"), device=DEVICE)
        n = psn.per_sample_norm(a, d, out=g)
        check(f"per_sample_norm {dt}", n, psn.per_sample_norm_ref(a.double(), d.double()), tol)
        check(f"per_sample_norm G_i {dt}", g, psn.per_sample_grad_ref(a.double(), d.double()), tol)
        check(f"ghost_norm {dt}", gn.ghost_norm(a, d), psn.per_sample_norm_ref(a.double(), d.double()), tol)
        x, dc = randn(4, 3, 9, 9, dtype=dt, gen=gen), randn(4, 5, 5, 5, dtype=dt, gen=gen)
        gc = torch.full((2, 5, 3, 3, 3), float("nan"), device=DEVICE)
        n = psn.per_sample_norm_conv2d(x, dc, 3, stride=2, padding=1, augmult=2, out=gc)
        check(f"per_sample_norm_conv2d {dt}", n,
              psn.per_sample_norm_conv2d_ref(x.double(), dc.double(), 3, 2, 1, 1, 2), tol)  # fmt: skip
        c = torch.rand(3, generator=gen).to(DEVICE)
        grads = randn(3, 1000, dtype=dt, gen=gen)
        check(f"clip_reduce {dt}", cr.clip_reduce(grads, c), cr.clip_reduce_ref(grads.double(), c.double()), tol)
        check(f"clip_reduce_bookkeeping {dt}", cr.clip_reduce_bookkeeping(a, d, c),
              cr.clip_reduce_bookkeeping_ref(a.double(), d.double(), c.double()), tol)  # fmt: skip
        c2 = c[:2]
        check(
            f"clip_reduce_bookkeeping_conv2d {dt}",
            cr.clip_reduce_bookkeeping_conv2d(x, dc, c2, 3, stride=2, padding=1, augmult=2),
            cr.clip_reduce_bookkeeping_conv2d_ref(x.double(), dc.double(), c2.double(), 3, 2, 1, 1, 2),
            tol,
        )
        # the noisy step without noise against its closed form: p - lr * (s / B + wd * p)
        p = randn(1031, dtype=dt, gen=gen)
        s = randn(1031, dtype=dt, gen=gen)
        want = p.double() - 0.1 * (s.double() / 4 + 0.01 * p.double())
        ns.noisy_step([p], [s], std=0.0, expected_batch_size=4, seed=1, step=0, lr=0.1, weight_decay=0.01)
        check(f"noisy_step sgd {dt}", p, want, tol)
        q, m = randn(77, dtype=dt, gen=gen), randn(77, dtype=dt, gen=gen)
        ns.noisy_step([q], [m], std=1.0, expected_batch_size=4, seed=1, step=0, lr=0.1, optimizer="adamw")
        check(f"noisy_step adamw {dt} finite", q.isfinite().all().double().view(1), torch.ones(1))
    z = ns.philox_normal(1000, 3, 4, device=DEVICE)
    from fastdp.philox import philox_normal

    check("philox_normal", z, philox_normal(1000, 3, 4, 0, torch.device("cpu")), 1e-5)
    if extension_ops():
        ops = torch.ops.fastdp
        if CUDA:  # the per-example norm of fastdp._C has a CUDA kernel only
            a, d = randn(3, 37, 19, gen=gen), randn(3, 37, 21, gen=gen)
            out = torch.full((3, 21, 19), float("nan"), device=DEVICE)
            check("fastdp._C linear_sq_norms", ops.linear_sq_norms(a, d, out),
                  psn.per_sample_norm_ref(a.double(), d.double()))  # fmt: skip
        # the shifted ghost norm's Gram sum (3x3, 'same', 2 views) against the box additions of the torch path
        from fastdp.rules.conv_ghost import _shift_along

        xg = randn(3, 4, 2 * 49, gen=gen)
        gram = (xg.transpose(1, 2) @ xg).contiguous()
        boxed = gram.view(3, 2, 7, 7, 2, 7, 7)
        for j in range(2):
            boxed = _shift_along(boxed, 2 + j, 5 + j, 7, 3, 1, 1)
        check("fastdp._C shifted_gram", ops.shifted_gram(gram, [7, 7], [7, 7], [3, 3], [1, 1], [1, 1], 2),
              boxed.reshape(3, 98, 98))  # fmt: skip
        grads, c = randn(3, 1000, gen=gen), torch.rand(3, generator=gen).to(DEVICE)
        check("fastdp._C clip_reduce", ops.clip_reduce(grads, c), cr.clip_reduce_ref(grads.double(), c.double()))
        p, s = randn(1031, gen=gen), randn(1031, gen=gen)
        want = p.double() - 0.1 * (s.double() / 4 + 0.01 * p.double())
        ops.noisy_sgd_step_([p], [s], [], [0], 0.0, 4.0, 1, 0, 0.1, 0.0, 0.0, 0.01, False, False)
        check("fastdp._C noisy_sgd_step_", p, want)
    result("smoke", "kernels with a bad result", bad, "", "0", bad == 0)


STAGES = {"norms": stage_norms, "step": stage_step, "noisy": stage_noisy, "smoke": stage_smoke}


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--dry-run"]
    if len(args) != 1 or args[0] not in STAGES:
        say(f"usage: python bench/gpu_validate.py {{{'|'.join(STAGES)}}} [--dry-run]")
        return 2
    stage = args[0]
    say(f"stage {stage} on {device_name()}, torch {torch.__version__}")
    try:
        STAGES[stage]()
    finally:
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, f"{stage}.json"), "w") as f:
                json.dump({"device": device_name(), "dry_run": DRY, "results": RESULTS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
