"""Training recipes: one ``TrainConfig`` per published result fastdp-train reproduces.

Every field can be overridden from the command line (``--lr 2``, ``--augmult 8``, ...). ``target`` states the
published figure a preset aims at and ``h100_hours`` the time it needs on one H100 (estimated from the step count
and the model's FLOPs until it is measured; bench/RESULTS.md has what was measured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

#: what the command line accepts for the fields with a fixed set of values (fastdp-train checks them up front,
#: before importing torch; tests/test_train_cli.py keeps them equal to the registries they name)
DATASETS = ("digits", "cifar10", "imagenette", "imagenet")  # fastdp.data.DATASETS
MODELS = ("digits_cnn", "wrn-16-4", "wrn-40-4", "smoothnet_v1", "nf_resnet50", "nfnet-f0", "nfnet-f1", "nfnet-f2",
          "nfnet-f3", "vit-s", "vit-mini")  # fastdp.models.IMAGE_MODEL_NAMES, and any wrn-<depth>-<width>  # fmt: skip
ACCOUNTANTS = ("pld", "rdp")  # fastdp.accounting.MECHANISMS
CLIPPINGS = ("flat", "automatic")
BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")  # fastdp.backends.KNOWN and auto
OPTIMIZERS = ("sgd", "adam", "adamw", "nadam")
LR_SCHEDULES = ("constant", "cosine")
AMPS = ("none", "bf16")


def _opt(default, help: str, choices: tuple[str, ...] | None = None, **kw):
    """A TrainConfig field with its --help text (fastdp-train adds the default) and its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices}, **kw)


@dataclass
class TrainConfig:
    """One DP training run. Sizes are in examples unless they say rows (rows = examples x augmult).

    Each field is a command-line option of fastdp-train (``out_dir`` is ``--out-dir``); its metadata holds the
    option's help text and, for a fixed set of values, the choices.
    """

    # what
    dataset: str = _opt("digits", "training data, read from a local folder (nothing is downloaded)", DATASETS)
    data_root: str | None = _opt(
        None, "folder of the dataset; none: $FASTDP_DATA/<dataset>, FASTDP_DATA defaulting to ~/.cache/fastdp/data"
    )
    image_size: int | None = _opt(
        None, "side of the square images of imagenette/imagenet (none: 224); digits and cifar10 keep their size"
    )
    model: str = _opt("digits_cnn", "architecture (or any wrn-<depth>-<width>, depth = 6n+4)", MODELS)
    checkpoint: str | None = _opt(None, "a local timm-layout state_dict to fine-tune from (none: from scratch)")
    # privacy
    epsilon: float = _opt(8.0, "target epsilon of (epsilon, delta)-DP for the whole run (> 0)")
    delta: float = _opt(1e-5, "target delta, in (0, 1); choose it well below 1/N")
    noise_multiplier: float | None = _opt(
        None,
        "sigma (noise std / C); none: calibrated so that the run ends at the target epsilon. With a given "
        "sigma the run stops before the step that would exceed it",
    )
    accountant: str = _opt("pld", "privacy accountant of dp-accounting: pld (tight) or rdp (looser, faster)",
                           ACCOUNTANTS)  # fmt: skip
    max_grad_norm: float = _opt(1.0, "clipping bound C of each example's gradient (> 0)")
    clipping: str = _opt("flat", "flat: min(1, C/|g|); automatic: C / (|g| + gamma)", CLIPPINGS)
    autotune: bool = _opt(
        True,
        "time each layer's strategies once per input shape; --no-autotune: the analytic cost model (the same "
        "plan in every process)",
    )
    backend: str = _opt(
        "auto", "kernels of the per-layer plan and the step (auto: the best available); kept on --resume", BACKENDS
    )
    secure_rng: bool = _opt(
        False,
        "draw the noise from OS entropy (os.urandom, Box-Muller on the host) instead of the seeded Philox stream: "
        "no seed in the checkpoint to steal, not reproducible, and slower (0.15-0.5 s per million parameters per "
        "step on a CPU core; bench/bench_secure_rng.py); kept on --resume",
    )
    # schedule
    batch_size: int = _opt(256, "expected logical batch B in examples (Poisson sampling, q = B/N)")
    max_physical_batch: int = _opt(256, "rows per forward/backward (memory); does not change the result")
    augmult: int = _opt(1, "augmentation multiplicity K: views per example, their gradients averaged, clipped once")
    epochs: float | None = _opt(40.0, "training length in epochs (steps: round(epochs N / B)); none: give --steps")
    steps: int | None = _opt(None, "training length in steps; overrides --epochs")
    # optimiser
    optimizer: str = _opt("sgd", "the optimizer under DP", OPTIMIZERS)
    lr: float = _opt(2.0, "learning rate (finite, >= 0)")
    momentum: float = _opt(0.0, "SGD momentum (>= 0)")
    nesterov: bool = _opt(False, "Nesterov momentum (SGD, needs --momentum > 0)")
    weight_decay: float = _opt(0.0, "weight decay (>= 0)")
    lr_schedule: str = _opt("constant", "learning-rate schedule after the warm-up", LR_SCHEDULES)
    warmup_steps: int = _opt(0, "steps of linear learning-rate warm-up")
    ema_decay: float | None = _opt(
        None,
        "decay of an exponential moving average of the parameters, evaluated next to them (e.g. 0.9999; none: no EMA)",
    )
    ema_warmup: bool = _opt(True, "EMA decay warm-up (min(decay, (1+t)/(10+t)))")
    # augmentation (per view)
    crop_padding: int = _opt(0, "random crops after zero-padding by this many pixels (0: no crop)")
    flip: bool = _opt(False, "random horizontal flips")
    # run
    seed: int = _opt(0, "seed of the model's initialisation (>= 0); the augmentation draws from the secret seed")
    # seeds the Poisson sampling, the noise, the augmentation and dropout. None (default): drawn from OS entropy,
    # because anyone who knew it could tell which examples each step used and subtract the noise. Fix it only for
    # tests and debugging.
    secret_seed: int | None = _opt(
        None,
        "seed of the Poisson sampling, the noise, the augmentation and dropout; none: OS entropy. Anyone who knows it "
        "can tell which examples each step used and subtract the noise: fix it only for tests and debugging",
    )
    device: str = _opt("cpu", "cpu, cuda or cuda:<index>")
    amp: str = _opt("none", "autocast of the forward and backward (the clipping stays in fp32)", AMPS)
    threads: int | None = _opt(None, "CPU threads; none: torch's default")
    eval_every: int = _opt(0, "steps between evaluations on the test split (0: ten per run)")
    checkpoint_every: int = _opt(0, "steps between checkpoints (0: at the end only)")
    dist_timeout: float = _opt(1800.0, "seconds a torchrun job waits for a failed or stalled rank before it stops")
    stop_at_step: int | None = _opt(None, "end this invocation after that step (continue later with --resume)")
    # stop after this many steps in a row in which every example's gradient was non-finite (noise-only steps)
    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "stop the run (exit status 1, checkpoint written, resumable) after this many steps in a row in "
            "which every example of the logical batch had a non-finite gradient: such a step is noise only and "
            "spends privacy without learning (a diverged model, NaN data, a bf16 overflow); 0 never stops "
            "(default: 10)"
        },
    )
    # what the run files publish: by default only what epsilon covers or what is public
    log_private_stats: bool = field(
        default=False,
        metadata={
            "help": "also log, per step, the realised Poisson batch size and the training loss and accuracy of the "
            "private batch (metrics.jsonl, progress bar), and the count of examples with a non-finite gradient "
            "(summary.json). These are computed from the private batch without noise: epsilon does NOT cover "
            "them, and anyone who reads them learns about the training data (the batch size changes by one with "
            "each example drawn; the loss and accuracy are exact statistics of the examples drawn). Off, they are "
            "not computed at all (no host sync per micro-batch). Kept on --resume (default: off)"
        },
    )
    out_dir: str | None = _opt(None, "the run folder (created 0700); none: runs/<preset>-<date>-<time>")
    # documentation
    target: str = ""
    h100_hours: str = ""
    notes: str = field(default="", repr=False)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


_DE_ET_AL = dict(
    dataset="cifar10", batch_size=4096, max_physical_batch=1024, augmult=16, steps=2500, optimizer="sgd", lr=4.0,
    momentum=0.0, max_grad_norm=1.0, ema_decay=0.9999, ema_warmup=True, crop_padding=4, flip=True,
    device="cuda", amp="bf16", eval_every=100, checkpoint_every=250, epochs=None,
    notes=(
        "De et al. trained with sigma = 3 for about 2,500 steps and RDP accounting; PLD accounting (the default "
        "here) certifies that at eps ~6.6, so sigma is calibrated to eps 8 at the same step count (smaller "
        "noise). Pass --noise-multiplier 3 for the paper's sigma."
    ),
)  # fmt: skip

_SMOOTHNETS = dict(
    model="smoothnet_v1", batch_size=256, max_physical_batch=256, epochs=30.0, optimizer="sgd", lr=0.002,
    momentum=0.9, weight_decay=2e-4, max_grad_norm=0.1, epsilon=7.0, lr_schedule="cosine", crop_padding=0,
    flip=False, device="cuda", eval_every=0, checkpoint_every=500,
    notes=(
        "Hyper-parameters from the authors' public configuration (NiWaRe/DPBenchmark, lean/config.yaml: batch "
        "256, SGD lr 0.002 momentum 0.9, weight decay 2e-4, clip 0.1, 30 epochs, eps 7); the paper's final "
        "per-dataset recipe could not be checked here, so treat these as its starting point."
    ),
)  # fmt: skip

PRESETS: dict[str, TrainConfig] = {
    "digits": TrainConfig(
        # one thread: the model is tiny (8x8 images), so a second thread gains nothing on an idle machine and, when
        # another process keeps a core busy, OpenMP's synchronisation makes the run 2-3x slower (bench/RESULTS.md)
        threads=1,
        target=">= 90% test accuracy at eps <= 8 on scikit-learn's digits (fastdp's embedded check; no paper)",
        h100_hours="seconds (about 10 s on one CPU core)",
    ),
    "digits-vit": TrainConfig(
        # a ViT (timm's layout, 4x4 patches: an 8x8 digit is 4 tokens and the class token) whose cls_token and
        # pos_embed are parameters of the root: fastdp.engine.owned_params splits them per example, no fallback
        model="vit-mini", optimizer="adam", lr=3e-3, threads=1,
        target=">= 80% test accuracy at eps <= 8 on scikit-learn's digits (85% measured; fastdp's embedded check)",
        h100_hours="minutes (about 30 s of CPU time on one core)",
    ),
    "cifar10-wrn16-4-eps8": TrainConfig(
        model="wrn-16-4", target="79.5% CIFAR-10 test accuracy at (8, 1e-5)-DP (De et al. 2022)",
        h100_hours="~3 h (estimate)", **_DE_ET_AL,
    ),
    "cifar10-wrn40-4-eps8": TrainConfig(
        model="wrn-40-4", target="81.4% CIFAR-10 test accuracy at (8, 1e-5)-DP (De et al. 2022)",
        h100_hours="~9 h (estimate)", **_DE_ET_AL,
    ),
    "cifar10-smoothnet-eps7": TrainConfig(
        dataset="cifar10", target="73.5% CIFAR-10 test accuracy at (7, 1e-5)-DP (Remerscheid et al. 2022)",
        h100_hours="~0.5 h (estimate)", **_SMOOTHNETS,
    ),
    "imagenette-smoothnet-eps7": TrainConfig(
        dataset="imagenette", target="69.7% Imagenette test accuracy at (7, 1e-5)-DP (Remerscheid et al. 2022)",
        h100_hours="~0.5 h (estimate)", **_SMOOTHNETS,
    ),
    "imagenet-nfresnet50-eps8": TrainConfig(
        dataset="imagenet", model="nf_resnet50", image_size=224, batch_size=16384, max_physical_batch=256,
        augmult=4, epochs=None, steps=2000, optimizer="sgd", lr=4.0, momentum=0.0, max_grad_norm=1.0,
        ema_decay=0.99999, crop_padding=0, flip=True, device="cuda", amp="bf16", eval_every=250,
        checkpoint_every=100, target="NF-ResNet-50 on ImageNet at (8, 8e-7)-DP trained from scratch (De et al. "
        "2022 report 32.4% top-1)", delta=8e-7, h100_hours="~300 h on one GPU (estimate): run multi-GPU",
        notes="Batch 16384 and delta 8e-7 as De et al.; steps, lr and augmult were not checked against the paper.",
    ),
    "imagenet-nfnet-f3-finetune": TrainConfig(
        dataset="imagenet", model="nfnet-f3", image_size=320, batch_size=16384, max_physical_batch=64,
        augmult=1, epochs=None, steps=250, optimizer="sgd", lr=4.0, momentum=0.0, max_grad_norm=1.0,
        ema_decay=0.9999, crop_padding=0, flip=True, device="cuda", amp="bf16", eval_every=50, checkpoint_every=25,
        checkpoint="checkpoints/dm_nfnet_f3.pth", delta=8e-7,
        target="NFNet-F3 fine-tuned on ImageNet at (8, 8e-7)-DP (De et al. 2022 report 86.7% top-1 from JFT-4B "
        "pre-training; a public timm checkpoint pre-trained on ImageNet itself is not a private-data setting)",
        h100_hours="~60 h on one GPU (estimate): run multi-GPU",
        notes="Batch 16384 and delta 8e-7 as De et al.; steps and lr were not checked against the paper.",
    ),
}  # fmt: skip


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
