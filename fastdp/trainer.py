"""One ``fastdp-train`` run: setup, restore from a checkpoint, the training loop and the summary.

``fastdp/train.py`` is the command line around it: it parses and checks every argument, takes the run folder and
handles signals before this module (and torch) is imported. :func:`run` trains as a checked ``TrainConfig`` says
and writes ``metrics.jsonl``, ``summary.json``, ``curves.png`` and ``last.pt`` into its ``out_dir``, all readable by
their owner only.

By default the run files hold only what the DP guarantee covers or what is public: the step, the learning rate,
epsilon, accuracy on the held-out split and timings. Statistics of the private batches (their realised size, loss
and accuracy, non-finite gradients) are computed and logged only with ``log_private_stats``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastdp.accounting import compute_epsilon
from fastdp.checkpoint import save_checkpoint
from fastdp.data import DistributedPoissonSampler, PoissonSampler, augment, load_dataset, normalize
from fastdp.data.image_dataset import ImageDataset
from fastdp.distributed import active_group, broadcast_int, gather_objects, init_from_env
from fastdp.ema import EMA
from fastdp.host_read import HostRead
from fastdp.models import build_model, load_timm_checkpoint
from fastdp.optim import DPOptimizer
from fastdp.presets import TrainConfig
from fastdp.report import MetricsLog, plot_curves, write_summary
from fastdp.train import Interrupted, NonFiniteStop, StopOnSignal, UsageError

# ---------------------------------------------------------------------------------------------- building blocks
_OPTIMIZERS = {
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay
    ),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "nadam": lambda params, c: torch.optim.NAdam(params, lr=c.lr, weight_decay=c.weight_decay),
}


def _seeds(secret: int, rank: int = 0) -> dict[str, int]:
    """Independent seeds, all from ``secret``: the Poisson sampler and the noise, the same on every rank;
    augmentation and torch's global RNG (dropout, stochastic depth), per rank. The DP analysis assumes the noise
    independent of the sampling (two generators seeded alike would not be) and every one of them unknown to an
    adversary: the augmentations and masks are drawn in one stream in batch order, so with a known seed the removal of
    one example would change which views every later example gets, and the clipped sum in many terms, not one (a
    review found the augmentation seeded from the public ``--seed``). The model's initialisation alone uses ``--seed``:
    it does not depend on the data."""
    children = np.random.SeedSequence(secret).spawn(4)
    out = {}
    for k, c in zip(("sampler", "noise"), children[:2], strict=True):
        out[k] = int(c.generate_state(1, dtype=np.uint64)[0] >> 1)
    for k, c in zip(("augment", "torch"), children[2:], strict=True):
        out[k] = int(np.random.SeedSequence([int(c.generate_state(1)[0]), rank]).generate_state(1, np.uint64)[0] >> 1)
    return out


def _secret_seed(cfg: TrainConfig, world: int) -> int:
    """cfg.secret_seed, else 63 bits of OS entropy (rank 0's on every rank: the sampling is one global draw)."""
    if cfg.secret_seed is not None:
        return int(cfg.secret_seed)
    secret = int.from_bytes(os.urandom(8), "little") >> 1
    return broadcast_int(secret, dist.group.WORLD) if world > 1 else secret


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


# ---------------------------------------------------------------------------------------------- the run's state
@dataclasses.dataclass
class _Run:
    """Everything the loop, the checkpoint and the summary share."""

    cfg: TrainConfig
    preset: str
    rank: int
    world: int
    owns_group: bool
    device: torch.device
    train_data: ImageDataset
    test_data: ImageDataset
    planned: int  # steps the configuration asks for
    steps: int  # steps the run takes (fewer when a given sigma would exceed the target epsilon first)
    model: nn.Module
    opt: DPOptimizer
    sched: Any
    ema: EMA | None
    sampler: PoissonSampler
    aug_gen: torch.Generator
    out_dir: Path
    step: int = 0
    elapsed: float = 0.0  # seconds of earlier invocations
    records: list = dataclasses.field(default_factory=list)
    nonfinite_streak: int = 0  # steps in a row in which every example's gradient was non-finite
    started: float = dataclasses.field(default_factory=time.perf_counter)
    log: MetricsLog | None = None
    signal: str = ""  # the signal that interrupted the loop

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 only."""
        if self.main_rank:
            print(*args, **kwargs)


def run(
    cfg: TrainConfig,
    preset: str = "custom",
    resume: dict | None = None,
    progress: bool = True,
    stop: StopOnSignal | None = None,
) -> dict | None:
    """Train with DP as ``cfg`` says (checked by fastdp.train); returns the summary (also in ``summary.json``).

    Under torchrun (WORLD_SIZE > 1) every rank trains on its share of each global Poisson batch; rank 0 alone
    evaluates, logs, plots and writes checkpoints, and returns the summary (the other ranks return None).

    Args:
        cfg: the run's configuration.
        preset: its name, for the files and messages.
        resume: a fastdp-train checkpoint to continue from.
        progress: show a progress bar.
        stop: the signal handler of fastdp-train: from the first step on, a signal ends the run after the step in
            progress, with a checkpoint (:class:`fastdp.train.Interrupted`); the ranks of a torchrun job agree on
            the step.

    Raises:
        UsageError: the data does not fit the configuration (a batch larger than the training set, a given sigma
            that cannot take one step within the target epsilon).
        NonFiniteStop: ``max_nonfinite_steps`` noise-only steps in a row (checkpoint and summary written).
        Interrupted: ``stop_requested`` said so (checkpoint written).
    """
    r = _setup(cfg, preset, resume)
    if resume is not None:
        _restore(r, resume)
    if r.main_rank:
        # a resumed run rewrites metrics.jsonl from the checkpoint's records (lines written after it are dropped)
        r.log = MetricsLog(r.out_dir / "metrics.jsonl", r.records, write=True)
    else:
        r.log = MetricsLog(r.out_dir / "metrics.jsonl", r.records, write=False)
    _announce(r)
    outcome = _loop(r, progress, stop)
    ckpt = _checkpoint(r)
    if r.owns_group:
        # leave together: a rank tearing down gloo while its peer is still sending aborts the peer's process
        dist.barrier()
        dist.destroy_process_group()
    if outcome == "interrupted":
        raise Interrupted(r.signal, r.step, r.steps, ckpt if r.main_rank else None)
    if not r.main_rank:
        if outcome == "nonfinite":
            raise NonFiniteStop()
        return None
    return _summary(r, outcome, ckpt)


def _setup(cfg: TrainConfig, preset: str, resume: dict | None) -> _Run:
    """Data, model, optimizer (sigma calibrated, or restored from ``resume``), sampler and augmentation RNG."""
    rank, world, device_name, owns_group = init_from_env(cfg.device, cfg.dist_timeout)
    device = torch.device(device_name)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds = _seeds(_secret_seed(cfg, world), rank)
    torch.manual_seed(cfg.seed)  # the model's initialisation (rank 0's is broadcast anyway)

    train_data, test_data = load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size)
    n = len(train_data)
    if cfg.batch_size > n:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the training set ({n} examples)")
    if cfg.delta >= 1.0 / n:
        # (epsilon, delta) with delta >= 1/N allows publishing a random example outright; PLD calibration at such a
        # delta also ran for minutes without a word (a review's finding)
        raise UsageError(
            f"--delta {cfg.delta:g} is not below 1/N = {1.0 / n:.3g} for the {n} training examples: such a guarantee "
            "allows publishing an example outright; choose it well below 1/N (e.g. 1e-5 for N of about 50k)"
        )
    q = cfg.batch_size / n
    planned = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs / q))

    model = build_model(
        cfg.model, num_classes=train_data.num_classes, image_size=train_data.image_shape[-1],
        in_channels=train_data.image_shape[0],
    )  # fmt: skip
    if cfg.checkpoint and resume is None:
        load_timm_checkpoint(model, cfg.checkpoint)
    model.to(device).train()
    torch.manual_seed(seeds["torch"])

    privacy = dict(
        max_grad_norm=cfg.max_grad_norm, expected_batch_size=cfg.batch_size, augmult=cfg.augmult,
        # the noise and sampling generators' states are in the checkpoint, so a resumed run continues both streams
        # (a checkpoint is therefore as private as the training data)
        clipping=cfg.clipping, accountant=cfg.accountant, seed=seeds["noise"], sample_size=n,
        autotune=cfg.autotune, backend=cfg.backend, secure_rng=cfg.secure_rng,
    )  # fmt: skip
    steps = planned
    if resume is not None:
        # sigma and the run's steps are in the checkpoint: no calibration or budget search again (PLD: seconds to
        # minutes), and the same values even if the accounting library changed in between
        steps = int(resume["sampler"]["steps"])
        privacy.update(noise_multiplier=float(resume["optimizer"]["noise_multiplier"]))
    elif cfg.noise_multiplier is None:
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
    if rank == 0:  # private like the checkpoint it will hold (an existing directory keeps its mode)
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return _Run(
        cfg=cfg, preset=preset, rank=rank, world=world, owns_group=owns_group, device=device, train_data=train_data,
        test_data=test_data, planned=planned, steps=steps, model=model, opt=opt, sched=sched, ema=ema,
        sampler=sampler, aug_gen=aug_gen, out_dir=out_dir,
    )  # fmt: skip


def _restore(r: _Run, state: dict) -> None:
    """Continue from a fastdp-train checkpoint: every generator, the optimizer, EMA, schedule and records."""
    if len(state["augment_rng"]) != r.world:
        raise UsageError(
            f"the checkpoint was written by {len(state['augment_rng'])} process(es); resume it with the same "
            f"number (this job has {r.world}): every rank's augmentation RNG is restored"
        )
    r.model.load_state_dict(state["model"])
    r.opt.load_state_dict(state["optimizer"])
    r.sched.load_state_dict(state["scheduler"])
    if r.ema is not None:
        r.ema.load_state_dict(state["ema"])
    r.sampler.load_state_dict(state["sampler"])
    r.aug_gen.set_state(state["augment_rng"][r.rank])
    torch.set_rng_state(state["torch_rng"][r.rank])
    r.step, r.elapsed, r.records = state["step"], state["seconds"], state["records"]
    r.nonfinite_streak = int(state.get("nonfinite_streak", 0))


def _announce(r: _Run) -> None:
    cfg = r.cfg
    r.say(
        f"fastdp-train {r.preset}: {cfg.model} on {cfg.dataset} ({len(r.train_data)} train / {len(r.test_data)} "
        f"test), {r.steps} steps of expected batch {cfg.batch_size} x augmult {cfg.augmult}, "
        f"sigma={r.opt.noise_multiplier:.4f}, C={cfg.max_grad_norm}, target ({cfg.epsilon}, {cfg.delta})-DP, "
        f"{r.world} process(es), out: {r.out_dir}",
        flush=True,
    )
    if r.steps < r.planned:
        r.say(f"fastdp-train: stopping after {r.steps} of {r.planned} steps: step {r.steps + 1} would exceed epsilon "
              f"{cfg.epsilon} at sigma {cfg.noise_multiplier}", flush=True)  # fmt: skip


def _checkpoint(r: _Run) -> Path:
    rngs = gather_objects((r.aug_gen.get_state(), torch.get_rng_state()))  # every rank takes part
    path = r.out_dir / "last.pt"
    if r.main_rank:
        save_checkpoint(path, keep_previous=True, state={
            "version": 1, "preset": r.preset, "config": dataclasses.asdict(r.cfg), "step": r.step,
            "seconds": r.seconds(), "model": r.model.state_dict(),
            "optimizer": r.opt.state_dict(), "scheduler": r.sched.state_dict(),
            "ema": None if r.ema is None else r.ema.state_dict(), "sampler": r.sampler.state_dict(),
            "augment_rng": [a for a, _ in rngs], "torch_rng": [t for _, t in rngs], "records": r.log.records,
            "nonfinite_streak": r.nonfinite_streak, "finished": r.step >= r.steps,
        })  # fmt: skip
    return path


def _evaluation(r: _Run) -> dict:
    if not r.main_rank:
        return {}
    rec = {
        "step": r.step,
        "epsilon": r.opt.epsilon(r.cfg.delta),
        "test_accuracy": evaluate(r.model, r.test_data, r.cfg, r.device),
    }
    if r.ema is not None:
        with r.ema.applied(r.model):
            rec["ema_test_accuracy"] = evaluate(r.model, r.test_data, r.cfg, r.device)
    return rec


def _train_step(r: _Run, idx: torch.Tensor, per_chunk: int) -> torch.Tensor | None:
    """One logical batch: a forward and backward per chunk, then the DP step. Returns the private statistics
    (rows, loss sum, correct) when they are logged, added up on the device (read by the host later, see _Pending)."""
    cfg = r.cfg
    stats = torch.zeros(3, device=r.device) if cfg.log_private_stats else None
    # an empty Poisson batch has no forward or backward: its step is noise only (idx.split would yield one empty chunk)
    for chunk in idx.split(per_chunk) if len(idx) else ():
        x, y = r.train_data.get_batch(chunk)
        x = augment(x.to(r.device), cfg.augmult, crop_padding=cfg.crop_padding, flip=cfg.flip, generator=r.aug_gen)
        x = normalize(x, r.train_data.mean, r.train_data.std)
        y = y.to(r.device).repeat_interleave(cfg.augmult)
        with _autocast(cfg, r.device):
            logits = r.model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        if stats is not None:
            correct = (logits.argmax(1) == y).sum().to(stats.dtype)
            stats += torch.stack((torch.full_like(correct, len(y)), loss.detach() * len(y), correct))
    r.opt.step()
    r.sched.step()
    r.opt.zero_grad()
    if r.ema is not None:
        r.ema.update(r.model)
    return stats


class _Pending:
    """A step's record, waiting for the numbers the host needs of it: whether a signal asked to stop, the examples
    and non-finite examples of the batch (--max-nonfinite-steps) and the private statistics (--log-private-stats).

    They are counted on the device and, under torchrun, added up over the ranks with one all-reduce queued on it; the
    host reads them ``_READ_LAG`` steps later (fastdp.host_read), so a GPU is never left waiting for the host to read
    a number. Every rank reads step t's numbers at the same point of the loop: the ranks agree on when to stop.
    """

    def __init__(self, r: _Run, rec: dict, signal: bool, batch: int, stats: torch.Tensor | None) -> None:
        self.rec = rec
        host = [1.0 if signal else 0.0, float(r.opt.examples_last_batch), float(batch)]
        device = []
        if r.cfg.max_nonfinite_steps:
            device.append(torch.as_tensor(r.opt.nonfinite_last_batch_tensor, device=r.device).float())
        if stats is not None:
            device.extend(stats.unbind())
        vec = torch.stack(device) if device else None
        group = active_group()
        if group is not None:  # one all-reduce of everything: the host numbers travel with the device ones
            on = r.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
            head = torch.tensor(host, dtype=torch.float32)
            head = head.pin_memory().to(on, non_blocking=True) if on.type == "cuda" else head
            vec = head if vec is None else torch.cat((head, vec.to(on)))
            dist.all_reduce(vec, group=group)
            host = None
        self.host, self.read = host, None if vec is None else HostRead(vec)

    def numbers(self) -> tuple[bool, float, float, list[float]]:
        """(a signal on some rank, examples, batch, device numbers), waiting for the copy if it has not landed."""
        values = [] if self.read is None else self.read.value()
        if self.host is None:
            self.host, values = values[:3], values[3:]
        signal, examples, batch = self.host
        return bool(signal), examples, batch, values


def _read_lag(device: torch.device) -> int:
    """Steps between a step and the host reading its numbers: 1 on a GPU (they are read while the next step runs), 0
    on the CPU (there is no queue to keep fed)."""
    return 1 if device.type == "cuda" else 0


def _loop(r: _Run, progress: bool, stop: StopOnSignal | None) -> str:
    """Train until the last step of this invocation; returns why it ended: "finished", "stopped" (--stop-at-step),
    "nonfinite" (--max-nonfinite-steps) or "interrupted" (a signal, named in ``r.signal``)."""
    cfg = r.cfg
    eval_every = cfg.eval_every or max(1, r.steps // 10)
    last = min(r.steps, cfg.stop_at_step) if cfg.stop_at_step else r.steps
    per_chunk = max(1, cfg.max_physical_batch // cfg.augmult)  # examples per forward/backward
    lag = _read_lag(r.device)
    bar = _progress(progress and r.main_rank, r.step, last)
    r.started = time.perf_counter()
    batches = iter(r.sampler)
    pending: deque[_Pending] = deque()

    def settle(keep: int) -> str | None:
        """Write the records of all but the last ``keep`` pending steps; why to stop, if one of them says so."""
        outcome = None
        while len(pending) > keep:
            p = pending.popleft()
            signal, examples, batch, values = p.numbers()
            if cfg.max_nonfinite_steps:
                nonfinite, values = values[0], values[1:]
                if examples:  # an empty batch says nothing either way
                    r.nonfinite_streak = r.nonfinite_streak + 1 if nonfinite == examples else 0
                if r.nonfinite_streak >= cfg.max_nonfinite_steps:
                    outcome = outcome or "nonfinite"
            if values:
                rows, loss_sum, correct = values
                p.rec["batch"] = int(batch)
                if rows:
                    p.rec.update(loss=loss_sum / rows, train_accuracy=correct / rows)
            r.log.write(p.rec)
            bar.update(p.rec)
            if signal:
                r.signal = r.signal or "a signal to another rank"
                outcome = "interrupted"
        return outcome

    if stop is not None:  # from here on a signal stops the run after a complete step, with a checkpoint
        stop.deferred = True
    try:
        while r.step < last:
            # draw only a batch that will be used: the sampler's state in a checkpoint is then exactly where the next
            # step of an uninterrupted run draws from
            idx = torch.as_tensor(next(batches), dtype=torch.long)
            stats = _train_step(r, idx, per_chunk)
            r.step += 1
            rec = {"step": r.step, "lr": r.sched.get_last_lr()[0], "seconds": round(r.seconds(), 2)}
            if r.step % eval_every == 0 or r.step == r.steps:
                rec.update(_evaluation(r))
            signal = stop.requested() if stop is not None else None
            r.signal = r.signal or signal or ""
            pending.append(_Pending(r, rec, bool(signal), len(idx), stats))
            checkpoint = cfg.checkpoint_every and r.step % cfg.checkpoint_every == 0 and r.step < last
            outcome = settle(0 if checkpoint else lag)
            if outcome == "nonfinite" and r.step >= last:
                outcome = None  # the run ends here anyway
            if outcome:
                settle(0)
                return outcome
            if checkpoint:
                _checkpoint(r)
        settle(0)
        return "finished" if r.step >= r.steps else "stopped"
    finally:
        bar.close()


def _summary(r: _Run, outcome: str, ckpt: Path) -> dict:
    """summary.json and curves.png; the one-line messages of a run that did not finish."""
    cfg, log = r.cfg, r.log
    final = log.records[-1] if log.records else {"step": 0}
    if "test_accuracy" not in final:
        final = {**final, **_evaluation(r)}
        log.write(
            {"step": r.step, **{k: final[k] for k in ("epsilon", "test_accuracy", "ema_test_accuracy") if k in final}}
        )
    summary = {
        "preset": r.preset, "train_examples": len(r.train_data), "finished": r.step >= r.steps, "step": r.step,
        "steps": r.steps, "planned_steps": r.planned,
        "test_accuracy": final["test_accuracy"], "ema_test_accuracy": final.get("ema_test_accuracy"),
        "epsilon": final["epsilon"], "delta": cfg.delta, "target_epsilon": cfg.epsilon,
        "noise_multiplier": r.opt.noise_multiplier, "accountant": cfg.accountant,
        "seconds": round(r.seconds(), 1),
        "target": cfg.target, "checkpoint": str(ckpt), "metrics": str(log.path),
        "plot": str(plot_curves(r.out_dir / "curves.png", log.records, f"fastdp-train {r.preset}")),
    }  # fmt: skip
    if cfg.log_private_stats:  # under torchrun: rank 0's examples only
        summary["nonfinite_examples"] = r.opt.nonfinite_examples
    write_summary(r.out_dir / "summary.json", summary)
    print(json.dumps(summary), flush=True)
    if outcome == "nonfinite":
        print(f"fastdp-train: plot {summary['plot']}", flush=True)
        raise NonFiniteStop(_nonfinite_message(r.step, r.nonfinite_streak, ckpt))
    if not summary["finished"]:
        print(f"fastdp-train: stopped at step {r.step} of {r.steps}; continue with: fastdp-train --resume {ckpt}")
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
