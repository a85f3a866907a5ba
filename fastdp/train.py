"""``fastdp-train``: differentially private training runs that reproduce the seed papers.

``fastdp-train`` alone trains a small CNN on scikit-learn's embedded digits (any machine, no download).
``fastdp-train --preset cifar10-wrn16-4-eps8`` and the other presets (``--list-presets``) follow the published
recipes on local copies of the datasets; every field of a preset can be overridden (``--lr 2``). The run writes
``metrics.jsonl``, ``summary.json``, ``curves.png`` and ``last.pt`` (a checkpoint ``--resume`` continues from,
bit-for-bit as if never interrupted) into its ``--out-dir``, all readable by their owner only.

By default the run files hold only what the DP guarantee covers or what is public: the step, the learning rate,
epsilon, accuracy on the held-out split and timings. Statistics of the private batches (their realised size, loss
and accuracy, non-finite gradients) are computed and logged only with ``--log-private-stats``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastdp.accounting import compute_epsilon
from fastdp.checkpoint import load_checkpoint, save_checkpoint
from fastdp.data import DistributedPoissonSampler, PoissonSampler, augment, load_dataset, normalize
from fastdp.distributed import broadcast_int, gather_objects, init_from_env, sum_floats
from fastdp.ema import EMA
from fastdp.models import build_model, load_timm_checkpoint
from fastdp.optim import DPOptimizer
from fastdp.presets import PRESETS, TrainConfig, get_preset
from fastdp.report import MetricsLog, plot_curves, write_summary

#: config fields a resumed run may change (where and how it runs, not what it computes)
_RESUMABLE_CHANGES = (
    "device", "threads", "stop_at_step", "checkpoint_every", "eval_every", "dist_timeout", "max_nonfinite_steps",
)  # fmt: skip
#: what fastdp-train puts into last.pt (and reads back on --resume)
_CHECKPOINT_KEYS = (
    "version", "preset", "config", "step", "seconds", "model", "optimizer", "scheduler", "ema", "sampler",
    "augment_rng", "torch_rng", "records",
)  # fmt: skip
_DOC_FIELDS = ("target", "h100_hours", "notes")


class UsageError(Exception):
    """Bad input: reported as one line, without a traceback."""


class NonFiniteStop(Exception):
    """The run stopped after --max-nonfinite-steps noise-only steps in a row (checkpoint and summary written).

    The message (empty on ranks other than 0, which print nothing) says why and how to resume; fastdp-train reports
    it as one line with exit status 1.
    """


# ---------------------------------------------------------------------------------------------- building blocks
def _seeds(seed: int, secret: int, rank: int = 0) -> dict[str, int]:
    """Independent seeds: augmentation and torch's global RNG (stochastic depth) from ``seed``, per rank; the Poisson
    sampler and the noise from ``secret``, the same on every rank. The DP analysis assumes the noise independent of
    the sampling (two generators seeded alike would not be) and both unknown to an adversary."""
    out = {}
    for k, c in zip(("augment", "torch"), np.random.SeedSequence(seed).spawn(2), strict=True):
        out[k] = int(np.random.SeedSequence([int(c.generate_state(1)[0]), rank]).generate_state(1, np.uint64)[0] >> 1)
    for k, c in zip(("sampler", "noise"), np.random.SeedSequence(secret).spawn(2), strict=True):
        out[k] = int(c.generate_state(1, dtype=np.uint64)[0] >> 1)
    return out


def _secret_seed(cfg: TrainConfig, world: int) -> int:
    """cfg.secret_seed, else 63 bits of OS entropy (rank 0's on every rank: the sampling is one global draw)."""
    if cfg.secret_seed is not None:
        return int(cfg.secret_seed)
    secret = int.from_bytes(os.urandom(8), "little") >> 1
    return broadcast_int(secret, dist.group.WORLD) if world > 1 else secret


_OPTIMIZERS = {
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay
    ),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "nadam": lambda params, c: torch.optim.NAdam(params, lr=c.lr, weight_decay=c.weight_decay),
}


def _lr_lambda(cfg: TrainConfig, steps: int):
    warm = max(0, cfg.warmup_steps)

    def factor(t: int) -> float:  # t = optimizer steps taken so far
        if t < warm:
            return (t + 1) / warm
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warm) / max(1, steps - warm))))
        return 1.0

    return factor


def steps_within_budget(cfg: TrainConfig, sample_rate: float, steps: int) -> int:
    """The most steps <= ``steps`` whose epsilon stays within the target, for a given noise multiplier."""

    def eps(t: int) -> float:
        return compute_epsilon(cfg.noise_multiplier, sample_rate, t, cfg.delta, cfg.accountant)

    if eps(steps) <= cfg.epsilon:
        return steps
    if eps(1) > cfg.epsilon:
        return 0
    lo, hi = 1, steps  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= cfg.epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.epsilon > 0, f"--epsilon must be > 0, got {cfg.epsilon}"),
        (0 < cfg.delta < 1, f"--delta must be in (0, 1), got {cfg.delta}"),
        (cfg.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {cfg.max_grad_norm}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.max_physical_batch >= 1, f"--max-physical-batch must be >= 1, got {cfg.max_physical_batch}"),
        (cfg.augmult >= 1, f"--augmult must be >= 1, got {cfg.augmult}"),
        (cfg.steps is not None or (cfg.epochs is not None and cfg.epochs > 0), "give --steps or --epochs > 0"),
        (cfg.steps is None or cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (cfg.noise_multiplier is None or cfg.noise_multiplier >= 0, "--noise-multiplier must be >= 0"),
        (cfg.optimizer in _OPTIMIZERS, f"unknown --optimizer {cfg.optimizer!r}; known: {', '.join(_OPTIMIZERS)}"),
        (cfg.lr_schedule in ("constant", "cosine"), f"--lr-schedule: constant or cosine, not {cfg.lr_schedule!r}"),
        (cfg.amp in ("none", "bf16"), f"--amp must be none or bf16, got {cfg.amp!r}"),
        (cfg.ema_decay is None or 0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.max_nonfinite_steps >= 0, f"--max-nonfinite-steps must be >= 0 (0: never), got {cfg.max_nonfinite_steps}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device} was requested but this torch has no usable GPU; pass --device cpu")


@torch.no_grad()
def evaluate(model: nn.Module, data, cfg: TrainConfig, device: torch.device) -> float:
    """Top-1 accuracy over the whole test set."""
    was_training = model.training
    model.eval()
    correct, n = 0, len(data)
    for start in range(0, n, cfg.max_physical_batch):
        x, y = data.get_batch(torch.arange(start, min(n, start + cfg.max_physical_batch)))
        x = normalize(augment(x.to(device), 1, crop_padding=0, flip=False), data.mean, data.std)
        with _autocast(cfg, device):
            correct += int((model(x).argmax(1) == y.to(device)).sum())
    model.train(was_training)
    return correct / max(1, n)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------- the run
def run(cfg: TrainConfig, preset: str = "custom", resume: dict | None = None, progress: bool = True) -> dict | None:
    """Train with DP as ``cfg`` says; returns the summary (also written to ``<out_dir>/summary.json``).

    Under torchrun (WORLD_SIZE > 1) every rank trains on its share of each global Poisson batch; rank 0 alone
    evaluates, logs, plots and writes checkpoints, and returns the summary (the other ranks return None).
    """
    validate(cfg)
    rank, world, device_name, owns_group = init_from_env(cfg.device, cfg.dist_timeout)
    main_rank = rank == 0
    device = torch.device(device_name)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds = _seeds(cfg.seed, _secret_seed(cfg, world), rank)
    torch.manual_seed(cfg.seed)  # the model's initialisation (rank 0's is broadcast anyway)

    train_data, test_data = load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size)
    n = len(train_data)
    if cfg.batch_size > n:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the training set ({n} examples)")
    q = cfg.batch_size / n
    planned = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs / q))

    model = build_model(cfg.model, num_classes=train_data.num_classes, in_channels=train_data.image_shape[0])
    if cfg.checkpoint and resume is None:
        load_timm_checkpoint(model, cfg.checkpoint)
    model.to(device).train()
    torch.manual_seed(seeds["torch"])

    privacy = dict(
        max_grad_norm=cfg.max_grad_norm, expected_batch_size=cfg.batch_size, augmult=cfg.augmult,
        # the noise and sampling generators' states are in the checkpoint, so a resumed run continues both streams
        # (a checkpoint is therefore as private as the training data)
        clipping=cfg.clipping, accountant=cfg.accountant, seed=seeds["noise"], sample_size=n,
        autotune=cfg.autotune, backend=cfg.backend,
    )  # fmt: skip
    steps = planned
    if cfg.noise_multiplier is None:
        privacy.update(target_epsilon=cfg.epsilon, target_delta=cfg.delta, steps=planned)
    else:
        steps = steps_within_budget(cfg, q, planned)
        if steps == 0:
            raise UsageError(
                f"even one step at --noise-multiplier {cfg.noise_multiplier} with sampling rate {q:.4g} spends more "
                f"than epsilon {cfg.epsilon}; raise the noise multiplier, lower --batch-size, or leave the noise "
                "multiplier out to have it calibrated"
            )
        privacy.update(noise_multiplier=cfg.noise_multiplier)
    inner = _OPTIMIZERS[cfg.optimizer]([p for p in model.parameters() if p.requires_grad], cfg)
    opt = DPOptimizer(inner, model, **privacy)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay is not None else None
    if world > 1:
        sampler = DistributedPoissonSampler(n, sample_rate=q, steps=steps, seed=seeds["sampler"])
    else:
        sampler = PoissonSampler(n, sample_rate=q, steps=steps, seed=seeds["sampler"])
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(seeds["augment"])

    out_dir = Path(cfg.out_dir)
    if main_rank:  # private like the checkpoint it will hold (an existing directory keeps its mode)
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    step, elapsed, records = 0, 0.0, []
    nonfinite_streak = 0  # steps in a row in which every example's gradient was non-finite
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        sampler.load_state_dict(resume["sampler"])
        if len(resume["augment_rng"]) != world:
            raise UsageError(
                f"the checkpoint was written by {len(resume['augment_rng'])} process(es); resume it with the same "
                f"number (this job has {world}): every rank's augmentation RNG is restored"
            )
        aug_gen.set_state(resume["augment_rng"][rank])
        torch.set_rng_state(resume["torch_rng"][rank])
        step, elapsed, records = resume["step"], resume["seconds"], resume["records"]
        nonfinite_streak = int(resume.get("nonfinite_streak", 0))
    # only rank 0 writes files and prints
    log = MetricsLog(out_dir / "metrics.jsonl", records, write=main_rank)
    say = print if main_rank else (lambda *a, **k: None)

    def checkpoint() -> Path:
        rngs = gather_objects((aug_gen.get_state(), torch.get_rng_state()))  # every rank takes part
        path = out_dir / "last.pt"
        if main_rank:
            save_checkpoint(path, {
                "version": 1, "preset": preset, "config": dataclasses.asdict(cfg), "step": step,
                "seconds": elapsed + time.perf_counter() - start, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "ema": None if ema is None else ema.state_dict(), "sampler": sampler.state_dict(),
                "augment_rng": [a for a, _ in rngs], "torch_rng": [t for _, t in rngs], "records": log.records,
                "nonfinite_streak": nonfinite_streak,
            })  # fmt: skip
        return path

    def evaluation() -> dict:
        if not main_rank:
            return {}
        rec = {
            "step": step,
            "epsilon": opt.epsilon(cfg.delta),
            "test_accuracy": evaluate(model, test_data, cfg, device),
        }
        if ema is not None:
            with ema.applied(model):
                rec["ema_test_accuracy"] = evaluate(model, test_data, cfg, device)
        return rec

    say(
        f"fastdp-train {preset}: {cfg.model} on {cfg.dataset} ({n} train / {len(test_data)} test), {steps} steps of "
        f"expected batch {cfg.batch_size} x augmult {cfg.augmult}, sigma={opt.noise_multiplier:.4f}, "
        f"C={cfg.max_grad_norm}, target ({cfg.epsilon}, {cfg.delta})-DP, {world} process(es), out: {out_dir}",
        flush=True,
    )
    if steps < planned:
        say(f"fastdp-train: stopping after {steps} of {planned} steps: step {steps + 1} would exceed epsilon "
              f"{cfg.epsilon} at sigma {cfg.noise_multiplier}", flush=True)  # fmt: skip
    eval_every = cfg.eval_every or max(1, steps // 10)
    last = min(steps, cfg.stop_at_step) if cfg.stop_at_step else steps
    per_chunk = max(1, cfg.max_physical_batch // cfg.augmult)  # examples per forward/backward
    bar = _progress(progress and main_rank, step, last)
    start = time.perf_counter()
    batches = iter(sampler)
    while step < last:
        # draw only a batch that will be used: the sampler's state in a checkpoint is then exactly where the next
        # step of an uninterrupted run draws from
        idx = next(batches)
        idx = torch.as_tensor(idx, dtype=torch.long)
        # the private statistics stay on the device until the end of the step: one host read, not one per chunk
        stats = torch.zeros(2, device=device) if cfg.log_private_stats else None  # loss sum, correct
        rows = 0
        # an empty Poisson batch has no forward or backward: its step is noise only (idx.split would yield one
        # empty chunk)
        for chunk in idx.split(per_chunk) if len(idx) else ():
            x, y = train_data.get_batch(chunk)
            x = augment(x.to(device), cfg.augmult, crop_padding=cfg.crop_padding, flip=cfg.flip, generator=aug_gen)
            x = normalize(x, train_data.mean, train_data.std)
            y = y.to(device).repeat_interleave(cfg.augmult)
            with _autocast(cfg, device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            rows += len(y)
            if stats is not None:
                stats += torch.stack((loss.detach() * len(y), (logits.argmax(1) == y).sum().to(stats.dtype)))
        opt.step()
        sched.step()
        opt.zero_grad()
        if ema is not None:
            ema.update(model)
        step += 1
        rec = {"step": step, "lr": sched.get_last_lr()[0], "seconds": round(elapsed + time.perf_counter() - start, 2)}
        # the counts the step needs on the host, added over the ranks in one all-reduce (none when nothing is needed)
        counts = [opt.nonfinite_last_batch, opt.examples_last_batch] if cfg.max_nonfinite_steps else []
        if stats is not None:
            counts += [len(idx), rows, *stats.tolist()]
        counts = sum_floats(counts) if counts else []
        if cfg.max_nonfinite_steps:
            (nonfinite, examples), counts = counts[:2], counts[2:]
            if examples:  # an empty batch says nothing either way
                nonfinite_streak = nonfinite_streak + 1 if nonfinite == examples else 0
        if stats is not None:
            batch, rows, loss_sum, correct = counts
            rec["batch"] = int(batch)
            if rows:
                rec.update(loss=loss_sum / rows, train_accuracy=correct / rows)
        if step % eval_every == 0 or step == steps:
            rec.update(evaluation())
        log.write(rec)
        bar.update(rec)
        if cfg.max_nonfinite_steps and nonfinite_streak >= cfg.max_nonfinite_steps:
            break  # every rank: the counts were added up over them
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < last:
            checkpoint()
    bar.close()
    ckpt = checkpoint()
    if owns_group:
        # leave together: a rank tearing down gloo while its peer is still sending aborts the peer's process
        dist.barrier()
        dist.destroy_process_group()
    nonfinite_stop = bool(cfg.max_nonfinite_steps) and nonfinite_streak >= cfg.max_nonfinite_steps and step < last
    if not main_rank:
        if nonfinite_stop:
            raise NonFiniteStop()
        return None

    final = log.records[-1] if log.records else {"step": 0}
    if "test_accuracy" not in final:
        final = {**final, **evaluation()}
        log.write(
            {"step": step, **{k: final[k] for k in ("epsilon", "test_accuracy", "ema_test_accuracy") if k in final}}
        )
    summary = {
        "preset": preset, "train_examples": n, "finished": step >= steps, "step": step, "steps": steps,
        "planned_steps": planned,
        "test_accuracy": final["test_accuracy"], "ema_test_accuracy": final.get("ema_test_accuracy"),
        "epsilon": final["epsilon"], "delta": cfg.delta, "target_epsilon": cfg.epsilon,
        "noise_multiplier": opt.noise_multiplier, "accountant": cfg.accountant,
        "seconds": round(elapsed + time.perf_counter() - start, 1),
        "target": cfg.target, "checkpoint": str(ckpt), "metrics": str(log.path),
        "plot": str(plot_curves(out_dir / "curves.png", log.records, f"fastdp-train {preset}")),
    }  # fmt: skip
    if cfg.log_private_stats:  # under torchrun: rank 0's examples only
        summary["nonfinite_examples"] = opt.nonfinite_examples
    write_summary(out_dir / "summary.json", summary)
    print(json.dumps(summary), flush=True)
    if nonfinite_stop:
        print(f"fastdp-train: plot {summary['plot']}", flush=True)
        raise NonFiniteStop(_nonfinite_message(step, nonfinite_streak, ckpt))
    if not summary["finished"]:
        print(f"fastdp-train: stopped at step {step} of {steps}; continue with: fastdp-train --resume {ckpt}")
    print(f"fastdp-train: plot {summary['plot']}", flush=True)
    return summary


def _nonfinite_message(step: int, streak: int, ckpt: Path) -> str:
    return (
        f"stopped at step {step}: every example of the last {streak} logical batches had a non-finite gradient "
        "(NaN/inf), so those steps were noise only and spent privacy without learning. Likely causes: the training "
        "diverged (start a new run with a lower --lr; a resumed run keeps its --lr), NaN/inf in the data, or an "
        f"overflow under --amp bf16. The checkpoint is {ckpt}; to continue anyway: fastdp-train --resume {ckpt} "
        "--max-nonfinite-steps 0 (0: never stop; N: allow N such steps in a row)"
    )


class _progress:
    """tqdm bar with epsilon and test accuracy, and the private batches' loss and accuracy if they are logged (a
    no-op when disabled or tqdm is missing)."""

    def __init__(self, enabled: bool, initial: int, total: int) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.post: dict[str, str] = {}

    def update(self, rec: dict) -> None:
        if self.bar is None:
            return
        if "loss" in rec:
            self.post.update(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_accuracy']:.3f}")
        if "epsilon" in rec:
            self.post.update(eps=f"{rec['epsilon']:.2f}", test=f"{rec['test_accuracy']:.3f}")
        self.bar.set_postfix(self.post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- command line
def _parse_value(text: str, annotation: str):
    optional = "None" in annotation
    if optional and text.lower() == "none":
        return None
    for kind, conv in (("int", int), ("float", float)):
        if annotation.startswith(kind):
            return conv(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastdp-train", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="digits", help="a recipe (--list-presets); its fields below can be overridden")
    p.add_argument("--list-presets", action="store_true", help="print the presets with their targets and exit")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run of this last.pt (or its directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _DOC_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help")
        # SUPPRESS: a field not given is absent from the namespace, so "--checkpoint none" can still set None
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(
                flag,
                default=argparse.SUPPRESS,
                metavar=f.type.split(" ")[0].upper(),
                type=lambda s, t=f.type: _parse_value(s, t),
                help=help_text,
            )
    return p


def _config(args: argparse.Namespace) -> tuple[str, TrainConfig, dict | None]:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume:
        path = Path(args.resume)
        path = path / "last.pt" if path.is_dir() else path
        state = load_checkpoint(path)
        missing = [k for k in _CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(_CHECKPOINT_KEYS)
        if missing:
            raise UsageError(
                f"{path} is not a fastdp-train checkpoint (it has no {', '.join(missing)}); pass the last.pt (or the "
                "--out-dir) of a fastdp-train run"
            )
        changed = sorted(k for k in given if k not in _RESUMABLE_CHANGES and given[k] != state["config"].get(k))
        if changed:
            raise UsageError(
                f"a resumed run keeps its configuration; cannot change {', '.join(changed)} "
                f"(only {', '.join(_RESUMABLE_CHANGES)} may change)"
            )
        # a stop point belongs to the invocation that gave it
        cfg = TrainConfig(**state["config"]).replace(stop_at_step=None).replace(**given)
        return state["preset"], cfg, state
    preset = args.preset
    cfg = get_preset(preset).replace(**given)
    if cfg.out_dir is None:
        cfg = cfg.replace(out_dir=str(Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    return preset, cfg, None


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for name, cfg in PRESETS.items():
            print(f"{name:28s} {cfg.target}\n{'':28s} model {cfg.model}, dataset {cfg.dataset}, H100: {cfg.h100_hours}")
        return None
    try:
        preset, cfg, state = _config(args)
        return run(cfg, preset, resume=state, progress=not args.no_progress)
    except NonFiniteStop as e:
        sys.exit(f"fastdp-train: {e}" if str(e) else 1)
    except (UsageError, ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get("FASTDP_DEBUG"):
            raise
        # FileNotFoundError covers fastdp.data.DatasetNotFound: its message says what is missing and where it goes;
        # ValueError covers fastdp.checkpoint.CheckpointError (a checkpoint refused unread)
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        sys.exit(f"fastdp-train: {message}")


def cli() -> None:
    """Console entry point (``fastdp-train``): exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli()
